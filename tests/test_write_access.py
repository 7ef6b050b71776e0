"""Access rules from the lab file: the lab's own user on the local host writes, others read only.

A second system user (created here if missing; needs root) runs real clients: pyepics (libca, which
reports the process's real user) and caproto-put (which does not check access rights itself, so
its refused put shows that the IOC enforces them)."""
from __future__ import annotations

import os
import pwd
import shutil
import site
import subprocess
import sys

import pytest
from caproto.threading.client import Context

from calbench.config import WriteAccess, parse_config
from calbench.iocs.build import build_iocs
from calbench.iocs.server import IocThread, loopback_ca_environment
from conftest import own_ca_port, own_prefix

GUEST = "calbench-guest"
# the clients' packages, for an interpreter the second user may run (this one may sit in /root)
CLIENT_PATH = os.pathsep.join(site.getsitepackages())


@pytest.fixture(scope="module")
def guest():
    """(user name, python) of a second user that can run the CA clients."""
    if os.geteuid() != 0 or not shutil.which("runuser"):
        pytest.skip("a second user needs root (useradd, runuser)")
    try:
        pwd.getpwnam(GUEST)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                        GUEST], check=True)
    for python in (sys.executable, "/usr/bin/python3", shutil.which("python3")):
        if python and _as(GUEST, python, "-c", "import caproto, epics").returncode == 0:
            return GUEST, python
    pytest.skip(f"no Python interpreter that {GUEST} may run imports caproto and pyepics")


@pytest.fixture
def xray(lab_config, monkeypatch):
    own_ca_port(monkeypatch)
    cfg = own_prefix(lab_config, "W")
    server = IocThread(build_iocs(cfg, ["xraybox"])).start()
    yield cfg.prefix_of("xraybox")
    server.stop()


def _as(user: str, *command: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **loopback_ca_environment(), "USER": user, "LOGNAME": user, "HOME": "/tmp",
           "PYTHONPATH": CLIENT_PATH}
    return subprocess.run(["runuser", "-u", user, "--", *command], capture_output=True, text=True,
                          timeout=120, env=env)


def _current(prefix: str) -> float:
    ctx = Context()
    try:
        pv, = ctx.get_pvs(prefix + "Current", timeout=10)
        return float(pv.read(timeout=10).data[0])
    finally:
        ctx.disconnect()


def test_another_user_reads_but_cannot_write(xray, guest):
    user, python = guest
    pv = xray + "Current"
    # caproto-put sends the put whatever the access rights: the IOC refuses it
    put = _as(user, python, "-m", "caproto.commandline.put", "--no-repeater", "-c", pv, "7.5")
    assert "cannot write" in put.stdout + put.stderr, put
    assert _current(xray) == 0.0
    # pyepics (libca) sees read-only access and refuses to send
    script = ("import epics; pv = epics.PV(%r); pv.wait_for_connection(10); "
              "print('read', pv.get(), 'write_access', pv.write_access); "
              "epics.caput(%r, 7.5, wait=True)" % (pv, pv))
    epics_put = _as(user, python, "-c", script)
    assert "read 0.0 write_access False" in epics_put.stdout, epics_put
    assert epics_put.returncode != 0 and "Write access denied" in epics_put.stderr, epics_put
    assert _current(xray) == 0.0
    # the lab's own user writes (the same command as root)
    mine = subprocess.run([sys.executable, "-m", "caproto.commandline.put", "--no-repeater", "-c",
                           pv, "7.5"], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **loopback_ca_environment()})
    assert "cannot write" not in mine.stdout + mine.stderr, mine
    assert _current(xray) == 7.5


def test_the_lab_file_names_who_may_write(tmp_path):
    cfg = parse_config({"lab": {"write_users": ["alice", "bob"]},
                        "instruments": {"caen": {"write_hosts": ["localhost", "192.0.2.7"]},
                                        "dmm": {}}}, tmp_path / "lab.toml")
    caen, dmm = cfg.instruments["caen"].access, cfg.instruments["dmm"].access
    assert caen.allows("192.0.2.7", "bob") and caen.allows("127.0.0.1", "alice")
    assert not caen.allows("192.0.2.8", "bob") and not caen.allows("127.0.0.1", "root")
    assert dmm.allows("127.0.0.1", "alice") and not dmm.allows("192.0.2.7", "alice")
    assert WriteAccess.default().allows("127.0.0.1", pwd.getpwuid(os.getuid()).pw_name)
