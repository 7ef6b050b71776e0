"""BatMet sink calibration end to end: simulated bench IOCs -> ophyd -> plans -> tiled -> fit.

The simulated bench (iocs/sim/bench.py) draws its own BatMet unit from the lab seed; the tests read
that hidden truth only to judge the analysis, which never sees it.
"""
from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pytest
from bluesky.utils import RunEngineInterrupted

from calbench.run_queries import derived_runs, last_run
from calbench.analysis.batmet import fit_sink, sink_data_from_table
from calbench.devices.base import InstrumentRefused, set_and_check
from calbench.iocs.sim.bench import LinkFaults
from calbench.lab import make_device
from calbench.plans.batmet import (BenchNotReady, calibrate_sink, collect_sink_calibration,
                                   write_sink_calibration)

SHORT = {"dac_stop": 700}       # fault tests: 25 points through the dead zone and 0.2 A


@pytest.fixture(scope="module")
def bench_devices(lab):
    # a generous connection timeout: CA searches are slow on a loaded machine
    return {name: make_device(lab.cfg, name, timeout=30.0) for name in ("dmm", "psu", "batmet")}


@pytest.fixture
def bench(lab, bench_devices):
    """The bench's devices and the simulated parts behind them; faults cleared afterwards."""
    sims = {name: lab.backend(name).sim for name in ("dmm", "psu", "batmet")}
    b = SimpleNamespace(**bench_devices, meter=sims["dmm"], supply=sims["psu"],
                        firmware=sims["batmet"], world=sims["batmet"].world)
    yield b
    for sim in sims.values():
        sim.faults = LinkFaults()
    b.firmware.calibration = None
    for name in ("batmet", "psu"):
        lab.backend(name).make_safe()


def _run(RE, plan):
    """Run a plan; return (its result, the uids of the runs it made)."""
    box = {}

    def wrapper():
        box["result"] = yield from plan

    uids = RE(wrapper())
    return box.get("result"), list(uids)


def _assert_left_safe(b):
    assert b.world.dac == 0, "the BatMet DAC must be back at 0"
    assert not b.world.supply.output_on, "the supply output must be off"
    assert not b.meter.remote and b.meter.display_text == "", "the meter must be back to local"


def test_calibration_recovers_the_simulated_sink(bench, RE):
    """Scan 450..3 A with the supply at 4 V / 3 A, read the run back from tiled, fit, store csink,
    verify with `sink`; the fit must match the simulated unit and the bench end safe."""
    truth = bench.world.sink
    cal, uids = _run(RE, calibrate_sink(bench.dmm, bench.batmet, bench.psu, catalog=RE.catalog,
                                         write=True))
    assert len(uids) == 3                      # scan, fit, verification
    scan_run = RE.catalog[cal.scan.uid]
    start = scan_run.metadata["start"]
    assert start["procedure"] == "batmet_sink_calibration"
    assert "34401A" in start["identities"]["dmm"]
    assert scan_run.metadata["stop"]["exit_status"] == "success"

    keys = start["sink_calibration"]
    table = scan_run["primary"].read()
    dac, current, limited = sink_data_from_table(table, **keys)
    # the reference scan: 450, 460, ... until the first point above 3 A (or the supply's limit)
    assert dac[0] == 450 and np.all(np.diff(dac) == 10)
    assert current[-1] > 3.0 or limited[-1]
    assert np.all(current[:-1] <= 3.0) and not limited[:-1].any()
    # dead zone: below the sink's offset only the BatMet's quiescent current (~52 uA) flows
    dead = dac < truth.c - 5
    assert dead.sum() >= 5 and np.all(current[dead] < 1e-4) and np.all(current[dead] > 2e-5)
    # the meter autoranged through all its current ranges and never read beyond 120 % of one
    ranges = table["dmm_range_in_use"].values
    assert set(np.round(ranges, 3)) >= {0.01, 0.1, 1.0, 3.0}
    assert np.all(np.abs(current) <= 1.2 * ranges)

    fit = fit_sink(dac, current, valid=~limited)
    assert fit.c == pytest.approx(truth.c, abs=2.0)
    assert fit.b == pytest.approx(truth.b, rel=3e-3)
    assert abs(fit.a - truth.a) < 0.6
    grid = np.linspace(0.0, 3.0, 61)
    assert np.max(np.abs(fit.dac_for(grid) - truth.dac_for(grid))) < 2.0   # DAC codes
    # the lab's accuracy figure: about 2 mA (DAC non-linearity the quadratic cannot follow)
    assert 0.3e-3 < fit.rms_error_A < 2.5e-3
    assert fit.max_error_A < 5e-3
    # the plan fitted the stored run: the same numbers
    assert cal.fit.a == pytest.approx(fit.a) and cal.fit.c == pytest.approx(fit.c)

    fit_run = RE.catalog[uids[1]]
    assert fit_run.metadata["start"]["parent_uid"] == cal.scan.uid
    # found by the names the lab uses; the scan finds its derived runs
    assert last_run(RE.catalog, "collect_sink_calibration").metadata["start"]["uid"] == cal.scan.uid
    assert fit_run.metadata["start"]["plan_name"] == "fit_sink"
    assert [r.metadata["start"]["uid"] for r in derived_runs(RE.catalog, cal.scan.uid)] == uids[1:]
    assert fit_run.metadata["start"]["csink"] == cal.csink
    assert fit_run["fit"].read()["csink_b"].values[0] == pytest.approx(fit.b)
    # the BatMet firmware holds exactly the printed line
    assert cal.csink == f"csink 0 4 {fit.a:.6f} {fit.b:.6f} {fit.c:.6f}"
    assert bench.firmware.calibration == pytest.approx((0, 4, fit.a, fit.b, fit.c), abs=1e-6)
    assert bench.batmet.calibration.get() == cal.csink

    verify_run = RE.catalog[uids[2]]
    assert verify_run.metadata["start"]["parent_uid"] == cal.scan.uid
    assert len(verify_run["primary"].read()["dmm_reading"]) == 15
    # currents set with `sink`: fit error plus half a DAC code of rounding
    assert cal.accuracy.max_error_A < 5e-3
    assert cal.accuracy.rms_error_A < 2.5e-3
    _assert_left_safe(bench)


