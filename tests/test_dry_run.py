"""Dry runs: bluesky's summarize_plan outlines every procedure a session offers (no RunEngine).

summarize_plan answers every message with nothing; the plans then take each step's nominal
decision and carry on, so the outline shows every move and every run of the whole procedure.
The devices are the test lab's real ones (nothing is sent to them: a dry run only yields
messages). A plan that reads an instrument outside a message would read the simulated IOCs
here and take a real value's path; one that decides from a missing value fails the test.
"""
from __future__ import annotations

import numpy as np
import pytest
from bluesky import RunEngine
from bluesky.preprocessors import msg_mutator
from bluesky.simulators import summarize_plan
from ophyd import Signal

from calbench.analysis.batmet import csink_line
from calbench.contracts.trimfile import DAC_DEFAULTS, DAC_NAMES
from calbench.plans import batmet, eiger, fee, xray
from calbench.plans.toolkit import read_or_nominal, reading_value


class Outline:
    """What summarize_plan printed, with the runs opened (their start metadata) and the moves."""

    def __init__(self, plan, capsys):
        self.runs: list[dict] = []
        self.moves: list[tuple[str, object]] = []

        def spy(msg):
            if msg.command == "open_run":
                self.runs.append(dict(msg.kwargs))
            elif msg.command == "set":
                self.moves.append((msg.obj.name, msg.args[0]))
            return msg

        self.returned = summarize_plan(_returning(msg_mutator(plan, spy), self))
        self.text = capsys.readouterr().out

    @property
    def plan_names(self) -> list[str]:
        return [md.get("plan_name") for md in self.runs]

    def values(self, name: str) -> list:
        return [v for n, v in self.moves if n == name]


def _returning(plan, box):
    box.result = yield from plan


@pytest.fixture(scope="module")
def det(lab):
    return lab.device("eiger")


@pytest.fixture(scope="module")
def box(lab):
    return lab.device("xraybox")


@pytest.fixture(scope="module")
def bench(lab):
    return lab.device("dmm"), lab.device("batmet"), lab.device("psu")


def _dac_tables(outline: Outline, det) -> list[np.ndarray]:
    return [np.asarray(v).reshape(len(DAC_NAMES) + 1, -1)
            for v in outline.values(det.dac_table.name)]


def test_calibrate_eiger_outlines_every_step_and_writes_nothing(det, box, tmp_path, capsys):
    before = eiger.current_calibration(det)
    out = Outline(eiger.calibrate_eiger(det, box, target="Cu", results_dir=tmp_path), capsys)

    assert out.plan_names == [
        "vrf_scan", "vrf_scan_analysis", "scurve", "scurve_analysis", "trimbit_scan",
        "trimbit_scan_analysis", "scurve", "scurve_analysis", "line_scan", "line_scan_analysis",
        "calibrate_eiger"], out.text
    scans = [md for md in out.runs if md.get("procedure") == eiger.PROCEDURE]
    assert [md["target"] for md in scans] == ["Cu", "Cu", "Cu", "Cu", "Ge"]
    assert [md["run_id"] for md in scans] == [0, 0, 0, 1, 1]
    assert out.text.count("Open Run") == 11 and out.text.count("Close Run") == 11
    # the scans run in the detector (PSI's range: np.arange(1500, 3800, 30) is 1500..3780),
    # with the XRF shutter open on their target; the detector's scan is off again after each
    scans_set = out.values(det.scan.name)
    assert scans_set == ["0"] + [s for text in ("vrpreamp 1500 3780 30", "vthreshold 0 2000 40",
                                                "trimbits 0 62 2", "vthreshold 0 2000 40",
                                                "vthreshold 0 2000 40")
                                 for s in (f"{text} 1ms", "0")]
    assert out.values(box.target.name) == ["Cu", "Cu", "Cu", "Cu", "Ge"]
    assert out.values(box.xrf_shutter.name).count("Open") == 5
    assert out.values(box.xrf_shutter.name).count("Closed") == 5
    # the decisions a dry run takes: the server's default vrf, then vcmp per chip and vcp
    tables = _dac_tables(out, det)
    vrf_row, vcp_row = DAC_NAMES.index("vrpreamp"), DAC_NAMES.index("vcp")
    assert any((t[vrf_row] == DAC_DEFAULTS["vrpreamp"]).all() for t in tables)
    assert any((t[vcp_row] == DAC_DEFAULTS["vcp"]).all() for t in tables)
    assert out.values(det.exptime.name).count(eiger.DEFAULTS.exptime_s) >= 2
    loaded = out.values(det.load_trimbits.name)
    assert len(loaded) == 1 and loaded[0].endswith(f"{det.name}_CuXRF_gain5")
    # a dry run writes no file and leaves the lab's calibration as it was
    assert list(tmp_path.iterdir()) == []
    assert eiger.current_calibration(det) is before
    assert out.result.dry_run and "dry run" in out.text


