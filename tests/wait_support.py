"""Waiting on a condition in tests (never on a wall-clock duration): poll it, fail past a cap."""
from __future__ import annotations

import time


def wait_for(condition, what: str, cap_s: float = 60.0) -> None:
    """Until condition() holds; an assertion naming `what` if it does not within cap_s."""
    deadline = time.monotonic() + cap_s
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {cap_s} s"
        time.sleep(0.02)
