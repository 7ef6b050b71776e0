# Long by design: every decision of PSI's trimming procedure as a pure function, in the procedure's order.
"""EIGER trimming and energy calibration: the decisions of PSI's procedure as pure functions.

The procedure (sls_detector_tools ``calibration.py``; reference/eiger.md section 1) in the order it
runs, with the function here that takes each decision from the scan's numbers:

1. vrf scan at vthreshold 1200 (1500 for gain0): per half module, the gradient of the summed counts
   peaks at the line's inflection; a Gaussian fitted to the gradient around the peak gives
   ``vrf = round(mu)``, and ``t = 1000 * t_scan / counts`` the exposure for ~1000 counts per pixel
   at the inflection (:func:`analyse_vrf_scan`).
2. S-curve (vthreshold 0..2000): per-pixel fit of PSI's model (the fitting engine of
   :mod:`calbench.analysis.scurve`), bad pixels (dead, hot, noisy, unfitted), each chip's vcmp =
   the mean inflection of its good pixels inside (100, 1900), each half module's vcp = the mean of
   its chips (:func:`analyse_scurve`).
3. Trimbit scan at those vcmp: every good pixel's trimbit is where its counts reach
   ``p0 + p1*mu + A/2``, its own S-curve's value at its inflection (:func:`analyse_trimbit_scan`).
   Masked pixels are never trimmed: they keep the trimbit of the untrimmed S-curve.
4. Energy calibration: per chip, the inflection of the summed S-curve at two or more XRF lines and a
   straight line ``E = p0 + p1*mu`` through them, i.e. ``vcmp = m - k*E[keV]`` with
   ``m = |p0/p1|``, ``k = |1/p1|`` (:func:`chip_inflections`, :func:`fit_energy_calibration`), and
   the threshold dispersion of the pixels in eV (:func:`threshold_dispersion`).

Counts are ``[rows, cols, n_points]`` (PSI's npz layout); a stack of frames ``[n, rows, cols]`` is
turned into that layout without a copy by :func:`counts_from_frames`. Everything is deterministic:
the same counts give bit-identical results, which is what makes a re-analysis from tiled agree
with the decisions taken during the procedure.

Pure numpy/scipy: no ophyd, bluesky RunEngine or caproto.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.optimize import OptimizeWarning, curve_fit

from calbench.contracts.xray import XRF_LINES_KEV  # PSI's rounded lines, kept as the lab has them
from calbench.contracts.eiger_geometry import EigerGeometry
from calbench.analysis.scurve import TRIMBIT_MAX, FitStatus, fit_scurves, fit_trimbit_scans

__all__ = [
    "XRF_LINES_KEV", "GLOBAL_TARGETS", "TARGET_GAINS", "DEFAULTS", "CalibrationDefaults",
    "CalibrationError", "default_gain", "vthreshold_for_gain", "line_energy",
    "counts_from_frames", "gauss", "fit_vrf_edge", "clean_vrf_counts", "VrfScanResult",
    "analyse_vrf_scan", "BadPixels", "find_bad_pixels", "chip_vcmp", "SCurveResult",
    "KeptSCurve", "analyse_scurve", "trimbit_targets", "TrimbitResult", "KeptTrimbits",
    "analyse_trimbit_scan",
    "TrimbitStatistics", "trimbit_statistics", "clean_chip_counts", "chip_sums", "ChipInflections", "chip_inflections",
    "EnergyCalibration", "fit_energy_calibration", "Dispersion", "threshold_dispersion",
    "chip_statistics", "CalibrationResults",
]

# The second energy point of the calibration for each trim target (config.py ``global_targets``).
GLOBAL_TARGETS: dict[str, tuple[str, ...]] = {
    "Sn": ("Ag",), "Ag": ("Sn",), "Mo": ("Ag",), "Zr": ("Mo",), "Ge": ("Cu",), "Cu": ("Ge",),
    "Fe": ("Cu",), "Cr": ("Fe",), "Ti": ("Cr",),
}
# PSI's gain plan: gain0 In (vcmp 1500); gain2..6 Ti, Cr, Fe, Cu, Ge; gain7..10 Zr, Mo, Ag, Sn.
TARGET_GAINS: dict[str, str] = {
    "In": "gain0", "Ti": "gain2", "Cr": "gain3", "Fe": "gain4", "Cu": "gain5", "Ge": "gain6",
    "Zr": "gain7", "Mo": "gain8", "Ag": "gain9", "Sn": "gain10",
}


@dataclass(frozen=True)
class CalibrationDefaults:
    """PSI's calibration settings (sls_detector_tools ``config.py``, class ``calibration``)."""
    vthreshold: int = 1200              # DAC: where the vrf scan puts the line's inflection
    vthreshold_gain0: int = 1500        # DAC: the same for gain0 (In)
    trimval: int = 32                   # trimbits of the untrimmed S-curve
    vtrim: int = 2500                   # DAC
    vrshaper: int = 1600                # DAC
    exptime_s: float = 3.0              # S-curve exposure until the vrf scan suggests one
    vrf_scan_exptime_s: float = 0.1
    nframes: int = 1
    period_s: float = 0.0
    dynamic_range: int = 32
    vrf_scan_dynamic_range: int = 16
    vrf_scan: tuple[int, int, int] = (1500, 3800, 30)      # np.arange(start, stop, step)
    scurve: tuple[int, int, int] = (0, 2001, 40)
    trimbit_step: int = 2
    target_counts: float = 1000.0       # counts per pixel wanted at the inflection
    clean_threshold: float = 500.0      # counts: floor of the "3 x median" outlier rule
    bad_pixel_std: float = 5.0          # standard deviations for the noisy-pixel rule
    mu_range: tuple[float, float] = (100.0, 1900.0)     # DAC: inflections used for the chip vcmp
    tau_ns: int = 200                   # rate-correction tau written into the trim files
    run_untrimmed: int = 0
    run_trimmed: int = 1


DEFAULTS = CalibrationDefaults()


