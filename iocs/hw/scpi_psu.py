"""A single-output SCPI lab supply over RS-232/USB (pyvisa): the driver behind ScpiPsuIOC.

Commands are the Agilent E3632A's, which most single-output SCPI supplies share: `VOLT <V>`,
`CURR <A>` (the current limit), `OUTP ON|OFF`, `VOLT?`, `CURR?`, `OUTP?`, `MEAS:VOLT?`, `MEAS:CURR?`,
and `STAT:QUES:COND?` whose bit 0 says the voltage is unregulated: the supply is limiting the current
(constant-current mode, what the bench calls over-current).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

from calbench.contracts.bench_instruments import SUPPLY_MAX_A, SUPPLY_MAX_V
from calbench.contracts.errors import InstrumentFault, Refused
from calbench.iocs.hw.scpi import ScpiInstrument, parse_bool, parse_int, parse_reading

log = logging.getLogger(__name__)

DEFAULT_SETTINGS = {"resource": "", "visa_library": "", "usb_vid_pid": "",
                    "baud_rate": 9600, "timeout_s": 2.0, "idn_contains": "",
                    "max_voltage_V": SUPPLY_MAX_V, "max_current_A": SUPPLY_MAX_A}
CC_BIT = 0x1        # STAT:QUES:COND? bit 0: voltage unregulated, i.e. current limiting


@dataclass(frozen=True)
class PsuReading:
    """The supply now: setpoints, output switch, measured voltage (V) and current (A), mode."""
    voltage_setpoint_V: float
    current_limit_A: float
    output_on: bool
    voltage_V: float
    current_A: float
    mode: str           # "Off", "CV" or "CC"

    @property
    def over_current(self) -> bool:
        """The supply is clamping the current at its limit."""
        return self.mode == "CC"


class ScpiPsu(ScpiInstrument):
    """Driver of a single-output SCPI supply; thread-safe, opens the link on first use."""

    what = "lab supply"

    def __init__(self, connect: Callable[[], object], *, port: str, settings: dict | None = None):
        super().__init__(connect, port=port)
        s = {**DEFAULT_SETTINGS, **(settings or {})}
        self.idn_contains = str(s["idn_contains"])
        self.max_voltage_V = float(s["max_voltage_V"])
        self.max_current_A = float(s["max_current_A"])

    def not_found(self, problem: str) -> str:
        return f"the lab supply on {self.port} cannot be used: {problem}"

    def wrong_identity(self, idn: str) -> str | None:
        if self.idn_contains and self.idn_contains not in idn:
            return (f"*IDN? answered {idn!r}: not the configured supply (expected "
                    f"{self.idn_contains!r} in it); connect the supply or fix "
                    "instruments.psu.idn_contains")
        return None

    def after_open(self) -> None:
        self.link.write("*CLS")
        self.link.write("SYST:REM")

    def before_close(self) -> None:
        self.link.write("SYST:LOC")

    def make_safe(self) -> None:
        """Output off (the BatMet sink then draws nothing); raises InstrumentFault when it fails."""
        try:
            self.set_output(False)
        except InstrumentFault as exc:
            raise InstrumentFault(f"lab supply output not switched off: {exc}; switch it off at "
                                  "its front panel") from None

    def _set(self, command: str) -> None:
        self.ensure_open()
        with self.link.lock:
            self.link.write(command)
            self.link.check_errors(command)

    def set_voltage(self, volts: float) -> None:
        """Voltage setpoint (V), 0..max_voltage_V."""
        volts = float(volts)
        if not (math.isfinite(volts) and 0.0 <= volts <= self.max_voltage_V):
            raise Refused(f"supply voltage {volts:g} V outside 0..{self.max_voltage_V:g} V")
        self._set(f"VOLT {volts:.4f}")

    def set_current_limit(self, amps: float) -> None:
        """Current limit (A), 0..max_current_A."""
        amps = float(amps)
        if not (math.isfinite(amps) and 0.0 <= amps <= self.max_current_A):
            raise Refused(f"supply current limit {amps:g} A outside 0..{self.max_current_A:g} A")
        self._set(f"CURR {amps:.4f}")

    def set_output(self, on: bool) -> None:
        self._set("OUTP ON" if on else "OUTP OFF")

    def read(self) -> PsuReading:
        """Setpoints, output state, measured voltage and current, and the regulation mode."""
        self.ensure_open()
        w = self.where
        with self.link.lock:
            v_set = parse_reading(self.link.query("VOLT?"), command="VOLT?", where=w)
            i_set = parse_reading(self.link.query("CURR?"), command="CURR?", where=w)
            on = parse_bool(self.link.query("OUTP?"), command="OUTP?", where=w)
            volts = parse_reading(self.link.query("MEAS:VOLT?"), command="MEAS:VOLT?", where=w)
            amps = parse_reading(self.link.query("MEAS:CURR?"), command="MEAS:CURR?", where=w)
            ques = parse_int(self.link.query("STAT:QUES:COND?"), command="STAT:QUES:COND?",
                             where=w)
        mode = "Off" if not on else ("CC" if ques & CC_BIT else "CV")
        return PsuReading(v_set, i_set, on, volts, amps, mode)


def open_scpi_psu(settings: dict) -> ScpiPsu:
    """Hardware backend from [instruments.psu]: the VISA resource (or the USB-serial adapter
    found by usb_vid_pid). The port is opened on first use."""
    from calbench.iocs.hw.ports import lazy_visa_connection

    s = {**DEFAULT_SETTINGS, **settings}
    connect, port = lazy_visa_connection(s, what="lab supply", setting="instruments.psu.resource")
    return ScpiPsu(connect, port=port, settings=s)
