"""What every procedure's plans share: a put that explains a refusal in the procedure's own error, the
check that an instrument answers, and the results folder of the session.

RunEngine aborts and stops (RunEngineControlException) always propagate: a plan helper must never
turn an operator's Ctrl-C into an instrument failure.
"""
from __future__ import annotations

from pathlib import Path

from bluesky import plan_stubs as bps
from bluesky.utils import RunEngineControlException

from calbench.devices.base import refusal_reason

__all__ = ["put", "check_connected", "reason", "set_results_dir", "results_dir"]

_RESULTS_DIR: Path | None = None


def reason(exc: BaseException, *, also: tuple[type, ...] = ()) -> str:
    """The instrument's own words inside a failed put (or an `also` exception), else a placeholder."""
    return refusal_reason(exc, also=also) or "no reason given"


def put(signal, value, what: str, error: type[Exception], *, also: tuple[type, ...] = ()):
    """Plan: set a signal and wait; a refusal or fault raises `error` saying what failed and why."""
    try:
        yield from bps.mv(signal, value)
    except RunEngineControlException:
        raise
    except Exception as exc:
        raise error(f"{what} failed: {reason(exc, also=also)}") from exc


def check_connected(device, what: str, error: type[Exception], *, remedy: str = ""):
    """Plan: raise `error` naming the device, the IOC's status message and the remedy when its
    backend does not answer (Connected_RBV 0). A dry run (summarize_plan answers reads with
    nothing) passes."""
    if not int((yield from bps.rd(device.connected_rbv, default_value=1))):
        message = yield from bps.rd(device.status_message)
        raise error(f"the {what} ({device.prefix}) does not answer: "
                    f"{message or 'no reason given'}" + (f"; {remedy}" if remedy else ""))


def set_results_dir(path: str | Path) -> None:
    """The session's results folder (set once by the session from the lab configuration)."""
    global _RESULTS_DIR
    _RESULTS_DIR = Path(path)


def results_dir(explicit: str | Path | None = None) -> Path:
    """The folder a procedure writes its files to: the one passed, else the session's."""
    if explicit is not None:
        return Path(explicit)
    if _RESULTS_DIR is None:
        raise RuntimeError("no results folder: pass results_dir=..., or start the plans from the "
                           "calbench profile (which sets the lab's results folder)")
    return _RESULTS_DIR
