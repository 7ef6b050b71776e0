# Long by design: the BatMet plans (collect, write, verify, calibrate) share one bench preparation and safe exit.
"""BatMet current-sink calibration as Bluesky plans: collect, fit, write `csink`, verify.

The lab's procedure (reference/qc6_batmet.md part B, `collect.py` and `cal_sink.py`): a lab supply at
4 V with a 3 A limit feeds the BatMet's sink through a 34401A on its current input. The DAC is stepped
450, 460, ... 4090 (`range(450, 4100, 10)`), the meter shows `DAC-<code>`, three readings are
averaged per point, and the scan stops once the current exceeds 3 A. On every exit (success, error,
Ctrl-C/abort) the DAC goes back to 0, the supply output goes off if the plan switched it on, and the
meter returns to local. The plans hold the BatMet's and the supply's procedure leases: if the
session dies, the IOCs do the same by themselves after the lab's `lease_s`. A pause (Ctrl-C) zeroes the
sink and a resume restores it (devices/bench.py).

    RE(collect_sink_calibration(dmm, batmet, psu))      # one run: the scan
    RE(calibrate_sink(dmm, batmet, psu, write=True))    # scan, fit, store csink, verify with `sink`

Without a supply device (`psu=None`) the supply is the operator's, set by hand as in the lab's
instructions; the scan then also stops when the current stops rising (the supply's limit).

The plans read the instruments only through RunEngine messages: ``summarize_plan(calibrate_sink(dmm,
batmet, psu, write=True))`` prints every move and run. In such a dry run (reads answered by nothing)
the meter "measures" the nominal sink, the lab's own `csink` line of the reference, so the scan
stops at the nominal stop current and the fit, the write and the verification follow from it.
"""
from __future__ import annotations

import logging
from functools import partial
from dataclasses import dataclass, field

import bluesky.plan_stubs as bps
import numpy as np
from bluesky.preprocessors import finalize_wrapper
from bluesky.utils import RunEngineControlException

from calbench.contracts.batmet import DAC_MAX
from calbench.analysis.batmet import (CSINK_RANGE_A, SinkAccuracy, SinkFit, csink_line, fit_sink,
                                      setting_accuracy, sink_data_from_table)
from calbench.plans.derived_runs import record_results
from calbench.plans.lease import under_lease
from calbench.plans.progress import point_progress
from calbench.plans.toolkit import check_connected, put, read_or_nominal, reading_value, reason

log = logging.getLogger(__name__)

PROCEDURE = "batmet_sink_calibration"
DAC_START = 450                 # collect.py: range(450, 4100, 10)
DAC_STOP = 4100
DAC_STEP = 10
READINGS_PER_POINT = 3
STOP_CURRENT_A = 3.0
SUPPLY_VOLTAGE_V = 4.0
SUPPLY_CURRENT_LIMIT_A = 3.0
METER_NPLC = 10.0               # the 34401A's default integration time
VERIFY_CURRENTS_A = tuple(float(x) for x in np.round(np.arange(0.1, 3.0, 0.2), 3))   # 0.1 .. 2.9 A
ACCEPT_MAX_ERROR_A = 0.005      # a fit worse than this is not written to the BatMet
# What a dry run's meter reads: the lab's own line `csink 0 4 0.209938 762.136354 522.857571`
# (reference/qc6_batmet.md; 3 A at DAC 2811), DAC = a*I^2 + b*I + c.
NOMINAL_SINK = (0.209938, 762.136354, 522.857571)


class BenchNotReady(RuntimeError):
    """An instrument of the bench does not answer, or is not the instrument it should be."""


class UnsafeState(RuntimeError):
    """The bench could not be left safe (DAC not 0 or supply not off); the message says what to do."""


class CalibrationRejected(RuntimeError):
    """The fit is not good enough to be written to the BatMet; nothing was written."""


@dataclass
class SinkScan:
    """What a sink scan measured (the same numbers its run holds): DAC codes, mean currents (A),
    points where the supply clamped the current, why the scan ended, the run's uid."""
    uid: str | None
    dac: np.ndarray
    current_A: np.ndarray
    limited: np.ndarray
    stop_reason: str


