"""The IPython profile's startup files load in bluesky-queueserver and expose the lab's plans and
devices, wired to the running simulated IOCs and the tiled server."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml

from calbench.iocs.server import loopback_ca_environment

ROOT = Path(__file__).resolve().parents[1]


def test_queueserver_lists_plans_and_devices(lab, tiled_server, tmp_path):
    env = {**os.environ, **loopback_ca_environment(), "CALBENCH_HOME": str(tmp_path),
           "CALBENCH_PV_PREFIX": lab.cfg.pv_prefix, "CALBENCH_TILED_URI": tiled_server.uri,
           "CALBENCH_TILED_API_KEY": tiled_server.api_key, "MPLBACKEND": "Agg"}
    env.pop("CALBENCH_CONFIG", None)
    qserver = Path(os.sys.executable).with_name("qserver-list-plans-devices")
    done = subprocess.run([str(qserver), "--startup-dir", str(ROOT / "profile_collection" / "startup"),
                           "--file-dir", str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "no IOC answers" not in done.stdout, done.stdout
    listed = yaml.safe_load((tmp_path / "existing_plans_and_devices.yaml").read_text())
    assert {"box", "det", "crate", "layer", "dmm", "psu", "batmet", "fee", "scan", "vrf_scan",
            "calibrate_eiger", "stress_test", "calibrate_sink", "transit_time_calibration"} <= (
        set(listed["existing_devices"]) | set(listed["existing_plans"]))
    assert "box" in listed["existing_devices"]
    assert "xrf_exposure" in listed["existing_plans"]
