"""The elementary steps of the QC6 procedures, each a plan on a session (plans/qc6_watch.py): a put
the crate acknowledges, ClearAlarm, switching on, moving channels, holding, recovering from a trip.

Channels move with their own move (`bps.abs_set` on an HvChannel, or on the GemLayer for several at
once): the device decides arrival and the SVMax cap (devices/caen.py), and fails the move with
ChannelTripped at a trip, which the step records as now. The step only keeps the ramp's budget in
world time. Every instrument value is read with bps.rd; a dry run reads its defaults: no trip,
channels on (see plans/qc6_watch.py)."""
from __future__ import annotations

import time
import uuid
from typing import Sequence

import bluesky.plan_stubs as bps
from bluesky.utils import FailedStatus

from calbench.devices.base import InstrumentRefused
from calbench.devices.caen import TRIPPED, ChannelOff, ChannelTripped, HvChannel, describe_status
from calbench.plans.monitor_wait import wait_status
from calbench.plans.qc6_watch import ACK_TIMEOUT_S, ITRIP_CLEARED, MAX_WAIT_WALL_S, _Session
from calbench.plans.toolkit import reason
from calbench.plans.world_clock import WorldDeadline

MIN_POLL_S = 0.005           # wall seconds between two looks where no monitor tells the change
RAMP_MARGIN_S = 300.0        # world seconds a ramp may take beyond 3x its nominal time
STATE_TIMEOUT_S = 20.0       # world seconds for the crate to show a commanded state (Pw, trips)
FAULT_RETRIES = 3            # a put the crate could not answer (a fault) is tried again this often


class Qc6Error(RuntimeError):
    """A QC6 procedure cannot go on; the message says why and what to check."""


class CrateUnreachable(Qc6Error):
    """The crate (or its IOC) does not answer."""


class RampTimeout(Qc6Error):
    """A channel did not reach its voltage in the time its ramp rate allows."""


def _group(what: str) -> str:
    return f"qc6-{what}-{uuid.uuid4().hex[:8]}"


def _retry_after(exc: BaseException | None, attempt: int, retries: int) -> bool:
    """A failure worth another try: the crate did not answer (a fault) or the answer was lost;
    not a refused value, and not past the retries."""
    return attempt < retries and not (isinstance(exc, InstrumentRefused) and not exc.fault)


def _put(signal, value, *, retries: int = FAULT_RETRIES):
    """Put and wait for the crate's acknowledgement (plan); a refusal raises; a lost answer, or a
    crate that did not answer (a fault: the plan is suspended meanwhile), is retried."""
    for attempt in range(retries + 1):
        status = None
        try:
            status = yield from bps.abs_set(signal, value, group=_group("put"))
            give_up = time.monotonic() + ACK_TIMEOUT_S
            # the Status itself, not a wait on its group: a pause or suspension ends a wait early
            while not (yield from wait_status(status, max_wall_s=MAX_WAIT_WALL_S)):
                if time.monotonic() > give_up:
                    break
        except FailedStatus as failed:     # the RunEngine reports the failed put; handled below
            status = failed.args[0] if failed.args else status
        if status is None or (status.done and status.success):     # None: a dry run
            return
        exc = status.exception() if status.done else TimeoutError("no acknowledgement")
        if not _retry_after(exc, attempt, retries):
            raise Qc6Error(f"{signal.name} = {value!r} failed: {reason(exc, also=(TimeoutError,))}"
                           ) from exc
        yield from bps.sleep(1.0)


