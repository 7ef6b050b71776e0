"""A throw-away PostgreSQL server for tests: initdb + pg_ctl in a temporary directory, on a free
loopback port. As the README's recipe: tiled connects over TCP as role `tiled`, whose password
is in a pgpass file (scram-sha-256), never in a URI; the superuser works through the socket only. PostgreSQL refuses to run as root, so as root
the cluster belongs to the `postgres` user (`runuser`). The binaries come from the system's
PostgreSQL package (.ci/run and `make postgres` install it with apt-get when missing)."""
from __future__ import annotations

import glob
import os
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

from calbench.iocs.server import free_port


def postgres_bin() -> Path | None:
    found = next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)),
                 None) or shutil.which("initdb")
    return Path(found).resolve().parent if found else None     # createdb, pg_ctl sit beside it


class Postgres:
    """`with Postgres() as pg: pg.create_database("x"); pg.uri("x")`"""

    def __init__(self):
        self.bin = postgres_bin()
        if self.bin is None:
            raise RuntimeError("PostgreSQL is not installed (no initdb); `make postgres` or "
                               "`apt-get install postgresql` installs it")
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="calbench-pg-"))
        self.data = self.root / "data"
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(self.root, "postgres")

    def _run(self, *cmd: str) -> None:
        done = subprocess.run([*self.as_user, *cmd], capture_output=True, text=True, timeout=120)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")

    def __enter__(self) -> "Postgres":
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres",
                  "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8")
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options,
                  "-l", str(self.root / "postgres.log"), "-w", "-t", "120", "start")
        self.password = secrets.token_hex(16)
        self._run(str(self.bin / "psql"), "-h", str(self.root), "-p", str(self.port), "-U",
                  "postgres", "-c", f"CREATE ROLE tiled LOGIN PASSWORD '{self.password}'")
        return self

    def create_database(self, name: str) -> str:
        self._run(str(self.bin / "createdb"), "-h", str(self.root), "-p", str(self.port),
                  "-U", "postgres", "-O", "tiled", name)
        return self.uri(name)

    def uri(self, database: str) -> str:
        return f"postgresql://tiled@127.0.0.1:{self.port}/{database}"

    def write_pgpass(self, path: Path) -> Path:
        """The role's password in a pgpass file (mode 0600), for PGPASSFILE."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(f"127.0.0.1:{self.port}:*:tiled:{self.password}\n")
        return path

    def __exit__(self, *exc) -> None:
        try:
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w",
                      "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
