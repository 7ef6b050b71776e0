"""X-ray box fluorescence targets: the line each gives and the edge the tube voltage must pass."""
from __future__ import annotations

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
