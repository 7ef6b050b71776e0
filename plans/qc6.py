"""GEM QC6 high-voltage tests on a CAEN crate, as Bluesky plans with the lab's defaults.

    RE(check_connection(layer))
    RE(megger_test("GE21-M6", [12.0, 15.5, 9.8], [0, 1, 0]))
    RE(stress_test(layer))               # foils one at a time, 0 -> 650 V in 10 V steps
    RE(iv_short_stability(layer))        # divider 200 -> 4600 V, then foils at 550 V for 2 h
    RE(long_stability(layer))            # divider to 4200 V, then foils only at 580 V for 15 h
    RE(resume_long_stability(layer, catalog))   # after a crash: continues with elapsed time + trips

`layer` is a devices.caen.GemLayer (`crate.layer(1)`). Defaults are those of the lab's scripts
(reference/qc6_batmet.md part A), with their bugs fixed: ramps are awaited (status bits, not a
string that never matched), trips are the crate's trip bits (ITRIP/ETRIP) and not any channel found
off, and the voltage recorded for a trip is the last VMon read before it, not the one after.

Safety: every test holds the crate's procedure lease (plans/lease.py): if the RunEngine's process
dies, the IOC ramps every channel down and off by itself once the session's heartbeats stop for the
lab's `lease_s` (30 s); a pause holds the voltages (the GEM practice) and the lease keeps running.
Every test runs inside `qc6_safety`: on any exit (normal end, exception, RE.abort/stop, Ctrl-C,
the crate becoming unreachable) every channel of the layer gets V0Set 0 and Pw Off and the plan
waits until VMon is ~0; while the crate does not answer the plan is suspended, and it resumes
where it was when the crate answers again (trips latched meanwhile are then recorded).

Time: durations are instrument (world) time, read from the IOC's WorldTime_RBV, never the wall
clock; the same plan holds 15 hours in the lab and a few seconds against the accelerated simulator.
Fault timeouts (ramp, switch-on, ClearAlarm, discharge) are world time too, and pass only after three
crate readings past their end (plans/world_clock.py:WorldDeadline): a loaded PC cannot invent them.
Trips are events of the stream "trips" (channel, electrode, voltage before the trip, V0Set, world
time, incident number); result files and plots come from analysis/qc6_callbacks.py.

Channels move with their own move (devices/caen.py: arrival and the SVMax cap are the device's
rule); the plans read the crate only through RunEngine messages, so `summarize_plan(stress_test(
layer))` prints the procedure's outline without touching the crate.

The rooms: plans/qc6_watch.py (monitor bookkeeping, the session), qc6_steps.py (put, ClearAlarm,
switch on, move, hold, recover), qc6_safety.py (suspender, all_off, qc6_safety, preflight),
qc6_run.py (the run around a test), qc6_resume.py; the record devices are devices/qc6_records.py.
"""
from __future__ import annotations
from typing import Sequence

import bluesky.plan_stubs as bps
import numpy as np

from calbench.analysis.qc6_files import result_path
from calbench.contracts.caen import BOARD_CHANNELS, HW_VMAX_V
from calbench.devices.caen import (ELECTRODES, FOILS, GemLayer, HvChannel, divider_setpoints,
                                   held_setpoint)
from calbench.devices.qc6_records import MeggerRecord, Qc6Record, TripRecord, fill
from calbench.plans.progress import StepProgress
from calbench.plans.qc6_resume import long_stability_state, resume_long_stability
from calbench.plans.qc6_run import _base_md, _qc6_run, _run, _verdict, _with_callbacks
from calbench.plans.qc6_safety import (
    CONNECT_TIMEOUT_S, OFF_V, SuspendWhenCrateUnreachable, _preflight, _wait_connected, all_off,
    qc6_safety)
from calbench.plans.qc6_steps import (
    MIN_POLL_S, RAMP_MARGIN_S, STATE_TIMEOUT_S, CrateUnreachable, Qc6Error, RampTimeout, _hold,
    _last_look, _put, _ramp, _recover, _switch_on)
from calbench.plans.qc6_watch import ACK_TIMEOUT_S, ITRIP_CLEARED, MAX_WAIT_WALL_S, _Session
from calbench.plans.toolkit import results_dir as _results_dir

# The procedures' defaults (the lab's, reference/qc6_batmet.md part A) are their keyword defaults.
MEGGER_VOLTAGE_V = 550.0
PROGRESS_EVERY_S = 600.0     # world seconds between progress events of a stability hold


