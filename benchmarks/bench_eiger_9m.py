"""A 9M EIGER (18 modules, 9.4 M pixels) calibrated on the simulator: time per step, peak memory.

    python benchmarks/bench_eiger_9m.py [--geometry 9M] [--scheduler tcp://host:8786]
                                        [--directory /big/disk] [--end-to-end [--time-scale 5]]

--end-to-end: RE(calibrate_eiger(...)) through the IOCs (a process of their own), the RunEngine and
a local tiled server (benchmarks/eiger_end_to_end.py). Without it:

calibrate_eiger's steps and decisions (vrf scan, S-curve, trimbit scan, trimmed S-curve, the second
target's threshold scan; tests/eiger_scan_support.py), each scan written frame by frame into one
HDF5 file as the detector IOC writes a run, and decided by the plans' StepAnalysis callback on the
run's documents. Above 2M pixels the callback leaves the frames in the file: the analysis reads
them block by block (one half module, 256 x 1024 pixels, every point) on a dask cluster, where the
per-pixel fits run; this process holds the per-pixel results only. Each scan's file is removed once
analysed (a 9M S-curve is 51 x 38 MB).

Rows per step: acquire (EigerSim frames + HDF5 writes, this process: the detector's share),
analyse (the callback at stop), and the peak of memory allocated in this process during the
analysis above what it held before (tracemalloc; numpy's arrays included). At the end: the peak resident set of this process
and of each dask worker (getrusage ru_maxrss), and the stated bound.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from eiger_scan_support import run_procedure  # noqa: E402

from calbench.analysis import eiger_callbacks  # noqa: E402
from calbench.analysis.scurve import SCURVE_DTYPE  # noqa: E402
from calbench.analysis.scurve_dask import SCHEDULER_ENV, dask_client  # noqa: E402
from calbench.contracts.eiger_geometry import HALF_MODULE_COLS, HALF_MODULE_ROWS  # noqa: E402
from calbench.contracts.eiger_geometry import geometry as eiger_geometry  # noqa: E402


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--geometry", default="9M")
    ap.add_argument("--scheduler", default="", help=f"dask scheduler address (or ${SCHEDULER_ENV});"
                                                   " default: a LocalCluster on this host")
    ap.add_argument("--directory", default="", help="where the scan files go (default: a "
                                                    "temporary directory)")
    ap.add_argument("--end-to-end", action="store_true",
                    help="through the IOCs, RunEngine and tiled (see benchmarks/eiger_end_to_end.py)")
    ap.add_argument("--time-scale", type=float, default=5.0,
                    help="--end-to-end: world-clock acceleration of the X-ray world (exposures)")
    args = ap.parse_args(argv)
    if args.scheduler:
        os.environ[SCHEDULER_ENV] = args.scheduler
    if args.end_to_end:
        from eiger_end_to_end import run_end_to_end
        with tempfile.TemporaryDirectory(dir=args.directory or None) as tmp:
            return run_end_to_end(args.geometry, Path(tmp), time_scale=args.time_scale)
    g = eiger_geometry(args.geometry)
    client = dask_client()
    workers = len(client.scheduler_info()["workers"])
    print(f"EIGER {g.name}: {g.n_pixels / 1e6:.2f} M pixels, {g.n_half_modules} half modules; "
          f"dask: {client.scheduler.address} with {workers} workers; load average "
          f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs", flush=True)

    peaks: list[float] = []
    original = eiger_callbacks.StepAnalysis.stop

    def traced_stop(self, doc):          # the analysis at stop: what it allocates at most
        tracemalloc.reset_peak()
        held = tracemalloc.get_traced_memory()[0]
        try:
            return original(self, doc)
        finally:
            peaks.append((tracemalloc.get_traced_memory()[1] - held) / 2**20)

    eiger_callbacks.StepAnalysis.stop = traced_stop
    tracemalloc.start()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.directory or None) as tmp:
        run = run_procedure(g.name, Path(tmp), lazy=(None,), keep_files=False)
    total = time.perf_counter() - t0
    tracemalloc.stop()

    print(f"\n{'step':<14}{'target':>7}{'points':>7}{'acquire [s]':>13}{'analyse [s]':>13}"
          f"{'analysis +peak [MB]':>20}")
    for f, peak in zip(run.figures, peaks):
        print(f"{f.step:<14}{f.target:>7}{f.points:>7}{f.acquire_s:>13.1f}{f.analyse_s:>13.1f}"
              f"{peak:>20.0f}")
    print(f"{'total':<28}{sum(f.acquire_s for f in run.figures):>13.1f}"
          f"{sum(f.analyse_s for f in run.figures):>13.1f}   (wall {total:.0f} s)")

    worker_rss = client.run(_peak_rss_mb)
    points = max(f.points for f in run.figures)
    scan_mb = g.n_pixels * points * 4 / 2**20
    block_mb = HALF_MODULE_ROWS * HALF_MODULE_COLS * points * 8 / 2**20
    fit_mb = g.n_pixels * SCURVE_DTYPE.itemsize / 2**20
    bound_main = fit_mb + 24 * g.n_pixels * 8 / 2**20
    print(f"\npeak resident memory: this process {_peak_rss_mb():.0f} MB (simulator and results "
          "included); workers " + ", ".join(f"{v:.0f}" for v in worker_rss.values()) + " MB")
    print(f"bound: a step's analysis allocates < {bound_main:.0f} MB in this process (the fit "
          f"map, {fit_mb:.0f} MB, each block put in place as it arrives; 24 image-sized float64 "
          f"arrays), whatever the number of points; the scan's frames would be {scan_mb:.0f} MB "
          f"as uint32. A worker holds the half-module blocks it works on ({block_mb:.0f} MB as "
          "float64) and the results not yet fetched.")
    over = [p for p in peaks if p > bound_main]
    print("within the bound" if not over else f"ABOVE the bound in {len(over)} step(s)")
    s = run.results[None]
    print(f"physics: vrf {list(map(int, s['vrf_scan'].vrf))[:4]}..., inflection spread "
          f"{np.mean(s['untrimmed'].mu_std):.1f} -> {np.mean(s['trimmed'].mu_std):.1f} DAC")
    return 0


if __name__ == "__main__":
    sys.exit(main())