class CalibrationError(ValueError):
    """The data cannot support a calibration decision; the message says why and what to do."""


def line_energy(target: str) -> float:
    """Energy (keV) of the XRF line of ``target``; ValueError naming the known targets."""
    try:
        return XRF_LINES_KEV[target]
    except KeyError:
        raise ValueError(f"unknown XRF target {target!r}; known targets: "
                         f"{', '.join(XRF_LINES_KEV)}") from None


def default_gain(target: str) -> str:
    """The gain (settings name) PSI calibrates with ``target``, e.g. 'Cu' -> 'gain5'."""
    line_energy(target)
    return TARGET_GAINS[target]


def vthreshold_for_gain(gain: str, defaults: CalibrationDefaults = DEFAULTS) -> int:
    """vthreshold (DAC) at which the vrf scan puts the line: 1500 for gain0, else 1200."""
    return defaults.vthreshold_gain0 if gain == "gain0" else defaults.vthreshold


def counts_from_frames(frames: ArrayLike) -> NDArray:
    """``[n, rows, cols]`` frames (one per scan point) as ``[rows, cols, n]`` counts (a view)."""
    a = np.asarray(frames)
    if a.ndim != 3:
        raise ValueError(f"frames must be [points, rows, cols], got shape {a.shape}")
    return np.moveaxis(a, 0, -1)


def _lazy(counts) -> bool:
    """A dask array (a large scan read block by block from its files, see
    eiger_callbacks.LazyFrames): computed on the dask cluster, never whole in this process."""
    return type(counts).__module__.startswith("dask.")


def compute(*lazy):
    """Dask collections computed together on the analysis cluster (scurve_dask.dask_client);
    imported here so that scans held in memory never import dask."""
    from calbench.analysis.scurve_dask import compute as on_cluster
    return on_cluster(*lazy)


def _check_scan(x: ArrayLike, counts: ArrayLike, what: str) -> tuple[NDArray, NDArray]:
    xa = np.asarray(x, dtype=np.float64)
    ca = counts if _lazy(counts) else np.asarray(counts)
    if xa.ndim != 1 or ca.ndim != 3 or ca.shape[-1] != xa.size:
        raise ValueError(f"{what}: counts must be [rows, cols, {xa.size}] for {xa.size} settings, "
                         f"got {ca.shape}")
    if xa.size < 8:
        raise CalibrationError(f"{what}: {xa.size} points are too few; a scan needs at least 8")
    return xa, ca


# ---------------------------------------------------------------------------------------------
# 1. vrf scan
# ---------------------------------------------------------------------------------------------

def gauss(x: ArrayLike, a: float, mu: float, sigma: float) -> NDArray[np.float64]:
    """``a * exp(-((x - mu)/sigma)^2 / 2)`` (PSI's ``gaus``)."""
    x = np.asarray(x, dtype=np.float64)
    return a * np.exp(-0.5 * ((x - mu) / sigma) ** 2)


def fit_vrf_edge(x: ArrayLike, y: ArrayLike) -> tuple[NDArray[np.float64], tuple[float, float]]:
    """Gaussian fit to the gradient of a vrf scan's summed counts around its peak.

    As PSI's ``_fit_and_plot_vrf_data``: the window is ``x[c-4] .. x[c+3]`` around the gradient's
    argmax ``c``. Returns ((a, mu, sigma), (x_lo, x_hi)); mu in the units of x (vrf DAC). Raises
    CalibrationError when the edge is not inside the scan (the gradient peaks at its ends)."""
    xa = np.asarray(x, dtype=np.float64)
    g = np.gradient(np.asarray(y, dtype=np.float64), xa)
    c = int(np.argmax(g))
    if not np.isfinite(g[c]) or g[c] <= 0:
        raise CalibrationError("the counts never rise during the vrf scan: no photons reached the "
                               "detector (shutter, target, tube current?) or the line is outside "
                               "the scan; check the beam and widen the vrf range")
    if c < 2 or c > xa.size - 3:
        raise CalibrationError(
            f"the vrf scan's edge is at its end (vrf {xa[c]:g}); the line's inflection is outside "
            f"{xa[0]:g}..{xa[-1]:g}: widen the scan in that direction")
    lo, hi = max(c - 4, 0), min(c + 3, xa.size - 1)
    xs, ys = xa[lo:hi + 1], g[lo:hi + 1]
    step = float(np.median(np.diff(xa)))
    try:
        # only the parameters are used (checked below); without a covariance scipy warns on the
        # operator's terminal about what changes nothing
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OptimizeWarning)
            par, _ = curve_fit(gauss, xs, ys, p0=(g[c], xa[c], 2.0 * step), maxfev=10000)
    except (RuntimeError, ValueError) as exc:
        raise CalibrationError(f"the Gaussian fit of the vrf edge near {xa[c]:g} failed ({exc}); "
                               "repeat the scan with a longer exposure") from None
    par[2] = abs(par[2])
    if not (xs[0] - 2 * step <= par[1] <= xs[-1] + 2 * step):
        raise CalibrationError(f"the vrf edge fit ended at {par[1]:.0f}, outside its window "
                               f"{xs[0]:g}..{xs[-1]:g}; repeat the scan with a longer exposure")
    return par, (float(xs[0]), float(xs[-1]))


def clean_vrf_counts(counts: ArrayLike, *, factor: float = 3.0, floor: float = 50.0
                     ) -> NDArray[np.bool_]:
    """Pixels to zero before fitting a vrf scan: above ``max(factor * median, floor)``.

    PSI applies this rule at every step. Inside the rising edge it then also removes pixels whose
    threshold is merely early (a quarter of a simulated module), which moves vrf by ~20 DAC; here
    it is applied at the first and last steps, where every good pixel sees the same (no photon,
    or the whole line), so it removes hot and flooding pixels only. Returns a [rows, cols] mask."""
    c = counts if _lazy(counts) else np.asarray(counts)
    ends = (c[:, :, 0], c[:, :, c.shape[-1] - 1])
    if _lazy(c):
        ends = compute(*ends)
    bad = np.zeros(c.shape[:2], dtype=bool)
    for frame in ends:
        bad |= frame > max(factor * float(np.median(frame)), floor)
    return bad


