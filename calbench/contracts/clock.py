"""World clock of the simulated instruments: wall time accelerated by a constant factor.

A 15-hour QC6 hold runs in a minute at time_scale=1000 with the plan unchanged, because plans measure
durations with the instruments' (world) timestamps, never with the wall clock.
"""
from __future__ import annotations

import time


class WorldClock:
    """world_time = t0 + (monotonic() - m0) * time_scale, in seconds since the epoch."""

    def __init__(self, time_scale: float = 1.0, start: float | None = None):
        if time_scale <= 0:
            raise ValueError(f"time_scale must be > 0, got {time_scale}")
        self.time_scale = float(time_scale)
        self._t0 = time.time() if start is None else float(start)
        self._m0 = time.monotonic()

    def now(self) -> float:
        """Current world time (epoch seconds)."""
        return self._t0 + (time.monotonic() - self._m0) * self.time_scale

    def wall_seconds(self, world_seconds: float) -> float:
        """How long (wall seconds) a world interval lasts."""
        return world_seconds / self.time_scale

    def __repr__(self) -> str:
        return f"WorldClock(time_scale={self.time_scale})"
