"""The demo lives in a lab home of its own, and the lines it prints read its runs back."""
from __future__ import annotations

import contextlib
import io
from dataclasses import replace

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
from ophyd import Signal

from calbench.procedures.demo import DemoResult, demo_catalog, demo_config, print_snippets
from calbench.iocs.server import free_port
from calbench.tiled_service import stop_embedded


def test_demo_config_moves_every_directory_into_its_home(lab_config):
    demo = demo_config(lab_config)
    assert demo.home == lab_config.home / "demo"
    assert demo.results_dir.is_relative_to(demo.home) and demo.data_dir.is_relative_to(demo.home)
    for inst in demo.instruments.values():
        for key, value in inst.settings.items():
            if key.endswith("_dir") and value:
                assert str(value).startswith(str(demo.home)), (inst.name, key, value)
    assert demo.tiled_port == lab_config.tiled_port + 1
    assert demo.pv_prefix == lab_config.pv_prefix + "DEMO:"


@bpp.run_decorator(md={"plan_name": "fee_like", "purpose": "demo"})
def _sweep_only():
    yield from bps.trigger_and_read([Signal(name="tdc", value=3.0)], name="fee_sweep")


def test_printed_snippets_run_as_printed(lab_config, tmp_path, monkeypatch):
    from bluesky import RunEngine

    from calbench.persistence import TiledPersister

    cfg = replace(lab_config, home=tmp_path, tiled_port=free_port())
    cat = demo_catalog(cfg)                          # the demo's own server, started on demand
    try:
        RE = RunEngine({})
        RE.subscribe(TiledPersister(cat, journal_directory=tmp_path / "journal"))
        (uid,) = RE(_sweep_only())
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            print_snippets([DemoResult("FEE-like", [uid])], cat)
        lines = [line.strip() for line in out.getvalue().splitlines() if line.startswith("   ")]
        assert f"cat['{uid}']['fee_sweep'].read()     # FEE-like" in lines
        monkeypatch.setenv("CALBENCH_HOME", str(tmp_path))   # where the lab's home would be
        namespace = {}
        exec(lines[0].replace("demo_catalog()", "demo_catalog(cfg)"), {"cfg": cfg}, namespace)
        for line in lines[1:]:
            exec(line.split("#")[0], namespace)
        assert namespace["cat"][uid]["fee_sweep"].read()["tdc"].values.tolist() == [3.0]
    finally:
        stop_embedded(demo_config(cfg).home / "tiled")
