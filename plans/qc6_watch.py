"""What a QC6 plan knows of its layer between looks: the crate's monitors kept per layer (when each
trip bit appeared, each channel's last voltage before a trip) and the session of one test (world
time, waits woken by monitor updates, the trips and progress it records).

The plan reads the instruments only through RunEngine messages (bps.rd); the monitors' callbacks
and the wake-up conditions run inside the RunEngine's `wait_for`. A dry run (summarize_plan, which
answers every read with nothing) therefore reads nothing: the session then keeps a world clock of its
own that jumps to whatever time the plan waits for, and every read gives its quiet default (no trip,
channels on and arrived), so the outline walks the whole procedure."""
from __future__ import annotations

import time
import weakref
from typing import Sequence

import bluesky.plan_stubs as bps

from calbench.devices.caen import STATUS_ON, TRIPPED, GemLayer, HvChannel, describe_status
from calbench.devices.qc6_records import Qc6Record, TripRecord, fill
from calbench.plans.monitor_wait import MonitorWaiter

MAX_WAIT_WALL_S = 0.5        # wall seconds a plan waits for a monitor update before looking anyway
ACK_TIMEOUT_S = 20.0         # wall seconds for Channel Access to acknowledge a put
# Status recorded for a channel found off after a ClearAlarm erased its trip bit: ITRIP
ITRIP_CLEARED = 0x200


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
        self.state: dict[HvChannel, tuple[int, float]] = {}   # last (Status, VMon) seen
        self.dry: bool | None = None      # decided by the first read of the world clock
        self._dry_t = time.time()         # a dry run's world clock
        self._watch: _LayerWatch | None = None

    @property
    def watch(self) -> _LayerWatch:
        """The layer's monitor bookkeeping (subscribed on first use, never in a dry run)."""
        if self._watch is None:
            self._watch = _watch_of(self.layer)
        return self._watch

    def now(self):
        """World time (epoch s) of the crate (plan): its WorldTime_RBV, or in a dry run the
        session's own clock."""
        while True:
            t = yield from bps.rd(self.layer.world_time, default_value=None)
            if t is not None:
                self.dry = False
                return float(t)
            if self.dry is not False:         # nothing answers the first read: a dry run
                self.dry = True
                return self._dry_t
            # a read a pause interrupted answers nothing: look again

    def world_now(self) -> float:
        """The crate's world time as last published (its monitor): for wake-up conditions, which
        run inside the RunEngine's wait_for, never in the plan's body."""
        return float(self.layer.world_time.get())

    def wait_until(self, condition, *, until: float | None = None,
                   max_wall_s: float = MAX_WAIT_WALL_S):
        """Until condition() holds (looked at inside the RunEngine: at each world time the IOC
        publishes, i.e. after each reading of the crate, and at link changes), at most max_wall_s
        wall seconds (plan). In a dry run the session's clock moves on to `until` (world s)."""
        if self.dry:
            if until is not None:
                self._dry_t = max(self._dry_t, float(until))
            return
        yield from self.watch.waiter.wait(condition, max_wall_s=max_wall_s, look_first=False)

    def world_passed(self, world_t: float):
        """A condition: the crate has published a world time after world_t."""
        return lambda: self.world_now() > world_t

    def any_tripped(self, channels: Sequence[HvChannel]):
        """A condition: one of the channels shows a trip bit."""
        return lambda: any(int(ch.status.get()) & TRIPPED for ch in channels)

    def next_reading(self, after: float):
        """Until the crate has published a world time after `after` (a crate reading taken after
        it; an IOC that stops answering suspends the plan meanwhile); returns it (plan)."""
        while (now := (yield from self.now())) <= after:
            yield from self.wait_until(self.world_passed(after), until=after + 1.0)
        return now

    def scan(self, channels: Sequence[HvChannel]):
        """A look at the channels (plan): Status and VMon into self.state, VMon before Status (see
        HvChannel). Returns the ones with trip bits set, with their Status."""
        tripped = []
        for ch in channels:
            vmon = float((yield from bps.rd(ch.vmon)))
            bits = int((yield from bps.rd(ch.status)))
            self.state[ch] = (bits, vmon)
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
            fill(self.trip, channel=ch.channel, electrode=ch.electrode,
                 voltage=round(voltage, 2), v0set=v0set, time=seen, incident=self.incidents)
            yield from bps.create("trips")
            yield from bps.read(self.trip)
            yield from bps.save()
            print(f"QC6: trip #{self.incidents} on {ch.label()} at {voltage:.1f} V "
                  f"(Status {describe_status(bits)})")

    def progress(self, elapsed_s: float, trips: int, setpoint: float, readables=(),
                 stream: str = "progress"):
        """An event with the plan's state and the given devices' readings (plan)."""
        t = yield from self.now()
        fill(self.record, world_time=t, elapsed_s=elapsed_s, trips=trips, setpoint=setpoint)
        yield from bps.trigger_and_read([self.record, *readables], name=stream)

