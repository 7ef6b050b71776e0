"""The X-ray box: its limits, shutters and fluorescence targets (the line each gives and the edge the
tube voltage must pass), and the state a backend (simulated or the lab's xrayClient) reports."""
from __future__ import annotations

from dataclasses import dataclass

SHUTTERS = ("XRF", "Direct")
MAX_KV = 60.0      # tube limits of PSI's box
MAX_MA = 80.0

# Fluorescence line energies (keV) used by PSI's calibration (sls_detector_tools `xrf`): Kα lines,
# rounded, except In (Lα). Cu Kα1 is really 8.048 keV; the lab's numbers are kept so that files agree.
XRF_LINES_KEV: dict[str, float] = {
    "In": 3.29, "Ti": 4.5, "Cr": 5.4, "Fe": 6.4, "Cu": 8.02, "Ge": 9.9,
    "Zr": 15.7, "Mo": 17.5, "Ag": 22.2, "Sn": 25.3,
}
# Absorption edges (keV) that the tube voltage must exceed to excite the line above.
XRF_EDGES_KEV: dict[str, float] = {
    "In": 3.73, "Ti": 4.97, "Cr": 5.99, "Fe": 7.11, "Cu": 8.98, "Ge": 11.10,
    "Zr": 18.0, "Mo": 20.0, "Ag": 25.5, "Sn": 29.2,
}


@dataclass
class XrayBoxState:
    hv_on: bool
    warmup_remaining_s: float
    voltage_kV: float
    current_mA: float
    voltage_setpoint_kV: float
    current_setpoint_mA: float
    target: str
    target_moving: bool
    shutters: dict[str, bool]
    locked: bool
    door_open: bool
    safe: bool
