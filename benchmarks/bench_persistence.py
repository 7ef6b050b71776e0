"""RunEngine time per event with persistence to tiled, against the RunEngine alone, same run.

    python benchmarks/bench_persistence.py [--events 500]

Rows: no writer (baseline); the write-ahead journal alone (TiledPersister without a catalog: one
JSONL line written per document); the stock TiledWriter(batch_size=1) subscribed directly; calbench's
TiledPersister (journal, worker thread, exactly-once appends, stop waits for the run and checks the
stored seq_nums). "per event" is the RunEngine's wall time for `count` divided by the number of
events, including the wait at stop; "+ per event" is the difference to the RunEngine alone.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from bluesky import RunEngine
from bluesky.plans import count
from bluesky_tiled_plugins import TiledWriter
from ophyd.sim import SynSignal

from calbench.iocs.server import free_port
from calbench.persistence import TiledPersister
from calbench.tiled_service import runs_catalog, start_embedded, stop_embedded


def timed(RE, n: int) -> tuple[float, str]:
    det = SynSignal(func=lambda: 1.0, name="det")
    t0 = time.perf_counter()
    (uid,) = RE(count([det], num=n))
    return (time.perf_counter() - t0) / n * 1e3, uid


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=500)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "tiled"
        endpoint, _ = start_embedded(directory, [Path(tmp) / "data"], free_port())
        try:
            catalog = runs_catalog(endpoint)
            rows = []
            RE = RunEngine({})
            timed(RE, 10)                                      # warm-up
            rows.append(("RunEngine alone", *timed(RE, args.events)))
            RE = RunEngine({})
            RE.subscribe(TiledPersister(None, journal_directory=Path(tmp) / "journal"))
            rows.append(("journal only", *timed(RE, args.events)))
            RE = RunEngine({})
            RE.subscribe(TiledWriter(catalog, batch_size=1))
            rows.append(("TiledWriter(batch_size=1)", *timed(RE, args.events)))
            RE = RunEngine({})
            RE.subscribe(TiledPersister(catalog, journal_directory=Path(tmp) / "journal"))
            rows.append(("calbench TiledPersister", *timed(RE, args.events)))
            base = rows[0][1]
            print(f"{args.events} events per run")
            print(f"{'writer':<28} {'ms/event':>9} {'+ per event':>12} {'rows in tiled':>14}")
            for name, ms, uid in rows:
                stored = ("-" if name in ("RunEngine alone", "journal only")
                          else len(catalog[uid]["primary"].base["internal"].read()))
                print(f"{name:<28} {ms:9.2f} {ms - base:12.2f} {stored!s:>14}")
        finally:
            stop_embedded(directory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
