"""The CAEN hardware backend (iocs/hw/caen.py) against a stand-in for caen_libs.caenhvwrapper with
the binding's interface (Device.open, get_crate_map, get_ch_param, set_ch_param, get_ch_param_prop,
get_ch_name, exec_comm, Error with an ErrorCode), as the real binding needs CAEN's C library."""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from types import SimpleNamespace

import pytest

from calbench.contracts.errors import InstrumentFault, Refused
from calbench.iocs.hw.caen import CaenHvCrate, from_settings


class FakeHv:
    """The parts of caen_libs.caenhvwrapper the backend uses, over an in-memory crate."""

    class SystemType(IntEnum):
        SY1527, SY2527, SY4527, SY5527 = 0, 1, 2, 3

    class LinkType(IntEnum):
        TCPIP, RS232, CAENET, USB = 0, 1, 2, 3

    class ErrorCode(IntEnum):
        OK, COMMUNICATIONERROR, OUTOFRANGE, LOGINFAILED = 0, 1, 2, 3

    class Error(RuntimeError):
        def __init__(self, code, func):
            super().__init__(f"{func}: {code.name}")
            self.code = code

    @dataclass
    class Board:
        model: str
        description: str
        serial_number: int
        n_channel: int
        fw_version: tuple

    def __init__(self):
        hv = self
        self.log: list = []
        self.params = {(3, c): {"V0Set": 0.0, "I0Set": 2.0, "RUp": 10.0, "RDWn": 10.0, "Trip": 1.0,
                                "SVMax": 1000.0, "Pw": 0, "PDwn": 0, "VMon": 0.0, "IMon": 0.01,
                                "Status": 0} for c in range(14)}
        self.names = {(3, c): f"ch{c}" for c in range(14)}
        self.down = False
        self.garbage = False

        class Device:
            @classmethod
            def open(cls, system, link, arg, user, password):
                if password != "secret":
                    raise hv.Error(hv.ErrorCode.LOGINFAILED, "init_system")
                hv.log.append(("open", system.name, link.name, arg, user))
                return cls()

            def _check(self, func):
                if hv.down:
                    raise hv.Error(hv.ErrorCode.COMMUNICATIONERROR, func)

            def get_crate_map(self):
                self._check("get_crate_map")
                empty = hv.Board("", "", 0, 0, (0, 0))
                return [empty, empty, empty, hv.Board("A1515TG", "GEM board", 77, 14, (1, 4))]

            def get_ch_param(self, slot, channels, name):
                self._check("get_ch_param")
                if hv.garbage and name == "VMon":
                    return ["#$%"] * len(channels)
                return [hv.params[(slot, c)][name] for c in channels]

            def set_ch_param(self, slot, channels, name, value):
                self._check("set_ch_param")
                hv.log.append(("set", slot, tuple(channels), name, value))
                for c in channels:
                    hv.params[(slot, c)][name] = value

            def get_ch_param_prop(self, slot, channel, name):
                limits = {"V0Set": (0, 1200), "I0Set": (0, 20), "RUp": (1, 500), "RDWn": (1, 500),
                          "Trip": (0, 1000), "SVMax": (0, 1200)}
                lo, hi = limits[name]
                return SimpleNamespace(minval=lo, maxval=hi)

            def get_ch_name(self, slot, channels):
                self._check("get_ch_name")
                return [hv.names[(slot, c)] for c in channels]

            def set_ch_name(self, slot, channels, name):
                for c in channels:
                    hv.names[(slot, c)] = name

            def exec_comm(self, name):
                self._check("exec_comm")
                hv.log.append(("exec", name))

            def close(self):
                hv.log.append(("close",))

        self.Device = Device


@pytest.fixture
def hv():
    return FakeHv()


@pytest.fixture
def crate(hv):
    return CaenHvCrate.open(system_type="SY5527", link_type="TCPIP", address="10.0.0.5",
                            username="admin", password="secret", hv=hv)


