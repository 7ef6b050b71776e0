"""QC6 safety: whatever way a test ends (an exception in the plan, RE.abort or RE.stop, Ctrl-C, the
crate becoming unreachable) every channel of the layer ends off and discharged; a crate that stops
answering suspends the plan, which resumes safely; a crashed long stability test resumes from tiled
with its elapsed time and trip count."""
from __future__ import annotations

import os
import signal
import threading
import time

import pandas as pd
import pytest
from bluesky.preprocessors import plan_mutator
from bluesky.utils import Msg, RunEngineInterrupted
from ophyd import Signal

from calbench.analysis.qc6_files import read_stability_file
from calbench.plans.qc6 import (
    long_stability, long_stability_state, resume_long_stability, stress_test)
from conftest import TEST_TIME_SCALES
from qc6_support import (  # noqa: F401  (qc6 is a fixture)
    POLL_LATENCY_S, assert_layer_safe, assert_trips_match, layer_channels, qc6)

# a short stress test near the top: foils G1T only, 560 -> 650 V
SHORT_STRESS = dict(vstart_V=560.0, skip_gems=(2, 3), live_plot=False)
# a short long-stability test: two divider steps, one hour at 580 V
SHORT_LONG = dict(vstart_V=4000.0, vmax_V=4200.0, hold_h=1.0, live_plot=False)


def table(run, stream):
    return run[stream].base["internal"].read()


def on_event(stream: str, n: int, action, *, when=None):
    """A callback running `action()` at the n-th event of a stream (counting only the events whose
    data satisfy `when(data)`, if given)."""
    seen = {"descriptors": {}, "count": 0}

    def cb(name, doc):
        if name == "descriptor":
            seen["descriptors"][doc["uid"]] = doc["name"]
        elif name == "event" and seen["descriptors"].get(doc["descriptor"]) == stream:
            if when is not None and not when(doc["data"]):
                return
            seen["count"] += 1
            if seen["count"] == n:
                action()
    return cb


def powered_high(layer, sim) -> bool:
    return any(sim.voltages(3)[c] > 100 for c in layer_channels(layer))


class Broken(Signal):
    """A device that fails when read: a bug or a driver error inside the plan."""

    def read(self):
        raise RuntimeError("a bug in the middle of the stress test")


def test_exception_inside_the_plan_ramps_the_layer_down(qc6, RE, tmp_path):
    _, layer, sim = qc6
    broken, fired = Broken(name="broken"), []

    def at_600V(msg):                  # a failing read just before the foil goes to 600 V
        if msg.command == "set" and msg.obj is layer.g1t and msg.args[0] >= 600 \
                and not fired:
            fired.append(msg)

            def head():
                yield Msg("read", broken)
                return (yield msg)
            return head(), None
        return None, None

    with pytest.raises(RuntimeError, match="a bug in the middle"):
        RE(plan_mutator(stress_test(layer, results_dir=tmp_path, **SHORT_STRESS), at_600V))
    assert fired
    assert_layer_safe(layer, sim)
    run = RE.catalog[-1]
    assert run.metadata["stop"]["exit_status"] == "fail"
    assert "a bug in the middle" in run.metadata["stop"]["reason"]


def test_a_failing_callback_stops_the_plan_and_the_layer_ends_off(qc6, RE, tmp_path):
    _, layer, sim = qc6

    def fail():
        assert powered_high(layer, sim)
        raise ValueError("the live display crashed")

    with pytest.raises(ValueError, match="display crashed"):
        RE(stress_test(layer, results_dir=tmp_path, **SHORT_STRESS), on_event("primary", 3, fail))
    assert_layer_safe(layer, sim)


@pytest.mark.parametrize("how", ["abort", "stop"])
def test_pause_then_abort_or_stop_ramps_the_layer_down(qc6, RE, tmp_path, how):
    _, layer, sim = qc6
    state = {}

    def pause():              # as the operator would: from another thread (Ctrl-C twice)
        state["high"] = powered_high(layer, sim)
        threading.Thread(target=RE.request_pause, kwargs={"defer": False}, daemon=True).start()

    with pytest.raises(RunEngineInterrupted):
        RE(long_stability(layer, results_dir=tmp_path, **SHORT_LONG), on_event("progress", 2, pause))
    assert state["high"] and RE.state == "paused"
    assert powered_high(layer, sim)             # a pause holds the voltages, as the lab wants
    getattr(RE, how)()
    assert_layer_safe(layer, sim)
    run = RE.catalog[-1]
    assert run.metadata["stop"]["exit_status"] == ("abort" if how == "abort" else "success")


