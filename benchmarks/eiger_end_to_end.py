"""calibrate_eiger end to end on a simulated EIGER of any geometry, for bench_eiger_9m.py --end-to-end.

The lab as it runs: the X-ray box and EIGER IOCs in their own process (`calbench ioc run --sim`,
on a Channel Access port of their own on loopback), an embedded tiled server (its own process),
this process's RunEngine persisting every document to tiled and running RE(calibrate_eiger(...))
(the trim target and the second target of the global calibration), the per-pixel fits on a dask
LocalCluster (or $CALBENCH_DASK_SCHEDULER). Reported per scan: points, acquire (the run's start to
its stop document: IOC frames -> HDF5 -> documents -> tiled), analyse (the StepAnalysis callback at
stop), after (the step's files, derived runs and settings until the next scan starts) and the
peak resident set so far of this process and of the IOC's; at the end, per process, the peak
resident set (this one: getrusage; the IOC and tiled server: VmHWM; dask workers: getrusage on
each).
"""
from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from calbench.iocs.server import free_port, loopback_ca_environment


@dataclass
class ScanRow:
    step: str
    target: str
    points: int = 0
    start: float = 0.0
    stop: float = 0.0
    analyse_s: float = 0.0
    after_s: float = 0.0
    rss_mb: float = 0.0         # this process's peak resident set once the step is done
    ioc_mb: float = 0.0         # the IOC process's


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _vmhwm_mb(pid: int) -> float:
    """Peak resident set (VmHWM) of a running process, MB (nan when it cannot be read)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


#: Bytes per pixel of what CalibrationResults keeps to the end (eiger_calibration.KeptSCurve,
#: KeptTrimbits; no fit map): the vrf scan's cleaned mask (bool); the untrimmed S-curve's mu
#: (float32), bad-pixel codes (uint8) and trimbit targets (float64); the trimbit scan's trimbits
#: (int32), trimmed and clipped masks; the trimmed S-curve's mu and codes; the two dispersions'
#: energy maps (float64).
KEPT_BYTES_PER_PIXEL = 1 + (4 + 1 + 8) + (4 + 1 + 1) + (4 + 1) + 2 * 8


def stated_bound_mb(geometry: str, points: int) -> tuple[float, str]:
    """What the RunEngine process may hold above its resident set before calibrate_eiger, MB, and
    why: the results the calibration keeps (KEPT_BYTES_PER_PIXEL), one step's analysis (its fit
    map put together block by block, 24 image-sized float64 arrays) and save_scan's band (one
    half-module row of the largest scan, read as uint32; written to the npz a pixel row at a
    time). The frames are never read into this process."""
    from calbench.analysis.scurve import SCURVE_DTYPE
    from calbench.contracts.eiger_geometry import HALF_MODULE_ROWS
    from calbench.contracts.eiger_geometry import geometry as eiger_geometry
    g = eiger_geometry(geometry)
    kept_mb = g.n_pixels * KEPT_BYTES_PER_PIXEL / 2**20
    step_mb = g.n_pixels * (SCURVE_DTYPE.itemsize + 24 * 8) / 2**20
    band_mb = HALF_MODULE_ROWS * g.shape[1] * points * 4 / 2**20
    why = (f"kept results {kept_mb:.0f} ({KEPT_BYTES_PER_PIXEL} B a pixel) + one step's analysis "
           f"{step_mb:.0f} + save_scan's band {band_mb:.0f}; the largest scan's frames would be "
           f"{g.n_pixels * points * 4 / 2**20:.0f} as uint32, its PSI file's data as float64 "
           "twice that")
    return kept_mb + step_mb + band_mb, why


def kept_mb(results) -> float:
    """The numpy arrays CalibrationResults holds (its dataclasses followed), MB: what the stated
    bound's kept term must cover, measured."""
    import dataclasses

    import numpy as np
    seen: set[int] = set()

    def size(obj) -> int:
        if id(obj) in seen:
            return 0
        seen.add(id(obj))
        if isinstance(obj, np.ndarray):
            return obj.nbytes if obj.base is None else size(obj.base)
        if dataclasses.is_dataclass(obj):
            return sum(size(getattr(obj, f.name)) for f in dataclasses.fields(obj))
        if isinstance(obj, dict):
            return sum(size(v) for v in obj.values())
        return 0
    return size(results) / 2**20


