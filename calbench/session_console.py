"""The session's console: quiet exits, each error printed once, logging to the lab home.

Exit: concurrent.futures refuses new work once the interpreter starts shutting down (its own hook
runs in threading's shutdown, before atexit). Channel Access circuits still open at that point keep
receiving (access rights, monitor updates) and hand each message to an executor: one "cannot
schedule new futures after interpreter shutdown" traceback per circuit. The hook below closes the
CA context and stops ophyd's dispatcher first, and lets the tiled writer finish what is queued.

Errors: the RunEngine logs an aborted run with its traceback on the 'bluesky' logger, then the
exception reaches IPython, which prints it again. The log goes to the session's file instead of
the terminal, and the lab's own errors (which name cause and remedy) print as one line.
"""
from __future__ import annotations

import atexit
import logging
import threading
from datetime import datetime
from pathlib import Path

log = logging.getLogger(__name__)

# Exceptions whose message already says what went wrong and what to do: printed without traceback.
EXPECTED_ERRORS = (
    "calbench.config:ConfigError", "calbench.tiled_service:TiledUnavailable",
    "calbench.persistence:PersistenceError", "calbench.devices.base:InstrumentRefused",
    "calbench.devices.base:IocNotAnswering", "calbench.devices.eiger:EigerError",
    "calbench.devices.caen:ChannelTripped", "calbench.devices.caen:ChannelOff",
    "calbench.plans.fee:FeeCalibrationError", "calbench.plans.eiger:CalibrationStepError",
    "calbench.plans.batmet:BenchNotReady", "calbench.plans.batmet:UnsafeState",
    "calbench.plans.batmet:CalibrationRejected", "calbench.plans.qc6:Qc6Error",
    "calbench.plans.xray:ShutterError", "calbench.contracts.trimfile:TrimFileError",
    "calbench.analysis.timewalk:TransitFitError",
    "calbench.analysis.eiger_calibration:CalibrationError",
    "calbench.analysis.eiger_files:CalibrationFileError",
    "calbench.analysis.batmet:CalibrationFileError", "calbench.analysis.qc6_files:Qc6FileError",
)


def expected_error_types() -> tuple[type, ...]:
    from calbench.instruments import load_object

    types = []
    for path in EXPECTED_ERRORS:
        try:
            types.append(load_object(path))
        except (ImportError, AttributeError):      # a module renamed: its errors print in full
            log.debug("no error class %s", path)
    return tuple(types)


def close_channel_access() -> None:
    """Stop ophyd's callback dispatcher (no connection callback may start a CA request while we
    close), then close the Channel Access client context. Idempotent."""
    try:
        from ophyd import _caproto_shim
        dispatcher = _caproto_shim._dispatcher
        if dispatcher is not None and dispatcher.is_alive():
            dispatcher.stop()
        _caproto_shim._dispatcher = None
    except (ImportError, AttributeError):
        pass
    try:
        from caproto.threading import pyepics_compat
    except ImportError:
        return
    if pyepics_compat._make_context.cache_info().currsize:
        context = pyepics_compat._make_context()
        try:
            context.disconnect(wait=True)
            context.broadcaster.disconnect(wait=True)
        except Exception as exc:     # exiting anyway: say it in the log, not on the terminal
            log.debug("closing Channel Access: %r", exc)


def install_quiet_exit(persister=None) -> None:
    """Shut Channel Access (and the tiled writer's queue) down before the interpreter's executors.

    threading's exit hooks run last-registered first, and before atexit; concurrent.futures
    registered its own when it was imported, so ours runs ahead of it."""
    def shutdown():
        if persister is not None and hasattr(persister, "flush"):
            try:
                persister.flush(timeout=30.0)
            except Exception as exc:
                log.warning("tiled writer at exit: %s", exc)
        close_channel_access()

    register = getattr(threading, "_register_atexit", None)
    if register is not None:
        register(shutdown)
    else:                                    # other interpreters: at least before module teardown
        atexit.register(shutdown)


def session_log_path(home: Path) -> Path:
    directory = Path(home) / "logs"
    directory.mkdir(parents=True, exist_ok=True)
    return directory / f"session-{datetime.now():%Y-%m-%d}.log"


class OneLineFormatter(logging.Formatter):
    """The message without its traceback (that one is in the log file)."""

    def format(self, record):
        record.message = record.getMessage()
        return self.formatMessage(record)


def configure_logging(home: Path) -> Path:
    """bluesky, ophyd, caproto and calbench log to <home>/logs/session-<date>.log (tracebacks
    included); warnings reach the terminal as one line each."""
    path = session_log_path(home)
    to_file = logging.FileHandler(path)
    to_file.setLevel(logging.INFO)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    to_terminal = logging.StreamHandler()
    to_terminal.setLevel(logging.WARNING)
    to_terminal.setFormatter(OneLineFormatter("%(levelname)s %(name)s: %(message)s"))
    # the aborted run's exception reaches the prompt, which prints it: once is enough
    to_terminal.addFilter(lambda record: record.getMessage() != "Run aborted")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for h in (to_file, to_terminal):
        root.addHandler(h)
    for noisy in ("caproto", "ophyd", "httpx", "tiled"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return path


def install_error_display(ip, log_path: Path | None = None) -> None:
    """IPython prints the lab's expected errors as one line (cause and remedy), pointing at %tb
    and the log for the traceback."""
    types = expected_error_types()
    if not types:
        return
    where = f"; full traceback: %tb or {log_path}" if log_path else "; full traceback: %tb"

    def show(shell, etype, evalue, tb, tb_offset=None):
        print(f"{etype.__name__}: {evalue}\n  ({etype.__module__}{where})")
        return None

    ip.set_custom_exc(types, show)
