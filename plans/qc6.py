# To be split (issue 15): QC6 steps, safety, watch, procedures and resume, one room each.
"""GEM QC6 high-voltage tests on a CAEN crate, as Bluesky plans with the lab's defaults.

    RE(check_connection(layer))
    RE(megger_test("GE21-M6", [12.0, 15.5, 9.8], [0, 1, 0]))
    RE(stress_test(layer))               # foils one at a time, 0 -> 650 V in 10 V steps
    RE(iv_short_stability(layer))        # divider 200 -> 4600 V, then foils at 550 V for 2 h
    RE(long_stability(layer))            # divider to 4200 V, then foils only at 580 V for 15 h
    RE(resume_long_stability(layer, catalog))   # after a crash: continues with elapsed time + trips

`layer` is a devices.caen.GemLayer (`crate.layer(1)`). Defaults are those of the lab's scripts
(reference/qc6_batmet.md part A), with their bugs fixed: ramps are awaited (status bits, not a
string that never matched), trips are the crate's trip bits (ITRIP/ETRIP) and not any channel found
off, and the voltage recorded for a trip is the last VMon read before it, not the one after.

Safety: every test holds the crate's procedure lease (plans/lease.py): if the RunEngine's process
dies, the IOC ramps every channel down and off by itself once the session's heartbeats stop for the
lab's `lease_s` (30 s); a pause holds the voltages (the GEM practice) and the lease keeps running.
Every test runs inside `qc6_safety`: on any exit (normal end, exception, RE.abort/stop, Ctrl-C,
the crate becoming unreachable) every channel of the layer gets V0Set 0 and Pw Off and the plan
waits until VMon is ~0; while the crate does not answer the plan is suspended, and it resumes
where it was when the crate answers again (trips latched meanwhile are then recorded).

Time: durations are instrument (world) time, read from the IOC's WorldTime_RBV, never the wall
clock; the same plan holds 15 hours in the lab and a few seconds against the accelerated simulator.
Fault timeouts (ramp, switch-on, ClearAlarm, discharge) are world time too, and pass only after three
crate readings past their end (plans/world_clock.py:WorldDeadline): a loaded PC cannot invent them.
Trips are events of the stream "trips" (channel, electrode, voltage before the trip, V0Set, world
time, incident number); result files and plots come from analysis/qc6_callbacks.py.
"""
from __future__ import annotations

import asyncio
import time
import weakref
from typing import Sequence

import bluesky.plan_stubs as bps
import numpy as np
from bluesky.preprocessors import finalize_wrapper, subs_wrapper, suspend_wrapper
from bluesky.suspenders import SuspenderBase
from bluesky.utils import FailedStatus, Msg, RunEngineControlException
from ophyd import Component as Cpt
from ophyd import Device, Signal

from calbench.analysis.qc6_callbacks import Qc6LivePlot, Qc6ResultFiles
from calbench.analysis.qc6_files import result_path
from calbench.devices.base import InstrumentRefused, unconnected_pvs
from calbench.plans.lease import under_lease
from calbench.plans.monitor_wait import MonitorWaiter
from calbench.plans.progress import StepProgress
from calbench.plans.toolkit import results_dir as toolkit_results_dir
from calbench.plans.world_clock import InstrumentClock, WorldDeadline
from calbench.devices.caen import (
    ELECTRODES, FOILS, RAMPING, STATUS_ON, TRIPPED, GemLayer, HvChannel, at_setpoint,
    describe_status)

# The procedures' defaults (the lab's, reference/qc6_batmet.md part A) are their keyword defaults.
MEGGER_VOLTAGE_V = 550.0

OFF_V = 2.0                  # a channel below this (V) counts as ramped down
MIN_POLL_S = 0.005           # wall seconds between two looks where no monitor tells the change
MAX_WAIT_WALL_S = 0.5        # wall seconds a plan waits for a monitor update before looking anyway
PROGRESS_EVERY_S = 600.0     # world seconds between progress events of a stability hold
RAMP_MARGIN_S = 300.0       # world seconds a ramp may take beyond 3x its nominal time
ACK_TIMEOUT_S = 20.0         # wall seconds for Channel Access to acknowledge a put
STATE_TIMEOUT_S = 20.0       # world seconds for the crate to show a commanded state (Pw, trips)
CONNECT_TIMEOUT_S = 30.0     # wall seconds for the layer's PVs to connect (Channel Access)
# Status recorded for a channel found off after a ClearAlarm erased its trip bit: ITRIP
ITRIP_CLEARED = 0x200


class Qc6Error(RuntimeError):
    """A QC6 procedure cannot go on; the message says why and what to check."""


class CrateUnreachable(Qc6Error):
    """The crate (or its IOC) does not answer."""


class RampTimeout(Qc6Error):
    """A channel did not reach its voltage in the time its ramp rate allows."""


# -- records: soft devices whose readings are the plan's own data ---------------------------------
class TripRecord(Device):
    """One trip: an event in the "trips" stream (keys trip_channel, trip_voltage, ...)."""
    channel = Cpt(Signal, value=0, kind="hinted")
    electrode = Cpt(Signal, value="", kind="normal")
    voltage = Cpt(Signal, value=0.0, kind="hinted")      # last VMon before the trip (V)
    v0set = Cpt(Signal, value=0.0, kind="normal")        # setpoint then (V)
    time = Cpt(Signal, value=0.0, kind="normal")         # world epoch s the crate showed the trip
    incident = Cpt(Signal, value=0, kind="normal")       # trips seen in one poll share a number


