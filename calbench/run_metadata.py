"""RunEngine metadata shared by the sessions of one lab home, and scan ids that never repeat.

bluesky's PersistentDict (zict files, one per key) is not safe for two processes: a session died
with "FileNotFoundError: .../runengine-metadata/scan_id#10" while another rewrote the key. Here
RE.md is one JSON file, `<home>/runengine-metadata.json`: each process reads its own copy, and every
change is merged into the file under an flock and replaced atomically. Scan ids are allocated under
the same lock from the file's counter, never from a process's stale copy, so two sessions on one home
never hand out the same id; a floor taken from the catalog covers runs stored by other homes.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import MutableMapping
from pathlib import Path

from calbench.journal import json_default, json_object_hook

SCAN_ID = "scan_id"


class SharedMetadata(MutableMapping):
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock_path = self.path.with_name(self.path.name + ".lock")
        with self._locked():
            self._data = self._read()

    @contextlib.contextmanager
    def _locked(self):
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text(), object_hook=json_object_hook)
        except FileNotFoundError:
            return {}

    def _write(self, data: dict) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, default=json_default)
        os.replace(tmp, self.path)

    def _update(self, change) -> None:
        with self._locked():
            data = self._read()
            change(data)
            self._write(data)

    def __setitem__(self, key, value) -> None:
        self._data[key] = value
        if key == SCAN_ID:       # never lower the shared counter another session has raised
            self._update(lambda d: d.__setitem__(key, max(int(value), int(d.get(key, 0)))))
        else:
            self._update(lambda d: d.__setitem__(key, value))

    def __delitem__(self, key) -> None:
        del self._data[key]
        self._update(lambda d: d.pop(key, None))

    def __getitem__(self, key):
        return self._data[key]

    def __iter__(self):
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def next_scan_id(self, md=None) -> int:
        """The next scan id of the lab home (RunEngine's scan_id_source)."""
        with self._locked():
            data = self._read()
            n = int(data.get(SCAN_ID, 0)) + 1
            data[SCAN_ID] = n
            self._write(data)
        self._data[SCAN_ID] = n
        return n

    def raise_scan_id_floor(self, floor: int) -> None:
        """Make the next scan id larger than `floor` (the largest id already in the catalog)."""
        self._update(lambda d: d.__setitem__(SCAN_ID, max(int(floor), int(d.get(SCAN_ID, 0)))))
        self._data[SCAN_ID] = max(int(floor), int(self._data.get(SCAN_ID, 0)))


def lab_metadata(home: Path) -> SharedMetadata:
    """RE.md of the lab home, taking over a bluesky PersistentDict left by older sessions."""
    md = SharedMetadata(Path(home) / "runengine-metadata.json")
    legacy = Path(home) / "runengine-metadata"
    if not md and legacy.is_dir():
        from bluesky.utils import PersistentDict
        for key, value in dict(PersistentDict(str(legacy))).items():
            md[key] = value
    return md
