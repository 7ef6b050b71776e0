"""Wall time per point of the BatMet sink scan, against the RunEngine alone, same run.

    python benchmarks/bench_batmet_scan.py [--points 60] [--time-scale 1000]

The simulated bench (supply -> BatMet -> 34401A) runs in this process on loopback with its own CA
port, its world clock accelerated so that the instruments' own time (3 readings x 10 NPLC per point,
about 0.7 s on the real bench) shrinks to almost nothing and the software overhead shows. Rows:

  RE only            RE(count([soft signal])): the RunEngine's cost per event, no Channel Access
  meter Measure      dmm.trigger().wait(): one put-complete round trip, 3 simulated readings
  scan point         collect_sink_calibration per point: DAC put, display put, meter + supply +
                     BatMet triggers, reads (no persistence; see bench_persistence.py for tiled)
  instrument time    what the real instruments need per point (3 x (10 NPLC at 50 Hz + 30 ms))

Each row is the best of --repeats runs (the machine is shared). Then one full calibration
(calibrate_sink: scan to 3 A, fit, csink, `sink` verification) prints the fitted coefficients
against the simulated unit's hidden ones and the accuracy figures (the lab quotes about 2 mA).
"""
from __future__ import annotations

import argparse
import os
import random
import time
import uuid
from dataclasses import replace

# Own CA port: other CA servers on this host must not answer (or steal) our searches.
os.environ["EPICS_CA_SERVER_PORT"] = str(random.randint(20000, 40000))
from calbench.iocs.server import IocThread, loopback_ca_environment  # noqa: E402

os.environ.update(loopback_ca_environment())

from bluesky import RunEngine  # noqa: E402
from bluesky.plans import count  # noqa: E402
from ophyd.sim import SynSignal  # noqa: E402

from calbench.config import load_config  # noqa: E402
from calbench.iocs.build import build_iocs  # noqa: E402
from calbench.lab import make_device  # noqa: E402
from calbench.plans.batmet import calibrate_sink, collect_sink_calibration  # noqa: E402


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--points", type=int, default=60)
    parser.add_argument("--time-scale", type=float, default=1000.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    cfg = load_config()
    cfg = replace(cfg, pv_prefix=f"B{uuid.uuid4().hex[:6]}:")
    groups = build_iocs(cfg, ["dmm", "psu", "batmet"], time_scales={"bench": args.time_scale})
    with IocThread(groups):
        dmm, psu, batmet = (make_device(cfg, n, timeout=30) for n in ("dmm", "psu", "batmet"))
        RE = RunEngine({})
        n = args.points
        soft = SynSignal(func=lambda: 1.0, name="soft")
        re_only = best(lambda: RE(count([soft], num=n)), args.repeats) / n
        dmm.samples.set(3).wait(10)
        measure = best(lambda: [dmm.trigger().wait(10) for _ in range(n)], args.repeats) / n
        stop = 450 + 10 * n
        scan = best(lambda: RE(collect_sink_calibration(dmm, batmet, psu, dac_stop=stop)),
                    args.repeats) / n
        box = {}

        def full():
            box["cal"] = yield from calibrate_sink(dmm, batmet, psu, write=True)

        t0 = time.perf_counter()
        RE(full())
        full_s = time.perf_counter() - t0
        truth = groups[2].backend.sim.world.sink
    instrument = 3 * (10 / 50.0 + 0.03)
    print(f"BatMet sink scan, {n} points, world clock x{args.time_scale:g}, best of "
          f"{args.repeats}")
    print(f"  {'RE only':<18} {re_only * 1e3:8.1f} ms per event (baseline)")
    print(f"  {'meter Measure':<18} {measure * 1e3:8.1f} ms per trigger")
    print(f"  {'scan point':<18} {scan * 1e3:8.1f} ms per point "
          f"({scan / re_only:.1f} x the baseline; includes set-up and clean-up / {n})")
    print(f"  {'instrument time':<18} {instrument * 1e3:8.1f} ms per point on the real bench")
    print(f"  software overhead is {scan / instrument * 100:.0f} % of the real bench's own time")
    cal = box["cal"]
    fit, acc = cal.fit, cal.accuracy
    print(f"full calibration: {len(cal.scan.dac)} points + {acc.error_A.size} verification points "
          f"in {full_s:.1f} s; {cal.scan.stop_reason}")
    print(f"  {'':<6} {'fit':>12} {'simulated':>12}")
    for name, value, err, true in (("a", fit.a, fit.a_err, truth.a), ("b", fit.b, fit.b_err, truth.b),
                                   ("c", fit.c, fit.c_err, truth.c)):
        print(f"  {name:<6} {value:12.4f} {true:12.4f}   (fit standard error {err:.4f})")
    print(f"  {cal.csink}")
    print(f"  scan residuals: max {fit.max_error_A * 1e3:.2f} mA, RMS {fit.rms_error_A * 1e3:.2f} mA;"
          f" `sink` verification: max {acc.max_error_A * 1e3:.2f} mA, RMS "
          f"{acc.rms_error_A * 1e3:.2f} mA")


if __name__ == "__main__":
    main()