# -- check_connection ---------------------------------------------------------------------------
def check_connection(layer: GemLayer, *, md: dict | None = None):
    """Check that the crate answers and that the board in the layer's slot is there: records the
    crate map and the channel names as a run; raises CrateUnreachable with the remedy otherwise."""
    yield from _preflight(layer)
    board = {}
    for key in ("model", "description", "serial_number", "firmware", "n_channels"):
        # a dry run reads a board of the crate's kind
        board[key] = yield from bps.rd(getattr(layer.board, key),
                                       default_value=BOARD_CHANNELS if key == "n_channels" else "?")
    system = yield from bps.rd(layer.system_type, default_value="?")
    if int(board["n_channels"]) < max(ch.channel for ch in layer.channels) + 1:
        raise Qc6Error(f"slot {layer.slot} holds a {board['model']} with {board['n_channels']} "
                       f"channels; layer {layer.layer} needs channels "
                       f"{min(c.channel for c in layer.channels)}-"
                       f"{max(c.channel for c in layer.channels)}: check the `slot`/`layer` settings")
    md = _base_md(layer, "check_connection", {},
                  {"crate": {"system_type": system, **board}, **(md or {})})

    def body():
        yield from bps.trigger_and_read([layer.board, *layer.channels], name="primary")
        return {"system_type": system, **board}

    result = yield from _with_callbacks(_run(body(), md), live_plot=False, files=False)
    print(f"QC6: {system} answers on {layer.prefix}; slot {layer.slot}: {board['model']} "
          f"serial {board['serial_number']} firmware {board['firmware']}, "
          f"{board['n_channels']} channels")
    return result


# -- megger_test ----------------------------------------------------------------------------------
def megger_test(detector_name: str, impedance_GOhm: Sequence[float], sparks: Sequence[int], *,
                comments: str = "", voltage_V: float = MEGGER_VOLTAGE_V, results_dir=None,
                md: dict | None = None):
    """Record the operator's Megger test of the 3 foils (impedance in GOhm and sparks in 1 min at
    550 V, measured with the Megger, not the crate) as a run, and write the lab's spreadsheet
    <results>/<detector>/Megger_Test/Megger_Test_<date>.xlsx."""
    impedance_GOhm, sparks = list(impedance_GOhm), list(sparks)
    if len(impedance_GOhm) != 3 or len(sparks) != 3:
        raise ValueError("give the impedance (GOhm) and the spark count of GEM 1, 2 and 3: "
                         f"got {len(impedance_GOhm)} impedances and {len(sparks)} spark counts")
    if any(not np.isfinite(z) or z <= 0 for z in impedance_GOhm):
        raise ValueError(f"impedances must be positive numbers of GOhm, got {impedance_GOhm}")
    if any(int(s) != s or s < 0 for s in sparks):
        raise ValueError(f"spark counts must be whole numbers >= 0, got {sparks}")
    from datetime import datetime
    now = datetime.now().timestamp()
    path = result_path(_results_dir(results_dir), detector_name, "megger", now)
    record = MeggerRecord(name="megger")
    md = {"procedure": "qc6", "qc6_test": "megger", "step": "megger", "plan_name": "megger_test",
          "plan_args": {"detector_name": detector_name, "impedance_GOhm": list(impedance_GOhm),
                        "sparks": list(sparks), "voltage_V": voltage_V},
          "detector_name": detector_name,
          "qc6_files": {"megger": str(path)}, "megger_comments": comments,
          "megger_voltage_V": float(voltage_V), "world_start": now,
          "qc6_params": {"impedance_GOhm": impedance_GOhm, "sparks": sparks,
                         "voltage_V": voltage_V}, **(md or {})}

    def body():
        for gem, (z, s) in enumerate(zip(impedance_GOhm, sparks), start=1):
            fill(record, gem=gem, impedance_GOhm=float(z), sparks=int(s))
            yield from bps.trigger_and_read([record])
        return str(path)

    return (yield from _with_callbacks(_run(body(), md), live_plot=False))


# -- stress_test ----------------------------------------------------------------------------------
def stress_voltages(vstart_V: float, vmax_V: float, vstep_V: float) -> list[float]:
    """range(vstart, vmax, vstep) plus vmax (V): 66 steps for 0 -> 650 V by 10 V."""
    if vstep_V <= 0 or vmax_V <= vstart_V:
        raise ValueError(f"need vstep > 0 and vmax > vstart (V), got {vstart_V}, {vmax_V}, {vstep_V}")
    return [float(v) for v in np.arange(vstart_V, vmax_V, vstep_V)] + [float(vmax_V)]