class Qc6Record(Device):
    """Plan state recorded with measurements (keys qc6_world_time, qc6_elapsed_s, ...)."""
    world_time = Cpt(Signal, value=0.0, kind="normal")
    elapsed_s = Cpt(Signal, value=0.0, kind="hinted")
    trips = Cpt(Signal, value=0, kind="hinted")
    setpoint = Cpt(Signal, value=0.0, kind="hinted")     # divider (IV) or foil (stress) voltage


class MeggerRecord(Device):
    gem = Cpt(Signal, value=0, kind="hinted")
    impedance_GOhm = Cpt(Signal, value=0.0, kind="hinted")
    sparks = Cpt(Signal, value=0, kind="hinted")


def _fill(record: Device, **values) -> None:
    # soft signals: setting them is bookkeeping, not an instrument action
    for key, value in values.items():
        getattr(record, key).put(value)


# -- the crate-unreachable suspender --------------------------------------------------------------
class SuspendWhenCrateUnreachable(SuspenderBase):
    """Suspends the plan while the layer's IOC reports the crate unreachable (Connected_RBV = 0) or
    the IOC itself is gone (CA disconnection); resumes `sleep` wall seconds after it answers."""

    def __init__(self, layer: GemLayer, *, sleep: float = 0.5):
        super().__init__(layer.connected_rbv, sleep=sleep,
                         tripped_message=f"the CAEN crate on {layer.prefix} does not answer")
        self._layer = layer
        self._tokens: list = []

    def _reachable(self) -> bool:
        sig = self._sig
        try:
            return bool(sig.connected) and int(sig.get()) == 1
        except Exception:       # a disconnected signal cannot even be read
            return False

    def _changed(self, *args, **kwargs):
        self(value=self._reachable())

    def install(self, RE, *, event_type=None):
        with self._lock:
            self.RE = RE
        self._tokens = [self._sig.subscribe(self._changed, run=True),
                        self._sig.subscribe(self._changed, event_type="meta", run=False)]

    def remove(self):
        for token in self._tokens:
            self._sig.unsubscribe(token)
        self._tokens = []
        # SuspenderBase.remove releases a pending suspension; its clear_sub of `self` is a no-op
        super().remove()

    def _should_suspend(self, value):
        return not value

    def _should_resume(self, value):
        return bool(value)

    def _get_justification(self):
        if not self._tripped:
            return ""
        try:
            message = self._layer.status_message.get()
        except Exception:
            message = "the IOC does not answer either"
        return (f"{self._tripped_message}: {message}. The plan resumes by itself when the crate "
                "answers again; Ctrl-C twice then RE.abort() ramps the layer down instead.")


# -- the session: world time, trip detection, recording -------------------------------------------
class _LayerWatch:
    """What the crate's monitors told about a layer, kept for the layer device's lifetime: the time
    each trip bit appeared (the IOC's timestamp, world clock) and each channel's last VMon while on
    and not tripped (the voltage before a trip). Callbacks see every update the IOC published, in
    order, so neither depends on how often the plan looks. The waiter wakes waiting plans at each
    new world time, which the IOC publishes after every reading of the crate."""

    def __init__(self, layer: GemLayer):
        self.bits: dict[int, int] = {ch.channel: 0 for ch in layer.channels}
        self.last_ok_V: dict[int, float] = {ch.channel: 0.0 for ch in layer.channels}
        self.trip_time: dict[int, float] = {}      # channel -> world time of its trip bit
        self.not_before: dict[int, float] = {}     # channel -> its trips up to here are handled
        for ch in layer.channels:
            for sig in (ch.status, ch.vmon):
                sig.subscribe(self._update, run=False)
        self.waiter = MonitorWaiter([layer.world_time, layer.connected_rbv])

    def handled(self, channel: int, world_t: float) -> None:
        """The channel's trips up to world_t are recorded or cleared: the next trip bit is new."""
        self.not_before[channel] = max(self.not_before.get(channel, 0.0), world_t)
        self.trip_time.pop(channel, None)

    def _update(self, value=None, timestamp=None, obj=None, **kwargs) -> None:
        if value is None or timestamp is None:
            return
        channel = obj.parent.channel
        if obj.attr_name == "status":
            bits = int(value)
            # the first trip bit published after the plan last recorded or cleared this channel's
            # trip (not "after a Status without it": a monitor may skip the short cleared state,
            # and callbacks trail the values the plan reads)
            if (bits & TRIPPED and channel not in self.trip_time
                    and float(timestamp) > self.not_before.get(channel, 0.0)):
                self.trip_time[channel] = float(timestamp)
            self.bits[channel] = bits
        else:
            bits = self.bits[channel]
            if bits & STATUS_ON and not bits & TRIPPED:
                self.last_ok_V[channel] = float(value)


_WATCHES: "weakref.WeakKeyDictionary[GemLayer, _LayerWatch]" = weakref.WeakKeyDictionary()


def _watch_of(layer: GemLayer) -> _LayerWatch:
    if layer not in _WATCHES:
        _WATCHES[layer] = _LayerWatch(layer)
    return _WATCHES[layer]


