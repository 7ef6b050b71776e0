"""Hardware backend of the CAEN crate: CAEN's official Python binding of the HV Wrapper library.

`caen_libs.caenhvwrapper` (PyPI package caen-libs, which needs CAEN's libcaenhvwrapper installed) is
imported only when a crate is opened, so the simulators run without it. The backend offers the same
interface as the simulated crate (iocs/sim/qc6.py): `crate_map()`, `read_board(slot)`,
`set_param(slot, channel, name, value)`, `clear_alarm()`, `kill()`, `make_safe()`.

Wrapper errors become `InstrumentFault` (no answer, link down, login failed) or `Refused` (a value
out of the parameter's range, a parameter the board does not have).
"""
from __future__ import annotations

import logging
import os

from calbench.contracts.errors import InstrumentFault, Refused
from calbench.contracts.caen import BoardInfo

log = logging.getLogger(__name__)

CHANNEL_PARAMS = ("V0Set", "I0Set", "RUp", "RDWn", "Trip", "SVMax", "Pw", "PDwn")
MONITOR_PARAMS = ("VMon", "IMon", "Status")
# HV wrapper error codes that mean "the request is wrong", not "the crate is gone"
_REFUSAL_CODES = {"OUTOFRANGE", "PARAMNOTFOUND", "PROPNOTFOUND", "NOTSETPROP", "INVALIDPARAMETER",
                  "SLOTNOTPRES", "NOTPRES"}


def _load_wrapper():
    try:
        from caen_libs import caenhvwrapper
    except ImportError as exc:
        raise InstrumentFault(
            "CAEN's Python binding is not installed: `pip install caen-libs` and install CAEN's HV "
            "Wrapper library (libcaenhvwrapper) from caen.it; or run the crate simulated "
            "(backend = \"sim\")") from exc
    except OSError as exc:        # the binding is there, the C library is not
        raise InstrumentFault(f"CAEN HV Wrapper library not loadable ({exc}); install it from "
                              "caen.it and make sure it is on the library path") from exc
    return caenhvwrapper


