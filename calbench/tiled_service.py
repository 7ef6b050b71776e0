"""The tiled server runs are stored in: an embedded local server by default, or an external one.

Embedded: `tiled serve catalog` in a background process, SQLite catalog + zarr/DuckDB storage under
<home>/tiled, detector files readable from the lab's data directory, an API key generated once and
kept in <home>/tiled/api_key (mode 0600). It survives restarts: the catalog is a file.

External: set CALBENCH_TILED_URI and CALBENCH_TILED_API_KEY (or [tiled] uri/api_key). For several
writers use PostgreSQL for the catalog, e.g.
    tiled catalog init postgresql://user:pw@dbhost/tiled
    tiled serve catalog postgresql://user:pw@dbhost/tiled -w /data/tiled \
        -w duckdb:////data/tiled/tables.duckdb -r /lab/data --api-key $KEY --host 0.0.0.0
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

from calbench.config import LabConfig

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


def _api_key(directory: Path) -> str:
    path = directory / "api_key"
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
    os.chmod(path, 0o600)
    return path.read_text().strip()


def healthy(uri: str, timeout: float = 2.0) -> bool:
    base = uri.split("/api/")[0].rstrip("/")
    try:
        return httpx.get(f"{base}/healthz", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def start_embedded(directory: Path, readable: list[Path], port: int, *, timeout: float = 60.0,
                   api_key: str | None = None) -> tuple[TiledEndpoint, subprocess.Popen | None]:
    """Start (or find running) a persistent local tiled server with its files in `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "data").mkdir(exist_ok=True)
    for r in readable:
        Path(r).mkdir(parents=True, exist_ok=True)
    key = api_key or _api_key(directory)
    uri = f"http://127.0.0.1:{port}"
    endpoint = TiledEndpoint(uri, key, True, directory)
    if healthy(uri):
        return endpoint, None
    db = directory / "catalog.db"
    # tiled's own command with BlueskyRun's json-seq exporter registered (run.documents())
    cmd = [sys.executable, "-m", "calbench.tiled_exporters", "serve", "catalog", str(db),
           "-w", str(directory / "data"), "-w", f"duckdb:///{directory / 'tables.duckdb'}",
           "--api-key", key,
           "--host", "127.0.0.1", "--port", str(port)]
    for r in readable:
        cmd += ["-r", str(r)]
    if not db.exists():
        cmd.append("--init")
    log = open(directory / "server.log", "ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, env={**os.environ, "TILED_API_KEY": key})
    (directory / "server.pid").write_text(str(proc.pid))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise TiledUnavailable(f"the embedded tiled server exited with code {proc.returncode}; "
                                   f"see {directory / 'server.log'}")
        if healthy(uri, timeout=0.5):
            return endpoint, proc
        time.sleep(0.2)
    proc.terminate()
    raise TiledUnavailable(f"the embedded tiled server did not answer on {uri} within {timeout} s; "
                           f"see {directory / 'server.log'} (is port {port} taken? set [tiled] port)")


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
        client.create_container(name, specs=[Spec(*RUNS_SPEC)])
    return client[name]


def connect_catalog(cfg: LabConfig, *, start: bool = True):
    """Catalog of the lab's runs (for reading: `cat[uid]`, `cat.search(...)`, `cat[-1]`)."""
    return runs_catalog(ensure_tiled(cfg, start=start), cfg.tiled_catalog)
