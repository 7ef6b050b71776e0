# Long by design: the walk model with its two estimators, which share the binning and the fit range.
"""Cable transit time from calibration pulses: the time-walk model of leading-edge discrimination.

A calibration sweep gives, for every pulse, the charge Q (pC) and the TDC time t (ns) of the direct
pulse and of its reflection from the cable's open far end. A leading-edge discriminator fires later
on small pulses (time walk); for a pulse whose edge rises like sin^2 the crossing time expands as

    t = T0 + a Q^-1/2 + b Q^-3/2          (a in ns pC^1/2, b in ns pC^3/2)

(for a sin^2 edge of rise time tr reaching the threshold at charge k: a = (2 tr / pi) sqrt(k),
b = a k / 6; the series is arcsin(u), u = sqrt(k/Q), cut after u^3). T0, the crossing time of an
infinitely large pulse, is the pulse's start; dt = T0(reflected) - T0(direct) is the round trip
through the cable and L = v dt / 2.

Two estimators, selectable by name (`method=`; "likelihood" by default, as the plans use):

* "binned" (the paper's): group pulses by TDC bin, take the mean charge in each bin, fit the model
  to (mean charge, bin centre) with equal weights: one linear least-squares solve. The bin holding
  the sweep's largest pulses is left out: its charges run to the end of the sweep rather than to a
  bin edge, so its mean charge belongs to no definite time (keeping it made T0 swing by a large
  part of an LSB with the sub-LSB phase of the pulses).
* "likelihood": every pulse counts. With Gaussian jitter sigma(Q), a pulse of charge Q lands in the
  bin [t, t + LSB) with probability Phi((t + LSB - mu)/sigma) - Phi((t - mu)/sigma),
  mu = T0 + a Q^-1/2 + b Q^-3/2 and sigma^2 = s_clock^2 + s_noise^2 / Q (input noise divided by
  the edge's slope, which grows like Q^1/2 at a fixed threshold). Damped Newton steps with the
  analytic Hessian maximise the product over pulses in tens of milliseconds.

Fit range and threshold. The two-term model is a truncated series in u = sqrt(k/Q); near the
threshold (u -> 1) the arcsin's square-root singularity makes it wrong by a lot and T0 moves with it
(all pulses of a sin^2 sweep gave biases up to 0.2 ns; a Q^-5/2 term quadrupled the spread
instead). A fit therefore starts at `min_charge_over_threshold` times the threshold charge:
2.0 for "binned" (u <= 0.71: lower, its equal-weight bins near the threshold hold few pulses each and
add more noise than lever arm) and 1.5 for "likelihood" (u <= 0.82: it weighs each pulse by what it
tells, so the longer lever arm pays). The threshold charge is read from the data where the sweep
crosses it (the step in the firing indicator against the DAC register); when every pulse fired the
smallest charge bounds it, and for direct pulses the reflections' threshold does (the cable only
broadens a pulse, so at one threshold voltage the reflection needs at least as much of its own
charge). The reflected charges (a few pC, a few per cent of ADC noise and quantisation) are replaced
by the fitted constant ratio to the direct charge: both are proportional to the DAC register, which
the paper notes may stand in for Q.

On the simulated board (iocs/sim/fee.py, 20 m of RG58, the paper's 500..12000 sweep) the spread of
repeated calibrations is 0.047 ns with "likelihood" and 0.11 ns with "binned" (the lab's seed; other
simulated boards give 0.04..0.06 and 0.11..0.14 ns); a plain average of TDC times at one amplitude
is off by up to 0.4 ns in the paper's incremental table (calbench.procedures.fee_paper).

Nothing here imports ophyd, bluesky's RunEngine or caproto: arrays in, numbers and figures out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.special import log_ndtr, ndtr

from calbench.contracts.fee import TDC_LSB_NS  # Daya Bay FEE TDC least significant bit

__all__ = [
    "TDC_LSB_NS", "RG58_VELOCITY_M_PER_NS", "METHODS", "DEFAULT_MIN_CHARGE_OVER_THRESHOLD",
    "TransitFitError", "WalkFit", "TransitTimeResult", "VelocityFit", "walk_model", "fit_walk",
    "fit_transit_time", "proportional_charge", "naive_transit_time", "fit_velocity",
    "fit_temperature_coefficient", "plot_walk_fits", "plot_monitor_history",
]

RG58_VELOCITY_M_PER_NS = 0.208       # the paper's fitted propagation velocity in RG58A/U
METHODS = ("binned", "likelihood")
MIN_BINS = 4                         # three parameters and one degree of freedom
# Fit range: multiple of the threshold charge where each estimator starts (see the docstring).
DEFAULT_MIN_CHARGE_OVER_THRESHOLD = {"binned": 2.0, "likelihood": 1.5}
MIN_BIN_COUNT = 20                   # fewer pulses: the bin's mean charge is too noisy to weigh 1
Method = Literal["binned", "likelihood"]


class TransitFitError(ValueError):
    """The pulses cannot give a transit time; the message names the channel, the cause and the fix."""


def walk_model(q_pC: ArrayLike, t0_ns: float, a: float, b: float) -> NDArray[np.float64]:
    """Threshold-crossing time (ns) of a pulse of charge q_pC: t0 + a q^-1/2 + b q^-3/2."""
    q = np.asarray(q_pC, dtype=float)
    return t0_ns + a / np.sqrt(q) + b / (q * np.sqrt(q))


@dataclass(frozen=True)
class WalkFit:
    """Fit of the walk model to one pulse type (direct or reflected)."""
    t0_ns: float
    a: float                          # ns pC^1/2
    b: float                          # ns pC^3/2
    t0_err_ns: float
    cov: NDArray[np.float64]          # covariance of (t0, a, b)
    method: str
    n_pulses: int                     # pulses in the fit range
    n_bins: int                       # TDC bins in the fit range
    q_min_pC: float                   # fit range
    q_max_pC: float
    threshold_charge_pC: float        # charge at which the discriminator fires (estimated)
    jitter_ns: float = math.nan       # fitted jitter at the median charge (likelihood only)
    rms_ns: float = math.nan          # rms residual of the bin means (binned only)
    bin_charge_pC: NDArray[np.float64] = field(default_factory=lambda: np.zeros(0), repr=False)
    bin_time_ns: NDArray[np.float64] = field(default_factory=lambda: np.zeros(0), repr=False)

    def predict(self, q_pC: ArrayLike) -> NDArray[np.float64]:
        """Model crossing time (ns) at charges q_pC."""
        return walk_model(q_pC, self.t0_ns, self.a, self.b)

    def summary(self) -> dict[str, float]:
        return {"t0_ns": self.t0_ns, "t0_err_ns": self.t0_err_ns, "a": self.a, "b": self.b,
                "n_pulses": self.n_pulses, "n_bins": self.n_bins, "q_min_pC": self.q_min_pC,
                "q_max_pC": self.q_max_pC, "threshold_charge_pC": self.threshold_charge_pC,
                "jitter_ns": self.jitter_ns, "rms_ns": self.rms_ns}


@dataclass(frozen=True)
class TransitTimeResult:
    """Round-trip transit time through a cable from one calibration sweep."""
    dt_ns: float                      # T0(reflected) - T0(direct)
    dt_err_ns: float                  # statistical error of this calibration
    length_m: float                   # v dt / 2
    length_err_m: float
    velocity_m_per_ns: float          # velocity used for the length
    method: str
    direct: WalkFit
    reflected: WalkFit
    naive_dt_ns: float                # mean TDC difference, no walk model (for comparison)
    label: str = ""

    def as_dict(self) -> dict[str, float | str]:
        """Flat, JSON-able summary (what a derived run stores)."""
        out: dict[str, float | str] = {
            "dt_ns": self.dt_ns, "dt_err_ns": self.dt_err_ns, "length_m": self.length_m,
            "length_err_m": self.length_err_m, "velocity_m_per_ns": self.velocity_m_per_ns,
            "method": self.method, "naive_dt_ns": self.naive_dt_ns}
        for kind, fit in (("direct", self.direct), ("reflected", self.reflected)):
            out.update({f"{kind}_{k}": float(v) for k, v in fit.summary().items()})
        return out


# -- input checks ----------------------------------------------------------------------------------

def _prefix(label: str) -> str:
    return f"{label}: " if label else ""


def _pulses(q: ArrayLike, t: ArrayLike, kind: str, label: str) -> tuple[NDArray, NDArray, NDArray]:
    """Finite (charge, time) pairs of the pulses that fired, and the mask of those that fired."""
    q = np.asarray(q, dtype=float).ravel()
    t = np.asarray(t, dtype=float).ravel()
    if q.shape != t.shape:
        raise TransitFitError(f"{_prefix(label)}{kind} charges ({q.size}) and times ({t.size}) "
                              "differ in length; pass the arrays of one sweep")
    fired = np.isfinite(q) & np.isfinite(t)
    bad_q = fired & (q <= 0)
    if bad_q.any():
        fired &= ~bad_q
    return q[fired], t[fired], fired


def _bin_index(t: NDArray, lsb_ns: float, kind: str, label: str) -> NDArray[np.int64]:
    k = np.round(t / lsb_ns)
    off = np.abs(t - k * lsb_ns)
    if off.size and off.max() > 1e-3 * lsb_ns:
        raise TransitFitError(f"{_prefix(label)}{kind} times are not multiples of the TDC LSB "
                              f"{lsb_ns} ns (off by up to {off.max():.3g} ns); pass raw TDC times "
                              "or the right lsb_ns")
    return k.astype(np.int64)


# -- binned estimator (the paper's) ----------------------------------------------------------------

def _bin_means(q: NDArray, k: NDArray, min_count: int) -> tuple[NDArray, NDArray, NDArray]:
    """TDC bins with at least min_count pulses: (bin index, mean charge, error of the mean charge)."""
    bins, inverse, counts = np.unique(k, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=q)
    squares = np.bincount(inverse, weights=q * q)
    mean = sums / counts
    var = np.maximum(squares / counts - mean ** 2, 0.0) / np.maximum(counts - 1, 1)
    keep = counts >= min_count
    return bins[keep], mean[keep], np.sqrt(var[keep])


def _design(q: NDArray) -> NDArray:
    r = 1.0 / np.sqrt(q)
    return np.column_stack([np.ones_like(q), r, r ** 3])


# Products with the (pulses x 3) design matrix go through einsum's own loops, not BLAS: threaded
# BLAS on tall-skinny matrices is slower than one core here, and far slower on a busy machine.
def _xv(x: NDArray, v: NDArray) -> NDArray:
    return np.einsum("ij,j->i", x, v)


def _xtv(x: NDArray, v: NDArray) -> NDArray:
    return np.einsum("ij,i->j", x, v)


def _xtwx(x: NDArray, w: NDArray) -> NDArray:
    return np.einsum("ij,i,ik->jk", x, w, x)


def _least_squares(x: NDArray, y: NDArray) -> NDArray:
    """Unweighted linear least squares through the normal equations, columns scaled first."""
    scale = np.sqrt(np.einsum("ij,ij->j", x, x))
    xs = x / scale
    return np.linalg.solve(_xtwx(xs, np.ones(len(y))), _xtv(xs, y)) / scale


@dataclass(frozen=True)
class BinCuts:
    """What the binned estimator left out of the TDC bins the pulses fell in, and why."""
    n_bins: int                       # TDC bins holding at least one pulse
    few_pulses: int                   # fewer than min_count pulses: mean charge too noisy
    below_range: int                  # mean charge below the fit range (too close to threshold)
    sweep_end: int                    # the open-ended bin of the largest pulses and the later ones
    sweep_start: int                  # the open-ended bin of the smallest pulses and the earlier ones
    kept: int

    def explain(self, min_count: int, q_min_pC: float) -> str:
        reasons = [(self.few_pulses, f"with fewer than {min_count} pulses"),
                   (self.below_range, f"with a mean charge below the fit range {q_min_pC:.3g} pC"),
                   (self.sweep_end, "open-ended at the sweep's largest pulses (their charges run "
                                    "to the end of the sweep, not to a bin edge)"),
                   (self.sweep_start, "open-ended at the sweep's smallest pulses")]
        cut = "; ".join(f"{n} {why}" for n, why in reasons if n)
        return f"{self.n_bins} bins hold pulses, {self.kept} kept" + (f"; left out: {cut}"
                                                                     if cut else "")


def _binned(q: NDArray, k: NDArray, lsb_ns: float, min_count: int, q_min: float = 0.0):
    """Equal-weight least squares of the walk model on (mean charge, bin centre) of the bins whose
    mean charge is at least q_min. The covariance is that of the equal-weight solution given the
    statistical error of each bin's mean charge (carried to time through the model's slope); the
    scatter of the bin points about the curve is mostly the fixed offset between a bin's centre and
    the crossing time of its mean charge, not noise, and would overstate the error.
    Returns (fit or None, BinCuts, mean charges, bin centres)."""
    n_all = int(np.unique(k).size)
    bins, q_mean, q_err = _bin_means(q, k, min_count)
    few = n_all - bins.size
    keep = q_mean >= q_min
    below = int((~keep).sum())
    bins, q_mean, q_err = bins[keep], q_mean[keep], q_err[keep]
    # The bin holding the sweep's largest pulses is open-ended (its charges run up to the end of the
    # sweep, not to a bin edge), so its mean charge belongs to no definite time; earlier bins hold
    # only the jitter tail of those pulses. Both are left out, and so are the bin of the smallest
    # pulses and the later ones when the sweep's start (not the fit range) ends the charges there.
    end = bins > np.median(k[q >= np.quantile(q, 0.99)])
    start = (bins < np.median(k[q <= np.quantile(q, 0.01)]) if q_min <= q.min()
             else np.ones(bins.size, bool))
    inside = end & start
    cuts = BinCuts(n_all, few, below, int((~end).sum()), int((end & ~start).sum()),
                   int(inside.sum()))
    bins, q_mean, q_err = bins[inside], q_mean[inside], q_err[inside]
    t_centre = (bins + 0.5) * lsb_ns
    if bins.size < MIN_BINS:
        return None, cuts, q_mean, t_centre
    x = _design(q_mean)
    coef, *_ = np.linalg.lstsq(x, t_centre, rcond=None)
    resid = t_centre - x @ coef
    slope = -0.5 * coef[1] * q_mean ** -1.5 - 1.5 * coef[2] * q_mean ** -2.5     # ns per pC
    t_err = np.abs(slope) * q_err
    xtx_inv = np.linalg.inv(x.T @ x)
    cov = xtx_inv @ (x.T * t_err ** 2) @ x @ xtx_inv
    rms = float(np.sqrt(np.mean(resid ** 2)))
    return (coef, cov, rms), cuts, q_mean, t_centre


# -- likelihood estimator --------------------------------------------------------------------------

def _log_interval(z1: NDArray, z2: NDArray) -> NDArray:
    """log(Phi(z2) - Phi(z1)) for z1 < z2, accurate in both tails."""
    out = np.empty_like(z1)
    upper = z1 > 0            # both in the upper tail: use the survival function
    lower = z2 < 0
    mid = ~(upper | lower)
    a, b = log_ndtr(-z1[upper]), log_ndtr(-z2[upper])
    out[upper] = a + np.log(-np.expm1(b - a))
    a, b = log_ndtr(z2[lower]), log_ndtr(z1[lower])
    out[lower] = a + np.log(-np.expm1(b - a))
    out[mid] = np.log(np.maximum(ndtr(z2[mid]) - ndtr(z1[mid]), 1e-300))
    return np.maximum(out, -700.0)


_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _nll_derivatives(theta: NDArray, x: NDArray, lo: NDArray, lsb: float, hessian: bool = True):
    """Negative log-likelihood of the TDC bins given the charges, its gradient and Hessian.

    theta = (t0, a, b, c, d): mu = t0 + a Q^-1/2 + b Q^-3/2 and the jitter
    sigma^2 = exp(2c) + exp(2d) / Q (clock jitter, plus input noise divided by the edge's slope,
    which grows like Q^1/2 on a sin^2 edge); x = design matrix [1, Q^-1/2, Q^-3/2]; lo = bin low
    edges. With z1,2 = (edge - mu) / sigma, log p = log(Phi(z2) - Phi(z1)); the derivatives in z are
    chained to (mu, s = log sigma), then to the parameters."""
    inv_q = x[:, 1] ** 2
    var_c = math.exp(min(2 * theta[3], 600.0))
    var_d = math.exp(min(2 * theta[4], 600.0)) * inv_q
    var = var_c + var_d
    sigma = np.sqrt(var)
    w = var_c / var                       # d s / d c; d s / d d = 1 - w
    mu = _xv(x, theta[:3])
    z1 = (lo - mu) / sigma
    z2 = z1 + lsb / sigma
    logp = _log_interval(z1, z2)
    # phi(z)/p in log space, so that pulses far from the model do not overflow
    r1 = np.exp(-0.5 * z1 ** 2 - _LOG_SQRT_2PI - logp)
    r2 = np.exp(-0.5 * z2 ** 2 - _LOG_SQRT_2PI - logp)
    g_mu = (r1 - r2) / sigma
    g_s = r1 * z1 - r2 * z2
    grad = -np.concatenate([_xtv(x, g_mu), [np.dot(g_s, w), np.dot(g_s, 1 - w)]])
    if not hessian:
        return -float(logp.sum()), grad, None
    d11 = z1 * r1 - r1 ** 2            # d2 log p / dz1^2
    d22 = -z2 * r2 - r2 ** 2           # d2 log p / dz2^2
    d12 = r1 * r2                      # d2 log p / dz1 dz2
    h_mumu = (d11 + d22 + 2 * d12) / var
    h_mus = (d11 * z1 + d22 * z2 + d12 * (z1 + z2) - r1 + r2) / sigma
    h_ss = d11 * z1 ** 2 + d22 * z2 ** 2 + 2 * d12 * z1 * z2 - r1 * z1 + r2 * z2
    curv = 2 * w * (1 - w)             # d2 s/dc2 = d2 s/dd2 = -d2 s/dc dd
    hess = np.empty((5, 5))
    hess[:3, :3] = _xtwx(x, h_mumu)
    hess[:3, 3] = hess[3, :3] = _xtv(x, h_mus * w)
    hess[:3, 4] = hess[4, :3] = _xtv(x, h_mus * (1 - w))
    hess[3, 3] = np.dot(h_ss, w * w) + np.dot(g_s, curv)
    hess[4, 4] = np.dot(h_ss, (1 - w) ** 2) + np.dot(g_s, curv)
    hess[3, 4] = hess[4, 3] = np.dot(h_ss, w * (1 - w)) - np.dot(g_s, curv)
    return -float(logp.sum()), grad, -hess


def _likelihood(q: NDArray, k: NDArray, lsb_ns: float, start: NDArray):
    """Maximum-likelihood (t0, a, b, c, d) by damped (Levenberg-Marquardt) Newton steps from
    `start` = (t0, a, b); returns the parameters, their covariance (inverse observed information)
    and whether it converged."""
    x = _design(q)
    lo = k * lsb_ns
    jitter0 = 0.2 * lsb_ns
    theta = np.concatenate([start, [math.log(jitter0), math.log(jitter0 * math.sqrt(np.median(q)))]])
    f, g, h = _nll_derivatives(theta, x, lo, lsb_ns)
    n = theta.size
    damping = 1e-3
    converged = False
    for _ in range(100):
        scale = np.sqrt(np.maximum(np.abs(np.diag(h)), 1e-300))
        while True:
            a = h / np.outer(scale, scale) + damping * np.eye(n)
            try:
                step = -np.linalg.solve(a, g / scale) / scale
            except np.linalg.LinAlgError:
                step = None
            if step is not None:
                # the jitter parameters are logarithms: move them by at most a factor e^2 per step
                step[3:] = np.clip(step[3:], -2.0, 2.0)
                with np.errstate(all="ignore"):
                    f_new, g_new, h_new = _nll_derivatives(theta + step, x, lo, lsb_ns)
                if (np.isfinite(f_new) and np.all(np.isfinite(h_new))
                        and f_new <= f + 1e-12 * abs(f)):
                    break
            damping *= 10.0
            if damping > 1e10:
                return theta, np.full((n, n), np.nan), False
        theta = theta + step
        done = abs(f - f_new) < 1e-9 * max(1.0, abs(f_new))
        f, g, h = f_new, g_new, h_new
        damping = max(damping / 10.0, 1e-9)
        if done:
            converged = True
            break
    try:
        cov = np.linalg.inv(h)
    except np.linalg.LinAlgError:
        cov = np.full((n, n), np.nan)
    return theta, cov, converged


# -- one pulse type --------------------------------------------------------------------------------

def _threshold_charge(q_all: NDArray, fired: NDArray, amplitude: NDArray) -> float:
    """Charge (pC) at which the discriminator starts to fire, when the sweep went below it.

    Input noise lets a few pulses below the threshold fire and a few above it miss, so the smallest
    charge that fired underestimates it. The threshold is placed where a step in the firing
    indicator best splits the pulses ordered by amplitude (DAC register, or the sweep order), and
    converted to charge with the pulses that fired just above that point."""
    if fired.all() or not fired.any():
        return math.nan
    order = np.argsort(amplitude, kind="stable")
    f = fired[order]
    # misclassified(i) = fired below the split + missed at or above it
    fired_below = np.concatenate([[0], np.cumsum(f)])
    missed_above = np.concatenate([np.cumsum((~f)[::-1])[::-1], [0]])
    split = int(np.argmin(fired_below + missed_above))
    above = order[split:][f[split:]][:25]
    return float(np.median(q_all[above])) if above.size else math.nan


def fit_walk(q_pC: ArrayLike, t_ns: ArrayLike, method: Method = "likelihood", *,
             lsb_ns: float = TDC_LSB_NS, min_charge_over_threshold: float | None = None,
             q_min_pC: float | None = None, min_bin_count: int = MIN_BIN_COUNT,
             amplitude: ArrayLike | None = None, threshold_bound_pC: float | None = None,
             kind: str = "pulses", label: str = "") -> WalkFit:
    """Fit t = T0 + a Q^-1/2 + b Q^-3/2 to the pulses of one type.

    q_pC, t_ns: charge (pC) and TDC time (ns) per pulse, NaN where the discriminator did not fire.
    method: "binned" (mean charge per TDC bin, equal weights) or "likelihood" (every pulse).
    min_charge_over_threshold: fit range starts at this multiple of the threshold charge (default
    per method, see the module docstring); q_min_pC overrides the range's lower end.
    min_bin_count: bins with fewer pulses are left out of the binned fit.
    amplitude: a quantity proportional to each pulse's size whether it fired or not (DAC register,
    direct charge), used to locate the threshold; default: the pulse index (arrays in sweep order).
    threshold_bound_pC: an upper bound on the threshold charge known from elsewhere, used when
    every pulse fired (otherwise the smallest charge that fired is the bound).
    kind/label name the pulses in error messages.
    Raises TransitFitError when the pulses cannot constrain the model.
    """
    if method not in METHODS:
        raise TransitFitError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    q_all = np.asarray(q_pC, dtype=float).ravel()
    q, t, fired = _pulses(q_all, t_ns, kind, label)
    if q.size == 0:
        raise TransitFitError(f"{_prefix(label)}no {kind} fired in {q_all.size} pulses")
    k = _bin_index(t, lsb_ns, kind, label)
    amp = (np.arange(q_all.size, dtype=float) if amplitude is None
           else np.asarray(amplitude, float).ravel())
    if amp.shape != q_all.shape:
        raise TransitFitError(f"{_prefix(label)}amplitude has {amp.size} entries for {q_all.size} "
                              f"{kind}; pass one per pulse")
    amp = np.where(np.isfinite(amp), amp, -np.inf)
    threshold = _threshold_charge(q_all, fired, amp)
    if not math.isfinite(threshold):
        # Every pulse fired: the threshold is below the smallest charge, or below a bound known
        # from elsewhere. Using the bound keeps u <= 1/sqrt(min_charge_over_threshold).
        threshold = float(q.min()) if threshold_bound_pC is None else min(float(q.min()),
                                                                           threshold_bound_pC)
    if q_min_pC is None:
        factor = (DEFAULT_MIN_CHARGE_OVER_THRESHOLD[method] if min_charge_over_threshold is None
                  else min_charge_over_threshold)
        q_min_pC = factor * threshold
    # The binned fit keeps whole bins (mean charge in range): cutting pulses would leave bins that
    # hold only the jitter tail of larger pulses. The likelihood conditions on each pulse's charge,
    # so it cuts pulses.
    fit, cuts, q_mean, t_centre = _binned(q, k, lsb_ns, min_bin_count, q_min_pC)
    n_bins = cuts.kept
    n_all = int(np.unique(k).size)
    sel = q >= q_min_pC
    q, k = q[sel], k[sel]
    n_used = n_bins if method == "binned" else int(np.unique(k).size)
    if (fit is None if method == "binned" else n_used < MIN_BINS):
        what = (f"the binned fit can use ({cuts.explain(min_bin_count, q_min_pC)})"
                if method == "binned" else
                f"above the fit range {q_min_pC:.3g} pC ({n_all} bins hold pulses)")
        raise TransitFitError(
            f"{_prefix(label)}{kind} fall in only {n_used} TDC bin(s) {what}; the walk model "
            f"needs {MIN_BINS}: start the sweep at a lower DAC register so that the walk spans "
            "more bins, or lower the discriminator threshold")
    q_range = (float(q.min()), float(q.max()))
    if method == "binned":
        coef, cov, rms = fit
        return WalkFit(float(coef[0]), float(coef[1]), float(coef[2]),
                       float(math.sqrt(max(cov[0, 0], 0.0))), cov, "binned", int(q.size), n_bins,
                       *q_range, threshold, rms_ns=rms, bin_charge_pC=q_mean, bin_time_ns=t_centre)
    # Start from the per-pulse least-squares line through the bin centres: every pulse counts, as
    # in the likelihood, so it starts closer than the binned solution when there are few bins.
    start = _least_squares(_design(q), (k + 0.5) * lsb_ns)
    theta, cov5, _ = _likelihood(q, k, lsb_ns, start)
    cov3 = cov5[:3, :3]
    if not np.all(np.isfinite(cov3)) or cov3[0, 0] <= 0:
        raise TransitFitError(f"{_prefix(label)}the likelihood fit of the {kind} did not converge; "
                              "use method='binned' or check the data for outliers")
    return WalkFit(float(theta[0]), float(theta[1]), float(theta[2]), float(math.sqrt(cov3[0, 0])),
                   cov3, "likelihood", int(q.size), n_used, *q_range, threshold,
                   jitter_ns=float(math.sqrt(math.exp(2 * theta[3])
                                             + math.exp(2 * theta[4]) / np.median(q))),
                   bin_charge_pC=q_mean, bin_time_ns=t_centre)


# -- transit time ----------------------------------------------------------------------------------

def proportional_charge(reference_q_pC: ArrayLike, q_pC: ArrayLike) -> NDArray[np.float64]:
    """q_pC replaced by ratio * reference_q_pC, the ratio fitted (least squares through the origin)
    over the pulses where both were measured; NaN where q_pC is NaN.

    The calibration charges are proportional to the DAC register (the paper notes that the register
    can stand in for Q without changing T0), so the small reflected charges, whose ADC noise and
    0.16 pC quantisation are a few per cent, are better known from the large direct charges."""
    ref = np.asarray(reference_q_pC, dtype=float)
    q = np.asarray(q_pC, dtype=float)
    both = np.isfinite(ref) & np.isfinite(q)
    if not both.any():
        return q.copy()
    ratio = float(np.dot(ref[both], q[both]) / np.dot(ref[both], ref[both]))
    return np.where(np.isfinite(q), ratio * ref, np.nan)


def naive_transit_time(direct_t_ns: ArrayLike, reflected_t_ns: ArrayLike,
                       amplitude: ArrayLike | None = None, *,
                       top_fraction: float = 0.02) -> tuple[float, float]:
    """The transit time without the walk model: mean TDC time of the reflected pulses minus that of
    the direct pulses, over the largest pulses of the sweep (the top `top_fraction` by amplitude;
    default amplitude: the sweep order), i.e. pulses of one amplitude as a plain TDR measurement
    would use. Returns (dt ns, error of the mean ns).

    The walk of both pulses stays in the result, and since the pulses are synchronous with the TDC
    clock they fall in the same one or two bins every time: more pulses do not beat the LSB."""
    d = np.asarray(direct_t_ns, dtype=float).ravel()
    r = np.asarray(reflected_t_ns, dtype=float).ravel()
    amp = (np.arange(d.size, dtype=float) if amplitude is None
           else np.asarray(amplitude, float).ravel())
    n_top = max(2, int(round(top_fraction * d.size)))
    top = np.argsort(np.where(np.isfinite(amp), amp, -np.inf), kind="stable")[-n_top:]
    d, r = d[top], r[top]
    d, r = d[np.isfinite(d)], r[np.isfinite(r)]
    if d.size < 2 or r.size < 2:
        return math.nan, math.nan
    err = math.sqrt(d.var(ddof=1) / d.size + r.var(ddof=1) / r.size)
    return float(r.mean() - d.mean()), err


def fit_transit_time(direct_q_pC: ArrayLike, direct_t_ns: ArrayLike, reflected_q_pC: ArrayLike,
                     reflected_t_ns: ArrayLike, method: Method = "likelihood", *,
                     velocity_m_per_ns: float = RG58_VELOCITY_M_PER_NS, lsb_ns: float = TDC_LSB_NS,
                     min_charge_over_threshold: float | None = None,
                     min_bin_count: int = MIN_BIN_COUNT, amplitude: ArrayLike | None = None,
                     smooth_reflected_charge: bool = True,
                     label: str = "") -> TransitTimeResult:
    """Round-trip transit time (ns) through a cable from one calibration sweep.

    Arrays are per pulse (charge pC, TDC time ns; NaN where the discriminator did not fire) for the
    direct and the reflected pulses. The walk model is fitted separately to each (their shapes
    differ: the cable attenuates and disperses the reflection); dt = T0_reflected - T0_direct with
    dt_err_ns from the two fits' covariances; length_m = velocity * dt / 2. `amplitude` (one per
    pulse, e.g. the DAC register; default the sweep order) locates the threshold. `label` (e.g.
    "channel 3") prefixes error messages. smooth_reflected_charge: fit the reflected pulses against
    their DAC-proportional charge (see `proportional_charge`). Raises TransitFitError for a channel
    without reflection or with too few TDC bins.
    """
    if method not in METHODS:
        raise TransitFitError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    common = dict(method=method, lsb_ns=lsb_ns, min_charge_over_threshold=min_charge_over_threshold,
                  min_bin_count=min_bin_count, amplitude=amplitude, label=label)
    sizes = {name: np.size(a) for name, a in (("direct charges", direct_q_pC),
                                              ("direct times", direct_t_ns),
                                              ("reflected charges", reflected_q_pC),
                                              ("reflected times", reflected_t_ns))}
    if len(set(sizes.values())) > 1:
        raise TransitFitError(f"{_prefix(label)}the arrays differ in length "
                              f"({', '.join(f'{k} {v}' for k, v in sizes.items())}); pass the four "
                              "arrays of one sweep, one entry per pulse")
    direct_t = np.asarray(direct_t_ns, dtype=float)
    if not np.isfinite(direct_t).any():
        raise TransitFitError(
            f"{_prefix(label)}no direct pulse fired in {direct_t.size} pulses: the calibration "
            "pulses do not reach the channel; check the channel mask and lower the threshold")
    reflected_t = np.asarray(reflected_t_ns, dtype=float)
    n_reflected = int(np.isfinite(reflected_t).sum())
    if n_reflected == 0:
        raise TransitFitError(
            f"{_prefix(label)}no reflected pulse in {reflected_t.size} pulses: no cable connected, "
            "or its far end is terminated; connect the cable with its far end open "
            "(or raise the sweep so that the reflection crosses the threshold)")
    reflected_q = np.asarray(reflected_q_pC, dtype=float)
    if smooth_reflected_charge:
        reflected_q = proportional_charge(direct_q_pC, reflected_q)
    reflected = fit_walk(reflected_q, reflected_t, kind="reflected pulses", **common)
    # The reflection is never narrower than the direct pulse (the cable only disperses), so at the
    # same threshold voltage it needs at least as much of its own charge to fire: its threshold
    # charge bounds the direct pulses'.
    direct = fit_walk(direct_q_pC, direct_t, kind="direct pulses",
                      threshold_bound_pC=reflected.threshold_charge_pC, **common)
    dt = reflected.t0_ns - direct.t0_ns
    dt_err = math.hypot(direct.t0_err_ns, reflected.t0_err_ns)
    naive, _ = naive_transit_time(direct_t, reflected_t, amplitude)
    return TransitTimeResult(dt, dt_err, velocity_m_per_ns * dt / 2.0,
                             velocity_m_per_ns * dt_err / 2.0,
                             velocity_m_per_ns, method, direct, reflected, naive, label)


# -- velocity and temperature ----------------------------------------------------------------------

@dataclass(frozen=True)
class VelocityFit:
    """dt = 2 dL / v + offset fitted to (added length, measured dt) pairs."""
    velocity_m_per_ns: float
    velocity_err_m_per_ns: float
    offset_ns: float
    offset_err_ns: float
    chi2_ndof: float


def fit_velocity(dL_m: ArrayLike, dt_ns: ArrayLike, dt_err_ns: ArrayLike | None = None, *,
                 through_origin: bool = True) -> VelocityFit:
    """Propagation velocity (m/ns) from added cable lengths dL_m and the measured changes of the
    round-trip time dt_ns (weighted by 1/dt_err_ns^2 when given). through_origin: the pairs are
    increments relative to dL = 0 (no offset fitted)."""
    x = 2.0 * np.asarray(dL_m, dtype=float)
    y = np.asarray(dt_ns, dtype=float)
    w = (np.ones_like(y) if dt_err_ns is None
         else 1.0 / np.maximum(np.asarray(dt_err_ns, float), 1e-12) ** 2)
    cols = [x] if through_origin else [x, np.ones_like(x)]
    a = np.column_stack(cols)
    need = a.shape[1] + 1
    if y.size < need or np.ptp(x) == 0:
        raise TransitFitError(f"need at least {need} different lengths to fit the velocity, "
                              f"got {np.unique(x).size}")
    aw = a * np.sqrt(w)[:, None]
    coef, *_ = np.linalg.lstsq(aw, y * np.sqrt(w), rcond=None)
    resid = (y - a @ coef) * np.sqrt(w)
    ndof = y.size - a.shape[1]
    chi2 = float(resid @ resid) / ndof
    cov = np.linalg.inv(aw.T @ aw)
    if dt_err_ns is None:
        cov *= chi2           # unweighted: errors from the scatter
    slope, slope_err = coef[0], math.sqrt(cov[0, 0])     # ns per metre of round trip = 1 / v
    offset = float(coef[1]) if not through_origin else 0.0
    offset_err = math.sqrt(cov[1, 1]) if not through_origin else 0.0
    return VelocityFit(1.0 / slope, slope_err / slope ** 2, offset, offset_err, chi2)


def fit_temperature_coefficient(temperature_C: ArrayLike, dt_ns: ArrayLike,
                                dt_err_ns: ArrayLike | None = None) -> tuple[float, float, float]:
    """Relative temperature coefficient of the transit time (1/K) from a monitor's history:
    dt = dt_ref (1 + c (T - T_mean)). Returns (c, error of c, dt_ref ns)."""
    temp = np.asarray(temperature_C, dtype=float)
    y = np.asarray(dt_ns, dtype=float)
    ok = np.isfinite(temp) & np.isfinite(y)
    temp, y = temp[ok], y[ok]
    if y.size < 3 or np.ptp(temp) == 0:
        raise TransitFitError("need at least 3 calibrations at different temperatures to fit the "
                              "temperature coefficient")
    w = np.ones_like(y) if dt_err_ns is None else 1.0 / np.asarray(dt_err_ns, float)[ok] ** 2
    a = np.column_stack([np.ones_like(temp), temp - temp.mean()])
    aw = a * np.sqrt(w)[:, None]
    coef, *_ = np.linalg.lstsq(aw, y * np.sqrt(w), rcond=None)
    resid = (y - a @ coef) * np.sqrt(w)
    cov = np.linalg.inv(aw.T @ aw) * max(float(resid @ resid) / max(y.size - 2, 1), 1e-300)
    c = coef[1] / coef[0]
    c_err = abs(c) * math.hypot(math.sqrt(cov[1, 1]) / coef[1], math.sqrt(cov[0, 0]) / coef[0])
    return float(c), float(c_err), float(coef[0])


# -- plots -----------------------------------------------------------------------------------------

def plot_walk_fits(direct_q_pC: ArrayLike, direct_t_ns: ArrayLike, reflected_q_pC: ArrayLike,
                   reflected_t_ns: ArrayLike, result: TransitTimeResult, path=None):
    """The paper's figure: TDC time against charge for direct (a) and reflected (b) pulses, the mean
    charge per TDC bin, the fitted walk curve and T0. Saved to `path` (PNG/PDF) when given; returns
    the matplotlib Figure."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2)
    for ax, q, t, fit, title in ((axes[0], direct_q_pC, direct_t_ns, result.direct, "(a) direct"),
                                 (axes[1], reflected_q_pC, reflected_t_ns, result.reflected,
                                  "(b) reflected")):
        q = np.asarray(q, float)
        t = np.asarray(t, float)
        ax.plot(q, t, ".", color="k", ms=1.5, alpha=0.3, label="pulses")
        ax.plot(fit.bin_charge_pC, fit.bin_time_ns - 0.5 * TDC_LSB_NS, "s", color="tab:blue", ms=5,
                label="mean charge per TDC bin")
        qq = np.linspace(fit.q_min_pC, np.nanmax(q), 300)
        ax.plot(qq, fit.predict(qq) - 0.5 * TDC_LSB_NS, "-", color="tab:red",
                label=f"fit ({fit.method}): T0 = {fit.t0_ns:.3f} ± {fit.t0_err_ns:.3f} ns")
        ax.axvspan(np.nanmin(q), fit.q_min_pC, color="0.9", label="outside fit range")
        ax.axhline(fit.t0_ns - 0.5 * TDC_LSB_NS, color="tab:red", ls=":", lw=0.8)
        ax.set_xlabel("charge (pC)")
        ax.set_ylabel("TDC time (ns)")
        ax.set_title(title)
        ax.legend(fontsize=7, loc="upper right")
    label = f"{result.label}: " if result.label else ""
    fig.suptitle(f"{label}dt = {result.dt_ns:.3f} ± {result.dt_err_ns:.3f} ns, "
                 f"L = {result.length_m:.3f} m at v = {result.velocity_m_per_ns} m/ns")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def plot_monitor_history(times_s: ArrayLike, temperature_C: ArrayLike, dt_ns: ArrayLike,
                         dt_err_ns: ArrayLike, path=None, *, label: str = ""):
    """Transit time of a cable against time and against temperature (the real-time monitor's
    history), with the fitted temperature coefficient. Saved to `path` when given."""
    from matplotlib.figure import Figure

    times = np.asarray(times_s, float)
    temp = np.asarray(temperature_C, float)
    dt = np.asarray(dt_ns, float)
    err = np.asarray(dt_err_ns, float)
    fig = Figure(figsize=(11, 4))
    ax1, ax2 = fig.subplots(1, 2)
    hours = (times - times.min()) / 3600.0 if times.size else times
    ax1.errorbar(hours, dt, yerr=err, fmt="o", ms=3, color="tab:blue", label="dt")
    ax1.set_xlabel("time since first calibration (h)")
    ax1.set_ylabel("round-trip transit time (ns)", color="tab:blue")
    twin = ax1.twinx()
    twin.plot(hours, temp, "-", color="tab:orange")
    twin.set_ylabel("cable temperature (°C)", color="tab:orange")
    ax2.errorbar(temp, dt, yerr=err, fmt="o", ms=3, color="tab:blue")
    ax2.set_xlabel("cable temperature (°C)")
    ax2.set_ylabel("round-trip transit time (ns)")
    ok = np.isfinite(dt) & np.isfinite(temp)
    if ok.sum() >= 3 and np.ptp(temp[ok]) > 0:
        c, c_err, ref = fit_temperature_coefficient(temp[ok], dt[ok], err[ok])
        tt = np.linspace(temp[ok].min(), temp[ok].max(), 50)
        ax2.plot(tt, ref * (1 + c * (tt - temp[ok].mean())), "-", color="tab:red",
                 label=f"{100 * c:.4f} ± {100 * c_err:.4f} %/K")
        ax2.legend(fontsize=8)
    fig.suptitle(f"{label + ': ' if label else ''}cable transit-time monitor")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
