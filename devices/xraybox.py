"""ophyd device of the X-ray box (PVs of iocs/xraybox.py)."""
from __future__ import annotations

from ophyd import Component as Cpt
from ophyd import EpicsSignalRO

from calbench.devices.lease import ProcedureLease
import logging

from ophyd.status import SubscriptionStatus

from calbench.devices.base import (CheckedSignal, InstrumentDevice, PauseHooks, PauseSafeSignal,
                                   set_and_check)

log = logging.getLogger(__name__)
REOPEN_TIMEOUT_S = 30.0        # wall seconds for a shutter to report Open again after a pause


class XrayBox(PauseHooks, InstrumentDevice):
    """The PSI X-ray box: tube HV, voltage (kV), current (mA), XRF target wheel, shutters.

    `box.current` and `box.voltage` are setpoints that complete when the readback arrives, so
    `scan([det], box.current, 10, 40, 4)` works; target and shutters take names ("Cu", "Open").
    A RunEngine pause (Ctrl-C) closes the open shutters and its resume opens them again; the tube
    HV stays as it is (its life is in warm-up cycles).
    """

    instrument = "xraybox"

    hv = Cpt(CheckedSignal, "HV_RBV", write_pv="HV", string=True, kind="config")
    warmup_remaining = Cpt(EpicsSignalRO, "WarmupRemaining_RBV", kind="omitted")
    # the tube ramps at a few kV (mA) per second: 0 -> 60 kV takes 12 s
    voltage = Cpt(CheckedSignal, "Voltage_RBV", write_pv="Voltage", tolerance=0.05,
                  set_timeout_s=60.0, kind="hinted")
    current = Cpt(CheckedSignal, "Current_RBV", write_pv="Current", tolerance=0.05,
                  set_timeout_s=60.0, kind="hinted")
    target = Cpt(CheckedSignal, "Target_RBV", write_pv="Target", string=True, kind="config")
    target_energy = Cpt(EpicsSignalRO, "TargetEnergy_RBV", kind="config")
    target_moving = Cpt(EpicsSignalRO, "TargetMoving_RBV", kind="omitted")
    xrf_shutter = Cpt(PauseSafeSignal, "Shutter:XRF_RBV", write_pv="Shutter:XRF", string=True,
                      kind="normal")
    direct_shutter = Cpt(PauseSafeSignal, "Shutter:Direct_RBV", write_pv="Shutter:Direct",
                         string=True, kind="omitted")
    locked = Cpt(EpicsSignalRO, "Locked_RBV", kind="omitted")
    unlock_cmd = Cpt(CheckedSignal, "Unlock", kind="omitted")
    safe = Cpt(EpicsSignalRO, "Safe_RBV", kind="omitted")
    door_open = Cpt(EpicsSignalRO, "DoorOpen_RBV", kind="omitted")
    lease = Cpt(ProcedureLease, "Lease:", kind="omitted")

    def make_pause_safe(self):
        """Close the open shutters; returns them (to reopen on resume)."""
        # asked to open (it may still be moving) or open
        opened = [s for s in (self.xrf_shutter, self.direct_shutter)
                  if "Open" in (s.get_setpoint(use_monitor=False), s.get(use_monitor=False))]
        for s in opened:
            try:
                set_and_check(s, "Closed")
            except Exception as exc:       # said loudly: the operator must close it
                log.error("pause: the %s did not close (%s); close it at the box", s.name, exc)
        return opened

    def restore_after_pause(self, opened) -> None:
        """Open again the shutters the pause closed, and wait until they report Open."""
        for s in opened:
            set_and_check(s, "Open")
            shown = SubscriptionStatus(s, lambda value=None, **_: value == "Open", run=True)
            try:
                shown.wait(REOPEN_TIMEOUT_S)
            except Exception:
                raise RuntimeError(
                    f"resume: the {s.name} does not report Open again after "
                    f"{REOPEN_TIMEOUT_S:g} s; check the shutter, then resume") from None

    def shutter(self, name: str) -> CheckedSignal:
        try:
            return {"XRF": self.xrf_shutter, "Direct": self.direct_shutter}[name]
        except KeyError:
            raise ValueError(f"no shutter {name!r}; the box has 'XRF' and 'Direct'") from None
