"""`calbench qc6 ...`: the QC6 tools a lab runs outside an IPython session.

    calbench qc6 plot FILE [FILE ...]      plot QC6 result files (ours or the lab's legacy ones) to
                                           <dir>/Plots/<stem>.png
    calbench qc6 divider VOLTS             the per-electrode voltages of the divider emulation
    calbench qc6 run check|stress|iv|long|resume [--layer N] [--option value ...]
                                           run a procedure against the configured crate, with the
                                           runs stored in tiled (the lab's session set-up)
"""
from __future__ import annotations

import argparse
import sys


def cmd_plot(args) -> int:
    from calbench.analysis.qc6_files import Qc6FileError
    from calbench.analysis.qc6_plots import plot_result_file
    status = 0
    for path in args.files:
        try:
            print(plot_result_file(path, detector_name=args.name))
        except (Qc6FileError, ValueError) as exc:
            print(f"calbench qc6 plot: {exc}", file=sys.stderr)
            status = 1
    return status


def cmd_divider(args) -> int:
    from calbench.devices.caen import ELECTRODE_OFFSET, divider_setpoints
    for electrode, volts in divider_setpoints(args.volts).items():
        print(f"{electrode:<6} ch{ELECTRODE_OFFSET[electrode]}  {volts:8.1f} V")
    return 0


_PROCEDURES = {"check": "check_connection", "stress": "stress_test", "iv": "iv_short_stability",
               "long": "long_stability", "resume": "resume_long_stability"}


def _options(pairs: list[str]) -> dict:
    out = {}
    for item in pairs:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"calbench qc6 run: option {item!r} must be key=value, e.g. hold_h=1.5")
        try:
            out[key] = float(value) if "." in value or "e" in value.lower() else int(value)
        except ValueError:
            out[key] = value
    return out


def cmd_run(args) -> int:
    from calbench.config import load_config
    from calbench.lab import make_device
    from calbench.plans import qc6
    from calbench.session import configure_ca, make_run_engine

    cfg = load_config(args.config)
    configure_ca(cfg)
    RE, _, catalog = make_run_engine(cfg, interactive=True)
    crate = make_device(cfg, "caen")
    layer = crate.layer(args.layer)
    options = _options(args.options)
    plan = getattr(qc6, _PROCEDURES[args.procedure])
    if args.procedure == "check":
        RE(plan(layer))
    elif args.procedure == "resume":
        if catalog is None:
            raise SystemExit("calbench qc6 run resume needs tiled: start it with "
                             "`calbench tiled start`")
        RE(plan(layer, catalog, **options))
    else:
        RE(plan(layer, results_dir=cfg.results_dir, **options))
    return 0


def add_cli(subparsers) -> None:
    """Register `calbench qc6` and its subcommands."""
    p = subparsers.add_parser("qc6", help="GEM QC6 high-voltage tests: plots, divider, runs")
    sub = p.add_subparsers(dest="qc6_command", required=True)
    plot = sub.add_parser("plot", help="plot QC6 result files to <dir>/Plots/<stem>.png")
    plot.add_argument("files", nargs="+", metavar="FILE")
    plot.add_argument("--name", default=None,
                      help="detector name for the title (default: from Results/<name>/...)")
    plot.set_defaults(func=cmd_plot)
    div = sub.add_parser("divider", help="per-electrode voltages of the divider emulation")
    div.add_argument("volts", type=float, help="voltage across the emulated divider (V)")
    div.set_defaults(func=cmd_divider)
    run = sub.add_parser("run", help="run a QC6 procedure on the configured crate")
    run.add_argument("procedure", choices=sorted(_PROCEDURES))
    run.add_argument("--layer", type=int, default=None, help="GEM layer 1 or 2 (default: config)")
    run.add_argument("options", nargs="*", metavar="key=value",
                     help="plan options, e.g. hold_h=1.5 tripmax=3")
    run.set_defaults(func=cmd_run)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (the same commands as `calbench qc6 ...`)."""
    parser = argparse.ArgumentParser(prog="calbench")
    parser.add_argument("--config", default=None)
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def demo_step(ctx):
    """`calbench demo`: the whole QC6 sequence with the lab's defaults on the simulated crate (the
    15 h long stability included: the demo's world clock runs 5000 times faster than the wall)."""
    from calbench.procedures.demo import DemoResult
    from calbench.plans import qc6

    layer = ctx.devices["caen"].layer()
    results = ctx.cfg.results_dir
    uids, files = [], []
    for plan in (qc6.check_connection(layer),
                 qc6.megger_test(layer.detector_name, [14.0, 11.5, 19.0], [0, 1, 0],
                                 comments="demo values", results_dir=results),
                 qc6.stress_test(layer, results_dir=results, live_plot=False),
                 qc6.iv_short_stability(layer, results_dir=results, live_plot=False),
                 qc6.long_stability(layer, results_dir=results, live_plot=False)):
        result = ctx.RE(plan, purpose="demo")
        uids += list(result.run_start_uids)
    for uid in uids:
        files += ctx.catalog[uid].metadata["start"].get("qc6_files", {}).values()
    trips = [r for r in ctx.backends["caen"].trip_log if r.channel in
             {ch.channel for ch in layer.channels}]
    return DemoResult("GEM QC6 on the CAEN crate (the lab's sequence, 17 h of world time)", uids,
                      sorted(files), f"{len(trips)} trips, every one recorded in its run's "
                      "'trips' stream; plots in each result directory's Plots/")


if __name__ == "__main__":
    sys.exit(main())
