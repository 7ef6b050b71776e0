"""Write-ahead journal of runs: every document on local disk before it is sent to tiled.

One JSONL file per run, `<journal>/<start uid>.jsonl`, one line per document
(`{"name": ..., "doc": ...}`). A line is written with a single `write()` on a file opened with
O_APPEND, so a killed process leaves whole lines only (the page cache keeps what was written; the
closed run is fsync'ed for a power cut). Values JSON has no type for are tagged and restored on
reading: bytes (the 34401A's control limits), numpy arrays and scalars.

The session writing a run holds an exclusive `flock` on its file until the run is stored in tiled
(then the file is removed) or given up (then the file stays, for `calbench tiled replay`). A file
nobody holds a lock on belongs to a session that ended: that is what replay picks up. The lock goes
with the process, so a kill -9 frees it.
"""
from __future__ import annotations

import base64
import fcntl
import json
import logging
import os
import threading
from pathlib import Path

import numpy as np

from calbench.config import private_dir

log = logging.getLogger(__name__)

SUFFIX = ".jsonl"


def json_default(value):
    if isinstance(value, (bytes, bytearray)):
        return {"$bytes": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    raise TypeError(f"a document value of type {type(value).__name__} has no JSON form: {value!r}")


def json_object_hook(obj: dict):
    if len(obj) == 1 and "$bytes" in obj:
        return base64.b64decode(obj["$bytes"])
    return obj


def dumps_line(name: str, doc: dict) -> bytes:
    """One journal line (newline-terminated), any numpy or bytes value included."""
    return (json.dumps({"name": name, "doc": doc}, default=json_default, allow_nan=True,
                       separators=(",", ":")) + "\n").encode()


class RunJournal:
    """The journal file of one run, locked by this process while it writes or stores the run."""

    def __init__(self, directory: Path, start_uid: str):
        self.path = private_dir(directory) / f"{start_uid}{SUFFIX}"
        # Created and locked under a name replay does not look at, then renamed (the lock stays
        # with the file): a replay starting meanwhile never finds it unlocked.
        part = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        self._fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        if self.path.exists():
            os.close(self._fd)
            part.unlink()
            raise RuntimeError(f"run {start_uid} is already in the journal ({self.path}); a run "
                               "uid must be new")
        os.rename(part, self.path)
        self._lock = threading.Lock()

    @classmethod
    def adopt(cls, path: Path) -> "RunJournal | None":
        """Lock an existing journal file for replay; None if a live session holds it."""
        journal = cls.__new__(cls)
        journal.path = Path(path)
        journal._lock = threading.Lock()
        try:
            journal._fd = os.open(journal.path, os.O_WRONLY | os.O_APPEND)
        except FileNotFoundError:
            return None              # stored and removed meanwhile
        try:
            fcntl.flock(journal._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(journal._fd)
            return None
        try:
            same = os.stat(journal.path).st_ino == os.fstat(journal._fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:                       # stored and removed between open and lock
            journal.close()
            return None
        return journal

    def append(self, name: str, doc: dict) -> None:
        os.write(self._fd, dumps_line(name, doc))

    def sync(self) -> None:
        """To the disk (a power cut); a no-op once the run is stored or released. The session's
        thread may call it while the tiled writer's thread releases the file."""
        with self._lock:
            if self._fd is not None:
                os.fsync(self._fd)

    def documents(self) -> list[tuple[str, dict]]:
        return read_journal(self.path)

    def close(self) -> None:
        """Release the file (it stays for replay)."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)      # closing the descriptor releases the lock
                self._fd = None

    def discard(self) -> None:
        """The run is stored: remove its journal (while still holding the lock)."""
        with self._lock:
            self.path.unlink(missing_ok=True)
        self.close()


def read_journal(path: Path) -> list[tuple[str, dict]]:
    """The documents of a journal file; a torn last line (power cut) is dropped with a warning."""
    docs = []
    lines = Path(path).read_bytes().split(b"\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            entry = json.loads(line, object_hook=json_object_hook)
        except json.JSONDecodeError:
            if i >= len(lines) - 2:
                log.warning("%s: last line is incomplete (written when the machine stopped?); "
                            "dropped", path)
                break
            raise ValueError(f"{path}: line {i + 1} is not a journal entry; the file is damaged, "
                             "move it out of the journal directory to go on") from None
        docs.append((entry["name"], entry["doc"]))
    return docs


def pending(directory: Path) -> list[Path]:
    """Journal files of runs not (yet) known to be stored, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(directory.glob(f"*{SUFFIX}"), key=lambda p: p.stat().st_mtime)
