# Long by design: one numba fitting engine (model, kernels, public API) whose kernels must compile together.
"""Per-pixel S-curve fitting for EIGER threshold scans and trimbit scans.

The model is PSI's (sls_detector_tools ``function.scurve``, aare ``Fit.cpp``)::

    f(x) = (p0 + p1*x) + 0.5*(1 + erf((x - mu)/(sqrt(2)*sigma))) * (A + C*(x - mu))

with ``x`` the scanned setting (threshold DAC units for S-curves, trimbit code for trimbit
scans) and ``f`` the counts of one pixel.

Fitting engine
--------------
The model is linear in (p0, p1, A, C) once (mu, sigma) are fixed, so each pixel is fitted by
*variable projection*: a two-parameter Levenberg-Marquardt over (mu, sigma) where the four
linear parameters are the weighted linear least-squares solution at every trial point
(Kaufman's approximation of the projected Jacobian).  Every trial needs a single pass over the
points: it accumulates the weighted Gram matrix of the eight per-point functions
``[(1-u)/2, (1+u)/2, P, P*d, q, q*d, q*d^2, y]`` (``u`` the scan rescaled to [-1, 1], ``P`` the
normal CDF, ``q`` its density, ``d = u - mu``), from which the linear solution, the cost, the
reduced normal equations of the nonlinear step and, at the end, the full 6-parameter
covariance all follow by small dense algebra.  The background is carried as its values at the
two ends of the scan so that "background >= 0 over the scan" and "A >= 0" are plain
non-negativity constraints, solved exactly (small NNLS) at every step: without them, scans
that show only part of the step admit unphysical fits (a wide step on a large negative
background) with a lower chi-square than the truth.

Weighting: by default Mighell's chi-square-gamma (ApJ 518 (1999) 380), i.e. least squares of
``y + min(y, 1)`` with weights ``1/(y + 1)``.  It is as cheap as Neyman's ``1/max(y, 1)`` (the
weights are fixed per pixel, so every iteration stays a single pass) but nearly unbiased for
Poisson counts: on simulated EIGER modules it reaches the Cramér-Rao bound for mu and sigma
with no measurable bias, where Neyman weights bias sigma low by ~0.4 % and unweighted fits
lose ~50 % in sigma precision (see ``benchmarks/bench_scurve_fit.py``).  ``chi2`` is the
reduced chi-square-gamma of the fit (expectation ~1 for a correct model).

Everything here is pure numpy/numba: no ophyd, bluesky RunEngine or caproto.
"""

from __future__ import annotations

import math
import threading
from enum import IntEnum
from typing import Literal

import numba
import numpy as np
from numba import njit, prange
from numpy.typing import ArrayLike, NDArray
from scipy.special import erf

__all__ = [
    "SCURVE_DTYPE",
    "SCURVE_PARAMS",
    "TRIMBIT_DTYPE",
    "TRIMBIT_MAX",
    "FitStatus",
    "fit_scurves",
    "fit_trimbit_scans",
    "scurve",
    "scurve_falling",
    "scurve_initial_guess",
    "status_counts",
    "status_names",
]


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------

def scurve(
    x: ArrayLike,
    p0: ArrayLike,
    p1: ArrayLike,
    mu: ArrayLike,
    sigma: ArrayLike,
    A: ArrayLike,
    C: ArrayLike,
) -> NDArray[np.float64]:
    """Rising S-curve, PSI's model (numpy broadcasting over all arguments).

    Parameters
    ----------
    x : scanned setting (threshold in DAC units, or trimbit code).
    p0, p1 : linear background, counts and counts per x unit.
    mu : inflection point (threshold of the pixel), x units.
    sigma : width of the error function (noise), x units, > 0.
    A : step amplitude, counts.
    C : slope after the step (charge sharing), counts per x unit.

    Returns
    -------
    Counts, float64, broadcast shape of the arguments.
    """
    x = np.asarray(x, dtype=np.float64)
    d = x - mu
    return (p0 + p1 * x) + 0.5 * (1.0 + erf(d / (math.sqrt(2.0) * np.asarray(sigma)))) * (A + C * d)


def scurve_falling(
    x: ArrayLike,
    p0: ArrayLike,
    p1: ArrayLike,
    mu: ArrayLike,
    sigma: ArrayLike,
    A: ArrayLike,
    C: ArrayLike,
) -> NDArray[np.float64]:
    """Falling S-curve, PSI's ``scurve2``: as :func:`scurve` with ``1 - erf`` (same units)."""
    x = np.asarray(x, dtype=np.float64)
    d = x - mu
    return (p0 + p1 * x) + 0.5 * (1.0 - erf(d / (math.sqrt(2.0) * np.asarray(sigma)))) * (A + C * d)


# ----------------------------------------------------------------------------------------------
# Result types
# ----------------------------------------------------------------------------------------------

class FitStatus(IntEnum):
    """Outcome of a per-pixel fit (stored as int8 in the ``status`` field)."""

    OK = 0
    """Converged inside the bounds with a significant step; parameters are meaningful."""
    SKIPPED = 1
    """Not fitted: masked, no counts at all, or (trimbit scans) no finite target."""
    FAILED = 2
    """Did not converge, ended on a bound, no significant step, or chi2 too large."""
    CLIPPED = 3
    """Trimbit scans only: good fit, but the target lies outside 0..63; trimbit clipped."""


def status_names(status: ArrayLike) -> NDArray[np.str_]:
    """Names ("OK", "SKIPPED", ...) of an array of :class:`FitStatus` codes, same shape."""
    codes = np.asarray(status)
    names = np.array([s.name for s in FitStatus] + ["UNKNOWN"])
    lookup = np.full(256, len(FitStatus), dtype=np.intp)
    for s in FitStatus:
        lookup[int(s)] = int(s)
    return names[lookup[codes.astype(np.int64) & 0xFF]]


def status_counts(status: ArrayLike) -> dict[str, int]:
    """Number of pixels per :class:`FitStatus` name, e.g. ``{"OK": 524000, "FAILED": 12, ...}``."""
    codes = np.asarray(status).ravel()
    return {s.name: int(np.count_nonzero(codes == s)) for s in FitStatus}


SCURVE_PARAMS: tuple[str, ...] = ("p0", "p1", "mu", "sigma", "A", "C")

#: Result of :func:`fit_scurves`, one record per pixel.  Units: p0, A in counts; p1, C in
#: counts per x unit; mu, sigma in x units; errors in the unit of their parameter; chi2 is the
#: reduced chi-square of the weighted fit (dimensionless for the Poisson weightings, counts^2
#: for weighting="none"); n_iter the number of model evaluations over the scan points.
SCURVE_DTYPE = np.dtype(
    [(name, np.float64) for name in SCURVE_PARAMS]
    + [(name + "_err", np.float64) for name in SCURVE_PARAMS]
    + [("chi2", np.float64), ("status", np.int8), ("n_iter", np.uint8)]
)

