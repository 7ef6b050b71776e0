# Long by design: crate channels and GEM-foil physics (ramps, leakage, discharges, trips) on one world clock.
"""The QC6 world: a CAEN SY5527 crate whose 14-channel floating board powers two triple-GEM layers.

Each channel drives one electrode gap of a layer, in the QC6 channel order (reference/qc6_batmet.md
part A): offset 0 G3B, 1 G3T, 2 G2B, 3 G2T, 4 G1B, 5 G1T, 6 Drift; layer 2 adds 7. The foils are the
G1T/G2T/G3T channels (5, 3, 1 and 12, 10, 8).

Physics, computed lazily from the world clock and exact between two reads however far apart they are
(a 15-hour hold at time_scale 2000 is read every few world minutes):

* VMon moves toward the target (V0Set while Pw is on, 0 when off) at RUp / RDWn (V/s).
* IMon (uA) = VMon / R_leak + offset + C dV/dt + discharge current + read-out noise.
* Discharges on the foils form a Poisson process in world time whose rate rises steeply with the foil
  voltage, rate(V) = rate_ref * exp((V - v_ref) / v_scale); each lasts an exponential time (mean
  `discharge_mean_s`) and draws a current of several uA.
* Over-current: IMon above I0Set continuously for longer than Trip (s) trips the channel as CAEN does:
  Pw goes Off, status bit 9 (internal trip) is latched until ClearAlarm, and the voltage is killed
  (PDwn = Kill) or ramped down at RDWn (PDwn = Ramp). A short discharge only sets bit 3 (OVC).
* V0Set above SVMax is clamped to SVMax (bit 7 MAXV while the clamp holds the channel).

All randomness is seeded; the hidden parameters are in `CaenCrateSim.physics(slot, channel)` and
every trip the crate made is in `CaenCrateSim.trip_log`, so tests can check what plans recover.
"""
from __future__ import annotations

import bisect
import math
import threading
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from calbench.contracts.errors import InstrumentFault, Refused
from calbench.contracts.caen import (BOARD_CHANNELS, BOARD_DESCRIPTION, BOARD_MODEL, HW_IMAX_UA,
                                     HW_VMAX_V, RAMP_LIMITS_V_PER_S, TRIP_LIMITS_S, BoardInfo)
from calbench.contracts.clock import WorldClock

# CAEN channel status bits (CAENHVAsyn / CAEN HV wrapper manual).
ON, RUP, RDW, OVC, OVV, UNV, ETRIP, MAXV, EXTDIS, ITRIP, CALERR, UNPLUG = (1 << b for b in range(12))

ELECTRODES = ("G3B", "G3T", "G2B", "G2T", "G1B", "G1T", "Drift")   # channel offset 0..6 in a layer
FOIL_OFFSETS = (5, 3, 1)                                         # G1T, G2T, G3T
CHANNELS_PER_LAYER = 7


PARAMS = ("V0Set", "I0Set", "RUp", "RDWn", "Trip", "SVMax", "Pw", "PDwn")
READ_PARAMS = ("VMon", "IMon", "Status", "ChName") + PARAMS


@dataclass(frozen=True)
class ElectrodePhysics:
    """Hidden parameters of the electrode a channel powers."""
    name: str
    leak_GOhm: float              # leakage resistance seen by the channel
    offset_uA: float              # IMon zero offset of the channel
    capacitance_nF: float         # charging current C dV/dt while ramping
    spark_rate_ref_per_s: float   # discharge rate at v_ref (0 for electrodes that do not spark)
    spark_v_ref_V: float
    spark_v_scale_V: float        # e-folding voltage of the discharge rate
    discharge_mean_s: float       # mean discharge duration (exponential)
    discharge_uA: tuple[float, float]   # discharge current range (log-uniform)

    def spark_rate(self, volts: float) -> float:
        """Discharges per world second at `volts` (V)."""
        if self.spark_rate_ref_per_s <= 0.0 or volts <= 0.0:
            return 0.0
        return self.spark_rate_ref_per_s * math.exp((volts - self.spark_v_ref_V) / self.spark_v_scale_V)


@dataclass(frozen=True)
class TripRecord:
    """A trip the crate made (the simulator's truth)."""
    slot: int
    channel: int
    time: float          # world epoch s
    voltage_V: float     # VMon just before the trip
    v0set_V: float


