"""The simulated EIGER's physics, measured the way the calibration measures it (no peeking except to
compare with the hidden truth)."""
from __future__ import annotations

import threading

import numpy as np
import pytest
from scipy.optimize import curve_fit

from calbench.analysis.scurve import scurve
from calbench.contracts.trimfile import (DAC_NAMES, linear_interpolation, read_trim_file,
                                        trim_file_path, write_trim_file)
from calbench.contracts.errors import Refused
from calbench.contracts.clock import WorldClock
from calbench.iocs.sim.eiger import EigerSim

CU_KEV = 8.02
FLUX = 1.0e4          # photons / pixel / s


class Beam:
    """A fluorescence line the test can switch (the X-ray box's role)."""

    def __init__(self, energy=CU_KEV, flux=FLUX):
        self.energy, self.flux = energy, flux

    def __call__(self):
        return self.energy, self.flux


@pytest.fixture
def beam():
    return Beam()


@pytest.fixture
def sim(beam):
    sim = EigerSim(WorldClock(1.0e4), seed=11, source=beam)
    sim.set_dynamic_range(32)
    sim.set_exptime(0.1)
    sim.set_trimval(32)
    sim.set_dac("vrpreamp", 3040)
    sim.set_dac("vtrim", 2500)
    return sim


def threshold_scan(sim, rows, cols, x):
    """Counts [n_pixels, n_points] of the given pixels over vthreshold values x."""
    out = []
    for v in x:
        sim.set_vthreshold(int(v))
        out.append(sim.acquire().frames[0][rows, cols])
    return np.array(out, float).T


def typical_pixel(truth, chip_slice) -> tuple[int, int]:
    """A live pixel whose threshold offset is the chip's median: high trimbits then keep its
    noise edge (vthreshold near its baseline) above the 0..2000 scan."""
    base = np.where(truth.live()[chip_slice], truth.base[chip_slice], np.nan)
    r, c = np.unravel_index(np.nanargmin(abs(base - np.nanmedian(base))), base.shape)
    return chip_slice[0].start + int(r), chip_slice[1].start + int(c)


def fit_mu(x, y):
    top = max(y[-5:].mean(), 1.0)
    p0 = [0, 0, x[np.argmin(abs(y - top / 2))], 120, top, 0]
    popt, _ = curve_fit(scurve, x, y, p0=p0, sigma=np.sqrt(np.maximum(y, 1)), maxfev=20000)
    return popt


def test_untrimmed_s_curves_rise_and_recover_the_hidden_inflections(sim):
    truth = sim.truth()
    rng = np.random.default_rng(0)
    live = np.argwhere(truth.live()[256:512, 0:256]) + [256, 0]      # chip 0
    pick = live[rng.choice(len(live), 40, replace=False)]
    x = np.arange(0, 2001, 40.0)
    sim.set_exptime(0.5)                  # ~5000 counts on the plateau: mu of a pixel to ~9 DAC
    counts = threshold_scan(sim, pick[:, 0], pick[:, 1], x)
    assert np.all(counts[:, :5].mean(axis=1) < 0.05 * counts[:, -5:].mean(axis=1)), "must rise"
    fits = np.array([fit_mu(x, y) for y in counts])
    mu_true = truth.inflection(CU_KEV, 3040, 32, 2500)[pick[:, 0], pick[:, 1]]
    assert np.median(np.abs(fits[:, 2] - mu_true)) < 12
    assert 90 < np.median(fits[:, 3]) < 200, "S-curve width ~100-200 DAC at Cu"
    assert np.median(fits[:, 5]) > 0, "charge sharing gives a rising plateau"
    # untrimmed: inflection points spread by about 100 DAC over the chip
    chip = truth.inflection(CU_KEV, 3040, 32, 2500)[256:512, 0:256][truth.live()[256:512, 0:256]]
    assert 80 < chip.std() < 120
    assert 1000 < chip.mean() < 1400, "Cu sits near vthreshold 1200 at vrpreamp ~3040"


