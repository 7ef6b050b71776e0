"""The tiled server runs are stored in: an embedded local server by default, or an external one.

Embedded: `calbench tiled serve` (tiled's catalog app, calbench.tiled_serve) in a background process,
SQLite catalog + DuckDB tables + zarr arrays under <home>/tiled (mode 0700, files 0600), detector
files readable from the lab's data directory, an API key generated once and kept in
<home>/tiled/api_key (mode 0600), read by the server from that file. It survives restarts.

External: set CALBENCH_TILED_URI and CALBENCH_TILED_API_KEY (or [tiled] uri and api_key_file, a
0600 file). For several writers run tiled on PostgreSQL (README, "PostgreSQL"; the tests use that
recipe, tests/pg_support.py).
"""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from calbench.config import LabConfig, private_dir

RUNS_SPEC = ("CatalogOfBlueskyRuns", "3.0")


class TiledUnavailable(ConnectionError):
    """The tiled server does not answer (or refuses our key)."""


@dataclass(frozen=True)
class TiledEndpoint:
    uri: str
    api_key: str
    embedded: bool
    directory: Path | None = None


def _tiled_dir(cfg: LabConfig) -> Path:
    return cfg.home / "tiled"


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(path, 0o600)


def _api_key(directory: Path) -> str:
    path = directory / "api_key"
    if not path.exists():
        private_dir(directory)
        _write_private(path, secrets.token_hex(32))
    os.chmod(path, 0o600)
    return path.read_text().strip()


def healthy(uri: str, timeout: float = 2.0) -> bool:
    base = uri.split("/api/")[0].rstrip("/")
    try:
        return httpx.get(f"{base}/healthz", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def start_embedded(directory: Path, readable: list[Path], port: int, *, timeout: float = 180.0,
                   api_key: str | None = None) -> tuple[TiledEndpoint, subprocess.Popen | None]:
    """Start (or find running) a persistent local tiled server with its files in `directory`.

    Tables go to DuckDB, whose list columns hold array-valued event fields (SQLite tables cannot);
    the server runs its storage calls one at a time, since DuckDB's ADBC connection is not safe for
    concurrent requests (see README, "Storage")."""
    directory = private_dir(directory)
    private_dir(directory / "data")
    for r in readable:
        Path(r).mkdir(parents=True, exist_ok=True)
    key = api_key or _api_key(directory)
    if api_key:
        _write_private(directory / "api_key", api_key)
    uri = f"http://127.0.0.1:{port}"
    endpoint = TiledEndpoint(uri, key, True, directory)
    if healthy(uri):
        return endpoint, None
    writable = [str(directory / "data"), f"duckdb:///{directory / 'tables.duckdb'}"]
    if (directory / "tables.sqlite").exists():       # a lab home that had SQLite tables
        writable.append(f"sqlite:///{directory / 'tables.sqlite'}")
    proc = spawn_server(f"sqlite:///{directory / 'catalog.db'}", writable, readable,
                        directory / "api_key", "127.0.0.1", port, directory / "server.log",
                        init=not (directory / "catalog.db").exists())
    (directory / "server.pid").write_text(str(proc.pid))
    wait_healthy(proc, uri, directory / "server.log", timeout)
    return endpoint, proc


def spawn_server(catalog: str, writable: list[str], readable: list[Path], key_file: Path,
                 host: str, port: int, log_path: Path, *, init: bool = True,
                 env: dict | None = None) -> subprocess.Popen:
    """`calbench tiled serve` in the background: key read from `key_file`, files private (umask
    077), output appended to `log_path` (mode 0600); `env` adds variables (e.g. PGPASSFILE)."""
    cmd = [sys.executable, "-m", "calbench.tiled_serve", catalog, "--api-key-file", str(key_file),
           "--host", host, "--port", str(port), *(["--init"] if init else [])]
    for w in writable:
        cmd += ["-w", str(w)]
    for r in readable:
        cmd += ["-r", str(r)]
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.chmod(log_path, 0o600)
    with os.fdopen(fd, "ab") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, umask=0o077,
                                env={**os.environ, **(env or {})})


def wait_healthy(proc: subprocess.Popen, uri: str, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise TiledUnavailable(f"the tiled server exited with code {proc.returncode}; "
                                   f"see {log_path}")
        if healthy(uri, timeout=0.5):
            return
        time.sleep(0.2)
    proc.terminate()
    raise TiledUnavailable(f"the tiled server did not answer on {uri} within {timeout} s; "
                           f"see {log_path} (is the port taken? set [tiled] port)")


def stop_embedded(directory: Path, timeout: float = 5.0) -> bool:
    """Stop the embedded server started from `directory`; True if one was running."""
    pidfile = Path(directory) / "server.pid"
    if not pidfile.exists():
        return False
    pid = int(pidfile.read_text())
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pidfile.unlink(missing_ok=True)
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
    pidfile.unlink(missing_ok=True)
    return True


def ensure_tiled(cfg: LabConfig, *, start: bool = True) -> TiledEndpoint:
    """The endpoint runs go to: the external server if configured, else the embedded one
    (started if needed and allowed)."""
    if cfg.tiled_uri:
        if not healthy(cfg.tiled_uri):
            raise TiledUnavailable(f"the tiled server at {cfg.tiled_uri} does not answer; start it, "
                                   "or unset CALBENCH_TILED_URI to use the embedded server")
        return TiledEndpoint(cfg.tiled_uri, cfg.tiled_api_key, False)
    directory = _tiled_dir(cfg)
    uri = f"http://127.0.0.1:{cfg.tiled_port}"
    if healthy(uri):
        return TiledEndpoint(uri, _api_key(directory), True, directory)
    if not start:
        raise TiledUnavailable(f"the embedded tiled server is not running on {uri}; start it with "
                               "`calbench tiled start` (or `make run`)")
    endpoint, _ = start_embedded(directory, [cfg.data_dir], cfg.tiled_port)
    return endpoint


def runs_catalog(endpoint: TiledEndpoint, name: str = "raw"):
    """The CatalogOfBlueskyRuns container `name` on the server (created on first use)."""
    from tiled.client import from_uri
    from tiled.structures.core import Spec

    try:
        client = from_uri(endpoint.uri, api_key=endpoint.api_key)
    except httpx.HTTPStatusError as exc:
        if exc.response.status_code != 401:
            raise TiledUnavailable(f"tiled at {endpoint.uri} answered {exc}") from exc
        where = (f"the key in {endpoint.directory / 'api_key'}" if endpoint.directory
                 else "CALBENCH_TILED_API_KEY")
        raise TiledUnavailable(
            f"the tiled server at {endpoint.uri} refuses {where}: another lab home's server may "
            "be running on this port; stop it (`calbench tiled stop` with that CALBENCH_HOME) or "
            "give this lab another [tiled] port") from exc
    except httpx.HTTPError as exc:
        raise TiledUnavailable(f"cannot reach tiled at {endpoint.uri}: {exc}; is the server "
                               "running (`calbench tiled status`)?") from exc
    if name not in client:
        try:
            client.create_container(name, specs=[Spec(*RUNS_SPEC)])
        except httpx.HTTPStatusError:
            # Another session created it just now: 409 on SQLite, a 500 (unique violation) on
            # PostgreSQL. Only if it is still missing is this an error.
            if name not in client:
                raise
    return client[name]


def connect_catalog(cfg: LabConfig, *, start: bool = True):
    """Catalog of the lab's runs (for reading: `cat[uid]`, `cat.search(...)`, `cat[-1]`)."""
    return runs_catalog(ensure_tiled(cfg, start=start), cfg.tiled_catalog)
