"""PSI's scan file (``np.savez``: data [rows, cols, n] float64, x [n]) written band by band by
save_scan, from numpy or from the lazily read dask array of a large scan: np.load must read the
same arrays as from np.savez's own file."""
from __future__ import annotations

import zipfile

import dask.array as da
import numpy as np
import pytest

from calbench.analysis import eiger_files
from calbench.analysis.eiger_files import load_scan, save_scan
from calbench.contracts.eiger_geometry import geometry


@pytest.fixture
def scan():
    rows, cols = geometry("250k").shape
    rng = np.random.default_rng(7)
    x = np.arange(0, 2001, 400)
    return x, rng.poisson(900.0, (rows, cols, x.size)).astype(np.uint32)


def _same_as_savez(tmp_path, path, x, counts):
    ref = tmp_path / "ref.npz"
    np.savez(ref, data=np.asarray(counts, np.float64), x=x)
    with np.load(path) as got, np.load(ref) as want:
        assert sorted(got.files) == sorted(want.files) == ["data", "x"]
        for key in want.files:
            assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape
            np.testing.assert_array_equal(got[key], want[key])
    with zipfile.ZipFile(path) as zf:             # stored, as np.savez writes it
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_STORED}


def test_a_numpy_scan_is_written_in_bands_and_reads_as_savez(tmp_path, scan, monkeypatch):
    x, counts = scan
    # bands of a few rows, so the file is assembled from many of them
    monkeypatch.setattr(eiger_files, "SCAN_BAND_BYTES", 8 * counts.shape[1] * x.size * 7)
    path = save_scan(tmp_path / "T1_vcmp_CuXRF_0.npz", x, counts)
    _same_as_savez(tmp_path, path, x, counts)
    got_x, got_data = load_scan(path)
    np.testing.assert_array_equal(got_x, x)
    np.testing.assert_array_equal(got_data, counts.astype(np.float64))


def test_a_dask_scan_is_written_chunk_by_chunk_and_reads_as_savez(tmp_path, scan):
    x, counts = scan
    lazy = da.from_array(counts, chunks=(100, 256, -1))       # rows in uneven bands
    path = save_scan(tmp_path / "T1_vcmp_CuXRF_1.npz", x, lazy)
    _same_as_savez(tmp_path, path, x, counts)


def test_a_scan_of_the_wrong_shape_is_refused_and_leaves_no_file(tmp_path, scan):
    x, counts = scan
    with pytest.raises(ValueError, match=r"scan data must be \[rows, cols, 6\]"):
        save_scan(tmp_path / "bad.npz", x, counts[..., :4])
    assert list(tmp_path.iterdir()) == []