def test_inflection_moves_down_with_the_trimbit_by_the_trim_step(beam):
    sim = EigerSim(WorldClock(1.0e4), geometry="250k", seed=11, source=beam)   # half the pixels
    sim.set_dynamic_range(32)
    sim.set_dac("vrpreamp", 3040)
    sim.set_dac("vtrim", 2500)
    truth = sim.truth()
    pixel = typical_pixel(truth, sim.geometry.chip_slice(2))
    # up to 1840: a high trimbit also lowers the pixel's noise edge (near its baseline) to ~1900
    x = np.arange(0, 1841, 40.0)
    sim.set_exptime(1.0)                  # ~1e4 counts on the plateau: mu of one pixel to ~6 DAC
    mus = {}
    for tb in (16, 48):
        sim.set_trimval(tb)
        mus[tb] = fit_mu(x, threshold_scan(sim, [pixel[0]], [pixel[1]], x)[0])[2]
        assert mus[tb] == pytest.approx(truth.inflection(CU_KEV, 3040, tb, 2500)[pixel], abs=20)
    assert mus[48] < mus[16]                        # counts rise with the trimbit
    assert mus[16] - mus[48] == pytest.approx(32 * truth.trim_step(2500)[pixel], rel=0.1)
    # 0..63 spans several times the untrimmed spread at the default vtrim
    assert 63 * np.median(truth.trim_step(2500)) > 4 * 95


def test_vrf_scan_at_vthreshold_1200_steps_up_near_3000_on_cu(sim):
    sim.set_vthreshold(1200)
    vrf = np.arange(2700, 3401, 30)
    g = sim.geometry
    totals = []
    for v in vrf:
        sim.set_dac("vrpreamp", int(v))
        f = sim.acquire().frames[0]
        totals.append([f[g.half_module_slice(hm)].sum(dtype=float) for hm in range(2)])
    totals = np.array(totals)
    assert np.all(totals[-1] > 20 * totals[0])
    step = vrf[np.argmax(np.gradient(totals, axis=0), axis=0)]
    assert np.all((step > 2900) & (step < 3200)), f"vrf of the Cu step {step}"


def test_counts_are_poisson_and_saturate_at_the_counter_depth(sim, beam):
    sim.set_vthreshold(1900)                        # on the plateau: ~1000 counts per frame
    sim.set_frames(6)
    frames = sim.acquire().frames.astype(float)
    live = sim.truth().live()
    ratio = frames.var(axis=0, ddof=1)[live] / frames.mean(axis=0)[live]
    assert np.mean(ratio) == pytest.approx(1.0, abs=0.03)
    sim.set_frames(1)
    sim.set_exptime(1.0)                            # ~1e4 photons per pixel
    for dr, top in ((4, 15), (8, 255), (12, 4095)):
        sim.set_dynamic_range(dr)
        f = sim.acquire().frames[0]
        assert f.dtype.itemsize == (1 if dr <= 8 else 2)
        assert f.max() == top and np.mean(f[live] == top) > 0.9
    sim.set_dynamic_range(16)
    sim.set_exptime(10.0)                           # 1e5 photons > 65535
    assert sim.acquire().frames[0].max() == 65535


def test_dead_hot_and_noisy_pixels(sim, beam):
    truth = sim.truth()
    beam.flux = 0.0
    sim.set_vthreshold(1200)
    sim.set_exptime(1.0)
    dark = sim.acquire().frames[0]
    assert dark[truth.hot].min() > 1e5             # hot pixels count without light
    assert dark[truth.live()].max() <= 2           # the rest is dark at a safe threshold
    beam.flux = FLUX
    lit = sim.acquire().frames[0]
    assert lit[truth.dead].max() == 0
    assert 10 <= truth.dead.sum() <= 40 and truth.noisy.sum() > 0
    # noisy pixels flood with noise hits at a threshold (2 keV) where normal pixels stay dark
    sim.set_vthreshold(2050)
    beam.flux = 0.0
    noise = sim.acquire().frames[0]
    assert np.median(noise[truth.noisy]) > 1000 and np.median(noise[truth.live()]) == 0