def test_open_logs_in_and_maps_the_crate(hv, crate):
    assert hv.log[0] == ("open", "SY5527", "TCPIP", "10.0.0.5", "admin")
    (board,) = crate.crate_map()
    assert (board.slot, board.model, board.n_channels, board.firmware) == (3, "A1515TG", 14, "1.4")


def test_login_failure_and_unknown_types_are_faults_with_a_remedy(hv):
    with pytest.raises(InstrumentFault, match="cannot log in .* password"):
        CaenHvCrate.open(password="wrong", hv=hv)
    with pytest.raises(InstrumentFault, match="system types: SY1527"):
        CaenHvCrate.open(system_type="SY9999", password="secret", hv=hv)


def test_read_board_returns_every_parameter_per_channel(hv, crate):
    hv.params[(3, 5)].update(VMon=548.3, IMon=0.031, Status=1, Pw=1)
    b = crate.read_board(3)
    assert b["VMon"][5] == 548.3 and b["Status"][5] == 1 and b["ChName"][5] == "ch5"
    assert len(b["IMon"]) == 14 and set(b) >= {"V0Set", "SVMax", "PDwn", "Trip"}


def test_set_param_checks_limits_clamps_to_svmax_and_sets_one_channel(hv, crate):
    crate.crate_map()
    assert crate.set_param(3, 5, "V0Set", 1100.0) == 1000.0          # SVMax 1000
    assert hv.log[-1] == ("set", 3, (5,), "V0Set", 1000.0)
    with pytest.raises(Refused, match="outside 0..1200"):
        crate.set_param(3, 5, "V0Set", 1500.0)
    with pytest.raises(Refused, match="must be 0 or 1"):
        crate.set_param(3, 5, "Pw", 2)
    with pytest.raises(Refused, match="14 channels"):
        crate.set_param(3, 14, "Pw", 1)
    with pytest.raises(Refused, match="no board in slot 4"):
        crate.set_param(4, 0, "Pw", 1)
    crate.set_param(3, 5, "ChName", "G1T")
    assert hv.names[(3, 5)] == "G1T"


def test_link_errors_and_garbage_become_faults(hv, crate):
    hv.garbage = True
    with pytest.raises(InstrumentFault, match="garbage"):
        crate.read_board(3)
    hv.garbage, hv.down = False, True
    with pytest.raises(InstrumentFault, match="no valid answer .* check the link"):
        crate.read_board(3)
    with pytest.raises(InstrumentFault):
        crate.clear_alarm()


def test_commands_and_make_safe(hv, crate):
    crate.crate_map()
    crate.clear_alarm()
    crate.kill()
    assert ("exec", "ClearAlarm") in hv.log and ("exec", "Kill") in hv.log
    crate.make_safe()
    assert ("set", 3, tuple(range(14)), "V0Set", 0) in hv.log
    assert ("set", 3, tuple(range(14)), "Pw", 0) in hv.log


def test_from_settings_takes_the_password_from_the_environment(hv, monkeypatch):
    monkeypatch.setenv("MY_CRATE_PW", "secret")
    crate = from_settings({"password_env": "MY_CRATE_PW", "address": "10.0.0.9",
                           "poll_period_s": 1.0}, hv=hv)
    assert hv.log[0][3] == "10.0.0.9" and crate.poll_period_s == 1.0
    monkeypatch.delenv("MY_CRATE_PW")
    with pytest.raises(InstrumentFault, match="password"):
        from_settings({"password_env": "MY_CRATE_PW"}, hv=hv)


def test_without_the_binding_the_fault_says_what_to_install():
    try:
        import caen_libs  # noqa: F401
    except ImportError:
        with pytest.raises(InstrumentFault, match="pip install caen-libs"):
            CaenHvCrate.open(password="x")
    else:
        pytest.skip("caen_libs is installed here")
