"""Simulated PSI EIGER, the pixels: what single-photon counting pixels lit by the X-ray box's
fluorescence line count at the detector's settings (the detector server's state: iocs/sim/eiger.py).

Physics (all parameters seeded; the truth is hidden from analysis and returned by `EigerSim.truth()`)
---------------------------------------------------------------------------------------------------
The comparator of a pixel fires when the pulse height exceeds the pixel's threshold. In DAC units of
the chip's vcmp (a comparator *reference*: a larger vcmp is a *lower* energy threshold, PSI's
``vcmp = m - k*E``) a photon of energy E is counted when

    vcmp_chip + shift_pix(trimbit)  >  base_pix - G_pix(vrf) * E        (+ noise)

* ``base_pix = m_chip + row_gradient_chip * (row - 127.5)/256 + offset_pix``: the chip's baseline
  m (2350 +- 30 DAC between chips), a threshold gradient along the chip's columns (the trimbit
  row means of PSI's trim files fall by ~12 trimbits over a chip's 256 rows, by 5 to 17 from chip
  to chip: -GRADIENT_DAC, +-40 % per chip) and the pixel's own offset: Gaussian (OFFSET_SPREAD_DAC,
  +-8 % from chip to chip), so that the untrimmed inflection points spread by about 100 DAC as in
  PSI's calibration plots. m is where the threshold energy is zero: it sits above the 0..2000
  vthreshold scans so that their last points are not flooded by noise.
* ``G_pix(vrf) = GAIN_AT_VRF_REF * exp(GAIN_SLOPE * (vrpreamp - VRF_REF)) * g_hm * g_chip * g_pix``,
  in DAC/keV (+-1.5 % per half module, +-3 % per chip, +-2 % per pixel). The exponential slope
  0.0013 /DAC is what PSI's standard settings imply (vrpreamp 3422, 3278, 3153 hold the 4.5, 5.4,
  6.4 keV lines at the same vcmp); with 140 DAC/keV at vrpreamp 3000 the Cu line (8.02 keV) sits at
  vthreshold ~1200 near vrpreamp ~3030, and a vthreshold-1200 vrf scan steps up there.
* ``shift_pix(t) = step_pix * (u + q_chip * u**2 / 31.5)``, ``u = t - 31.5``: the threshold shift
  of trimbit t. ``step_pix = TRIM_STEP_DAC * vtrim / 2500 * s_pix`` (10.5 DAC at vtrim 2500, +-5 %
  per pixel): PSI's trim files hold trimbits with a standard deviation of 9-10 for an untrimmed
  spread of ~100 DAC. The trim DAC is not linear: its steps grow towards trimbit 63 by a
  per-chip curvature q (TRIM_CURVATURE +- TRIM_CURVATURE_SPREAD), which is what gives PSI's
  trimbits their shape: skewed to low codes (skewness -0.4), a mean of ~31.5 below the
  untrimmed 32, 0.2-0.6 % of the pixels on trimbit 0 but only ~0.05 % on 63, and chip means
  that differ (0.4-1.4 trimbits here, 0.75-2.3 in PSI's files). The 64 trimbits span about -280..+380 DAC. Counts rise with
  the trimbit.
* Width of the S-curve: ``sigma_pix = sqrt((G_pix * ENC_KEV)^2 + sigma_thr_pix^2)`` (electronic noise
  0.3 keV plus comparator threshold noise ~110 DAC) -> 110-130 DAC at Cu.
* Charge sharing: photons near a pixel border leave part of their charge in the neighbour, so the
  counted fraction rises as the threshold energy drops: ``(1 + c_pix * (1 - E_thr/E))`` with
  c_pix ~ 0.45 (PSI's sloped plateau, the C term of the S-curve model).
* Electronic noise hits: ``NOISE_RATE_HZ * exp(-E_thr^2 / (2 ENC^2))`` per second, E_thr the
  pixel's threshold energy: negligible above ~1.3 keV, a flood below (vthreshold near m).
* Counts are Poisson (numpy Generator) in every frame; test pulses add Binomial(n, P) counts with a
  pulse height ``(4000 - vcal) * TP_KEV_PER_DAC``. A few dead pixels (never count), noisy pixels
  (2.5x electronic noise, 2x threshold noise, 30x noise-hit rate: they flood well below the
  baseline) and hot pixels (count ~2e5 /s whatever the threshold).
* The counter saturates at 2**dr - 1; at 32 bit the detector sums 12-bit subframes of 2.62144 ms,
  so a pixel saturates at 4095 per subframe.
* Beam: photon energy and flux per pixel come from the X-ray box
  (`source() -> (keV, photons/pixel/s)`),
  shaped by a smooth illumination profile (-25 % at the corners) and +-3 % pixel efficiency.

The energy calibration of chip c at the current settings is ``vcmp = m_c - k_c * E`` with
``m_c = mean(base_pix - step_pix*(trimbit - 31.5))`` and ``k_c = mean(G_pix)`` over its live pixels
(`EigerTruth.chip_calibration`).

Time: exposures last `exptime` world seconds on the world clock (accelerated by time_scale); frames
are computed lazily from the beam at the start and end of each exposure (EigerSim.acquire).
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np
from numpy.typing import NDArray
from scipy.special import ndtr

from calbench.contracts.eiger_geometry import EigerGeometry, frame_dtype
from calbench.contracts.trimfile import DAC_DEFAULTS, DAC_MAX, DAC_MIN, DAC_NAMES, TRIMBIT_MAX, TrimFile

# --- physics constants (documented in the module docstring) ---------------------------------------
BASELINE_DAC = 2350.0
CHIP_SPREAD_DAC = 30.0
OFFSET_SPREAD_DAC = 82.0
OFFSET_CHIP_SPREAD = 0.08        # relative, chip to chip
TAIL_FRACTION = 0.01             # pixels whose offset is drawn TAIL_SCALE times wider
TAIL_SCALE = 2.4
GRADIENT_DAC = 120.0             # threshold drop over a chip's 256 rows (row 0 -> 255)
GRADIENT_CHIP_SPREAD = 0.4       # relative, chip to chip
GAIN_AT_VRF_REF = 140.0          # DAC/keV at vrpreamp = VRF_REF
VRF_REF = 3000.0
GAIN_SLOPE = 0.0013              # d ln(gain) / d vrpreamp, 1/DAC
HM_GAIN_SPREAD, CHIP_GAIN_SPREAD, PIXEL_GAIN_SPREAD = 0.015, 0.03, 0.02
TRIM_STEP_DAC = 10.5             # per trimbit at vtrim 2500
TRIM_STEP_SPREAD = 0.05
TRIM_CURVATURE = 0.2             # q of shift = step * (u + q u^2 / 31.5), per chip
TRIM_CURVATURE_SPREAD = 0.1
THRESHOLD_NOISE_DAC = 110.0
ENC_KEV = 0.3
CHARGE_SHARING = 0.45
NOISE_RATE_HZ = 1.0e5
HOT_RATE_HZ = 2.0e5
TP_KEV_PER_DAC = 0.005           # test-pulse height per vcal step below 4000
SUBFRAME_S = 2.62144e-3          # 32-bit mode: 12-bit subframes of this length
N_DEAD, N_NOISY, N_HOT = 12, 8, 4  # per half module
TRIM_CENTER = 31.5

# Factory trim files: tau (ns) PSI ships at the standard trim energies (settingsdir/eiger/standard).
FACTORY_TAU_NS = {4500: 540, 5400: 350, 6400: 300}
FACTORY_IODELAY = 660
FACTORY_VCMP_TARGET = 1150       # vcmp of the line at each trim energy (PSI's files: 1125-1155)


@dataclass
class EigerTruth:
    """The simulator's hidden parameters and the quantities derived from them (for tests only).

    Per-pixel arrays are image-shaped (rows, cols); per-chip arrays are in chip order."""
    geometry: EigerGeometry
    base: NDArray[np.float64]          # DAC: m_chip + offset
    gain_rel: NDArray[np.float64]      # g_hm * g_chip * g_pix
    step_rel: NDArray[np.float64]      # trim step spread
    sigma_thr: NDArray[np.float64]     # DAC
    enc: NDArray[np.float64]           # electronic noise, keV
    charge_sharing: NDArray[np.float64]
    efficiency: NDArray[np.float64]    # illumination profile x pixel efficiency (0 for dead pixels)
    noise_scale: NDArray[np.float64]   # multiplies NOISE_RATE_HZ
    hot: NDArray[np.bool_]
    dead: NDArray[np.bool_]
    noisy: NDArray[np.bool_]
    chip_baseline: NDArray[np.float64]  # m per chip at trimbit 31.5 (before pixel offsets)
    trim_curvature: NDArray[np.float64]  # q per pixel (its chip's)

    def gain(self, vrf: NDArray | float) -> NDArray[np.float64]:
        """Pixel gain (DAC/keV) for vrpreamp ``vrf`` (scalar or image-shaped per-pixel vrf)."""
        vrf = np.asarray(vrf, float)
        return GAIN_AT_VRF_REF * np.exp(GAIN_SLOPE * (vrf - VRF_REF)) * self.gain_rel

    def trim_step(self, vtrim: NDArray | float) -> NDArray[np.float64]:
        """Threshold shift per trimbit (DAC) for vtrim (scalar or per pixel)."""
        return TRIM_STEP_DAC * np.asarray(vtrim, float) / 2500.0 * self.step_rel

    def trim_shift(self, vtrim: NDArray | float, trimbits: NDArray | float) -> NDArray[np.float64]:
        """Threshold shift (DAC, lowering the inflection) of each pixel at ``trimbits`` relative
        to trimbit 31.5, for vtrim (scalar or per pixel)."""
        u = np.asarray(trimbits, float) - TRIM_CENTER
        return self.trim_step(vtrim) * (u + self.trim_curvature * u * u / TRIM_CENTER)

    def trimbits_for_shift(self, vtrim: NDArray | float, shift: NDArray) -> NDArray[np.float64]:
        """The (real-valued) trimbit whose ``trim_shift`` is ``shift`` (DAC); a shift beyond the
        curve's turning point gives that point (the rails clip it anyway)."""
        a = self.trim_curvature / TRIM_CENTER
        b = np.asarray(shift, float) / self.trim_step(vtrim)
        disc = np.maximum(1.0 + 4.0 * a * b, 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            u = np.where(np.abs(a) > 1e-12, (np.sqrt(disc) - 1.0) / (2.0 * a), b)
        return TRIM_CENTER + u

    def sigma(self, vrf: NDArray | float) -> NDArray[np.float64]:
        """S-curve width (DAC) per pixel."""
        return np.hypot(self.gain(vrf) * self.enc, self.sigma_thr)

    def inflection(self, energy_keV: float, vrf: NDArray | float, trimbits: NDArray | float,
                   vtrim: NDArray | float) -> NDArray[np.float64]:
        """vthreshold (DAC) at which each pixel counts half of the photons of energy ``energy_keV``."""
        return self.base - self.gain(vrf) * energy_keV - self.trim_shift(vtrim, trimbits)

    def region(self, sl: tuple[slice, slice]) -> EigerTruth:
        """The per-pixel truth of the image block ``sl`` (views, no copies), for the elementwise
        methods (gain, trim_shift, inflection, ...); per-chip arrays and the geometry are kept."""
        per_pixel = {f.name: getattr(self, f.name)[sl] for f in fields(self)
                     if f.name not in ("geometry", "chip_baseline")}
        return replace(self, **per_pixel)

    def live(self) -> NDArray[np.bool_]:
        """Pixels that respond normally (not dead, noisy or hot)."""
        return ~(self.dead | self.noisy | self.hot)

    def chip_calibration(self, vrf: NDArray | float, trimbits: NDArray | float,
                         vtrim: NDArray | float) -> tuple[NDArray, NDArray]:
        """(m, k) per chip such that the chip's mean inflection is vcmp = m - k * E[keV]."""
        g = self.geometry
        offset = self.base - self.trim_shift(vtrim, trimbits)
        gain = np.broadcast_to(self.gain(vrf), g.shape)
        live = self.live()
        m = np.empty(g.n_chips)
        k = np.empty(g.n_chips)
        for chip in range(g.n_chips):
            sl = g.chip_slice(chip)
            mask = live[sl]
            m[chip] = offset[sl][mask].mean()
            k[chip] = gain[sl][mask].mean()
        return m, k


def make_truth(geom: EigerGeometry, seed: int) -> EigerTruth:
    """Draw the hidden detector parameters (reproducible for a seed)."""
    rng = np.random.default_rng([seed, 0xE16E])
    shape = geom.shape
    chip_map = geom.chip_map
    hm_of_chip = np.arange(geom.n_chips) // 4
    chip_m = BASELINE_DAC + np.clip(rng.normal(0, CHIP_SPREAD_DAC, geom.n_chips),
                                    -3 * CHIP_SPREAD_DAC, 3 * CHIP_SPREAD_DAC)
    g_hm = 1 + rng.normal(0, HM_GAIN_SPREAD, geom.n_half_modules)
    g_chip = (1 + rng.normal(0, CHIP_GAIN_SPREAD, geom.n_chips)) * g_hm[hm_of_chip]
    offset = rng.normal(0, OFFSET_SPREAD_DAC, shape)
    gain_rel = g_chip[chip_map] * (1 + rng.normal(0, PIXEL_GAIN_SPREAD, shape))
    step_rel = 1 + rng.normal(0, TRIM_STEP_SPREAD, shape)
    sigma_thr = THRESHOLD_NOISE_DAC * np.clip(1 + rng.normal(0, 0.1, shape), 0.6, 1.6)
    charge_sharing = CHARGE_SHARING * np.clip(1 + rng.normal(0, 0.1, shape), 0.5, 1.5)
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]]
    r2 = ((rows - (shape[0] - 1) / 2) / (shape[0] / 2)) ** 2 * 0.5 + \
         ((cols - (shape[1] - 1) / 2) / (shape[1] / 2)) ** 2 * 0.5
    efficiency = (1 - 0.25 * r2) * np.clip(1 + rng.normal(0, 0.03, shape), 0.8, 1.2)
    noise_scale = np.ones(shape)
    dead = np.zeros(shape, bool)
    noisy = np.zeros(shape, bool)
    hot = np.zeros(shape, bool)
    for hm in range(geom.n_half_modules):
        rs, cs = geom.half_module_slice(hm)
        n = N_DEAD + N_NOISY + N_HOT
        flat = rng.choice(256 * 1024, size=n, replace=False)
        r, c = np.divmod(flat, 1024)
        r, c = r + rs.start, c + cs.start
        dead[r[:N_DEAD], c[:N_DEAD]] = True
        noisy[r[N_DEAD:N_DEAD + N_NOISY], c[N_DEAD:N_DEAD + N_NOISY]] = True
        hot[r[N_DEAD + N_NOISY:], c[N_DEAD + N_NOISY:]] = True
    efficiency[dead] = 0.0
    noise_scale[dead] = 0.0
    enc = np.full(shape, ENC_KEV)
    enc[noisy] *= 2.5
    sigma_thr[noisy] *= 2.0
    noise_scale[noisy] = 30.0
    # drawn last, so that the draws above stay those of earlier versions for a seed
    spread_chip = 1 + OFFSET_CHIP_SPREAD * rng.standard_normal(geom.n_chips)
    gradient_chip = -GRADIENT_DAC * (1 + GRADIENT_CHIP_SPREAD * rng.standard_normal(geom.n_chips))
    curvature_chip = TRIM_CURVATURE + TRIM_CURVATURE_SPREAD * rng.standard_normal(geom.n_chips)
    curvature_chip = np.clip(curvature_chip, 0.0, 0.45)       # 0.5 would make the trim DAC flat
    # a sensor's tails: a few pixels far from their chip, feeding both trim rails
    offset = np.where(rng.random(shape) < TAIL_FRACTION, TAIL_SCALE * offset, offset)
    row_in_chip = (rows % 256 - 127.5) / 256.0
    for hm in range(1, geom.n_half_modules, 2):     # bottom half modules are mounted rotated
        row_in_chip[geom.half_module_slice(hm)] *= -1
    base = chip_m[chip_map] + offset * spread_chip[chip_map] + gradient_chip[chip_map] * row_in_chip
    f4 = np.float32                     # per-pixel truth in float32: a 9M detector stays < 0.5 GB
    return EigerTruth(geometry=geom, base=base.astype(f4), gain_rel=gain_rel.astype(f4),
                      step_rel=step_rel.astype(f4), sigma_thr=sigma_thr.astype(f4),
                      enc=enc.astype(f4), charge_sharing=charge_sharing.astype(f4),
                      efficiency=efficiency.astype(f4), noise_scale=noise_scale.astype(f4),
                      hot=hot, dead=dead, noisy=noisy, chip_baseline=chip_m,
                      trim_curvature=curvature_chip[chip_map].astype(f4))