@dataclass(frozen=True)
class VrfScanResult:
    """Outcome of a vrf scan (units: vrf in DAC, counts per exposure, seconds).

    sums and gradient are [n_half_modules, n_points] of the cleaned counts; gauss is
    [n_half_modules, 3] (a, mu, sigma) and window [n_half_modules, 2] the fitted x range;
    counts_at_vrf is the mean counts per pixel at the step nearest each vrf."""
    x: NDArray[np.float64]
    sums: NDArray[np.float64]
    gradient: NDArray[np.float64]
    gauss: NDArray[np.float64]
    window: NDArray[np.float64]
    vrf: NDArray[np.int64]
    counts_at_vrf: NDArray[np.float64]
    scan_exptime_s: float
    exptime_s: float
    cleaned: NDArray[np.bool_]

    def summary(self) -> dict:
        """JSON-able numbers of the decision."""
        return {"vrf": [int(v) for v in self.vrf], "exptime_s": float(self.exptime_s),
                "counts_at_vrf": [float(c) for c in self.counts_at_vrf],
                "scan_exptime_s": float(self.scan_exptime_s),
                "cleaned_pixels": int(self.cleaned.sum())}


def analyse_vrf_scan(x: ArrayLike, counts: ArrayLike, geometry: EigerGeometry,
                     scan_exptime_s: float, *, target_counts: float = DEFAULTS.target_counts
                     ) -> VrfScanResult:
    """vrf per half module and the exposure for ``target_counts`` at the inflection.

    x: vrf settings (DAC, increasing); counts: [rows, cols, n] per pixel and setting, taken with
    ``scan_exptime_s`` seconds per point. The suggested exposure is PSI's
    ``target_counts * scan_exptime_s / min(mean counts per pixel at the step nearest each vrf)``,
    rounded to 0.1 ms, with each mean taken over its own half module (PSI averages the whole
    detector, mixing in the other half modules at a vrf that is not theirs)."""
    xa, ca = _check_scan(x, counts, "vrf scan")
    if ca.shape[:2] != geometry.shape:
        raise ValueError(f"vrf scan frames {ca.shape[:2]} do not match a {geometry.name} "
                         f"{geometry.shape}")
    cleaned = clean_vrf_counts(ca)
    n_hm = geometry.n_half_modules
    if _lazy(ca):
        import dask.array as da

        kept = da.where(da.from_array(~cleaned, chunks=ca.chunks[:2])[..., None], ca, 0)
        sums = np.array(compute(*[kept[geometry.half_module_slice(hm)].sum(
            axis=(0, 1), dtype=np.float64) for hm in range(n_hm)]))
    else:
        sums = np.empty((n_hm, xa.size))
        for hm in range(n_hm):
            rs, cs = geometry.half_module_slice(hm)
            block = ca[rs, cs, :]
            keep = ~cleaned[rs, cs]
            sums[hm] = block.sum(axis=(0, 1), dtype=np.float64) - block[~keep].sum(
                axis=0, dtype=np.float64)
    gradient = np.vstack([np.gradient(s, xa) for s in sums])
    gpar = np.empty((n_hm, 3))
    window = np.empty((n_hm, 2))
    vrf = np.empty(n_hm, dtype=np.int64)
    for hm in range(n_hm):
        try:
            gpar[hm], window[hm] = fit_vrf_edge(xa, sums[hm])
        except CalibrationError as exc:
            raise CalibrationError(f"half module {hm}: {exc}") from None
        vrf[hm] = int(np.round(gpar[hm, 1]))
    counts_at = np.empty(n_hm)
    for hm in range(n_hm):
        # the mean over the kept pixels of the step nearest vrf: their sum (exact in float64
        # for integer counts) over their number
        i = int(np.argmin(np.abs(xa - vrf[hm])))
        kept = int((~cleaned[geometry.half_module_slice(hm)]).sum())
        counts_at[hm] = float(sums[hm, i] / kept) if kept else 0.0
    if not np.all(counts_at > 0):
        raise CalibrationError("no counts at the vrf found; the line did not reach the detector")
    exptime = round(target_counts * scan_exptime_s / float(counts_at.min()), 4)
    return VrfScanResult(x=xa, sums=sums, gradient=gradient, gauss=gpar, window=window, vrf=vrf,
                         counts_at_vrf=counts_at, scan_exptime_s=float(scan_exptime_s),
                         exptime_s=exptime, cleaned=cleaned)


# ---------------------------------------------------------------------------------------------
# 2. S-curve: bad pixels, vcmp per chip, vcp per half module
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BadPixels:
    """Image-shaped masks of pixels that are not trimmed (True = bad).

    dead: no count in the whole scan; hot: counting at the scan's highest energy threshold
    (first point), where no photon passes; noisy: an S-curve width or inflection more than
    ``n_std`` robust standard deviations from its chip's; unfitted: the S-curve fit did not give
    usable parameters."""
    dead: NDArray[np.bool_]
    hot: NDArray[np.bool_]
    noisy: NDArray[np.bool_]
    unfitted: NDArray[np.bool_]

    @property
    def mask(self) -> NDArray[np.bool_]:
        return self.dead | self.hot | self.noisy | self.unfitted

    def counts(self) -> dict[str, int]:
        """Pixels per category (a pixel is counted in the first that applies) and in total."""
        out, seen = {}, np.zeros_like(self.dead)
        for name in ("dead", "hot", "noisy", "unfitted"):
            m = getattr(self, name) & ~seen
            out[name] = int(m.sum())
            seen |= m
        out["total"] = int(seen.sum())
        return out

    def codes(self) -> NDArray[np.uint8]:
        """One image: 0 good, 1 dead, 2 hot, 3 noisy, 4 unfitted (first category that applies)."""
        code = np.zeros(self.dead.shape, np.uint8)
        for value, name in ((4, "unfitted"), (3, "noisy"), (2, "hot"), (1, "dead")):
            code[getattr(self, name)] = value
        return code

    @classmethod
    def from_codes(cls, code: ArrayLike) -> "BadPixels":
        c = np.asarray(code)
        return cls(dead=c == 1, hot=c == 2, noisy=c == 3, unfitted=c == 4)


