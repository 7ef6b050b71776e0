"""Lab homes whose runs go to a real tiled server (the embedded default, or tiled on a real
PostgreSQL), session processes running against them, and the count of what tiled holds."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from calbench.config import load_config
from calbench.iocs.server import free_port
from calbench.persistence import stored_seq_nums
from calbench.tiled_service import (ensure_tiled, runs_catalog, spawn_server, stop_embedded,
                                    wait_healthy)

HERE = Path(__file__).resolve().parent
RUNNER = HERE / "session_runner.py"
STOP_TIMEOUT_S = 8      # the outage test's: the run ends this long after tiled died


class LabStore:
    """A lab home (lab.toml, journal) and the tiled server its sessions write to."""

    def __init__(self, home: Path, tiled_lines: list[str]):
        self.home = home
        self.config = home / "lab.toml"
        self.config.write_text("[lab]\nname = \"persistence test\"\n\n[tiled]\n"
                               + "\n".join(tiled_lines) + "\n")
        self.env = {**os.environ, "CALBENCH_HOME": str(home), "CALBENCH_CONFIG": str(self.config),
                    "PYTHONUNBUFFERED": "1"}
        for key in ("CALBENCH_TILED_URI", "CALBENCH_TILED_API_KEY"):
            self.env.pop(key, None)

    @property
    def cfg(self):
        saved = {k: os.environ.get(k) for k in ("CALBENCH_HOME", "CALBENCH_TILED_URI",
                                                "CALBENCH_TILED_API_KEY")}
        os.environ["CALBENCH_HOME"] = str(self.home)
        for key in ("CALBENCH_TILED_URI", "CALBENCH_TILED_API_KEY"):
            os.environ.pop(key, None)
        try:
            return load_config(self.config)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def catalog(self):
        cfg = self.cfg
        return runs_catalog(ensure_tiled(cfg, start=False), cfg.tiled_catalog)

    def session(self, events: int, delay_s: float, stop_timeout_s: float = 0) -> subprocess.Popen:
        """A session process running one count; stop_timeout_s 0: the lab's (default 30 s)."""
        return subprocess.Popen([sys.executable, str(RUNNER), str(events), str(delay_s),
                                 str(stop_timeout_s)],
                                env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd=self.home)

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "calbench.cli", *args], env=self.env,
                              capture_output=True, text=True, timeout=300, cwd=self.home)

    def journaled(self) -> list[Path]:
        return sorted((self.home / "journal").glob("*.jsonl"))


class EmbeddedStore(LabStore):
    kind = "embedded"

    def __init__(self, home: Path):
        super().__init__(home, [f"port = {free_port()}"])

    def start_server(self):
        ensure_tiled(self.cfg)

    def kill_server(self):
        os.kill(int((self.home / "tiled" / "server.pid").read_text()), signal.SIGKILL)

    def close(self):
        stop_embedded(self.home / "tiled")


class PostgresStore(LabStore):
    """tiled on PostgreSQL, started as the README's recipe says (`calbench tiled serve`)."""
    kind = "postgresql"

    def __init__(self, home: Path, pg):
        self.port = free_port()
        self.key_file = home / "tiled_api_key"
        fd = os.open(self.key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(os.urandom(16).hex())
        name = uuid.uuid4().hex[:12]
        self.catalog_uri = pg.create_database(f"catalog_{name}")
        self.tables_uri = pg.create_database(f"tables_{name}")
        (home / "data").mkdir()
        self.server_env = {"PGPASSFILE": str(pg.write_pgpass(home / "pgpass"))}
        super().__init__(home, [f"uri = \"http://127.0.0.1:{self.port}\"",
                                f"api_key_file = \"{self.key_file}\""])
        self.proc = None

    def start_server(self):
        self.proc = spawn_server(self.catalog_uri, [str(self.home / "data"), self.tables_uri],
                                 [], self.key_file, "127.0.0.1", self.port,
                                 self.home / "server.log", init=True, env=self.server_env)
        wait_healthy(self.proc, f"http://127.0.0.1:{self.port}", self.home / "server.log", 120)

    def kill_server(self):
        self.proc.kill()
        self.proc.wait(30)

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


@dataclass
class Count:
    """What happened to one run: events emitted by the session, rows tiled holds."""
    uid: str
    emitted: int
    stored: int
    duplicated: int
    lost: int
    exit_status: str

    def line(self, label: str) -> str:
        return (f"{label:<34} emitted {self.emitted:4d}  stored {self.stored:4d}  duplicated "
                f"{self.duplicated:3d}  lost {self.lost:3d}  exit_status {self.exit_status}")


def count_run(catalog, uid: str, emitted: int) -> Count:
    """Count the rows tiled holds for `uid` against seq_nums 1..emitted (read back independently of
    the persister's own check)."""
    run = catalog[uid]
    rows = stored_seq_nums(run, "primary")
    counts = Counter(rows)
    duplicated = sum(c - 1 for c in counts.values() if c > 1)
    lost = len(set(range(1, emitted + 1)) - set(counts))
    return Count(uid, emitted, len(rows), duplicated, lost, run.metadata["stop"]["exit_status"])


def read_until(proc: subprocess.Popen, predicate, timeout_s: float = 300) -> list[str]:
    """Lines of the session's stdout up to (and including) the first for which predicate holds."""
    lines = []
    deadline = time.monotonic() + timeout_s
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if predicate(lines[-1]) or time.monotonic() > deadline:
            break
    return lines