@dataclass
class SinkCalibration:
    """Result of `calibrate_sink`: the scan, the fit, the csink line, and (if verified) the errors of
    currents set with `sink`."""
    scan: SinkScan
    fit: SinkFit
    csink: str
    written: bool = False
    accuracy: SinkAccuracy | None = None
    run_uids: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        """JSON-able result (what the queue server reports)."""
        return {"csink": self.csink, "written": self.written,
                "fit_max_error_A": float(self.fit.max_error_A),
                "fit_rms_error_A": float(self.fit.rms_error_A),
                "verified_max_error_A": (float(self.accuracy.max_error_A) if self.accuracy
                                         else None),
                "run_uids": [u for u in self.run_uids if u]}

    def summary(self) -> str:
        verified = (f"; set with sink: max {self.accuracy.max_error_A * 1e3:.2f} mA, RMS "
                    f"{self.accuracy.rms_error_A * 1e3:.2f} mA" if self.accuracy else "")
        return (f"BatMet current sink: {self.csink}  "
                f"({'written to the BatMet' if self.written else 'not written (write=False)'})\n"
                f"  fit: max {self.fit.max_error_A * 1e3:.2f} mA, RMS "
                f"{self.fit.rms_error_A * 1e3:.2f} mA over {len(self.scan.dac)} points{verified}\n"
                f"  runs: {', '.join(u for u in self.run_uids if u) or 'none (a dry run)'}   "
                f"(last_run(cat, 'collect_sink_calibration'), derived_runs(cat, uid))")


# -- helpers ------------------------------------------------------------------------------------------


_why = reason
# a refusal or fault becomes BenchNotReady saying what failed
_put = partial(put, error=BenchNotReady)
_check_connected = partial(check_connected, error=BenchNotReady)


def _prepare(dmm, sink, psu, *, readings_per_point: int, nplc: float, supply_voltage_V: float,
             supply_current_limit_A: float, state: dict):
    """Identify the meter and the BatMet (as the lab's tool does on every start), configure the
    meter for DC current with autorange, and bring the supply to its setpoints, output on."""
    # the meter first: nothing is touched when it is absent or is not a 34401A
    yield from _put(dmm.reconnect_cmd, 1, "identifying the 34401A multimeter")
    yield from _check_connected(dmm, "34401A multimeter")
    yield from _put(sink.reconnect_cmd, 1, "identifying the BatMet")
    yield from _check_connected(sink, "BatMet")
    yield from _put(dmm.function, "CURR:DC", "selecting DC current on the meter")
    yield from _put(dmm.range_setting, 0.0, "selecting autorange on the meter")
    yield from _put(dmm.nplc, nplc, f"setting the meter's integration time to {nplc:g} NPLC")
    yield from _put(dmm.samples, readings_per_point, "setting the readings per point")
    yield from _put(sink.dac, 0, "setting the BatMet DAC to 0")
    if psu is not None:
        yield from _put(psu.reconnect_cmd, 1, "identifying the lab supply")
        yield from _check_connected(psu, "lab supply")
        yield from _put(psu.voltage, supply_voltage_V, f"setting the supply to {supply_voltage_V} V")
        yield from _put(psu.current_limit, supply_current_limit_A,
                        f"setting the supply's current limit to {supply_current_limit_A} A")
        if (yield from read_or_nominal(psu.output, "Off")) != "On":
            state["turned_on"] = True
            yield from _put(psu.output, "On", "switching the supply output on")


def _leave_safe(dmm, sink, psu, state: dict):
    """DAC 0; supply output off if this plan switched it on (or if the DAC could not be zeroed);
    meter display cleared and back to local. Every step is tried; after a successful plan a
    failure to make the bench safe raises UnsafeState, after a failed one it is logged (the
    original error propagates)."""
    unsafe = []
    try:
        yield from bps.mv(sink.dac, 0)
    except Exception as exc:
        unsafe.append(f"the BatMet DAC could not be set to 0 ({_why(exc)})")
    if psu is not None and (state.get("turned_on") or unsafe):
        try:
            yield from bps.mv(psu.output, "Off")
        except Exception as exc:
            unsafe.append(f"the supply output could not be switched off ({_why(exc)})")
    for signal, value in ((dmm.display_clear, 1), (dmm.remote, "Local")):
        try:
            yield from bps.mv(signal, value)
        except Exception as exc:
            log.warning("meter not returned to the operator (%s = %r): %s", signal.name, value,
                        _why(exc))
    if unsafe:
        message = ("; ".join(unsafe) + ": switch the supply off or unplug the BatMet by hand, "
                   "then check its USB link")
        if state.get("completed"):
            raise UnsafeState(message)
        log.error(message)