def _robust_outliers(values: NDArray, use: NDArray[np.bool_], n_std: float,
                     one_sided: bool) -> NDArray[np.bool_]:
    """values further than n_std robust standard deviations (1.4826 MAD) from the median of the
    pixels in ``use``; high side only when one_sided."""
    v = values[use]
    if v.size < 10:
        return np.zeros(values.shape, bool)
    med = float(np.median(v))
    mad = 1.4826 * float(np.median(np.abs(v - med)))
    if mad <= 0:
        return np.zeros(values.shape, bool)
    dev = (values - med) / mad
    out = dev > n_std if one_sided else np.abs(dev) > n_std
    return out & np.isfinite(values)


def find_bad_pixels(x: ArrayLike, counts: ArrayLike, fit: NDArray, geometry: EigerGeometry, *,
                    clean_threshold: float = DEFAULTS.clean_threshold,
                    n_std: float = DEFAULTS.bad_pixel_std) -> BadPixels:
    """Dead, hot, noisy and unfitted pixels of an S-curve (see :class:`BadPixels`).

    The hot rule is PSI's cleaning, ``counts > 3 * max(median, clean_threshold)``, at the first
    point; the width/inflection rule is PSI's ``generate_mask`` (``cfg.calibration.std`` = 5)
    with robust statistics per chip so that the outliers themselves do not widen it."""
    xa, ca = _check_scan(x, counts, "S-curve")
    total, first = ca.sum(axis=-1, dtype=np.float64), ca[:, :, 0]
    if _lazy(ca):
        total, first = compute(total, first)
    return _bad_pixels(total, first, fit, geometry, clean_threshold=clean_threshold, n_std=n_std)


def _bad_pixels(total: NDArray, first: NDArray, fit: NDArray, geometry: EigerGeometry, *,
                clean_threshold: float, n_std: float) -> BadPixels:
    """find_bad_pixels from each pixel's total counts and counts at the first point."""
    dead = total == 0

    # At the first point (highest energy threshold) no photon passes: whatever counts there is
    # hot. In the edge the rule would also catch pixels whose threshold is merely early, and at
    # the last point pixels with a low threshold meet the noise floor: both are good pixels.
    hot = first > 3.0 * max(float(np.median(first)), clean_threshold)
    ok = (fit["status"] == FitStatus.OK) & ~dead & ~hot
    noisy = np.zeros(first.shape, bool)
    for chip in range(geometry.n_chips):
        sl = geometry.chip_slice(chip)
        use = ok[sl]
        noisy[sl] |= _robust_outliers(fit["sigma"][sl], use, n_std, one_sided=True)
        noisy[sl] |= _robust_outliers(fit["mu"][sl], use, n_std, one_sided=False)
    unfitted = (fit["status"] != FitStatus.OK) & ~dead & ~hot & ~noisy
    return BadPixels(dead=dead, hot=hot & ~dead, noisy=noisy & ~dead & ~hot, unfitted=unfitted)


def chip_vcmp(mu: ArrayLike, good: ArrayLike, geometry: EigerGeometry, *,
              mu_range: tuple[float, float] = DEFAULTS.mu_range
              ) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Per-chip vcmp and per-half-module vcp (DAC) from the pixels' inflection points.

    As PSI's ``find_mean_and_set_vcmp``: vcmp = int(mean mu) over good pixels with
    mu_range[0] < mu < mu_range[1] (0 when a chip has none), vcp = int(mean of its chips' vcmp
    that are > 0). Raises CalibrationError when a half module has no usable chip."""
    m = np.asarray(mu, dtype=np.float64)
    g = np.asarray(good, dtype=bool)
    vcmp = np.zeros(geometry.n_chips, dtype=np.int64)
    for chip in range(geometry.n_chips):
        sl = geometry.chip_slice(chip)
        v = m[sl][g[sl]]
        v = v[(v > mu_range[0]) & (v < mu_range[1])]
        vcmp[chip] = int(v.mean()) if v.size else 0
    vcp = np.zeros(geometry.n_half_modules, dtype=np.int64)
    for hm in range(geometry.n_half_modules):
        chips = vcmp[4 * hm:4 * hm + 4]
        if not np.any(chips > 0):
            raise CalibrationError(
                f"half module {hm}: no chip has inflection points inside {mu_range[0]:g}.."
                f"{mu_range[1]:g} DAC; the vrf scan did not put the line at the threshold "
                "(repeat it) or the beam did not reach this half module")
        vcp[hm] = int(chips[chips > 0].mean())
    return vcmp, vcp


def chip_statistics(values: ArrayLike, good: ArrayLike, geometry: EigerGeometry
                    ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """(mean, standard deviation) per chip of an image-shaped quantity over the good pixels."""
    v = np.asarray(values, dtype=np.float64)
    g = np.asarray(good, dtype=bool) & np.isfinite(v)
    mean = np.full(geometry.n_chips, np.nan)
    std = np.full(geometry.n_chips, np.nan)
    for chip in range(geometry.n_chips):
        sl = geometry.chip_slice(chip)
        s = v[sl][g[sl]]
        if s.size:
            mean[chip], std[chip] = float(s.mean()), float(s.std())
    return mean, std


class _SCurveDecisions:
    """The numbers an S-curve decided, shared by the step's result and what the procedure keeps."""
    vcmp: NDArray[np.int64]
    vcp: NDArray[np.int64]
    mu_mean: NDArray[np.float64]
    mu_std: NDArray[np.float64]

    def summary(self) -> dict:
        return {"vcmp": [int(v) for v in self.vcmp], "vcp": [int(v) for v in self.vcp],
                "mu_mean": [float(v) for v in self.mu_mean],
                "mu_std": [float(v) for v in self.mu_std], "bad_pixels": self.bad.counts()}


