"""`calbench tiled serve`: a tiled catalog server whose API key never appears on a command line.

`tiled serve catalog --api-key KEY` puts the key in /proc/<pid>/cmdline, readable by every user, and
without `--api-key` tiled prints the key (as `?api_key=` in a URL) into its log. This entry point
reads the key from a file that must be private to its owner and builds the same app tiled's
command builds, without printing it. The access log is off: every append would be a line.

    python -m calbench.tiled_serve CATALOG_URI -w DIR -w TABLES_URI [-r DIR ...] \
        --api-key-file FILE [--host H] [--port P] [--init]

CATALOG_URI: `sqlite:///path` (embedded) or `postgresql://user@host/db`; TABLES_URI:
`duckdb:///path` (embedded) or the PostgreSQL URI; a
PostgreSQL password comes from the pgpass file ($PGPASSFILE or ~/.pgpass, mode 0600), never from a
URI on the command line. (tiled's table storage connects through ADBC with the URI's password only,
so it is added to that URI here, in memory.)
"""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import stat
import sys
from pathlib import Path


def read_private_key(path: Path) -> str:
    """The API key in `path`, refused (with the fix) if group or others may read the file."""
    path = Path(path)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        raise SystemExit(f"API key file {path} not found; create it with mode 0600") from None
    if mode & 0o077:
        raise SystemExit(f"API key file {path} is readable by others (mode {mode:04o}); "
                         f"`chmod 600 {path}`")
    key = path.read_text().strip()
    if not key.isalnum():
        raise SystemExit(f"API key file {path} must hold one alphanumeric key")
    return key


def _pgpass_password(host: str, port: str, db: str, user: str) -> str | None:
    path = Path(os.environ.get("PGPASSFILE") or Path.home() / ".pgpass")
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if not line.strip() or line.startswith("#"):
            continue
        fields = [re.sub(r"\\(.)", r"\1", f) for f in re.split(r"(?<!\\):", line)]
        if len(fields) == 5 and all(f in ("*", want) for f, want in
                                    zip(fields[:4], (host, port, db, user))):
            return fields[4]
    return None


def with_pgpass(uri: str) -> str:
    """A postgresql:// URI with the password from the pgpass file, if it has none."""
    from urllib.parse import quote, urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.scheme != "postgresql" or parts.password is not None or not parts.username:
        return uri
    password = _pgpass_password(parts.hostname or "localhost", str(parts.port or 5432),
                                parts.path.lstrip("/"), parts.username)
    if password is None:
        return uri
    netloc = f"{parts.username}:{quote(password, safe='')}@{parts.hostname}" + (
        f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="calbench tiled serve", description=__doc__.split("\n")[0])
    p.add_argument("catalog", help="catalog database URI (sqlite:///... or postgresql://...)")
    p.add_argument("-w", "--write", action="append", default=[], required=True,
                   help="writable storage: a directory (arrays) and a SQL URI (tables)")
    p.add_argument("-r", "--read", action="append", default=[], help="readable directory")
    p.add_argument("--api-key-file", type=Path, required=True, help="file holding the key (0600)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--init", action="store_true", help="create the catalog if it does not exist")
    return p


def _cache_dependency_signatures() -> None:
    """With any dependency override in the app (tiled overrides get_settings), FastAPI rebuilds
    every route's sub-dependencies at every request, each time calling inspect.signature on
    them: about 15 % of the server's CPU per request here. A callable's typed signature does not
    change, so it is computed once per callable."""
    import functools

    from fastapi.dependencies import utils

    if not hasattr(utils.get_typed_signature, "cache_info"):
        utils.get_typed_signature = functools.lru_cache(maxsize=4096)(utils.get_typed_signature)


def serve(args) -> None:
    import uvicorn
    from tiled.catalog import from_uri
    from tiled.config import Authentication
    from tiled.server.app import build_app

    from calbench.tiled_exporters import register_exporters

    key = read_private_key(args.api_key_file)
    _cache_dependency_signatures()
    register_exporters()            # BlueskyRun as json-seq: run.documents() on past runs
    os.umask(0o077)                 # catalog, tables, arrays: private to the lab user
    tree = from_uri(args.catalog, writable_storage=[with_pgpass(w) for w in args.write],
                    readable_storage=args.read,
                    init_if_not_exists=args.init)
    app = build_app(tree, Authentication(single_user_api_key=key))
    config = uvicorn.Config(app, host=args.host, port=args.port, access_log=False,
                            log_level="warning")
    asyncio.run(_serve(uvicorn.Server(config),
                       one_at_a_time=any(w.startswith("duckdb:") for w in args.write)))


async def _serve(server, *, one_at_a_time: bool) -> None:
    """Serve; with DuckDB tables, run the storage calls (which tiled runs in anyio's worker threads)
    one at a time: DuckDB's ADBC connection is not safe for concurrent requests (two sessions
    appending at once crashed the server after "No active transaction, cannot commit")."""
    if one_at_a_time:
        import anyio.to_thread
        anyio.to_thread.current_default_thread_limiter().total_tokens = 1
    await server.serve()


def main(argv: list[str] | None = None) -> int:
    serve(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
