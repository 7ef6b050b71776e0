# Long by design: the S-curve and trimbit fits against PSI's model, one test per fit status and edge case.
"""Per-pixel S-curve and trimbit fitting (calbench.analysis.scurve).

The tests simulate EIGER scans with known truth and Poisson noise and check that the fit
recovers the physics: thresholds and noise to the precision the counts allow (the
Cramér-Rao bound), honest errors, and statuses that never call garbage OK.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from calbench.analysis.scurve import (
    SCURVE_DTYPE,
    SCURVE_PARAMS,
    TRIMBIT_MAX,
    FitStatus,
    fit_scurves,
    fit_trimbit_scans,
    scurve,
    scurve_falling,
    scurve_initial_guess,
    status_counts,
    status_names,
)

X = np.arange(0.0, 2001.0, 40.0)  # PSI's threshold scan: 0..2000 DAC, 51 points
ROWS, COLS = 32, 64


def _truth(rng: np.random.Generator, rows: int = ROWS, cols: int = COLS) -> dict[str, np.ndarray]:
    """Per-pixel parameters of an untrimmed EIGER module under XRF (DAC units, counts)."""
    shape = (rows, cols)
    return {
        "p0": rng.uniform(0.0, 5.0, shape),
        "p1": rng.uniform(0.0, 1e-3, shape),
        "mu": rng.normal(1200.0, 100.0, shape),
        "sigma": np.clip(rng.normal(120.0, 20.0, shape), 60.0, None),
        "A": rng.normal(600.0, 30.0, shape),
        "C": rng.uniform(0.0, 0.1, shape),
    }


def _expected(x: np.ndarray, truth: dict[str, np.ndarray], model=scurve) -> np.ndarray:
    return model(x, *(truth[k][..., None] for k in SCURVE_PARAMS))


def _cramer_rao(x: np.ndarray, truth: dict[str, np.ndarray]) -> np.ndarray:
    """Per-pixel Poisson Cramér-Rao standard deviations [rows, cols, 6] of the 6 parameters."""
    P = np.stack([truth[k] for k in SCURVE_PARAMS], axis=-1)[..., None, :]
    f = scurve(x, *(P[..., i] for i in range(6)))
    J = np.empty(f.shape + (6,))
    for i in range(6):
        h = np.zeros(6)
        h[i] = max(1e-6, 1e-5 * float(np.abs(P[..., i]).mean()))
        hi = scurve(x, *((P + h)[..., k] for k in range(6)))
        lo = scurve(x, *((P - h)[..., k] for k in range(6)))
        J[..., i] = (hi - lo) / (2.0 * h[i])
    fisher = np.einsum("...ni,...nj,...n->...ij", J, J, 1.0 / f)
    return np.sqrt(np.diagonal(np.linalg.inv(fisher), axis1=-2, axis2=-1))


@pytest.fixture(scope="module")
def module_scan():
    rng = np.random.default_rng(20240611)
    truth = _truth(rng)
    counts = rng.poisson(_expected(X, truth)).astype(np.int32)
    return truth, counts


@pytest.fixture(scope="module")
def module_fit(module_scan):
    _, counts = module_scan
    return fit_scurves(X, counts)


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------

def test_model_is_psi_formula_and_broadcasts():
    from scipy.special import erf

    x = np.linspace(0, 2000, 7)
    p = dict(p0=3.0, p1=0.01, mu=1100.0, sigma=90.0, A=500.0, C=0.2)
    expected = (p["p0"] + p["p1"] * x) + 0.5 * (
        1 + erf((x - p["mu"]) / (np.sqrt(2) * p["sigma"]))
    ) * (p["A"] + p["C"] * (x - p["mu"]))
    np.testing.assert_allclose(scurve(x, **p), expected, rtol=1e-12)
    # Rising + falling = twice the background plus the (unswitched) step term.
    both = scurve(x, **p) + scurve_falling(x, **p)
    np.testing.assert_allclose(both, 2 * (p["p0"] + p["p1"] * x) + p["A"] + p["C"] * (x - p["mu"]))
    # Broadcasting: one curve per pixel.
    mu = np.array([[1000.0], [1200.0]])
    assert scurve(x, 0, 0, mu, 100.0, 600.0, 0.0).shape == (2, 7)
    # At mu the rising curve is at half height above the background.
    assert scurve(1100.0, **p) == pytest.approx(p["p0"] + p["p1"] * 1100.0 + p["A"] / 2)


# --------------------------------------------------------------------------------------------
# Accuracy on simulated Poisson data
# --------------------------------------------------------------------------------------------

def test_recovers_threshold_and_noise_at_the_poisson_limit(module_scan, module_fit):
    truth, _ = module_scan
    res = module_fit
    assert status_counts(res["status"])["OK"] == ROWS * COLS  # clean pixels: none may fail

    crb = _cramer_rao(X, truth)
    for j, name in ((2, "mu"), (3, "sigma")):
        err = res[name] - truth[name]
        # For an efficient estimator |err|/crb is half-normal: its median is 0.6745.
        efficiency = np.median(np.abs(err) / crb[..., j]) / 0.6745
        assert efficiency < 1.15, f"{name}: errors {efficiency:.2f} x the Cramér-Rao bound"
        # No bias beyond what the number of pixels resolves (4 standard errors).
        assert abs(err.mean()) < 4 * err.std() / np.sqrt(err.size), f"{name} biased"

    # The module-level figure PSI quotes: median |mu - mu_true| in DAC.
    assert np.median(np.abs(res["mu"] - truth["mu"])) < 1.15 * 0.6745 * np.median(crb[..., 2])


def test_reported_errors_are_honest(module_scan, module_fit):
    truth, _ = module_scan
    res = module_fit
    for name in ("mu", "sigma", "A"):
        pulls = (res[name] - truth[name]) / res[name + "_err"]
        assert 0.9 < pulls.std() < 1.1, f"{name} pulls have std {pulls.std():.3f}"
    # Poisson-weighted reduced chi2 of a correct model is about 1.
    assert 0.8 < np.median(res["chi2"]) < 1.2


def test_noise_free_curves_are_recovered_exactly():
    rng = np.random.default_rng(3)
    truth = _truth(rng, 4, 8)
    # Expected (non-integer) counts: any weighting that leaves the data unchanged has its
    # minimum at the truth; chi-square-gamma shifts data by min(y, 1) and is meant for counts.
    res = fit_scurves(X, _expected(X, truth), weighting="neyman", tol=1e-9, max_iter=100)
    assert np.all(res["status"] == FitStatus.OK)
    for name in ("mu", "sigma"):
        np.testing.assert_allclose(res[name], truth[name], atol=1e-2)  # DAC
    np.testing.assert_allclose(res["A"], truth["A"], rtol=1e-5)


def test_falling_curves():
    rng = np.random.default_rng(5)
    truth = _truth(rng, 8, 16)
    counts = rng.poisson(_expected(X, truth, scurve_falling))
    res = fit_scurves(X, counts, falling=True)
    assert np.all(res["status"] == FitStatus.OK)
    assert np.median(np.abs(res["mu"] - truth["mu"])) < 10.0  # DAC, ~2x the Poisson limit
    assert np.median(np.abs(res["sigma"] - truth["sigma"])) < 10.0
    # A falling scan is not a rising S-curve: the rising fit must not call it OK.
    wrong = fit_scurves(X, counts)
    assert not np.any(wrong["status"] == FitStatus.OK)


def test_initial_guess_is_close_to_truth(module_scan):
    truth, counts = module_scan
    g = scurve_initial_guess(X, counts)
    assert g.shape == (ROWS, COLS, 6)
    assert np.median(np.abs(g[..., 2] - truth["mu"])) < 40.0  # within one scan step
    assert np.median(np.abs(g[..., 3] / truth["sigma"] - 1)) < 0.3


# --------------------------------------------------------------------------------------------
# Statuses
# --------------------------------------------------------------------------------------------

def test_zero_and_masked_pixels_are_skipped(module_scan):
    _, counts = module_scan
    counts = counts.copy()
    counts[0, :5] = 0
    mask = np.zeros((ROWS, COLS), dtype=bool)
    mask[1, 3] = mask[5, 7] = True
    res = fit_scurves(X, counts, mask)
    skipped = res["status"] == FitStatus.SKIPPED
    assert skipped[0, :5].all() and skipped[1, 3] and skipped[5, 7]
    assert skipped.sum() == 7
    for name in SCURVE_PARAMS:
        assert np.isnan(res[name][skipped]).all()
    assert (res["status"][~skipped] == FitStatus.OK).all()


def _garbage(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    flat = np.ones(X.size)
    return {
        "flat, low": rng.poisson(5 * flat, (n, X.size)),
        "flat, high": rng.poisson(300 * flat, (n, X.size)),
        "white noise": rng.integers(0, 1000, (n, X.size)),
        "falling": rng.poisson(scurve_falling(X, 2, 0, rng.normal(1200, 100, (n, 1)), 120, 600, 0)),
        "linear ramp": rng.poisson(np.linspace(10, 600, X.size), (n, X.size)),
        "single spike": rng.poisson(2, (n, X.size)) + np.where(np.arange(X.size) == 25, 500, 0),
        "step sharper than the scan": rng.poisson(
            scurve(X, 2, 0, 1020.0 + 40 * rng.integers(0, 10, (n, 1)), 1.0, 600, 0)
        ),
    }


@pytest.mark.parametrize("kind", list(_garbage(np.random.default_rng(0), 1)))
def test_garbage_pixels_fail_not_ok(kind):
    counts = _garbage(np.random.default_rng(17), 64)[kind][None]
    res = fit_scurves(X, counts)
    names = status_names(res["status"])
    assert not np.any(names == "OK"), f"{kind}: {status_counts(res['status'])}"
    assert np.all(names == "FAILED")


def test_status_helpers():
    codes = np.array([[0, 1], [2, 3]], dtype=np.int8)
    assert status_names(codes).tolist() == [["OK", "SKIPPED"], ["FAILED", "CLIPPED"]]
    assert status_counts(codes) == {"OK": 1, "SKIPPED": 1, "FAILED": 1, "CLIPPED": 1}
    assert FitStatus(2).name == "FAILED"


# --------------------------------------------------------------------------------------------
# Trimbit scans
# --------------------------------------------------------------------------------------------

TRIMBITS = np.arange(0.0, 64.0, 2.0)  # PSI's do_trimbit_scan(step=2)


@pytest.fixture(scope="module")
def trimbit_scan():
    """Counts vs trimbit: each pixel's step sits where its threshold reaches vcmp."""
    rng = np.random.default_rng(99)
    shape = (ROWS, COLS)
    t = {
        "p0": rng.uniform(20, 80, shape),
        "p1": rng.uniform(0.0, 1.5, shape),
        "mu": rng.uniform(4.0, 59.0, shape),  # trimbit that trims the pixel
        "sigma": rng.uniform(8.0, 15.0, shape),
        "A": rng.normal(1300.0, 100.0, shape),
    }
    # A few pixels that no trimbit can trim: step far below 0 or above 63.
    t["mu"][0, :4] = [-25.0, -15.0, 80.0, 95.0]
    lam = scurve(TRIMBITS, *(t[k][..., None] for k in ("p0", "p1", "mu", "sigma", "A")), 0.0)
    counts = rng.poisson(lam)
    # The procedure's target: the untrimmed S-curve at its own mu, p0 + p1*mu + A/2; for the
    # simulated scan that is the counts at trimbit = mu.
    target = t["p0"] + t["p1"] * t["mu"] + t["A"] / 2
    return t, counts, target


