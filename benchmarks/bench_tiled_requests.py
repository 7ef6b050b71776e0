"""What one request costs the embedded tiled server: wall time, server CPU and client CPU.

    python benchmarks/bench_tiled_requests.py [--seconds 8]

Starts the lab's embedded server (calbench.tiled_serve: SQLite catalog, DuckDB tables) in a
temporary directory and repeats, each for --seconds, the requests a run's writer makes: an append
of 5 rows to a table, a metadata update (the stop document), a new container (a run, a stream).
The floor is the server's cheapest authenticated request in the same run (GET of a node's
metadata). Server CPU is read from /proc/<pid>/stat (user + system, every thread), so it counts
what the request costs the machine, whatever else runs on it.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from calbench.iocs.server import free_port
from calbench.tiled_service import runs_catalog, start_embedded, stop_embedded


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def per_request(request, server_pid: int, seconds: float) -> tuple[float, float, float, int]:
    """(wall, server CPU, client CPU) in ms per request, and how many were made."""
    s0, c0, t0, n = _cpu_s(server_pid), time.process_time(), time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        request()
        n += 1
    wall = (time.perf_counter() - t0) / n * 1e3
    return wall, (_cpu_s(server_pid) - s0) / n * 1e3, (time.process_time() - c0) / n * 1e3, n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=8.0, help="per kind of request")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "tiled"
        endpoint, proc = start_embedded(directory, [], free_port())
        try:
            pid = proc.pid if proc is not None else int((directory / "server.pid").read_text())
            writable = runs_catalog(endpoint).include_data_sources()
            run = writable.create_container(key="bench")
            rows = pa.table({"seq_num": np.arange(5), "x": np.random.default_rng(0).random(5)})
            table = run.create_appendable_table(schema=rows.schema, key="internal")
            requests = {
                "GET a node's metadata (floor)": lambda: run.refresh(),
                "append 5 rows to a table": lambda: table.append_partition(0, rows),
                "update metadata (stop document)": lambda: run.update_metadata(
                    {"stop": {"time": time.time()}}),
                "create a container (run, stream)": lambda: run.create_container(),
            }
            figures = {label: per_request(r, pid, args.seconds) for label, r in requests.items()}
        finally:
            stop_embedded(directory)
    print(f"embedded tiled server, one client (load average {os.getloadavg()[0]:.2f}, "
          f"{os.cpu_count()} CPUs)")
    print(f"  {'request':36s} {'wall ms':>8} {'server CPU ms':>14} {'client CPU ms':>14} "
          f"{'x floor (server CPU)':>21} {'n':>5}")
    floor = next(iter(figures.values()))[1]
    for label, (wall, server, client, n) in figures.items():
        print(f"  {label:36s} {wall:8.1f} {server:14.1f} {client:14.1f} "
              f"{server / floor if floor else float('nan'):21.1f} {n:5d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