def _clear_alarm(session: _Session, cleared: Sequence[HvChannel] = (),
                 expected_on: Sequence[HvChannel] = ()):
    """ClearAlarm, then wait for a crate reading taken after it. The `cleared` channels (tripped,
    recorded, off: they cannot trip again) must have lost their trip bit, or the crate did not
    clear the alarm; any other trip bit then is a new trip for the next look. ClearAlarm acts on
    the whole crate: a channel of `expected_on` that tripped just before it lost its trip bit
    unseen, and is found off; those channels are returned."""
    layer = session.layer
    t_clear = yield from session.now()
    yield from _put(layer.clear_alarm_cmd, 1)
    now = yield from session.next_reading(t_clear)
    deadline = WorldDeadline(t_clear, STATE_TIMEOUT_S)
    checked = list(cleared or layer.channels)
    while True:
        still = []
        for ch in checked:
            if int((yield from bps.rd(ch.status))) & TRIPPED:
                still.append(ch)
        if not still:
            for ch in checked:               # their next trip bit is a new trip
                session.watch.handled(ch.channel, t_clear)
            break
        if deadline.passed(now):
            raise Qc6Error(f"ClearAlarm did not clear the trip of "
                           f"{', '.join(c.label() for c in still)}; check the crate's alarms "
                           "(an external trip or interlock keeps it set)")
        tripped = session.any_tripped(still)
        yield from session.wait_until(lambda: not tripped())
        now = yield from session.now()
    missed = list(expected_on)
    for _ in range(3):                      # off in three looks: not a monitor in flight
        off = []
        for ch in missed:
            bits = int((yield from bps.rd(ch.status)))
            if int((yield from bps.rd(ch.pw, default_value=1))) != 1 and not bits & TRIPPED:
                off.append(ch)
        missed = off
        if not missed:
            break
        yield from session.next_reading((yield from session.now()))
    return missed


def _switch_on(session: _Session, channels: Sequence[HvChannel]):
    """Pw On, and wait until the monitored Pw says so (monitors may trail the put's answer). A
    channel that trips as soon as it is on (the crate switches it off again, with its trip bit)
    was switched on: the caller's next look records the trip. (A dry run reads Pw Off before and
    On after.)"""
    for ch in channels:
        if int((yield from bps.rd(ch.pw, default_value=0))) != 1:
            yield from _put(ch.pw, 1)
    deadline = WorldDeadline((yield from session.now()), STATE_TIMEOUT_S)

    def on_or_tripped(ch) -> bool:
        return int(ch.pw.get()) == 1 or bool(int(ch.status.get()) & TRIPPED)

    for ch in channels:
        while not (int((yield from bps.rd(ch.pw, default_value=1))) == 1
                   or int((yield from bps.rd(ch.status))) & TRIPPED):
            if deadline.passed((yield from session.now())):
                raise Qc6Error(f"{ch.label()} does not show Pw On after switching it on; check "
                               "the crate (interlock, channel disabled)")
            yield from session.wait_until(lambda: on_or_tripped(ch))


def _ramp(session: _Session, setpoints: dict[HvChannel, float]):
    """Move the channels to their voltages (V) with the devices' own move, and wait for it within
    the ramp's budget in world time (3x the nominal ramp + RAMP_MARGIN_S). Returns the tripped
    channels [(channel, Status)] at the first trip ([] when all arrived)."""
    slowest_s = 0.0
    for ch, v in setpoints.items():
        vmon = float((yield from bps.rd(ch.vmon)))
        rate = max(min(float((yield from bps.rd(ch.rup, default_value=1.0))),
                       float((yield from bps.rd(ch.rdwn, default_value=1.0)))), 0.1)
        slowest_s = max(slowest_s, abs(float(v) - vmon) / rate)   # SVMax can only shorten it
    budget_s = 3.0 * slowest_s + RAMP_MARGIN_S
    if len(setpoints) == 1:                                       # bps.mv(channel, volts)
        ((mover, target),) = setpoints.items()
        target = float(target)
    else:                                                         # one move of the layer
        mover = session.layer
        target = {ch.electrode: float(v) for ch, v in setpoints.items()}
    for attempt in range(FAULT_RETRIES + 1):
        t0 = yield from session.now()
        deadline = WorldDeadline(t0, budget_s)
        status = None
        try:
            status = yield from bps.abs_set(mover, target, group=_group("move"))
            while not (yield from wait_status(status, max_wall_s=MAX_WAIT_WALL_S)):
                yield from bps.checkpoint()
                now = yield from session.now()
                if deadline.passed(now):
                    raise RampTimeout((yield from _late(setpoints, now - t0)))
            if status is None or status.success:                  # None: a dry run
                return []
            yield from bps.null()        # the RunEngine reports the failed move here
            failure = status.exception()
        except FailedStatus as failed:
            status = failed.args[0] if failed.args else status
            failure = status.exception() if status is not None else failed
        except GeneratorExit:
            raise
        except BaseException:
            # a timeout, an abort or stop, a failing plan: nobody waits on the move any more
            if status is not None and not status.done:
                yield from bps.stop(mover)
            raise
        if isinstance(failure, ChannelTripped):
            # the incident: every channel of the move that shows a trip bit now, and this one
            tripped = yield from session.scan(list(setpoints))
            if failure.channel is not None and all(ch is not failure.channel for ch, _ in tripped):
                tripped.append((failure.channel, failure.bits or ITRIP_CLEARED))
            return tripped
        if isinstance(failure, ChannelOff):
            raise Qc6Error(f"{failure}") from failure
        if not _retry_after(failure, attempt, FAULT_RETRIES):
            raise Qc6Error(f"moving {', '.join(ch.label() for ch in setpoints)} failed: "
                           f"{reason(failure, also=(Exception,))}") from failure
        yield from bps.sleep(1.0)