@dataclass
class _Channel:
    slot: int
    channel: int
    physics: ElectrodePhysics
    rng: np.random.Generator
    t: float
    name: str
    v0set: float = 0.0
    i0set: float = 2.0
    rup: float = 10.0
    rdwn: float = 10.0
    trip_s: float = 1.0
    svmax: float = HW_VMAX_V
    pw: bool = False
    pdwn: int = 0                 # 0 Kill, 1 Ramp (CAEN's default is Kill)
    v: float = 0.0
    clamped: bool = False
    tripped: bool = False
    oc_since: float | None = None
    discharge_until: float = -math.inf
    discharge_uA: float = 0.0
    hazard: float = 0.0
    hazard_threshold: float = 1.0
    sparks: int = 0
    trips: list = field(default_factory=list)
    leak_override_GOhm: float | None = None     # fault injection: a short

    def __post_init__(self):
        self.hazard_threshold = float(self.rng.exponential(1.0))

    # -- physics ---------------------------------------------------------------------------------
    @property
    def leak_GOhm(self) -> float:
        return self.leak_override_GOhm if self.leak_override_GOhm is not None else self.physics.leak_GOhm

    def target(self) -> float:
        return min(self.v0set, self.svmax) if self.pw else 0.0

    def slope(self) -> float:
        """dV/dt now (V/s)."""
        target = self.target()
        if self.v < target:
            return self.rup
        if self.v > target:
            return -self.rdwn
        return 0.0

    def discharging(self, t: float) -> bool:
        return t < self.discharge_until

    def current_uA(self, t: float, slope: float) -> float:
        """Noise-free IMon at time t (uA) for a ramp slope (V/s)."""
        i = self.v / (self.leak_GOhm * 1e3) + self.physics.offset_uA
        i += self.physics.capacitance_nF * abs(slope) * 1e-3
        if self.discharging(t) and self.v > 0.0:
            i += self.discharge_uA
        return i

    def _oc_voltage(self, t: float, slope: float) -> float:
        """Voltage above which the steady current exceeds I0Set during the segment starting at t."""
        extra = self.physics.offset_uA + self.physics.capacitance_nF * abs(slope) * 1e-3
        if self.discharging(t):
            extra += self.discharge_uA
        return (self.i0set - extra) * self.leak_GOhm * 1e3

    def _hazard(self, v0: float, slope: float, dt: float) -> float:
        """Integrated discharge rate over a linear voltage segment."""
        p = self.physics
        if p.spark_rate_ref_per_s <= 0.0 or dt <= 0.0:
            return 0.0
        if abs(slope) < 1e-12:
            return p.spark_rate(v0) * dt
        v1 = v0 + slope * dt
        a, b = (v0 - p.spark_v_ref_V) / p.spark_v_scale_V, (v1 - p.spark_v_ref_V) / p.spark_v_scale_V
        return p.spark_rate_ref_per_s * p.spark_v_scale_V / slope * (math.exp(b) - math.exp(a))

    def _time_to_hazard(self, v0: float, slope: float, need: float, dt_max: float) -> float | None:
        """World seconds until the integrated rate grows by `need`, if within dt_max."""
        p = self.physics
        if p.spark_rate_ref_per_s <= 0.0 or dt_max <= 0.0:
            return None
        if abs(slope) < 1e-12:
            rate = p.spark_rate(v0)
            if rate <= 0.0:
                return None
            dt = need / rate
            return dt if dt <= dt_max else None
        if self._hazard(v0, slope, dt_max) < need:
            return None
        a = (v0 - p.spark_v_ref_V) / p.spark_v_scale_V
        arg = need * slope / (p.spark_rate_ref_per_s * p.spark_v_scale_V) + math.exp(a)
        if arg <= 0.0:
            return None
        dt = (p.spark_v_scale_V * math.log(arg) + p.spark_v_ref_V - v0) / slope
        return min(max(dt, 0.0), dt_max)

    def advance(self, t_end: float, rate_scale: float) -> None:
        """Evolve the channel exactly from self.t to t_end (event by event)."""
        for _ in range(1_000_000):
            if self.t >= t_end:
                return
            t0, v0 = self.t, self.v
            slope = self.slope()
            target = self.target()
            seg_end = t_end
            ramp_end = t0 + (target - v0) / slope if slope else math.inf
            seg_end = min(seg_end, ramp_end)
            if self.discharging(t0):
                seg_end = min(seg_end, self.discharge_until)
            if self.oc_since is not None:
                seg_end = min(seg_end, max(t0, self.oc_since + self.trip_s))
            if slope and self.pw:
                v_oc = self._oc_voltage(t0, slope)
                v_end = v0 + slope * (seg_end - t0)
                if (v0 - v_oc) * (v_end - v_oc) < 0.0:
                    # just past the crossing, so the over-current state flips at this event
                    seg_end = min(seg_end, t0 + (v_oc - v0) / slope + 1e-5)
            spark = False
            if rate_scale > 0.0:
                need = (self.hazard_threshold - self.hazard) / rate_scale
                dt_spark = self._time_to_hazard(v0, slope, need, seg_end - t0)
                if dt_spark is not None and t0 + dt_spark <= seg_end:
                    seg_end, spark = t0 + dt_spark, True
            dt = seg_end - t0
            if spark:
                self.hazard = self.hazard_threshold
            else:
                self.hazard += self._hazard(v0, slope, dt) * rate_scale
            # epoch times resolve ~0.2 us: a ramp ending within that lands on its target
            self.v = target if seg_end >= ramp_end else max(v0 + slope * dt, 0.0)
            self.t = seg_end
            if spark:
                self._discharge()
            if not self.discharging(self.t):
                self.discharge_uA = 0.0
            self._update_overcurrent()
            if self.oc_since is not None and self.t >= self.oc_since + self.trip_s - 1e-6:
                self._trip()
        raise RuntimeError(f"channel {self.channel}: simulation did not converge")

    def _discharge(self) -> None:
        p = self.physics
        self.sparks += 1
        duration = float(self.rng.exponential(p.discharge_mean_s))
        lo, hi = p.discharge_uA
        amplitude = float(math.exp(self.rng.uniform(math.log(lo), math.log(hi))))
        self.start_discharge(duration, amplitude)
        self.hazard = 0.0
        self.hazard_threshold = float(self.rng.exponential(1.0))

    def start_discharge(self, duration_s: float, current_uA: float) -> None:
        self.discharge_until = max(self.discharge_until, self.t + duration_s)
        self.discharge_uA = max(self.discharge_uA, current_uA)

    def _update_overcurrent(self) -> None:
        over = self.pw and self.current_uA(self.t, self.slope()) > self.i0set
        if over and self.oc_since is None:
            self.oc_since = self.t
        elif not over:
            self.oc_since = None

    def _trip(self) -> None:
        self.trips.append(TripRecord(self.slot, self.channel, self.t, self.v, self.target()))
        self.tripped = True
        self.pw = False
        self.oc_since = None
        self.discharge_until, self.discharge_uA = self.t, 0.0
        if self.pdwn == 0:
            self.v = 0.0

    def status(self) -> int:
        bits = 0
        target = self.target()
        if self.pw:
            bits |= ON
            if self.v < target - 0.5:
                bits |= RUP
            if self.current_uA(self.t, self.slope()) > self.i0set:
                bits |= OVC
            if self.clamped:
                bits |= MAXV
        if self.v > target + 0.5:
            bits |= RDW
        if self.tripped:
            bits |= ITRIP
        return bits