def test_test_pulses_count_above_threshold(sim, beam):
    beam.flux = 0.0
    sim.set_dac("vcal", 4000 - 1600)                # 8 keV pulses
    sim.set_test_pulses(1000)
    sim.set_vthreshold(1900)
    high = sim.acquire().frames[0]
    sim.set_vthreshold(400)
    low = sim.acquire().frames[0]
    live = sim.truth().live()
    assert np.median(high[live]) == pytest.approx(1000, abs=5)
    assert np.median(low[live]) < 5


def test_threshold_energy_follows_slsdetector_interpolation(sim):
    """At 5650 eV between the 5400 and 6400 eV files a trimbit pair 2 apart is an exact .5 tie:
    the simulator takes slsDetectorPackage's values (linear_interpolation, checked against a C
    build of upstream's formula in test_eiger_trimfile.py)."""
    serials = ("058", "059")
    for s in serials:       # 6400 eV trimbits 0..3 above 5400's, so that a quarter are 2 apart
        path = trim_file_path(sim.settings_dir, "standard", 6400, s)
        a = read_trim_file(trim_file_path(sim.settings_dir, "standard", 5400, s))
        b = read_trim_file(path)
        shifted = np.clip(a.trimbits + np.arange(a.trimbits.size).reshape(256, 1024) % 4, 0, 63)
        write_trim_file(path, b.dacs, b.iodelay, b.tau_ns, shifted)
    files = {e: [read_trim_file(trim_file_path(sim.settings_dir, "standard", e, s))
                 for s in serials] for e in (5400, 6400)}
    sim.set_threshold_energy(5650)
    table = sim.dac_table()
    ties = 0
    for hm, (a, b) in enumerate(zip(files[5400], files[6400])):
        for name in ("vrpreamp", "vcmp_ll", "vcmp_rr", "vcp", "vtrim", "vrshaper"):
            want = linear_interpolation(5650, 5400, 6400, a.dac(name), b.dac(name))
            assert table[DAC_NAMES.index(name), hm] == want
        tb = sim.trimbits()[sim.geometry.half_module_slice(hm)]
        np.testing.assert_array_equal(
            tb, linear_interpolation(5650, 5400, 6400, a.trimbits, b.trimbits))
        ties += int(np.sum((b.trimbits.astype(int) - a.trimbits) % 4 == 2))
    assert ties > 100_000, "the files must exercise .5 ties"
    assert sim.tau_ns == linear_interpolation(5650, 5400, 6400, 350, 300)
    sim.set_threshold_energy(6000)
    assert sim.threshold_eV == 6000 and sim.loaded_settings == "standard"
    sim.set_threshold_energy(5400)                  # a trim energy: that file, unchanged
    assert sim.dac_table()[2, 0] == files[5400][0].dac("vrpreamp")
    with pytest.raises(Refused, match="This energy 8000 not defined"):
        sim.set_threshold_energy(8000)
    assert sim.threshold_eV == 5400


def test_factory_trim_levels_the_pixels(sim):
    truth = sim.truth()
    untrimmed = truth.inflection(6.4, 3040, 31.5, 2500)[truth.live()].std()
    sim.set_threshold_energy(6400)
    st = sim.pixel_state()
    mu = truth.inflection(6.4, st["vrf"], st["trimbits"], st["vtrim"])
    g = sim.geometry
    for chip in range(g.n_chips):
        sl = g.chip_slice(chip)
        spread = mu[sl][truth.live()[sl]].std()
        assert spread < 0.15 * untrimmed
        # each chip's mean inflection sits at its vcmp
        assert mu[sl][truth.live()[sl]].mean() == pytest.approx(sim.vcmp()[chip], abs=3)


def test_chip_energy_calibration_is_linear_in_energy(sim):
    sim.set_threshold_energy(6400)
    st = sim.pixel_state()
    m, k = sim.truth().chip_calibration(st["vrf"], st["trimbits"], st["vtrim"])
    assert np.all((m > 2000) & (m < 2700)) and np.all((k > 60) & (k < 300))
    truth = sim.truth()
    g = sim.geometry
    for e in (4.5, 8.02):
        mu = truth.inflection(e, st["vrf"], st["trimbits"], st["vtrim"])
        for chip in (0, 5):
            sl = g.chip_slice(chip)
            assert mu[sl][truth.live()[sl]].mean() == pytest.approx(m[chip] - k[chip] * e, abs=1e-6)