class CaenHvCrate:
    """A SYx527 crate opened through caen_libs.caenhvwrapper.Device (`hv` is that module)."""

    def __init__(self, device, hv, *, system_type: str = "SY5527", poll_period_s: float = 0.5,
                 where: str = ""):
        self.device = device
        self.hv = hv
        self.system_type = system_type
        self.poll_period_s = float(poll_period_s)
        self.where = where or system_type
        self._map: list[BoardInfo] | None = None

    @classmethod
    def open(cls, *, system_type: str = "SY5527", link_type: str = "TCPIP",
             address: str = "192.168.0.1", username: str = "admin", password: str = "",
             poll_period_s: float = 0.5, hv=None) -> "CaenHvCrate":
        """Log in to a crate. `hv` defaults to caen_libs.caenhvwrapper (tests pass a fake)."""
        hv = hv or _load_wrapper()
        try:
            system = hv.SystemType[system_type]
            link = hv.LinkType[link_type]
        except KeyError:
            raise InstrumentFault(
                f"unknown CAEN system or link type {system_type!r}/{link_type!r}; system types: "
                f"{', '.join(t.name for t in hv.SystemType)}; links: "
                f"{', '.join(t.name for t in hv.LinkType)}") from None
        where = f"{system_type} at {address}"
        try:
            device = hv.Device.open(system, link, address, username, password)
        except hv.Error as exc:
            raise InstrumentFault(f"cannot log in to the {where}: {exc}; check the address, the "
                                  "network, the user name and the password") from exc
        return cls(device, hv, system_type=system_type, poll_period_s=poll_period_s, where=where)

    # -- error translation ---------------------------------------------------------------------
    def _call(self, what: str, func, *args):
        try:
            return func(*args)
        except self.hv.Error as exc:
            code = getattr(getattr(exc, "code", None), "name", "")
            if code in _REFUSAL_CODES:
                raise Refused(f"{what}: the crate refuses ({exc})") from exc
            raise InstrumentFault(f"{what}: no valid answer from the {self.where} ({exc}); check "
                                  "the link to the crate") from exc
        except (OSError, RuntimeError) as exc:
            raise InstrumentFault(f"{what}: {self.where} link error ({exc})") from exc

    # -- the backend interface -------------------------------------------------------------------
    def crate_map(self) -> list[BoardInfo]:
        """Occupied slots (boards with channels)."""
        boards = self._call("crate map", self.device.get_crate_map)
        out = []
        for slot, board in enumerate(boards):
            if board is None or not getattr(board, "n_channel", 0):
                continue
            fw = getattr(board, "fw_version", ())
            firmware = ".".join(str(x) for x in fw) if isinstance(fw, (tuple, list)) else str(fw)
            out.append(BoardInfo(slot, str(board.model), str(board.description),
                                 int(board.serial_number), int(board.n_channel), firmware))
        self._map = out
        return out

    def _n_channels(self, slot: int) -> int:
        for board in self._map if self._map is not None else self.crate_map():
            if board.slot == slot:
                return board.n_channels
        raise Refused(f"no board in slot {slot} of the {self.where}")

    def read_board(self, slot: int) -> dict[str, list]:
        """Every channel parameter of a board: {name: [value per channel]}."""
        channels = list(range(self._n_channels(slot)))
        out: dict[str, list] = {}
        for name in MONITOR_PARAMS + CHANNEL_PARAMS:
            values = self._call(f"read S{slot:02d} {name}", self.device.get_ch_param, slot, channels,
                                name)
            if len(values) != len(channels):
                raise InstrumentFault(f"read S{slot:02d} {name}: {len(values)} values for "
                                      f"{len(channels)} channels from the {self.where}")
            try:
                out[name] = [int(v) if name in ("Status", "Pw", "PDwn") else float(v)
                             for v in values]
            except (TypeError, ValueError) as exc:
                raise InstrumentFault(f"read S{slot:02d} {name}: garbage from the {self.where}: "
                                      f"{values!r}") from exc
        out["ChName"] = [str(n) for n in self._call(f"read S{slot:02d} names",
                                                    self.device.get_ch_name, slot, channels)]
        return out

    def set_param(self, slot: int, channel: int, name: str, value):
        """Set a channel parameter after checking the board's limits; returns the value held
        (V0Set above SVMax is clamped to SVMax, as the simulated crate does)."""
        where = f"S{slot:02d}:C{channel:02d}"
        if not 0 <= channel < self._n_channels(slot):
            raise Refused(f"{where}: slot {slot} has {self._n_channels(slot)} channels")
        if name == "ChName":
            if len(str(value)) > 12:
                raise Refused(f"{where} ChName {value!r} is longer than 12 characters")
            self._call(f"{where} ChName", self.device.set_ch_name, slot, [channel], str(value))
            return str(value)
        if name not in CHANNEL_PARAMS:
            raise Refused(f"{where} has no settable parameter {name!r}; settable: "
                          f"{', '.join(CHANNEL_PARAMS)}, ChName")
        value = float(value)
        if name in ("Pw", "PDwn"):
            if value not in (0.0, 1.0):
                raise Refused(f"{where} {name} = {value:g}: must be 0 or 1")
            value = int(value)
        else:
            prop = self._call(f"{where} {name} limits", self.device.get_ch_param_prop, slot,
                              channel, name)
            lo, hi = getattr(prop, "minval", None), getattr(prop, "maxval", None)
            if lo is not None and hi is not None and not lo <= value <= hi:
                raise Refused(f"{where} {name} = {value:g} outside {lo:g}..{hi:g} of the board")
        if name == "V0Set":
            svmax = float(self._call(f"{where} SVMax", self.device.get_ch_param, slot, [channel],
                                     "SVMax")[0])
            value = min(value, svmax)
        self._call(f"{where} {name} = {value}", self.device.set_ch_param, slot, [channel], name,
                   value)
        return value

    def clear_alarm(self) -> None:
        self._call("ClearAlarm", self.device.exec_comm, "ClearAlarm")

    def kill(self) -> None:
        self._call("Kill", self.device.exec_comm, "Kill")

    def make_safe(self) -> None:
        """V0Set 0 and Pw Off on every channel of every board (the crate ramps down at RDWn)."""
        failed = []
        for board in self._map or []:
            channels = list(range(board.n_channels))
            for name in ("V0Set", "Pw"):
                try:
                    self.device.set_ch_param(board.slot, channels, name, 0)
                except Exception as exc:  # keep going: the other boards must still be switched off
                    log.exception("could not set %s = 0 on slot %d", name, board.slot)
                    failed.append(f"{name} = 0 on slot {board.slot}: {exc}")
        if failed:
            raise InstrumentFault("could not switch the crate's channels off (" + "; ".join(failed)
                                  + "); switch them off at the crate (front panel or GECO)")

    def close(self) -> None:
        try:
            self.device.close()
        except Exception:
            log.exception("closing the link to the %s", self.where)


def from_settings(settings: dict, *, hv=None) -> CaenHvCrate:
    """The hardware backend for the lab configuration's [instruments.caen] settings (the
    password comes from the environment variable named by `password_env`)."""
    password = os.environ.get(settings.get("password_env", "CALBENCH_CAEN_PASSWORD"), "")
    return CaenHvCrate.open(
        system_type=settings.get("system_type", "SY5527"),
        link_type=settings.get("link_type", "TCPIP"),
        address=settings.get("address", "192.168.0.1"),
        username=settings.get("username", "admin"),
        password=password,
        poll_period_s=float(settings.get("poll_period_s", 0.5)), hv=hv)
