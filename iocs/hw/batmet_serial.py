"""BatMet (STM32F334, Zephyr) over its USB serial port (pyserial, 115200 baud): the driver behind
BatmetIOC.

The firmware's text protocol (reference/qc6_batmet.md part B): commands end in CR LF, replies are
lines. `help` must answer "Supported commands" within two lines (that is how the reference tool
recognises a BatMet); `d <0..4095>` sets the raw DAC code; `sink <A>` sets a current through the
stored calibration and answers "Not calibrated", "Too low" or "Too high" when it cannot;
`csink min max a b c` stores the calibration DAC = a*I^2 + b*I + c for min <= I <= max; `a` samples
the EXT, PSUPPLY and SENS ADC channels. Closing (and `make_safe`) sets the DAC back to 0, as the
reference tool does on every exit.
"""
from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Callable

from calbench.contracts.batmet import DAC_MAX
from calbench.contracts.errors import InstrumentFault, Refused
from calbench.iocs.hw.scpi import link_errors

log = logging.getLogger(__name__)

DEFAULT_SETTINGS = {"port": "", "usb_vid_pid": "0403:6015", "baud_rate": 115200, "timeout_s": 2.0}
ADC_CHANNELS = ("EXT", "PSUPPLY", "SENS")
_DAC_REPLY = re.compile(r"dac\s+(\d+)", re.IGNORECASE)
_ADC_ITEM = re.compile(r"(EXT|PSUPPLY|SENS)\s*[=:]\s*([-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)",
                       re.IGNORECASE)
_ERRORS_REFUSED = {
    "not calibrated": "the BatMet is not calibrated, so it cannot set a current; run the sink "
                      "calibration and write its csink line first",
    "too low": "{arg} A is below the calibrated range{range}; ask for more current",
    "too high": "{arg} A is above the calibrated range{range}; ask for less current",
    "invalid value": "the BatMet rejected {cmd!r} as an invalid value",
}


def check_calibration(min_A: float, max_A: float, a: float, b: float, c: float) -> None:
    """Refuse a csink calibration the sink cannot use: non-finite numbers, an empty range, a DAC
    code outside 0..4095 inside the range, or a transfer that does not rise with current."""
    values = (min_A, max_A, a, b, c)
    if not all(math.isfinite(v) for v in values):
        raise Refused(f"csink {values}: every number must be finite")
    if not 0 <= min_A < max_A:
        raise Refused(f"csink range {min_A:g}..{max_A:g} A: need 0 <= min < max")
    for current in (min_A, max_A):
        if 2 * a * current + b <= 0:
            raise Refused(f"csink a={a:g} b={b:g}: the DAC code must rise with current over "
                          f"{min_A:g}..{max_A:g} A (slope {2 * a * current + b:g} at {current:g} A)")
    low = a * min_A ** 2 + b * min_A + c
    if low < -0.5:
        raise Refused(f"csink: DAC code {low:.1f} at {min_A:g} A is negative; check c")


