"""`calbench demo` / `make demo`: every procedure once, on the simulators, in a lab home of its own.

The demo never touches the lab's results or catalog: its home is <lab home>/demo (results, data,
its own embedded tiled server on the lab's port + 1, its own RunEngine metadata, so scan ids go on
from one demo to the next). The simulated IOCs run in this process under their own prefix (a
running `make run` session is not disturbed), with the worlds accelerated. The runs stay readable
after the demo: `from calbench.procedures.demo import demo_catalog; cat = demo_catalog()`.

The steps are the procedures' own (`demo_step(ctx) -> DemoResult` in each procedure's module); this
module only lists them, in the order they run, and provides their context.
"""
from __future__ import annotations

import importlib
import os
import time
import traceback
from dataclasses import dataclass, field, replace

from calbench.config import LabConfig, load_config, private_dir

# Each step: "module:function(ctx) -> DemoResult", one per procedure, in this order.
DEMO_STEPS: list[str] = [
    "calbench.procedures.xray:demo_step",
    "calbench.procedures.batmet:demo_step",
    "calbench.procedures.fee:demo_step",
    "calbench.procedures.qc6:demo_step",
    "calbench.procedures.eiger:demo_step",
]
DEMO_TIME_SCALES = {"qc6": 5000.0, "xray": 5.0, "bench": 50.0, "fee": 2000.0}


@dataclass
class DemoResult:
    title: str
    uids: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    summary: str = ""


@dataclass
class DemoContext:
    cfg: LabConfig
    RE: object
    catalog: object
    devices: dict
    backends: dict


def demo_config(cfg: LabConfig | None = None) -> LabConfig:
    """The lab's configuration moved into the demo's home: <home>/demo, tiled on port + 1 (or, on
    an external tiled server, the container 'demo'), PV prefix + 'DEMO:'."""
    cfg = cfg or load_config()
    saved = os.environ.get("CALBENCH_HOME")
    os.environ["CALBENCH_HOME"] = str(cfg.home / "demo")
    try:                  # parsed again so every directory (results, data, instruments') moves
        moved = load_config(cfg.source)
    finally:
        if saved is None:
            os.environ.pop("CALBENCH_HOME", None)
        else:
            os.environ["CALBENCH_HOME"] = saved
    return replace(moved, pv_prefix=cfg.pv_prefix + "DEMO:", tiled_port=cfg.tiled_port + 1,
                   tiled_catalog="demo" if cfg.tiled_uri else cfg.tiled_catalog)


def demo_catalog(cfg: LabConfig | None = None):
    """The catalog the demo's runs are in (its tiled server is started if it is not running)."""
    from calbench.tiled_service import connect_catalog
    return connect_catalog(demo_config(cfg))


def run_demo(lab: LabConfig) -> int:
    """Every procedure's demo step, in the demo's home (demo_config) on in-process simulated IOCs;
    0 if every step succeeded. The demo's tiled server is stopped at the end unless it was running
    before (demo_catalog() starts it again when asked)."""
    from bluesky import RunEngine

    from calbench.iocs.build import build_iocs
    from calbench.iocs.server import IocThread
    from calbench.lab import make_device
    from calbench.persistence import TiledPersister
    from calbench.run_metadata import lab_metadata
    from calbench.session import configure_ca
    from calbench.tiled_service import connect_catalog, healthy, stop_embedded

    from calbench.plans.toolkit import set_results_dir

    cfg = demo_config(lab)
    tiled_was_running = bool(cfg.tiled_uri) or healthy(f"http://127.0.0.1:{cfg.tiled_port}")
    configure_ca(cfg)
    set_results_dir(cfg.results_dir)
    catalog = connect_catalog(cfg)
    groups = build_iocs(cfg, force_sim=True, time_scales=DEMO_TIME_SCALES)
    server = IocThread(groups, cfg.interfaces).start()
    private_dir(cfg.home)
    # metadata (scan_id included) kept in the demo's home: scan ids never restart in its catalog
    md = lab_metadata(cfg.home)
    RE = RunEngine(md, call_returns_result=True, scan_id_source=md.next_scan_id)
    RE.md.update({"operator": "demo", "lab": cfg.name})
    RE.subscribe(TiledPersister(catalog, journal_directory=cfg.journal_dir))
    backends = {name: g.backend for name, g in zip(cfg.instruments, groups)}
    devices = {name: make_device(cfg, name, timeout=10.0) for name in cfg.instruments}
    ctx = DemoContext(cfg, RE, catalog, devices, backends)
    results, failed = [], 0
    try:
        for path in DEMO_STEPS:
            module, _, func = path.partition(":")
            t0 = time.monotonic()
            try:
                result = getattr(importlib.import_module(module), func)(ctx)
            except Exception:
                failed += 1
                print(f"== {path} FAILED\n{traceback.format_exc()}")
                continue
            results.append(result)
            print(f"== {result.title} ({time.monotonic() - t0:.1f} s)")
            if result.summary:
                print(f"   {result.summary}")
            for uid in result.uids:
                print(f"   run  {uid}  {catalog[uid].start.get('plan_name', '')}")
            for f in result.files:
                print(f"   file {f}")
    finally:
        server.stop()
    print_snippets(results, catalog)
    if not tiled_was_running:
        stop_embedded(cfg.home / "tiled")     # demo_catalog() starts it again when asked
    return 1 if failed else 0


def print_snippets(results: list[DemoResult], catalog) -> None:
    """Lines to paste into Python to read the demo's runs back (a test runs them)."""
    print("\nRead the runs back (also after a restart of tiled):")
    print("   from calbench.procedures.demo import demo_catalog; cat = demo_catalog()")
    for r in results:
        for uid in r.uids[:1]:
            streams = list(catalog[uid])
            stream = "primary" if "primary" in streams else streams[0]
            print(f"   cat['{uid}']['{stream}'].read()     # {r.title}")
    print("   from tiled.queries import Key; cat.search(Key('purpose') == 'demo')")
