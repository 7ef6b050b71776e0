"""A detector-side scan of the PSI EIGER as a bluesky flyer: one acquisition, one frame per step.

The detector server sets the scanned DAC (or every trimbit) before each frame and waits its settle
time (the IOC's Scan PV, slsdet ``setScan``), so a 51-point S-curve is one Acquire put instead of
51 rounds of set, acquire and read over Channel Access. The run it records looks like a step
scan's: its primary stream has one row per step with the scanned setting (the key of the scanned
signal, e.g. ``eiger_vthreshold``), the step's counts per chip and total, and the step's frame
(``eiger_image``, a StreamResource / StreamDatum into the run's HDF5 file), so the same callbacks,
tiled queries and re-analysis serve both.

    RE(detector_scan(det, det.vthreshold, np.arange(0, 2001, 40)))   # plans/eiger_scans.py

which puts ``det.scan`` (the detector's scan), stages ``EigerScan(det, det.vthreshold)`` and
kicks it off, collecting its steps until it completes.

While the detector scans, each collect emits the steps acquired since the last (the IOC publishes
its per-frame records and flushes their frames every half second), so live plots, progress bars
and tiled follow the scan, and an interrupted scan keeps the steps collected before it stopped.

The scanned signal is ``det.vthreshold``, ``det.trimval`` (a trimbit scan: every pixel's trimbits)
or one of ``det.dacs``.
"""
from __future__ import annotations

import numpy as np
from ophyd.status import DeviceStatus, Status

from calbench.contracts.eiger import SCAN_TRIMBITS, ScanParameters
from calbench.devices.eiger import Eiger, EigerError


