"""Cable transit-time calibration with the Daya Bay FEE board (reference/fee.md) as Bluesky plans.

    RE(transit_time_calibration(fee, channel=3))                   # one calibration, two runs
    RE(realtime_cable_monitor(fee, channels=range(16)))            # every 20 min (world time)

A calibration is the paper's: the board's sequencer sweeps the calibration DAC register from 500 to
12000 in steps of 1 (11,501 pulses, 14..336 pC direct); every pulse's direct and reflected charge and
TDC time land in tiled as arrays (one event of stream "fee_sweep"); the time-walk fit
(calbench.analysis.timewalk) gives the round-trip transit time dt = T0_reflected - T0_direct and the
cable length. The fit is stored as a derived run (start.parent_uid = the sweep's uid, stream "fit").

The monitor repeats the calibration for each channel every `every_s` seconds of the board's clock
(world time, so simulations can run a day in minutes) and tracks dt against time and the cable
temperature. A channel that cannot be calibrated (no cable, too few TDC bins, a refused setting)
is reported, its derived run closed with exit_status "fail" and the reason, and the monitor goes on
with the others. The board is left safe (sequencer stopped, DAC at 0) on every exit path.

The plans read the board only through RunEngine messages, so ``summarize_plan`` outlines them: in
such a dry run (reads answered by nothing) the sweep is the nominal one asked for, its fit run is
opened with nothing to fit, the calibration returns None, and a monitor without `cycles` outlines
one round.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
from bluesky.preprocessors import finalize_wrapper

from calbench.analysis.fee_callbacks import ChannelFit, TransitTimeFitter
from calbench.analysis.timewalk import (RG58_VELOCITY_M_PER_NS, TransitTimeResult,
                                        plot_monitor_history, plot_walk_fits)
from calbench.plans.derived_runs import record_results
from calbench.plans.toolkit import check_connected, is_dry_run, put, read_or_nominal, reason
from calbench.plans.world_clock import InstrumentClock

log = logging.getLogger(__name__)

# The paper's sweep (reference/fee.md): 11,501 pulses from register 500 to 12000.
SWEEP_START = 500
SWEEP_STOP = 12000
SWEEP_STEP = 1
MONITOR_PERIOD_S = 1200.0           # real-time mode: a calibration every ~20 minutes
MIN_POLL_S, MAX_POLL_S = 0.02, 1.0  # wall-clock bounds of one wait step (keeps pause/abort prompt)


class FeeCalibrationError(RuntimeError):
    """A channel could not be calibrated; the message names the channel, the cause and the fix."""


@dataclass
class MonitorEntry:
    """One calibration in the monitor's history (error: why the channel has no result)."""
    channel: int
    time: float                      # world time of the sweep, epoch s
    temperature_C: float
    dt_ns: float = math.nan
    dt_err_ns: float = math.nan
    length_m: float = math.nan
    error: str = ""
    uids: list[str] = field(default_factory=list)


# -- helpers ---------------------------------------------------------------------------------------


_why = reason


def _put(signal, value, channel: int, what: str):
    """Plan: set one of the board's settings for a channel's calibration (FeeCalibrationError)."""
    return put(signal, value, f"channel {channel}: setting {what} = {value!r}", FeeCalibrationError)


def _leave_safe(fee):
    """Stop the sequencer and park the DAC at 0 (no calibration pulses reach the detectors)."""
    try:
        if int((yield from bps.rd(fee.seq_busy))):
            yield from bps.abs_set(fee.seq_acquire, "Done", wait=True)
        yield from bps.abs_set(fee.cal_dac, 0, wait=True)
    except Exception:          # the board gone: nothing more a plan can do; the IOC makes it safe
        log.exception("could not leave the FEE board safe")




def _record_fit(fit: ChannelFit | None, *, channel: int, parent_uid: str, method: str,
                error: str, md: dict):
    """The derived run of one channel's fit: one event in stream "fit"; closed with exit_status
    "fail" and the reason when there is no result. Returns the run's uid."""
    result = fit.result if fit is not None else None
    values = ({k: v for k, v in result.as_dict().items() if isinstance(v, (int, float))}
              if result else {})
    sweep = fit.sweep if fit is not None else None
    values.update(channel=channel,
                  temperature_C=sweep.temperature_C if sweep is not None else math.nan,
                  sweep_time=sweep.start_time if sweep is not None else math.nan)
    _md = {"procedure": "fee_transit_time_fit",
           "analysis": "calbench.analysis.timewalk:fit_transit_time",
           "plan_name": "fit_transit_time", "step": "fit",
           "plan_args": {"parent_uid": parent_uid, "channel": channel, "method": method},
           "parent_uid": parent_uid, "channel": channel, "method": method, **md}
    if result is not None:
        return (yield from record_results(
            {f"fee_ch{channel:02d}_{k}": float(v) for k, v in values.items()}, md=_md, stream="fit"))
    uid = yield from bps.open_run(md=_md)
    yield from bps.close_run(exit_status="fail", reason=error)
    return uid


