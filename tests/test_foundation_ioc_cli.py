"""`calbench ioc run` as a lab would start it: a separate process, found over CA, stopped by SIGTERM
with every instrument left safe."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

from caproto.threading.client import Context

from calbench.iocs.server import loopback_ca_environment

from conftest import free_port


def test_ioc_process_serves_and_shuts_down_cleanly(tmp_path, monkeypatch):
    prefix = f"C{uuid.uuid4().hex[:6]}:"
    # a port of its own: the session's in-process IOCs answer searches on the session's port
    port = str(free_port())
    monkeypatch.setenv("EPICS_CA_SERVER_PORT", port)
    monkeypatch.setenv("EPICS_CAS_SERVER_PORT", port)
    env = {**os.environ, **loopback_ca_environment(), "CALBENCH_HOME": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "calbench.cli", "ioc", "run", "xraybox", "--sim",
                             "--prefix", prefix, "--time-scale", "10"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if line.startswith("serving"):
                break
        ctx = Context()
        hv, current, rbv = ctx.get_pvs(f"{prefix}XRAY:HV", f"{prefix}XRAY:Current",
                                       f"{prefix}XRAY:Current_RBV", timeout=10)
        hv.write([1], wait=True, timeout=10)
        current.write([12.5], wait=True, timeout=10)
        deadline = time.monotonic() + 30
        while rbv.read(timeout=5).data[0] != 12.5 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert rbv.read(timeout=5).data[0] == 12.5
        ctx.disconnect()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "instruments left safe" in out


def test_ioc_list_names_every_instrument(capsys):
    from calbench.cli import main
    from calbench.instruments import INSTRUMENTS
    assert main(["ioc", "list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in INSTRUMENTS)


def test_pv_names_are_listed_without_serving(tmp_path):
    """`ioc list --pvs` and `ioc run --list-pvs` print the names and exit: nothing stays served."""
    prefix = f"L{uuid.uuid4().hex[:6]}:"
    env = {**os.environ, **loopback_ca_environment(), "CALBENCH_HOME": str(tmp_path)}
    for args in (["ioc", "list", "--pvs", "xraybox"], ["ioc", "run", "xraybox", "--list-pvs"]):
        done = subprocess.run([sys.executable, "-m", "calbench.cli", *args, "--prefix", prefix],
                              capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        names = done.stdout.split()
        assert f"{prefix}XRAY:Shutter:XRF_RBV" in names and f"{prefix}XRAY:HV" in names
        assert not any(name.startswith("serving") for name in names)