#: Result of :func:`fit_trimbit_scans`, one record per pixel.  ``trimbit`` is -1 for SKIPPED
#: and FAILED pixels; ``t_cross`` is the unrounded, unclipped trimbit where the fitted curve
#: reaches the target (NaN when unknown); the fit parameters are those of the C = 0 model.
TRIMBIT_DTYPE = np.dtype(
    [("trimbit", np.int32), ("t_cross", np.float64), ("target", np.float64)]
    + [(name, np.float64) for name in ("p0", "p1", "mu", "sigma", "A")]
    + [("chi2", np.float64), ("status", np.int8)]
)

TRIMBIT_MAX = 63
"""Largest trimbit code of an EIGER pixel (6 bits)."""


# ----------------------------------------------------------------------------------------------
# numba kernel
# ----------------------------------------------------------------------------------------------

# All fast-math flags except nnan/ninf: those would let LLVM delete the NaN guards below.
_FM = {"nsz", "arcp", "contract", "afn", "reassoc"}

# error_model="numpy": no ZeroDivisionError branches, which would also block SIMD; every
# division here is either guarded or produces a NaN/inf that the status checks catch.
_jit = njit(fastmath=_FM, error_model="numpy", cache=True)
_jit_parallel = njit(parallel=True, fastmath=_FM, error_model="numpy", cache=True)

_INV_SQRT2PI = 0.3989422804014327
_SQRT1_2 = 0.7071067811865476
_BLOCK = 128  # pixels per parallel work item (scratch arrays are allocated once per block)

_N_OUT = 13  # values per pixel from _fit_pixel: 6 params, 6 errors, chi2

# Weightings (kernel codes).
_W_NONE = 0
_W_NEYMAN = 1
_W_MIGHELL = 2
_WEIGHTINGS = {"none": _W_NONE, "neyman": _W_NEYMAN, "poisson": _W_MIGHELL}

_ST_OK = 0
_ST_SKIPPED = 1
_ST_FAILED = 2

_LAM0 = 1e-3
_LAM_MIN = 1e-9
_LAM_MAX = 1e8


@_jit
def _exp_neg(t: float) -> float:
    """exp(-t) for t >= 0 with relative error < 1e-9, from arithmetic only.

    A libm call would stop LLVM from vectorising the per-point loop; this is a degree-6 Taylor
    polynomial on t/1024 followed by ten squarings.  t is capped at 64 (exp(-64) ~ 1.6e-28 is
    zero for every use here).
    """
    r = min(t, 64.0) * (1.0 / 1024.0)
    p = 1.0 - r * (1.0 - r * (0.5 - r * (1.0 / 6.0 - r * (
        1.0 / 24.0 - r * (1.0 / 120.0 - r * (1.0 / 720.0))))))
    p = p * p
    p = p * p
    p = p * p
    p = p * p
    p = p * p
    p = p * p
    p = p * p
    p = p * p
    p = p * p
    p = p * p
    return p


