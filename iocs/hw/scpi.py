"""A SCPI link that names its instrument in every error, and the parsing of SCPI replies.

`ScpiLink` wraps a message-based resource (a pyvisa resource, or a simulated instrument with the same
`write`/`read`/`query` methods), opens it lazily through a `connect()` callable, serialises requests
from several threads, and turns every link error into an `InstrumentFault` that says which
instrument, which command and what to check.
"""
from __future__ import annotations

import re
import threading
from collections.abc import Callable

from calbench.contracts.errors import InstrumentFault

# Reply of a reading, as the reference tool (agilent.py) checks it: +1.23456789E-02
READING_RE = re.compile(r"[+-][0-9][.][0-9]*[Ee][+-][0-9][0-9]")
NO_ERROR_RE = re.compile(r"[+]?0+\s*,")


def link_errors() -> tuple[type[BaseException], ...]:
    """Exceptions a transport raises when the link fails (timeouts, I/O, undecodable bytes)."""
    errors: list[type[BaseException]] = [OSError, TimeoutError, EOFError, UnicodeDecodeError]
    try:
        import pyvisa
        errors.append(pyvisa.errors.Error)
    except ImportError:
        pass
    return tuple(errors)


def parse_reading(reply: str, *, command: str, where: str) -> float:
    """A numeric SCPI reply (`+1.23456789E-02`) as a float; anything else is a garbled reply.
    where: 'the <instrument> on <port>', for the message."""
    text = reply.strip()
    if not READING_RE.fullmatch(text):
        raise InstrumentFault(
            f"garbled reply {reply!r} from {where} to {command}; expected a number such as "
            "+1.23456789E-02; check the RS-232 cable (null-modem), 9600 baud 8N1, or power-cycle "
            "the instrument")
    return float(text)


def parse_int(reply: str, *, command: str, where: str) -> int:
    """An integer SCPI reply (`0`, `+1`, `2`)."""
    text = reply.strip()
    if not re.fullmatch(r"[+-]?[0-9]+", text):
        raise InstrumentFault(f"garbled reply {reply!r} from {where} to {command}; expected "
                              "an integer; check the cable or power-cycle the instrument")
    return int(text)


def parse_bool(reply: str, *, command: str, where: str) -> bool:
    """A SCPI boolean reply: 1/0 (also ON/OFF, which some supplies answer)."""
    text = reply.strip().upper()
    if text in ("1", "+1", "ON"):
        return True
    if text in ("0", "+0", "OFF"):
        return False
    raise InstrumentFault(f"garbled reply {reply!r} from {where} to {command}; expected 1 or 0; "
                          "check the cable or power-cycle the instrument")


