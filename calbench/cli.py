"""`calbench` command line: IOCs, the embedded tiled server, the lab's start-up, procedure tools.

    calbench ioc list [--pvs [NAME ...]]       instruments and their worlds, or their PV names
    calbench ioc run [NAME ...] [--sim] [--prefix P] [--interfaces A ...] [--time-scale X] [--list-pvs]
    calbench tiled start|stop|status|replay|serve
    calbench up | down [--force]               simulated IOCs, tiled, Redis + RE Manager in the background
    calbench queue start|stop|status|keys      the queue server alone (see calbench.queue_service)
    calbench demo                              non-interactive tour of every procedure
    calbench <procedure> ...                   procedure tools (batmet, qc6, fee, eiger)

The core's commands are here; each procedure's live with it in calbench.procedures, registered below.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from calbench.config import ConfigError, load_config, private_dir
from calbench.instruments import INSTRUMENTS

# Modules contributing subcommands: each defines add_cli(subparsers). The procedures' own, then the
# queue server's (a core service).
PROCEDURE_CLIS: list[str] = ["calbench.procedures.batmet", "calbench.procedures.qc6",
                             "calbench.procedures.fee", "calbench.procedures.eiger",
                             "calbench.queue_cli"]


def config_from_args(args):
    """The lab configuration of a command: --config, with --prefix (where the command has it)."""
    cfg = load_config(args.config)
    if getattr(args, "prefix", None):
        cfg = cfg.with_overrides(pv_prefix=args.prefix)
    return cfg


# -- ioc ----------------------------------------------------------------------------------------
def cmd_ioc_list(args) -> int:
    cfg = config_from_args(args)
    if args.pvs:
        return _print_pvs(cfg, args.names or None)
    for name, spec in INSTRUMENTS.items():
        icfg = cfg.instruments.get(name)
        where = f"{cfg.prefix_of(name):<14} {icfg.backend:<8}" if icfg else f"{'(not configured)':<23}"
        print(f"{name:<10} {where} world={spec.world:<6} {spec.description}")
    return 0


def _print_pvs(cfg, names) -> int:
    """The PV names the instruments would serve, from their simulated IOCs: nothing is served and
    no hardware is touched."""
    from calbench.iocs.build import build_iocs
    groups = build_iocs(cfg, names, force_sim=True)
    print("\n".join(sorted(pv for g in groups for pv in g.pvdb)), flush=True)
    return 0


def cmd_ioc_run(args) -> int:
    from calbench.iocs.build import build_iocs
    from calbench.iocs.one_server import AlreadyServed, describe_this_server, refuse_if_served
    from calbench.iocs.server import ca_serving_environment, serve_forever

    cfg = config_from_args(args)
    if args.interfaces:
        cfg = cfg.with_overrides(interfaces=tuple(args.interfaces))
    names = args.names or None
    if args.list_pvs:
        return _print_pvs(cfg, names)
    from calbench.contracts.errors import InstrumentFault
    ca_serving_environment(cfg.interfaces)
    try:    # before any backend opens its instrument: another IOC may be driving it
        refuse_if_served([cfg.prefix_of(n) for n in names or cfg.instruments], list(cfg.interfaces))
    except AlreadyServed as exc:
        print(f"calbench ioc run: not started: {exc}", file=sys.stderr, flush=True)
        return 1
    try:
        groups = build_iocs(cfg, names, force_sim=args.sim, time_scale=args.time_scale)
    except InstrumentFault as exc:        # a hardware backend could not open its instrument
        print(f"calbench: cannot start the IOCs: {exc}", file=sys.stderr)
        return 1
    pvs = [pv for g in groups for pv in g.pvdb]
    unsafe = serve_forever(
        groups, cfg.interfaces, who=describe_this_server(str(cfg.home)), check=False,
        announce=f"serving {len(pvs)} PVs of {', '.join(names or cfg.instruments)} on "
                 f"{', '.join(cfg.interfaces)} (prefix {cfg.pv_prefix}); Ctrl-C stops")
    if unsafe:
        print("IOCs stopped; NOT made safe: " + "; ".join(unsafe) + ". Make these instruments "
              "safe by hand now", flush=True)
        return 1
    print("IOCs stopped; instruments left safe", flush=True)
    return 0


# -- tiled --------------------------------------------------------------------------------------
def cmd_tiled(args) -> int:
    from calbench.tiled_service import ensure_tiled, healthy, stop_embedded

    cfg = config_from_args(args)
    if args.action == "start":
        ep = ensure_tiled(cfg)
        print(f"tiled: {ep.uri} (catalog '{cfg.tiled_catalog}', files in {ep.directory})")
    elif args.action == "stop":
        print("stopped" if stop_embedded(cfg.home / "tiled") else "not running")
    elif args.action == "replay":
        return cmd_tiled_replay(cfg)
    else:
        uri = cfg.tiled_uri or f"http://127.0.0.1:{cfg.tiled_port}"
        up = healthy(uri)
        print(f"tiled at {uri}: {'up' if up else 'down'}")
        return 0 if up else 1
    return 0


def cmd_tiled_replay(cfg) -> int:
    """Store the journaled runs of ended sessions in tiled, exactly once."""
    from calbench.journal import pending
    from calbench.session import replay_journal
    from calbench.tiled_service import connect_catalog

    waiting = len(pending(cfg.journal_dir))
    if not waiting:
        print(f"no run waits in the journal {cfg.journal_dir}")
        return 0
    results = replay_journal(connect_catalog(cfg), cfg)
    left = len(pending(cfg.journal_dir))
    if left:
        print(f"{left} run(s) stay in {cfg.journal_dir} (written by a live session, or failed "
              "above)")
    return 1 if any(r.outcome.startswith("failed") for r in results) else 0


def cmd_tiled_serve(args) -> int:
    from calbench.tiled_serve import serve
    serve(args)
    return 0


# -- up/down: the background services of `make run` ------------------------------------------------
def _pidfile(cfg) -> Path:
    return cfg.home / "iocs.pid"


def _alive(pidfile: Path) -> bool:
    try:
        os.kill(int(pidfile.read_text()), 0)
        return True
    except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
        return False


def start_iocs_background(cfg, *, wait_s: float = 30.0) -> None:
    """Start `calbench ioc run --sim` for every configured instrument, detached, if not running."""
    pidfile = _pidfile(cfg)
    if _alive(pidfile):
        return
    private_dir(cfg.home)
    log = os.fdopen(os.open(cfg.home / "iocs.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600),
                    "ab")
    cmd = [sys.executable, "-m", "calbench.cli", "--config", str(cfg.source), "ioc", "run",
           "--prefix", cfg.pv_prefix]
    env = {**os.environ, "CALBENCH_HOME": str(cfg.home)}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, env=env)
    pidfile.write_text(str(proc.pid))
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pidfile.unlink(missing_ok=True)
            last = (cfg.home / "iocs.log").read_text(errors="replace").strip().splitlines()[-1:]
            raise RuntimeError(f"the IOCs exited with code {proc.returncode}: "
                               f"{last[0] if last else 'no output'} (log: {cfg.home / 'iocs.log'})")
        if b"serving" in (cfg.home / "iocs.log").read_bytes()[-4000:]:
            return
        time.sleep(0.2)
    raise RuntimeError(f"the IOCs did not start within {wait_s} s; see {cfg.home / 'iocs.log'}")


def cmd_up(args) -> int:
    from calbench.tiled_service import ensure_tiled

    cfg = config_from_args(args)
    from calbench.queue_service import start_queue

    start_iocs_background(cfg)
    ep = ensure_tiled(cfg)
    print(f"IOCs: prefix {cfg.pv_prefix} (log {cfg.home / 'iocs.log'}); tiled: {ep.uri}")
    print(start_queue(cfg))
    return 0


def cmd_down(args) -> int:
    from calbench.tiled_service import stop_embedded

    from calbench.queue_service import stop_queue

    cfg = config_from_args(args)
    for name in stop_queue(cfg, force=args.force):      # before the IOCs its plans talk to
        print(f"{name} stopped")
    pidfile = _pidfile(cfg)
    if _alive(pidfile):
        os.kill(int(pidfile.read_text()), signal.SIGTERM)
        print("IOCs stopped")
    pidfile.unlink(missing_ok=True)
    if stop_embedded(cfg.home / "tiled"):
        print("tiled stopped")
    return 0


def cmd_demo(args) -> int:
    from calbench.procedures.demo import run_demo
    return run_demo(config_from_args(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="calbench", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="lab configuration TOML (default: $CALBENCH_CONFIG, "
                        "./lab.toml, or the embedded simulated lab)")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    ioc = sub.add_parser("ioc", help="run instrument IOCs").add_subparsers(dest="ioc_cmd", required=True)
    p = ioc.add_parser("list", help="list instruments, or with --pvs the PV names they serve")
    p.add_argument("names", nargs="*", help="instruments for --pvs (default: all configured)")
    p.add_argument("--prefix", help="lab-wide PV prefix (default from the configuration)")
    p.add_argument("--pvs", action="store_true", help="print the PV names and exit (serves nothing)")
    p.set_defaults(func=cmd_ioc_list)
    p = ioc.add_parser("run", help="serve instruments (all configured ones by default)")
    p.add_argument("names", nargs="*", help=f"instruments: {', '.join(INSTRUMENTS)}")
    p.add_argument("--sim", action="store_true", help="simulated backends even where the "
                   "configuration says hardware")
    p.add_argument("--prefix", help="lab-wide PV prefix (default from the configuration)")
    p.add_argument("--interfaces", nargs="+", help="addresses to serve on (default 127.0.0.1)")
    p.add_argument("--time-scale", type=float, help="world-clock acceleration of the simulators")
    p.add_argument("--list-pvs", action="store_true",
                   help="print the PV names and exit without serving (as `ioc list --pvs`)")
    p.set_defaults(func=cmd_ioc_run)

    tiled = sub.add_parser("tiled", help="the tiled server and the journal of runs")
    tsub = tiled.add_subparsers(dest="action", required=True)
    for action, text in [("start", "start the embedded server"), ("stop", "stop it"),
                         ("status", "is the server up"),
                         ("replay", "store the journaled runs of ended sessions in tiled")]:
        tsub.add_parser(action, help=text).set_defaults(func=cmd_tiled)
    from calbench.tiled_serve import build_parser as serve_parser
    tsub.add_parser("serve", parents=[serve_parser()], add_help=False,
                    help="serve a catalog (key from a 0600 file)").set_defaults(func=cmd_tiled_serve)
    p = sub.add_parser("up", help="start the simulated IOCs and tiled in the background")
    p.add_argument("--prefix")
    p.set_defaults(func=cmd_up)
    p = sub.add_parser("down", help="stop the queue server, the background IOCs and tiled")
    p.add_argument("--force", action="store_true", help="stop the RE Manager even while a plan runs")
    p.set_defaults(func=cmd_down)
    p = sub.add_parser("demo", help="non-interactive tour of every procedure on the simulators")
    p.set_defaults(func=cmd_demo)
    for module in PROCEDURE_CLIS:
        importlib.import_module(module).add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"calbench: configuration error: {exc}", file=sys.stderr)
        return 2
    except (ConnectionError, RuntimeError, ValueError, FileNotFoundError) as exc:
        print(f"calbench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
