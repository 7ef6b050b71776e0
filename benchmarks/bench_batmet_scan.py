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

Each row is the best of --repeats runs (the machine is shared).
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
from calbench.plans.batmet import collect_sink_calibration  # noqa: E402


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
    instrument = 3 * (10 / 50.0 + 0.03)
    print(f"BatMet sink scan, {n} points, world clock x{args.time_scale:g}, best of "
          f"{args.repeats}")
    print(f"  {'RE only':<18} {re_only * 1e3:8.1f} ms per event (baseline)")
    print(f"  {'meter Measure':<18} {measure * 1e3:8.1f} ms per trigger")
    print(f"  {'scan point':<18} {scan * 1e3:8.1f} ms per point "
          f"({scan / re_only:.1f} x the baseline; includes set-up and clean-up / {n})")
    print(f"  {'instrument time':<18} {instrument * 1e3:8.1f} ms per point on the real bench")
    print(f"  software overhead is {scan / instrument * 100:.0f} % of the real bench's own time")


if __name__ == "__main__":
    main()