class _Session:
    """State of one QC6 run: the world clock, trip bookkeeping and the soft records."""

    def __init__(self, layer: GemLayer):
        self.layer = layer
        self.trip = TripRecord(name="trip")
        self.record = Qc6Record(name="qc6")
        self.incidents = 0
        self.watch = _watch_of(layer)
        self.state: dict[HvChannel, tuple[int, float, int]] = {}   # last (Status, VMon, Pw)
        self.clock = InstrumentClock(layer.world_time)

    def now(self):
        """World time (epoch s) of the crate (plan)."""
        return (yield from self.clock.now())

    def world_now(self) -> float:
        """The crate's world time as last published (its monitor; not a plan step)."""
        return float(self.layer.world_time.get())

    def wait_until(self, condition, *, max_wall_s: float = MAX_WAIT_WALL_S):
        """Until condition() holds (checked at once, then at each world time the IOC publishes,
        i.e. after each reading of the crate, and at link changes), at most max_wall_s wall
        seconds (plan)."""
        yield from self.watch.waiter.wait(condition, max_wall_s=max_wall_s)

    def deadline(self, world_s: float) -> WorldDeadline:
        """A fault timeout of world_s on the crate's clock (see WorldDeadline): a loaded control
        PC cannot trip it."""
        return WorldDeadline(self.world_now(), world_s)

    def world_passed(self, world_t: float):
        """A condition: the crate has published a world time after world_t."""
        return lambda: self.world_now() > world_t

    def any_tripped(self, channels: Sequence[HvChannel]):
        """A condition: one of the channels shows a trip bit."""
        return lambda: any(int(ch.status.get()) & TRIPPED for ch in channels)

    def scan(self, channels: Sequence[HvChannel]):
        """A look at the channels as their monitors show them (Status, VMon, Pw into self.state,
        VMon before Status: see HvChannel): the ones with trip bits set, with their Status."""
        tripped = []
        for ch in channels:
            vmon = float(ch.vmon.get())
            bits = int(ch.status.get())
            self.state[ch] = (bits, vmon, int(ch.pw.get()))
            if bits & TRIPPED:
                tripped.append((ch, bits))
        return tripped

    def record_trips(self, tripped):
        """One incident: an event per tripped channel in the "trips" stream (plan)."""
        self.incidents += 1
        t = yield from self.now()
        # the callbacks trail the values the plan reads: let them reach the trip bits first
        unseen = [ch for ch, bits in tripped
                  if bits != ITRIP_CLEARED and ch.channel not in self.watch.trip_time]
        if unseen:
            yield from self.wait_until(
                lambda: all(ch.channel in self.watch.trip_time for ch in unseen),
                max_wall_s=ACK_TIMEOUT_S / 10)
        for ch, bits in tripped:
            v0set = float((yield from bps.rd(ch.v0set)))
            voltage = self.watch.last_ok_V[ch.channel]
            seen = self.watch.trip_time.get(ch.channel, t)
            self.watch.handled(ch.channel, seen)
            _fill(self.trip, channel=ch.channel, electrode=ch.electrode,
                  voltage=round(voltage, 2), v0set=v0set, time=seen,
                  incident=self.incidents)
            yield from bps.create("trips")
            yield from bps.read(self.trip)
            yield from bps.save()
            print(f"QC6: trip #{self.incidents} on {ch.label()} at {voltage:.1f} V "
                  f"(Status {describe_status(bits)})")

    def progress(self, elapsed_s: float, trips: int, setpoint: float, readables=(),
                 stream: str = "progress"):
        """An event with the plan's state and the given devices' readings (plan)."""
        t = yield from self.now()
        _fill(self.record, world_time=t, elapsed_s=elapsed_s, trips=trips, setpoint=setpoint)
        yield from bps.trigger_and_read([self.record, *readables], name=stream)


# -- elementary steps ---------------------------------------------------------------------------
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


# -- safety ---------------------------------------------------------------------------------------
def all_off(layer: GemLayer, *, off_V: float = OFF_V, timeout_s: float | None = None):
    """V0Set 0 and Pw Off on every channel of the layer, then wait (world time) until every VMon is
    below off_V. Keeps going past a failing channel and raises at the end naming what failed."""
    errors = []
    for ch in layer.channels:
        for sig, value in ((ch.v0set, 0.0), (ch.pw, 0)):
            try:
                yield from _put(sig, value, retries=1)
            except Exception as exc:      # the other channels must still be switched off
                errors.append(f"{sig.name}: {exc}")
    if errors:
        raise Qc6Error("could not switch the layer off: " + "; ".join(errors) + ". Switch the "
                       "channels off at the crate (front panel or GECO) before touching the detector")
    session = _Session(layer)
    if timeout_s is None:
        worst = 0.0
        for ch in layer.channels:
            rate = max(float((yield from bps.rd(ch.rdwn))), 0.1)
            worst = max(worst, float((yield from bps.rd(ch.vmon))) / rate)
        timeout_s = 3.0 * worst + RAMP_MARGIN_S
    t0 = yield from session.now()
    deadline = session.deadline(timeout_s)

    def still_high() -> list[str]:
        # as the monitors show them; VMon before Status (see HvChannel)
        high = []
        for ch in layer.channels:
            vmon = float(ch.vmon.get())
            if vmon > off_V or int(ch.status.get()) & RAMPING:
                high.append(f"{ch.label()} {vmon:.1f} V")
        return high

    while True:
        high = still_high()
        if not high:
            return
        now = yield from session.now()
        if deadline.passed(session.world_now()):
            raise Qc6Error(f"the layer is switched off but still not discharged after "
                           f"{now - t0:.0f} s: {', '.join(high)}; check the crate")
        yield from session.wait_until(
            lambda: session.world_now() > max(now, t0 + timeout_s) or not still_high())


