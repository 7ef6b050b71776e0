# Long by design: FEE pulse physics (walk, reflections, dispersion) and the sequencer that drives it, on one clock.
"""The FEE world: a Daya Bay front-end board whose calibration pulses travel down RG58 cables.

What is modelled (reference/fee.md), all in physical units:

* Calibration pulse. The board's 16-bit DAC (AD9726) synthesises a current pulse with a sin^2
  leading edge (`rise_ns`, default 80 ns) and a short exponential tail (`fall_ns`, 5 ns); register
  0..65535 maps linearly (with a seeded integral non-linearity below 1 LSB) to 0..1834 pC of
  direct-pulse charge. The board input has a finite bandwidth (one pole, `input_tau_ns`), so the
  edge that reaches the discriminator is the sin^2 edge convolved with an exponential: close to,
  but not exactly, the shape the walk model t = T0 + a Q^-1/2 + b Q^-3/2 is derived from.
* Cable. Part of the pulse is launched into the cable (`coupling`), travels to the open far end and
  back (2 L at the high-frequency velocity v), is attenuated by the DC loop resistance and
  dispersed by the skin effect: the causal kernel of H(s) = exp(-K l sqrt(s)),
  h(t) = K l / (2 sqrt(pi) t^3/2) exp(-(K l)^2 / 4 t), with K from RG58's 0.16 dB/m at 100 MHz.
  The reflection therefore rises more slowly, arrives later than 2 L / v by a delay that grows
  with the edge's duration (the skin effect's group delay; about 2 ns for an 80 ns edge through
  2 x 20 m), and its ADC charge is smaller (12 pC for 336 pC direct at 20 m). The transit time
  grows with temperature by `temp_coeff_per_K` (0.01 %/K). Length 0 m: nothing connected.
* Discriminator and TDC. A leading-edge discriminator fires when the pulse plus input noise
  (`voltage_noise_mV`, slow against the edge) crosses the channel's threshold (mV into 50 ohm); the
  crossing time comes from inverting the tabulated edge, so the time walk emerges from the pulse
  shape. Clock jitter (`clock_jitter_ns`) adds to it and the TDC quantises it in 1.5625 ns bins.
  The calibration pulses are generated from the board clock, so the sub-LSB phase between a pulse
  and the TDC bins is a fixed (seeded, random) property of each channel: only the jitter dithers
  it, which is why plain averages of TDC times at one amplitude cannot beat the LSB.
* ADC. The charge is the integral of the pulse in the ADC gate plus noise, quantised to 0.16 pC
  (fine range, 12 bit) or 0.44 pC (coarse range, up to 1800 pC).
* Sequencer. The board steps its DAC register over a range, one pulse every 1/pulse_rate_hz
  world seconds; the results of a whole sweep are computed at once with numpy (milliseconds for
  11,501 pulses) and released when the world clock says the sweep is over.
* Environment. The cable's temperature follows a daily cycle plus slow seeded weather.

Nothing here imports caproto; `FeeBoardSim` is the backend of `calbench.iocs.fee.FeeIOC`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.signal import fftconvolve

from calbench.contracts.errors import Refused
from calbench.contracts.clock import WorldClock
from calbench.contracts.fee import (ADC_COARSE_LSB_PC, ADC_COARSE_MAX_PC, ADC_FINE_LSB_PC,
                                    ADC_FINE_MAX_PC, DAC_FULL_SCALE_PC, DAC_MAX, N_CHANNELS,
                                    TDC_LSB_NS, THRESHOLD_RANGE_MV, PulseResults, SweepResult)

INPUT_OHM = 50.0
DEFAULT_CABLE_M = 20.0
# The threshold puts the reflections' firing point just inside the default sweep (register ~640 of
# 500..12000 for 20 m of RG58), so the analysis sees where it is and keeps the fit away from it.
DEFAULT_THRESHOLD_MV = 0.7

# RG58A/U: 0.16 dB/m at 100 MHz from the skin effect -> K = alpha / sqrt(omega / 2) (ns^1/2 / m).
_RG58_ALPHA_NP_PER_M = 0.16 / 8.686
RG58_SKIN_K = _RG58_ALPHA_NP_PER_M / math.sqrt(2 * math.pi * 0.1 / 2)
RG58_DC_LOSS_PER_M = 0.05 / (2 * INPUT_OHM)   # 0.05 ohm/m loop resistance against 2 x 50 ohm

_GRID_NS = 0.01                     # time step of the tabulated pulse shapes


@dataclass(frozen=True)
class PulseShape:
    """A pulse tabulated on a fine grid: current per pC of direct charge (mA/pC) against time (ns)
    from the pulse's true start, with its rising edge prepared for threshold inversion."""
    t_ns: np.ndarray
    current_per_pC: np.ndarray     # mA (= pC/ns) per pC of direct-pulse charge
    charge_per_pC: float           # ADC-gate charge per pC of direct-pulse charge
    peak_mV_per_pC: float          # pulse height at the discriminator per pC of direct charge
    edge: np.ndarray               # running maximum of the normalised pulse up to its peak
    edge_t_ns: np.ndarray

    def crossing(self, level: np.ndarray) -> np.ndarray:
        """First time (ns after the start) the normalised pulse reaches `level` (0 < level <= 1)."""
        i = np.clip(np.searchsorted(self.edge, level, side="left"), 1, len(self.edge) - 1)
        y0, y1 = self.edge[i - 1], self.edge[i]
        frac = np.where(y1 > y0, (level - y0) / np.where(y1 > y0, y1 - y0, 1.0), 1.0)
        return self.edge_t_ns[i - 1] + np.clip(frac, 0.0, 1.0) * _GRID_NS