def _default_physics(offset: int, rng: np.random.Generator) -> ElectrodePhysics:
    name = ELECTRODES[offset]
    if offset in FOIL_OFFSETS:
        return ElectrodePhysics(
            name=name, leak_GOhm=float(rng.uniform(8.0, 30.0)),
            offset_uA=float(rng.normal(0.0, 0.002)), capacitance_nF=float(rng.uniform(3.0, 6.0)),
            spark_rate_ref_per_s=0.02, spark_v_ref_V=float(rng.normal(635.0, 8.0)),
            spark_v_scale_V=float(rng.uniform(16.0, 20.0)), discharge_mean_s=0.3,
            discharge_uA=(5.0, 60.0))
    return ElectrodePhysics(
        name=name, leak_GOhm=float(rng.uniform(60.0, 200.0)),
        offset_uA=float(rng.normal(0.0, 0.002)), capacitance_nF=float(rng.uniform(0.5, 1.5)),
        spark_rate_ref_per_s=0.0, spark_v_ref_V=math.inf, spark_v_scale_V=1.0,
        discharge_mean_s=0.3, discharge_uA=(5.0, 60.0))


class CaenCrateSim:
    """Simulated SY5527 with one A1515TG board (the same interface as the hardware backend).

    Interface used by the IOC: `system_type`, `poll_period_s`, `crate_map()`, `read_board(slot)`,
    `set_param(slot, channel, name, value)`, `clear_alarm()`, `kill()`, `make_safe()`.
    Simulation only: `unreachable`, `spark_rate_scale`, `set_short()`, `inject_discharge()`,
    `physics()`, `trip_log`, `sparks()`.
    """

    system_type = "SY5527"

    def __init__(self, clock: WorldClock, seed: int = 0, *, slot: int = 3,
                 imon_noise_uA: float = 0.0005, vmon_noise_V: float = 0.05):
        self.clock = clock
        self.slot = int(slot)
        self.imon_noise_uA = imon_noise_uA
        self.vmon_noise_V = vmon_noise_V
        self.unreachable = False
        self.spark_rate_scale = 1.0
        # the IOC polls fast enough to follow an accelerated clock, gently at real time
        self.poll_period_s = 0.01 if clock.time_scale >= 100 else 0.1
        self._lock = threading.RLock()
        self._reads: deque[float] = deque(maxlen=200_000)   # world times of read_board, in order
        root = np.random.default_rng(seed)
        self._noise = np.random.default_rng(root.integers(2**63))
        now = clock.now()
        self._channels: list[_Channel] = []
        for ch in range(BOARD_CHANNELS):
            layer, offset = divmod(ch, CHANNELS_PER_LAYER)
            rng = np.random.default_rng(root.integers(2**63))
            physics = _default_physics(offset, rng)
            self._channels.append(_Channel(self.slot, ch, physics, rng, now,
                                           name=f"L{layer + 1}_{physics.name}"))
        self._serial = int(root.integers(1000, 9999))

    # -- helpers ---------------------------------------------------------------------------------
    def _check_link(self) -> None:
        if self.unreachable:
            raise InstrumentFault("the SY5527 crate does not answer (network or crate down); check "
                                  "the Ethernet link and the crate's power, then it reconnects")

    def _advance(self) -> float:
        now = self.clock.now()
        for ch in self._channels:
            ch.advance(now, self.spark_rate_scale)
        return now

    def _channel(self, slot: int, channel: int) -> _Channel:
        if slot != self.slot:
            raise Refused(f"no board in slot {slot}; the crate map has slot {self.slot} only")
        if not 0 <= channel < BOARD_CHANNELS:
            raise Refused(f"slot {slot} has channels 0..{BOARD_CHANNELS - 1}, not {channel}")
        return self._channels[channel]

    # -- the backend interface -------------------------------------------------------------------
    def crate_map(self) -> list[BoardInfo]:
        """Occupied slots of the crate."""
        with self._lock:
            self._check_link()
            return [BoardInfo(self.slot, BOARD_MODEL, BOARD_DESCRIPTION, self._serial,
                              BOARD_CHANNELS, "1.04")]

    def read_board(self, slot: int) -> dict[str, list]:
        """Every channel parameter of a board: {name: [value per channel]} (V, uA, V/s, s)."""
        with self._lock:
            self._check_link()
            self._channel(slot, 0)
            now = self._advance()
            self._reads.append(now)
            out: dict[str, list] = {p: [] for p in READ_PARAMS}
            for ch in self._channels:
                vmon = ch.v + (self._noise.normal(0.0, self.vmon_noise_V) if ch.v > 0 else 0.0)
                imon = ch.current_uA(now, ch.slope()) + self._noise.normal(0.0, self.imon_noise_uA)
                out["VMon"].append(max(0.0, float(vmon)))
                out["IMon"].append(float(imon))
                out["Status"].append(ch.status())
                out["ChName"].append(ch.name)
                out["V0Set"].append(ch.v0set)
                out["I0Set"].append(ch.i0set)
                out["RUp"].append(ch.rup)
                out["RDWn"].append(ch.rdwn)
                out["Trip"].append(ch.trip_s)
                out["SVMax"].append(ch.svmax)
                out["Pw"].append(int(ch.pw))
                out["PDwn"].append(ch.pdwn)
            return out

    def set_param(self, slot: int, channel: int, name: str, value):
        """Set a channel parameter; returns the value the crate holds (V0Set is clamped to SVMax).
        Raises Refused for values outside the board's ranges."""
        with self._lock:
            self._check_link()
            ch = self._channel(slot, channel)
            self._advance()
            where = f"S{slot:02d}:C{channel:02d}"
            if name == "ChName":
                value = str(value)
                if len(value) > 12:
                    raise Refused(f"{where} ChName {value!r} is longer than 12 characters")
                ch.name = value
                return value
            value = float(value)
            if not math.isfinite(value):
                raise Refused(f"{where} {name} = {value} is not a number")
            if name == "V0Set":
                _check_range(where, name, value, 0.0, HW_VMAX_V, "V")
                ch.clamped = value > ch.svmax
                ch.v0set = min(value, ch.svmax)
                result = ch.v0set
            elif name == "SVMax":
                _check_range(where, name, value, 0.0, HW_VMAX_V, "V")
                ch.svmax = value
                if ch.v0set > value:
                    ch.v0set, ch.clamped = value, True
                result = value
            elif name == "I0Set":
                _check_range(where, name, value, 0.0, HW_IMAX_UA, "uA")
                ch.i0set = result = value
            elif name in ("RUp", "RDWn"):
                _check_range(where, name, value, *RAMP_LIMITS_V_PER_S, "V/s")
                setattr(ch, "rup" if name == "RUp" else "rdwn", value)
                result = value
            elif name == "Trip":
                _check_range(where, name, value, *TRIP_LIMITS_S, "s")
                ch.trip_s = result = value
            elif name == "Pw":
                if value not in (0.0, 1.0):
                    raise Refused(f"{where} Pw = {value:g}: must be 0 (Off) or 1 (On)")
                if value and ch.tripped:
                    raise Refused(f"{where} is tripped; clear the alarm first (ClearAlarm = 1), "
                                  "then switch it on")
                ch.pw = bool(value)
                result = int(value)
            elif name == "PDwn":
                if value not in (0.0, 1.0):
                    raise Refused(f"{where} PDwn = {value:g}: must be 0 (Kill) or 1 (Ramp)")
                ch.pdwn = result = int(value)
            else:
                raise Refused(f"{where} has no settable parameter {name!r}; settable: "
                              f"{', '.join(PARAMS)}, ChName")
            ch._update_overcurrent()
            return result

    def clear_alarm(self) -> None:
        """Clear latched trips on every channel (the crate's ClearAlarm command)."""
        with self._lock:
            self._check_link()
            self._advance()
            for ch in self._channels:
                ch.tripped = False

    def kill(self) -> None:
        """Switch every channel off at once, without ramping (the crate's Kill command)."""
        with self._lock:
            self._check_link()
            self._advance()
            for ch in self._channels:
                ch.pw, ch.v, ch.oc_since = False, 0.0, None

    def make_safe(self) -> None:
        """Switch every channel off (ramp down at RDWn) with V0Set 0."""
        with self._lock:
            self._advance()
            for ch in self._channels:
                ch.v0set, ch.pw, ch.oc_since = 0.0, False, None

    # -- simulation only: truth and fault injection ----------------------------------------------
    def physics(self, slot: int, channel: int) -> ElectrodePhysics:
        """The hidden parameters of the electrode on a channel."""
        return self._channel(slot, channel).physics

    @property
    def trip_log(self) -> list[TripRecord]:
        """Every trip so far, in time order."""
        with self._lock:
            self._advance()
            return sorted((r for ch in self._channels for r in ch.trips), key=lambda r: r.time)

    def readings_around(self, world_t: float) -> tuple[float, float]:
        """(first, next): the world times of the first board reading at or after world_t and of
        the reading after it (inf if none yet). A trip at world_t is published between the two,
        however late a loaded host made the readings."""
        with self._lock:
            reads = list(self._reads)
        i = bisect.bisect_left(reads, world_t)
        first = reads[i] if i < len(reads) else math.inf
        return first, reads[i + 1] if i + 1 < len(reads) else math.inf

    def sparks(self, slot: int, channel: int) -> int:
        """Discharges counted on a channel so far."""
        with self._lock:
            self._advance()
            return self._channel(slot, channel).sparks

    def voltages(self, slot: int) -> list[float]:
        """True (noise-free) channel voltages now (V)."""
        with self._lock:
            self._advance()
            return [ch.v for ch in self._channels]

    def powered(self, slot: int) -> list[bool]:
        with self._lock:
            self._advance()
            return [ch.pw for ch in self._channels]

    def set_short(self, slot: int, channel: int, leak_GOhm: float | None) -> None:
        """Fault injection: the electrode leaks through `leak_GOhm` (None repairs it)."""
        with self._lock:
            self._advance()
            ch = self._channel(slot, channel)
            ch.leak_override_GOhm = None if leak_GOhm is None else float(leak_GOhm)
            ch._update_overcurrent()

    def inject_discharge(self, slot: int, channel: int, duration_s: float = 10.0,
                         current_uA: float = 50.0) -> None:
        """Fault injection: a sustained discharge on a channel starting now."""
        with self._lock:
            self._advance()
            ch = self._channel(slot, channel)
            ch.start_discharge(float(duration_s), float(current_uA))
            ch._update_overcurrent()


def _check_range(where: str, name: str, value: float, lo: float, hi: float, unit: str) -> None:
    if not lo <= value <= hi:
        raise Refused(f"{where} {name} = {value:g} {unit} outside {lo:g}..{hi:g} {unit} of the "
                      f"{BOARD_MODEL} board")


def build_world(clock: WorldClock, seed: int, settings: dict[str, dict]) -> dict[str, object]:
    """The QC6 world's backends by instrument name."""
    caen = settings.get("caen", {})
    return {"caen": CaenCrateSim(clock, seed, slot=int(caen.get("slot", 3)))}