def qc6_safety(layer: GemLayer, plan):
    """Run `plan` so that the layer ends ramped down and off whatever happens, suspended while the
    crate does not answer. The RunEngine does not replay messages after a pause or suspension (a
    replayed voltage set would be dangerous): the plan continues where it was."""
    def inner():
        was_rewindable = yield Msg("rewindable", None, None)
        yield Msg("rewindable", None, False)
        try:
            return (yield from suspend_wrapper(plan, SuspendWhenCrateUnreachable(layer)))
        finally:
            yield Msg("rewindable", None, was_rewindable)

    return (yield from finalize_wrapper(inner(), all_off(layer)))


# -- shared pieces of the procedures --------------------------------------------------------------
_results_dir = toolkit_results_dir


def _wait_connected(layer: GemLayer, timeout_s: float = CONNECT_TIMEOUT_S):
    """Until every PV of the layer is connected (a device built with connect=False, as the
    profile builds `layer`, connects in the background), at most timeout_s wall seconds (plan)."""
    async def connected():
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not layer.connected and loop.time() < deadline:
            await asyncio.sleep(0.05)

    if not layer.connected:
        yield Msg("wait_for", None, [connected])
    if not layer.connected:
        missing = unconnected_pvs(layer)
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CrateUnreachable(f"no IOC answers on {layer.prefix} (unconnected: "
                               f"{', '.join(missing[:3])}{more}); start it with `calbench ioc run "
                               "caen --sim` (or the hardware IOC), or check the prefix, slot and "
                               "layer")


def _preflight(layer: GemLayer):
    """The crate answers (else a clear error), and no trip is left latched from before (plan)."""
    yield from _wait_connected(layer)
    if int((yield from bps.rd(layer.connected_rbv))) != 1:
        message = yield from bps.rd(layer.status_message)
        raise CrateUnreachable(f"the IOC on {layer.prefix} answers but the crate does not: "
                               f"{message}; check the crate's network link and power")
    session = _Session(layer)
    for ch in layer.channels:
        if int((yield from bps.rd(ch.status))) & TRIPPED:
            yield from _clear_alarm(session)
            break
    return session


# plan_name of each test's run: the plan the lab calls (cat.search(Key("plan_name") == "stress_test"))
_PLAN_NAMES = {"stress": "stress_test"}


def _base_md(layer: GemLayer, test: str, params: dict, md: dict | None) -> dict:
    return {"procedure": "qc6", "qc6_test": test, "step": test,
            "plan_name": _PLAN_NAMES.get(test, test), "plan_args": params,
            "detector_name": layer.detector_name,
            "layer": layer.layer, "slot": layer.slot, "crate_prefix": layer.prefix,
            "channels": [ch.channel for ch in layer.channels],
            "foil_channels": [ch.channel for ch in layer.foils],
            "qc6_params": params, **(md or {})}


def _run(plan, md: dict):
    """One run around `plan`, returning the plan's result; the stop document says how it ended
    (a failed QC verdict is a successful run whose reason starts with "Test Failed")."""
    yield from bps.open_run(md)
    try:
        result = yield from plan
    except GeneratorExit:
        raise
    except RunEngineControlException as exc:
        yield from bps.close_run(exit_status=exc.exit_status, reason=str(exc))
        raise
    except BaseException as exc:
        yield from bps.close_run(exit_status="fail", reason=f"{type(exc).__name__}: {exc}")
        raise
    passed = result.get("passed", True) if isinstance(result, dict) else True
    yield from bps.close_run(reason="passed" if passed else
                             "Test Failed: Max number of trips exceeded")
    return result


def _with_callbacks(plan, live_plot: bool, files: bool = True):
    subs = ([Qc6ResultFiles()] if files else []) + ([Qc6LivePlot()] if live_plot else [])
    return (yield from subs_wrapper(plan, subs))


# -- check_connection ---------------------------------------------------------------------------
def check_connection(layer: GemLayer, *, md: dict | None = None):
    """Check that the crate answers and that the board in the layer's slot is there: records the
    crate map and the channel names as a run; raises CrateUnreachable with the remedy otherwise."""
    yield from _preflight(layer)
    board = {}
    for key in ("model", "description", "serial_number", "firmware", "n_channels"):
        board[key] = yield from bps.rd(getattr(layer.board, key))
    system = yield from bps.rd(layer.system_type)
    if int(board["n_channels"]) < max(ch.channel for ch in layer.channels) + 1:
        raise Qc6Error(f"slot {layer.slot} holds a {board['model']} with {board['n_channels']} "
                       f"channels; layer {layer.layer} needs channels "
                       f"{min(c.channel for c in layer.channels)}-"
                       f"{max(c.channel for c in layer.channels)}: check the `slot`/`layer` settings")
    md = _base_md(layer, "check_connection", {},
                  {"crate": {"system_type": system, **board}, **(md or {})})

    def body():
        yield from bps.trigger_and_read([layer.board, *layer.channels], name="primary")
        return {"system_type": system, **board}

    result = yield from _with_callbacks(_run(body(), md), live_plot=False, files=False)
    print(f"QC6: {system} answers on {layer.prefix}; slot {layer.slot}: {board['model']} "
          f"serial {board['serial_number']} firmware {board['firmware']}, "
          f"{board['n_channels']} channels")
    return result


