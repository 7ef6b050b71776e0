"""Hardware backend of the X-ray box: PSI's command-line client (xrayClient64), one call per command.

The box server (mpc2128 at PSI) is driven by a client program that takes the command as arguments
and prints a reply framed as
     This is XRay Box Client
    serverHostname:mpc2128.psi.ch.

    --- Rxd data:<payload>
    ---------------------
Commands (sls_detector_tools xray_box.py): getHV -> Yes/No; HV on|off; issafe -> "Yes, You may open
the door now!"; getwtime (warm-up s); getActualV / getActualC (V and uA: /1e3 gives kV and mA);
setv <kV>; setc <mA>; shutter <idx> on|off; getshutter<idx> -> "Shutter 1:ON"; getfl -> "Fl is <n>";
movefl <name>; unlock. The client offers no lock command and no door switch reading besides issafe.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

from calbench.contracts.errors import InstrumentFault, Refused
from calbench.contracts.xray import MAX_KV, MAX_MA, SHUTTERS, XrayBoxState

SHUTTER_INDEX = {"BigXrayBox": {"XRF": 1, "Direct": 3}, "VacuumBox": {"XRF": 4, "Direct": 2}}
_PAYLOAD = re.compile(r"--- Rxd data:(.*?)\n", re.S)


@dataclass
class XrayBoxClient:
    client: str
    box: str
    targets: tuple[str, ...]
    timeout_s: float = 10.0

    @classmethod
    def from_settings(cls, settings: dict) -> "XrayBoxClient":
        box = settings.get("box", "BigXrayBox")
        if box not in SHUTTER_INDEX:
            raise ValueError(f"instruments.xraybox.box = {box!r}: must be one of {list(SHUTTER_INDEX)}")
        client = settings.get("client", "xrayClient64")
        if shutil.which(client) is None:
            raise FileNotFoundError(f"the X-ray box client {client!r} is not on PATH; set "
                                    "instruments.xraybox.client to its full path")
        return cls(client, box, tuple(settings.get("targets", ())))

    # -- the client program --------------------------------------------------------------------
    def command(self, *words: str) -> str:
        """Run the client with one command; return the payload of its reply."""
        try:
            done = subprocess.run([self.client, *words], capture_output=True, text=True,
                                  timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            raise InstrumentFault(f"the box client did not answer '{' '.join(words)}' within "
                                  f"{self.timeout_s} s; is the box server reachable?") from None
        except OSError as exc:
            raise InstrumentFault(f"cannot run the box client {self.client!r}: {exc}") from None
        match = _PAYLOAD.search(done.stdout + "\n")
        if done.returncode != 0 or match is None:
            raise InstrumentFault(f"unexpected reply to '{' '.join(words)}' (exit {done.returncode}):"
                                  f" {(done.stdout + done.stderr).strip()[:200]!r}")
        return match.group(1).strip()

    def _number(self, command: str) -> float:
        reply = self.command(command)
        try:
            return float(reply)
        except ValueError:
            raise InstrumentFault(f"{command} answered {reply!r}, not a number") from None

    # -- the backend interface (same as XrayBoxSim) ------------------------------------------------
    def read(self) -> XrayBoxState:
        hv = self.command("getHV")
        if hv not in ("Yes", "No"):
            raise InstrumentFault(f"getHV answered {hv!r}, expected Yes or No")
        shutters = {}
        for name, idx in SHUTTER_INDEX[self.box].items():
            reply = self.command(f"getshutter{idx}")
            m = re.search(r":\s*(ON|OFF)", reply, re.I)
            if m is None:
                raise InstrumentFault(f"getshutter{idx} answered {reply!r}")
            shutters[name] = m.group(1).upper() == "ON"
        fl = re.search(r"Fl is\s*(\d+)", self.command("getfl"))
        if fl is None or int(fl.group(1)) >= len(self.targets):
            raise InstrumentFault("getfl gave an unknown target slot; list the wheel's targets in "
                                  "instruments.xraybox.targets, slot 0 first")
        safe = self.command("issafe").startswith("Yes")
        return XrayBoxState(
            hv_on=hv == "Yes", warmup_remaining_s=max(0.0, self._number("getwtime")),
            voltage_kV=self._number("getActualV") / 1e3, current_mA=self._number("getActualC") / 1e3,
            voltage_setpoint_kV=float("nan"), current_setpoint_mA=float("nan"),
            target=self.targets[int(fl.group(1))], target_moving=False, shutters=shutters,
            locked=False, door_open=False, safe=safe)

    def set_hv(self, on: bool) -> None:
        self.command("HV", "on" if on else "off")

    def set_voltage(self, kV: float) -> None:
        if not 0.0 <= kV <= MAX_KV:
            raise Refused(f"tube voltage {kV} kV outside 0..{MAX_KV:g} kV")
        self.command("setv", f"{kV:g}")

    def set_current(self, mA: float) -> None:
        if not 0.0 <= mA <= MAX_MA:
            raise Refused(f"tube current {mA} mA outside 0..{MAX_MA:g} mA")
        self.command("setc", f"{mA:g}")

    def set_target(self, name: str) -> None:
        if name not in self.targets:
            raise Refused(f"target {name!r} is not installed; installed: {', '.join(self.targets)}")
        self.command("movefl", name)

    def set_shutter(self, name: str, open_: bool) -> None:
        if name not in SHUTTERS:
            raise Refused(f"no shutter {name!r}; shutters: {', '.join(SHUTTERS)}")
        self.command("shutter", str(SHUTTER_INDEX[self.box][name]), "on" if open_ else "off")

    def unlock(self) -> None:
        self.command("unlock")

    def lock(self) -> None:
        raise Refused("the box client has no lock command; the box locks itself for other users")

    def make_safe(self) -> None:
        for name in SHUTTERS:
            self.set_shutter(name, False)
