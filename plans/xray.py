"""Plan stubs for the X-ray box: tube on, target selection, and an XRF shutter that always closes.

`xrf_exposure(box, target, plan)` is the Bluesky form of PSI's `xrf_shutter_open(box, target)`
context manager: move the wheel to the target, open the XRF shutter (checking it really opened, up to
`retries` times `check_s` apart), run the inner plan, and close the shutter on every exit path.
"""
from __future__ import annotations

import bluesky.plan_stubs as bps
from bluesky.preprocessors import finalize_wrapper

from calbench.devices.base import refusal_reason
from calbench.plans.lease import under_lease
from calbench.plans.progress import StepProgress
from calbench.plans.toolkit import read_or_nominal
from calbench.plans.world_clock import InstrumentClock, WorldDeadline


class ShutterError(RuntimeError):
    """The XRF shutter did not open."""


# Fault timeouts (warm-up, wheel, shutters) count in the box's world time (WorldTime_RBV), so a
# loaded control PC cannot trip them.


def tube_on(box, voltage_kV: float = 40.0, current_mA: float = 40.0, *, warmup_timeout_s=120.0):
    """Unlock the box, switch the HV on and ramp the tube; wait for the warm-up to end (under the
    box's procedure lease; the HV then stays on with the shutters closed, as the lab leaves it)."""
    return (yield from under_lease([box], _tube_on(box, voltage_kV, current_mA,
                                                   warmup_timeout_s=warmup_timeout_s)))


def _tube_on(box, voltage_kV: float, current_mA: float, *, warmup_timeout_s: float):
    yield from bps.mv(box.unlock_cmd, 1)
    if (yield from read_or_nominal(box.hv, None)) != "On":      # a dry run switches it on
        yield from bps.mv(box.hv, "On")
    clock = InstrumentClock(box.world_time)
    deadline = WorldDeadline((yield from clock.now()), warmup_timeout_s)
    remaining = float((yield from read_or_nominal(box.warmup_remaining, 0.0)) or 0.0)
    if remaining > 0:
        total = remaining
        with StepProgress(total, "X-ray tube warm-up") as progress:
            while remaining > 0:
                if deadline.passed((yield from clock.now())):
                    raise TimeoutError(f"the X-ray tube is still warming up after "
                                       f"{warmup_timeout_s} s; check the box's HV status and the "
                                       "WarmupRemaining_RBV PV")
                yield from bps.sleep(0.2)
                remaining = float((yield from read_or_nominal(box.warmup_remaining, 0.0)) or 0.0)
                progress.update_to(total - remaining)
    yield from bps.mv(box.voltage, voltage_kV, box.current, current_mA)


def select_target(box, target: str, *, timeout_s: float = 30.0):
    """Move the target wheel and wait until it stands on `target`."""
    # a dry run (reads answered by nothing) moves the wheel and finds it there
    if (yield from read_or_nominal(box.target, None)) != target:
        yield from bps.mv(box.target, target)
    clock = InstrumentClock(box.world_time)
    deadline = WorldDeadline((yield from clock.now()), timeout_s)
    while ((yield from read_or_nominal(box.target_moving, 0))
           or (yield from read_or_nominal(box.target, target)) != target):
        if deadline.passed((yield from clock.now())):
            raise TimeoutError(f"the target wheel did not reach {target!r} within {timeout_s} s")
        yield from bps.sleep(0.1)


def open_xrf_shutter(box, target: str, *, retries: int = 10, check_s: float = 0.3):
    """Select the target and open the XRF shutter; raise ShutterError if it does not open."""
    yield from select_target(box, target)
    try:
        yield from bps.abs_set(box.xrf_shutter, "Open", wait=True)
    except Exception as exc:  # a refused put arrives as FailedStatus wrapping InstrumentRefused
        reason = refusal_reason(exc) or str(exc)
        raise ShutterError(f"the XRF shutter did not open on {target}: {reason}") from exc
    for _ in range(retries):
        if (yield from read_or_nominal(box.xrf_shutter, "Open")) == "Open":
            return
        yield from bps.sleep(check_s)
    raise ShutterError(
        f"the XRF shutter did not open on {target} after {retries} checks {check_s} s apart; "
        "the shutter may be jammed: check it at the box, then retry")


def close_shutters(box, *, timeout_s: float = 10.0):
    """Close both shutters and wait until both report Closed (used on every exit path)."""
    yield from bps.abs_set(box.xrf_shutter, "Closed", wait=True)
    yield from bps.abs_set(box.direct_shutter, "Closed", wait=True)
    clock = InstrumentClock(box.world_time)
    deadline = WorldDeadline((yield from clock.now()), timeout_s)
    while ((yield from read_or_nominal(box.xrf_shutter, "Closed")) != "Closed"
           or (yield from read_or_nominal(box.direct_shutter, "Closed")) != "Closed"):
        if deadline.passed((yield from clock.now())):
            raise ShutterError(f"a shutter still reports Open {timeout_s} s after closing; "
                               "close it at the box and check its status lamp")
        yield from bps.sleep(0.05)


def xrf_exposure(box, target: str, plan, *, retries: int = 10, check_s: float = 0.3):
    """Run `plan` with the XRF shutter open on `target`; the shutter is closed however it ends.
    The box's procedure lease is held meanwhile: if the session dies, the IOC closes the shutters
    and switches the tube HV off by itself after the lab's `lease_s`."""
    def inner():
        yield from open_xrf_shutter(box, target, retries=retries, check_s=check_s)
        return (yield from plan)

    return (yield from under_lease([box], finalize_wrapper(inner(), close_shutters(box))))