def test_ctrl_c_pauses_and_abort_leaves_the_layer_off(qc6, RE, tmp_path):
    _, layer, sim = qc6

    def ctrl_c():                                  # the operator presses Ctrl-C once
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            pytest.fail("the RunEngine has no SIGINT handler here (not the main thread?)")
        os.kill(os.getpid(), signal.SIGINT)

    # a hold far longer than the pause takes to land, however loaded the host (a 1 h hold lasts
    # 0.7 wall s at the test world's 5000x and could end first); the abort ends it anyway
    with pytest.raises(RunEngineInterrupted):
        RE(long_stability(layer, results_dir=tmp_path, **{**SHORT_LONG, "hold_h": 500.0}),
           on_event("progress", 2, ctrl_c))
    assert RE.state == "paused"
    RE.abort("operator pressed Ctrl-C")
    assert_layer_safe(layer, sim)


def test_unreachable_crate_suspends_then_the_plan_resumes_and_records_what_happened(
        qc6, RE, tmp_path):
    """The crate stops answering during the hold; meanwhile a foil trips. The plan waits, resumes
    when the crate is back, records the trip it missed, holds to the end and switches off."""
    _, layer, sim = qc6
    RE.record_interruptions = True
    t0 = sim.clock.now()

    def outage():
        sim.unreachable = True
        sim.inject_discharge(3, layer.g2t.channel, duration_s=20.0)

        def restore():
            time.sleep(1.0)
            sim.unreachable = False
        threading.Thread(target=restore, daemon=True).start()

    (uid,) = RE(long_stability(layer, results_dir=tmp_path, **SHORT_LONG),
                on_event("progress", 2, outage))
    run = RE.catalog[uid]
    assert run.metadata["stop"]["exit_status"] == "success"
    interruptions = table(run, "interruptions")
    assert any("does not answer" in str(text) for text in interruptions["interruption"])
    trips = table(run, "trips")
    truth = [r for r in sim.trip_log if r.channel in layer_channels(layer) and r.time >= t0]
    # the outage lasts 1 wall second: thousands of world seconds
    assert_trips_match(trips, truth, latency_s=POLL_LATENCY_S + 1.5 * TEST_TIME_SCALES["qc6"],
                       sim=sim)
    assert layer.g2t.channel in list(trips["trip_channel"])
    assert table(run, "progress")["qc6_elapsed_s"].max() >= 3600
    assert_layer_safe(layer, sim)


def test_operator_gives_up_while_the_crate_is_unreachable(qc6, RE, tmp_path):
    """Suspended on a lost crate, the operator pauses and aborts; once the link is back the abort
    ramps the layer down (until then nothing can reach the crate)."""
    _, layer, sim = qc6

    def outage():
        sim.unreachable = True

        def pause_later():
            time.sleep(0.5)
            RE.request_pause(defer=False)
        threading.Thread(target=pause_later, daemon=True).start()

    with pytest.raises(RunEngineInterrupted):
        RE(long_stability(layer, results_dir=tmp_path, **SHORT_LONG), on_event("progress", 2, outage))
    assert powered_high(layer, sim)
    sim.unreachable = False
    time.sleep(0.2)
    RE.abort("crate lost")
    assert_layer_safe(layer, sim)