def stress_test(layer: GemLayer, *, vstart_V: float = 0.0, vmax_V: float = 650.0,
                vstep_V: float = 10.0, skip_gems: Sequence[int] = (), itrip_uA: float = 2.0,
                tripmax: int = 5, hold_s: float = 5.0, end_hold_s: float = 60.0,
                recovery_s: float = 15.0, back_steps: int = 20, results_dir=None,
                live_plot: bool = True, md: dict | None = None):
    """Stress test, foils one at a time (G1T, G2T, G3T): I0Set itrip_uA, Pw on, V0Set from vstart
    to vmax in vstep steps (V) holding hold_s (world s) at each and end_hold_s at the top. A step
    above SVMax is clamped to SVMax and becomes the last. After a trip: back back_steps steps
    (200 V), ClearAlarm, recovery_s, on again, unless the foil has tripped tripmax times.
    Primary events: the foil's readings at the end of each hold; trips: stream "trips"."""
    skip = {int(g) for g in skip_gems}
    if not skip <= {1, 2, 3}:
        raise ValueError(f"skip_gems takes GEM numbers 1, 2, 3, got {sorted(skip)}")
    steps = stress_voltages(vstart_V, vmax_V, vstep_V)
    foils = [f for k, f in enumerate(layer.foils, start=1) if k not in skip]
    params = dict(vstart_V=vstart_V, vmax_V=vmax_V, vstep_V=vstep_V, skip_gems=sorted(skip),
                  itrip_uA=itrip_uA, tripmax=tripmax, hold_s=hold_s, end_hold_s=end_hold_s,
                  recovery_s=recovery_s, back_steps=back_steps)

    def body(session: _Session):
        verdicts = {}
        for foil in foils:
            trips = yield from _stress_foil(session, foil, list(steps), itrip_uA=itrip_uA,
                                            tripmax=tripmax, hold_s=hold_s, end_hold_s=end_hold_s,
                                            recovery_s=recovery_s, back_steps=back_steps,
                                            all_foils=foils)
            verdicts[foil.electrode] = {"trips": trips, "passed": trips < tripmax}
        return {"passed": all(v["passed"] for v in verdicts.values()), "foils": verdicts}

    return (yield from _qc6_run(layer, "stress", params, body, {"stress"}, results_dir,
                                live_plot, md))


def _stress_foil(session: _Session, foil: HvChannel, steps: list[float], *, itrip_uA, tripmax,
                 hold_s, end_hold_s, recovery_s, back_steps, all_foils):
    yield from _put(foil.i0set, float(itrip_uA))
    yield from _switch_on(session, [foil])
    print(f"QC6 stress: starting {foil.label()}")
    with StepProgress(len(steps), f"QC6 stress {foil.label()}", unit="steps") as bar:
        trips = yield from _stress_steps(session, foil, steps, bar, itrip_uA=itrip_uA,
                                         tripmax=tripmax, hold_s=hold_s, end_hold_s=end_hold_s,
                                         recovery_s=recovery_s, back_steps=back_steps,
                                         all_foils=all_foils)
    yield from _put(foil.v0set, 0.0)
    yield from _put(foil.pw, 0)
    trips += yield from _last_look(session, [foil])
    return trips


def _stress_steps(session: _Session, foil: HvChannel, steps: list[float], bar, *, itrip_uA,
                  tripmax, hold_s, end_hold_s, recovery_s, back_steps, all_foils):
    """The voltage steps of one foil; returns the trips."""
    trips, i = 0, 0
    while i < len(steps):
        held = held_setpoint(steps[i], (yield from bps.rd(foil.svmax, default_value=HW_VMAX_V)))
        if held < steps[i]:                   # capped at SVMax: the last step
            i = len(steps) - 1
            steps[i] = held
        last = i == len(steps) - 1
        tripped = yield from _ramp(session, {foil: steps[i]})
        if not tripped:
            tripped = yield from _hold(session, [foil], end_hold_s if last else hold_s)
        if tripped:
            n, _ = yield from _recover(session, tripped, [foil], recovery_s)
            trips += n
            if trips >= tripmax:
                print(f"QC6 stress: {foil.label()} tripped {trips} times: stopping this foil")
                break
            # the lower voltage first: switching on would otherwise ramp back to the one that tripped
            i = max(0, i - back_steps)
            yield from _put(foil.v0set, steps[i])
            yield from _switch_on(session, [foil])
            continue
        yield from session.progress(0.0, trips, steps[i], all_foils, stream="primary")
        i += 1
        bar.update_to(i)
    return trips



# -- iv_short_stability ---------------------------------------------------------------------------
def divider_steps(vstart_V: float, vmax_V: float, vstep_V: float) -> list[float]:
    """range(vstart, vmax, vstep) plus vmax (V): 23 steps for 200 -> 4600 V by 200 V."""
    return stress_voltages(vstart_V, vmax_V, vstep_V)


