"""The X-ray box world: PSI's calibration box (tube, XRF target wheel, shutters, door interlock).

The box is modelled as the lab uses it (reference/eiger.md section 6): the tube high voltage must be
on and warmed up before photons come out; voltage and current ramp to their setpoints; the target
wheel takes time to move; a shutter takes time to open, and refuses to open with the HV off, the door
open or the box locked by another user. The fluorescence line reaching the detector has the target's
energy and a flux proportional to the tube current and rising with the over-voltage above the
target's K edge (Green & Cosslett: I ~ i * (U - 1)^1.67, U = kV / E_edge).

Other instruments of the world (the EIGER simulator) ask `xrf_beam()` what they see.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

from calbench.contracts.errors import Refused
from calbench.contracts.clock import WorldClock
from calbench.contracts.xray import MAX_KV, MAX_MA, SHUTTERS, XRF_EDGES_KEV, XRF_LINES_KEV, XrayBoxState



@dataclass
class _Ramp:
    """A quantity approaching its setpoint at a constant rate (units per world second)."""
    value: float
    setpoint: float
    rate: float
    t_last: float

    def advance(self, now: float) -> float:
        step = self.rate * max(0.0, now - self.t_last)
        self.t_last = now
        delta = self.setpoint - self.value
        self.value = self.setpoint if abs(delta) <= step else self.value + step * (1 if delta > 0 else -1)
        return self.value


@dataclass
class XrayBoxSim:
    """Simulated backend of the X-ray box (the same interface as the hardware client)."""
    clock: WorldClock
    targets: tuple[str, ...] = tuple(XRF_LINES_KEV)
    warmup_s: float = 20.0           # HV warm-up before the tube emits
    shutter_move_s: float = 0.3
    target_move_s: float = 2.0
    kv_rate: float = 5.0              # kV per second
    ma_rate: float = 10.0             # mA per second
    flux_per_pixel_s: float = 1.0e4   # XRF photons/pixel/s for Cu at 40 kV, 40 mA
    locked: bool = False
    door_open: bool = False
    shutter_stuck: bool = False       # fault injection: the XRF shutter motor does not move
    # fault injection: a box that answers slowly. While `answer_gate` is an Event, each command
    # waits for it to be set; `waiting` is set while a command waits there.
    answer_gate: threading.Event | None = None
    waiting: threading.Event = field(default_factory=threading.Event)
    _hv_on: bool = False
    _hv_since: float = 0.0
    _shutter_requested: dict = field(default_factory=lambda: {s: (False, 0.0) for s in SHUTTERS})
    _target: tuple = ("Cu", "Cu", 0.0)    # (from, to, time of the move request)

    def __post_init__(self):
        now = self.clock.now()
        self._kv = _Ramp(0.0, 0.0, self.kv_rate, now)
        self._ma = _Ramp(0.0, 0.0, self.ma_rate, now)

    # -- reading -------------------------------------------------------------------------------
    def _warmup_remaining(self, now: float) -> float:
        return max(0.0, self.warmup_s - (now - self._hv_since)) if self._hv_on else 0.0

    def shutter_open(self, name: str, now: float | None = None) -> bool:
        now = self.clock.now() if now is None else now
        requested, since = self._shutter_requested[name]
        if name == "XRF" and self.shutter_stuck:
            return False
        moving = now - since < self.shutter_move_s
        return (not requested) if moving else requested

    def target_now(self, now: float | None = None) -> tuple[str, bool]:
        now = self.clock.now() if now is None else now
        start, dest, since = self._target
        if now - since < self.target_move_s:
            return start, True
        return dest, False

    def read(self) -> XrayBoxState:
        now = self.clock.now()
        emitting = self._hv_on and self._warmup_remaining(now) == 0.0
        kv = self._kv.advance(now) if emitting else 0.0
        ma = self._ma.advance(now) if emitting else 0.0
        shutters = {s: self.shutter_open(s, now) for s in SHUTTERS}
        target, moving = self.target_now(now)
        return XrayBoxState(
            hv_on=self._hv_on, warmup_remaining_s=self._warmup_remaining(now),
            voltage_kV=kv, current_mA=ma,
            voltage_setpoint_kV=self._kv.setpoint, current_setpoint_mA=self._ma.setpoint,
            target=target, target_moving=moving, shutters=shutters, locked=self.locked,
            door_open=self.door_open, safe=not self._hv_on and not any(shutters.values()),
        )

    # -- commands --------------------------------------------------------------------------------
    def _answer(self) -> None:
        gate = self.answer_gate
        if gate is not None:
            self.waiting.set()
            try:
                gate.wait()
            finally:
                self.waiting.clear()

    def _check_unlocked(self):
        self._answer()
        if self.locked:
            raise Refused("the box is locked by another client; unlock it first (Unlock = 1)")

    def set_hv(self, on: bool) -> None:
        self._check_unlocked()
        on = bool(on)
        if on and self.door_open:
            raise Refused("HV refused: the door is open; close the door first")
        if on and not self._hv_on:
            self._hv_since = self.clock.now()
            now = self._hv_since
            self._kv.t_last = self._ma.t_last = now
            self._kv.value = self._ma.value = 0.0
        if not on:
            for s in SHUTTERS:                      # the interlock closes the shutters with the HV
                self._request_shutter(s, False)
        self._hv_on = on

    def set_voltage(self, kV: float) -> None:
        self._check_unlocked()
        if not 0.0 <= kV <= MAX_KV:
            raise Refused(f"tube voltage {kV} kV outside 0..{MAX_KV:g} kV")
        self._kv.advance(self.clock.now())
        self._kv.setpoint = float(kV)

    def set_current(self, mA: float) -> None:
        self._check_unlocked()
        if not 0.0 <= mA <= MAX_MA:
            raise Refused(f"tube current {mA} mA outside 0..{MAX_MA:g} mA")
        self._ma.advance(self.clock.now())
        self._ma.setpoint = float(mA)

    def set_target(self, name: str) -> None:
        self._check_unlocked()
        if name not in self.targets:
            raise Refused(f"target {name!r} is not installed; installed: {', '.join(self.targets)}")
        current, moving = self.target_now()
        if moving:
            raise Refused("the target wheel is still moving; wait for TargetMoving_RBV = 0")
        if name != current:
            self._target = (current, name, self.clock.now())

    def _request_shutter(self, name: str, open_: bool) -> None:
        if self._shutter_requested[name][0] != open_:
            self._shutter_requested[name] = (open_, self.clock.now())

    def set_shutter(self, name: str, open_: bool) -> None:
        if name not in SHUTTERS:
            raise Refused(f"no shutter {name!r}; shutters: {', '.join(SHUTTERS)}")
        if open_:
            self._check_unlocked()
            if not self._hv_on:
                raise Refused(f"{name} shutter refused: the high voltage is off; switch HV on first")
            if self.door_open:
                raise Refused(f"{name} shutter refused: the door is open; close the door first")
        self._request_shutter(name, bool(open_))

    def unlock(self) -> None:
        self.locked = False

    def lock(self) -> None:
        self.locked = True

    def set_door(self, open_: bool) -> None:
        """Simulation only: someone opens or closes the door. Opening it trips the HV."""
        self.door_open = bool(open_)
        if self.door_open:
            self.set_hv_interlock()

    def set_hv_interlock(self) -> None:
        for s in SHUTTERS:
            self._request_shutter(s, False)
        self._hv_on = False

    def make_safe(self) -> None:
        """Close both shutters (the HV is left as it is: the tube's life is in warm-up cycles)."""
        for s in SHUTTERS:
            self._request_shutter(s, False)

    # -- the world ---------------------------------------------------------------------------------
    def xrf_beam(self) -> tuple[float, float]:
        """(line energy keV, photons per pixel per second) reaching a detector behind the XRF
        shutter now; (energy, 0.0) when no photons come out."""
        state = self.read()
        energy = XRF_LINES_KEV[state.target]
        if not state.shutters["XRF"] or state.target_moving or state.current_mA <= 0:
            return energy, 0.0
        u = state.voltage_kV / XRF_EDGES_KEV[state.target]
        if u <= 1.0:
            return energy, 0.0
        u_ref = 40.0 / XRF_EDGES_KEV["Cu"]
        yield_rel = ((u - 1.0) / (u_ref - 1.0)) ** 1.67
        return energy, self.flux_per_pixel_s * (state.current_mA / 40.0) * yield_rel


def build_world(clock: WorldClock, seed: int, settings: dict[str, dict]) -> dict[str, object]:
    """The X-ray box world's backends by instrument name."""
    box_settings = settings.get("xraybox", {})
    box = XrayBoxSim(clock=clock, warmup_s=float(box_settings.get("warmup_s", 20.0)))
    world: dict[str, object] = {"xraybox": box}
    if "eiger" in settings:           # the EIGER behind the XRF shutter sees the fluorescence line
        from calbench.iocs.sim.eiger import build_eiger
        world["eiger"] = build_eiger(clock, seed, settings["eiger"], source=box.xrf_beam)
    return world