def test_trimbit_solver_recovers_known_trimbits(trimbit_scan):
    t, counts, target = trimbit_scan
    res = fit_trimbit_scans(TRIMBITS, counts, target)
    inside = np.ones(t["mu"].shape, dtype=bool)
    inside[0, :4] = False
    assert np.all(res["status"][inside] == FitStatus.OK)
    want = np.rint(t["mu"]).astype(int)
    diff = res["trimbit"][inside] - want[inside]
    assert np.mean(diff == 0) > 0.75
    assert np.mean(np.abs(diff) <= 1) > 0.995
    assert res["trimbit"].dtype == np.int32
    assert res["trimbit"].min() >= 0 and res["trimbit"].max() <= TRIMBIT_MAX


def test_untrimmable_pixels_are_clipped(trimbit_scan):
    _, counts, target = trimbit_scan
    res = fit_trimbit_scans(TRIMBITS, counts, target)
    assert res["status"][0, :4].tolist() == [FitStatus.CLIPPED] * 4
    assert res["trimbit"][0, :4].tolist() == [0, 0, TRIMBIT_MAX, TRIMBIT_MAX]


def test_trimbit_skips_masked_and_unknown_targets(trimbit_scan):
    _, counts, target = trimbit_scan
    target = target.copy()
    target[2, 2] = np.nan  # the untrimmed S-curve fit of this pixel was not OK
    mask = np.zeros(target.shape, dtype=bool)
    mask[3, 3] = True
    res = fit_trimbit_scans(TRIMBITS, counts, target, mask)
    assert res["status"][2, 2] == FitStatus.SKIPPED and res["status"][3, 3] == FitStatus.SKIPPED
    assert res["trimbit"][2, 2] == -1 and res["trimbit"][3, 3] == -1


