"""HP/Agilent 34401A multimeter over RS-232 (SCPI through pyvisa): the driver behind
Multimeter34401aIOC.

The open sequence is the reference tool's (agilent.py): `*IDN?` must name a 34401A ("There is no
34401A multimeter connected to ..." otherwise), then `*CLS`, `SYSTEM:REMOTE`, `DISPLAY:TEXT "EXEC..."`.
Closing returns the meter to local (`SYSTEM:LOCAL`, `*CLS`). Readings must match the reference's
regex; a garbled reply is asked again once (RS-232 noise), then reported as a fault.

Readings go through CONF + READ? (configure once, then one trigger per reading); `measure_current`
and `measure_voltage` are the reference's one-shot `:MEAS:...?` queries (autorange, default
resolution).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np

from calbench.contracts.bench_instruments import (CURRENT_RANGES_A, DISPLAY_CHARS, FUNCTIONS, MAX_SAMPLES,
                                                  NPLC_VALUES, OVERLOAD, VOLTAGE_RANGES_V)
from calbench.contracts.errors import InstrumentFault, Refused
from calbench.iocs.hw.scpi import ScpiInstrument, parse_reading

log = logging.getLogger(__name__)


DEFAULT_SETTINGS = {"resource": "", "visa_library": "", "usb_vid_pid": "067b:2303",
                    "baud_rate": 9600, "timeout_s": 2.0, "retries": 1}


def ranges_of(function: str) -> tuple[float, ...]:
    return CURRENT_RANGES_A if function == "CURR:DC" else VOLTAGE_RANGES_V


class Agilent34401A(ScpiInstrument):
    """The 34401A's commands the bench uses; every method is thread-safe and opens the link on
    first use."""

    what = "34401A multimeter"

    def __init__(self, connect: Callable[[], object], *, port: str, settings: dict | None = None):
        super().__init__(connect, port=port)
        settings = {**DEFAULT_SETTINGS, **(settings or {})}
        self.retries = int(settings["retries"])
        self.function = "CURR:DC"
        self.range = 0.0            # 0: autorange
        self.nplc = 10.0

    # -- connection (the reference tool's open and close sequences) -------------------------------
    def not_found(self, problem: str) -> str:
        return (f"There is no 34401A multimeter connected to {self.port}: {problem}; connect the "
                "34401A (null-modem cable, 9600 baud 8N1) or power-cycle it")

    def wrong_identity(self, idn: str) -> str | None:
        return None if "34401A" in idn else f"*IDN? answered {idn!r}"

    def after_open(self) -> None:
        self.link.write("*CLS")
        self.link.write("SYSTEM:REMOTE")
        self.link.write('DISPLAY:TEXT "EXEC..."')
        self._configure_locked()

    def before_close(self) -> None:
        """Back to local and clear (the reference's exit)."""
        self.link.write("DISPLAY:TEXT:CLEAR")
        self.link.write("SYSTEM:LOCAL")
        self.link.write("*CLS")

    def make_safe(self) -> None:
        """Leave the meter usable from its front panel: display cleared, local mode."""
        try:
            self.close()
        except InstrumentFault as exc:
            log.warning("34401A not returned to local: %s", exc)

    # -- configuration ------------------------------------------------------------------------------
    def configure(self, function: str | None = None, range_: float | None = None,
                  nplc: float | None = None) -> None:
        """Select the function (CURR:DC or VOLT:DC), the range (0 = autorange; A or V) and the
        integration time (power-line cycles). Refused when the 34401A has no such setting."""
        function = self.function if function is None else function
        range_ = self.range if range_ is None else float(range_)
        nplc = self.nplc if nplc is None else float(nplc)
        if function not in FUNCTIONS:
            raise Refused(f"function {function!r} is not one of {', '.join(FUNCTIONS)}")
        if range_ != 0 and not any(math.isclose(range_, r) for r in ranges_of(function)):
            unit = "A" if function == "CURR:DC" else "V"
            raise Refused(f"{function} has no {range_:g} {unit} range; use 0 (autorange) or one "
                          f"of {', '.join(f'{r:g}' for r in ranges_of(function))} {unit}")
        if not any(math.isclose(nplc, n) for n in NPLC_VALUES):
            raise Refused(f"NPLC {nplc:g} not available; use one of "
                          f"{', '.join(f'{n:g}' for n in NPLC_VALUES)}")
        with self.link.lock:
            self.function, self.range, self.nplc = function, range_, nplc
            if self._open:
                self._configure_locked()
            else:
                self.open()

    def _configure_locked(self) -> None:
        rng = "AUTO" if self.range == 0 else f"{self.range:g}"
        self.link.write(f"CONF:{self.function} {rng}")
        self.link.write(f"{self.function}:NPLC {self.nplc:g}")
        self.link.check_errors(f"CONF:{self.function} {rng}; {self.function}:NPLC {self.nplc:g}")

    def range_in_use(self) -> float:
        """The range the meter is on (A or V); in autorange, the one it picked last."""
        self.ensure_open()
        command = f"{self.function}:RANG?"
        return self._query_number(command)

    # -- readings -----------------------------------------------------------------------------------
    def _query_number(self, command: str) -> float:
        """A numeric query, asked again once (by default) after a garbled or missing reply."""
        with self.link.lock:
            for attempt in range(self.retries + 1):
                try:
                    return parse_reading(self.link.query(command), command=command,
                                         where=self.where)
                except InstrumentFault as exc:
                    if attempt == self.retries:
                        raise
                    log.warning("%s; asking again", exc)
                    self.link.clear()
        raise AssertionError("unreachable")

    def _checked(self, value: float, command: str) -> float:
        if abs(value) >= OVERLOAD / 10:
            where = "autorange" if self.range == 0 else f"the {self.range:g} range"
            raise Refused(f"34401A overload on {where} ({command} read {value:+.8E}); select a "
                          "higher range or 0 (autorange)")
        limit = 1.2 * ranges_of(self.function)[-1]
        if abs(value) > limit:
            raise InstrumentFault(f"implausible reading {value:+.8E} from {self.where} to "
                                  f"{command} (beyond {limit:g}); check the RS-232 link")
        return value

    def read(self) -> float:
        """One reading (A or V) of the configured function: READ?."""
        self.ensure_open()
        return self._checked(self._query_number("READ?"), "READ?")

    def read_samples(self, count: int) -> np.ndarray:
        """`count` consecutive readings (A or V)."""
        count = int(count)
        if not 1 <= count <= MAX_SAMPLES:
            raise Refused(f"{count} samples per measurement; use 1..{MAX_SAMPLES}")
        with self.link.lock:
            return np.array([self.read() for _ in range(count)])

    def measure_current(self) -> float:
        """The reference's `:MEAS:CURR:DC?` (autorange, default resolution), in A."""
        self.ensure_open()
        value = self._query_number(":MEAS:CURR:DC?")
        self.function, self.range = "CURR:DC", 0.0
        return self._checked(value, ":MEAS:CURR:DC?")

    def measure_voltage(self) -> float:
        """`:MEAS:VOLT:DC?` (autorange, default resolution), in V."""
        self.ensure_open()
        value = self._query_number(":MEAS:VOLT:DC?")
        self.function, self.range = "VOLT:DC", 0.0
        return self._checked(value, ":MEAS:VOLT:DC?")

    # -- front panel --------------------------------------------------------------------------------
    def display(self, text: str) -> None:
        """Show up to 12 characters on the front panel ('' clears it)."""
        if len(text) > DISPLAY_CHARS or not text.isprintable() or '"' in text:
            raise Refused(f"display text {text!r}: at most {DISPLAY_CHARS} printable characters "
                          "without double quotes")
        self.ensure_open()
        with self.link.lock:
            self.link.write(f'DISPLAY:TEXT "{text}"' if text else "DISPLAY:TEXT:CLEAR")

    def set_remote(self, remote: bool) -> None:
        """SYSTEM:REMOTE (front panel locked) or SYSTEM:LOCAL."""
        self.ensure_open()
        self.link.write("SYSTEM:REMOTE" if remote else "SYSTEM:LOCAL")

    def clear_status(self) -> list[str]:
        """Read out and clear the error queue (*CLS); returns what was in it."""
        self.ensure_open()
        with self.link.lock:
            errors = self.link.error_queue()
            self.link.write("*CLS")
            return errors


def open_34401a(settings: dict) -> Agilent34401A:
    """Hardware backend from the lab configuration's [instruments.dmm] settings: the VISA resource
    (or the USB-serial adapter found by usb_vid_pid), 9600 baud 8N1, DTR/DSR. The port is opened on
    first use, so an IOC starts (and reports) without the meter."""
    from calbench.iocs.hw.ports import lazy_visa_connection

    s = {**DEFAULT_SETTINGS, **settings}
    connect, port = lazy_visa_connection(s, what="34401A multimeter",
                                         setting="instruments.dmm.resource")
    return Agilent34401A(connect, port=port, settings=s)