class EigerScan:
    """Flyer over ``det`` scanning ``signal`` in the detector (kickoff, complete, collect)."""

    def __init__(self, det: Eiger, signal, *, name: str | None = None):
        self.det = det
        self.signal = signal
        self.target = self._target(det, signal)
        self.name = name or f"{det.name}_scan"
        self.parent = None
        self._complete: DeviceStatus | None = None
        self._bundle = None
        self._first = 0                  # the file's frame of this acquisition's first step
        self._rows = 0                   # steps of this acquisition collected
        self._page: dict | None = None   # the steps the next collect emits

    @staticmethod
    def _target(det: Eiger, signal) -> str:
        if signal is det.vthreshold:
            return "vthreshold"
        if signal is det.trimval:
            return SCAN_TRIMBITS
        if getattr(signal, "parent", None) is det.dacs:
            return signal.attr_name
        raise ValueError(f"{getattr(signal, 'name', signal)!r} cannot be scanned by the detector; "
                         f"scan {det.name}.vthreshold, {det.name}.trimval or one of "
                         f"{det.name}.dacs")

    def parameters(self, points, settle_s: float = 1e-3) -> ScanParameters:
        """The detector's scan for ``points``, which must be evenly spaced integers."""
        p = np.asarray(points, dtype=float)
        step = p[1] - p[0] if p.size > 1 else 1.0
        if (p.size == 0 or np.any(p != np.round(p)) or step == 0
                or not np.array_equal(p, p[0] + step * np.arange(p.size))):
            raise ValueError(f"a detector-side scan takes evenly spaced integer settings; got "
                             f"{p.size} points {p[:4].tolist()}...; scan them step by step "
                             "(detector_scan=False)")
        return ScanParameters(self.target, int(p[0]), int(p[-1]), int(step), float(settle_s))

    # -- keys -------------------------------------------------------------------------------------
    @property
    def x_key(self) -> str:
        return self.signal.name

    @property
    def hints(self) -> dict:
        return {"fields": [self.det.total_counts.name]}

    def describe_collect(self) -> dict:
        det = self.det
        shape = det._frame_shape
        if shape is None:
            raise EigerError(f"{self.name}: stage {det.name} before describing its scan")
        source = f"CA:{det.prefix}"
        keys = {
            self.x_key: {"source": source + "FrameValues_RBV", "dtype": "integer", "shape": [],
                         "dtype_numpy": np.dtype(np.int64).str},
            det.chip_sums.name: {"source": source + "FrameChipSums_RBV", "dtype": "array",
                                 "shape": [int(det.n_chips.get())],
                                 "dtype_numpy": np.dtype(np.float64).str},
            det.total_counts.name: {"source": source + "FrameChipSums_RBV", "dtype": "number",
                                    "shape": [], "dtype_numpy": np.dtype(np.float64).str},
            det.image_key: {"source": source + "FullFileName_RBV", "dtype": "array",
                            "shape": list(shape[-2:]), "dtype_numpy": det._frame_dtype.str,
                            "external": "STREAM:", "dims": ["row", "column"]},
        }
        return keys              # one stream: the plan names it (declare_stream)

    # -- flying -----------------------------------------------------------------------------------
    def kickoff(self) -> Status:
        """Start the acquisition (the detector must hold the scan: put det.scan first)."""
        steps = int(self.det.scan_steps.get(use_monitor=False))
        if steps == 0:
            raise EigerError(f"{self.det.prefix}Scan is '0': put the scan (det.scan) before the "
                             "kickoff, or use the detector_scan plan, which does")
        self._first += self._rows            # the file's frames of earlier acquisitions
        self._rows, self._page = 0, None
        self._complete = self.det.trigger()
        done = Status(self)
        done.set_finished()
        return done

    def complete(self) -> DeviceStatus:
        if self._complete is None:
            raise EigerError(f"{self.name}: complete() before kickoff()")
        return self._complete

    def _pending(self) -> dict:
        """The steps acquired since the last collect, read from the IOC's per-frame records
        (NumImagesCounter_RBV first: the records then hold at least that many frames, which
        the IOC flushed to the file before it counted them); read once per collect."""
        if self._page is None:
            det = self.det
            n = int(det.images_counter.get(use_monitor=False))
            new = slice(self._rows, max(n, self._rows))
            n_chips = int(det.n_chips.get())
            sums = np.asarray(det.frame_chip_sums.get(use_monitor=False), float)
            values = np.asarray(det.frame_values.get(use_monitor=False), np.int64)
            starts = np.asarray(det.frame_start_times.get(use_monitor=False), float)
            if sums.size < n * n_chips or values.size < n or starts.size < n:
                raise EigerError(f"{det.prefix}FrameChipSums_RBV holds {sums.size // n_chips} "
                                 f"frames of the {n} acquired; the IOC publishes at most its "
                                 "MAX_FRAME_RECORDS: scan fewer steps")
            self._page = {"sums": sums[:n * n_chips].reshape(n, n_chips)[new],
                          "values": values[new], "starts": starts[new], "first": new.start}
        return self._page

    def collect_asset_docs(self):
        """The run file's StreamResource (once) and a StreamDatum of the steps since the last
        collect (one frame each)."""
        page = self._pending()
        if self._bundle is None:
            # the Eiger's resource of the run's file; each index is one frame here (the
            # descriptor's shape is a frame's)
            self._bundle = self.det._resource(self.det.full_file_name.get(use_monitor=False))
            yield "stream_resource", self._bundle.stream_resource_doc
        n = len(page["values"])
        if n:
            first = self._first + page["first"]
            yield "stream_datum", self._bundle.compose_stream_datum(
                indices={"start": first, "stop": first + n})

    def collect(self):
        """One event per step since the last collect: the setting, the step's counts per chip
        and in total."""
        page = self._pending()
        det = self.det
        for value, sums, start in zip(page["values"], page["sums"], page["starts"]):
            yield {"data": {self.x_key: int(value), det.chip_sums.name: sums,
                            det.total_counts.name: float(sums.sum())},
                   "timestamps": {self.x_key: float(start), det.chip_sums.name: float(start),
                                  det.total_counts.name: float(start)}}
        self._rows += len(page["values"])
        self._page = None

    # -- staging ----------------------------------------------------------------------------------
    def stage(self):
        self._bundle, self._first, self._rows, self._page = None, 0, 0, None
        self.det.stage()
        return [self]

    def unstage(self):
        self.det.unstage()
        return [self]

    def stop(self, *, success: bool = False):
        self.det.stop(success=success)

    def __repr__(self) -> str:
        return f"EigerScan({self.det.name}, {self.x_key})"