class ScpiLink:
    """One SCPI instrument's link: lazy open, a lock, fault translation, error-queue checks."""

    def __init__(self, connect: Callable[[], object], *, what: str, port: str):
        self._connect = connect
        self.what = what
        self.port = port
        self.where = f"the {what} on {port}"
        self.resource = None
        self.lock = threading.RLock()
        self._errors = link_errors()

    @property
    def is_open(self) -> bool:
        return self.resource is not None

    def open(self) -> None:
        with self.lock:
            if self.resource is None:
                try:
                    self.resource = self._connect()
                except InstrumentFault:
                    raise
                except self._errors as exc:
                    raise InstrumentFault(f"cannot open {self.where}: {exc}; check the "
                                          "cable and the port in the lab configuration") from None

    def close(self) -> None:
        with self.lock:
            resource, self.resource = self.resource, None
            if resource is not None:
                try:
                    resource.close()
                except self._errors:
                    pass

    def _resource(self):
        if self.resource is None:
            self.open()
        return self.resource

    def write(self, command: str) -> None:
        with self.lock:
            try:
                self._resource().write(command)
            except self._errors as exc:
                raise InstrumentFault(f"cannot send {command} to {self.where}: {exc}; check "
                                      "the cable and that the instrument is on") from None

    def query(self, command: str) -> str:
        """Send a query and return its reply line (stripped); a timeout is an InstrumentFault."""
        with self.lock:
            try:
                reply = self._resource().query(command)
            except self._errors as exc:
                raise InstrumentFault(
                    f"no answer from {self.where} to {command} ({type(exc).__name__}: {exc});"
                    " check that it is on, the cable (null-modem for RS-232) and the baud rate")\
                    from None
            return reply.strip()

    def clear(self) -> None:
        """Drop whatever is left in the input buffer (after a garbled reply or a timeout)."""
        with self.lock:
            resource = self.resource
            if resource is None:
                return
            for method in ("clear", "reset_input_buffer"):
                fn = getattr(resource, method, None)
                if fn is not None:
                    try:
                        fn()
                        return
                    except (NotImplementedError, *self._errors):   # not every session clears
                        pass

    def error_queue(self, limit: int = 20) -> list[str]:
        """Read SYST:ERR? until '+0,"No error"'; returns the errors, oldest first."""
        errors = []
        with self.lock:
            for _ in range(limit):
                reply = self.query("SYST:ERR?")
                if NO_ERROR_RE.match(reply):
                    break
                if not re.match(r"[+-]?[0-9]+\s*,", reply):
                    raise InstrumentFault(f"garbled reply {reply!r} from {self.where} to "
                                          "SYST:ERR?; expected e.g. -113,\"Undefined header\"")
                errors.append(reply)
        return errors

    def check_errors(self, after: str) -> None:
        """Raise InstrumentFault if the instrument logged errors (after the named commands)."""
        errors = self.error_queue()
        if errors:
            raise InstrumentFault(f"{self.where} reported {'; '.join(errors)} after {after}; "
                                  "check that it is the expected model and firmware")


class ScpiInstrument:
    """Base of the bench's SCPI drivers: a link, identification by *IDN? on open, lazy opening,
    reconnection. Subclasses name the instrument (`what`), judge the identity (`wrong_identity`),
    word the failure (`not_found`) and say what opening and closing send (`after_open`,
    `before_close`). Every method is thread-safe (the link's lock)."""

    what = "instrument"
    sim = None          # the simulated instrument when the driver runs on the simulated bench

    def __init__(self, connect: Callable[[], object], *, port: str):
        self.link = ScpiLink(connect, what=self.what, port=port)
        self.port = port
        self.where = self.link.where
        self.identity = ""
        self._open = False

    @property
    def is_open(self) -> bool:
        return self._open

    def not_found(self, problem: str) -> str:
        """The message when opening fails (problem: what went wrong)."""
        return f"no {self.what} answers on {self.port}: {problem}"

    def wrong_identity(self, idn: str) -> str | None:
        """Why *IDN? shows the wrong instrument, or None when it is the right one."""
        return None

    def after_open(self) -> None:
        """Commands sent once the instrument is identified (clear, remote, configuration)."""

    def before_close(self) -> None:
        """Commands sent before the port is released (back to local)."""

    def open(self) -> str:
        """Identify the instrument and prepare it (after_open); returns *IDN?."""
        with self.link.lock:
            self._open = False
            try:
                idn = self.link.query("*IDN?")
            except InstrumentFault as exc:
                self.link.close()
                raise InstrumentFault(self.not_found(str(exc))) from None
            problem = "no answer to *IDN?" if not idn else self.wrong_identity(idn)
            if problem:
                self.link.close()
                raise InstrumentFault(self.not_found(problem))
            self.identity = idn
            self.after_open()
            self._open = True
            return idn

    def ensure_open(self) -> None:
        if not self._open:
            self.open()

    def close(self) -> None:
        """before_close, then release the port (released even when before_close fails)."""
        with self.link.lock:
            try:
                if self._open:
                    self.before_close()
            finally:
                self._open = False
                self.link.close()

    def reconnect(self) -> str:
        """Release the port and open it again (identifies the instrument anew)."""
        with self.link.lock:
            self._open = False
            self.link.close()
            return self.open()