# -- megger_test ----------------------------------------------------------------------------------
def megger_test(detector_name: str, impedance_GOhm: Sequence[float], sparks: Sequence[int], *,
                comments: str = "", voltage_V: float = MEGGER_VOLTAGE_V, results_dir=None,
                md: dict | None = None):
    """Record the operator's Megger test of the 3 foils (impedance in GOhm and sparks in 1 min at
    550 V, measured with the Megger, not the crate) as a run, and write the lab's spreadsheet
    <results>/<detector>/Megger_Test/Megger_Test_<date>.xlsx."""
    impedance_GOhm, sparks = list(impedance_GOhm), list(sparks)
    if len(impedance_GOhm) != 3 or len(sparks) != 3:
        raise ValueError("give the impedance (GOhm) and the spark count of GEM 1, 2 and 3: "
                         f"got {len(impedance_GOhm)} impedances and {len(sparks)} spark counts")
    if any(not np.isfinite(z) or z <= 0 for z in impedance_GOhm):
        raise ValueError(f"impedances must be positive numbers of GOhm, got {impedance_GOhm}")
    if any(int(s) != s or s < 0 for s in sparks):
        raise ValueError(f"spark counts must be whole numbers >= 0, got {sparks}")
    from datetime import datetime
    now = datetime.now().timestamp()
    path = result_path(_results_dir(results_dir), detector_name, "megger", now)
    record = MeggerRecord(name="megger")
    md = {"procedure": "qc6", "qc6_test": "megger", "step": "megger", "plan_name": "megger_test",
          "plan_args": {"detector_name": detector_name, "impedance_GOhm": list(impedance_GOhm),
                        "sparks": list(sparks), "voltage_V": voltage_V},
          "detector_name": detector_name,
          "qc6_files": {"megger": str(path)}, "megger_comments": comments,
          "megger_voltage_V": float(voltage_V), "world_start": now,
          "qc6_params": {"impedance_GOhm": impedance_GOhm, "sparks": sparks,
                         "voltage_V": voltage_V}, **(md or {})}

    def body():
        for gem, (z, s) in enumerate(zip(impedance_GOhm, sparks), start=1):
            _fill(record, gem=gem, impedance_GOhm=float(z), sparks=int(s))
            yield from bps.trigger_and_read([record])
        return str(path)

    return (yield from _with_callbacks(_run(body(), md), live_plot=False))


# -- stress_test ----------------------------------------------------------------------------------
def stress_voltages(vstart_V: float, vmax_V: float, vstep_V: float) -> list[float]:
    """range(vstart, vmax, vstep) plus vmax (V): 66 steps for 0 -> 650 V by 10 V."""
    if vstep_V <= 0 or vmax_V <= vstart_V:
        raise ValueError(f"need vstep > 0 and vmax > vstart (V), got {vstart_V}, {vmax_V}, {vstep_V}")
    return [float(v) for v in np.arange(vstart_V, vmax_V, vstep_V)] + [float(vmax_V)]


def stress_test(layer: GemLayer, *, vstart_V: float = 0.0, vmax_V: float = 650.0,
                vstep_V: float = 10.0, skip_gems: Sequence[int] = (), itrip_uA: float = 2.0,
                tripmax: int = 5, hold_s: float = 5.0, end_hold_s: float = 60.0,
                recovery_s: float = 15.0, back_steps: int = 20, results_dir=None,
                live_plot: bool = True, md: dict | None = None):
    """Stress test, foils one at a time (G1T, G2T, G3T): I0Set itrip_uA, Pw on, V0Set from vstart
    to vmax in vstep steps (V) holding hold_s (world s) at each and end_hold_s at the top. A step
    above SVMax is clamped to SVMax and becomes the last. After a trip: back back_steps steps
    (200 V), ClearAlarm, recovery_s, on again, unless the foil has tripped tripmax times.
    Primary events: the foil's readings at the end of each hold; trips: stream "trips"."""
    skip = {int(g) for g in skip_gems}
    if not skip <= {1, 2, 3}:
        raise ValueError(f"skip_gems takes GEM numbers 1, 2, 3, got {sorted(skip)}")
    steps = stress_voltages(vstart_V, vmax_V, vstep_V)
    foils = [f for k, f in enumerate(layer.foils, start=1) if k not in skip]
    params = dict(vstart_V=vstart_V, vmax_V=vmax_V, vstep_V=vstep_V, skip_gems=sorted(skip),
                  itrip_uA=itrip_uA, tripmax=tripmax, hold_s=hold_s, end_hold_s=end_hold_s,
                  recovery_s=recovery_s, back_steps=back_steps)

    def body(session: _Session):
        verdicts = {}
        for foil in foils:
            trips = yield from _stress_foil(session, foil, list(steps), itrip_uA=itrip_uA,
                                            tripmax=tripmax, hold_s=hold_s, end_hold_s=end_hold_s,
                                            recovery_s=recovery_s, back_steps=back_steps,
                                            all_foils=foils)
            verdicts[foil.electrode] = {"trips": trips, "passed": trips < tripmax}
        return {"passed": all(v["passed"] for v in verdicts.values()), "foils": verdicts}

    return (yield from _qc6_run(layer, "stress", params, body, {"stress"}, results_dir,
                                live_plot, md))


def _stress_foil(session: _Session, foil: HvChannel, steps: list[float], *, itrip_uA, tripmax,
                 hold_s, end_hold_s, recovery_s, back_steps, all_foils):
    yield from _put(foil.i0set, float(itrip_uA))
    yield from _switch_on(session, [foil])
    trips, i = 0, 0
    print(f"QC6 stress: starting {foil.label()}")
    with StepProgress(len(steps), f"QC6 stress {foil.label()}", unit="steps") as bar:
        trips = yield from _stress_steps(session, foil, steps, bar, itrip_uA=itrip_uA,
                                         tripmax=tripmax, hold_s=hold_s, end_hold_s=end_hold_s,
                                         recovery_s=recovery_s, back_steps=back_steps,
                                         all_foils=all_foils)
    yield from _put(foil.v0set, 0.0)
    yield from _put(foil.pw, 0)
    trips += yield from _last_look(session, [foil])
    return trips