class PixelResponse:
    """The pixel physics of the EIGER simulator (a base of EigerSim): per-pixel settings, expected
    and Poisson counts, the vendor's factory trim. It reads the detector server's state that
    EigerSim holds: geometry, _truth, _dacs [17, half modules], _trimbits (image), _trim_version,
    _lock, _cache, _rng, dr, test_pulses and vcmp()."""

    def pixel_state(self) -> dict[str, NDArray]:
        """Per-pixel effective settings now: vrf, vtrim, vcmp (image-shaped), trimbits."""
        g = self.geometry
        vrf = np.empty(g.shape)
        vtrim = np.empty(g.shape)
        vcmp = np.empty(g.shape)
        for hm in range(g.n_half_modules):
            sl = g.half_module_slice(hm)
            vrf[sl] = self._dacs[DAC_NAMES.index("vrpreamp"), hm]
            vtrim[sl] = self._dacs[DAC_NAMES.index("vtrim"), hm]
        for chip in range(g.n_chips):
            hm, name = g.chip_vcmp(chip)
            vcmp[g.chip_slice(chip)] = self._dacs[DAC_NAMES.index(name), hm]
        return {"vrf": vrf, "vtrim": vtrim, "vcmp": vcmp, "trimbits": self._trimbits.astype(float)}

    def factory_trim(self, energy_keV: float) -> list[TrimFile]:
        """Per half module: DACs with vrpreamp putting the line at vcmp ~1150, chip vcmp at the
        mean inflection, and trimbits levelling every pixel to it (uses the hidden truth, as the
        vendor's own calibration of the module would)."""
        t, g = self._truth, self.geometry
        live = t.live()
        out = []
        for hm in range(g.n_half_modules):
            sl = g.half_module_slice(hm)
            base = t.base[sl][live[sl]].mean()
            grel = t.gain_rel[sl][live[sl]].mean()
            # G(vrf) * E = base - target  ->  vrf
            need = (base - FACTORY_VCMP_TARGET) / (energy_keV * GAIN_AT_VRF_REF * grel)
            vrf = int(np.clip(round(VRF_REF + np.log(need) / GAIN_SLOPE), DAC_MIN, DAC_MAX))
            dacs = {**DAC_DEFAULTS, "vtrim": 2500, "vrpreamp": vrf, "vrshaper": 1400, "vcal": 4000}
            # the half module's own pixels only: elementwise, so the same values as on the image
            # (a whole-image computation per chip took minutes at 9M)
            hm_truth = t.region(sl)
            hm_live = live[sl]
            mu = hm_truth.inflection(energy_keV, vrf, TRIM_CENTER, 2500)
            tb = np.zeros(mu.shape)
            vcmps = []
            for k in range(4):
                chip = 4 * hm + k
                rows, cols = g.chip_slice(chip)
                csl = (slice(rows.start - sl[0].start, rows.stop - sl[0].start),
                       slice(cols.start - sl[1].start, cols.stop - sl[1].start))
                vcmp = int(round(mu[csl][hm_live[csl]].mean()))
                vcmps.append(vcmp)
                dacs[g.chip_vcmp(chip)[1]] = vcmp
                tb[csl] = hm_truth.region(csl).trimbits_for_shift(2500, mu[csl] - vcmp)
            dacs["vcp"] = int(round(np.mean(vcmps)))
            trim = np.clip(np.round(tb), 0, TRIMBIT_MAX).astype(np.int32)
            out.append(TrimFile(dacs=np.array([dacs[n] for n in DAC_NAMES], np.int32),
                                iodelay=FACTORY_IODELAY, tau_ns=0, trimbits=trim))
        return out

    # -- counting -------------------------------------------------------------------------------------
    def _pixel_model(self) -> dict:
        """Per-pixel quantities for the current settings. The part that depends on vrpreamp, vtrim
        and the trimbits is cached (threshold scans only change vcmp, a cheap per-chip term)."""
        g, t = self.geometry, self._truth
        with self._lock:
            i_vrf, i_vtrim = DAC_NAMES.index("vrpreamp"), DAC_NAMES.index("vtrim")
            key = (self._dacs[i_vrf].tobytes(), self._dacs[i_vtrim].tobytes(), self._trim_version)
            if self._cache is None or self._cache["key"] != key:
                st = self.pixel_state()
                gain = t.gain(st["vrf"])
                trimmed = t.base - t.trim_shift(st["vtrim"], st["trimbits"])
                self._cache = {
                    "key": key,
                    "gain": gain.astype(np.float32),
                    "trimmed": trimmed.astype(np.float32),            # base - trim shift, DAC
                    "sigma": np.hypot(gain * t.enc, t.sigma_thr).astype(np.float32),
                    "inv2enc2": (-0.5 / t.enc ** 2).astype(np.float32),
                    "efficiency": t.efficiency.astype(np.float32),
                    "sharing": t.charge_sharing.astype(np.float32),
                    "noise": t.noise_scale.astype(np.float32),
                }
            m = dict(self._cache)
            vcmp_chip = np.array(self.vcmp(), np.float32)
        m["below"] = m["trimmed"] - vcmp_chip[g.chip_map]                # DAC the pulse must exceed
        m["ethr"] = m["below"] / m["gain"]                               # threshold energy, keV
        return m

    def expected_counts(self, energy_keV: float, flux: float, seconds: float) -> NDArray[np.float32]:
        """Mean counts per pixel for one exposure (photons + noise hits + hot pixels)."""
        t = self._truth
        m = self._pixel_model()
        lam = np.zeros(self.geometry.shape, np.float32)
        if flux > 0 and energy_keV > 0:
            x = m["gain"] * np.float32(energy_keV) - m["below"]       # DAC above threshold
            p = ndtr(x / m["sigma"])
            share = 1 + m["sharing"] * np.clip(x / (m["gain"] * np.float32(energy_keV)), 0, None)
            lam += np.float32(flux * seconds) * m["efficiency"] * p * share
        ethr = np.clip(m["ethr"], 0, None)
        lam += np.float32(NOISE_RATE_HZ * seconds) * m["noise"] * np.exp(m["inv2enc2"] * ethr * ethr)
        lam[t.hot] += HOT_RATE_HZ * seconds
        return lam

    def _pulse_probability(self) -> NDArray[np.float32]:
        m = self._pixel_model()
        vcal = self._dacs[DAC_NAMES.index("vcal")]
        e_tp = np.empty(self.geometry.shape, np.float32)
        for hm in range(self.geometry.n_half_modules):
            e_tp[self.geometry.half_module_slice(hm)] = (4000 - vcal[hm]) * TP_KEV_PER_DAC
        p = ndtr((m["gain"] * e_tp - m["below"]) / m["sigma"])
        p[self._truth.dead] = 0.0
        return p

    def _count(self, energy_keV: float, flux: float, seconds: float) -> NDArray:
        counts = self._rng.poisson(self.expected_counts(energy_keV, flux, seconds))
        if self.test_pulses:
            counts += self._rng.binomial(self.test_pulses, self._pulse_probability())
        limit = 2 ** self.dr - 1
        if self.dr == 32:
            limit = min(limit, 4095 * max(1, int(np.ceil(seconds / SUBFRAME_S))))
        np.minimum(counts, limit, out=counts)
        return counts.astype(frame_dtype(self.dr))
