"""The IPython profile as a Bluesky user meets it: bp/bps/bpp, db, sd with the lab's baseline, the
magics, RE.md from the lab file, a saved plot, the session log, and an exit without tracebacks."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from calbench.config import DEFAULT_CONFIG
from calbench.iocs.server import loopback_ca_environment

ROOT = Path(__file__).resolve().parents[1]

SESSION = """\
assert db is cat and callable(bp.scan) and callable(bps.mv) and callable(bpp.run_decorator)
print("BASELINE", sorted(s.name for s in sd.baseline))
%wa sources
RE(bp.list_scan([dmm], psu.voltage, [1.0, 2.0]))
run = cat[-1]
print("STREAMS", sorted(run))
print("MD", run.metadata["start"]["operator"], run.metadata["start"]["proposal"])
"""


def run_profile(lab, tiled_server, home: Path, script: str, timeout: float = 300):
    """Run `script` in the profile, in lab home `home`; detector files go to the session lab's
    data folder, the one its tiled server may read (as in one lab home)."""
    lab_file = home / "lab.toml"
    lab_file.write_text(DEFAULT_CONFIG.read_text()
                        .replace('operator = ""', 'operator = "ada"')
                        .replace('proposal = ""', 'proposal = "P-123"')
                        .replace('data_dir = "data"', f'data_dir = "{lab.cfg.data_dir}"', 1))
    (home / "session.ipy").write_text(script)
    env = {**os.environ, **loopback_ca_environment(), "CALBENCH_HOME": str(home),
           "CALBENCH_CONFIG": str(lab_file), "CALBENCH_PV_PREFIX": lab.cfg.pv_prefix,
           "CALBENCH_TILED_URI": tiled_server.uri, "CALBENCH_TILED_API_KEY": tiled_server.api_key,
           "MPLBACKEND": "Agg"}
    ipython = Path(sys.executable).with_name("ipython")
    return subprocess.run([str(ipython), "--profile-dir", str(ROOT / "profile_collection"),
                           "--colors=nocolor", str(home / "session.ipy")], env=env, cwd=home,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_profile_conventions_and_quiet_exit(lab, tiled_server, tmp_path):
    done = run_profile(lab, tiled_server, tmp_path, SESSION)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "Traceback" not in out and "cannot schedule" not in out, out[-4000:]
    baseline = next(line for line in out.splitlines() if line.startswith("BASELINE"))
    for name in ("xraybox_voltage", "xraybox_current", "xraybox_xrf_shutter", "eiger_temperature",
                 "fee_temperature", "caen_l1"):
        assert name in baseline, baseline
    assert "box                                    xraybox" in out      # %wa by label
    assert "STREAMS ['baseline', 'primary']" in out, out[-3000:]
    assert "MD ada P-123" in out
    plots = list((tmp_path / "results" / "plots").glob("scan*_list_scan_*.png"))
    assert len(plots) == 1 and f"plot saved: {plots[0]}" in out
    assert list((tmp_path / "logs").glob("session-*.log"))