def _stress_steps(session: _Session, foil: HvChannel, steps: list[float], bar, *, itrip_uA,
                  tripmax, hold_s, end_hold_s, recovery_s, back_steps, all_foils):
    """The voltage steps of one foil; returns the trips."""
    trips, i = 0, 0
    while i < len(steps):
        svmax = float((yield from bps.rd(foil.svmax)))
        if steps[i] > svmax:                  # clamp to SVMax and make it the last step
            i = len(steps) - 1
            steps[i] = svmax
        last = i == len(steps) - 1
        tripped = yield from _ramp(session, {foil: steps[i]}, [foil])
        if not tripped:
            tripped = yield from _hold(session, [foil], end_hold_s if last else hold_s)
        if tripped:
            n, _ = yield from _recover(session, tripped, [foil], recovery_s)
            trips += n
            if trips >= tripmax:
                print(f"QC6 stress: {foil.label()} tripped {trips} times: stopping this foil")
                break
            # the lower voltage first: switching on would otherwise ramp back to the one that tripped
            i = max(0, i - back_steps)
            yield from _put(foil.v0set, min(steps[i], float((yield from bps.rd(foil.svmax)))))
            yield from _switch_on(session, [foil])
            continue
        yield from session.progress(0.0, trips, steps[i], all_foils, stream="primary")
        i += 1
        bar.update_to(i)
    return trips


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


# -- iv_short_stability ---------------------------------------------------------------------------
def divider_steps(vstart_V: float, vmax_V: float, vstep_V: float) -> list[float]:
    """range(vstart, vmax, vstep) plus vmax (V): 23 steps for 200 -> 4600 V by 200 V."""
    return stress_voltages(vstart_V, vmax_V, vstep_V)


def iv_short_stability(layer: GemLayer, *, vstart_V: float = 200.0, vstep_V: float = 200.0,
                       vmax_V: float = 4600.0, stable_s: float = 40.0, tripmax: int = 3,
                       hold_h: float = 2.0, foil_V: float = 550.0, recovery_s: float = 60.0,
                       itrip_uA: float | None = None, results_dir=None, live_plot: bool = True,
                       md: dict | None = None):
    """IV scan then short stability, one run. All 7 channels on; the divider emulation from vstart
    to vmax (V) in vstep steps; at each, wait for the ramp, hold stable_s (world s; a trip restarts
    it) and record VMon/IMon of every electrode (primary stream, and the IV file). Then the foils go
    to foil_V, the other electrodes stay at their vmax values, for hold_h hours. A trip: recorded,
    ClearAlarm, recovery_s, tripped channels on again; at tripmax trips the test fails.
    itrip_uA=None leaves I0Set as it is, as the lab's script does."""
    steps = divider_steps(vstart_V, vmax_V, vstep_V)
    params = dict(vstart_V=vstart_V, vstep_V=vstep_V, vmax_V=vmax_V, stable_s=stable_s,
                  tripmax=tripmax, hold_h=hold_h, foil_V=foil_V, recovery_s=recovery_s,
                  itrip_uA=itrip_uA)

    def body(session: _Session):
        channels = layer.channels
        if itrip_uA is not None:
            for ch in channels:
                yield from _put(ch.i0set, float(itrip_uA))
        yield from _switch_on(session, channels)
        trips = 0
        for v in steps:
            setpoints = {getattr(layer, e): s for e, s in layer.setpoints(v).items()}
            trips, ok = yield from _settle(session, setpoints, channels, stable_s, recovery_s,
                                           trips, tripmax)
            if not ok:
                return _verdict(trips, tripmax, "IV scan", 0.0)
            yield from session.progress(0.0, trips, v, channels, stream="primary")
        final = {getattr(layer, e): s for e, s in layer.setpoints(vmax_V).items()}
        for foil in layer.foils:
            final[foil] = min(float(foil_V), float((yield from bps.rd(foil.svmax))))
        print(f"QC6: short stability, foils at {foil_V:g} V for {hold_h:g} h")
        trips, elapsed = yield from _stability_hold(session, final, channels, hold_h * 3600.0,
                                                    recovery_s, trips, tripmax)
        return _verdict(trips, tripmax, "short stability", elapsed)

    return (yield from _qc6_run(layer, "iv_short_stability", params, body, {"iv", "short"},
                                results_dir, live_plot, md))


def _summary(test: str, layer: GemLayer, result, files: dict) -> str:
    """One screen at the end of a QC6 test: verdict, trips and the result files."""
    lines = [f"QC6 {_PLAN_NAMES.get(test, test)} on {layer.detector_name} layer {layer.layer}: "
             + (("passed" if result.get("passed", True) else "FAILED")
                + f", {_trips(result)} trips"
                + (f", held {result['held_s'] / 3600:.2f} h" if result.get("held_s") else "")
                if isinstance(result, dict) else "done")]
    lines += [f"  {kind} file {path}" for kind, path in sorted(files.items())]
    lines.append(f"  runs: last_run(cat, {_PLAN_NAMES.get(test, test)!r})")
    return "\n".join(lines)


def _trips(result: dict) -> int:
    """Trips of a test's result (the stress test counts them per foil)."""
    if "foils" in result:
        return sum(int(v.get("trips", 0)) for v in result["foils"].values())
    return int(result.get("trips", 0))