class BatmetSerial:
    """Driver of the BatMet's serial protocol; thread-safe, opens the port on first use."""

    sim = None

    def __init__(self, connect: Callable[[], object], *, port: str):
        self._connect = connect
        self.port = port
        self.where = f"the BatMet on {port}"
        self._serial = None
        self.lock = threading.RLock()
        self.identity = ""
        self.dac = 0
        self.calibration: tuple[float, float, float, float, float] | None = None
        self._errors = link_errors()

    # -- connection ---------------------------------------------------------------------------------
    @property
    def is_open(self) -> bool:
        return self._serial is not None and bool(self.identity)

    def open(self) -> str:
        """Open the port and check it is a BatMet (`help` -> "Supported commands" within two
        lines); returns that line."""
        with self.lock:
            if self._serial is None:
                try:
                    self._serial = self._connect()
                except InstrumentFault:
                    raise
                except self._errors as exc:
                    raise InstrumentFault(f"cannot open {self.where}: {exc}; check the USB cable "
                                          "and instruments.batmet.port") from None
            self._drain()
            self._send("help")
            lines = [self._readline("help", must=False) for _ in range(2)]
            found = next((l for l in lines if l and "Supported commands" in l), None)
            if found is None:
                self._close_port()
                answer = " / ".join(repr(l) for l in lines if l) or "nothing"
                raise InstrumentFault(
                    f"no BatMet answers on {self.port}: `help` got {answer} instead of "
                    "'Supported commands'; check the USB cable (FTDI 0403:6015, 115200 baud) and "
                    "that the BatMet firmware is running")
            self._drain()          # the rest of the help text
            self.identity = found.strip()
            return self.identity

    def ensure_open(self) -> None:
        if not self.is_open:
            self.open()

    def _close_port(self) -> None:
        port, self._serial = self._serial, None
        self.identity = ""
        if port is not None:
            try:
                port.close()
            except self._errors:
                pass

    def close(self) -> None:
        """DAC back to 0 (the reference tool's exit), then release the port."""
        with self.lock:
            try:
                if self.is_open:
                    self.set_dac(0)
            finally:
                self._close_port()

    def reconnect(self) -> str:
        with self.lock:
            self._close_port()
            return self.open()

    def make_safe(self) -> None:
        """No sink current: DAC 0; raises InstrumentFault when the BatMet does not take it."""
        try:
            self.set_dac(0)
        except (InstrumentFault, Refused) as exc:
            raise InstrumentFault(f"BatMet DAC not set to 0: {exc}; unplug the BatMet's "
                                  "supply") from None

    # -- the line protocol --------------------------------------------------------------------------
    def _send(self, command: str) -> None:
        try:
            self._serial.write(command.encode("ascii") + b"\r\n")
        except self._errors as exc:
            self._close_port()
            raise InstrumentFault(f"cannot send {command!r} to {self.where}: {exc}; check the USB "
                                  "cable") from None

    def _readline(self, command: str, *, must: bool = True) -> str | None:
        try:
            raw = self._serial.readline()
        except self._errors as exc:
            self._close_port()
            raise InstrumentFault(f"reading {self.where} after {command!r} failed: {exc}; check "
                                  "the USB cable") from None
        if not raw.endswith(b"\n"):
            if must:
                raise InstrumentFault(f"no answer from {self.where} to {command!r} within the "
                                      "timeout; check the USB cable, or power-cycle the BatMet")
            return None
        try:
            line = raw.decode("ascii").strip()
        except UnicodeDecodeError:
            line = None
        if line is None or not line.isprintable():
            self._drain()
            raise InstrumentFault(f"garbled reply {raw!r} from {self.where} to {command!r}; "
                                  "check the USB cable, or power-cycle the BatMet")
        return line

    def _drain(self) -> None:
        try:
            self._serial.reset_input_buffer()
        except self._errors:
            pass

    def command(self, command: str) -> str:
        """Send one command and return its reply line (an echo of the command is skipped). Known
        firmware refusals raise Refused, an unknown command InstrumentFault."""
        with self.lock:
            self.ensure_open()
            self._send(command)
            reply = self._readline(command)
            if reply == command:                     # a shell that echoes
                reply = self._readline(command)
            low = reply.lower()
            if low.startswith("unknown command") or "command not found" in low:
                raise InstrumentFault(f"{self.where} does not know {command!r} ({reply!r}); "
                                      "update the BatMet firmware")
            for key, message in _ERRORS_REFUSED.items():
                if low.startswith(key):
                    args = command.split()[1:]
                    cal = self.calibration
                    rng = f" {cal[0]:g}..{cal[1]:g} A" if cal else ""
                    raise Refused(message.format(arg=args[0] if args else "", cmd=command,
                                                 range=rng))
            return reply

    # -- commands -----------------------------------------------------------------------------------
    def set_dac(self, code: int) -> int:
        """Raw DAC code 0..4095 (`d <code>`); returns the code set."""
        if isinstance(code, float) and not code.is_integer():
            raise Refused(f"DAC code {code} is not an integer")
        code = int(code)
        if not 0 <= code <= DAC_MAX:
            raise Refused(f"DAC code {code} outside 0..{DAC_MAX}")
        with self.lock:
            reply = self.command(f"d {code}")
            m = _DAC_REPLY.search(reply)
            if m and int(m.group(1)) != code:
                raise InstrumentFault(f"{self.where} set DAC {m.group(1)} when asked for {code} "
                                      f"({reply!r}); check the link and the firmware")
            self.dac = code
            return code

    def sink(self, current_A: float) -> int:
        """Sink a current (A) through the stored calibration (`sink <A>`); returns the DAC code
        the firmware chose (or -1 if its reply does not say)."""
        current_A = float(current_A)
        if not math.isfinite(current_A) or current_A < 0:
            raise Refused(f"sink current {current_A} A: must be a finite value >= 0")
        with self.lock:
            reply = self.command(f"sink {current_A:.6f}")
            m = _DAC_REPLY.search(reply)
            code = int(m.group(1)) if m else -1
            if code > DAC_MAX:
                raise InstrumentFault(f"{self.where} answered {reply!r} to sink: DAC beyond "
                                      f"{DAC_MAX}; check the link")
            self.dac = code if code >= 0 else self.dac
            return code

    def write_calibration(self, min_A: float, max_A: float, a: float, b: float, c: float) -> str:
        """Store the calibration (`csink min max a b c`, coefficients with 6 decimals as the
        reference prints them); returns the line sent."""
        check_calibration(min_A, max_A, a, b, c)
        line = f"csink {min_A:g} {max_A:g} {a:.6f} {b:.6f} {c:.6f}"
        with self.lock:
            self.command(line)
            self.calibration = (float(min_A), float(max_A), float(a), float(b), float(c))
        return line

    def read_adc(self) -> dict[str, float]:
        """The ADC channels EXT, PSUPPLY and SENS (V) from `a`."""
        with self.lock:
            reply = self.command("a")
        values = {m.group(1).upper(): float(m.group(2)) for m in _ADC_ITEM.finditer(reply)}
        missing = [c for c in ADC_CHANNELS if c not in values]
        if missing:
            raise InstrumentFault(f"garbled reply {reply!r} from {self.where} to 'a': no "
                                  f"{', '.join(missing)}; check the link or the firmware version")
        return values


def open_batmet(settings: dict) -> BatmetSerial:
    """Hardware backend from [instruments.batmet]: the serial port (a device path or a pyserial URL;
    found by usb_vid_pid when empty), 115200 baud. The port is opened on first use."""
    from calbench.iocs.hw.ports import open_serial_port

    s = {**DEFAULT_SETTINGS, **settings}

    def connect():
        return open_serial_port(port=s["port"], baud_rate=int(s["baud_rate"]),
                                timeout_s=float(s["timeout_s"]), vid_pid=s["usb_vid_pid"],
                                what="BatMet", setting="instruments.batmet.port")

    return BatmetSerial(connect, port=s["port"] or f"USB-serial adapter {s['usb_vid_pid']}")
