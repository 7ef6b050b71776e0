"""One IOC per prefix: a second IOC for PVs that answer already refuses to start and names the
server (host, port, process) and how to stop it; `calbench up` from another lab home says so."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import replace

import pytest
from caproto.threading.client import Context

from calbench.iocs.build import build_iocs
from calbench.iocs.server import AlreadyServed, IocThread, free_port, loopback_ca_environment


@pytest.fixture
def own_port(monkeypatch):
    """A CA port of this test's own (the session's IOCs answer on the session's port)."""
    port = str(free_port())
    monkeypatch.setenv("EPICS_CA_SERVER_PORT", port)
    monkeypatch.setenv("EPICS_CAS_SERVER_PORT", port)
    return port


def test_a_second_ioc_for_the_same_prefix_refuses_to_start(lab_config, own_port):
    cfg = replace(lab_config, pv_prefix=f"D{uuid.uuid4().hex[:6]}:")
    first = IocThread(build_iocs(cfg, ["xraybox"])).start()
    try:
        with pytest.raises(AlreadyServed) as refused:
            IocThread(build_iocs(cfg, ["xraybox"])).start()
        message = str(refused.value)
        assert f"{cfg.pv_prefix}XRAY:* are served by 127.0.0.1:{own_port} already" in message
        assert f"pid {os.getpid()}" in message and "stop:" in message
        # the first one serves on, alone; another prefix starts beside it
        ctx = Context()
        hv, = ctx.get_pvs(f"{cfg.pv_prefix}XRAY:HV_RBV", timeout=10)
        assert hv.read(timeout=10).data[0] == 0
        ctx.disconnect()
        other = replace(cfg, pv_prefix=f"E{uuid.uuid4().hex[:6]}:")
        IocThread(build_iocs(other, ["xraybox"])).start().stop()
    finally:
        first.stop()


def test_calbench_up_from_another_lab_home_on_the_same_port_says_who_serves(tmp_path, own_port):
    prefix = f"U{uuid.uuid4().hex[:6]}:"
    env = {**os.environ, **loopback_ca_environment()}
    first_home, second_home = tmp_path / "lab1", tmp_path / "lab2"
    first = subprocess.Popen([sys.executable, "-m", "calbench.cli", "ioc", "run", "xraybox",
                              "--sim", "--prefix", prefix], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True,
                             env={**env, "CALBENCH_HOME": str(first_home)})
    second_env = {**env, "CALBENCH_HOME": str(second_home)}
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not first.stdout.readline().startswith("serving"):
            assert first.poll() is None, "the first IOC did not start"
        ctx = Context()         # the first IOC answers over CA
        ctx.get_pvs(f"{prefix}XRAY:Server_RBV", timeout=30)[0].read(timeout=30)
        ctx.disconnect()
        second = subprocess.run([sys.executable, "-m", "calbench.cli", "up", "--prefix", prefix],
                                capture_output=True, text=True, timeout=120, env=second_env)
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=30)
        if (second_home / "iocs.pid").exists():       # it started after all: stop what it started
            subprocess.run([sys.executable, "-m", "calbench.cli", "down"], env=second_env,
                           timeout=120)
    assert second.returncode == 1, second.stdout + second.stderr
    assert f"{prefix}XRAY:* are served by 127.0.0.1:{own_port} already" in second.stderr
    assert f"pid {first.pid}" in second.stderr
    assert f"CALBENCH_HOME={first_home} calbench down" in second.stderr
    assert not (second_home / "iocs.pid").exists()
