"""World time seen from a plan: holds and waits measured on the instrument's clock, not the wall's.

A simulated world runs its clock accelerated (a 15-hour hold in seconds); real instruments run at
1x. A plan reads the instrument's WorldTime_RBV, learns how fast it runs against the wall clock,
and sleeps in short wall steps until a world time is reached, so the same plan serves both.
"""
from __future__ import annotations

import time

import bluesky.plan_stubs as bps


class InstrumentClock:
    """The clock of an instrument, from its WorldTime_RBV signal (plan methods)."""

    def __init__(self, world_time_signal, *, min_poll_s: float = 0.02, max_poll_s: float = 0.5):
        self.signal = world_time_signal
        self.min_poll_s = min_poll_s
        self.max_poll_s = max_poll_s
        self.rate = 1.0                       # world seconds per wall second, measured
        self._last: tuple[float, float] | None = None

    def now(self):
        """World time, epoch seconds (plan)."""
        t = float((yield from bps.rd(self.signal)))
        wall = time.monotonic()
        if self._last is None:
            self._last = (t, wall)
        elif wall - self._last[1] >= 0.2:
            rate = (t - self._last[0]) / (wall - self._last[1])
            if rate > 0:
                self.rate = rate
            self._last = (t, wall)
        return t

    def pause(self, world_s: float = 0.0):
        """One short wall sleep: about `world_s` of world time, or one poll period (plan)."""
        wall = world_s / self.rate if world_s > 0 else self.min_poll_s
        yield from bps.sleep(min(max(wall, self.min_poll_s), self.max_poll_s))

    def wait_until(self, world_t: float):
        """Sleep until the instrument's clock reaches world_t; returns the world time (plan)."""
        while True:
            now = yield from self.now()
            remaining = world_t - now
            if remaining <= 0:
                return now
            yield from self.pause(0.8 * remaining)


class WorldDeadline:
    """A fault timeout on the instrument's clock, for conditions a plan looks at on monitors.

    It has passed once the plan has looked at `readings` distinct instrument times (readings of
    the instrument, e.g. WorldTime_RBV updates) later than start + world_s. A loaded control PC
    delays the readings and the plan's looks alike, so it can make a fault late, never invent one;
    the readings past the end make sure the plan's view is not a monitor still in flight.

        deadline = WorldDeadline((yield from clock.now()), 30.0)
        while not done():
            if deadline.passed((yield from clock.now())):
                raise TimeoutError(...)
    """

    def __init__(self, start: float, world_s: float, *, readings: int = 3):
        self.end = float(start) + float(world_s)
        self.readings = int(readings)
        self._past: set[float] = set()

    def passed(self, now: float) -> bool:
        """A look at the instrument's time `now` (epoch s): True once the deadline has passed."""
        if float(now) > self.end and len(self._past) < self.readings:
            self._past.add(float(now))
        return len(self._past) >= self.readings
