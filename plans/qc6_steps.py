"""The elementary steps of the QC6 procedures, each a plan on a session (plans/qc6_watch.py): a put
the crate acknowledges, ClearAlarm, switching on, ramping, holding, recovering from a trip."""
from __future__ import annotations

import time
from typing import Sequence

import bluesky.plan_stubs as bps
from bluesky.utils import FailedStatus

from calbench.devices.base import InstrumentRefused
from calbench.devices.caen import TRIPPED, HvChannel, at_setpoint, describe_status
from calbench.plans.qc6_watch import ACK_TIMEOUT_S, ITRIP_CLEARED, _Session

MIN_POLL_S = 0.005           # wall seconds between two looks where no monitor tells the change
RAMP_MARGIN_S = 300.0       # world seconds a ramp may take beyond 3x its nominal time
STATE_TIMEOUT_S = 20.0       # world seconds for the crate to show a commanded state (Pw, trips)


class Qc6Error(RuntimeError):
    """A QC6 procedure cannot go on; the message says why and what to check."""


class CrateUnreachable(Qc6Error):
    """The crate (or its IOC) does not answer."""


class RampTimeout(Qc6Error):
    """A channel did not reach its voltage in the time its ramp rate allows."""



def _put(signal, value, *, retries: int = 3):
    """Put and wait for the crate's acknowledgement; a refusal raises; a lost answer, or a crate
    that did not answer (a fault: the plan is suspended meanwhile), is retried."""
    for attempt in range(retries + 1):
        group = f"qc6-put-{id(signal)}-{attempt}-{time.monotonic_ns()}"
        status = yield from bps.abs_set(signal, value, group=group)
        deadline = time.monotonic() + ACK_TIMEOUT_S
        try:
            yield from bps.wait(group=group, timeout=ACK_TIMEOUT_S, error_on_timeout=False)
            # a pause or suspension may end the wait early: look at the status itself
            while not status.done and time.monotonic() < deadline:
                yield from bps.sleep(MIN_POLL_S)
        except FailedStatus:           # the RunEngine reports the failed put; handled below
            pass
        if status.done and status.success:
            return
        exc = status.exception() if status.done else TimeoutError("no acknowledgement")
        if (isinstance(exc, InstrumentRefused) and not exc.fault) or attempt == retries:
            raise Qc6Error(f"{signal.name} = {value!r} failed: {exc}") from exc
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
    deadline = session.deadline(STATE_TIMEOUT_S)
    while (yield from session.now()) <= t_clear:
        # a crate reading taken after the ClearAlarm (an IOC that stops answering suspends)
        yield from session.wait_until(session.world_passed(t_clear))
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
        if deadline.passed(session.world_now()):
            raise Qc6Error(f"ClearAlarm did not clear the trip of "
                           f"{', '.join(c.label() for c in still)}; check the crate's alarms "
                           "(an external trip or interlock keeps it set)")
        tripped = session.any_tripped(still)
        yield from session.wait_until(lambda: not tripped())
    missed = list(expected_on)
    for _ in range(3):                      # off in three looks: not a monitor in flight
        off = []
        for ch in missed:
            bits = int((yield from bps.rd(ch.status)))
            if int((yield from bps.rd(ch.pw))) != 1 and not bits & TRIPPED:
                off.append(ch)
        missed = off
        if not missed:
            break
        yield from session.wait_until(session.world_passed(session.world_now()))
    return missed


def _switch_on(session: _Session, channels: Sequence[HvChannel]):
    """Pw On, and wait until the monitored Pw says so (monitors may trail the put's answer). A
    channel that trips as soon as it is on (the crate switches it off again, with its trip bit)
    was switched on: the caller's next look records the trip."""
    for ch in channels:
        if int((yield from bps.rd(ch.pw))) != 1:
            yield from _put(ch.pw, 1)
    deadline = session.deadline(STATE_TIMEOUT_S)

    def on_or_tripped(ch) -> bool:
        return int(ch.pw.get()) == 1 or bool(int(ch.status.get()) & TRIPPED)

    for ch in channels:
        while not (int((yield from bps.rd(ch.pw))) == 1
                   or int((yield from bps.rd(ch.status))) & TRIPPED):
            if deadline.passed(session.world_now()):
                raise Qc6Error(f"{ch.label()} does not show Pw On after switching it on; check "
                               "the crate (interlock, channel disabled)")
            yield from session.wait_until(lambda: on_or_tripped(ch))


