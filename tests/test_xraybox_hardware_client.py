"""The X-ray box hardware backend against a stand-in of PSI's client program (same CLI and replies)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from calbench.contracts.errors import InstrumentFault, Refused
from calbench.iocs.hw.xraybox import XrayBoxClient

FAKE = Path(__file__).parent / "fakes" / "xray_box_client.py"
TARGETS = ("In", "Ti", "Cr", "Fe", "Cu", "Ge", "Zr", "Mo", "Ag", "Sn")


@pytest.fixture
def client(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_XRAY_STATE", str(tmp_path / "state.json"))
    wrapper = tmp_path / "xrayClient64"
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} {FAKE} \"$@\"\n")
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:" + __import__("os").environ["PATH"])
    return XrayBoxClient.from_settings({"client": "xrayClient64", "box": "BigXrayBox",
                                        "targets": list(TARGETS)})


def test_commands_round_trip_through_the_client(client):
    s = client.read()
    assert (s.hv_on, s.target, s.shutters, s.safe) == (False, "Cu", {"XRF": False, "Direct": False}, True)
    client.set_hv(True)
    client.set_voltage(40)
    client.set_current(35.5)
    client.set_target("Ge")
    client.set_shutter("XRF", True)
    s = client.read()
    assert s.hv_on and not s.safe
    assert (s.voltage_kV, s.current_mA, s.target) == (40.0, 35.5, "Ge")
    assert s.shutters == {"XRF": True, "Direct": False}
    client.make_safe()
    assert client.read().shutters == {"XRF": False, "Direct": False}


def test_limits_and_garbage_are_reported(client, monkeypatch):
    with pytest.raises(Refused, match="outside 0..80 mA"):
        client.set_current(100)
    with pytest.raises(Refused, match="not installed"):
        client.set_target("Pb")
    monkeypatch.setenv("FAKE_XRAY_GARBAGE", "1")
    with pytest.raises(InstrumentFault, match="unexpected reply to 'getHV'"):
        client.read()


def test_missing_client_program_names_the_setting():
    with pytest.raises(FileNotFoundError, match="instruments.xraybox.client"):
        XrayBoxClient.from_settings({"client": "/nonexistent/xrayClient64"})
