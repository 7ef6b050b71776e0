"""Time of the EIGER calibration's analysis per step, against the fitting engine alone.

    python benchmarks/bench_eiger_calibration.py [--geometry 500k] [--repeats 2]

The scans are simulated directly with the EIGER simulator (iocs/sim/eiger.py, no IOC, no RunEngine)
at the procedure's settings: vrf scan 2500..3700/30 at 0.1 s, S-curve 0..2000/40 and trimbit scan
0..62/2 at the exposure the vrf scan suggests, Ge threshold scan at 0.1 s. Rows, all in this run:

  baseline fit_scurves      the fitting engine on the untrimmed S-curve (what any analysis pays)
  analyse_scurve            fit + bad pixels + vcmp per chip (the step's whole decision)
  baseline fit_trimbit_scans  the engine on the trimbit scan
  analyse_trimbit_scan      targets + crossing fit + masking
  analyse_vrf_scan          cleaning, half-module sums, edge fit, exposure
  chip_inflections          per-chip sums (with PSI's cleaning) and their S-curve fits
  save PSI files            npz scan (float64) + fit npy + trim files
  report                    the three-page PDF

Each row is the best of --repeats (the machine is shared).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from calbench.analysis import eiger_calibration as ec
from calbench.analysis.eiger_files import save_fit, save_scan, write_trim_files
from calbench.analysis.eiger_report import write_calibration_report
from calbench.analysis.scurve import fit_scurves, fit_trimbit_scans
from calbench.contracts.clock import WorldClock
from calbench.iocs.sim.eiger import EigerSim

LINES = {"Cu": (8.02, 1.0e4), "Ge": (9.9, 0.62e4)}     # keV, photons/pixel/s at 40 kV 40 mA


def _scan(sim, setter, points, target, exptime):
    energy, flux = LINES[target]
    frames = []
    for p in points:
        setter(int(p))
        frames.append(sim._count(energy, flux, exptime))
    return ec.counts_from_frames(np.array(frames))


def best(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--geometry", default="500k")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    sim = EigerSim(WorldClock(1.0), geometry=args.geometry, seed=20261122)
    g = sim.geometry
    sim.set_dac("vtrim", 2500)
    sim.set_trimval(32)
    sim.set_vthreshold(1200)
    print(f"simulating the scans of a {g.name} ({g.n_pixels} pixels) ...", flush=True)
    xv = np.arange(2500, 3700, 30)
    cv = _scan(sim, lambda v: sim.set_dac("vrpreamp", v), xv, "Cu", 0.1)
    vrf = ec.analyse_vrf_scan(xv, cv, g, 0.1)
    for hm, v in enumerate(vrf.vrf):
        sim.set_dac("vrpreamp", int(v), hm)
    xs = np.arange(0, 2001, 40)
    cs = _scan(sim, sim.set_vthreshold, xs, "Cu", vrf.exptime_s)
    s0 = ec.analyse_scurve(xs, cs, g)
    sim.set_vcmp(s0.vcmp)
    for hm, v in enumerate(s0.vcp):
        sim.set_dac("vcp", int(v), hm)
    xt = np.arange(0, 64, 2)
    ct = _scan(sim, sim.set_trimval, xt, "Cu", vrf.exptime_s)
    tb = ec.analyse_trimbit_scan(xt, ct, s0)
    sim.set_trimbits(tb.trimbits)
    c1 = _scan(sim, sim.set_vthreshold, xs, "Cu", vrf.exptime_s)
    cg = _scan(sim, sim.set_vthreshold, xs, "Ge", 0.1)

    rows = []
    r = args.repeats
    rows.append(("baseline fit_scurves", best(lambda: fit_scurves(xs, cs), r)[0]))
    rows.append(("analyse_scurve", best(lambda: ec.analyse_scurve(xs, cs, g), r)[0]))
    target = ec.trimbit_targets(s0.fit, s0.good)
    rows.append(("baseline fit_trimbit_scans",
                 best(lambda: fit_trimbit_scans(xt, ct, target, mask=~s0.good), r)[0]))
    rows.append(("analyse_trimbit_scan", best(lambda: ec.analyse_trimbit_scan(xt, ct, s0), r)[0]))
    rows.append(("analyse_vrf_scan", best(lambda: ec.analyse_vrf_scan(xv, cv, g, 0.1), r)[0]))
    rows.append(("chip_inflections", best(lambda: ec.chip_inflections(xs, cg, g, "Ge"), r)[0]))
    results = ec.CalibrationResults("T63", "gain5", "Cu", g, vrf=vrf, untrimmed=s0, trimbits=tb,
                                    trimmed=ec.analyse_scurve(xs, c1, g))
    results.add_line(ec.chip_inflections(xs, c1, g, "Cu"))
    results.add_line(ec.chip_inflections(xs, cg, g, "Ge"))
    results.finish()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        serials = [f"{58 + i:03d}" for i in range(g.n_half_modules)]

        def save():
            save_scan(out / "T63_vcmp_CuXRF_0.npz", xs, cs)
            save_fit(out / "T63_vcmp_CuXRF_0_fit.npy", s0.fit)
            write_trim_files(out / "T63_CuXRF_gain5", g, sim.dac_table(), 200, tb.trimbits,
                             serials)

        rows.append(("save PSI files", best(save, r)[0]))
        rows.append(("report",
                     best(lambda: write_calibration_report(out / "r.pdf", results), r)[0]))
    base = {"analyse_scurve": rows[0][1], "analyse_trimbit_scan": rows[2][1]}
    print(f"\n{'step':<28}{'time [s]':>10}{'per Mpixel [s]':>16}{'vs baseline':>13}")
    for name, t in rows:
        ratio = f"{t / base[name]:.2f}x" if name in base else ""
        print(f"{name:<28}{t:>10.2f}{t / (g.n_pixels / 1e6):>16.2f}{ratio:>13}")
    s = results.summary()
    print(f"\nphysics: vrf {s['vrf_scan']['vrf']}, inflection spread "
          f"{np.mean(s['untrimmed']['mu_std']):.1f} -> {np.mean(s['trimmed']['mu_std']):.1f} DAC, "
          f"dispersion {s['dispersion_untrimmed']['sigma_eV']:.0f} -> "
          f"{s['dispersion_trimmed']['sigma_eV']:.0f} eV")


if __name__ == "__main__":
    main()
