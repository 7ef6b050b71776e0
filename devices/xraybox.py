"""ophyd device of the X-ray box (PVs of iocs/xraybox.py)."""
from __future__ import annotations

from ophyd import Component as Cpt
from ophyd import EpicsSignalRO

from calbench.devices.base import CheckedSignal, InstrumentDevice


class XrayBox(InstrumentDevice):
    """The PSI X-ray box: tube HV, voltage (kV), current (mA), XRF target wheel, shutters.

    `box.current` and `box.voltage` are setpoints that complete when the readback arrives, so
    `scan([det], box.current, 10, 40, 4)` works; target and shutters take names ("Cu", "Open").
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
    xrf_shutter = Cpt(CheckedSignal, "Shutter:XRF_RBV", write_pv="Shutter:XRF", string=True,
                      kind="normal")
    direct_shutter = Cpt(CheckedSignal, "Shutter:Direct_RBV", write_pv="Shutter:Direct",
                         string=True, kind="omitted")
    locked = Cpt(EpicsSignalRO, "Locked_RBV", kind="omitted")
    unlock_cmd = Cpt(CheckedSignal, "Unlock", kind="omitted")
    safe = Cpt(EpicsSignalRO, "Safe_RBV", kind="omitted")
    door_open = Cpt(EpicsSignalRO, "DoorOpen_RBV", kind="omitted")

    def shutter(self, name: str) -> CheckedSignal:
        try:
            return {"XRF": self.xrf_shutter, "Direct": self.direct_shutter}[name]
        except KeyError:
            raise ValueError(f"no shutter {name!r}; the box has 'XRF' and 'Direct'") from None