@pytest.mark.parametrize("call, args, reason", [
    ("set_dac", ("vrpreamp", 4001), "outside 0..4000"),
    ("set_dac", ("vtrim", -1), "outside 0..4000"),
    ("set_vthreshold", (1e4,), "outside 0..4000"),
    ("set_trimval", (64,), "outside 0..63"),
    ("set_trimbits", (np.full(100, 3),), "need 524288 values"),
    ("set_trimbits", (np.full((512, 1024), 70),), "0..63"),
    ("set_dynamic_range", (24,), "24 bit not supported"),
    ("set_threshold_energy", (3000,), "not defined for this module"),
    ("load_trimbits", ("/nonexistent/noise",), "not found"),
    ("set_vcmp", ([1000] * 9,), "one value per chip"),
])
def test_bad_requests_are_refused_and_change_nothing(sim, call, args, reason):
    before = (sim.dac_table().copy(), sim.trimbits().copy(), sim.dr, sim.threshold_eV)
    with pytest.raises(Refused, match=reason):
        getattr(sim, call)(*args)
    after = (sim.dac_table(), sim.trimbits(), sim.dr, sim.threshold_eV)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)


def test_older_trim_file_layouts_load_with_tau_0_and_iodelay_kept_where_absent(sim, tmp_path):
    """PSI's 1,048,644-byte (16 DACs + iodelay) and 1,048,640-byte (16 DACs) files load: tau 0,
    and a file without iodelay leaves the detector's alone."""
    dacs = np.arange(16, dtype="<i4") * 100 + 50
    tb = np.random.default_rng(5).integers(0, 64, (256, 1024)).astype("<i4")
    (tmp_path / "old.sn058").write_bytes(np.concatenate([dacs, [655]]).astype("<i4").tobytes()
                                         + tb.tobytes())
    (tmp_path / "old.sn059").write_bytes(dacs.tobytes() + (63 - tb).tobytes())
    sim.set_dac("iodelay", 640)
    sim.set_rate_correction(200)
    sim.load_trimbits(str(tmp_path / "old"))
    table = sim.dac_table()
    np.testing.assert_array_equal(table[:16, 0], dacs)
    np.testing.assert_array_equal(table[:16, 1], dacs)
    assert table[16].tolist() == [655, 640]
    assert sim.tau_ns == 0
    np.testing.assert_array_equal(sim.trimbits()[256:512], tb)
    np.testing.assert_array_equal(sim.trimbits()[0:256], 63 - tb)


def test_missing_trim_file_in_the_settings_dir_is_refused(sim, tmp_path):
    sim.set_settings_dir(str(tmp_path))
    with pytest.raises(Refused, match=r"noise.sn058 not found"):
        sim.set_threshold_energy(5400)


def test_vcmp_order_follows_slsdet_with_the_bottom_half_module_reversed(sim):
    sim.set_vcmp([1000, 1010, 1020, 1030, 1040, 1050, 1060, 1070])
    table = sim.dac_table()
    names = ("vsvp vtrim vrpreamp vrshaper vsvn vtgstv vcmp_ll vcmp_lr vcal vcmp_rl rxb_rb rxb_lb "
             "vcmp_rr vcp vcn vishaper").split()
    top = [table[names.index(n), 0] for n in ("vcmp_ll", "vcmp_lr", "vcmp_rl", "vcmp_rr")]
    bottom = [table[names.index(n), 1] for n in ("vcmp_rr", "vcmp_rl", "vcmp_lr", "vcmp_ll")]
    assert top == [1000, 1010, 1020, 1030] and bottom == [1040, 1050, 1060, 1070]
    assert sim.vthreshold() == -1
    # chip 4 is image rows 0..255, columns 0..255: its threshold is vcmp_rr of the bottom module
    st = sim.pixel_state()
    assert st["vcmp"][10, 10] == 1040 and st["vcmp"][300, 10] == 1000


