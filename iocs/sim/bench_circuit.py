"""The bench world's circuit: lab supply -> 34401A current input -> BatMet current sink, in series.

The circuit the lab wires for the BatMet current-sink calibration (reference/qc6_batmet.md part B): a
lab supply at 4 V with a 3 A limit feeds the BatMet's sink through the meter's current input. The
physics:

- **Sink.** The BatMet's 12-bit DAC drives a voltage-controlled current sink. Its transfer is the one
  the firmware's `csink min max a b c` inverts: the DAC code that gives current I is
  ``a*I**2 + b*I + c`` (about 763 codes per ampere, a small quadratic term, an offset c of about 520
  codes: the op-amp output stays at 0 below it, the *dead zone*). On top, the DAC's integral
  non-linearity (INL): a code-dependent error of about 1.5 LSB that no quadratic can follow, so the
  calibrated sink is accurate to about 2 mA, as the reference says. Each seed draws its own unit
  (a, b, c, INL) around the reference's `csink 0 4 0.209938 762.136354 522.857571`.
- **Quiescent current.** The BatMet's PSUPPLY divider (77 kOhm) draws V/R from the supply through the
  meter: about 52 uA at 4 V, the reading of the README's first line (DAC 450 -> 5.19e-5 A).
- **Supply.** CV at its voltage setpoint until the load wants more than its (slightly miscalibrated)
  current limit, then CC: the current clamps at the limit, the voltage drops, and the supply reports
  it (SCPI questionable-status bit 0, as the Agilent E3632A). Output off: no current at all.
- **Compliance.** The sink needs a little headroom; the series resistance is the meter's shunt
  (5 Ohm on the 10 mA and 100 mA ranges, 0.1 Ohm on 1 A and 3 A), the wires and the sense resistor.
- **Meter.** Noise ~1e-5 of the reading plus a floor set by the range, scaled by sqrt(10/NPLC);
  autorange with the 34401A's hysteresis (up above 120 % of the range, down below 10 %); a reading
  takes NPLC line cycles plus the range changes, in world time; overload reads +9.90000000E+37.

The instruments that drive this circuit are emulated at their text interfaces in
iocs/sim/bench_scpi.py (34401A, E3632A) and iocs/sim/bench_serial.py (BatMet).
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np

from calbench.contracts.batmet import DAC_MAX
from calbench.contracts.clock import WorldClock

DAC_CODES = DAC_MAX + 1
METER_SHUNT_OHM = {0.01: 5.0, 0.1: 5.0, 1.0: 0.1, 3.0: 0.1}
METER_FLOOR_A = {0.01: 3e-8, 0.1: 3e-7, 1.0: 3e-6, 3.0: 9e-6}   # noise floor at NPLC 10
METER_IDN = "HEWLETT-PACKARD,34401A,0,11-5-2"
SUPPLY_IDN = "Agilent Technologies,E3632A,0,1.5-5.0-1.0"



@dataclass(frozen=True)
class SinkTransfer:
    """The BatMet sink of one unit: DAC code needed for current I is a*I**2 + b*I + c, plus INL.

    a: codes/A^2, b: codes/A, c: codes (the dead-zone edge). inl_*: the DAC's integral
    non-linearity as a sum of sines over the code range (amplitudes in LSB)."""
    a: float
    b: float
    c: float
    inl_amplitude: tuple[float, ...]
    inl_cycles: tuple[int, ...]
    inl_phase: tuple[float, ...]
    sense_ohm: float = 0.1
    headroom_V: float = 0.3

    def inl(self, dac: float) -> float:
        """Integral non-linearity at a DAC code (LSB): the code the sink effectively sees is
        dac + inl(dac)."""
        return float(sum(A * math.sin(2 * math.pi * k * dac / DAC_CODES + p)
                         for A, k, p in zip(self.inl_amplitude, self.inl_cycles, self.inl_phase)))

    def demand_A(self, dac: int) -> float:
        """Current (A) the sink regulates to at a DAC code, given enough supply voltage."""
        if dac <= 0:
            return 0.0
        e = dac + self.inl(dac) - self.c
        if e <= 0:
            return 0.0          # dead zone: the op-amp output sits at 0
        if self.a == 0:
            return e / self.b
        # positive root of a*I^2 + b*I - e = 0, written to stay accurate for small a*e
        return 2 * e / (self.b + math.sqrt(self.b * self.b + 4 * self.a * e))

    def dac_for(self, current_A: float) -> float:
        """The nominal transfer (no INL): DAC code for a current (A)."""
        return self.a * current_A ** 2 + self.b * current_A + self.c


def draw_sink(rng: np.random.Generator) -> SinkTransfer:
    """One BatMet unit around the reference's calibration `csink 0 4 0.209938 762.136354 522.857571`."""
    cycles = (4, 8, 16, 32)      # DAC segment structure: no low-order polynomial follows it
    return SinkTransfer(
        a=float(0.21 + 0.05 * rng.normal()),
        b=float(762.136 * (1 + 0.01 * rng.normal())),
        c=float(522.86 + 6.0 * rng.normal()),
        inl_amplitude=tuple(float(x) for x in rng.normal(0.0, 0.5, len(cycles))),
        inl_cycles=cycles,
        inl_phase=tuple(float(x) for x in rng.uniform(0, 2 * math.pi, len(cycles))),
    )