@dataclass(frozen=True)
class SCurveResult(_SCurveDecisions):
    """A threshold scan's per-pixel fit (SCURVE_DTYPE, [rows, cols]), its bad pixels, the chip
    vcmp / half-module vcp it implies (DAC) and each chip's mean and spread of the inflection
    points of its good pixels (DAC)."""
    x: NDArray[np.float64]
    fit: NDArray
    bad: BadPixels
    vcmp: NDArray[np.int64]
    vcp: NDArray[np.int64]
    mu_mean: NDArray[np.float64]
    mu_std: NDArray[np.float64]

    @property
    def good(self) -> NDArray[np.bool_]:
        return ~self.bad.mask

    def trimbit_targets(self) -> NDArray[np.float64]:
        """The counts each good pixel must reach in a trimbit scan (:func:`trimbit_targets`)."""
        return trimbit_targets(self.fit, self.good)

    def kept(self, *, trimbit_targets: bool = False) -> "KeptSCurve":
        """What the procedure keeps once the step is done (see :class:`KeptSCurve`); with the
        trimbit scan's targets for the untrimmed S-curve."""
        return KeptSCurve(x=self.x, mu=self.fit["mu"].astype(np.float32),
                          bad_codes=self.bad.codes(), vcmp=self.vcmp, vcp=self.vcp,
                          mu_mean=self.mu_mean, mu_std=self.mu_std,
                          targets=self.trimbit_targets() if trimbit_targets else None)


@dataclass(frozen=True)
class KeptSCurve(_SCurveDecisions):
    """An S-curve as CalibrationResults keeps it: the decisions, the inflection map (DAC, float32),
    the bad-pixel codes (:meth:`BadPixels.codes`) and, for the untrimmed S-curve, the trimbit
    scan's targets (float64: the crossings are found on them). About 5 bytes a pixel (13 with the
    targets) where the fit map takes 106 (a 9M fit map is ~1 GB); every fit parameter is in the
    step's PSI fit file (``{det_id}_vcmp_{t}XRF_{run}_fit.npy``, ``np.load``)."""
    x: NDArray[np.float64]
    mu: NDArray[np.float32]
    bad_codes: NDArray[np.uint8]
    vcmp: NDArray[np.int64]
    vcp: NDArray[np.int64]
    mu_mean: NDArray[np.float64]
    mu_std: NDArray[np.float64]
    targets: NDArray[np.float64] | None = None

    @property
    def bad(self) -> BadPixels:
        return BadPixels.from_codes(self.bad_codes)

    @property
    def good(self) -> NDArray[np.bool_]:
        return self.bad_codes == 0

    def trimbit_targets(self) -> NDArray[np.float64]:
        if self.targets is None:
            raise CalibrationError("this S-curve was kept without the trimbit scan's targets; "
                                   "the trimbit scan is analysed with the untrimmed S-curve's")
        return self.targets


def analyse_scurve(x: ArrayLike, counts: ArrayLike, geometry: EigerGeometry, *,
                   mu_range: tuple[float, float] = DEFAULTS.mu_range,
                   clean_threshold: float = DEFAULTS.clean_threshold,
                   n_std: float = DEFAULTS.bad_pixel_std) -> SCurveResult:
    """Fit every pixel of a threshold scan and take PSI's per-chip decisions.

    x: vthreshold settings (DAC, increasing); counts: [rows, cols, n]."""
    xa, ca = _check_scan(x, counts, "S-curve")
    if ca.shape[:2] != geometry.shape:
        raise ValueError(f"S-curve frames {ca.shape[:2]} do not match a {geometry.name} "
                         f"{geometry.shape}")
    # No chi-square cut: pixels whose threshold is low meet the noise floor in the last points;
    # their inflection is still well measured, and broken fits are caught as outliers below.
    if _lazy(ca):      # per-pixel fits on the cluster, block by block; one read of the files
        from calbench.analysis.scurve_dask import fit_scurves_dask
        fit, total, first = compute(fit_scurves_dask(xa, ca, max_chi2=None),
                                    ca.sum(axis=-1, dtype=np.float64), ca[:, :, 0])
        bad = _bad_pixels(total, first, fit, geometry, clean_threshold=clean_threshold,
                          n_std=n_std)
    else:
        fit = fit_scurves(xa, ca, max_chi2=None)
        bad = find_bad_pixels(xa, ca, fit, geometry, clean_threshold=clean_threshold, n_std=n_std)
    good = ~bad.mask
    vcmp, vcp = chip_vcmp(fit["mu"], good, geometry, mu_range=mu_range)
    mean, std = chip_statistics(fit["mu"], good, geometry)
    return SCurveResult(x=xa, fit=fit, bad=bad, vcmp=vcmp, vcp=vcp, mu_mean=mean, mu_std=std)


# ---------------------------------------------------------------------------------------------
# 3. Trimbit scan
# ---------------------------------------------------------------------------------------------

def trimbit_targets(fit: NDArray, good: ArrayLike | None = None) -> NDArray[np.float64]:
    """Counts each pixel must reach in the trimbit scan: ``p0 + p1*mu + A/2`` (its S-curve at its
    inflection, PSI's ``scurve(mu, ...)``); NaN for pixels not OK or not good."""
    target = fit["p0"] + fit["p1"] * fit["mu"] + 0.5 * fit["A"]
    use = fit["status"] == FitStatus.OK
    if good is not None:
        use &= np.asarray(good, dtype=bool)
    return np.where(use & np.isfinite(target), target, np.nan)