def test_an_exposure_sees_the_beam_change_during_it(beam):
    sim = EigerSim(WorldClock(20.0), seed=2, source=beam)
    sim.set_dynamic_range(32)
    sim.set_exptime(1.0)
    sim.set_vthreshold(1900)
    sim.set_dac("vrpreamp", 3040)
    live = sim.truth().live()
    steady = np.median(sim.acquire().frames[0][live])
    timer = threading.Timer(0.01, lambda: setattr(beam, "flux", 0.0))   # the shutter closes
    timer.start()
    closing = np.median(sim.acquire().frames[0][live])
    timer.join()
    assert closing / steady == pytest.approx(0.5, abs=0.05)


@pytest.mark.parametrize("name, shape, chips", [("250k", (256, 1024), 4), ("1M", (1024, 1024), 16)])
def test_other_geometries_count_on_every_chip(beam, name, shape, chips):
    sim = EigerSim(WorldClock(1.0e4), geometry=name, seed=5, source=beam,
                   hostnames=["beb031"])
    assert sim.geometry.shape == shape and sim.geometry.n_chips == chips
    assert sim.hostnames[0] == "beb031" and len(sim.hostnames) == sim.geometry.n_half_modules
    sim.set_dynamic_range(16)
    sim.set_exptime(0.1)
    sim.set_dac("vrpreamp", 3040)
    sim.set_vthreshold(1900)
    frame = sim.acquire().frames[0]
    assert frame.shape == shape and frame.dtype == np.uint16
    sums = sim.geometry.chip_sums(frame)
    assert len(sums) == chips and sums.min() > 0.5 * sums.max()
    assert len(sim.vcmp()) == chips


def whole_image_factory_trim(sim, energy_keV):
    """The factory trim as first written: every quantity on the whole image, cut per chip after
    (minutes at 9M); the per half module version must give the same files."""
    from calbench.iocs.sim.eiger_pixels import GAIN_AT_VRF_REF, GAIN_SLOPE, VRF_REF
    from calbench.contracts.trimfile import DAC_DEFAULTS, DAC_MAX, DAC_MIN, TRIMBIT_MAX
    t, g = sim.truth(), sim.geometry
    live = t.live()
    out = []
    for hm in range(g.n_half_modules):
        sl = g.half_module_slice(hm)
        base = t.base[sl][live[sl]].mean()
        grel = t.gain_rel[sl][live[sl]].mean()
        need = (base - 1150) / (energy_keV * GAIN_AT_VRF_REF * grel)
        vrf = int(np.clip(round(VRF_REF + np.log(need) / GAIN_SLOPE), DAC_MIN, DAC_MAX))
        dacs = {**DAC_DEFAULTS, "vtrim": 2500, "vrpreamp": vrf, "vrshaper": 1400, "vcal": 4000}
        mu = t.inflection(energy_keV, vrf, 31.5, 2500)
        tb = np.zeros(g.shape)
        vcmps = []
        for k in range(4):
            chip = 4 * hm + k
            csl = g.chip_slice(chip)
            vcmp = int(round(mu[csl][live[csl]].mean()))
            vcmps.append(vcmp)
            dacs[g.chip_vcmp(chip)[1]] = vcmp
            tb[csl] = t.trimbits_for_shift(2500, mu - vcmp)[csl]
        dacs["vcp"] = int(round(np.mean(vcmps)))
        out.append(([dacs[n] for n in DAC_NAMES], np.clip(np.round(tb[sl]), 0, TRIMBIT_MAX)))
    return out


def test_factory_trim_per_half_module_equals_the_whole_image_computation(beam):
    sim = EigerSim(WorldClock(1.0e4), geometry="1M", seed=5, source=beam)
    for energy in (4.5, 8.02):
        files = sim.factory_trim(energy)
        reference = whole_image_factory_trim(sim, energy)
        assert len(files) == len(reference) == sim.geometry.n_half_modules
        for tf, (dacs, trimbits) in zip(files, reference):
            assert tf.dacs.tolist() == dacs
            np.testing.assert_array_equal(tf.trimbits, trimbits)