# --------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------

def test_bad_inputs_name_the_problem():
    good = np.ones((2, 3, X.size), dtype=np.int32)
    with pytest.raises(ValueError, match="last axis"):
        fit_scurves(X[:-1], good)
    with pytest.raises(ValueError, match=r"\[rows, cols, n_points\]"):
        fit_scurves(X, good[0])
    with pytest.raises(ValueError, match="NaN"):
        bad = good.astype(float)
        bad[1, 2, 7] = np.nan
        fit_scurves(X, bad)
    with pytest.raises(ValueError, match="negative"):
        bad = good.copy()
        bad[0, 0, 0] = -1
        fit_scurves(X, bad)
    with pytest.raises(ValueError, match="infinite"):
        bad = good.astype(np.float32)
        bad[0, 1, 3] = np.inf
        fit_scurves(X, bad)
    with pytest.raises(ValueError, match="strictly increasing"):
        fit_scurves(X[::-1], good)
    with pytest.raises(ValueError, match="mask must have shape"):
        fit_scurves(X, good, np.zeros((3, 2), dtype=bool))
    with pytest.raises(ValueError, match="target must have shape"):
        fit_trimbit_scans(TRIMBITS, np.ones((2, 3, TRIMBITS.size)), np.ones((3, 2)))
    with pytest.raises(ValueError, match="integer or float"):
        fit_scurves(X, good.astype(complex))


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(8, 60),
    rows=st.integers(1, 4),
    cols=st.integers(1, 4),
    swap=st.integers(0, 58),
    defect=st.sampled_from(["nan", "negative", "x not increasing", "x repeated", "points"]),
    where=st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 59)),
)
def test_invalid_inputs_always_raise_value_error(n, rows, cols, swap, defect, where):
    x = np.linspace(0.0, 2000.0, n)
    counts = np.full((rows, cols, n), 10.0)
    r, c, k = where[0] % rows, where[1] % cols, where[2] % n
    if defect == "nan":
        counts[r, c, k] = np.nan
    elif defect == "negative":
        counts[r, c, k] = -0.5
    elif defect == "x not increasing":
        i = swap % (n - 1)
        x[i], x[i + 1] = x[i + 1], x[i]
    elif defect == "x repeated":
        i = swap % (n - 1)
        x[i + 1] = x[i]
    else:
        counts = counts[..., : n - 1]
    with pytest.raises(ValueError):
        fit_scurves(x, counts)


