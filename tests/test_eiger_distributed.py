"""A multi-module EIGER calibrated with its frames left in their files and the per-pixel fits on a
dask LocalCluster (the path a 9M takes), against the same scans analysed in memory.

calibrate_eiger's steps on a simulated 1M (two modules, four half modules), shortened scans: each
scan's documents go to the StepAnalysis callback the plans subscribe, once reading the frames
whole (the default below 2M pixels) and once lazily, block by half module, on the cluster. Every
decision must be the same (the first path's set the next step)."""
from __future__ import annotations

import warnings

import dask
import numpy as np
import pytest

from calbench.analysis.eiger_calibration import trimbit_targets
from calbench.analysis.eiger_callbacks import LazyFrames, StepAnalysis
from calbench.analysis.scurve_dask import dask_client
from eiger_scan_support import Ranges, run_procedure, scan_documents

pytestmark = pytest.mark.timeout(600)

RANGES = Ranges(vrf=(2500, 3700, 60), scurve=(0, 2001, 80), trimbit_step=4)   # short scans


def _same_records(a, b):
    """Per-pixel fit records equal field by field (NaN where both are NaN)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    for name in a.dtype.names:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.fixture(scope="module")
def client():
    yield dask_client()          # the default: a LocalCluster, one worker process per core


def test_a_1m_is_calibrated_the_same_from_its_files_on_the_cluster(tmp_path, client):
    # the trimbit scan's targets and mask (9 bytes a pixel, 9.4 MB here) go to the workers
    # once: no graph sent near their size
    with dask.config.set({"distributed.admin.large-graph-warning-threshold": "4MB"}), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = run_procedure("1M", tmp_path, lazy=(True, False), ranges=RANGES)
    assert not [str(w.message) for w in caught if "large graph" in str(w.message)]
    b, a = run.results[True], run.results[False]
    np.testing.assert_array_equal(a["vrf_scan"].vrf, b["vrf_scan"].vrf)
    assert a["vrf_scan"].exptime_s == b["vrf_scan"].exptime_s
    np.testing.assert_array_equal(a["vrf_scan"].sums, b["vrf_scan"].sums)
    for key in ("untrimmed", "trimmed"):
        _same_records(a[key].fit, b[key].fit)
        np.testing.assert_array_equal(a[key].bad.codes(), b[key].bad.codes())
        np.testing.assert_array_equal(a[key].vcmp, b[key].vcmp)
        np.testing.assert_array_equal(a[key].vcp, b[key].vcp)
    _same_records(a["trimbit_scan"].fit, b["trimbit_scan"].fit)
    np.testing.assert_array_equal(a["trimbit_scan"].trimbits, b["trimbit_scan"].trimbits)
    # what the procedure keeps decides as the whole result: the trimbit scan was analysed with
    # it on both paths, and it holds the same targets and good pixels as the fit map gives
    full, kept = b["untrimmed"], b["untrimmed_kept"]
    np.testing.assert_array_equal(kept.trimbit_targets(), trimbit_targets(full.fit, full.good))
    np.testing.assert_array_equal(kept.good, full.good)
    np.testing.assert_array_equal(kept.mu, full.fit["mu"].astype(np.float32))
    assert kept.summary() == full.summary()
    tb = b["trimbit_scan"]
    assert tb.kept().summary() == tb.summary()
    np.testing.assert_array_equal(a["untrimmed_kept"].targets, kept.targets)
    np.testing.assert_array_equal(a["untrimmed_kept"].bad_codes, kept.bad_codes)
    for la, lb in zip(a["lines"], b["lines"]):
        np.testing.assert_allclose(la.sums, lb.sums, rtol=1e-12)
        np.testing.assert_allclose(la.mu, lb.mu, rtol=1e-9)
    # the calibration did its job on both paths: trimming narrowed the inflection spread
    assert np.mean(b["trimmed"].mu_std) < 0.5 * np.mean(b["untrimmed"].mu_std)


def test_frames_named_by_the_documents_stay_in_their_file(tmp_path, client):
    from calbench.contracts.clock import WorldClock
    from calbench.iocs.sim.eiger import EigerSim

    sim = EigerSim(WorldClock(1.0), geometry="1M", seed=3)
    sim.set_dynamic_range(32)
    x = np.arange(2500, 3700, 60)
    docs = scan_documents(sim, tmp_path / "scan.h5", step="vrf_scan", x=x,
                          setter=lambda v: sim.set_dac("vrpreamp", v), target="Cu", exptime_s=0.1)
    analysis = StepAnalysis(lazy=True)
    for name, doc in docs:
        analysis(name, doc)
    assert analysis.error == ""
    frames = analysis.data_used.frames
    assert isinstance(frames, LazyFrames) and len(frames.sources) == 1     # one read per block
    counts = analysis.data_used.counts
    assert counts.numblocks == (4, 1, 1)                                   # one half module each
    import h5py
    with h5py.File(tmp_path / "scan.h5") as f:
        np.testing.assert_array_equal(np.asarray(counts[256:512, 100:200]),
                                      np.moveaxis(f["/entry/data/data"][:, 256:512, 100:200], 0, -1))
