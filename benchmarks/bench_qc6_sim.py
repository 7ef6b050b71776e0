"""Cost of the QC6 crate simulation over a long hold: event-driven (what iocs/sim/qc6.py does)
against fixed-step integration (the baseline, measured in the same run).

    python benchmarks/bench_qc6_sim.py [--hours 15] [--volts 600] [--step 0.01] [--reads 900]

Three foils are held at --volts for --hours of world time; the crate is read --reads times over the
hold (the IOC polls it; at time scale 5000 a 15-hour hold is about 1100 polls of 10 ms). Rows:

  event-driven     CaenCrateSim.read_board at each read: the channels jump from event to event
                   (ramp ends, discharges, trip timers), exact whatever the interval between reads
  fixed step       the same physics integrated in --step world-second steps (a discharge is a
                   Bernoulli draw per step): the cost of an exact-enough simulation done naively

Both print wall seconds for the hold and the discharges counted; the expected count is the hidden
rate times the hold (the two must agree within Poisson errors, the first exactly in law).
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np

from calbench.iocs.sim.qc6 import CaenCrateSim

SLOT = 3
FOILS = (5, 3, 1)


class SteppedClock:
    time_scale = 1.0

    def __init__(self):
        self.t = 1.8e9

    def now(self) -> float:
        return self.t


def event_driven(hours: float, volts: float, reads: int) -> tuple[float, int, float]:
    clock = SteppedClock()
    sim = CaenCrateSim(clock, seed=1, slot=SLOT)
    for ch in FOILS:
        sim.set_param(SLOT, ch, "Trip", 1000.0)       # count discharges, never trip
        sim.set_param(SLOT, ch, "I0Set", 20.0)
        sim.set_param(SLOT, ch, "Pw", 1)
        sim.set_param(SLOT, ch, "V0Set", volts)
    clock.t += 200.0
    before = sum(sim.sparks(SLOT, ch) for ch in FOILS)
    expected = sum(sim.physics(SLOT, ch).spark_rate(volts) for ch in FOILS) * hours * 3600
    dt = hours * 3600 / reads
    t0 = time.perf_counter()
    for _ in range(reads):
        clock.t += dt
        sim.read_board(SLOT)
    wall = time.perf_counter() - t0
    return wall, sum(sim.sparks(SLOT, ch) for ch in FOILS) - before, expected


def fixed_step(hours: float, volts: float, step: float) -> tuple[float, int]:
    """The naive integration of the same discharge process (one Bernoulli draw per step)."""
    clock = SteppedClock()
    sim = CaenCrateSim(clock, seed=1, slot=SLOT)
    rates = np.array([sim.physics(SLOT, ch).spark_rate(volts) for ch in FOILS])
    rng = np.random.default_rng(2)
    n_steps = int(hours * 3600 / step)
    sparks = 0
    t0 = time.perf_counter()
    p = -np.expm1(-rates * step)
    for _ in range(n_steps):              # per step: draw, and the per-channel state update
        hit = rng.random(3) < p
        sparks += int(hit.sum())
    return time.perf_counter() - t0, sparks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hours", type=float, default=15.0)
    parser.add_argument("--volts", type=float, default=600.0)
    parser.add_argument("--step", type=float, default=0.01, help="baseline step (world s)")
    parser.add_argument("--reads", type=int, default=900)
    args = parser.parse_args()
    wall_e, n_e, expected = event_driven(args.hours, args.volts, args.reads)
    wall_f, n_f = fixed_step(args.hours, args.volts, args.step)
    sigma = math.sqrt(expected)
    print(f"hold {args.hours:g} h at {args.volts:g} V on 3 foils, {args.reads} reads; "
          f"expected discharges {expected:.0f} +- {sigma:.0f}")
    print(f"{'event-driven':<14} {wall_e:8.3f} s wall   {n_e:6d} discharges")
    print(f"{'fixed step':<14} {wall_f:8.3f} s wall   {n_f:6d} discharges   "
          f"(step {args.step:g} s; {wall_f / wall_e:,.0f}x the event-driven time)")


if __name__ == "__main__":
    main()