class _TrimbitDecisions:
    """The numbers a trimbit scan decided, shared by the step's result and what is kept."""
    trimbits: NDArray[np.int32]
    trimmed: NDArray[np.bool_]
    clipped: NDArray[np.bool_]

    @property
    def on_rails(self) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
        """Pixels trimmed onto a rail: their trimming point lies below trimbit 0 (first mask) or
        above 63 (second), beyond what the trim DAC can reach; they sit on 0 or 63."""
        clipped = self.trimmed & self.clipped
        return clipped & (self.trimbits == 0), clipped & (self.trimbits == TRIMBIT_MAX)

    def summary(self) -> dict:
        t = self.trimbits[self.trimmed]
        low, high = self.on_rails
        return {"trimmed_pixels": int(self.trimmed.sum()),
                "untrimmed_pixels": int((~self.trimmed).sum()),
                "clipped_pixels": int(np.sum(self.clipped)),
                "rail_0_pixels": int(low.sum()), "rail_63_pixels": int(high.sum()),
                "mean_trimbit": float(t.mean()) if t.size else float("nan"),
                "std_trimbit": float(t.std()) if t.size else float("nan")}


@dataclass(frozen=True)
class TrimbitResult(_TrimbitDecisions):
    """Trimbits (int32 image 0..63) found by a trimbit scan, the per-pixel crossing fit
    (TRIMBIT_DTYPE), the targets (counts) and which pixels were trimmed; the others keep
    ``untrimmed`` (the trimval of the untrimmed S-curve)."""
    x: NDArray[np.float64]
    trimbits: NDArray[np.int32]
    fit: NDArray
    target: NDArray[np.float64]
    trimmed: NDArray[np.bool_]
    untrimmed: int

    @property
    def clipped(self) -> NDArray[np.bool_]:
        """Pixels whose crossing lies outside 0..63 (FitStatus.CLIPPED)."""
        return self.fit["status"] == FitStatus.CLIPPED

    def kept(self) -> "KeptTrimbits":
        """What the procedure keeps once the step is done (see :class:`KeptTrimbits`)."""
        return KeptTrimbits(x=self.x, trimbits=self.trimbits, trimmed=self.trimmed,
                            clipped=self.clipped, untrimmed=self.untrimmed)


@dataclass(frozen=True)
class KeptTrimbits(_TrimbitDecisions):
    """A trimbit scan as CalibrationResults keeps it: the trimbits, which pixels were trimmed and
    which clipped (6 bytes a pixel; the crossing fit, 69, is in the step's
    ``{det_id}_{t}XRF_{gain}.npz``)."""
    x: NDArray[np.float64]
    trimbits: NDArray[np.int32]
    trimmed: NDArray[np.bool_]
    clipped: NDArray[np.bool_]
    untrimmed: int


def analyse_trimbit_scan(trimbits: ArrayLike, counts: ArrayLike,
                         scurve_result: SCurveResult | KeptSCurve, *,
                         untrimmed: int = DEFAULTS.trimval) -> TrimbitResult:
    """Trimbit per pixel where its counts reach its target (PSI's ``find_and_write_trimbits``).

    trimbits: the scanned codes (e.g. 0, 2, ..., 62); counts: [rows, cols, n] taken at the chip
    vcmp of ``scurve_result`` (the untrimmed S-curve, or what the procedure keeps of it). Bad
    pixels and pixels whose crossing could not be found keep ``untrimmed``."""
    xa, ca = _check_scan(trimbits, counts, "trimbit scan")
    good = scurve_result.good
    if ca.shape[:2] != good.shape:
        raise ValueError(f"trimbit scan frames {ca.shape[:2]} do not match the S-curve "
                         f"{good.shape}")
    target = scurve_result.trimbit_targets()
    if _lazy(ca):
        from calbench.analysis.scurve_dask import dask_client, fit_trimbit_scans_dask
        # target and mask (~81 MB at 9M) go to the workers once, not inside the graph
        (fit,) = compute(fit_trimbit_scans_dask(xa, ca, target, mask=~good,
                                                client=dask_client()))
    else:
        fit = fit_trimbit_scans(xa, ca, target, mask=~good)
    trimmed = np.isin(fit["status"], (FitStatus.OK, FitStatus.CLIPPED)) & good
    tb = np.where(trimmed, fit["trimbit"], untrimmed).astype(np.int32)
    return TrimbitResult(x=xa, trimbits=tb, fit=fit, target=target, trimmed=trimmed,
                         untrimmed=int(untrimmed))


@dataclass(frozen=True)
class TrimbitStatistics:
    """Trimbits as PSI's trim files are compared, over every pixel given: mean and standard
    deviation (trimbits), pixels at 0 and at 63 (the rails, with their percentages of all
    pixels) and the mean per chip (chip order of the geometry)."""
    n_pixels: int
    mean: float
    std: float
    at_0: int
    at_63: int
    chip_mean: NDArray[np.float64]

    @property
    def percent_at_0(self) -> float:
        return 100.0 * self.at_0 / self.n_pixels

    @property
    def percent_at_63(self) -> float:
        return 100.0 * self.at_63 / self.n_pixels

    @property
    def chip_mean_range(self) -> float:
        """Largest difference between two chip means (trimbits)."""
        return float(np.ptp(self.chip_mean))

    def summary(self) -> dict:
        return {"pixels": self.n_pixels, "mean": self.mean, "std": self.std, "at_0": self.at_0,
                "at_63": self.at_63, "percent_at_0": self.percent_at_0,
                "percent_at_63": self.percent_at_63,
                "chip_mean": [float(v) for v in self.chip_mean],
                "chip_mean_range": self.chip_mean_range}

    def line(self) -> str:
        """One line for a terminal or a report."""
        return (f"trimbits mean {self.mean:.2f}, sd {self.std:.2f}, {self.percent_at_0:.3f} % "
                f"at 0, {self.percent_at_63:.3f} % at 63, chip means {self.chip_mean.min():.2f}"
                f"..{self.chip_mean.max():.2f} (range {self.chip_mean_range:.2f})")