def test_garbled_readings_are_asked_again_then_stop_the_scan_safely(bench, RE):
    """One garbled reply is asked again; persistent garbage ends the scan with a clear error, the
    DAC at 0, the supply off and a run holding exactly the points measured."""
    def inject(name, doc):
        if name == "event" and doc["seq_num"] == 3:
            bench.meter.faults.garble_next = 1
        if name == "event" and doc["seq_num"] == 8:
            bench.meter.faults.garble_next = 100

    RE.subscribe(inject)
    # persistent garbage is reported either on the reading or on the identity check of the
    # reconnection that follows it, depending on which request the poll loop sends first
    with pytest.raises(BenchNotReady,
                       match=r"stopped at DAC 530.*(garbled reply|\*IDN\? answered 'HEWLETT-)"):
        RE(collect_sink_calibration(bench.dmm, bench.batmet, bench.psu, **SHORT))
    _assert_left_safe(bench)
    (uid,) = list(RE.catalog)
    run = RE.catalog[uid]
    assert run.metadata["stop"]["exit_status"] == "fail"
    dac = run["primary"].read()["batmet_dac"].values
    np.testing.assert_array_equal(dac, np.arange(450, 530, 10))


@pytest.mark.parametrize("fault", ["absent", "not a 34401A"])
def test_missing_or_wrong_meter_is_refused_before_anything_moves(bench, RE, fault):
    set_and_check(bench.batmet.dac, 600)          # someone left the sink on
    if fault == "absent":
        bench.meter.faults.absent = True
    else:
        bench.meter.faults.identity = "FLUKE,8846A,1234567,08/02/10-11:53"
    with pytest.raises(BenchNotReady, match="There is no 34401A multimeter connected to"):
        RE(collect_sink_calibration(bench.dmm, bench.batmet, bench.psu, **SHORT))
    assert bench.world.dac == 0
    assert not bench.world.supply.output_on       # never switched on
    assert list(RE.catalog) == []                 # no run was started
    if fault == "not a 34401A":
        assert "FLUKE" in bench.dmm.status_message.get()
    assert bench.dmm.connected_rbv.get() == 0


def test_abort_mid_scan_leaves_dac_zero_and_supply_off(bench, RE):
    def pause(name, doc):
        if name == "event" and doc["seq_num"] == 4:
            # what Ctrl-C does; from another thread, as the RunEngine waits for the request
            threading.Thread(target=RE.request_pause, kwargs={"defer": False}).start()

    RE.subscribe(pause)
    with pytest.raises(RunEngineInterrupted):
        RE(collect_sink_calibration(bench.dmm, bench.batmet, bench.psu, **SHORT))
    assert RE.state == "paused"
    assert bench.world.supply.output_on            # paused: the scan may still resume
    RE.abort("operator abort")
    _assert_left_safe(bench)
    (uid,) = list(RE.catalog)
    assert RE.catalog[uid].metadata["stop"]["exit_status"] == "abort"


def test_supply_set_by_hand_and_its_limit_ends_the_scan(bench, RE):
    """Without a supply device the operator's supply stays as it was; its 1 A limit shows as a
    current that stops rising, and the scan ends there."""
    set_and_check(bench.psu.voltage, 4.0)
    set_and_check(bench.psu.current_limit, 1.0)
    set_and_check(bench.psu.output, "On")
    scan, _ = _run(RE, collect_sink_calibration(bench.dmm, bench.batmet, None, dac_step=20))
    assert "stopped rising" in scan.stop_reason
    limit = bench.world.supply.true_limit_A()
    assert scan.current_A[-1] == pytest.approx(limit, abs=2e-3)
    assert scan.current_A.max() < limit + 2e-3
    assert bench.world.dac == 0
    assert bench.world.supply.output_on            # the plan did not switch it on, so not off


def test_sink_and_csink_refusals(bench, RE):
    with pytest.raises(InstrumentRefused, match="not calibrated"):
        set_and_check(bench.batmet.sink, 1.0)
    # a transfer that falls with current is refused before anything reaches the firmware
    with pytest.raises(BenchNotReady, match="must rise with current"):
        RE(write_sink_calibration(bench.batmet, 0.2, -762.0, 522.0))
    assert bench.firmware.calibration is None
    RE(write_sink_calibration(bench.batmet, 0.21, 762.1, 522.9))
    assert bench.firmware.calibration == pytest.approx((0, 4, 0.21, 762.1, 522.9))
    with pytest.raises(InstrumentRefused, match="Sink = 4.5 is outside 0..4 A"):
        set_and_check(bench.batmet.sink, 4.5)
    set_and_check(bench.batmet.sink, 1.0)
    assert bench.world.dac == int(0.21 + 762.1 + 522.9 + 0.5)
    with pytest.raises(InstrumentRefused, match="outside 0..4095"):
        set_and_check(bench.batmet.dac, 4096)