def _tabulate(t: np.ndarray, current: np.ndarray, gate_ns: float) -> PulseShape:
    gate = t < gate_ns
    charge = float(np.sum(current[gate]) * _GRID_NS)
    peak_i = int(np.argmax(current))
    peak = float(current[peak_i])
    norm = current[: peak_i + 1] / peak
    edge = np.maximum.accumulate(norm)
    return PulseShape(t_ns=t, current_per_pC=current, charge_per_pC=charge,
                      peak_mV_per_pC=peak * INPUT_OHM, edge=edge, edge_t_ns=t[: peak_i + 1])


def dac_waveform(t_ns: np.ndarray, rise_ns: float, fall_ns: float) -> np.ndarray:
    """The DAC's calibration waveform, unit height: sin^2 edge over rise_ns, exponential tail."""
    rising = np.sin(0.5 * np.pi * np.clip(t_ns, 0.0, rise_ns) / rise_ns) ** 2
    return np.where(t_ns < rise_ns, rising, np.exp(-(t_ns - rise_ns) / fall_ns))


def skin_effect_kernel(t_ns: np.ndarray, k_l: float) -> np.ndarray:
    """Impulse response (1/ns, unit area) of a cable whose loss is pure skin effect,
    H(s) = exp(-k_l sqrt(s)), k_l = K * path length in ns^1/2."""
    t = np.maximum(t_ns, 1e-9)
    return k_l / (2.0 * math.sqrt(math.pi) * t ** 1.5) * np.exp(-k_l ** 2 / (4.0 * t))


@dataclass(frozen=True)
class BoardShape:
    """Parameters of the calibration pulse and of the board's input (shared by all channels)."""
    rise_ns: float = 80.0
    fall_ns: float = 5.0
    input_tau_ns: float = 0.7
    adc_gate_ns: float = 300.0
    span_ns: float = 800.0

    def grid(self) -> np.ndarray:
        return np.arange(0.0, self.span_ns, _GRID_NS)

    def _input_filter(self, t: np.ndarray, x: np.ndarray) -> np.ndarray:
        kernel = np.exp(-t / self.input_tau_ns) / self.input_tau_ns * _GRID_NS
        return fftconvolve(x, kernel)[: len(t)]

    def direct(self) -> PulseShape:
        t = self.grid()
        raw = dac_waveform(t, self.rise_ns, self.fall_ns)
        shaped = self._input_filter(t, raw)
        shaped /= np.sum(shaped[t < self.adc_gate_ns]) * _GRID_NS     # ADC charge = 1 pC per pC
        return _tabulate(t, shaped, self.adc_gate_ns)

    def reflected(self, path_m: float, skin_k: float, dc_loss_per_m: float,
                  coupling: float) -> PulseShape:
        """The pulse after `path_m` of cable (there and back), per pC of direct charge."""
        t = self.grid()
        direct_raw = dac_waveform(t, self.rise_ns, self.fall_ns)
        direct_scale = np.sum(self._input_filter(t, direct_raw)[t < self.adc_gate_ns]) * _GRID_NS
        # The skin kernel's tail beyond the grid holds charge that never reaches the ADC gate.
        kernel = skin_effect_kernel(t, skin_k * path_m) * _GRID_NS
        dispersed = fftconvolve(direct_raw, kernel)[: len(t)]
        shaped = self._input_filter(t, dispersed) / direct_scale
        shaped *= coupling * math.exp(-dc_loss_per_m * path_m)
        return _tabulate(t, shaped, self.adc_gate_ns)