def trimbit_statistics(trimbits: ArrayLike, geometry: EigerGeometry) -> TrimbitStatistics:
    """Statistics of an image-shaped trimbit array (every pixel, as in a trim file)."""
    tb = np.asarray(trimbits)
    if tb.shape != geometry.shape:
        raise ValueError(f"trimbits {tb.shape} do not match a {geometry.name} {geometry.shape}")
    tb = tb.astype(np.float64)
    chips = np.array([tb[geometry.chip_slice(c)].mean() for c in range(geometry.n_chips)])
    return TrimbitStatistics(n_pixels=int(tb.size), mean=float(tb.mean()), std=float(tb.std()),
                             at_0=int(np.sum(tb == 0)), at_63=int(np.sum(tb == TRIMBIT_MAX)),
                             chip_mean=chips)


# ---------------------------------------------------------------------------------------------
# 4. Energy calibration
# ---------------------------------------------------------------------------------------------

def clean_chip_counts(counts: ArrayLike, *, clean_threshold: float = DEFAULTS.clean_threshold
                      ) -> NDArray[np.bool_]:
    """[rows, cols, n] mask of counts to ignore in the per-chip sums: above
    ``3 * max(mean, clean_threshold)`` of their step (PSI's ``per_chip_global_calibration``)."""
    c = np.asarray(counts)
    out = np.empty(c.shape, dtype=bool)
    for i in range(c.shape[-1]):
        frame = c[:, :, i]
        out[:, :, i] = frame > 3.0 * max(float(frame.mean(dtype=np.float64)), clean_threshold)
    return out


def chip_sums(counts: ArrayLike, geometry: EigerGeometry, *,
              clean_threshold: float = DEFAULTS.clean_threshold) -> NDArray[np.float64]:
    """[n_chips, n] cleaned counts per chip and scan point."""
    if _lazy(counts):
        import dask.array as da

        (means,) = compute(counts.mean(axis=(0, 1), dtype=np.float64))
        limit = 3.0 * np.maximum(means, clean_threshold)
        kept = da.where(counts > limit, 0.0, counts.astype(np.float64))
        return np.array(compute(*[kept[geometry.chip_slice(chip)].sum(axis=(0, 1))
                                  for chip in range(geometry.n_chips)]))
    c = np.asarray(counts)
    drop = clean_chip_counts(c, clean_threshold=clean_threshold)
    out = np.empty((geometry.n_chips, c.shape[-1]))
    for chip in range(geometry.n_chips):
        sl = geometry.chip_slice(chip)
        block = np.asarray(c[sl], dtype=np.float64)
        out[chip] = np.where(drop[sl], 0.0, block).sum(axis=(0, 1))
    return out


@dataclass(frozen=True)
class ChipInflections:
    """Per-chip S-curve fit of the summed counts of one XRF line: x (DAC), sums [n_chips, n],
    fit (SCURVE_DTYPE, [n_chips]) and mu (DAC) per chip."""
    target: str
    energy_keV: float
    x: NDArray[np.float64]
    sums: NDArray[np.float64]
    fit: NDArray
    mu: NDArray[np.float64]


def chip_inflections(x: ArrayLike, counts: ArrayLike, geometry: EigerGeometry, target: str, *,
                     clean_threshold: float = DEFAULTS.clean_threshold) -> ChipInflections:
    """Inflection (DAC) of each chip's summed S-curve at ``target``'s line.

    As PSI's ``per_chip_global_calibration``: counts above 3 * max(mean, 500) are dropped, the
    chip sums are fitted with the S-curve model up to vthreshold 2400 (1800 for Ag, whose
    line sits low)."""
    xa, ca = _check_scan(x, counts, f"{target} threshold scan")
    sums = chip_sums(ca, geometry, clean_threshold=clean_threshold)
    limit = 1800.0 if target == "Ag" else 2400.0
    use = xa <= limit
    # the summed curve of thousands of pixels is far from Poisson-limited: fit it unweighted
    fit = fit_scurves(xa[use], sums[None, :, use], weighting="none", max_chi2=None)[0]
    bad = np.flatnonzero(fit["status"] != FitStatus.OK)
    if bad.size:
        raise CalibrationError(
            f"{target}: the summed S-curve of chip(s) {', '.join(map(str, bad))} could not be "
            "fitted; check that the line reached the detector during the scan and repeat it")
    return ChipInflections(target=target, energy_keV=line_energy(target), x=xa, sums=sums,
                           fit=fit, mu=np.asarray(fit["mu"], dtype=np.float64))


@dataclass(frozen=True)
class EnergyCalibration:
    """Per-chip linear energy calibration ``E[keV] = p0 + p1 * vcmp``, i.e.
    ``vcmp = m - k * E[keV]`` (m in DAC, k in DAC/keV), from inflections mu [n_chips, n_points]
    at energies [n_points] (keV), with the targets that gave them."""
    targets: tuple[str, ...]
    energies: NDArray[np.float64]
    mu: NDArray[np.float64]
    p0: NDArray[np.float64]
    p1: NDArray[np.float64]

    @property
    def m(self) -> NDArray[np.float64]:
        return np.abs(self.p0 / self.p1)

    @property
    def k(self) -> NDArray[np.float64]:
        return np.abs(1.0 / self.p1)

    def energy(self, vcmp: ArrayLike, chip: int | ArrayLike) -> NDArray[np.float64]:
        """Threshold energy (keV) of ``vcmp`` (DAC) on ``chip`` (broadcasting)."""
        c = np.asarray(chip)
        return self.p0[c] + self.p1[c] * np.asarray(vcmp, dtype=np.float64)

    def vcmp(self, energy_keV: ArrayLike, chip: int | ArrayLike) -> NDArray[np.float64]:
        """vcmp (DAC) of a threshold energy (keV) on ``chip``."""
        c = np.asarray(chip)
        return self.m[c] - self.k[c] * np.asarray(energy_keV, dtype=np.float64)

    def threshold_range(self, thrange: tuple[float, float] = DEFAULTS.mu_range
                        ) -> tuple[float, float]:
        """(lowest, highest) threshold energy (keV) every chip reaches for vcmp in thrange."""
        low = float(np.max(self.p0 + self.p1 * thrange[1]))
        high = float(np.min(self.p0 + self.p1 * thrange[0]))
        return low, high

    def summary(self) -> dict:
        return {"targets": list(self.targets), "energies_keV": [float(e) for e in self.energies],
                "m": [float(v) for v in self.m], "k": [float(v) for v in self.k],
                "p0": [float(v) for v in self.p0], "p1": [float(v) for v in self.p1]}