def _verdict(trips: int, tripmax: int, phase: str, elapsed_s: float) -> dict:
    passed = trips < tripmax
    if not passed:
        print(f"QC6: Test Failed: Max number of trips exceeded ({trips} during the {phase})")
    return {"passed": passed, "trips": trips, "tripmax": tripmax, "phase": phase,
            "held_s": elapsed_s}


def _settle(session: _Session, setpoints: dict, powered: Sequence[HvChannel], stable_s: float,
            recovery_s: float, trips: int, tripmax: int):
    """Ramp to the setpoints and hold stable_s (world) without a trip; a trip is recovered from
    and restarts the hold. Returns (trips, False when tripmax was reached)."""
    while True:
        tripped = yield from _ramp(session, setpoints, powered)
        if not tripped:
            tripped = yield from _hold(session, powered, stable_s)
        if not tripped:
            return trips, True
        n, off = yield from _recover(session, tripped, powered, recovery_s)
        trips += n
        if trips >= tripmax:
            return trips, False
        yield from _switch_on(session, off)


def _stability_hold(session: _Session, setpoints: dict, powered: Sequence[HvChannel],
                    hold_s: float, recovery_s: float, trips: int, tripmax: int,
                    elapsed_before_s: float = 0.0):
    """Bring the powered channels to the stability voltages and hold until hold_s (world s) has
    elapsed in total (the clock starts when they first arrive and runs through recoveries),
    recording a progress event every PROGRESS_EVERY_S and after each trip. Returns (trips,
    elapsed hold)."""
    readables = list(powered)
    state = {"t_start": None, "next": 0.0}

    def elapsed(now):
        return elapsed_before_s + (now - state["t_start"] if state["t_start"] is not None else 0.0)

    bar = StepProgress(hold_s / 3600.0, "QC6 stability hold", unit="h")

    def on_poll(now):
        bar.update_to(elapsed(now) / 3600.0)
        if elapsed(now) >= state["next"]:
            yield from session.progress(elapsed(now), trips, 0.0, readables)
            state["next"] = elapsed(now) + PROGRESS_EVERY_S

    try:
        while True:
            tripped = yield from _ramp(session, setpoints, powered)
            now = yield from session.now()
            if not tripped:
                if state["t_start"] is None:
                    state["t_start"] = now
                remaining = hold_s - elapsed(now)
                if remaining <= 0:
                    break
                tripped = yield from _hold(session, powered, remaining, on_poll=on_poll,
                                           look_every_s=PROGRESS_EVERY_S)
                if not tripped:
                    continue
            n, off = yield from _recover(session, tripped, powered, recovery_s)
            trips += n
            now = yield from session.now()
            yield from session.progress(elapsed(now), trips, 0.0, readables)
            if trips >= tripmax:
                return trips, elapsed(now)
            if state["t_start"] is not None and elapsed(now) >= hold_s:
                break                          # the hold ran out during the recovery
            yield from _switch_on(session, off)
        now = yield from session.now()
        yield from session.progress(elapsed(now), trips, 0.0, readables)
        return trips, elapsed(now)
    finally:
        bar.close()


# -- long_stability and its resumption ------------------------------------------------------------
def long_stability(layer: GemLayer, *, vstart_V: float = 200.0, vstep_V: float = 200.0,
                   vmax_V: float = 4200.0, stable_s: float = 10.0, tripmax: int = 200,
                   hold_h: float = 15.0, foil_V: float = 580.0, recovery_s: float = 60.0,
                   itrip_uA: float | None = None, results_dir=None, live_plot: bool = True,
                   md: dict | None = None, _resume: dict | None = None):
    """Long stability: the stepped divider ramp to vmax (V, stable_s world s per step, nothing
    recorded but trips), then the non-foil electrodes to 0 V and off, the foils at foil_V for hold_h
    hours; trips counted on the foils only; recovery_s after a trip; fails at tripmax trips.
    Progress events (elapsed hold, trips) every 10 world minutes let `resume_long_stability` pick up
    an interrupted test."""
    resume = _resume or {}
    steps = divider_steps(vstart_V, vmax_V, vstep_V)
    params = dict(vstart_V=vstart_V, vstep_V=vstep_V, vmax_V=vmax_V, stable_s=stable_s,
                  tripmax=tripmax, hold_h=hold_h, foil_V=foil_V, recovery_s=recovery_s,
                  itrip_uA=itrip_uA)
    extra_md = {k: resume[k] for k in ("resumed_from", "elapsed_before_s", "trips_before")
                if k in resume}

    def body(session: _Session):
        channels, foils = layer.channels, layer.foils
        if itrip_uA is not None:
            for ch in channels:
                yield from _put(ch.i0set, float(itrip_uA))
        trips = int(resume.get("trips_before", 0))
        session.incidents = trips
        yield from _switch_on(session, channels)
        for v in steps:
            setpoints = {getattr(layer, e): s for e, s in layer.setpoints(v).items()}
            trips, ok = yield from _settle(session, setpoints, channels, stable_s, recovery_s,
                                           trips, tripmax)
            if not ok:
                return _verdict(trips, tripmax, "ramp", float(resume.get("elapsed_before_s", 0)))
        others = [ch for ch in channels if ch not in foils]
        for ch in others:                 # only the foils stay powered for the long hold
            yield from _put(ch.v0set, 0.0)
            yield from _put(ch.pw, 0)
        final = {}
        for f in foils:
            final[f] = min(float(foil_V), float((yield from bps.rd(f.svmax))))
        print(f"QC6: long stability, foils at {foil_V:g} V for {hold_h:g} h")
        trips, elapsed = yield from _stability_hold(
            session, final, foils, hold_h * 3600.0, recovery_s, trips, tripmax,
            elapsed_before_s=float(resume.get("elapsed_before_s", 0.0)))
        return _verdict(trips, tripmax, "long stability", elapsed)

    return (yield from _qc6_run(layer, "long_stability", params, body, {"long"}, results_dir,
                                live_plot, {**extra_md, **(md or {})},
                                files=resume.get("qc6_files")))