@dataclass
class SupplyState:
    """The lab supply: setpoints, output switch and the true (miscalibrated) current limit."""
    voltage_V: float = 4.0
    current_limit_A: float = 3.0
    output_on: bool = False
    limit_gain: float = 1.0          # true limit = limit_gain * setpoint + limit_offset_A
    limit_offset_A: float = 0.0
    voltage_gain: float = 1.0

    def true_limit_A(self) -> float:
        return max(0.0, self.limit_gain * self.current_limit_A + self.limit_offset_A)


@dataclass(frozen=True)
class OperatingPoint:
    """The series circuit now: one current through supply, meter and BatMet."""
    current_A: float
    supply_V: float        # at the supply terminals
    batmet_V: float        # at the BatMet's input (after meter shunt and wires)
    sink_A: float          # through the sense resistor
    mode: str              # "OFF", "CV" or "CC"


class BenchWorld:
    """The circuit: supply -> meter current input -> BatMet (sink + PSUPPLY divider)."""

    quiescent_ohm = 77e3
    wire_ohm = 0.05

    def __init__(self, clock: WorldClock, seed: int):
        self.clock = clock
        seq = np.random.SeedSequence([seed, 0xBA73E7])
        unit, supply, meter, faults = (np.random.default_rng(s) for s in seq.spawn(4))
        self.sink = draw_sink(unit)
        self.supply = SupplyState(limit_gain=float(1 + 0.002 * supply.normal()),
                                  limit_offset_A=float(supply.uniform(-0.005, 0.010)),
                                  voltage_gain=float(1 + 0.0005 * supply.normal()))
        self.meter_rng = meter
        self.fault_rng = faults
        self.dac = 0
        self.meter_range_A = 3.0        # the shunt in circuit (the meter keeps its last range)
        self.lock = threading.RLock()   # instruments are driven from several threads

    def operating_point(self) -> OperatingPoint:
        """Solve the series circuit for the present settings."""
        s = self.supply
        if not s.output_on:
            return OperatingPoint(0.0, 0.0, 0.0, 0.0, "OFF")
        v_set = s.voltage_V * s.voltage_gain
        r_series = METER_SHUNT_OHM[self.meter_range_A] + self.wire_ohm
        sink = self.sink.demand_A(self.dac)
        # the sink cannot pull more than its headroom allows
        r_loop = r_series + self.sink.sense_ohm
        sink = min(sink, max(0.0, (v_set - self.sink.headroom_V) / r_loop))
        quiescent = v_set / self.quiescent_ohm
        current = sink + quiescent
        limit = s.true_limit_A()
        if current <= limit:
            v_batmet = v_set - current * r_series
            return OperatingPoint(current, v_set, v_batmet, sink, "CV")
        # constant current: the sink leaves regulation, the supply voltage sags to what the
        # clamped current needs
        sink_cc = max(0.0, limit - quiescent)
        v_out = min(v_set, self.sink.headroom_V + limit * r_loop)
        return OperatingPoint(limit, v_out, v_out - limit * r_series, sink_cc, "CC")

