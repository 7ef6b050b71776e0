"""What standard clients show of a refused put (the README's IOC section lists it):

- pyepics: caput(..., wait=True) and PV.put(..., wait=True) return 1 whatever the put's status
  (pyepics does not pass the put-callback status on); the PV is in WRITE alarm, severity MAJOR,
  until its next good put, and StatusMessage_RBV says why.
- caproto's threading client: write(wait=True) returns at once with status ECA_PUTFAIL.
- caproto-put: prints the IOC's reason (the error reply of a put without callback); its exit code
  is 0 either way. caproto-put -c (with callback) prints Old and New, unchanged.
- Every setting publishes its range as control and display limits, with its units.
"""
from __future__ import annotations

import os
import subprocess
import sys

import epics
import pytest
from caproto import AlarmSeverity, AlarmStatus
from caproto.threading.client import Context

from calbench.iocs.server import loopback_ca_environment

WRITE, MAJOR = int(AlarmStatus.WRITE), int(AlarmSeverity.MAJOR_ALARM)


@pytest.fixture
def voltage(lab):
    """The X-ray tube voltage setpoint (kV, 0..60), put back as it was afterwards."""
    name = lab.prefix_of("xraybox") + "Voltage"
    pv = epics.get_pv(name, connect=True, timeout=10)
    before = pv.get(use_monitor=False)
    yield pv, lab.prefix_of("xraybox")
    pv.put(before, wait=True)


def _alarm(pv) -> tuple[int, int]:
    md = pv.get_with_metadata(use_monitor=False, form="time")
    return md["status"], md["severity"]


def test_pyepics_sees_the_limits_and_the_refusal_as_an_alarm(voltage):
    pv, prefix = voltage
    ctrl = pv.get_ctrlvars()
    assert (ctrl["lower_ctrl_limit"], ctrl["upper_ctrl_limit"]) == (0.0, 60.0)
    assert (ctrl["lower_disp_limit"], ctrl["upper_disp_limit"]) == (0.0, 60.0)
    assert ctrl["units"] == "kV"
    old = pv.get(use_monitor=False)
    assert epics.caput(pv.pvname, 75.0, wait=True) == 1          # pyepics ignores the status
    assert pv.get(use_monitor=False) == old
    assert _alarm(pv) == (WRITE, MAJOR)
    message = epics.caget(prefix + "StatusMessage_RBV", as_string=True, use_monitor=False)
    assert f"{pv.pvname} = 75 is outside 0..60 kV" in message
    assert pv.put(float("nan"), wait=True) == 1
    assert _alarm(pv) == (WRITE, MAJOR)
    pv.put(old + 1.0, wait=True)                                  # a good put clears the alarm
    assert _alarm(pv) == (0, 0)
    assert pv.get(use_monitor=False) == old + 1.0


def test_caproto_client_and_command_line_report_the_refusal(voltage):
    pv, prefix = voltage
    ctx = Context()
    try:
        channel, = ctx.get_pvs(pv.pvname, timeout=10)
        reply = channel.write([-5.0], wait=True, timeout=10)
        assert reply.status.name == "ECA_PUTFAIL"
    finally:
        ctx.disconnect()
    env = {**os.environ, **loopback_ca_environment()}
    # --no-repeater: caproto-put would spawn a repeater daemon that holds the captured output open
    put = [sys.executable, "-m", "caproto.commandline.put", "--no-repeater"]
    plain = subprocess.run(put + [pv.pvname, "1e9"], capture_output=True, text=True, timeout=120,
                           env=env)
    assert f"refused: {pv.pvname} = 1000000000 is outside 0..60 kV" in plain.stdout, plain
    assert plain.returncode == 0           # caproto-put's exit code does not tell
    notify = subprocess.run(put + ["-c", pv.pvname, "1e9"], capture_output=True, text=True,
                            timeout=120, env=env)
    old_line, new_line = notify.stdout.splitlines()[-2:]
    assert old_line.split()[-1] == new_line.split()[-1], notify
    assert _alarm(pv) == (WRITE, MAJOR)