# -- plans -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CableCalibration:
    """One calibration of one channel: the fit and where it is stored."""
    channel: int
    result: TransitTimeResult
    time: float                      # world time of the sweep's first pulse, epoch s
    temperature_C: float             # cable temperature at the sweep
    sweep_uid: str
    fit_uid: str

    @property
    def dt_ns(self) -> float:
        return self.result.dt_ns

    @property
    def dt_err_ns(self) -> float:
        return self.result.dt_err_ns

    @property
    def length_m(self) -> float:
        return self.result.length_m

    def as_dict(self) -> dict:
        """JSON-able result (what the queue server reports)."""
        return {"channel": self.channel, "dt_ns": float(self.dt_ns),
                "dt_err_ns": float(self.dt_err_ns), "length_m": float(self.length_m),
                "length_err_m": float(self.result.length_err_m),
                "temperature_C": float(self.temperature_C), "sweep_uid": self.sweep_uid,
                "fit_uid": self.fit_uid}

    def summary(self) -> str:
        return (f"FEE channel {self.channel}: transit time dt = {self.dt_ns:.3f} +- "
                f"{self.dt_err_ns:.3f} ns, cable length {self.length_m:.2f} +- "
                f"{self.result.length_err_m:.2f} m at {self.temperature_C:.1f} degC\n"
                f"  runs: sweep {self.sweep_uid}, fit {self.fit_uid}   "
                f"(last_run(cat, 'fit_transit_time')['fit'].read())")


def transit_time_calibration(fee, channel: int, start: int = SWEEP_START, stop: int = SWEEP_STOP,
                             step: int = SWEEP_STEP, *, method: str = "likelihood",
                             velocity_m_per_ns: float = RG58_VELOCITY_M_PER_NS,
                             plot_dir: str | Path | None = None, md: dict | None = None):
    """Calibrate the transit time of the cable on `channel` (plan; returns a CableCalibration).

    Sweeps the calibration DAC register from `start` to `stop` (inclusive) in steps of `step` with
    the board's sequencer (the paper's 500..12000 by 1 by default), stores every pulse in a run,
    fits the time-walk model and stores the fit as a derived run; `plot_dir` also saves the fit's
    figure there. `method`: "likelihood" (default: every pulse counts; about 0.05 ns per
    calibration on the simulated board) or "binned" (the paper's per-bin means, about 0.1 ns). Raises FeeCalibrationError naming
    the channel when the board refuses the sweep (register range, channel number) or the pulses
    cannot give a transit time (no cable, too few TDC bins). The board is left safe either way."""
    channel = int(channel)
    if not 0 <= channel < 16:
        raise FeeCalibrationError(f"channel {channel}: the FEE board has channels 0..15")
    md = dict(md or {})
    fitter = TransitTimeFitter(method, velocity_m_per_ns=velocity_m_per_ns)

    def fly():
        try:
            yield from bps.kickoff(fee, wait=True)
        except Exception as exc:
            raise FeeCalibrationError(f"channel {channel}: the sweep did not start: "
                                      f"{_why(exc)}") from exc
        try:
            yield from bps.complete(fee, wait=True)
        except Exception as exc:
            raise FeeCalibrationError(
                f"channel {channel}: the sweep did not finish within {fee.complete_timeout_s} s: "
                f"{_why(exc)}; check that the board answers (Connected_RBV)") from exc
        yield from bps.collect(fee)

    def sweep():
        yield from check_connected(fee, "FEE board", FeeCalibrationError)
        yield from _put(fee.channel_mask, 1 << channel, channel, "ChannelMask")
        # Order the puts so that every intermediate range is one the board accepts.
        yield from _put(fee.seq_step, int(step), channel, "Seq:Step")
        if int(start) > int((yield from read_or_nominal(fee.seq_stop, stop))):
            yield from _put(fee.seq_stop, int(stop), channel, "Seq:Stop")
            yield from _put(fee.seq_start, int(start), channel, "Seq:Start")
        else:
            yield from _put(fee.seq_start, int(start), channel, "Seq:Start")
            yield from _put(fee.seq_stop, int(stop), channel, "Seq:Stop")
        threshold = yield from read_or_nominal(fee.channel(channel).threshold, None)
        yield from bpp.run_wrapper(fly(), md={
            "plan_name": "transit_time_calibration", "procedure": "fee_transit_time",
            "step": "sweep", "plan_args": {"channel": channel, "start": int(start),
                                           "stop": int(stop), "step": int(step),
                                           "method": method},
            "instrument": "fee", "channel": channel,
            "sweep": {"start": int(start), "stop": int(stop), "step": int(step)},
            "threshold_mV": None if threshold is None else float(threshold), "method": method,
            **md})

    yield from finalize_wrapper(bpp.subs_wrapper(sweep(), fitter), _leave_safe(fee))
    sweep_uid = fitter.run_uid
    if sweep_uid is None and not fitter.fits:     # a dry run: no pulses; the fit's run opens
        yield from _record_fit(None, channel=channel, parent_uid=None, method=method,
                               error="dry run: nothing measured", md=md)
        print(f"FEE channel {channel}: dry run, nothing measured")
        return None
    fit = fitter.fits.get(channel)
    error = fit.error if fit is not None else (f"channel {channel}: the sweep produced no data for "
                                               "this channel; check ChannelMask")
    fit_uid = yield from _record_fit(fit, channel=channel, parent_uid=sweep_uid, method=method,
                                     error=error, md=md)
    if fit is None or not fit.ok:
        raise FeeCalibrationError(error)
    s = fit.sweep
    if plot_dir is not None:
        path = Path(plot_dir) / f"fee_ch{channel:02d}_walk_{sweep_uid[:8]}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        plot_walk_fits(s.direct_q_pC, s.direct_t_ns, s.reflected_q_pC, s.reflected_t_ns,
                       fit.result, path)
    result = CableCalibration(channel, fit.result, s.start_time, s.temperature_C, sweep_uid, fit_uid)
    print(result.summary())
    return result