def _late(setpoints: dict[HvChannel, float], took_s: float):
    """The RampTimeout message: where each channel is (plan)."""
    parts = []
    for ch, v in setpoints.items():
        vmon = float((yield from bps.rd(ch.vmon)))
        bits = int((yield from bps.rd(ch.status)))
        parts.append(f"{ch.label()} VMon {vmon:.1f} V for {float(v):g} V, Status "
                     f"{describe_status(bits)}")
    return (f"not at the setpoint after {took_s:.0f} s (world): " + "; ".join(parts)
            + "; check RUp/RDWn and the channels")


def _hold(session: _Session, watch: Sequence[HvChannel], hold_s: float, *, on_poll=None,
          look_every_s: float | None = None):
    """Hold for hold_s world seconds watching for trips; returns the tripped channels at once if
    any trip ([] when the hold completed). The plan looks when a channel trips, when the hold ends,
    every look_every_s world seconds, and at least every MAX_WAIT_WALL_S wall seconds;
    on_poll(now) is a plan run at every look."""
    t0 = yield from session.now()
    tripped_now = session.any_tripped(watch)
    while True:
        yield from bps.checkpoint()
        tripped = yield from session.scan(watch)
        if tripped:
            return tripped
        now = yield from session.now()
        if on_poll is not None:
            yield from on_poll(now)
        if now - t0 >= hold_s:
            return []
        wake_at = t0 + hold_s
        if look_every_s is not None:
            wake_at = min(wake_at, now + look_every_s)
        yield from session.wait_until(lambda: tripped_now() or session.world_now() >= wake_at,
                                      until=wake_at)


def _recover(session: _Session, tripped, watch: Sequence[HvChannel], recovery_s: float):
    """Record an incident, clear the alarm and wait recovery_s (world) watching the channels still
    on; a trip meanwhile is recorded too. Returns (incidents recorded, channels to switch back on)."""
    incidents, off = 0, []
    while tripped:
        yield from session.record_trips(tripped)
        incidents += 1
        off += [ch for ch, _ in tripped]
        still_on = [c for c in watch if c not in off]
        missed = yield from _clear_alarm(session, [ch for ch, _ in tripped], still_on)
        if missed:                        # tripped as the alarm was cleared: a trip all the same
            tripped = [(ch, ITRIP_CLEARED) for ch in missed]
            continue
        tripped = yield from _hold(session, still_on, recovery_s)
    return incidents, off


def _last_look(session: _Session, channels: Sequence[HvChannel]):
    """After switching channels off: record a trip the crate made since the plan last looked (a
    channel that is off cannot trip any more). Returns the number of incidents recorded."""
    yield from session.next_reading((yield from session.now()))
    tripped = yield from session.scan(channels)
    if not tripped:
        return 0
    yield from session.record_trips(tripped)
    yield from _clear_alarm(session, [ch for ch, _ in tripped])
    return 1
