"""A lab session in a process of its own, for the persistence tests: builds the RunEngine as the
profile does (calbench.session.make_run_engine: shared metadata, journal, tiled) and runs one `count`
of a simulated detector, printing a line per emitted event (after the journal took it) so a test
can kill it at a known point.

    python tests/session_runner.py EVENTS DELAY_S [STOP_TIMEOUT_S]   (CALBENCH_HOME, CALBENCH_CONFIG)

Output: `EMITTED <seq_num>` per event, then `RUN <uid> <scan_id>`; `NOT_STORED <message>` and exit
code 3 when the run is not in tiled at stop.
"""
import sys

from bluesky.plans import count
from ophyd.sim import SynSignal

from calbench.config import load_config
from calbench.persistence import PersistenceError
from calbench.session import make_run_engine


def main(events: int, delay_s: float, stop_timeout_s: float | None = None) -> int:
    cfg = load_config()
    if stop_timeout_s:
        cfg = cfg.with_overrides(tiled_stop_timeout_s=stop_timeout_s)
    RE, bec, catalog = make_run_engine(cfg, interactive=False)
    bec.disable_table()
    value = iter(range(1, 10 ** 9))
    det = SynSignal(func=lambda: float(next(value)), name="det")
    uids = []
    RE.subscribe(lambda name, doc: print(f"EMITTED {doc['seq_num']}", flush=True), "event")
    RE.subscribe(lambda name, doc: uids.append(doc["uid"]), "start")
    try:
        RE(count([det], num=events, delay=delay_s), purpose="persistence test")
    except PersistenceError as exc:
        print(f"NOT_STORED {exc}", flush=True)
        return 3
    print(f"RUN {uids[0]} {RE.md['scan_id']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), float(sys.argv[2]), *map(float, sys.argv[3:4])))