def realtime_cable_monitor(fee, channels: Iterable[int], every_s: float = MONITOR_PERIOD_S, *,
                           cycles: int | None = None, start: int = SWEEP_START,
                           stop: int = SWEEP_STOP, step: int = SWEEP_STEP,
                           method: str = "likelihood",
                           velocity_m_per_ns: float = RG58_VELOCITY_M_PER_NS,
                           plot_dir: str | Path | None = None, md: dict | None = None):
    """Calibrate the cables on `channels` every `every_s` world seconds (plan; returns the history,
    a list of MonitorEntry). `cycles` limits the number of rounds (None: until stopped).

    Each round calibrates every channel in turn (transit_time_calibration); a channel that fails is
    recorded with its reason and the others go on. `plot_dir` keeps a figure per channel of its
    transit time against time and temperature, updated after every round."""
    channels = [int(c) for c in channels]
    if not channels:
        raise FeeCalibrationError("realtime_cable_monitor needs at least one channel")
    if every_s <= 0:
        raise FeeCalibrationError(f"every_s = {every_s}: the period must be positive (seconds)")
    clock = InstrumentClock(fee.world_time, min_poll_s=MIN_POLL_S, max_poll_s=MAX_POLL_S)
    history: list[MonitorEntry] = []
    md = {"monitor": {"channels": channels, "every_s": float(every_s)}, **(md or {})}
    round_no = 0
    dry = yield from is_dry_run(fee.world_time)
    if dry and cycles is None:          # a dry run outlines one round of an endless monitor
        cycles = 1
    next_round = yield from clock.now()
    while cycles is None or round_no < cycles:
        if not dry:                     # a dry run's clock stands still
            yield from clock.wait_until(next_round)
        next_round += every_s
        for channel in channels:
            t = yield from clock.now()
            temperature = float((yield from read_or_nominal(fee.temperature, math.nan)))
            try:
                result = yield from transit_time_calibration(
                    fee, channel, start, stop, step, method=method,
                    velocity_m_per_ns=velocity_m_per_ns, md={**md, "monitor_round": round_no})
            except FeeCalibrationError as exc:
                log.warning("cable monitor: %s", exc)
                print(f"cable monitor: {exc}")
                history.append(MonitorEntry(channel, t, temperature, error=str(exc)))
                continue
            if result is None:          # a dry run
                history.append(MonitorEntry(channel, t, temperature, error="dry run"))
                continue
            history.append(MonitorEntry(channel, result.time, result.temperature_C,
                                        result.dt_ns, result.dt_err_ns, result.length_m,
                                        uids=[result.sweep_uid, result.fit_uid]))
        round_no += 1
        if plot_dir is not None:
            _plot_history(history, Path(plot_dir))
    return history


def _plot_history(history: list[MonitorEntry], plot_dir: Path) -> None:
    plot_dir.mkdir(parents=True, exist_ok=True)
    for channel in sorted({e.channel for e in history}):
        good = [e for e in history if e.channel == channel and not e.error]
        if not good:
            continue
        plot_monitor_history([e.time for e in good], [e.temperature_C for e in good],
                             [e.dt_ns for e in good], [e.dt_err_ns for e in good],
                             plot_dir / f"fee_ch{channel:02d}_monitor.png",
                             label=f"channel {channel}")
