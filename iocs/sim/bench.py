"""The bench world: lab supply -> BatMet current sink -> HP/Agilent 34401A multimeter, in series.

Built from three parts, one module each:
- the circuit and its physics (sink transfer, supply CV/CC, meter noise and ranges):
  iocs/sim/bench_circuit.py;
- the instruments at their text interfaces: `Sim34401A` and `SimE3632A` answer SCPI strings like a
  VISA resource (`write`, `read`, `query`; iocs/sim/bench_scpi.py), `SimBatmetPort` answers the
  BatMet firmware's serial protocol like a pyserial port (`write`, `readline`;
  iocs/sim/bench_serial.py). The hardware drivers (iocs/hw/) run on top of them unchanged, so their
  parsing and validation are exercised by every simulated run;
- fault injection on each link (`LinkFaults`: garbled replies, timeouts, an absent instrument,
  another identity; iocs/sim/bench_links.py).
All randomness comes from the world seed.
"""
from __future__ import annotations

from dataclasses import dataclass

from calbench.contracts.clock import WorldClock
from calbench.iocs.sim.bench_circuit import BenchWorld
from calbench.iocs.sim.bench_links import LinkFaults  # noqa: F401  (the bench's public names)
from calbench.iocs.sim.bench_scpi import Sim34401A, SimE3632A, scpi_split  # noqa: F401
from calbench.iocs.sim.bench_serial import SimBatmetPort


@dataclass
class BenchHandles:
    """The simulated bench's parts, for tests that read the hidden truth or inject faults."""
    world: BenchWorld
    meter: Sim34401A
    supply: SimE3632A
    batmet: SimBatmetPort


def build_bench(clock: WorldClock, seed: int, timeout_s: float = 2.0) -> BenchHandles:
    """The bench's simulated instruments (text interfaces) on one world."""
    world = BenchWorld(clock, seed)
    return BenchHandles(world, Sim34401A(world, timeout_s), SimE3632A(world, timeout_s),
                        SimBatmetPort(world, timeout_s))
