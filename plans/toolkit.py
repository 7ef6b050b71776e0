"""What every procedure's plans share: a put that explains a refusal in the procedure's own error, the
check that an instrument answers, the results folder of the session, and reads that serve a dry run.

A dry run (bluesky.simulators.summarize_plan, `list(plan)`) answers every message with nothing: a
read returns None, open_run no uid, trigger_and_read an empty reading. `read_or_nominal` and
`reading_value` then give the plan the step's nominal value so that it carries on and the outline
shows the whole procedure. A RunEngine always answers a read with a reading, so the nominal values
never reach a real run: there an empty or wrong value still raises the plan's own error.

RunEngine aborts and stops (RunEngineControlException) always propagate: a plan helper must never
turn an operator's Ctrl-C into an instrument failure.
"""
from __future__ import annotations

from pathlib import Path

from bluesky import plan_stubs as bps
from bluesky.utils import RunEngineControlException

from calbench.devices.base import refusal_reason

__all__ = ["put", "check_connected", "reason", "set_results_dir", "results_dir", "read_or_nominal",
           "is_dry_run", "reading_value"]

_RESULTS_DIR: Path | None = None
_UNANSWERED = object()      # what bps.rd returns when a dry run answers the read with nothing


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


def read_or_nominal(signal, nominal):
    """Plan: the signal's value (read through a message); `nominal` in a dry run."""
    value = yield from bps.rd(signal, default_value=_UNANSWERED)
    return nominal if value is _UNANSWERED else value


def is_dry_run(signal):
    """Plan: True when the plan is simulated, not run (a read of `signal` is answered by nothing)."""
    return (yield from bps.rd(signal, default_value=_UNANSWERED)) is _UNANSWERED


def reading_value(reading: dict | None, key: str, nominal):
    """The value of `key` in what trigger_and_read returned; `nominal` in a dry run (which reads
    nothing). A real reading without `key` raises KeyError as before."""
    if not reading:
        return nominal
    return reading[key]["value"]


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
