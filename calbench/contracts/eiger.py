"""PSI EIGER: DAC names, defaults and limits (slsDetectorPackage eigerDetectorServer
slsDetectorServer_defs.h, index order of the trim file), settings names, and what an acquisition
returns. Shared by the simulated and slsdet backends, the IOC, the device and the analysis."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from calbench.contracts.errors import Refused

DAC_NAMES: tuple[str, ...] = (
    "vsvp", "vtrim", "vrpreamp", "vrshaper", "vsvn", "vtgstv", "vcmp_ll", "vcmp_lr",
    "vcal", "vcmp_rl", "rxb_rb", "rxb_lb", "vcmp_rr", "vcp", "vcn", "vishaper",
)
# Detector server defaults (DAC units).
DAC_DEFAULTS: dict[str, int] = {
    "vsvp": 0, "vtrim": 2480, "vrpreamp": 3300, "vrshaper": 1400, "vsvn": 4000, "vtgstv": 2556,
    "vcmp_ll": 1000, "vcmp_lr": 1000, "vcal": 0, "vcmp_rl": 1000, "rxb_rb": 1100, "rxb_lb": 1100,
    "vcmp_rr": 1000, "vcp": 1000, "vcn": 2000, "vishaper": 1550,
}
IODELAY_DEFAULT = 650
N_DACS = len(DAC_NAMES)
DAC_MIN, DAC_MAX = 0, 4000          # LTC2620, 12 bit, 2048 mV full scale
TRIMBIT_MAX = 63                    # 6-bit trimbits
SETTINGS_NAMES: tuple[str, ...] = ("standard", "highgain", "lowgain", "veryhighgain", "verylowgain")


def check_dac(name: str, value) -> int:
    """The DAC value as an int, or Refused naming the range (both backends check before a DAC)."""
    v = float(value)
    if not v.is_integer() or not DAC_MIN <= v <= DAC_MAX:
        raise Refused(f"DAC {name} = {value} outside {DAC_MIN}..{DAC_MAX} (12-bit DAC units); "
                      "use an integer in range")
    return int(v)


@dataclass(frozen=True)
class Acquisition:
    """What an acquisition returns: the frames [n, rows, cols] (dtype of the dynamic range), the
    world time (epoch s) each exposure started, and whether it was aborted."""
    frames: NDArray
    start_times: NDArray[np.float64]
    aborted: bool = False