# --------------------------------------------------------------------------------------------
# Memory-bounded chunking, dtypes and Dask
# --------------------------------------------------------------------------------------------

def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and all(
        np.array_equal(a[f], b[f], equal_nan=a.dtype[f].kind == "f") for f in a.dtype.names
    )


def test_chunked_fit_equals_unchunked(module_scan, module_fit):
    _, counts = module_scan
    # 100 pixels per chunk -> one row of 64 pixels per chunk, 32 chunks.
    assert _same(fit_scurves(X, counts, chunk_pixels=100), module_fit)
    assert _same(fit_scurves(X, counts, chunk_pixels=3 * COLS + 5), module_fit)


def test_chunked_fit_bounds_extra_memory(module_scan, tmp_path):
    import subprocess
    import sys

    _, counts = module_scan
    counts = np.concatenate([counts] * 8, axis=0)
    np.save(tmp_path / "counts.npy", counts)
    np.save(tmp_path / "x.npy", X)
    # measured in a process of its own: tracemalloc counts every thread, and this session's IOC
    # and client threads allocate meanwhile
    code = f"""
import tracemalloc, numpy as np
from calbench.analysis.scurve import fit_scurves
counts = np.load({str(tmp_path / "counts.npy")!r}); x = np.load({str(tmp_path / "x.npy")!r})
fit_scurves(x, counts[:1, :2])
tracemalloc.start()
res = fit_scurves(x, counts, chunk_pixels=counts.shape[1])
_, peak = tracemalloc.get_traced_memory()
print(peak - res.nbytes)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    working = int(done.stdout.split()[-1])
    full_float_copy = counts.size * 8
    # One row as float64 is COLS * 51 * 8 bytes; allow a few of those plus small bookkeeping,
    # far below the float64 copy of the whole input that an unchunked fit would need.
    assert working < 4 * COLS * X.size * 8 + 64 * 1024
    assert working < full_float_copy / 8


def test_result_does_not_depend_on_input_dtype(module_scan, module_fit):
    _, counts = module_scan
    assert module_fit.dtype == SCURVE_DTYPE and module_fit.shape == (ROWS, COLS)
    for dtype in (np.uint16, np.int64, np.float32, np.float64):
        assert _same(fit_scurves(X, counts.astype(dtype)), module_fit), dtype
    # Non-contiguous input (every other column) is handled without a full copy.
    assert _same(fit_scurves(X, counts[:, ::2]), module_fit[:, ::2])


def test_dask_distributed_matches_local(module_scan, module_fit):
    dask_array = pytest.importorskip("dask.array")
    distributed = pytest.importorskip("distributed")
    from calbench.analysis.scurve_dask import fit_scurves_distributed

    _, counts = module_scan
    modules = [counts[:16], counts[16:]]
    mask = np.zeros((ROWS, COLS), dtype=bool)
    mask[4, 4] = True
    expected_masked = fit_scurves(X, counts, mask)
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0"
    ) as cluster, distributed.Client(cluster) as client:
        per_module = fit_scurves_distributed(X, modules, client)
        assert _same(per_module[0], module_fit[:16]) and _same(per_module[1], module_fit[16:])

        lazy = dask_array.from_array(counts, chunks=(8, 32, 17))  # points axis split too
        whole = fit_scurves_distributed(X, lazy, client, mask=mask)
        assert _same(whole, expected_masked)