def long_stability_state(catalog, uid: str | None = None) -> dict:
    """What a resumption needs from an interrupted long_stability run in tiled: uid, parameters,
    elapsed hold (world s), trips so far and the result file. The last such run by default."""
    from tiled.queries import Key
    if uid is None:
        runs = catalog.search(Key("qc6_test") == "long_stability")
        if len(runs) == 0:
            raise Qc6Error("no long_stability run in the catalog to resume")
        uid = max(runs.items(), key=lambda kv: kv[1].metadata["start"]["time"])[0]
    run = catalog[uid]
    start, stop = run.metadata["start"], run.metadata.get("stop")
    if stop and stop.get("exit_status") == "success" and not start.get("resumable_after_success"):
        raise Qc6Error(f"long_stability run {uid[:8]} ended normally ({stop.get('reason') or 'done'});"
                       " nothing to resume")
    elapsed, trips = float(start.get("elapsed_before_s", 0.0)), int(start.get("trips_before", 0))
    streams = set(run)
    if "progress" in streams:
        prog = run["progress"].base["internal"].read()
        if len(prog):
            elapsed = max(elapsed, float(prog["qc6_elapsed_s"].max()))
            trips = max(trips, int(prog["qc6_trips"].max()))
    if "trips" in streams:
        tr = run["trips"].base["internal"].read()
        if len(tr):
            trips = max(trips, int(tr["trip_incident"].max()))
    return {"resumed_from": uid, "elapsed_before_s": elapsed, "trips_before": trips,
            "qc6_params": dict(start.get("qc6_params", {})),
            "qc6_files": dict(start.get("qc6_files", {})), "layer": start.get("layer"),
            "results_dir": start.get("results_dir")}


def resume_long_stability(layer: GemLayer, catalog, uid: str | None = None, **overrides):
    """Resume an interrupted long_stability from tiled: ramps up again, then holds the foils for the
    rest of the hold time, counting on from the trips already made, appending to the same result
    file. `overrides` change parameters (e.g. hold_h)."""
    state = long_stability_state(catalog, uid)
    if state["layer"] not in (None, layer.layer):
        raise Qc6Error(f"run {state['resumed_from'][:8]} tested layer {state['layer']}, not "
                       f"layer {layer.layer}: pass the matching GemLayer")
    params = {**state["qc6_params"], **overrides}
    print(f"QC6: resuming long stability {state['resumed_from'][:8]} after "
          f"{state['elapsed_before_s'] / 3600:.2f} h and {state['trips_before']} trips")
    return (yield from long_stability(layer, **params, results_dir=state["results_dir"],
                                      _resume=state))


# -- the run around a procedure -------------------------------------------------------------------
def _qc6_run(layer: GemLayer, test: str, params: dict, body, kinds: set[str], results_dir,
             live_plot: bool, md: dict | None, files: dict | None = None):
    """Preflight, result-file names, metadata, callbacks, one run, and the safety wrapper."""
    def inner():
        session = yield from _preflight(layer)
        t0 = yield from session.now()
        rdir = _results_dir(results_dir)
        names = dict(files) if files else {k: str(result_path(rdir, layer.detector_name, k, t0))
                                           for k in sorted(kinds)}
        keys = {str(ch.channel): {"vmon": ch.vmon.name, "imon": ch.imon.name}
                for ch in layer.channels}
        run_md = _base_md(layer, test, params, {
            "qc6_files": names, "world_start": t0, "results_dir": str(rdir),
            "qc6_iv_channels": [ch.channel for ch in layer.channels],
            "qc6_channel_keys": keys, **(md or {})})

        def run_body():
            try:
                result = yield from body(session)
            except GeneratorExit:
                raise
            except BaseException:
                # off inside the run, so that a trip made just before is still recorded in it;
                # if that fails too, qc6_safety tries again and reports
                try:
                    yield from all_off(layer)
                    yield from _last_look(session, layer.channels)
                except Exception as exc:
                    print(f"QC6: switching off inside the run failed ({exc}); trying again")
                raise
            # switch off before the stop document: its callbacks (plots) must not keep HV on
            yield from all_off(layer)
            late = yield from _last_look(session, layer.channels)
            if late and isinstance(result, dict) and "trips" in result:
                result = _verdict(result["trips"] + late, result.get("tripmax", 0) or 10**9,
                                  result.get("phase", ""), result.get("held_s", 0.0))
            return result

        result = yield from _with_callbacks(_run(run_body(), run_md), live_plot)
        print(_summary(test, layer, result, names))
        return result

    # the lease outside the safety wrapper: released only once the layer is off
    return (yield from under_lease([layer], qc6_safety(layer, inner())))


__all__ = ["check_connection", "megger_test", "stress_test", "iv_short_stability",
           "long_stability", "resume_long_stability", "long_stability_state", "qc6_safety",
           "all_off", "SuspendWhenCrateUnreachable", "Qc6Error", "CrateUnreachable",
           "RampTimeout", "stress_voltages", "divider_steps", "ELECTRODES", "FOILS"]
