"""`calbench batmet`: the BatMet current-sink calibration from the command line, compatible with the
lab's files.

    calbench batmet collect [-o calibration_d_i.txt]   scan the sink; prints `DAC<TAB>current` lines
                                                       as `collect.py` does, stores the run in tiled
    calbench batmet fit -c calibration_d_i.txt         prints `csink 0 4 a b c`, saves the plot
    calbench batmet fit --run UID                      the same for a run stored in tiled

Progress and notes go to stderr, so `calbench batmet collect | tee calibration_d_i.txt` and
`$(calbench batmet fit -c calibration_d_i.txt)` work as with the lab's scripts.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from calbench.cli import config_from_args


def add_cli(subparsers) -> None:
    """Register `calbench batmet collect|fit`."""
    parser = subparsers.add_parser("batmet", help="BatMet current-sink calibration")
    sub = parser.add_subparsers(dest="batmet_cmd", required=True)

    from calbench.plans.batmet import (DAC_START, DAC_STEP, DAC_STOP, READINGS_PER_POINT,
                                       STOP_CURRENT_A)

    p = sub.add_parser("collect", help="scan the sink DAC, print 'DAC<TAB>current' lines")
    p.add_argument("--prefix", help="lab-wide PV prefix (default from the configuration)")
    p.add_argument("--dac-start", type=int, default=DAC_START, help="first DAC code (450)")
    p.add_argument("--dac-stop", type=int, default=DAC_STOP, help="end, exclusive (4100)")
    p.add_argument("--dac-step", type=int, default=DAC_STEP, help="step (10)")
    p.add_argument("--readings", type=int, default=READINGS_PER_POINT,
                   help="meter readings averaged per point (3)")
    p.add_argument("--stop-current", type=float, default=STOP_CURRENT_A,
                   help="stop after the first point above this current, A (3)")
    p.add_argument("--no-psu", action="store_true",
                   help="the supply is set by hand (4 V, 3 A limit, output on)")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds to wait for the instruments' IOCs to answer (10)")
    p.add_argument("-o", "--output", type=Path,
                   help="also write the points to this file (complete, or not at all)")
    p.set_defaults(func=cmd_collect)

    p = sub.add_parser("fit", help="fit DAC = a*I^2 + b*I + c; print the csink line, save a plot")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("-c", "--calibration", type=Path, help="'DAC<TAB>current' file")
    src.add_argument("--run", help="uid of a sink scan stored in tiled")
    p.add_argument("--plot", type=Path, help="figure path (default: next to the file, "
                   "<stem>_fit.png; for --run, in the results directory)")
    p.add_argument("--min-current", type=float, default=1e-4,
                   help="points at or below this current (A) are the dead zone (1e-4)")
    p.add_argument("--range", nargs=2, type=float, default=(0.0, 4.0), metavar=("MIN", "MAX"),
                   help="the csink current range in A (0 4)")
    p.set_defaults(func=cmd_fit)


def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cmd_collect(args) -> int:
    from bluesky.utils import RunEngineInterrupted

    from calbench.analysis.batmet import format_point, write_calibration_file
    from calbench.lab import make_device
    from calbench.plans.batmet import PROCEDURE, collect_sink_calibration
    from calbench.session import configure_ca, make_run_engine

    cfg = config_from_args(args)
    configure_ca(cfg)
    dmm = make_device(cfg, "dmm", timeout=args.timeout)
    batmet = make_device(cfg, "batmet", timeout=args.timeout)
    psu = None
    if not args.no_psu and "psu" in cfg.instruments:
        psu = make_device(cfg, "psu", timeout=args.timeout)
    with contextlib.redirect_stdout(sys.stderr):     # stdout carries the data lines only
        RE, bec, catalog = make_run_engine(cfg, interactive=False)
    bec.disable_table()
    bec.disable_baseline()

    keys = {}

    def print_points(name, doc):
        if name == "start":
            keys.clear()
            if doc.get("procedure") == PROCEDURE:
                keys.update(doc["sink_calibration"])
        elif name == "descriptor" and keys:
            keys["primary"] = doc["uid"] if doc.get("name") == "primary" else keys.get("primary")
        elif name == "event" and keys and doc["descriptor"] == keys.get("primary"):
            print(format_point(doc["data"][keys["dac_key"]], doc["data"][keys["current_key"]]),
                  flush=True)

    RE.subscribe(print_points)
    result = {}

    def plan():
        result["scan"] = yield from collect_sink_calibration(
            dmm, batmet, psu, dac_start=args.dac_start, dac_stop=args.dac_stop,
            dac_step=args.dac_step, readings_per_point=args.readings,
            stop_current_A=args.stop_current)

    try:
        RE(plan())
    except RunEngineInterrupted:
        RE.abort("interrupted from the command line")     # runs the plan's clean-up: DAC 0
        _note("Error: interrupted; the DAC is back at 0")
        return 130
    scan = result["scan"]
    if args.output:
        write_calibration_file(args.output, scan.dac, scan.current_A)
        _note(f"wrote {len(scan.dac)} points to {args.output}")
    where = (f"tiled catalog '{cfg.tiled_catalog}'" if catalog is not None else
             f"the journal {cfg.journal_dir} (`calbench tiled replay` stores it in tiled)")
    _note(f"{len(scan.dac)} points; {scan.stop_reason}; run {scan.uid} stored in {where}")
    _note(f"next: calbench batmet fit -c {args.output or 'calibration_d_i.txt'}  "
          f"(or --run {scan.uid})")
    return 0


def cmd_fit(args) -> int:
    from calbench.analysis.batmet import fit_sink, plot_sink_fit, read_calibration_file

    if args.run:
        from calbench.plans.batmet import fit_stored_scan
        from calbench.tiled_service import connect_catalog

        cfg = config_from_args(args)
        fit = fit_stored_scan(connect_catalog(cfg, start=False), args.run)
        if args.min_current != 1e-4:
            fit = fit_sink(fit.dac, fit.current_A, min_current_A=args.min_current)
        dac = current = None
        plot = args.plot or cfg.results_dir / "batmet" / f"sink_fit_{args.run[:8]}.png"
        title = f"BatMet current sink, run {args.run[:8]}"
    else:
        dac, current = read_calibration_file(args.calibration)
        fit = fit_sink(dac, current, min_current_A=args.min_current)
        plot = args.plot or args.calibration.with_name(args.calibration.stem + "_fit.png")
        title = f"BatMet current sink, {args.calibration.name}"
    print(fit.csink_line(*args.range), flush=True)
    lo, hi = fit.current_range_A
    _note(f"accuracy over {lo:.3f}..{hi:.3f} A ({fit.n_points} points): max "
          f"{fit.max_error_A * 1e3:.2f} mA, RMS {fit.rms_error_A * 1e3:.2f} mA; 1 DAC code = "
          f"{fit.lsb_A * 1e3:.2f} mA")
    plot_sink_fit(fit, dac, current, path=plot, title=title)
    _note(f"plot saved to {plot}")
    return 0


def demo_step(ctx):
    """`calbench demo`: the sink calibration (scan, fit from tiled, csink written and verified),
    with the lab's table and plot written next to it."""
    from calbench.analysis.batmet import plot_sink_fit, write_calibration_file
    from calbench.plans.batmet import calibrate_sink
    from calbench.procedures.demo import DemoResult

    out = ctx.cfg.results_dir / "batmet"
    out.mkdir(parents=True, exist_ok=True)
    cal = ctx.RE(calibrate_sink(ctx.devices["dmm"], ctx.devices["batmet"], ctx.devices["psu"],
                                catalog=ctx.catalog, write=True, md={"purpose": "demo"})).plan_result
    table = write_calibration_file(out / "calibration_d_i.txt", cal.scan.dac, cal.scan.current_A)
    plot = out / "calibration_d_i_fit.png"
    plot_sink_fit(cal.fit, cal.scan.dac, cal.scan.current_A, path=plot)
    accuracy = (f"; set with sink: max {cal.accuracy.max_error_A * 1e3:.2f} mA"
                if cal.accuracy else "")
    return DemoResult("BatMet current-sink calibration", [u for u in cal.run_uids if u],
                      [str(table), str(plot)],
                      f"{cal.csink}  (fit max {cal.fit.max_error_A * 1e3:.2f} mA, RMS "
                      f"{cal.fit.rms_error_A * 1e3:.2f} mA{accuracy})")