def _safe_bench(plan, dmm, sink, psu, state: dict):
    """The bench left safe on every exit path, under the BatMet's and the supply's procedure
    leases (if the session dies, their IOCs zero the sink and switch off a supply the plan
    switched on)."""
    return (yield from under_lease([sink, psu],
                                   finalize_wrapper(plan, _leave_safe(dmm, sink, psu, state))))


def nominal_current_A(code: int) -> float:
    """The current (A) the nominal sink draws at a DAC code (0 in the dead zone below c)."""
    a, b, c = NOMINAL_SINK
    if code <= c:
        return 0.0
    return float((-b + np.sqrt(b * b - 4 * a * (c - code))) / (2 * a))


def _current_stopped_rising(currents: list[float], stop_current_A: float) -> bool:
    """True when the last two steps added less than a fifth of the typical step, well above the
    dead zone: something (the supply's limit, the compliance) clamps the current."""
    if len(currents) < 6 or currents[-1] < 0.1 * stop_current_A:
        return False
    steps = np.diff(currents)
    rising = steps[np.asarray(currents[1:]) > 0.01]
    if rising.size < 4:
        return False
    typical = float(np.median(rising))
    return typical > 0 and bool(np.all(steps[-2:] < 0.2 * typical))


# -- plans --------------------------------------------------------------------------------------------

def collect_sink_calibration(dmm, sink, psu=None, *, dac_start: int = DAC_START,
                             dac_stop: int = DAC_STOP, dac_step: int = DAC_STEP,
                             readings_per_point: int = READINGS_PER_POINT,
                             stop_current_A: float = STOP_CURRENT_A,
                             supply_voltage_V: float = SUPPLY_VOLTAGE_V,
                             supply_current_limit_A: float = SUPPLY_CURRENT_LIMIT_A,
                             nplc: float = METER_NPLC, display: bool = True, md: dict | None = None):
    """Scan the BatMet sink's DAC and measure the current with the 34401A (one run).

    DAC codes range(dac_start, dac_stop, dac_step) (450..4090 by 10), readings_per_point meter
    readings averaged per code (the meter's Samples), the scan ends after the first point above
    stop_current_A (3 A), or when the supply reports it is clamping the current (with `psu`), or
    when the current stops rising (without `psu`). The supply (if given) is set to
    supply_voltage_V (4 V) with supply_current_limit_A (3 A), output on. The meter shows
    `DAC-<code>` when `display`. Returns a SinkScan; the run's primary stream has the DAC code
    (`<sink>_dac`), the mean current (`<dmm>_reading`, A), its spread, the meter range, the
    BatMet's ADC and the supply's readbacks and over-current flag."""
    codes = list(range(dac_start, dac_stop, dac_step)) if dac_step > 0 else []
    if not codes or codes[0] < 0 or codes[-1] > DAC_MAX:
        raise ValueError(f"DAC scan range({dac_start}, {dac_stop}, {dac_step}): need codes in "
                         f"0..{DAC_MAX} and a positive step")
    if readings_per_point < 1:
        raise ValueError(f"readings_per_point = {readings_per_point}: need at least 1")
    detectors = [dmm, sink] + ([psu] if psu is not None else [])
    state: dict = {}
    keys = {"dac_key": sink.dac.name, "current_key": dmm.reading.name,
            "limited_key": psu.over_current.name if psu is not None else None}

    def body():
        yield from _prepare(dmm, sink, psu, readings_per_point=readings_per_point, nplc=nplc,
                            supply_voltage_V=supply_voltage_V,
                            supply_current_limit_A=supply_current_limit_A, state=state)
        identities = {"dmm": (yield from bps.rd(dmm.identity)),
                      "batmet": (yield from bps.rd(sink.identity))}
        if psu is not None:
            identities["psu"] = yield from bps.rd(psu.identity)
        _md = {
            "procedure": PROCEDURE, "step": "collect",
            "plan_name": "collect_sink_calibration",
            "plan_args": {"dac_start": dac_start, "dac_stop": dac_stop, "dac_step": dac_step,
                          "readings_per_point": readings_per_point,
                          "stop_current_A": stop_current_A, "nplc": nplc,
                          "supply_voltage_V": supply_voltage_V if psu is not None else None,
                          "supply_current_limit_A":
                              supply_current_limit_A if psu is not None else None},
            "instruments": {"dmm": dmm.name, "batmet": sink.name,
                            "psu": psu.name if psu is not None else "set by hand"},
            "identities": identities,
            "sink_calibration": keys,
            "num_points": len(codes),
            "hints": {"dimensions": [([sink.dac.name], "primary")]},
            **(md or {}),
        }
        uid = yield from bps.open_run(md=_md)
        dacs, currents, limited = [], [], []
        reason = f"reached the last DAC code {codes[-1]}"
        for code in codes:
            yield from bps.checkpoint()       # a resumed pause measures this point again
            try:
                yield from bps.mv(sink.dac, code)
                if display:
                    yield from bps.mv(dmm.display_text, f"DAC-{code}")
                reading = yield from bps.trigger_and_read(detectors)
            except RunEngineControlException:
                raise
            except Exception as exc:
                raise BenchNotReady(f"the scan stopped at DAC {code}: {_why(exc)}") from exc
            # a dry run reads nothing: the nominal sink's current, never clamped
            current = float(reading_value(reading, dmm.reading.name, nominal_current_A(code)))
            clamped = psu is not None and bool(reading_value(reading, psu.over_current.name,
                                                             False))
            dacs.append(code)
            currents.append(current)
            limited.append(clamped)
            if current > stop_current_A:
                reason = f"current {current:.4f} A above {stop_current_A:g} A at DAC {code}"
                break
            if clamped:
                reason = (f"the supply clamped the current at {current:.4f} A (DAC {code}); "
                          "its current limit is below the stop current")
                break
            if psu is None and _current_stopped_rising(currents, stop_current_A):
                reason = (f"the current stopped rising at {current:.4f} A (DAC {code}): the "
                          "supply's current limit or voltage is too low")
                break
        yield from bps.close_run(reason=reason)
        state["completed"] = True
        return SinkScan(uid, np.array(dacs), np.array(currents), np.array(limited, bool), reason)

    # the total is the last code: the scan usually ends earlier, at the stop current
    scan = point_progress(body(), len(codes), f"BatMet DAC scan (ends above {stop_current_A:g} A)")
    return (yield from _safe_bench(scan, dmm, sink, psu, state))