def test_crashed_long_stability_resumes_from_tiled_with_elapsed_time_and_trips(qc6, RE, tmp_path):
    _, layer, sim = qc6
    sim.spark_rate_scale = 15.0                  # enough trips in an hour to count on
    t0 = sim.clock.now()

    def crash():
        raise RuntimeError("the control PC lost power")

    # crashed after 1800 s of a 10 h hold: holding it all again would show. (A 1 h hold could end
    # first: at the test world's 5000x a 0.4 s stall of a loaded host is 2000 world s.)
    hold_s = 36000.0
    with pytest.raises(RuntimeError, match="lost power"):
        RE(long_stability(layer, results_dir=tmp_path, **{**SHORT_LONG, "hold_h": hold_s / 3600}),
           on_event("progress", 1, crash, when=lambda data: data["qc6_elapsed_s"] >= 1800))
    assert_layer_safe(layer, sim)
    first = RE.catalog[-1]
    state = long_stability_state(RE.catalog)
    assert state["resumed_from"] == first.metadata["start"]["uid"]
    progress = table(first, "progress")
    assert state["elapsed_before_s"] == pytest.approx(progress["qc6_elapsed_s"].max())
    assert 1800 <= state["elapsed_before_s"] < hold_s
    first_trips = table(first, "trips")["trip_incident"].max() if "trips" in first else 0
    assert state["trips_before"] == max(first_trips, progress["qc6_trips"].max())

    (uid,) = RE(resume_long_stability(layer, RE.catalog))
    second = RE.catalog[uid]
    start = second.metadata["start"]
    assert start["resumed_from"] == state["resumed_from"]
    assert start["qc6_files"] == first.metadata["start"]["qc6_files"]
    prog2 = table(second, "progress")
    assert prog2["qc6_elapsed_s"].min() >= state["elapsed_before_s"]
    assert prog2["qc6_elapsed_s"].max() >= hold_s
    # the hold of the second run is only what was left: it stops at the first look past the hold
    # (that look and the final event, or a recovery's event too), where holding a whole hour again
    # would add the 600 s progress events of another 1800 s or more. (The world runs thousands of
    # times faster than the wall: the look past the hour may come late by a recovery's worth.)
    assert (prog2["qc6_elapsed_s"] >= hold_s).sum() <= 3
    truth = [r for r in sim.trip_log if r.channel in layer_channels(layer) and r.time >= t0]
    recorded = [table(run, "trips") for run in (first, second) if "trips" in run]
    # once, across the crash; a trip made while the crashed run ramped down is seen at its end
    assert_trips_match(pd.concat(recorded) if recorded else None, truth,
                      latency_s=max(3600.0, POLL_LATENCY_S), sim=sim)
    channels = [c for t in recorded for c in t["trip_channel"]]
    if "trips" in second:                                 # incidents (a poll's trips) count on
        assert table(second, "trips")["trip_incident"].min() == state["trips_before"] + 1
    log = read_stability_file(start["qc6_files"]["long"])              # one file for the test
    assert sorted(c for chans, _ in log.trips for c in chans) == sorted(channels)
    assert log.end is not None
    assert_layer_safe(layer, sim)
    with pytest.raises(Exception, match="nothing to resume"):
        RE(resume_long_stability(layer, RE.catalog))


def test_a_put_the_crate_could_not_answer_is_retried_not_a_failed_test(lab, qc6, RE):
    """The link drops just as the plan switches a channel on: the IOC answers "fault: ..." (the
    value was not refused) and the plan puts it again once the crate answers."""
    from calbench.plans.qc6 import _put
    _, layer, sim = qc6
    ioc = lab.ioc("caen")
    put_fault = f"{layer.g3t.pw.setpoint_pvname} = 1: the SY5527 crate does not answer"
    counted = ioc.refusals.value           # an earlier test may have left the same message
    sim.unreachable = True
    faults: list[str] = []

    def restore_after_the_fault():
        # this put's own fault: counted after the start, naming the PV (the poll reports the
        # lost link too, without a PV)
        deadline = time.monotonic() + 120
        while not (ioc.refusals.value > counted and put_fault in str(ioc.status_message.value)) \
                and time.monotonic() < deadline:
            time.sleep(0.01)
        faults.append(str(ioc.status_message.value))
        sim.unreachable = False
    threading.Thread(target=restore_after_the_fault, daemon=True).start()
    RE(_put(layer.g3t.pw, 1))
    assert put_fault in faults[0]
    assert sim.powered(sim.slot)[layer.g3t.channel]
