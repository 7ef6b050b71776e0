"""QC6 safety: the layer ends ramped down and off however a test ends, the plan is suspended while the
crate does not answer, and a test starts only on a crate that answers with no trip left latched."""
from __future__ import annotations

import asyncio

import bluesky.plan_stubs as bps
from bluesky.preprocessors import finalize_wrapper, suspend_wrapper
from bluesky.suspenders import SuspenderBase
from bluesky.utils import Msg, RunEngineControlException

from calbench.devices.base import unconnected_pvs
from calbench.devices.caen import RAMPING, TRIPPED, GemLayer
from calbench.plans.qc6_steps import (RAMP_MARGIN_S, CrateUnreachable, Qc6Error, _clear_alarm,
                                      _put)
from calbench.plans.qc6_watch import _Session
from calbench.plans.toolkit import check_connected
from calbench.plans.world_clock import WorldDeadline

OFF_V = 2.0                  # a channel below this (V) counts as ramped down
CONNECT_TIMEOUT_S = 30.0     # wall seconds for the layer's PVs to connect (Channel Access)


class SuspendWhenCrateUnreachable(SuspenderBase):
    """Suspends the plan while the layer's IOC reports the crate unreachable (Connected_RBV = 0) or
    the IOC itself is gone (CA disconnection); resumes `sleep` wall seconds after it answers."""

    def __init__(self, layer: GemLayer, *, sleep: float = 0.5):
        super().__init__(layer.connected_rbv, sleep=sleep,
                         tripped_message=f"the CAEN crate on {layer.prefix} does not answer")
        self._layer = layer
        self._tokens: list = []

    def _reachable(self) -> bool:
        sig = self._sig
        try:
            return bool(sig.connected) and int(sig.get()) == 1
        except Exception:       # a disconnected signal cannot even be read
            return False

    def _changed(self, *args, **kwargs):
        self(value=self._reachable())

    def install(self, RE, *, event_type=None):
        with self._lock:
            self.RE = RE
        self._tokens = [self._sig.subscribe(self._changed, run=True),
                        self._sig.subscribe(self._changed, event_type="meta", run=False)]

    def remove(self):
        for token in self._tokens:
            self._sig.unsubscribe(token)
        self._tokens = []
        # SuspenderBase.remove releases a pending suspension; its clear_sub of `self` is a no-op
        super().remove()

    def _should_suspend(self, value):
        return not value

    def _should_resume(self, value):
        return bool(value)

    def _get_justification(self):
        if not self._tripped:
            return ""
        try:
            message = self._layer.status_message.get()
        except Exception:
            message = "the IOC does not answer either"
        return (f"{self._tripped_message}: {message}. The plan resumes by itself when the crate "
                "answers again; Ctrl-C twice then RE.abort() ramps the layer down instead.")


# -- safety ---------------------------------------------------------------------------------------
def all_off(layer: GemLayer, *, off_V: float = OFF_V, timeout_s: float | None = None):
    """V0Set 0 and Pw Off on every channel of the layer, then wait (world time) until every VMon is
    below off_V. Keeps going past a failing channel and raises at the end naming what failed (an
    abort or stop meanwhile: that, once every channel was told)."""
    yield from bps.stop(layer)            # a move still pending is not waited on any more
    errors, control = [], None
    for ch in layer.channels:
        for sig, value in ((ch.v0set, 0.0), (ch.pw, 0)):
            try:
                yield from _put(sig, value, retries=1)
            except RunEngineControlException as exc:   # the other channels first, then it
                control = control or exc
            except Exception as exc:      # the other channels must still be switched off
                errors.append(f"{sig.name}: {exc}")
    if control is not None:
        raise control
    if errors:
        raise Qc6Error("could not switch the layer off: " + "; ".join(errors) + ". Switch the "
                       "channels off at the crate (front panel or GECO) before touching the detector")
    session = _Session(layer)
    if timeout_s is None:
        worst = 0.0
        for ch in layer.channels:
            rate = max(float((yield from bps.rd(ch.rdwn))), 0.1)
            worst = max(worst, float((yield from bps.rd(ch.vmon))) / rate)
        timeout_s = 3.0 * worst + RAMP_MARGIN_S
    t0 = yield from session.now()
    deadline = WorldDeadline(t0, timeout_s)

    def high(vmon: float, bits: int) -> bool:
        return vmon > off_V or bool(bits & RAMPING)

    def still_high() -> bool:
        # a wake-up condition on the monitors (inside the RunEngine's wait_for)
        return any(high(float(ch.vmon.get()), int(ch.status.get())) for ch in layer.channels)

    while True:
        yield from session.scan(layer.channels)            # into session.state
        left = [f"{ch.label()} {vmon:.1f} V" for ch, (bits, vmon) in session.state.items()
                if high(vmon, bits)]
        if not left:
            return
        now = yield from session.now()
        if deadline.passed(now):
            raise Qc6Error(f"the layer is switched off but still not discharged after "
                           f"{now - t0:.0f} s: {', '.join(left)}; check the crate")
        yield from session.wait_until(
            lambda: session.world_now() > max(now, t0 + timeout_s) or not still_high())


def qc6_safety(layer: GemLayer, plan):
    """Run `plan` so that the layer ends ramped down and off whatever happens, suspended while the
    crate does not answer. The RunEngine does not replay messages after a pause or suspension (a
    replayed voltage set would be dangerous): the plan continues where it was."""
    def inner():
        was_rewindable = yield Msg("rewindable", None, None)
        yield Msg("rewindable", None, False)
        try:
            return (yield from suspend_wrapper(plan, SuspendWhenCrateUnreachable(layer)))
        finally:
            yield Msg("rewindable", None, was_rewindable)

    return (yield from finalize_wrapper(inner(), all_off(layer)))



def _wait_connected(layer: GemLayer, timeout_s: float = CONNECT_TIMEOUT_S):
    """Until every PV of the layer is connected (a device built with connect=False, as the
    profile builds `layer`, connects in the background), at most timeout_s wall seconds (plan).
    In a dry run nothing waits and nothing is checked."""
    waited = []

    async def connected():
        waited.append(True)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not layer.connected and loop.time() < deadline:
            await asyncio.sleep(0.05)

    if layer.connected:
        return
    yield Msg("wait_for", None, [connected])
    if waited and not layer.connected:
        missing = unconnected_pvs(layer)
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CrateUnreachable(f"no IOC answers on {layer.prefix} (unconnected: "
                               f"{', '.join(missing[:3])}{more}); start it with `calbench ioc run "
                               "caen --sim` (or the hardware IOC), or check the prefix, slot and "
                               "layer")


def _preflight(layer: GemLayer):
    """The crate answers (else a clear error), and no trip is left latched from before (plan)."""
    yield from _wait_connected(layer)
    yield from check_connected(layer, "CAEN crate behind the IOC", CrateUnreachable,
                               remedy="check the crate's network link and power")
    session = _Session(layer)
    for ch in layer.channels:
        if int((yield from bps.rd(ch.status))) & TRIPPED:
            yield from _clear_alarm(session)
            break
    return session