@dataclass
class CableSim:
    """An RG58 cable between a channel and its (open) far end. length_m = 0: nothing connected."""
    length_m: float = 20.0
    velocity_m_per_ns: float = 0.208          # at reference_C
    temp_coeff_per_K: float = 1.0e-4          # relative change of the transit time per kelvin
    reference_C: float = 20.0
    skin_k: float = RG58_SKIN_K
    dc_loss_per_m: float = RG58_DC_LOSS_PER_M

    @property
    def connected(self) -> bool:
        return self.length_m > 0.0

    def transit_ns(self, temperature_C: float | np.ndarray) -> float | np.ndarray:
        """Round-trip transit time 2 L / v at the given cable temperature (ns)."""
        scale = 1.0 + self.temp_coeff_per_K * (np.asarray(temperature_C) - self.reference_C)
        return 2.0 * self.length_m / self.velocity_m_per_ns * scale


@dataclass
class Environment:
    """Temperature of the cable run (deg C): a daily cycle plus slow, seeded weather."""
    mean_C: float = 20.0
    daily_swing_K: float = 8.0
    peak_hour_utc: float = 14.0
    weather_K: float = 1.5
    seed: int = 0
    _weather: list = field(default_factory=list, repr=False)

    def __post_init__(self):
        rng = np.random.default_rng([self.seed, 8])
        periods_s = rng.uniform(1.5, 6.0, 3) * 86400.0
        self._weather = [(p, rng.uniform(0, 2 * np.pi), a)
                         for p, a in zip(periods_s, rng.dirichlet(np.ones(3)))]

    def temperature_C(self, t: float | np.ndarray) -> float | np.ndarray:
        t = np.asarray(t, dtype=float)
        hours = (t / 3600.0) % 24.0
        daily = np.cos(2 * np.pi * (hours - self.peak_hour_utc) / 24)
        temp = self.mean_C + self.daily_swing_K * daily
        for period, phase, share in self._weather:
            temp = temp + self.weather_K * share * np.sin(2 * np.pi * t / period + phase)
        return temp if temp.ndim else float(temp)


@dataclass
class _Sweep:
    registers: np.ndarray
    t_start: float                  # world time the sequencer started (busy/done bookkeeping)
    period_s: float
    temperature_C: float
    results: dict[int, PulseResults]
    pulses_start: float             # world time of the first pulse the physics was computed for
    stopped_at: int | None = None

    def done_pulses(self, now: float) -> int:
        n = len(self.registers)
        if self.stopped_at is not None:
            return self.stopped_at
        return min(n, int((now - self.t_start) / self.period_s))

    def busy(self, now: float) -> bool:
        return self.done_pulses(now) < len(self.registers) and self.stopped_at is None


