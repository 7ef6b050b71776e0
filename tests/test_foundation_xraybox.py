"""The foundation end to end: X-ray box IOC (simulated) -> ophyd -> RunEngine -> tiled -> read back."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from bluesky.plans import count, scan
from ophyd.sim import SynSignal
from tiled.queries import Key

from calbench.devices.base import InstrumentRefused, IocNotAnswering, set_and_check
from calbench.plans.xray import ShutterError, close_shutters, tube_on, xrf_exposure


@pytest.fixture
def box(lab):
    box = lab.device("xraybox")
    yield box
    lab.backend("xraybox").door_open = False
    lab.backend("xraybox").shutter_stuck = False
    lab.backend("xraybox").make_safe()


def test_pyepics_caget_caput_on_the_box(lab, box):
    import epics
    prefix = lab.prefix_of("xraybox")
    voltage = epics.PV(prefix + "Voltage")
    assert voltage.wait_for_connection(5), "pyepics could not connect to the X-ray box IOC"
    assert voltage.put(35.5, wait=True, timeout=5)
    assert epics.PV(prefix + "Voltage").get(use_monitor=False) == pytest.approx(35.5)
    assert epics.caget(prefix + "Target_RBV", as_string=True, use_monitor=False) in (
        "In", "Ti", "Cr", "Fe", "Cu", "Ge", "Zr", "Mo", "Ag", "Sn")
    # the real client sees the refusal as a failed put, and the reason on StatusMessage_RBV
    epics.caput(prefix + "Current", 500.0, wait=True, timeout=3)
    assert epics.caget(prefix + "Current", use_monitor=False) != 500.0
    message = epics.caget(prefix + "StatusMessage_RBV", as_string=True, use_monitor=False)
    assert "500" in message and "mA" in message


def test_scan_tube_current_persists_and_reads_back(lab, box, RE):
    RE(tube_on(box, 40.0, 10.0))
    # a simple counter: the monitor counts of a detector proportional to the tube current (read via CA)
    counter = SynSignal(func=lambda: 100.0 * box.current.get(use_monitor=False), name="counter")
    uids = RE(scan([counter], box.current, 10.0, 40.0, 4), sample="foundation-e2e")
    run = RE.catalog[uids[0]]
    data = run["primary"].read()
    np.testing.assert_allclose(data["xraybox_current"].values, [10, 20, 30, 40], atol=0.06)
    np.testing.assert_allclose(data["counter"].values, 100 * data["xraybox_current"].values, rtol=1e-3)
    assert run.metadata["stop"]["exit_status"] == "success"
    found = RE.catalog.search(Key("sample") == "foundation-e2e")
    assert list(found) == [uids[0]]


def test_refused_puts_name_the_cause(lab, box):
    with pytest.raises(InstrumentRefused, match="outside 0..80 mA"):
        set_and_check(box.current, 120.0)
    set_and_check(box.hv, "Off")
    with pytest.raises(InstrumentRefused, match="high voltage is off"):
        set_and_check(box.xrf_shutter, "Open")
    set_and_check(box.hv, "On")
    lab.backend("xraybox").set_door(True)        # the interlock drops the HV and refuses it
    with pytest.raises(InstrumentRefused, match="door is open"):
        set_and_check(box.hv, "On")


def test_xrf_exposure_closes_the_shutter_on_error_and_fails_clearly_when_jammed(lab, box, RE):
    RE(tube_on(box, 40.0, 20.0))

    def failing():
        assert (yield from _rd(box.xrf_shutter)) == "Open"
        raise RuntimeError("boom inside the exposure")

    with pytest.raises(RuntimeError, match="boom"):
        RE(xrf_exposure(box, "Fe", failing()))
    assert box.xrf_shutter.get(use_monitor=False) == "Closed"

    lab.backend("xraybox").shutter_stuck = True
    with pytest.raises(ShutterError, match="did not open on Cu after 3 checks"):
        RE(xrf_exposure(box, "Cu", count([]), retries=3, check_s=0.1))
    lab.backend("xraybox").shutter_stuck = False

    lab.backend("xraybox").set_door(True)    # the interlock drops the HV
    with pytest.raises(ShutterError, match="high voltage is off"):
        RE(xrf_exposure(box, "Cu", count([])))
    RE(close_shutters(box))


def test_missing_ioc_names_prefix_and_remedy():
    from calbench.devices.xraybox import XrayBox
    with pytest.raises(IocNotAnswering, match=r"NOSUCH:XRAY:.*calbench ioc run xraybox --sim"):
        XrayBox("NOSUCH:XRAY:", name="ghost").ensure_connected(timeout=1.0)


def test_live_reader_sees_each_event_exactly_once(RE, lab):
    """A second client reads the run while it is written; tiled ends with exactly its events."""
    n = 200
    det = SynSignal(func=lambda: 1.0, name="det")
    reader_errors, reads = [], []
    stop_reading = threading.Event()

    def reader(uid_box):
        while not stop_reading.is_set():
            try:
                if uid_box:
                    run = RE.catalog[uid_box[0]]
                    if "primary" in run and "internal" in run["primary"].base:
                        reads.append(len(run["primary"].base["internal"].read()))
            except Exception as exc:  # the run may not exist yet
                reader_errors.append(exc)
            time.sleep(0.01)

    uid_box = []
    RE.subscribe(lambda name, doc: uid_box.append(doc["uid"]) if name == "start" else None)
    t = threading.Thread(target=reader, args=(uid_box,), daemon=True)
    t.start()
    try:
        (uid,) = RE(count([det], num=n))
    finally:
        stop_reading.set()
        t.join(5)
    table = RE.catalog[uid]["primary"].base["internal"].read()
    assert sorted(table["seq_num"]) == list(range(1, n + 1))   # none lost, none doubled
    assert reads, "the concurrent reader never saw the run while it was written"


def _rd(signal):
    from bluesky.plan_stubs import rd
    return (yield from rd(signal))
