"""The EIGER IOC's HDF5 writer: frames streamed into files as slsReceiver writes them.

One file holds /entry/data/data [frames, rows, cols] in the dynamic range's dtype plus per-frame
metadata; iocs/eiger.py decides which file an acquisition writes (Single or Stream mode) and calls
`acquire_to_file` in a worker thread, which also reduces each frame for the PVs as it arrives
(iocs/eiger_reductions.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from calbench.contracts.eiger import SCAN_TARGETS
from calbench.contracts.eiger_geometry import EigerGeometry, frame_dtype
from calbench.iocs.eiger_reductions import FrameReducer

FLUSH_EVERY_S = 0.5
PROGRESS_EVERY_S = 0.5      # a long acquisition's frames so far, for live plots and progress


def acquire_to_file(backend, geometry: EigerGeometry, path: Path | None,
                    stream_file: "FrameFile | None", progress=None):
    """Worker thread: run the acquisition, streaming its frames into the HDF5 file (a new one
    at ``path`` in Single mode, the open ``stream_file`` in Stream mode, none without Capture)
    and reducing each (per-chip counts, total, live image). Every PROGRESS_EVERY_S of a long
    acquisition, ``progress(records)`` gets the FrameRecords so far, once their frames are
    flushed (readers of the file see them).
    Returns (the backend's Acquisition, its reductions or None without frames); a new file is
    removed if the acquisition fails."""
    writer = FrameFile(path, geometry, backend) if path else stream_file
    reducer = FrameReducer(geometry)
    scan = backend.scan()
    starts: list[float] = []
    last = time.monotonic()

    def on_frame(index: int, frame: np.ndarray, start: float) -> None:
        nonlocal last
        if writer is not None:
            writer.append(index, frame)
        reducer.add(frame)
        starts.append(start)
        if progress is not None and time.monotonic() - last >= PROGRESS_EVERY_S:
            if writer is not None:
                writer.flush()
            progress(FrameRecords(reducer.frame_chip_sums(), np.asarray(starts),
                                  scan.values[:len(starts)] if scan else None))
            last = time.monotonic()

    if writer is not None:
        writer.begin_acquisition(backend, scan)
    try:
        result = backend.acquire(on_frame)
    except BaseException:
        if writer is not None and path is not None:
            writer.discard()
        raise
    if writer is not None:
        writer.end_acquisition(result.start_times, result.scan_values)
        if path is not None:
            writer.close()
    return result, reducer.result()


@dataclass(frozen=True)
class FrameRecords:
    """Per-frame records of the frames acquired so far: counts per chip [n, chips], exposure
    starts (world epoch s) and, in a scan, each step's setting."""
    chip_sums: np.ndarray
    start_times: np.ndarray
    scan_values: np.ndarray | None

    @property
    def n_frames(self) -> int:
        return len(self.start_times)


class FrameFile:
    """An HDF5 file of EIGER frames: /entry/data/data [frames, rows, cols] in the dr dtype, one
    chunk per frame, SWMR (readers such as tiled see each frame once it is flushed). Per frame,
    /entry/instrument/detector holds start_time (world epoch s), count_time (s), vthreshold
    (DAC, -1 when the chips differ) and, for a detector-side scan, scan_target (index into the
    dataset's ``targets`` attribute, -1 outside a scan) and scan_value (the step's setting), so a
    threshold scan's file describes itself."""

    def __init__(self, path: Path, geometry: EigerGeometry, backend):
        self.path = path
        rows, cols = geometry.shape
        self.dtype = frame_dtype(int(backend.dr))
        self.n_frames = 0
        self._first = 0
        self._flushed = time.monotonic()
        self.file = h5py.File(path, "w", libver="latest")
        entry = self.file.create_group("entry")
        entry.attrs["NX_class"] = "NXentry"
        data = entry.create_group("data")
        data.attrs.update(NX_class="NXdata", signal="data")
        self.dataset = data.create_dataset(
            "data", shape=(0, rows, cols), maxshape=(None, rows, cols), chunks=(1, rows, cols),
            dtype=self.dtype)
        det = entry.create_group("instrument").create_group("detector")
        det.attrs.update(NX_class="NXdetector", description="PSI EIGER", geometry=geometry.name,
                         hostnames="+".join(backend.hostnames),
                         dynamic_range_bits=int(backend.dr))
        self.per_frame = {name: det.create_dataset(name, shape=(0,), maxshape=(None,),
                                                   chunks=(256,), dtype=dtype)
                          for name, dtype in (("start_time", "f8"), ("count_time", "f8"),
                                              ("vthreshold", "i4"), ("scan_target", "i2"),
                                              ("scan_value", "i4"))}
        self.per_frame["scan_target"].attrs["targets"] = ",".join(SCAN_TARGETS)
        self.file.swmr_mode = True
        self._settings = {}

    def begin_acquisition(self, backend, scan=None) -> None:
        self._first = self.n_frames
        self._settings = {"count_time": float(backend.exptime),
                          "vthreshold": int(backend.vthreshold()),
                          "scan_target": SCAN_TARGETS.index(scan.target) if scan else -1,
                          "vthreshold_scanned": bool(scan and scan.target == "vthreshold")}

    def append(self, index: int, frame: np.ndarray) -> None:
        n = self._first + index + 1
        self.dataset.resize(n, axis=0)
        self.dataset[n - 1] = frame
        self.n_frames = n
        # SWMR readers see a long acquisition's frames within FLUSH_EVERY_S; a flush per frame
        # (a metadata write each) would double the cost of a short one
        if time.monotonic() - self._flushed >= FLUSH_EVERY_S:
            self.flush()

    def flush(self) -> None:
        """The frames so far, visible to SWMR readers."""
        self.dataset.flush()
        self._flushed = time.monotonic()

    def end_acquisition(self, start_times: np.ndarray, scan_values=None) -> None:
        n = self.n_frames
        settings = self._settings
        steps = (np.asarray(scan_values, np.int64)[: n - self._first] if scan_values is not None
                 else -1)
        values = {"start_time": np.asarray(start_times, float)[: n - self._first],
                  "count_time": settings["count_time"],
                  "vthreshold": steps if settings["vthreshold_scanned"] else settings["vthreshold"],
                  "scan_target": settings["scan_target"] if scan_values is not None else -1,
                  "scan_value": steps}
        for name, ds in self.per_frame.items():
            ds.resize(n, axis=0)
            ds[self._first:n] = values[name]
        self.file.flush()               # once: the frames and their metadata, before the put ends
        self._flushed = time.monotonic()

    def close(self) -> None:
        self.file.close()

    def discard(self) -> None:
        try:
            self.file.close()
        finally:
            self.path.unlink(missing_ok=True)