def _ramp(session: _Session, setpoints: dict[HvChannel, float], watch: Sequence[HvChannel]):
    """Write the channels' V0Set and wait, in world time, until each has arrived (not ramping,
    |VMon - V0Set| <= 1 V, V0Set as held by the crate, i.e. capped at SVMax). Returns the tripped
    channels as soon as one of them or of `watch` trips ([] when all arrived)."""
    targets, slowest_s = {}, 0.0
    for ch, v in setpoints.items():
        targets[ch] = min(float(v), float((yield from bps.rd(ch.svmax))))
        yield from _put(ch.v0set, float(v))
        vmon = float((yield from bps.rd(ch.vmon)))
        rate = max(min(float((yield from bps.rd(ch.rup))), float((yield from bps.rd(ch.rdwn)))), 0.1)
        slowest_s = max(slowest_s, abs(targets[ch] - vmon) / rate)
    timeout_s = 3.0 * slowest_s + RAMP_MARGIN_S
    looked_at = list(dict.fromkeys([*watch, *targets]))
    off_looks: dict[HvChannel, int] = {}
    t0 = yield from session.now()
    deadline = session.deadline(timeout_s)
    tripped_now = session.any_tripped(looked_at)

    def changed(now):
        # wake on a trip, on arrival, on a channel found off (then at the next crate reading, so
        # that three looks at it are three readings), and at the timeout
        def condition():
            # past the timeout: each crate reading is a look that counts for the deadline
            if tripped_now() or session.world_now() > max(now, t0 + timeout_s):
                return True
            if all(at_setpoint(int(c.status.get()), float(c.vmon.get()), v)
                   for c, v in targets.items()):
                return True
            return bool(off_looks) and session.world_now() > now
        return condition

    while True:
        yield from bps.checkpoint()
        tripped = session.scan(looked_at)
        if tripped:
            return tripped
        now = yield from session.now()
        late = [ch for ch, v in targets.items() if not at_setpoint(*session.state[ch][:2], v)]
        if not late:
            return []
        # Pw, not the ON bit (Status follows at the crate's next poll); seen off in three crate
        # readings in a row, so that a monitor still in flight after switching on is not taken
        for ch in late:
            off_looks[ch] = off_looks.get(ch, 0) + 1 if not session.state[ch][2] else 0
        off_looks = {ch: n for ch, n in off_looks.items() if n}
        off = [ch for ch in late if off_looks.get(ch, 0) >= 3]
        if off:
            raise Qc6Error(f"{', '.join(c.label() for c in off)} went off without a trip while "
                           "ramping: someone switched it off, or the crate's interlock; check the "
                           "crate before restarting")
        if deadline.passed(session.world_now()):
            raise RampTimeout(
                f"not at the setpoint after {now - t0:.0f} s (world): " + "; ".join(
                    f"{c.label()} VMon {session.state[c][1]:.1f} V for {targets[c]:g} V, Status "
                    f"{describe_status(session.state[c][0])}" for c in late)
                + "; check RUp/RDWn and the channels")
        yield from session.wait_until(changed(now))


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
        tripped = session.scan(watch)
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
        yield from session.wait_until(
            lambda: tripped_now() or session.world_now() >= wake_at)


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
    t_off = yield from session.now()
    while (yield from session.now()) <= t_off:
        # a crate reading taken after the switch-off (an IOC that stops answering suspends)
        yield from session.wait_until(session.world_passed(t_off))
    tripped = session.scan(channels)
    if not tripped:
        return 0
    yield from session.record_trips(tripped)
    yield from _clear_alarm(session, [ch for ch, _ in tripped])
    return 1