def iv_short_stability(layer: GemLayer, *, vstart_V: float = 200.0, vstep_V: float = 200.0,
                       vmax_V: float = 4600.0, stable_s: float = 40.0, tripmax: int = 3,
                       hold_h: float = 2.0, foil_V: float = 550.0, recovery_s: float = 60.0,
                       itrip_uA: float | None = None, results_dir=None, live_plot: bool = True,
                       md: dict | None = None):
    """IV scan then short stability, one run. All 7 channels on; the divider emulation from vstart
    to vmax (V) in vstep steps; at each, wait for the ramp, hold stable_s (world s; a trip restarts
    it) and record VMon/IMon of every electrode (primary stream, and the IV file). Then the foils go
    to foil_V, the other electrodes stay at their vmax values, for hold_h hours. A trip: recorded,
    ClearAlarm, recovery_s, tripped channels on again; at tripmax trips the test fails.
    itrip_uA=None leaves I0Set as it is, as the lab's script does."""
    steps = divider_steps(vstart_V, vmax_V, vstep_V)
    params = dict(vstart_V=vstart_V, vstep_V=vstep_V, vmax_V=vmax_V, stable_s=stable_s,
                  tripmax=tripmax, hold_h=hold_h, foil_V=foil_V, recovery_s=recovery_s,
                  itrip_uA=itrip_uA)

    def body(session: _Session):
        channels = layer.channels
        if itrip_uA is not None:
            for ch in channels:
                yield from _put(ch.i0set, float(itrip_uA))
        yield from _switch_on(session, channels)
        trips = 0
        for v in steps:
            trips, ok = yield from _settle(session, _divider(layer, v), channels, stable_s,
                                           recovery_s, trips, tripmax)
            if not ok:
                return _verdict(trips, tripmax, "IV scan", 0.0)
            yield from session.progress(0.0, trips, v, channels, stream="primary")
        final = {**_divider(layer, vmax_V), **{foil: float(foil_V) for foil in layer.foils}}
        print(f"QC6: short stability, foils at {foil_V:g} V for {hold_h:g} h")
        trips, elapsed = yield from _stability_hold(session, final, channels, hold_h * 3600.0,
                                                    recovery_s, trips, tripmax)
        return _verdict(trips, tripmax, "short stability", elapsed)

    return (yield from _qc6_run(layer, "iv_short_stability", params, body, {"iv", "short"},
                                results_dir, live_plot, md))



def _divider(layer: GemLayer, v_divider: float) -> dict[HvChannel, float]:
    """The divider emulation's voltage per channel at v_divider (V); the channels cap their own
    requests at SVMax (HvChannel.set)."""
    return {getattr(layer, e): v for e, v in divider_setpoints(v_divider).items()}


def _settle(session: _Session, setpoints: dict, powered: Sequence[HvChannel], stable_s: float,
            recovery_s: float, trips: int, tripmax: int):
    """Ramp to the setpoints and hold stable_s (world) without a trip; a trip is recovered from
    and restarts the hold. Returns (trips, False when tripmax was reached)."""
    while True:
        tripped = yield from _ramp(session, setpoints)
        if not tripped:
            tripped = yield from _hold(session, powered, stable_s)
        if not tripped:
            return trips, True
        n, off = yield from _recover(session, tripped, powered, recovery_s)
        trips += n
        if trips >= tripmax:
            return trips, False
        yield from _switch_on(session, off)


def _stability_hold(session: _Session, setpoints: dict, powered: Sequence[HvChannel],
                    hold_s: float, recovery_s: float, trips: int, tripmax: int,
                    elapsed_before_s: float = 0.0):
    """Bring the powered channels to the stability voltages and hold until hold_s (world s) has
    elapsed in total (the clock starts when they first arrive and runs through recoveries),
    recording a progress event every PROGRESS_EVERY_S and after each trip. Returns (trips,
    elapsed hold)."""
    readables = list(powered)
    state = {"t_start": None, "next": 0.0}

    def elapsed(now):
        return elapsed_before_s + (now - state["t_start"] if state["t_start"] is not None else 0.0)

    bar = StepProgress(hold_s / 3600.0, "QC6 stability hold", unit="h")

    def on_poll(now):
        bar.update_to(elapsed(now) / 3600.0)
        if elapsed(now) >= state["next"]:
            yield from session.progress(elapsed(now), trips, 0.0, readables)
            state["next"] = elapsed(now) + PROGRESS_EVERY_S

    try:
        while True:
            tripped = yield from _ramp(session, setpoints)
            now = yield from session.now()
            if not tripped:
                if state["t_start"] is None:
                    state["t_start"] = now
                remaining = hold_s - elapsed(now)
                if remaining <= 0:
                    break
                tripped = yield from _hold(session, powered, remaining, on_poll=on_poll,
                                           look_every_s=PROGRESS_EVERY_S)
                if not tripped:
                    continue
            n, off = yield from _recover(session, tripped, powered, recovery_s)
            trips += n
            now = yield from session.now()
            yield from session.progress(elapsed(now), trips, 0.0, readables)
            if trips >= tripmax:
                return trips, elapsed(now)
            if state["t_start"] is not None and elapsed(now) >= hold_s:
                break                          # the hold ran out during the recovery
            yield from _switch_on(session, off)
        now = yield from session.now()
        yield from session.progress(elapsed(now), trips, 0.0, readables)
        return trips, elapsed(now)
    finally:
        bar.close()


