"""The bench's simulated links with fault injection: reply queue, timeouts in world time, garbled
replies, an absent instrument, another identity (set by tests or the IOCs' Sim: PVs). The
instruments of iocs/sim/bench_scpi.py and iocs/sim/bench_serial.py talk through them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from calbench.iocs.sim.bench_circuit import BenchWorld


class LinkTimeout(TimeoutError):
    """No reply within the link's timeout (what pyvisa reports as VI_ERROR_TMO)."""


@dataclass
class LinkFaults:
    """Fault injection on one instrument link (set by tests, or through the IOCs' Sim: PVs)."""
    garble_next: int = 0        # the next N replies arrive corrupted
    timeout_next: int = 0       # the next N replies never arrive
    absent: bool = False        # nothing answers (cable out, instrument off)
    identity: str = ""          # when set, *IDN? (or help) answers this instead


class SimLink:
    """Common part of the simulated links: reply queue, timeouts, garbling, world-time delays."""

    def __init__(self, world: BenchWorld, name: str, timeout_s: float = 2.0):
        self.world = world
        self.name = name
        self.faults = LinkFaults()
        self.timeout_s = timeout_s
        self._replies: list[str] = []
        self._busy_s = 0.0

    def _sleep(self, world_s: float) -> None:
        if world_s > 0:
            time.sleep(self.world.clock.wall_seconds(world_s))

    def _push(self, reply: str) -> None:
        f = self.faults
        if f.absent:
            return
        if f.timeout_next > 0:
            f.timeout_next -= 1
            return
        if f.garble_next > 0:
            f.garble_next -= 1
            reply = _garble(reply, self.world.fault_rng)
        self._replies.append(reply)

    def _take(self) -> str | None:
        """The next reply, or None after the link's timeout (world time, accelerated)."""
        with self.world.lock:
            reply = self._replies.pop(0) if self._replies else None
        if reply is None:
            self._sleep(self.timeout_s)
        return reply

    def _run(self, execute) -> None:
        """Run firmware under the world lock, then let the instrument's busy time pass outside it
        (other instruments keep working meanwhile)."""
        with self.world.lock:
            self._busy_s = 0.0
            execute()
            busy = self._busy_s
        self._sleep(busy)

    def clear(self) -> None:
        """Drop pending replies (a VISA device clear / pyserial reset_input_buffer)."""
        with self.world.lock:
            self._replies.clear()


def _garble(reply: str, rng: np.random.Generator) -> str:
    """Corrupt a reply the way a bad RS-232 link does: a dropped and a flipped character."""
    chars = list(reply) or ["?"]
    i = int(rng.integers(len(chars)))
    chars[i] = "\x1a"                                  # framing error shows up as a SUB byte
    if len(chars) > 3:
        del chars[int(rng.integers(1, len(chars)))]
    return "".join(chars) + "#"

