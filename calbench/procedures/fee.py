"""The Daya Bay FEE cable transit-time calibration from the command line, and its demo step.

    calbench fee table [--results DIR] [--repeats N]        the paper's table (fee_paper.py):
                                                            figure + text table under DIR
    calbench fee calibrate --channel N [--method M]         one calibration on the running IOCs
"""
from __future__ import annotations

import sys
from pathlib import Path

from calbench.procedures.fee_paper import format_paper_table, reproduce_paper_table


def demo_step(ctx):
    """`calbench demo`: one calibration of channel 0 through the IOC into tiled, then the table."""
    from calbench.procedures.demo import DemoResult
    from calbench.plans.fee import transit_time_calibration

    plots = ctx.cfg.results_dir / "fee"
    uids = ctx.RE(transit_time_calibration(ctx.devices["fee"], 0, plot_dir=plots),
                  purpose="demo").run_start_uids
    study, files = reproduce_paper_table(plots, repeats=10)
    truth = ctx.backends["fee"].truth(0)
    last = study.rows["likelihood"][-1]
    return DemoResult("FEE: cable transit-time calibration and the paper's table", list(uids),
                      files=[str(f) for f in [*sorted(plots.glob("fee_ch00_walk_*.png")), *files]],
                      summary=f"channel 0: 2L/v = {truth['transit_ns']:.3f} ns simulated; "
                              f"dL = {last.added_mm} mm: {last.measured_ns:.3f} ns measured, "
                              f"{last.expected_ns:.3f} ns expected")


def add_cli(subparsers) -> None:
    """Register `calbench fee table|calibrate`."""
    parser = subparsers.add_parser("fee", help="FEE cable transit-time calibration")
    sub = parser.add_subparsers(dest="fee_cmd", required=True)
    p = sub.add_parser("table", help="reproduce the paper's table on the simulator")
    p.add_argument("--results", type=Path, help="output directory (default: <results_dir>/fee)")
    p.add_argument("--repeats", type=int, default=20, help="repeated calibrations per length (20)")
    p.add_argument("--seed", type=int, default=2014)
    p.set_defaults(func=_cmd_table)
    p = sub.add_parser("calibrate", help="calibrate one channel on the running FEE IOC")
    p.add_argument("--channel", type=int, required=True)
    p.add_argument("--method", choices=("binned", "likelihood"), default="likelihood")
    p.add_argument("--start", type=int, default=500)
    p.add_argument("--stop", type=int, default=12000)
    p.add_argument("--step", type=int, default=1)
    p.set_defaults(func=_cmd_calibrate)


def _cmd_table(args) -> int:
    from calbench.config import load_config

    out = args.results or load_config(getattr(args, "config", None)).results_dir / "fee"
    study, files = reproduce_paper_table(out, repeats=args.repeats, seed=args.seed)
    print(format_paper_table(study), end="")
    for f in files:
        print(f"wrote {f}", file=sys.stderr)
    return 0


def _cmd_calibrate(args) -> int:
    from calbench.config import load_config
    from calbench.lab import make_device
    from calbench.plans.fee import FeeCalibrationError, transit_time_calibration
    from calbench.session import configure_ca, make_run_engine

    cfg = load_config(getattr(args, "config", None))
    configure_ca(cfg)
    fee = make_device(cfg, "fee", timeout=10.0)
    RE, _, _ = make_run_engine(cfg, interactive=False)
    RE.md["purpose"] = "fee calibrate"
    result = {}

    def plan():
        result["c"] = yield from transit_time_calibration(
            fee, args.channel, args.start, args.stop, args.step, method=args.method,
            plot_dir=cfg.results_dir / "fee")

    try:
        RE(plan())
    except FeeCalibrationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    c = result["c"]
    print(f"channel {c.channel}: dt = {c.dt_ns:.3f} +- {c.dt_err_ns:.3f} ns, L = {c.length_m:.3f} m "
          f"at {c.temperature_C:.2f} degC (runs {c.sweep_uid}, {c.fit_uid})")
    return 0