def _write_config(home: Path, geometry: str, time_scale: float) -> Path:
    path = home / "lab.toml"
    path.write_text(f"""[lab]
name = "EIGER {geometry} end to end"
home = "{home}"
pv_prefix = "B{uuid.uuid4().hex[:6]}:"
time_scale = {time_scale}
seed = 20261122

[instruments.xraybox]
backend = "sim"
warmup_s = 2.0

[instruments.eiger]
backend = "sim"
geometry = "{geometry}"
det_id = "T63"
hostnames = ["beb058"]
""")
    return path


def _start_iocs(cfg, log: Path, wait_s: float = 900.0) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "calbench.cli", "--config", str(cfg.source), "ioc", "run",
           "--prefix", cfg.pv_prefix]
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, "CALBENCH_HOME": str(cfg.home)})
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:         # the IOC says so once its PVs are served
        if proc.poll() is not None:
            raise RuntimeError(f"the IOCs exited with code {proc.returncode}; see {log}")
        if b"serving" in log.read_bytes()[-4000:]:
            return proc
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError(f"the IOCs did not start within {wait_s} s; see {log}")


def _stop_iocs(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)          # the IOC leaves the box safe on SIGTERM
    proc.wait(60)


def run_end_to_end(geometry: str, directory: Path, *, time_scale: float = 5.0,
                   target: str = "Cu") -> int:
    # Channel Access on loopback, on a port of this run's own, before any CA client exists
    os.environ.update(loopback_ca_environment())
    port = str(free_port())
    os.environ.update({"EPICS_CA_SERVER_PORT": port, "EPICS_CAS_SERVER_PORT": port})
    os.environ["CALBENCH_HOME"] = str(directory)

    from bluesky import RunEngine

    from calbench.analysis import eiger_callbacks
    from calbench.analysis.eiger_calibration import GLOBAL_TARGETS
    from calbench.analysis.eiger_callbacks import LAZY_ABOVE_PIXELS
    from calbench.contracts.eiger_geometry import geometry as cal_geometry
    from calbench.analysis.scurve_dask import dask_client
    from calbench.config import load_config
    from calbench.lab import make_device
    from calbench.persistence import TiledPersister
    from calbench.plans.eiger import calibrate_eiger
    from calbench.plans.xray import tube_on
    from calbench.tiled_service import runs_catalog, start_embedded

    cfg = load_config(_write_config(directory, geometry, time_scale))
    t0 = time.perf_counter()
    iocs = _start_iocs(cfg, directory / "iocs.log")
    ioc_start_s = time.perf_counter() - t0
    tiled_proc = None
    try:
        endpoint, tiled_proc = start_embedded(directory / "tiled", [cfg.data_dir], free_port())
        catalog = runs_catalog(endpoint, f"bench_{uuid.uuid4().hex[:8]}")
        client = dask_client()
        print(f"EIGER {geometry}: IOCs serving after {ioc_start_s:.1f} s (pid {iocs.pid}); "
              f"tiled {endpoint.uri}; dask {client.scheduler.address} with "
              f"{len(client.scheduler_info()['workers'])} workers; world time x{time_scale}; "
              f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs", flush=True)

        RE = RunEngine({}, call_returns_result=True)
        RE.md.update({"operator": "benchmark"})
        RE.subscribe(TiledPersister(catalog, journal_directory=directory / "journal"))
        rows: list[ScanRow] = []
        open_runs: dict[str, ScanRow] = {}

        def timeline(name, doc):
            if name == "start" and "x_key" in doc:          # a scan of the procedure (not derived)
                if rows and not rows[-1].after_s:
                    rows[-1].after_s = doc["time"] - rows[-1].stop - rows[-1].analyse_s
                    rows[-1].rss_mb, rows[-1].ioc_mb = _rss_mb(), _vmhwm_mb(iocs.pid)
                open_runs[doc["uid"]] = row = ScanRow(doc["step"], doc["target"], start=doc["time"])
                rows.append(row)
            elif name in ("event", "event_page") and open_runs:    # a detector scan: pages
                for row in open_runs.values():
                    row.points += 1 if name == "event" else len(doc["seq_num"])
            elif name == "stop" and doc["run_start"] in open_runs:
                open_runs.pop(doc["run_start"]).stop = doc["time"]

        RE.subscribe(timeline)
        original = eiger_callbacks.StepAnalysis.stop

        def timed_stop(self, doc):
            t = time.perf_counter()
            try:
                return original(self, doc)
            finally:
                if rows:
                    rows[-1].analyse_s = time.perf_counter() - t

        eiger_callbacks.StepAnalysis.stop = timed_stop
        box, det = make_device(cfg, "xraybox", timeout=60.0), make_device(cfg, "eiger", timeout=60.0)
        det.data_dir = cfg.data_dir
        RE(tube_on(box, 40.0, 40.0))
        rss_before = _rss_mb()
        t1 = time.perf_counter()
        cal = RE(calibrate_eiger(det, box, target, results_dir=directory / "results",
                                 plot=False, md={"sample": "benchmark"})).plan_result
        total = time.perf_counter() - t1
        if rows and not rows[-1].after_s:       # the last step's files and records, to the end
            rows[-1].after_s = time.time() - rows[-1].stop - rows[-1].analyse_s
            rows[-1].rss_mb, rows[-1].ioc_mb = _rss_mb(), _vmhwm_mb(iocs.pid)
        eiger_callbacks.StepAnalysis.stop = original

        print(f"\ncalibrate_eiger on {target} (second target {', '.join(GLOBAL_TARGETS[target])}), EIGER "
              f"{geometry}: {total:.0f} s")
        print(f"{'step':<14}{'target':>7}{'points':>7}{'acquire [s]':>13}{'per point':>10}"
              f"{'analyse [s]':>13}{'after [s]':>11}{'RE peak [MB]':>14}{'IOC peak [MB]':>15}")
        for r in rows:
            acq = r.stop - r.start
            print(f"{r.step:<14}{r.target:>7}{r.points:>7}{acq:>13.1f}{acq / max(r.points, 1):>10.2f}"
                  f"{r.analyse_s:>13.1f}{r.after_s:>11.1f}{r.rss_mb:>14.0f}{r.ioc_mb:>15.0f}")
        workers = client.run(_rss_mb)
        bound, why = stated_bound_mb(geometry, max(r.points for r in rows))
        grown = _rss_mb() - rss_before
        print(f"\npeak resident memory [MB]: RunEngine + analysis process {_rss_mb():.0f} "
              f"({rss_before:.0f} before calibrate_eiger); IOC process {_vmhwm_mb(iocs.pid):.0f}; "
              f"tiled server {_vmhwm_mb(tiled_proc.pid) if tiled_proc else float('nan'):.0f}; dask "
              "workers " + ", ".join(f"{v:.0f}" for v in workers.values()))
        g = cal_geometry(geometry)
        print(f"kept by CalibrationResults at the end: {kept_mb(cal.results):.0f} MB measured, "
              f"{g.n_pixels * KEPT_BYTES_PER_PIXEL / 2**20:.0f} MB stated")
        if g.n_pixels > LAZY_ABOVE_PIXELS:
            print(f"bound: the RunEngine process grows by < {bound:.0f} MB during calibrate_eiger "
                  f"({why}); it grew by {grown:.0f} MB: "
                  f"{'within' if grown < bound else 'ABOVE'} the bound")
        else:
            print(f"no bound stated: up to {LAZY_ABOVE_PIXELS} pixels the analysis reads each "
                  f"scan's frames into this process (it grew by {grown:.0f} MB)")
        return 0
    finally:
        _stop_iocs(iocs)
        if tiled_proc is not None:
            tiled_proc.terminate()
            tiled_proc.wait(60)
