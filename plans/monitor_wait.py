"""Waiting in a plan for a condition on monitored signals, woken by their updates instead of polling.

A plan that polls an instrument every few milliseconds spends its time in RunEngine messages and
still looks too rarely when the world clock is accelerated. `MonitorWaiter` evaluates a condition
on the cached values of monitored signals at every monitor update (in ophyd's callback thread) and
wakes the plan's single `wait_for` message when it holds, or after a wall-time bound so that the
plan still reaches its checkpoints and fault timeouts.

    waiter = MonitorWaiter([ch.status, ch.vmon, layer.world_time])
    yield from waiter.wait(lambda: ch.vmon.get() > 100, max_wall_s=0.5)

`wait_status` waits the same way on a Status (a move), looking at the Status itself.
"""
from __future__ import annotations

import asyncio
import threading
from typing import Callable, Iterable

from bluesky.utils import Msg


class MonitorWaiter:
    """Wakes waiting plans when a condition on the given (auto-monitored) signals holds."""

    def __init__(self, signals: Iterable):
        self._signals = list(dict.fromkeys(signals))
        self._lock = threading.Lock()
        self._waiting: list[tuple[Callable[[], bool], asyncio.AbstractEventLoop, Callable]] = []
        self._tokens: list = []

    def subscribe(self) -> None:
        with self._lock:
            if self._tokens:
                return
            self._tokens = [(sig, sig.subscribe(self._changed, run=False))
                            for sig in self._signals]

    def close(self) -> None:
        with self._lock:
            tokens, self._tokens = self._tokens, []
        for sig, token in tokens:
            sig.unsubscribe(token)

    def _changed(self, *args, **kwargs):
        with self._lock:
            waiting = list(self._waiting)
        for condition, loop, wake in waiting:
            if _holds(condition):
                loop.call_soon_threadsafe(wake)

    def wait(self, condition: Callable[[], bool], *, max_wall_s: float, look_first: bool = True):
        """Plan: return when condition() holds (checked at once and at every update of the
        signals) or after max_wall_s wall seconds, whichever comes first. look_first=False looks
        only inside the RunEngine's wait_for, never in the plan's body (a dry run reads nothing)."""
        self.subscribe()
        if look_first and _holds(condition):
            return
        yield Msg("wait_for", None, [lambda: self._until(condition, max_wall_s)])

    async def _until(self, condition, max_wall_s: float) -> None:
        loop = asyncio.get_running_loop()
        woken = loop.create_future()

        def wake():
            if not woken.done():
                woken.set_result(None)

        entry = (condition, loop, wake)
        with self._lock:
            self._waiting.append(entry)
        try:
            if not _holds(condition):   # an update may have come between the check and here
                await asyncio.wait([woken], timeout=max_wall_s)
        finally:
            with self._lock:
                self._waiting.remove(entry)


def _holds(condition) -> bool:
    try:
        return bool(condition())
    except Exception:          # a value not there (signal disconnected): wait for an update
        return False


def wait_status(status, *, max_wall_s: float):
    """Plan: wait until a Status (from bps.abs_set) is done, at most max_wall_s wall seconds; returns
    whether it is done. The Status is looked at, not a wait on its group: a pause or suspension ends
    a wait early. A dry run (no Status) counts as done."""
    if status is None or status.done:
        return True
    yield Msg("wait_for", None, [lambda: _until_done(status, max_wall_s)])
    return status.done


async def _until_done(status, max_wall_s: float) -> None:
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def wake(_status):
        loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))

    status.add_callback(wake)
    await asyncio.wait([done], timeout=max_wall_s)