def write_sink_calibration(sink, a: float, b: float, c: float, *,
                           min_A: float = CSINK_RANGE_A[0], max_A: float = CSINK_RANGE_A[1]):
    """Store `csink min max a b c` in the BatMet (DAC = a*I^2 + b*I + c on min..max A). The values
    are staged first and sent in one command, so a refused value leaves the stored calibration as
    it was. Returns the line the BatMet stored."""
    yield from _put(sink.reconnect_cmd, 1, "identifying the BatMet")
    for signal, value, name in ((sink.cal_min, min_A, "min"), (sink.cal_max, max_A, "max"),
                                (sink.cal_a, a, "a"), (sink.cal_b, b, "b"), (sink.cal_c, c, "c")):
        yield from _put(signal, float(value), f"staging csink {name} = {value}")
    yield from _put(sink.cal_write, 1, "storing the csink calibration")
    return (yield from read_or_nominal(sink.calibration, csink_line(a, b, c, min_A, max_A)))


def verify_sink_calibration(dmm, sink, psu=None, *,
                            currents_A=VERIFY_CURRENTS_A,
                            readings_per_point: int = READINGS_PER_POINT,
                            supply_voltage_V: float = SUPPLY_VOLTAGE_V,
                            supply_current_limit_A: float = SUPPLY_CURRENT_LIMIT_A,
                            nplc: float = METER_NPLC, md: dict | None = None):
    """Set currents with the BatMet's `sink` command and measure them (one run); returns the
    SinkAccuracy (measured - requested). The bench is left safe as by collect_sink_calibration."""
    currents_A = [float(x) for x in currents_A]
    if not currents_A:
        raise ValueError("no verification currents given")
    state: dict = {}
    detectors = [dmm, sink.sink, sink.dac] + ([psu] if psu is not None else [])

    def body():
        yield from _prepare(dmm, sink, psu, readings_per_point=readings_per_point, nplc=nplc,
                            supply_voltage_V=supply_voltage_V,
                            supply_current_limit_A=supply_current_limit_A, state=state)
        _md = {"procedure": "batmet_sink_verification", "plan_name": "verify_sink_calibration",
               "step": "verify",
               "plan_args": {"currents_A": currents_A, "readings_per_point": readings_per_point},
               "calibration": (yield from bps.rd(sink.calibration)),
               "hints": {"dimensions": [([sink.sink.name], "primary")]}, **(md or {})}
        yield from bps.open_run(md=_md)
        measured = []
        for target in currents_A:
            yield from bps.checkpoint()
            try:
                yield from bps.mv(sink.sink, target)
                yield from bps.mv(dmm.display_text, f"SINK {target:.3f}A"[:12])
                reading = yield from bps.trigger_and_read(detectors)
            except RunEngineControlException:
                raise
            except Exception as exc:
                raise BenchNotReady(f"verification stopped at {target:g} A: {_why(exc)}") \
                    from exc
            measured.append(float(reading_value(reading, dmm.reading.name, target)))
        yield from bps.close_run()
        state["completed"] = True
        return setting_accuracy(currents_A, measured)

    return (yield from _safe_bench(body(), dmm, sink, psu, state))