@pytest.mark.parametrize("step, names", [
    (lambda det, box: eiger.setup_detector(det), []),
    (lambda det, box: eiger.vrf_scan(det, box), ["vrf_scan", "vrf_scan_analysis"]),
    (lambda det, box: eiger.scurve(det, box), ["scurve", "scurve_analysis"]),
    (lambda det, box: eiger.trimbit_scan(det, box), ["trimbit_scan", "trimbit_scan_analysis"]),
    (lambda det, box: eiger.verification_scurve(det, box), ["scurve", "scurve_analysis"]),
    (lambda det, box: eiger.global_calibration(det, box),
     ["line_scan", "line_scan_analysis", "calibrate_eiger"]),
], ids=["setup_detector", "vrf_scan", "scurve", "trimbit_scan", "verification_scurve",
        "global_calibration"])
def test_each_eiger_step_outlines_alone(det, box, tmp_path, capsys, step, names):
    from calbench.plans.toolkit import set_results_dir
    set_results_dir(tmp_path)
    out = Outline(step(det, box), capsys)
    assert out.plan_names == names, out.text
    assert list(tmp_path.iterdir()) == []


def test_calibrate_sink_outlines_scan_fit_write_and_verification(bench, capsys):
    dmm, sink, psu = bench
    out = Outline(batmet.calibrate_sink(dmm, sink, psu, write=True), capsys)

    assert out.plan_names == ["collect_sink_calibration", "fit_sink", "verify_sink_calibration"]
    codes = out.values(sink.dac.name)
    # the nominal sink passes the stop current (3 A at DAC 2811) at 2820; then the DAC goes to 0
    scan = codes[1:codes.index(0, 1)]
    assert codes[0] == 0 and scan == list(range(450, 2821, 10)) and codes[-1] == 0, codes
    assert batmet.nominal_current_A(2810) < batmet.STOP_CURRENT_A < batmet.nominal_current_A(2820)
    assert out.values(psu.output.name) == ["On", "Off", "On", "Off"]
    staged = [out.values(s.name)[0] for s in (sink.cal_a, sink.cal_b, sink.cal_c)]
    np.testing.assert_allclose(staged, batmet.NOMINAL_SINK, rtol=1e-6)
    assert out.values(sink.sink.name) == list(batmet.VERIFY_CURRENTS_A)
    assert out.result.written
    assert out.result.csink == csink_line(*staged)
    assert "BatMet current sink: csink 0 4 0.2099" in out.text and "none (a dry run)" in out.text


@pytest.mark.parametrize("plan", ["collect_sink_calibration", "verify_sink_calibration"])
def test_batmet_scans_outline_alone(bench, capsys, plan):
    dmm, sink, psu = bench
    out = Outline(getattr(batmet, plan)(dmm, sink, psu), capsys)
    assert out.plan_names == [plan]
    assert out.values(sink.dac.name)[-1] == 0


