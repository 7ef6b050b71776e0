"""The frames of a scan left in their HDF5 files, read block by block where they are analysed.

A 9M scan is ~2 GB of frames: the analysis callback (eiger_callbacks.FrameCollector) records where
each point's frames are (:class:`FrameSource`) instead of reading them, and the analysis gets a dask
array (:meth:`LazyFrames.counts`) whose blocks (half modules by default) are read by the tasks that
use them, on whichever dask worker runs them. Pure numpy, h5py and dask.
"""
from __future__ import annotations

from dataclasses import dataclass

import h5py
import numpy as np
from numpy.typing import NDArray

from calbench.analysis.eiger_calibration import counts_from_frames
from calbench.contracts.eiger_geometry import HALF_MODULE_COLS, HALF_MODULE_ROWS

__all__ = ["FrameSource", "LazyFrames", "read_block"]


@dataclass(frozen=True)
class FrameSource:
    """Where the frames of consecutive scan points are: frames [first, first + points * per_point)
    of dataset ``dataset`` in HDF5 file ``path`` (``per_point`` frames summed per point)."""
    path: str
    dataset: str
    first: int
    points: int
    per_point: int = 1
    swmr: bool = False


def read_block(sources: tuple[FrameSource, ...], rows: slice, cols: slice) -> NDArray:
    """Counts [rows, cols, n] of one block of pixels over every point of ``sources``, read from
    the files (uncompressed frame chunks: HDF5 reads only the block's bytes)."""
    parts = []
    for src in sources:
        with h5py.File(src.path, "r", swmr=src.swmr) as f:
            block = f[src.dataset][src.first:src.first + src.points * src.per_point, rows, cols]
        if src.per_point > 1:
            block = block.reshape(src.points, src.per_point, *block.shape[1:]).sum(
                axis=1, dtype=np.uint64)
        parts.append(block)
    return counts_from_frames(np.concatenate(parts) if len(parts) > 1 else parts[0])


class LazyFrames:
    """The frames of a scan left in their files: ``counts(blocks)`` is a dask array
    [rows, cols, n] whose blocks (half modules by default) are read by the task that uses them,
    on whichever worker runs it. Nothing is read until then."""

    def __init__(self, sources: list[FrameSource], shape: tuple[int, int], dtype):
        self.sources = tuple(sources)
        self.shape = (sum(s.points for s in sources), *shape)
        self.dtype = np.dtype(np.uint64) if any(s.per_point > 1 for s in sources) else \
            np.dtype(dtype)
        self.ndim = 3

    def __len__(self) -> int:
        return self.shape[0]

    def counts(self, block_rows: int = HALF_MODULE_ROWS, block_cols: int = HALF_MODULE_COLS):
        import dask
        import dask.array as da

        n, rows, cols = self.shape
        bands = []
        for r0 in range(0, rows, block_rows):
            line = []
            for c0 in range(0, cols, block_cols):
                rs, cs = slice(r0, min(r0 + block_rows, rows)), slice(c0, min(c0 + block_cols, cols))
                task = dask.delayed(read_block, pure=True)(self.sources, rs, cs)
                line.append(da.from_delayed(task, (rs.stop - rs.start, cs.stop - cs.start, n),
                                            dtype=self.dtype))
            bands.append(da.concatenate(line, axis=1))
        return da.concatenate(bands, axis=0)