def fit_energy_calibration(points: list[ChipInflections]) -> EnergyCalibration:
    """Straight line E = p0 + p1*mu per chip through the inflections of two or more lines."""
    if len(points) < 2 or len({p.energy_keV for p in points}) < 2:
        raise CalibrationError("an energy calibration needs S-curves at two different XRF lines; "
                               "take the second target's threshold scan (global calibration)")
    energies = np.array([p.energy_keV for p in points])
    mu = np.stack([p.mu for p in points], axis=1)
    n_chips = mu.shape[0]
    p0 = np.empty(n_chips)
    p1 = np.empty(n_chips)
    for chip in range(n_chips):
        slope, intercept = np.polyfit(mu[chip], energies, 1)
        p0[chip], p1[chip] = intercept, slope
    if np.any(p1 >= 0):
        bad = np.flatnonzero(p1 >= 0)
        raise CalibrationError(
            f"chip(s) {', '.join(map(str, bad))}: the inflection does not fall as the energy "
            "rises (vcmp = m - k*E needs k > 0); the scans are inconsistent, repeat them")
    return EnergyCalibration(targets=tuple(p.target for p in points), energies=energies, mu=mu,
                             p0=p0, p1=p1)


@dataclass(frozen=True)
class Dispersion:
    """Threshold dispersion: per-pixel threshold energies (keV image, NaN where not used), their
    mean (keV) and standard deviation (eV) per chip and over the detector."""
    energy: NDArray[np.float64]
    chip_mean_keV: NDArray[np.float64]
    chip_sigma_eV: NDArray[np.float64]
    mean_keV: float
    sigma_eV: float


def threshold_dispersion(mu: ArrayLike, good: ArrayLike, calibration: EnergyCalibration,
                         geometry: EigerGeometry) -> Dispersion:
    """Pixel threshold energies ``p0 + p1*mu`` of their chip and their spread (PSI's report)."""
    m = np.asarray(mu, dtype=np.float64)
    g = np.asarray(good, dtype=bool) & np.isfinite(m)
    energy = calibration.energy(m, geometry.chip_map)
    energy = np.where(g, energy, np.nan)
    mean, std = chip_statistics(energy, g, geometry)
    e = energy[g]
    return Dispersion(energy=energy, chip_mean_keV=mean, chip_sigma_eV=1000.0 * std,
                      mean_keV=float(e.mean()) if e.size else math.nan,
                      sigma_eV=1000.0 * float(e.std()) if e.size else math.nan)



# ---------------------------------------------------------------------------------------------
# The whole procedure's results
# ---------------------------------------------------------------------------------------------

@dataclass
class CalibrationResults:
    """Everything one calibration decided: what the plans produce while they run and what the
    re-analysis from tiled recomputes. ``lines`` holds, per target, the chip inflections of the
    trimmed detector (run id 1) that the energy calibration is fitted to. The S-curves and the
    trimbit scan are kept without their per-pixel fit maps (``.kept()``: a 9M's would hold ~3 GB
    through the procedure); the fits are in the steps' PSI files."""
    det_id: str
    gain: str
    target: str
    geometry: EigerGeometry
    vrf: VrfScanResult | None = None
    untrimmed: KeptSCurve | None = None
    trimbits: KeptTrimbits | None = None
    trimmed: KeptSCurve | None = None
    lines: dict[str, ChipInflections] | None = None
    calibration: EnergyCalibration | None = None
    dispersion_untrimmed: Dispersion | None = None
    dispersion_trimmed: Dispersion | None = None

    def add_line(self, point: ChipInflections) -> None:
        self.lines = {**(self.lines or {}), point.target: point}

    def finish(self) -> EnergyCalibration:
        """Fit the energy calibration to the lines (in order of energy) and the dispersions."""
        points = sorted((self.lines or {}).values(), key=lambda p: p.energy_keV)
        self.calibration = fit_energy_calibration(points)
        if self.untrimmed is not None:
            self.dispersion_untrimmed = threshold_dispersion(
                self.untrimmed.mu, self.untrimmed.good, self.calibration, self.geometry)
        if self.trimmed is not None:
            good = self.trimmed.good & (self.trimbits.trimmed if self.trimbits is not None
                                        else True)
            self.dispersion_trimmed = threshold_dispersion(
                self.trimmed.mu, good, self.calibration, self.geometry)
        return self.calibration

    def summary(self) -> dict:
        """JSON-able numbers of every decision (what the summary run stores)."""
        out: dict = {"det_id": self.det_id, "gain": self.gain, "target": self.target,
                     "geometry": self.geometry.name}
        if self.vrf is not None:
            out["vrf_scan"] = self.vrf.summary()
        if self.untrimmed is not None:
            out["untrimmed"] = self.untrimmed.summary()
        if self.trimbits is not None:
            out["trimbits"] = {**self.trimbits.summary(), "statistics": trimbit_statistics(
                self.trimbits.trimbits, self.geometry).summary()}
        if self.trimmed is not None:
            out["trimmed"] = self.trimmed.summary()
        if self.lines:
            out["lines"] = {t: {"energy_keV": p.energy_keV, "mu": [float(v) for v in p.mu]}
                            for t, p in sorted(self.lines.items())}
        if self.calibration is not None:
            out["calibration"] = self.calibration.summary()
            low, high = self.calibration.threshold_range()
            out["calibration"]["threshold_range_keV"] = [low, high]
        for name in ("dispersion_untrimmed", "dispersion_trimmed"):
            d = getattr(self, name)
            if d is not None:
                out[name] = {"sigma_eV": d.sigma_eV, "mean_keV": d.mean_keV,
                             "chip_sigma_eV": [float(v) for v in d.chip_sigma_eV]}
        return out