def test_write_sink_calibration_outlines_the_staged_line(bench, capsys):
    dmm, sink, psu = bench
    out = Outline(batmet.write_sink_calibration(sink, 0.2, 760.0, 520.0), capsys)
    assert out.values(sink.cal_write.name) == [1]
    assert out.result == csink_line(0.2, 760.0, 520.0)


def test_transit_time_calibration_outlines_the_sweep_and_the_fit(lab, capsys):
    board = lab.device("fee")
    out = Outline(fee.transit_time_calibration(board, 3), capsys)
    assert out.plan_names == ["transit_time_calibration", "fit_transit_time"]
    assert out.values(board.channel_mask.name) == [1 << 3]
    assert out.values(board.seq_start.name) == [fee.SWEEP_START]
    assert out.values(board.seq_stop.name) == [fee.SWEEP_STOP]
    assert out.values(board.cal_dac.name) == [0]          # left safe
    assert out.result is None and "dry run" in out.text


def test_an_endless_cable_monitor_outlines_one_round(lab, capsys):
    board = lab.device("fee")
    out = Outline(fee.realtime_cable_monitor(board, [1, 2]), capsys)
    assert out.plan_names == ["transit_time_calibration", "fit_transit_time"] * 2
    assert [e.channel for e in out.result] == [1, 2]


def test_xray_plans_outline(box, capsys):
    out = Outline(xray.tube_on(box), capsys)
    assert out.values(box.hv.name) == ["On"] and out.values(box.voltage.name) == [40.0]
    out = Outline(xray.xrf_exposure(box, "Ge", iter(())), capsys)
    assert out.values(box.target.name) == ["Ge"]
    assert out.values(box.xrf_shutter.name) == ["Open", "Closed"]


def test_a_dry_step_leaves_the_current_calibration_as_it_was(det, box, tmp_path, capsys):
    RE = RunEngine({}, call_returns_result=True)
    real = RE(eiger.setup_detector(det, results_dir=tmp_path)).plan_result
    state = (real.exptime_s, list(real.runs), list(real.files), real.results.vrf)
    try:
        for step in (eiger.vrf_scan(det, box), eiger.scurve(det, box, cal=real)):
            out = Outline(step, capsys)
            assert out.plan_names[1:] == [f"{out.plan_names[0]}_analysis"]
            assert out.runs[0]["calibration_id"] == real.calibration_id      # its copy, dry
        assert eiger.current_calibration(det) is real
        assert (real.exptime_s, real.runs, real.files, real.results.vrf) == state
        assert not real.dry_run
    finally:
        eiger._CALIBRATIONS.pop(det.name, None)


def test_the_other_exported_plans_outline(det, box, capsys):
    out = Outline(eiger.load_trimbits(det, "/trims/T63_CuXRF_gain5"), capsys)
    assert out.values(det.load_trimbits.name) == ["/trims/T63_CuXRF_gain5"]
    out = Outline(xray.select_target(box, "Cu"), capsys)
    assert out.values(box.target.name) == ["Cu"]
    out = Outline(xray.open_xrf_shutter(box, "Fe"), capsys)
    assert out.values(box.xrf_shutter.name) == ["Open"]
    out = Outline(xray.close_shutters(box), capsys)
    assert out.values(box.xrf_shutter.name) == ["Closed"]
    assert out.values(box.direct_shutter.name) == ["Closed"]


def test_a_real_read_is_never_taken_for_a_dry_one():
    """The RunEngine answers a read with a reading, also for an empty or None value: the plan gets
    that value (and raises its own error on it), never the nominal one."""
    RE = RunEngine({}, call_returns_result=True)
    got = []

    def plan(signal):
        got.append((yield from read_or_nominal(signal, "nominal")))

    for value in ("", None, 0):
        RE(plan(Signal(name="s", value=value)))
    assert got == ["", None, 0]
    with pytest.raises(KeyError):
        reading_value({"other": {"value": 1}}, "s", "nominal")
