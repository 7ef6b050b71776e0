"""What the EIGER IOC publishes of an acquisition: counts per chip, the total and the live image.

One pass per frame, as it is read out (on the detector's worker thread, never on the IOC's event
loop): each frame is summed in LIVE_BINNING x LIVE_BINNING bins with integer adds of strided
rows and columns (about 6x faster than numpy's reduction over a 4-d reshape of a 500k frame). The
bins of the last frame are the live image; each frame's bins give its per-chip counts (a chip is
256 x 256 pixels, a whole number of bins: a detector-side scan's points) and their sums over the
frames the acquisition's per-chip counts and total, exactly (integers).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from calbench.contracts.eiger_geometry import CHIP_SIZE, EigerGeometry
from calbench.iocs.eiger_pvs import LIVE_BINNING


@dataclass(frozen=True)
class Reductions:
    chip_sums: np.ndarray            # float64 [n_chips], counts per chip over all frames
    total: float
    live_image: np.ndarray           # float32 [rows // b * cols // b], the last frame binned
    frame_chip_sums: np.ndarray      # float64 [n_frames, n_chips], counts per chip of each frame


def binned(frame: np.ndarray, b: int = LIVE_BINNING) -> np.ndarray:
    """``frame`` summed in b x b bins (uint64, [rows // b, cols // b]; remainders dropped)."""
    rows, cols = frame.shape[0] // b * b, frame.shape[1] // b * b
    frame = frame[:rows, :cols]
    out = frame[0::b].astype(np.uint64)
    for i in range(1, b):
        out += frame[i::b]
    cols_binned = out[:, 0::b].copy()
    for i in range(1, b):
        cols_binned += out[:, i::b]
    return cols_binned


class FrameReducer:
    """Accumulates the frames of one acquisition: ``add(frame)`` per frame, then `result()`."""

    def __init__(self, geometry: EigerGeometry):
        if CHIP_SIZE % LIVE_BINNING:
            raise ValueError(f"chips of {CHIP_SIZE} pixels are not a whole number of "
                             f"{LIVE_BINNING}-pixel bins")
        self.geometry = geometry
        self._grid = geometry.chip_map[::CHIP_SIZE, ::CHIP_SIZE].astype(np.intp).ravel()
        self._last: np.ndarray | None = None
        self._per_frame: list[np.ndarray] = []

    def add(self, frame: np.ndarray) -> None:
        self._last = binned(np.asarray(frame))
        self._per_frame.append(self._chips(self._last))

    def frame_chip_sums(self) -> np.ndarray:
        """[frames so far, chips]: each frame's counts per chip."""
        if not self._per_frame:
            return np.zeros((0, self.geometry.n_chips))
        return np.stack(self._per_frame)

    def _chips(self, bins: np.ndarray) -> np.ndarray:
        """Counts per chip (chip order) of a binned frame: a chip is k x k bins."""
        k = CHIP_SIZE // LIVE_BINNING
        rows, cols = bins.shape
        blocks = bins.reshape(rows // k, k, cols // k, k).sum(axis=(1, 3))
        chips = np.empty(self.geometry.n_chips)
        chips[self._grid] = blocks.ravel()
        return chips

    def result(self) -> Reductions | None:
        """The acquisition's reductions; None when it took no frame."""
        if not self._per_frame:
            return None
        per_frame = self.frame_chip_sums()
        chips = per_frame.sum(axis=0)        # exact: integer counts far below 2**53
        return Reductions(chip_sums=chips, total=float(chips.sum()),
                          live_image=self._last.astype(np.float32).ravel(),
                          frame_chip_sums=per_frame)