# -- long_stability and its resumption ------------------------------------------------------------
def long_stability(layer: GemLayer, *, vstart_V: float = 200.0, vstep_V: float = 200.0,
                   vmax_V: float = 4200.0, stable_s: float = 10.0, tripmax: int = 200,
                   hold_h: float = 15.0, foil_V: float = 580.0, recovery_s: float = 60.0,
                   itrip_uA: float | None = None, results_dir=None, live_plot: bool = True,
                   md: dict | None = None, _resume: dict | None = None):
    """Long stability: the stepped divider ramp to vmax (V, stable_s world s per step, nothing
    recorded but trips), then the non-foil electrodes to 0 V and off, the foils at foil_V for hold_h
    hours; trips counted on the foils only; recovery_s after a trip; fails at tripmax trips.
    Progress events (elapsed hold, trips) every 10 world minutes let `resume_long_stability` pick up
    an interrupted test."""
    resume = _resume or {}
    steps = divider_steps(vstart_V, vmax_V, vstep_V)
    params = dict(vstart_V=vstart_V, vstep_V=vstep_V, vmax_V=vmax_V, stable_s=stable_s,
                  tripmax=tripmax, hold_h=hold_h, foil_V=foil_V, recovery_s=recovery_s,
                  itrip_uA=itrip_uA)
    extra_md = {k: resume[k] for k in ("resumed_from", "elapsed_before_s", "trips_before")
                if k in resume}

    def body(session: _Session):
        channels, foils = layer.channels, layer.foils
        if itrip_uA is not None:
            for ch in channels:
                yield from _put(ch.i0set, float(itrip_uA))
        trips = int(resume.get("trips_before", 0))
        session.incidents = trips
        yield from _switch_on(session, channels)
        for v in steps:
            trips, ok = yield from _settle(session, _divider(layer, v), channels, stable_s,
                                           recovery_s, trips, tripmax)
            if not ok:
                return _verdict(trips, tripmax, "ramp", float(resume.get("elapsed_before_s", 0)))
        others = [ch for ch in channels if ch not in foils]
        for ch in others:                 # only the foils stay powered for the long hold
            yield from _put(ch.v0set, 0.0)
            yield from _put(ch.pw, 0)
        final = {f: float(foil_V) for f in foils}
        print(f"QC6: long stability, foils at {foil_V:g} V for {hold_h:g} h")
        trips, elapsed = yield from _stability_hold(
            session, final, foils, hold_h * 3600.0, recovery_s, trips, tripmax,
            elapsed_before_s=float(resume.get("elapsed_before_s", 0.0)))
        return _verdict(trips, tripmax, "long stability", elapsed)

    return (yield from _qc6_run(layer, "long_stability", params, body, {"long"}, results_dir,
                                live_plot, {**extra_md, **(md or {})},
                                files=resume.get("qc6_files")))



__all__ = ["check_connection", "megger_test", "stress_test", "iv_short_stability",
           "long_stability", "resume_long_stability", "long_stability_state", "qc6_safety",
           "all_off", "SuspendWhenCrateUnreachable", "Qc6Error", "CrateUnreachable",
           "RampTimeout", "stress_voltages", "divider_steps", "ELECTRODES", "FOILS", "TripRecord",
           "Qc6Record", "MeggerRecord", "MEGGER_VOLTAGE_V", "OFF_V", "MIN_POLL_S", "MAX_WAIT_WALL_S",
           "PROGRESS_EVERY_S", "RAMP_MARGIN_S", "ACK_TIMEOUT_S", "STATE_TIMEOUT_S",
           "CONNECT_TIMEOUT_S", "ITRIP_CLEARED",
           # steps the tests drive on their own
           "_put", "_wait_connected"]
