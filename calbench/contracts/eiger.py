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
    """What an acquisition returns: the frames [n, rows, cols] (dtype of the dynamic range; None
    when each was handed to the caller's on_frame as it came and not kept: a 9M scan's frames
    would be gigabytes), the world time (epoch s) each exposure started, whether it was
    aborted, and in a detector-side scan the value the scanned DAC (or the trimbits) had during
    each frame."""
    frames: NDArray | None
    start_times: NDArray[np.float64]
    aborted: bool = False
    scan_values: NDArray[np.int64] | None = None

    @property
    def n_frames(self) -> int:
        return len(self.start_times)


# A detector-side scan (slsDetectorServer's set_scan): one acquisition, one frame per step, the
# server sets the DAC (or every trimbit) before each step and waits the settle time; a step per
# frame over Channel Access costs about four round trips more per point.
SCAN_TRIMBITS = "trimbits"
SCAN_TARGETS: tuple[str, ...] = DAC_NAMES + ("vthreshold", SCAN_TRIMBITS)
MAX_SCAN_STEPS = DAC_MAX - DAC_MIN + 1          # a whole DAC range in steps of one unit
_TIME_UNITS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}


@dataclass(frozen=True)
class ScanParameters:
    """slsdet ``scanParameters``: ``target`` (a DAC name, vthreshold or trimbits) from ``start``
    to ``stop`` inclusive in steps of ``step``, ``settle_s`` after each setting."""
    target: str
    start: int
    stop: int
    step: int
    settle_s: float = 1e-3          # slsdet's default settle time

    @property
    def values(self) -> NDArray[np.int64]:
        """The setting of each step (the server's ``scanSteps``)."""
        n = abs(self.stop - self.start) // abs(self.step) + 1
        return self.start + self.step * np.arange(n, dtype=np.int64)

    @property
    def text(self) -> str:
        """The sls_detector_put syntax: ``vthreshold 0 2000 40 1ms``."""
        return f"{self.target} {self.start} {self.stop} {self.step} {_format_time(self.settle_s)}"


def _format_time(seconds: float) -> str:
    for unit in ("s", "ms", "us"):
        value = seconds / _TIME_UNITS[unit]
        if value >= 1 and float(value).is_integer():
            return f"{int(value)}{unit}"
    return f"{int(round(seconds / 1e-9))}ns"


def parse_scan(text: str) -> ScanParameters | None:
    """``[dac_name|vthreshold|trimbits] start stop step [settle time, e.g. 1ms]`` (the syntax of
    ``sls_detector_put scan``); ``0`` or an empty text is no scan (None). Refused with the reason
    and the syntax when it does not parse or the server would refuse it."""
    words = str(text).split()
    if not words or words == ["0"]:
        return None
    usage = ("use '<dac|vthreshold|trimbits> <start> <stop> <step> [settle time ns|us|ms|s]', "
             "e.g. 'vthreshold 0 2000 40 1ms', or '0' for no scan")
    if len(words) not in (4, 5):
        raise Refused(f"scan {text!r}: {len(words)} words; {usage}")
    target = words[0]
    if target not in SCAN_TARGETS:
        raise Refused(f"scan {text!r}: no DAC {target!r}; scan one of {', '.join(SCAN_TARGETS)}")
    try:
        start, stop, step = (int(w) for w in words[1:4])
    except ValueError:
        raise Refused(f"scan {text!r}: start, stop and step must be integers; {usage}") from None
    settle_s = 1e-3
    if len(words) == 5:
        number = words[4].rstrip("numsu")
        unit = words[4][len(number):] or "s"
        try:
            settle_s = float(number) * _TIME_UNITS[unit]
        except (KeyError, ValueError):
            raise Refused(f"scan {text!r}: settle time {words[4]!r}; {usage}") from None
        if not 0 <= settle_s <= 10:
            raise Refused(f"scan {text!r}: settle time {words[4]} outside 0..10 s")
    if step == 0 or (stop - start) * step < 0:
        raise Refused(f"scan {text!r}: a step of {step} never goes from {start} to {stop} "
                      "(the detector server's 'Invalid scan parameters')")
    high = TRIMBIT_MAX if target == SCAN_TRIMBITS else DAC_MAX
    if min(start, stop) < 0 or max(start, stop) > high:
        raise Refused(f"scan {text!r}: {target} takes 0..{high}")
    return ScanParameters(target, start, stop, step, settle_s)
