"""`calbench eiger`: the EIGER calibration's stored results from the command line.

    calbench eiger reanalyse UID [--report DIR]   recompute a finished calibration from tiled (UID:
                                                  any of its runs, e.g. the summary run) and say
                                                  whether every decision matches the stored one;
                                                  --report writes the PDF report and the
                                                  calibration.snNNN files into DIR
    calbench eiger calibration FILE               the "m k" lines of a calibration.snNNN file as
                                                  threshold ranges in keV
    calbench eiger trimstats FILE...              the layout, DACs and trimbit statistics (mean,
                                                  sd, pixels on the rails, chip means) of trim
                                                  files (noise.snNNN, PSI's or ours)

The calibration itself runs in the IPython profile: RE(calibrate_eiger(det, box, target="Cu")).
"""
from __future__ import annotations

import sys
from pathlib import Path

from calbench.cli import config_from_args


def add_cli(subparsers) -> None:
    """Register `calbench eiger reanalyse|calibration`."""
    parser = subparsers.add_parser("eiger", help="EIGER trimming and energy calibration results")
    sub = parser.add_subparsers(dest="eiger_cmd", required=True)
    p = sub.add_parser("reanalyse", help="recompute a calibration from tiled and compare")
    p.add_argument("uid", help="uid of any run of the calibration (its summary run)")
    p.add_argument("--report", type=Path, metavar="DIR",
                   help="write the PDF report and calibration.snNNN files into DIR")
    p.set_defaults(func=cmd_reanalyse)
    p = sub.add_parser("calibration", help="show a calibration.snNNN file")
    p.add_argument("file", type=Path)
    p.add_argument("--range", nargs=2, type=float, default=(100.0, 1900.0),
                   metavar=("VCMP_LOW", "VCMP_HIGH"), help="vcmp range, DAC (100 1900)")
    p.set_defaults(func=cmd_calibration)
    p = sub.add_parser("trimstats", help="trimbit statistics of trim files (noise.snNNN)")
    p.add_argument("files", type=Path, nargs="+")
    p.set_defaults(func=cmd_trimstats)


def cmd_reanalyse(args) -> int:
    from calbench.analysis.eiger_files import (report_name, save_calibration,
                                               write_calibration_text)
    from calbench.analysis.eiger_reanalysis import reanalyse_calibration
    from calbench.analysis.eiger_report import write_calibration_report
    from calbench.tiled_service import connect_catalog

    catalog = connect_catalog(config_from_args(args), start=False)
    print(f"re-analysing from {catalog.uri} ...", file=sys.stderr, flush=True)
    again = reanalyse_calibration(catalog, args.uid)
    r = again.results
    s = r.summary()
    print(f"calibration {again.calibration_id}: {r.det_id} {r.gain}, trimmed on {r.target}, "
          f"{len(again.scan_uids)} scans")
    if r.vrf is not None:
        print(f"  vrf {s['vrf_scan']['vrf']}, exposure {s['vrf_scan']['exptime_s']} s")
    if r.untrimmed is not None:
        print(f"  untrimmed: vcmp {s['untrimmed']['vcmp']}, vcp {s['untrimmed']['vcp']}, "
              f"bad pixels {s['untrimmed']['bad_pixels']}")
    if r.calibration is not None:
        for chip, (m, k) in enumerate(zip(r.calibration.m, r.calibration.k)):
            print(f"  chip {chip}: vcmp = {m:.2f} - {k:.2f} * E[keV]")
        print(f"  dispersion {s['dispersion_untrimmed']['sigma_eV']:.0f} eV untrimmed, "
              f"{s['dispersion_trimmed']['sigma_eV']:.0f} eV trimmed")
    if args.report is not None and r.calibration is not None:
        from calbench.contracts.trimfile import serial_from_hostname
        first = catalog[again.scan_uids[0]].metadata["start"]
        serials = first.get("module_serials") or [serial_from_hostname(h)
                                                   for h in first["hostnames"]]
        out = args.report
        save_calibration(out / "calibration.npz", r.calibration)
        for path in write_calibration_text(out, r.calibration, r.geometry, serials):
            print(f"  wrote {path}")
        path = write_calibration_report(out / report_name(r.det_id, r.gain), r,
                                        hostnames=first["hostnames"])
        print(f"  wrote {path}")
    if again.differences:
        print("DIFFERENT from the stored decisions:")
        for line in again.differences:
            print(f"  {line}")
        return 1
    print("identical to the decisions stored in the derived runs")
    return 0


def cmd_calibration(args) -> int:
    from calbench.analysis.eiger_files import read_calibration_text

    m, k, tau_ns = read_calibration_text(args.file)
    lo, hi = args.range
    for i, (mi, ki) in enumerate(zip(m, k)):
        print(f"chip {i}: vcmp = {mi:.2f} - {ki:.2f} * E[keV]; thresholds "
              f"{(mi - hi) / ki:.2f} .. {(mi - lo) / ki:.2f} keV for vcmp {hi:g} .. {lo:g}")
    if tau_ns is not None:
        print(f"tau {tau_ns} ns")
    return 0


def demo_step(ctx):
    """`make demo` step: tube on, the whole calibration of the simulated EIGER on Cu (vrf scan over
    the lab script's 2500..3700), results in the lab's results directory."""
    import numpy as np

    from calbench.procedures.demo import DemoResult
    from calbench.plans.eiger import calibrate_eiger
    from calbench.plans.xray import tube_on

    box, det = ctx.devices["xraybox"], ctx.devices["eiger"]
    if det.data_dir is None:
        det.data_dir = ctx.cfg.data_dir
    ctx.RE(tube_on(box, 40.0, 40.0))
    calibrations = []

    def plan():
        calibrations.append((yield from calibrate_eiger(
            det, box, "Cu", results_dir=ctx.cfg.results_dir, vrf_range=(2500, 3700, 30),
            plot=False, md={"purpose": "demo"})))

    ctx.RE(plan())
    cal = calibrations[0]
    s = cal.results.summary()
    summary = (f"vrf {s['vrf_scan']['vrf']}, exposure {s['vrf_scan']['exptime_s']:.3f} s; "
               f"inflection spread {np.mean(s['untrimmed']['mu_std']):.0f} -> "
               f"{np.mean(s['trimmed']['mu_std']):.1f} DAC; dispersion "
               f"{s['dispersion_untrimmed']['sigma_eV']:.0f} -> "
               f"{s['dispersion_trimmed']['sigma_eV']:.0f} eV; "
               f"k {', '.join(f'{k:.1f}' for k in s['calibration']['k'])} DAC/keV")
    keep = [p for p in cal.files if p.suffix in (".pdf",) or ".sn" in p.suffix
            or p.name == "calibration.npz"]
    return DemoResult("EIGER trimming and energy calibration (Cu, gain5)", cal.uids,
                      [str(p) for p in keep], summary)

def cmd_trimstats(args) -> int:
    from calbench.analysis.eiger_calibration import trimbit_statistics
    from calbench.contracts.eiger_geometry import geometry
    from calbench.contracts.trimfile import read_trim_file

    half_module = geometry("250k")          # a trim file holds one half module, chips by column
    for path in args.files:
        tf = read_trim_file(path)
        st = trimbit_statistics(tf.trimbits, half_module)
        dacs = tf.as_dict()
        print(f"{path}: {tf.layout}; vrpreamp {dacs['vrpreamp']}, vtrim {dacs['vtrim']}, "
              f"iodelay {tf.iodelay}, tau {tf.tau_ns} ns")
        print(f"  {st.line()}")
    return 0