@_jit
def _cdf_and_gauss(z: float) -> tuple[float, float]:
    """Normal CDF Phi(z) and exp(-z^2/2).

    Abramowitz & Stegun 7.1.26 for erf (|error| < 1.5e-7, i.e. < 1e-4 counts on a 600-count
    step, far below Poisson noise) because it reuses the Gaussian's exponential: one exp per
    point gives both the model and its derivatives.
    """
    e = _exp_neg(0.5 * z * z)
    a = abs(z) * _SQRT1_2
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (
        1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    erf_a = 1.0 - poly * e
    return 0.5 + 0.5 * math.copysign(erf_a, z), e


@_jit
def _gram(u, ulo, uhi, y, w, m, s, sg, G):
    """Fill the (mu, sigma)-dependent entries of the weighted Gram matrix G (8x8, symmetric).

    Function order: 0:(1-u)/2, 1:(1+u)/2 (the linear background as its values at the two scan
    ends), 2:P, 3:P*d, 4:q, 5:q*d, 6:q*d^2, 7:y with d = u - m, P = Phi(sg*d/s) and
    q = phi(d/s)/s.  Entries among {0, 1, 7} do not depend on (m, s) and are set once per
    pixel.  Products that coincide (P*d*q = P*q*d, q*d*q*d = q*q*d^2, ...) are accumulated once.
    """
    inv_s = 1.0 / s
    qs = _INV_SQRT2PI * inv_s
    g02 = g03 = g04 = g05 = g06 = 0.0
    g12 = g13 = g14 = g15 = g16 = 0.0
    g22 = g23 = g24 = g25 = g26 = g27 = 0.0
    g33 = g36 = g37 = 0.0
    g44 = g45 = g46 = g47 = 0.0
    g56 = g57 = 0.0
    g66 = g67 = 0.0
    for i in range(u.shape[0]):
        d = u[i] - m
        P, e = _cdf_and_gauss(sg * d * inv_s)
        q = e * qs
        Pd = P * d
        h1 = q * d
        h2 = h1 * d
        wi = w[i]
        yi = y[i]
        lo = ulo[i]
        hi = uhi[i]
        wP = wi * P
        wPd = wi * Pd
        wq = wi * q
        wh1 = wi * h1
        wh2 = wi * h2
        g02 += wP * lo
        g03 += wPd * lo
        g04 += wq * lo
        g05 += wh1 * lo
        g06 += wh2 * lo
        g12 += wP * hi
        g13 += wPd * hi
        g14 += wq * hi
        g15 += wh1 * hi
        g16 += wh2 * hi
        g22 += wP * P
        g23 += wP * Pd
        g24 += wP * q
        g25 += wP * h1
        g26 += wP * h2
        g27 += wP * yi
        g33 += wPd * Pd
        g36 += wPd * h2
        g37 += wPd * yi
        g44 += wq * q
        g45 += wq * h1
        g46 += wq * h2
        g47 += wq * yi
        g56 += wh1 * h2
        g57 += wh1 * yi
        g66 += wh2 * h2
        g67 += wh2 * yi
    G[0, 2] = G[2, 0] = g02
    G[0, 3] = G[3, 0] = g03
    G[0, 4] = G[4, 0] = g04
    G[0, 5] = G[5, 0] = g05
    G[0, 6] = G[6, 0] = g06
    G[1, 2] = G[2, 1] = g12
    G[1, 3] = G[3, 1] = g13
    G[1, 4] = G[4, 1] = g14
    G[1, 5] = G[5, 1] = g15
    G[1, 6] = G[6, 1] = g16
    G[2, 2] = g22
    G[2, 3] = G[3, 2] = g23
    G[2, 4] = G[4, 2] = g24
    G[2, 5] = G[5, 2] = g25
    G[2, 6] = G[6, 2] = g26
    G[2, 7] = G[7, 2] = g27
    G[3, 3] = g33
    G[3, 4] = G[4, 3] = g25  # P*d*q == P*q*d
    G[3, 5] = G[5, 3] = g26  # P*d*q*d == P*q*d^2
    G[3, 6] = G[6, 3] = g36
    G[3, 7] = G[7, 3] = g37
    G[4, 4] = g44
    G[4, 5] = G[5, 4] = g45
    G[4, 6] = G[6, 4] = g46
    G[4, 7] = G[7, 4] = g47
    G[5, 5] = g46  # q*d*q*d == q*q*d^2
    G[5, 6] = G[6, 5] = g56
    G[5, 7] = G[7, 5] = g57
    G[6, 6] = g66
    G[6, 7] = G[7, 6] = g67


@_jit
def _cholesky(M, k, L) -> bool:
    """Cholesky factor of the leading k x k block of M into L; False if not positive definite.

    The diagonal of L holds the *reciprocals* 1/L_ii, so that solves multiply instead of
    divide (divisions dominate these tiny factorisations).
    """
    for i in range(k):
        for j in range(i + 1):
            acc = M[i, j]
            for t in range(j):
                acc -= L[i, t] * L[j, t]
            if i == j:
                # Relative pivot test: a collinear basis (e.g. the step far outside the scan
                # looks like the constant) must not produce a huge, meaningless solution.
                if not (acc > 1e-12 * M[i, i] and M[i, i] > 0.0):
                    return False
                L[i, i] = 1.0 / math.sqrt(acc)
            else:
                L[i, j] = acc * L[j, j]
    return True


@_jit
def _cho_solve(L, k, b, out):
    """Solve (L L^T) out = b for the leading k x k block (L from :func:`_cholesky`)."""
    for i in range(k):
        acc = b[i]
        for t in range(i):
            acc -= L[i, t] * out[t]
        out[i] = acc * L[i, i]
    for i in range(k - 1, -1, -1):
        acc = out[i]
        for t in range(i + 1, k):
            acc -= L[t, i] * out[t]
        out[i] = acc * L[i, i]


@_jit
def _cov_from_cholesky(L, k, Linv, cov_diag) -> float:
    """Diagonal of (L L^T)^-1 into cov_diag[0:k]; returns the (0, 1) element.

    Uses the triangular inverse: cov = Linv^T Linv, so only the entries needed are formed.
    """
    for j in range(k):
        Linv[j, j] = L[j, j]
        for i in range(j + 1, k):
            acc = 0.0
            for t in range(j, i):
                acc -= L[i, t] * Linv[t, j]
            Linv[i, j] = acc * L[i, i]
    c01 = 0.0
    for j in range(k):
        acc = 0.0
        for i in range(j, k):
            acc += Linv[i, j] * Linv[i, j]
        cov_diag[j] = acc
    for i in range(1, k):
        c01 += Linv[i, 0] * Linv[i, 1]
    return c01


@_jit
def _solve_subset(G, n_lin, fixed, L, M, rhs, sol, c, bas) -> float:
    """Least squares over the linear parameters not in bit mask ``fixed`` (those are 0).

    Leaves the Cholesky factor of the free block in L, the free indices in bas[1:1+bas[0]] and
    the solution in c; returns the cost, or -1 if the free basis is singular.
    """
    k = 0
    for j in range(n_lin):
        c[j] = 0.0
        if not (fixed >> j) & 1:
            bas[1 + k] = j
            k += 1
    bas[0] = k
    for a in range(k):
        for b in range(k):
            M[a, b] = G[bas[1 + a], bas[1 + b]]
        rhs[a] = G[bas[1 + a], 7]
    if not _cholesky(M, k, L):
        return -1.0
    _cho_solve(L, k, rhs, sol)
    cost = G[7, 7]
    for a in range(k):
        c[bas[1 + a]] = sol[a]
        cost -= sol[a] * rhs[a]
    # The subtraction can go slightly negative by rounding on a perfect fit.
    return max(cost, 0.0)


@_jit
def _feasible(c) -> bool:
    return c[0] >= 0.0 and c[1] >= 0.0 and c[2] >= 0.0


@_jit
def _kkt_ok(G, n_lin, fixed, c) -> bool:
    """Optimality of a face: no parameter held at 0 would lower the cost by growing."""
    for j in range(3):
        if (fixed >> j) & 1:
            r = G[j, 7]
            for k in range(n_lin):
                r -= G[j, k] * c[k]
            if r > 1e-10 * math.sqrt(G[j, j] * G[7, 7]):
                return False
    return True


@_jit
def _linear_solve(G, n_lin, L, M, rhs, sol, c, bas, hint) -> float:
    """Linear parameters at fixed (mu, sigma) with background ends >= 0 and A >= 0.

    Exact non-negative least squares for the three constrained parameters (0, 1, 2).  The cost
    is convex, so a feasible face solution that passes the KKT test is the optimum.  Faces are
    tried in order: the face of the previous iterate (``hint``), the unconstrained solution,
    the face fixing its negative parameters; if none qualifies, the best feasible one of the 7
    faces is taken.  The mask of parameters held at 0 is left in bas[5].  Returns the cost, or
    -1 if no face is feasible.  (One call site of _solve_subset keeps the compiled code small.)
    """
    neg = 0
    best = -1.0
    best_mask = -1
    for stage in range(11):
        if stage == 0:
            mask = hint
        elif stage == 1:
            mask = 0
        elif stage == 2:
            mask = neg
        elif stage < 10:
            mask = stage - 2  # 1..7: enumeration
        else:
            mask = best_mask  # re-solve the best face to leave its state behind
        if mask < 0 or (mask == 0 and stage != 1) or (stage == 2 and mask == hint):
            if stage == 10:
                return -1.0
            continue
        cost = _solve_subset(G, n_lin, mask, L, M, rhs, sol, c, bas)
        if stage == 1 and cost >= 0.0:
            for j in range(3):
                if c[j] < 0.0:
                    neg |= 1 << j
        if cost < 0.0 or not _feasible(c):
            continue
        if stage == 10 or stage == 1 or (stage < 3 and _kkt_ok(G, n_lin, mask, c)):
            bas[5] = mask
            return cost
        if stage >= 3 and (best_mask < 0 or cost < best):
            best = cost
            best_mask = mask
    return -1.0


@_jit
def _reduced_system(G, n_lin, L, c, bas, sg, s, Ga_m, Ga_s, tmp, v_m, v_s, S, g):
    """Normal equations of the (mu, sigma) step with the free linear parameters projected out.

    d f/d mu = -C*P - sg*A*q - sg*C*q*d and d f/d sigma = -sg*(A*q*d + C*q*d^2)/s are sparse
    combinations of the Gram functions (columns 2, 4, 5 and 5, 6), so J^T W F = G a costs five
    columns.  Ga_m, Ga_s [8] = G a; S[0:3] = Schur complement (mm, ms, ss); S[3:6] = the
    unprojected J^T W J; g = J^T W r.
    """
    A = c[2]
    C = c[3] if n_lin == 4 else 0.0
    am2 = -C
    am4 = -sg * A
    am5 = -sg * C
    as5 = -sg * A / s
    as6 = -sg * C / s
    for i in range(8):
        Ga_m[i] = am2 * G[i, 2] + am4 * G[i, 4] + am5 * G[i, 5]
        Ga_s[i] = as5 * G[i, 5] + as6 * G[i, 6]
    jj_mm = am2 * Ga_m[2] + am4 * Ga_m[4] + am5 * Ga_m[5]
    jj_ms = am2 * Ga_s[2] + am4 * Ga_s[4] + am5 * Ga_s[5]
    jj_ss = as5 * Ga_s[5] + as6 * Ga_s[6]
    # J^T W r with r = y - B c (fixed parameters have c = 0 and drop out).
    gm = Ga_m[7]
    gs = Ga_s[7]
    for k in range(n_lin):
        gm -= c[k] * Ga_m[k]
        gs -= c[k] * Ga_s[k]
    S[3] = jj_mm
    S[4] = jj_ms
    S[5] = jj_ss
    k = bas[0]
    for a in range(k):
        tmp[a] = Ga_m[bas[1 + a]]
    _cho_solve(L, k, tmp, v_m)
    for a in range(k):
        tmp[a] = Ga_s[bas[1 + a]]
    _cho_solve(L, k, tmp, v_s)
    for a in range(k):
        jm = Ga_m[bas[1 + a]]
        js = Ga_s[bas[1 + a]]
        jj_mm -= jm * v_m[a]
        jj_ms -= jm * v_s[a]
        jj_ss -= js * v_s[a]
    S[0] = jj_mm
    S[1] = jj_ms
    S[2] = jj_ss
    g[0] = gm
    g[1] = gs


@_jit
def _crossing(u, v, level) -> float:
    """Position where a rising, noisy curve v(u) crosses level.

    Counting the points below the level (instead of searching the first crossing) makes a single
    noise spike in the baseline irrelevant.
    """
    n = u.shape[0]
    k = 0
    for i in range(n):
        if v[i] < level:
            k += 1
    if k < 1:
        k = 1
    if k > n - 1:
        k = n - 1
    lo = v[k - 1]
    hi = v[k]
    if hi > lo:
        f = (level - lo) / (hi - lo)
        f = min(max(f, 0.0), 1.0)
    else:
        f = 0.5
    return u[k - 1] + f * (u[k] - u[k - 1])


@_jit
def _initial_guess(u, y, sg, v, out):
    """Data-driven start in the kernel's units: out = [mu, sigma, baseline, amplitude].

    Baseline and plateau are the means of the first and last ~10 % of the points (aare's
    RisingScurve::estimate_par); mu is the 50 % crossing and sigma = (x50 - x10) / 1.2816.
    """
    n = u.shape[0]
    nb = max(1, int(round(0.1 * n)))
    for i in range(n):
        v[i] = sg * y[i]
    b = 0.0
    t = 0.0
    for i in range(nb):
        b += v[i]
        t += v[n - 1 - i]
    b /= nb
    t /= nb
    amp = t - b
    span = u[n - 1] - u[0]
    if amp > 0.0:
        x10 = _crossing(u, v, b + 0.1 * amp)
        x50 = _crossing(u, v, b + 0.5 * amp)
        mu = x50
        # From the lower half only: a post-step slope (C > 0) inflates the plateau estimate
        # and pushes x90 out, while x10..x50 stay on the erf.  1.2816 = Phi^-1(0.9).
        sigma = (x50 - x10) / 1.2816
    else:
        # No visible step in the expected direction: start in the middle; the fit will most
        # likely end FAILED, which is the right answer for such a pixel.
        mu = 0.5 * (u[0] + u[n - 1])
        sigma = 0.125 * span
    out[0] = mu
    out[1] = sigma
    # Baseline/amplitude in the model's sense for either direction.
    out[2] = sg * b if sg > 0 else sg * t
    out[3] = abs(amp)


@_jit
def _fit_pixel(u, ulo, uhi, y, sg, n_lin, weighting, m0, s0, m_lo, m_hi, s_lo, s_hi, max_iter,
               tol, min_sig, max_chi2, xc, xh, out, ws, G, Gt, L, Lt, M, c, ct, bas, bast, v8):
    """Fit one pixel from the start (m0, s0) in kernel units.

    Writes x-unit results into out[0:13]; returns (status, model passes).

    Scratch: ws [3, n] weights, guess scratch, fitted data; G, Gt, L, Lt [8, 8] Gram matrices
    and Cholesky factors of the current and trial states, M [8, 8] a work matrix; c, ct [8] and
    bas, bast [6] their linear solutions, free sets and active masks; v8 [9, 8] small vectors.
    """
    n = u.shape[0]
    w = ws[0]
    for j in range(_N_OUT):
        out[j] = np.nan

    total = 0.0
    for i in range(n):
        total += y[i]
    if not total > 0.0:
        return _ST_SKIPPED, 0

    rhs = v8[0]
    sol = v8[1]
    Ga_m = v8[2]
    Ga_s = v8[3]
    tmp = v8[4]
    v_m = v8[5]
    v_s = v8[6]
    S = v8[7]
    g = v8[8]

    # Weights and fitted data, and the Gram entries that do not depend on (mu, sigma).
    yf = ws[2]
    s00 = s01 = s11 = s07 = s17 = s77 = 0.0
    for i in range(n):
        yr = y[i]
        if weighting == _W_MIGHELL:
            yi = yr + min(yr, 1.0)
            wi = 1.0 / (yr + 1.0)
        elif weighting == _W_NEYMAN:
            yi = yr
            wi = 1.0 / max(yr, 1.0)
        else:
            yi = yr
            wi = 1.0
        w[i] = wi
        yf[i] = yi
        lo = ulo[i]
        hi = uhi[i]
        s00 += wi * lo * lo
        s01 += wi * lo * hi
        s11 += wi * hi * hi
        s07 += wi * lo * yi
        s17 += wi * hi * yi
        s77 += wi * yi * yi
    for Mx in (G, Gt):
        Mx[0, 0] = s00
        Mx[0, 1] = Mx[1, 0] = s01
        Mx[1, 1] = s11
        Mx[0, 7] = Mx[7, 0] = s07
        Mx[1, 7] = Mx[7, 1] = s17
        Mx[7, 7] = s77
    # Cost of the (unconstrained) straight line alone: reference of the step-significance test.
    cost_line = s77 - (s11 * s07 * s07 - 2.0 * s01 * s07 * s17 + s00 * s17 * s17) / (
        s00 * s11 - s01 * s01
    )

    m = min(max(m0, m_lo), m_hi)
    s = min(max(s0, s_lo), s_hi)
    mt = m
    st = s
    cost = -1.0
    lam = _LAM0
    converged = False
    passes = 0
    # One evaluation site for the model (the first pass evaluates the start): the inlined
    # Gram loop and NNLS are large, and every extra call site costs compile time.
    while passes < max_iter:
        _gram(u, ulo, uhi, yf, w, mt, st, sg, Gt)
        cost_t = _linear_solve(Gt, n_lin, Lt, M, rhs, sol, ct, bast, bas[5] if passes > 0 else 0)
        passes += 1
        if cost_t >= 0.0 and (passes == 1 or cost_t <= cost):
            # Accept: the trial state becomes the current one.
            G, Gt = Gt, G
            L, Lt = Lt, L
            c, ct = ct, c
            bas, bast = bast, bas
            m = mt
            s = st
            cost = cost_t
            if passes > 1:
                lam = max(lam * 0.1, _LAM_MIN)
            _reduced_system(G, n_lin, L, c, bas, sg, s, Ga_m, Ga_s, tmp, v_m, v_s, S, g)
        elif passes == 1:
            return _ST_FAILED, passes  # no feasible linear solution at the start
        else:
            lam *= 10.0
            if lam > _LAM_MAX:
                # No descent even for a tiny gradient step: numerically at the minimum.
                converged = True
                break
        # Next damped Gauss-Newton step from the current state.
        a = S[0] * (1.0 + lam)
        dd = S[2] * (1.0 + lam)
        b = S[1]
        det = a * dd - b * b
        if not (S[0] > 0.0 and S[2] > 0.0 and det > 0.0):
            # Flat direction: the data no longer constrain mu or sigma (e.g. A = 0).
            break
        dm = (dd * g[0] - b * g[1]) / det
        ds = (a * g[1] - b * g[0]) / det
        mt = min(max(m + dm, m_lo), m_hi)
        st = min(max(s + ds, s_lo), s_hi)
        if abs(mt - m) <= tol * s and abs(st - s) <= tol * s:
            # Converged.  Take this last, small step without another pass: the free linear
            # parameters follow to first order, dc = -(B^T W B)^-1 B^T W J dtheta (= v).
            dm = mt - m
            ds = st - s
            for a in range(bas[0]):
                j = bas[1 + a]
                c[j] -= v_m[a] * dm + v_s[a] * ds
                if j < 3:
                    c[j] = max(c[j], 0.0)
            m = mt
            s = st
            converged = True
            break

    # Covariance from the normal matrix of all parameters [linear..., mu, sigma]:
    # N = [[B^T W B, B^T W J], [J^T W B, J^T W J]], all at hand for the current state.  It is
    # the local curvature whether or not a constraint is active (as curve_fit reports it).
    npar = n_lin + 2
    N = M
    for i in range(n_lin):
        for j in range(n_lin):
            N[i, j] = G[i, j]
        N[i, n_lin] = N[n_lin, i] = Ga_m[i]
        N[i, n_lin + 1] = N[n_lin + 1, i] = Ga_s[i]
    N[n_lin, n_lin] = S[3]
    N[n_lin, n_lin + 1] = N[n_lin + 1, n_lin] = S[4]
    N[n_lin + 1, n_lin + 1] = S[5]
    chi2 = cost / (n - npar)
    # Errors: inverse normal matrix, inflated by sqrt(chi2) when the scatter exceeds Poisson.
    # Unweighted fits are always scaled by the residual variance (chi2 is then in counts^2).
    scale = max(chi2, 1.0) if weighting != _W_NONE else chi2
    Lc = Lt  # the trial factor and Gt are free now; Gt serves as the inverse factor
    cov_ok = _cholesky(N, npar, Lc)
    var = tmp
    v01 = _cov_from_cholesky(Lc, npar, Gt, var) if cov_ok else 0.0

    # Back to x units.  Background b0*(1-u)/2 + b1*(1+u)/2 = p0 + p1*x with u = (x - xc)/xh.
    k = xc / xh
    ka = 0.5 * (1.0 + k)
    kb = 0.5 * (1.0 - k)
    A = c[2]
    C = c[3] if n_lin == 4 else 0.0
    out[0] = ka * c[0] + kb * c[1]
    out[1] = 0.5 * (c[1] - c[0]) / xh
    out[2] = xc + xh * m
    out[3] = xh * s
    out[4] = A
    out[5] = C / xh
    out[12] = chi2
    if cov_ok:
        var_p0 = ka * ka * var[0] + kb * kb * var[1] + 2.0 * ka * kb * v01
        var_p1 = 0.25 * (var[0] + var[1] - 2.0 * v01)
        out[6] = math.sqrt(max(var_p0, 0.0) * scale)
        out[7] = math.sqrt(max(var_p1, 0.0) * scale) / xh
        out[8] = math.sqrt(var[n_lin] * scale) * xh
        out[9] = math.sqrt(var[n_lin + 1] * scale) * xh
        out[10] = math.sqrt(var[2] * scale)
        out[11] = math.sqrt(var[3] * scale) / xh if n_lin == 4 else 0.0

    if not (converged and cov_ok):
        return _ST_FAILED, passes
    span = m_hi - m_lo
    if m <= m_lo + 1e-6 * span or m >= m_hi - 1e-6 * span:
        return _ST_FAILED, passes
    if s <= s_lo * (1.0 + 1e-6) or s >= s_hi * (1.0 - 1e-6):
        return _ST_FAILED, passes
    # A step that is absent makes mu and sigma meaningless.  "Absent" is a likelihood-ratio
    # test against the straight line: the step must lower the chi-square by min_sig^2 (in units
    # of the per-point scatter).  A/A_err would be the wrong test: with C free, A is poorly
    # known when mu is near the end of the scan although the step is obvious.
    if not A > 0.0:
        return _ST_FAILED, passes
    if not (cost_line - cost) >= min_sig * min_sig * scale:
        return _ST_FAILED, passes
    if weighting != _W_NONE and max_chi2 > 0.0 and not chi2 <= max_chi2:
        return _ST_FAILED, passes
    for j in range(_N_OUT):
        if not math.isfinite(out[j]):
            return _ST_FAILED, passes
    return _ST_OK, passes


@_jit_parallel
def _fit_kernel(u, Y, skip, sg, n_lin, weighting, m_lo, m_hi, s_lo, s_hi, max_iter, tol,
                min_sig, max_chi2, xc, xh, res):
    """Fit all pixels of Y [npix, n] in parallel into res [npix] (records of SCURVE_DTYPE)."""
    npix, n = Y.shape
    ulo = 0.5 * (1.0 - u)
    uhi = 0.5 * (1.0 + u)
    nblocks = (npix + _BLOCK - 1) // _BLOCK
    for blk in prange(nblocks):
        # Scratch shared by the pixels of this block (allocation per pixel would dominate).
        ws = np.empty((3, n))
        G = np.zeros((8, 8))
        Gt = np.zeros((8, 8))
        L = np.zeros((8, 8))
        Lt = np.zeros((8, 8))
        M = np.zeros((8, 8))
        c = np.zeros(8)
        ct = np.zeros(8)
        bas = np.zeros(6, dtype=np.int64)
        bast = np.zeros(6, dtype=np.int64)
        v8 = np.zeros((9, 8))
        guess = np.zeros(4)
        o = np.empty(_N_OUT)
        start = blk * _BLOCK
        stop = min(npix, start + _BLOCK)
        for p in range(start, stop):
            passes = 0
            if skip[p]:
                for j in range(_N_OUT):
                    o[j] = np.nan
                st = _ST_SKIPPED
            else:
                y = Y[p]
                _initial_guess(u, y, sg, ws[1], guess)
                # A start far from the optimum can end on a wrong face (A = 0, sigma at a
                # bound); retrying from a narrower and a wider sigma rescues those rare pixels.
                for attempt in range(3):
                    s0 = guess[1] * (1.0, 0.5, 2.0)[attempt]
                    st, it = _fit_pixel(u, ulo, uhi, y, sg, n_lin, weighting, guess[0], s0,
                                        m_lo, m_hi, s_lo, s_hi, max_iter, tol, min_sig,
                                        max_chi2, xc, xh, o, ws, G, Gt, L, Lt, M, c, ct, bas,
                                        bast, v8)
                    passes += it
                    if st != _ST_FAILED:
                        break
            r = res[p]
            r.p0 = o[0]
            r.p1 = o[1]
            r.mu = o[2]
            r.sigma = o[3]
            r.A = o[4]
            r.C = o[5]
            r.p0_err = o[6]
            r.p1_err = o[7]
            r.mu_err = o[8]
            r.sigma_err = o[9]
            r.A_err = o[10]
            r.C_err = o[11]
            r.chi2 = o[12]
            r.status = st
            r.n_iter = min(passes, 255)


@_jit
def _guess_kernel(u, Y, sg, out):
    """Initial guesses for all pixels of Y [npix, n]: out [npix, 4] = mu, sigma, base, amp."""
    v = np.empty(Y.shape[1])
    for p in range(Y.shape[0]):
        _initial_guess(u, Y[p], sg, v, out[p])


# ----------------------------------------------------------------------------------------------
# Python drivers
# ----------------------------------------------------------------------------------------------

# The workqueue threading layer aborts on concurrent parallel launches from several Python
# threads (e.g. a threaded dask worker); each launch already uses every core, so serialise.
_KERNEL_LOCK = threading.Lock()

_DEFAULT_CHUNK_PIXELS = 1 << 16  # 64 Ki pixels x 51 points x 8 B = 27 MB of float64 per chunk


def _validate_x(x: ArrayLike, name: str = "x") -> NDArray[np.float64]:
    xa = np.asarray(x, dtype=np.float64)
    if xa.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {xa.shape}")
    if xa.size < 8:
        raise ValueError(f"{name} has {xa.size} points; at least 8 are needed to fit 6 parameters")
    if not np.all(np.isfinite(xa)):
        raise ValueError(f"{name} contains NaN or infinite values")
    if not np.all(np.diff(xa) > 0):
        raise ValueError(f"{name} must be strictly increasing")
    return xa


def _validate_counts(counts: ArrayLike, n_points: int, name: str = "counts") -> np.ndarray:
    ca = counts if isinstance(counts, np.ndarray) else np.asarray(counts)
    if ca.ndim != 3:
        raise ValueError(f"{name} must be [rows, cols, n_points], got shape {ca.shape}")
    if ca.shape[2] != n_points:
        raise ValueError(
            f"{name} has {ca.shape[2]} points per pixel but x has {n_points}; "
            f"the last axis of {name} must match x"
        )
    if ca.dtype.kind not in "iuf":
        raise ValueError(f"{name} must have an integer or float dtype, got {ca.dtype}")
    if ca.size:
        # min()/max() are reductions: no full-size temporary, unlike np.isnan(ca).any().
        # NaN propagates through min(), so one pass finds NaN and negatives.
        if ca.dtype.kind in "if":
            lo = ca.min()
            if np.isnan(lo):
                raise ValueError(f"{name} contains NaN")
            if lo < 0:
                raise ValueError(f"{name} contains negative values (min {lo}); counts are >= 0")
        if ca.dtype.kind == "f" and not np.isfinite(ca.max()):
            raise ValueError(f"{name} contains infinite values")
    return ca


def _validate_mask(mask: ArrayLike | None, shape: tuple[int, int]) -> NDArray[np.bool_] | None:
    if mask is None:
        return None
    ma = np.asarray(mask)
    if ma.shape != shape:
        raise ValueError(f"mask must have shape {shape} (rows, cols), got {ma.shape}")
    if ma.dtype != np.bool_:
        if ma.dtype.kind not in "iu":
            raise ValueError(f"mask must be boolean (True = excluded pixel), got dtype {ma.dtype}")
        ma = ma != 0
    return np.ascontiguousarray(ma)


def _rows_per_chunk(chunk_pixels: int | None, cols: int) -> int:
    if chunk_pixels is None:
        chunk_pixels = _DEFAULT_CHUNK_PIXELS
    if chunk_pixels < 1:
        raise ValueError(f"chunk_pixels must be >= 1, got {chunk_pixels}")
    return max(1, int(chunk_pixels) // max(cols, 1))


def _run_fit(
    xa: NDArray[np.float64],
    counts: np.ndarray,
    mask: NDArray[np.bool_] | None,
    *,
    falling: bool,
    n_lin: int,
    weighting: int,
    mu_bounds: tuple[float, float],
    sigma_bounds: tuple[float, float],
    min_significance: float,
    max_chi2: float | None,
    max_iter: int,
    tol: float,
    chunk_pixels: int | None,
    n_threads: int | None,
) -> NDArray[np.void]:
    """Chunked driver: fits counts [rows, cols, n] into a [rows, cols] SCURVE_DTYPE array."""
    rows, cols, n = counts.shape
    # Work in u = (x - xc)/xh in [-1, 1]: keeps the Gram matrix well conditioned (x^2 ~ 4e6).
    xc = 0.5 * (xa[0] + xa[-1])
    xh = 0.5 * (xa[-1] - xa[0])
    u = (xa - xc) / xh
    m_lo, m_hi = ((mu_bounds[0] - xc) / xh, (mu_bounds[1] - xc) / xh)
    s_lo, s_hi = sigma_bounds[0] / xh, sigma_bounds[1] / xh
    res = np.empty((rows, cols), dtype=SCURVE_DTYPE)
    if res.size == 0:
        return res
    step = min(_rows_per_chunk(chunk_pixels, cols), rows)
    # One float64 buffer for all chunks: the only copy of the data ever made (and reusing it
    # avoids paying page faults on a fresh allocation per chunk).
    buf = np.empty((step, cols, n), dtype=np.float64)
    no_mask = np.zeros(step * cols, dtype=np.bool_)
    sg = -1.0 if falling else 1.0
    max_chi2_v = float(max_chi2) if max_chi2 is not None else -1.0

    prev_threads = numba.get_num_threads()
    with _KERNEL_LOCK:
        if n_threads is not None:
            numba.set_num_threads(max(1, min(int(n_threads), numba.config.NUMBA_NUM_THREADS)))
        # Dynamic scheduling in small chunks of blocks: with a static split, a thread that the
        # OS deschedules (a busy machine) leaves the others waiting at the end of each chunk.
        prev_chunk = numba.set_parallel_chunksize(4)
        try:
            for r0 in range(0, rows, step):
                r1 = min(rows, r0 + step)
                Yc = buf[: r1 - r0]
                np.copyto(Yc, counts[r0:r1])
                k = (r1 - r0) * cols
                skip = mask[r0:r1].reshape(-1) if mask is not None else no_mask[:k]
                _fit_kernel(
                    u, Yc.reshape(k, n), skip, sg, n_lin, weighting, m_lo, m_hi, s_lo, s_hi,
                    int(max_iter), float(tol), float(min_significance), max_chi2_v, xc, xh,
                    res[r0:r1].reshape(k),
                )
        finally:
            numba.set_parallel_chunksize(prev_chunk)
            if n_threads is not None:
                numba.set_num_threads(prev_threads)
    return res


def _default_sigma_bounds(xa: NDArray[np.float64]) -> tuple[float, float]:
    # Below ~1/4 of a scan step the erf is a step between two samples and mu is undetermined;
    # above half the span the "step" is indistinguishable from the linear background.
    step = float(np.median(np.diff(xa)))
    span = float(xa[-1] - xa[0])
    return 0.25 * step, 0.5 * span


def fit_scurves(
    x: ArrayLike,
    counts: ArrayLike,
    mask: ArrayLike | None = None,
    *,
    falling: bool = False,
    weighting: Literal["poisson", "neyman", "none"] = "poisson",
    chunk_pixels: int | None = None,
    mu_margin: float = 0.1,
    sigma_bounds: tuple[float, float] | None = None,
    min_significance: float = 5.0,
    max_chi2: float | None = 20.0,
    max_iter: int = 40,
    tol: float = 1e-2,
    n_threads: int | None = None,
) -> NDArray[np.void]:
    """Fit PSI's S-curve model to every pixel of a threshold scan.

    Parameters
    ----------
    x : [n_points] scanned setting (e.g. vthreshold in DAC units), strictly increasing.
    counts : [rows, cols, n_points] counts per pixel and step; any integer or float dtype.
        Converted to float64 one chunk of rows at a time, never as a whole.
    mask : [rows, cols] bool, True = pixel excluded (reported SKIPPED).
    falling : fit :func:`scurve_falling` (``1 - erf``) instead of the rising curve.
    weighting : "poisson" (default): Mighell's chi-square-gamma, data y + min(y, 1) with
        weights 1/(y + 1), nearly unbiased for Poisson counts; "neyman": weights
        1/max(y, 1); "none": unweighted (errors scaled by the residual variance).
    chunk_pixels : pixels per chunk (rounded down to whole rows, at least one row); bounds the
        extra memory to about chunk_pixels * n_points * 8 bytes. Default 65536.
    mu_margin : mu is bounded to [x[0] - m*span, x[-1] + m*span] with m = mu_margin.
    sigma_bounds : (lo, hi) for sigma in x units; default (step/4, span/2).
    min_significance : a fit is FAILED unless the step lowers the chi-square, relative to a
        straight line p0 + p1*x, by at least min_significance**2 (times the reduced chi2 when
        that exceeds 1): a likelihood-ratio significance of the step in standard deviations.
    max_chi2 : a fit is FAILED if its reduced chi2 exceeds this (None disables the test).
    max_iter : maximum number of model evaluations per pixel.
    tol : converged when the proposed (mu, sigma) step is below tol * sigma; that last step is
        applied without another model evaluation (linear parameters to first order), so the
        remaining error is second order in it (~1e-4 sigma for the default).
    n_threads : numba threads for this call (default: numba's current setting).

    Returns
    -------
    Structured array [rows, cols] of :data:`SCURVE_DTYPE`: p0, p1, mu, sigma, A, C, their
    ``*_err`` (1-sigma from the covariance of all six parameters, scaled up by sqrt(chi2) when
    chi2 > 1), ``chi2`` (reduced chi-square of the weighted fit, ~1 for a good fit),
    ``status`` (:class:`FitStatus`) and
    ``n_iter``.  SKIPPED pixels (masked or zero total counts) have NaN parameters; FAILED
    pixels keep the parameters of their last iterate for inspection but must not be used.

    Raises
    ------
    ValueError
        If shapes do not match, counts contain NaN, inf or negative values, or x is not a
        strictly increasing 1-D array of at least 8 finite points.
    """
    xa = _validate_x(x)
    ca = _validate_counts(counts, xa.size)
    ma = _validate_mask(mask, ca.shape[:2])
    if weighting not in _WEIGHTINGS:
        raise ValueError(f"weighting must be one of {sorted(_WEIGHTINGS)}, got {weighting!r}")
    span = float(xa[-1] - xa[0])
    mu_bounds = (float(xa[0] - mu_margin * span), float(xa[-1] + mu_margin * span))
    sb = _default_sigma_bounds(xa) if sigma_bounds is None else tuple(map(float, sigma_bounds))
    if not (0 < sb[0] < sb[1]):
        raise ValueError(f"sigma_bounds must satisfy 0 < lo < hi, got {sb}")
    return _run_fit(
        xa, ca, ma, falling=falling, n_lin=4, weighting=_WEIGHTINGS[weighting],
        mu_bounds=mu_bounds, sigma_bounds=sb, min_significance=min_significance,
        max_chi2=max_chi2, max_iter=max_iter, tol=tol, chunk_pixels=chunk_pixels,
        n_threads=n_threads,
    )


def scurve_initial_guess(
    x: ArrayLike, counts: ArrayLike, *, falling: bool = False
) -> NDArray[np.float64]:
    """Data-driven start values of the S-curve parameters, as used by :func:`fit_scurves`.

    Returns [..., 6] = p0, p1, mu, sigma, A, C for counts [..., n_points]: p0 the baseline
    (mean of the first ~10 % of points, last for ``falling``), p1 = C = 0, A the plateau minus
    the baseline, mu the 50 % crossing, sigma = (x50 - x10)/1.2816 (x units).
    """
    xa = _validate_x(x)
    ca = np.asarray(counts)
    if ca.shape[-1] != xa.size:
        raise ValueError(f"counts has {ca.shape[-1]} points per pixel but x has {xa.size}")
    lead = ca.shape[:-1]
    Y = np.ascontiguousarray(ca, dtype=np.float64).reshape(-1, xa.size)
    xc = 0.5 * (xa[0] + xa[-1])
    xh = 0.5 * (xa[-1] - xa[0])
    g = np.empty((Y.shape[0], 4))
    with _KERNEL_LOCK:
        _guess_kernel((xa - xc) / xh, Y, -1.0 if falling else 1.0, g)
    res = np.zeros((Y.shape[0], 6))
    res[:, 0] = g[:, 2]
    res[:, 2] = xc + xh * g[:, 0]
    res[:, 3] = xh * g[:, 1]
    res[:, 4] = g[:, 3]
    return res.reshape(*lead, 6)


# ----------------------------------------------------------------------------------------------
# Trimbit scans
# ----------------------------------------------------------------------------------------------

# PSI searches the crossing on [-10, 74] for trimbits 0..63 (TF1::GetX in fit_trimbits).
_T_SEARCH = (-10.0, 74.0)


def _solve_crossing(
    p0: NDArray, p1: NDArray, mu: NDArray, sigma: NDArray, A: NDArray, target: NDArray
) -> NDArray[np.float64]:
    """t in [-10, 74] where the C = 0 rising model equals target (bisection, vectorised).

    Returns the search-interval end when the target is outside the curve's range there.
    """
    lo = np.full(p0.shape, _T_SEARCH[0])
    hi = np.full(p0.shape, _T_SEARCH[1])
    zero = np.zeros_like(p0)
    f_lo = scurve(lo, p0, p1, mu, sigma, A, zero) - target
    f_hi = scurve(hi, p0, p1, mu, sigma, A, zero) - target
    below = f_lo >= 0  # already above target at the low end
    above = f_hi <= 0  # never reaches the target
    rising = f_hi >= f_lo
    for _ in range(40):  # 84 / 2^40 ~ 1e-10 trimbit
        mid = 0.5 * (lo + hi)
        f_mid = scurve(mid, p0, p1, mu, sigma, A, zero) - target
        go_up = (f_mid < 0) == rising
        lo = np.where(go_up, mid, lo)
        hi = np.where(go_up, hi, mid)
    t = 0.5 * (lo + hi)
    t = np.where(below & ~above, _T_SEARCH[0], t)
    t = np.where(above & ~below, _T_SEARCH[1], t)
    return t


def fit_trimbit_scans(
    trimbits: ArrayLike,
    counts: ArrayLike,
    target: ArrayLike,
    mask: ArrayLike | None = None,
    *,
    chunk_pixels: int | None = None,
    min_significance: float = 5.0,
    max_chi2: float | None = 20.0,
    n_threads: int | None = None,
) -> NDArray[np.void]:
    """Per-pixel trimbit where the counts of a trimbit scan reach the pixel's target.

    As PSI's ``find_trimbits``: each pixel's counts vs trimbit are fitted with the rising
    S-curve with C fixed at 0 (counts rise with the trimbit), then f(t) = target is solved on
    [-10, 74] and the solution is rounded and clipped to 0..63.

    Parameters
    ----------
    trimbits : [n_points] trimbit codes scanned (e.g. ``np.arange(0, 64, 2)``), increasing.
    counts : [rows, cols, n_points] counts per pixel and trimbit, integer or float.
    target : [rows, cols] counts to reach per pixel; in the EIGER procedure p0 + p1*mu + A/2
        of the untrimmed S-curve fit.  NaN targets (pixels whose S-curve fit was not OK) give
        SKIPPED.
    mask : [rows, cols] bool, True = pixel excluded (SKIPPED).
    chunk_pixels, min_significance, max_chi2, n_threads : as in :func:`fit_scurves`.

    Returns
    -------
    Structured array [rows, cols] of :data:`TRIMBIT_DTYPE`: ``trimbit`` (int32 0..63, -1 when
    SKIPPED or FAILED), ``t_cross`` (unclipped crossing, trimbit units), ``target``, the C = 0
    fit parameters, ``chi2`` and ``status`` (OK, SKIPPED, FAILED, or CLIPPED when the crossing
    lies outside 0..63 and the trimbit was clipped to the nearest end).  When only a tail of
    the step is in the scan the fit is degenerate; if the first (last) ~10 % of the points are
    above (below) the target by more than 3 Poisson standard errors the pixel is CLIPPED to 0
    (63) from the data alone, with NaN fit parameters.
    """
    xa = _validate_x(trimbits, "trimbits")
    ca = _validate_counts(counts, xa.size)
    ta = np.asarray(target, dtype=np.float64)
    if ta.shape != ca.shape[:2]:
        raise ValueError(f"target must have shape {ca.shape[:2]} (rows, cols), got {ta.shape}")
    if np.any(np.isinf(ta)):
        raise ValueError("target contains infinite values")
    ma = _validate_mask(mask, ca.shape[:2])
    skip = ~np.isfinite(ta)
    if ma is not None:
        skip |= ma
    skip = np.ascontiguousarray(skip)
    span = float(xa[-1] - xa[0])
    # A pixel whose trimming point lies outside the scan still shows the tail of its step;
    # a wide mu range lets the fit follow it so that the clipped answer is supported by data.
    mu_bounds = (float(xa[0] - 0.5 * span), float(xa[-1] + 0.5 * span))
    fit = _run_fit(
        xa, ca, skip, falling=False, n_lin=3, weighting=_W_MIGHELL, mu_bounds=mu_bounds,
        sigma_bounds=_default_sigma_bounds(xa), min_significance=min_significance,
        max_chi2=max_chi2, max_iter=40, tol=1e-2, chunk_pixels=chunk_pixels,
        n_threads=n_threads,
    )
    status = fit["status"]
    res = np.empty(ca.shape[:2], dtype=TRIMBIT_DTYPE)
    for name in ("p0", "p1", "mu", "sigma", "A", "chi2", "status"):
        res[name] = fit[name]
    res["target"] = ta
    res["t_cross"] = np.nan
    res["trimbit"] = -1

    ok = status == _ST_OK
    if np.any(ok):
        f = fit[ok]
        t = _solve_crossing(f["p0"], f["p1"], f["mu"], f["sigma"], f["A"], ta[ok])
        res["t_cross"][ok] = t
        tb = np.rint(t)
        clipped = (tb < 0) | (tb > TRIMBIT_MAX)
        res["trimbit"][ok] = np.clip(tb, 0, TRIMBIT_MAX).astype(np.int32)
        st = res["status"][ok]
        st[clipped] = FitStatus.CLIPPED
        res["status"][ok] = st

    # A pixel whose trimming point lies well outside the scan shows only a tail of its step:
    # p0 and A are then degenerate and the fit fails, yet the data settle the answer.  If the
    # lowest (highest) trimbits already lie above (below) the target by more than three Poisson
    # standard errors, the trimbit is 0 (63), as PSI's clipped GetX would give.
    failed = np.nonzero(status == _ST_FAILED)
    if failed[0].size:
        n = xa.size
        nb = max(1, int(round(0.1 * n)))
        first = np.asarray(ca[failed[0], failed[1], :nb], dtype=np.float64).mean(axis=-1)
        last = np.asarray(ca[failed[0], failed[1], n - nb:], dtype=np.float64).mean(axis=-1)
        tf = ta[failed]
        noise = 3.0 * np.sqrt(np.maximum(tf, 1.0) / nb)
        low = first > tf + noise
        high = (last < tf - noise) & ~low
        for sel, code in ((low, 0), (high, TRIMBIT_MAX)):
            rr, cc = failed[0][sel], failed[1][sel]
            res["trimbit"][rr, cc] = code
            res["status"][rr, cc] = FitStatus.CLIPPED
            for name in ("p0", "p1", "mu", "sigma", "A", "chi2"):
                res[name][rr, cc] = np.nan
    return res