class FeeBoardSim:
    """Simulated Daya Bay FEE board in calibration mode with a cable on each channel.

    Same interface as the hardware backend (calbench.iocs.hw.fee.FeeVmeBoard): register, thresholds,
    channel mask, sequencer range/step/start/stop, per-sweep results, single pulses, temperature,
    make_safe. The attributes `cables`, `environment` and `shape` are the simulation's hidden truth.
    """

    def __init__(self, clock: WorldClock, seed: int = 0, *,
                 cable_lengths_m: list[float] | None = None,
                 velocity_m_per_ns: float = 0.208, temp_coeff_per_K: float = 1.0e-4,
                 shape: BoardShape | None = None, coupling: float = 0.0383,
                 threshold_mV: float = DEFAULT_THRESHOLD_MV, pulse_rate_hz: float = 10_000.0,
                 clock_jitter_ns: float = 0.25, voltage_noise_mV: float = 0.02,
                 adc_noise_pC: float = 0.08, environment: Environment | None = None):
        self.clock = clock
        self.seed = int(seed)
        self._rng = np.random.default_rng([self.seed, 3])
        lengths = (list(cable_lengths_m) if cable_lengths_m is not None
                   else [DEFAULT_CABLE_M] * N_CHANNELS)
        if len(lengths) != N_CHANNELS:
            raise ValueError(f"cable_lengths_m needs {N_CHANNELS} entries (0 = no cable), "
                             f"got {len(lengths)}")
        self.cables = [CableSim(float(L), velocity_m_per_ns, temp_coeff_per_K) for L in lengths]
        self.shape = shape or BoardShape()
        self.coupling = float(coupling)
        self.environment = environment or Environment(seed=self.seed)
        self.clock_jitter_ns = float(clock_jitter_ns)
        self.voltage_noise_mV = float(voltage_noise_mV)
        self.adc_noise_pC = float(adc_noise_pC)
        self.pulse_rate_hz = float(pulse_rate_hz)
        board = np.random.default_rng([self.seed, 1])
        # Trigger-to-pulse delay of each channel: cable-to-board trace plus the fixed sub-LSB phase
        # between the pulse and the TDC bins (pulses are synchronous with the board clock).
        self.channel_delay_ns = 200.0 + board.uniform(0.0, 3.0, N_CHANNELS)
        # DAC integral non-linearity below 1 LSB (AD9726 data sheet), a smooth seeded curve.
        codes = np.arange(DAC_MAX + 1) / DAC_MAX
        phase = board.uniform()
        self.dac_inl_lsb = 0.8 * np.sin(np.pi * codes) * np.sin(2 * np.pi * (3 * codes + phase))
        self.thresholds_mV = np.full(N_CHANNELS, float(threshold_mV))
        self.register = 0
        self.channel_mask = (1 << N_CHANNELS) - 1
        self.seq_start, self.seq_stop, self.seq_step = 500, 12000, 1
        self._sweep: _Sweep | None = None
        self._direct: PulseShape | None = None
        self._reflected: dict[tuple, PulseShape] = {}
        self.sweeps_done = 0

    # -- shapes (cached: recomputed only when the board or a cable changes) ------------------------
    def direct_shape(self) -> PulseShape:
        if self._direct is None:
            self._direct = self.shape.direct()
        return self._direct

    def reflected_shape(self, channel: int) -> PulseShape | None:
        cable = self.cables[channel]
        if not cable.connected:
            return None
        key = (round(2 * cable.length_m, 6), cable.skin_k, cable.dc_loss_per_m, self.coupling,
               self.shape)
        if key not in self._reflected:
            if len(self._reflected) > 64:
                self._reflected.clear()
            self._reflected[key] = self.shape.reflected(2 * cable.length_m, cable.skin_k,
                                                        cable.dc_loss_per_m, self.coupling)
        return self._reflected[key]

    def set_shape(self, **changes) -> None:
        """Simulation: change the calibration waveform / input parameters (BoardShape fields)."""
        from dataclasses import replace
        self.shape = replace(self.shape, **changes)
        self._direct = None
        self._reflected.clear()

    # -- physics ---------------------------------------------------------------------------------
    def charge_of(self, registers: np.ndarray) -> np.ndarray:
        """True direct-pulse charge (pC) of DAC register values."""
        registers = np.asarray(registers, dtype=np.int64)
        return (registers + self.dac_inl_lsb[registers]) * (DAC_FULL_SCALE_PC / DAC_MAX)

    def temperature_C(self, t: float | None = None) -> float:
        return self.environment.temperature_C(self.clock.now() if t is None else t)

    def truth(self, channel: int, t: float | None = None) -> dict:
        """Hidden truth of a channel at world time t (tests and studies only)."""
        t = self.clock.now() if t is None else t
        cable = self.cables[channel]
        temp = self.temperature_C(t)
        shape = self.reflected_shape(channel)
        direct = self.direct_shape()
        return {
            "temperature_C": temp, "length_m": cable.length_m,
            "velocity_m_per_ns": cable.velocity_m_per_ns,
            "transit_ns": float(cable.transit_ns(temp)) if cable.connected else math.nan,
            "t0_direct_ns": float(self.channel_delay_ns[channel]),
            "threshold_mV": float(self.thresholds_mV[channel]),
            "direct_threshold_pC": float(self.thresholds_mV[channel] / direct.peak_mV_per_pC),
            "reflected_charge_ratio": shape.charge_per_pC if shape else 0.0,
            "reflected_threshold_pC": (float(self.thresholds_mV[channel] / shape.peak_mV_per_pC
                                             * shape.charge_per_pC) if shape else math.nan),
        }

    def walk_curve(self, channel: int, registers: np.ndarray, t: float | None = None) -> dict:
        """Hidden truth: the noise-free, unquantised threshold-crossing times (ns) of the direct and
        reflected pulses at the given registers (NaN below the threshold), their charges (pC) and
        the true start times of the two pulses. Studies use it to measure the walk model's own
        bias on the simulated pulse shapes."""
        t = self.clock.now() if t is None else t
        q = self.charge_of(np.asarray(registers))
        threshold = float(self.thresholds_mV[channel])
        start = float(self.channel_delay_ns[channel])
        out = {"t0_direct_ns": start}
        for kind, shape, delay in (("direct", self.direct_shape(), 0.0),
                                   ("reflected", self.reflected_shape(channel),
                                    float(self.cables[channel].transit_ns(self.temperature_C(t))))):
            if shape is None:
                out[f"q_{kind}_pC"] = out[f"t_{kind}_ns"] = np.full(q.size, np.nan)
                out[f"t0_{kind}_ns"] = math.nan
                continue
            peak = q * shape.peak_mV_per_pC
            fired = peak > threshold
            level = np.where(fired, threshold / np.where(fired, peak, 1.0), 1.0)
            out[f"q_{kind}_pC"] = q * shape.charge_per_pC
            out[f"t_{kind}_ns"] = np.where(fired, start + delay + shape.crossing(level), np.nan)
            out[f"t0_{kind}_ns"] = start + delay
        return out

    def _discriminate(self, q_true: np.ndarray, shape: PulseShape, threshold_mV: float,
                      start_ns: np.ndarray, rng: np.random.Generator
                      ) -> tuple[np.ndarray, np.ndarray]:
        """(TDC time ns, fired mask) of pulses with direct charges q_true through the threshold.

        The input noise (slow compared with the edge) shifts the level the pulse must reach, so its
        effect on the crossing time follows the edge's own slope; clock jitter adds on top."""
        peak_mV = q_true * shape.peak_mV_per_pC
        effective = threshold_mV - self.voltage_noise_mV * rng.standard_normal(len(q_true))
        fired = (peak_mV > effective) & (effective > 0.0)
        level = np.where(fired, effective / np.where(peak_mV > 0, peak_mV, 1.0), 1.0)
        t = start_ns + shape.crossing(level) + self.clock_jitter_ns * rng.standard_normal(len(q_true))
        tdc = np.floor(t / TDC_LSB_NS) * TDC_LSB_NS
        return np.where(fired, tdc, np.nan), fired

    def _adc(self, q: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        measured = q + self.adc_noise_pC * rng.standard_normal(len(q))
        fine = np.round(measured / ADC_FINE_LSB_PC) * ADC_FINE_LSB_PC
        coarse = np.minimum(np.round(measured / ADC_COARSE_LSB_PC) * ADC_COARSE_LSB_PC,
                            ADC_COARSE_MAX_PC)
        return np.where(measured < ADC_FINE_MAX_PC, np.maximum(fine, 0.0), coarse)

    def pulses(self, channel: int, registers: np.ndarray, times: np.ndarray,
               rng: np.random.Generator | None = None) -> PulseResults:
        """Direct and reflected results of one channel for pulses at the given registers and world
        times, vectorised."""
        rng = self._rng if rng is None else rng
        registers = np.asarray(registers, dtype=np.int64)
        q = self.charge_of(registers)
        threshold = float(self.thresholds_mV[channel])
        start = np.full(len(q), self.channel_delay_ns[channel])
        direct = self.direct_shape()
        t_d, fired_d = self._discriminate(q, direct, threshold, start, rng)
        q_d = np.where(fired_d, self._adc(q * direct.charge_per_pC, rng), np.nan)
        shape = self.reflected_shape(channel)
        if shape is None:          # open input: the reflection merges with the direct pulse
            nan = np.full(len(q), np.nan)
            return PulseResults(q_d, t_d, nan, nan.copy())
        transit = self.cables[channel].transit_ns(self.environment.temperature_C(times))
        t_r, fired_r = self._discriminate(q, shape, threshold, start + transit, rng)
        q_r = np.where(fired_r, self._adc(q * shape.charge_per_pC, rng), np.nan)
        return PulseResults(q_d, t_d, q_r, t_r)

    # -- board interface (shared with the hardware backend) ----------------------------------------
    def enabled_channels(self, mask: int | None = None) -> list[int]:
        mask = self.channel_mask if mask is None else mask
        return [c for c in range(N_CHANNELS) if mask >> c & 1]

    def set_register(self, code: int) -> None:
        if not float(code).is_integer() or not 0 <= code <= DAC_MAX:
            raise Refused(f"DAC register {code} outside 0..{DAC_MAX}; use an integer in that range")
        self.register = int(code)

    def set_threshold(self, channel: int, mV: float) -> None:
        self._check_channel(channel)
        lo, hi = THRESHOLD_RANGE_MV
        if not lo <= mV <= hi:
            raise Refused(f"channel {channel}: threshold {mV} mV outside {lo}..{hi} mV")
        self.thresholds_mV[channel] = float(mV)

    def set_channel_mask(self, mask: int) -> None:
        if not 0 < mask < 1 << N_CHANNELS:
            raise Refused(f"channel mask {mask:#x} must enable at least one of the {N_CHANNELS} "
                          f"channels (1..{(1 << N_CHANNELS) - 1:#x})")
        self._check_idle("change the channel mask")
        self.channel_mask = int(mask)

    def set_sweep_range(self, start: int, stop: int, step: int) -> None:
        for what, value in (("start", start), ("stop", stop)):
            if not float(value).is_integer() or not 0 <= value <= DAC_MAX:
                raise Refused(f"sweep {what} {value} outside the DAC register 0..{DAC_MAX}; "
                              f"choose a register in that range")
        if not float(step).is_integer() or step < 1:
            raise Refused(f"sweep step {step} must be a positive integer number of DAC codes")
        self._check_idle("change the sweep range")
        self.seq_start, self.seq_stop, self.seq_step = int(start), int(stop), int(step)

    def sweep_registers(self) -> np.ndarray:
        return np.arange(self.seq_start, self.seq_stop + 1, self.seq_step, dtype=np.int64)

    def start_sweep(self) -> int:
        """Start the sequencer over the configured range; returns the number of pulses."""
        self._check_idle("start another sweep")
        if self.seq_start > self.seq_stop:
            raise Refused(f"sweep start {self.seq_start} is above stop {self.seq_stop}; "
                          "set Seq:Start <= Seq:Stop")
        registers = self.sweep_registers()
        now = self.clock.now()
        period = 1.0 / self.pulse_rate_hz
        times = now + np.arange(len(registers)) * period
        results = {c: self.pulses(c, registers, times) for c in self.enabled_channels()}
        # The sweep's world duration runs from here: computing it is not part of the board's time.
        # The pulses themselves (times, temperature) are those of `now`, whatever the computing took.
        self._sweep = _Sweep(registers, self.clock.now(), period, self.temperature_C(now), results,
                             pulses_start=now)
        return len(registers)

    def stop_sweep(self) -> None:
        sweep = self._sweep
        if sweep is not None and sweep.busy(self.clock.now()):
            sweep.stopped_at = sweep.done_pulses(self.clock.now())

    def sweep_status(self) -> tuple[bool, int, int]:
        """(busy, pulses done, pulses in the sweep)."""
        if self._sweep is None:
            return False, 0, 0
        now = self.clock.now()
        return self._sweep.busy(now), self._sweep.done_pulses(now), len(self._sweep.registers)

    def sweep_result(self) -> SweepResult | None:
        """The last finished (or stopped) sweep; None while one is running or before the first."""
        sweep = self._sweep
        if sweep is None or sweep.busy(self.clock.now()):
            return None
        n = sweep.done_pulses(self.clock.now())
        channels = {c: PulseResults(*(getattr(r, f)[:n] for f in PulseResults.__dataclass_fields__))
                    for c, r in sweep.results.items()}
        return SweepResult(sweep.registers[:n], sweep.pulses_start + np.arange(n) * sweep.period_s,
                           sweep.period_s, sweep.temperature_C, channels, n == len(sweep.registers))

    def fire(self) -> dict[int, tuple[float, float, float, float]]:
        """One calibration pulse at the current register on every enabled channel:
        {channel: (direct pC, direct ns, reflected pC, reflected ns)}."""
        self._check_idle("fire a single pulse")
        now = np.array([self.clock.now()])
        out = {}
        for c in self.enabled_channels():
            r = self.pulses(c, np.array([self.register]), now)
            out[c] = (float(r.direct_charge_pC[0]), float(r.direct_time_ns[0]),
                      float(r.reflected_charge_pC[0]), float(r.reflected_time_ns[0]))
        return out

    def make_safe(self) -> None:
        """Stop the sequencer and park the DAC at 0: no calibration pulses reach the detectors."""
        self.stop_sweep()
        self.register = 0

    # -- simulation knobs --------------------------------------------------------------------------
    def set_cable_length(self, channel: int, length_m: float) -> None:
        self._check_channel(channel)
        if not 0.0 <= length_m <= 2000.0:
            raise Refused(f"channel {channel}: cable length {length_m} m outside 0..2000 m "
                          "(0 = none)")
        self.cables[channel].length_m = float(length_m)

    def _check_channel(self, channel: int) -> None:
        if not 0 <= channel < N_CHANNELS:
            raise Refused(f"no channel {channel}; the board has channels 0..{N_CHANNELS - 1}")

    def _check_idle(self, action: str) -> None:
        if self._sweep is not None and self._sweep.busy(self.clock.now()):
            raise Refused(f"cannot {action}: a sweep is running; wait for Seq:Busy_RBV = 0 "
                          "or stop it (Seq:Acquire = 0)")


def build_world(clock: WorldClock, seed: int, settings: dict[str, dict]) -> dict[str, object]:
    """The FEE world's backends by instrument name (settings: the [instruments.fee] keys)."""
    s = settings.get("fee", {})
    lengths = [float(x) for x in s.get("cable_lengths_m", [DEFAULT_CABLE_M] * N_CHANNELS)]
    if len(lengths) != N_CHANNELS:
        raise ValueError(f"[instruments.fee] cable_lengths_m needs {N_CHANNELS} lengths in metres "
                         f"(0 = nothing connected), got {len(lengths)}")
    board = FeeBoardSim(
        clock, seed, cable_lengths_m=lengths,
        velocity_m_per_ns=float(s.get("velocity_m_per_ns", 0.208)),
        temp_coeff_per_K=float(s.get("temp_coeff_per_K", 1.0e-4)),
        threshold_mV=float(s.get("threshold_mV", DEFAULT_THRESHOLD_MV)),
        pulse_rate_hz=float(s.get("pulse_rate_hz", 10_000.0)),
        shape=BoardShape(rise_ns=float(s.get("rise_ns", 80.0))),
        environment=Environment(mean_C=float(s.get("mean_temperature_C", 20.0)),
                                daily_swing_K=float(s.get("daily_swing_K", 8.0)), seed=seed),
    )
    return {"fee": board}
