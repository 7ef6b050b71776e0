"""Daya Bay FEE board: registers, ranges and quantisation of its pulser, TDC and ADCs, and what its
sequencer delivers after a calibration sweep. Shared by the simulated and VME backends, the IOC and
the analysis."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

N_CHANNELS = 16
DAC_MAX = 65535
DAC_FULL_SCALE_PC = 1834.0          # direct-pulse charge at register 65535
TDC_LSB_NS = 1.5625
TDC_BITS = 20
ADC_FINE_LSB_PC = 0.16
ADC_FINE_MAX_PC = 4095 * ADC_FINE_LSB_PC
ADC_COARSE_MAX_PC = 1800.0
ADC_COARSE_LSB_PC = ADC_COARSE_MAX_PC / 4095
THRESHOLD_RANGE_MV = (0.1, 500.0)
MAX_SWEEP_PULSES = DAC_MAX + 1


@dataclass(frozen=True)
class PulseResults:
    """Per-pulse results of one channel; NaN where the discriminator did not fire."""
    direct_charge_pC: np.ndarray
    direct_time_ns: np.ndarray
    reflected_charge_pC: np.ndarray
    reflected_time_ns: np.ndarray


@dataclass(frozen=True)
class SweepResult:
    """What the board's sequencer delivers after a sweep."""
    registers: np.ndarray                   # DAC register of each pulse
    pulse_times: np.ndarray                 # world time of each pulse, epoch s
    period_s: float                         # time between pulses (world s)
    temperature_C: float                    # cable temperature at the sweep's start
    channels: dict[int, PulseResults]       # enabled channels only
    complete: bool                          # False when the sweep was stopped early
