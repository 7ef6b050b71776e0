"""The EIGER IOC's per-acquisition reductions against plain numpy on the same frames."""
from __future__ import annotations

import numpy as np
import pytest

from calbench.contracts.eiger_geometry import geometry
from calbench.iocs.eiger_reductions import FrameReducer


@pytest.mark.parametrize("name, dtype, n_frames", [("500k", np.uint32, 3), ("1M", np.uint16, 2),
                                                   ("500k", np.uint8, 1)])
def test_chip_sums_total_and_live_image_match_numpy(name, dtype, n_frames):
    g = geometry(name)
    rng = np.random.default_rng(7)
    high = min(np.iinfo(dtype).max, 2**31)
    frames = rng.integers(0, high, (n_frames, *g.shape), dtype=np.int64).astype(dtype)
    frames[0, 0, 0] = np.iinfo(dtype).max         # the bins must not overflow the frame dtype
    reducer = FrameReducer(g)
    for frame in frames:
        reducer.add(frame)
    out = reducer.result()
    np.testing.assert_array_equal(out.chip_sums, g.chip_sums(frames))
    assert out.total == frames.sum(dtype=np.float64)
    rows, cols = g.shape
    live = frames[-1].astype(np.float64).reshape(rows // 4, 4, cols // 4, 4).sum(axis=(1, 3))
    np.testing.assert_array_equal(out.live_image, live.astype(np.float32).ravel())
    assert out.live_image.dtype == np.float32


def test_an_acquisition_without_frames_has_no_reductions():
    assert FrameReducer(geometry("500k")).result() is None