def record_sink_fit(fit: SinkFit, *, parent_uid: str | None, min_A: float = CSINK_RANGE_A[0],
                    max_A: float = CSINK_RANGE_A[1], md: dict | None = None):
    """A derived run holding the fit (linked to the scan by start.parent_uid): one event in stream
    "fit" with the coefficients and the accuracy figures; the csink line in the start document.
    Returns the run's uid."""
    values = {"a": fit.a, "b": fit.b, "c": fit.c, "max_error_A": fit.max_error_A,
              "rms_error_A": fit.rms_error_A, "lsb_A": fit.lsb_A}
    _md = {"procedure": "batmet_sink_fit", "analysis": "calbench.analysis.batmet:fit_sink",
           "plan_name": "fit_sink", "plan_args": {"parent_uid": parent_uid}, "step": "fit",
           "parent_uid": parent_uid, "csink": fit.csink_line(min_A, max_A), "fit": fit.as_dict(),
           **(md or {})}

    return (yield from record_results({f"csink_{k}": float(v) for k, v in values.items()},
                                      md=_md, stream="fit"))


def fit_stored_scan(catalog, uid: str) -> SinkFit:
    """Fit a stored sink scan read back from tiled (points where the supply clamped the current are
    left out). Plain function: also usable outside the RunEngine."""
    run = catalog[uid]
    keys = run.metadata["start"].get("sink_calibration")
    if not keys:
        raise ValueError(f"run {uid} is not a BatMet sink scan (no start.sink_calibration)")
    columns = [k for k in (keys["dac_key"], keys["current_key"], keys.get("limited_key")) if k]
    table = run["primary"].read(variables=columns)
    dac, current, limited = sink_data_from_table(table, dac_key=keys["dac_key"],
                                                 current_key=keys["current_key"],
                                                 limited_key=keys.get("limited_key"))
    return fit_sink(dac, current, valid=~limited)


def calibrate_sink(dmm, sink, psu=None, *, catalog=None, write: bool = False,
                   verify: bool = True, min_A: float = CSINK_RANGE_A[0],
                   max_A: float = CSINK_RANGE_A[1], accept_max_error_A: float = ACCEPT_MAX_ERROR_A,
                   verify_currents_A=VERIFY_CURRENTS_A, md: dict | None = None, **collect_kwargs):
    """The whole procedure: scan (collect_sink_calibration), fit DAC = a*I^2 + b*I + c (from the
    run read back from `catalog` when given, else from the scan's own numbers), record the fit as a
    derived run, and with write=True store `csink min max a b c` in the BatMet (only if the fit's
    max current error is within accept_max_error_A) and verify it with a `sink` sweep.
    Returns a SinkCalibration."""
    scan = yield from collect_sink_calibration(dmm, sink, psu, md=md, **collect_kwargs)
    if catalog is not None and scan.uid is not None:
        fit = fit_stored_scan(catalog, scan.uid)
    else:
        fit = fit_sink(scan.dac, scan.current_A, valid=~scan.limited)
    result = SinkCalibration(scan, fit, fit.csink_line(min_A, max_A))
    result.run_uids.append(scan.uid)
    result.run_uids.append((yield from record_sink_fit(fit, parent_uid=scan.uid, min_A=min_A,
                                                       max_A=max_A)))
    if not write:
        print(result.summary())
        return result
    if fit.max_error_A > accept_max_error_A:
        raise CalibrationRejected(
            f"the fit's max current error {fit.max_error_A * 1e3:.2f} mA exceeds "
            f"{accept_max_error_A * 1e3:.2f} mA; nothing was written to the BatMet. Check the "
            "wiring and the meter, and repeat the scan")
    result.csink = yield from write_sink_calibration(sink, fit.a, fit.b, fit.c, min_A=min_A,
                                                     max_A=max_A)
    result.written = True
    if verify:
        result.accuracy = yield from verify_sink_calibration(
            dmm, sink, psu, currents_A=verify_currents_A,
            md={"parent_uid": scan.uid, **(md or {})})
    print(result.summary())
    return result
