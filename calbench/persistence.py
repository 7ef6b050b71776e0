"""Persisting documents to tiled off the RunEngine's critical path, exactly once.

The stock TiledWriter with batch_size=1 makes one HTTP append + one SQLite commit per event (~70 ms
here), which would pace every scan. `TiledPersister` hands documents to a worker thread instead:

* the RunEngine only enqueues (microseconds); the worker writes what has queued up in one append,
  so under light load each event is in tiled as soon as it is emitted (batch_size=1 behaviour, runs
  can be read live) and under heavy load the appends coalesce instead of falling behind;
* the `stop` document blocks the RunEngine until the worker has written the whole run, so when
  `RE(...)` returns the run is complete in tiled; a failure there raises `PersistenceError`, and the
  run's documents are kept in a JSONL backup to replay;
* exactly once: when an append fails with a server error or a lost response, the rows the server
  did store are read back (by seq_num) and only the missing ones are sent again. The stock retry
  resends the whole batch, which duplicated a row under a concurrent reader (201 rows for 200 events).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path

import httpx
import pyarrow
import pyarrow.compute
from bluesky_tiled_plugins import TiledWriter
from bluesky_tiled_plugins.writing._json_writer import JSONLinesWriter
from bluesky_tiled_plugins.writing.tiled_writer import _ConditionalBackup, _RunWriter

log = logging.getLogger(__name__)

_LARGE_BATCH = 1_000_000     # the worker decides when to write; the writer never flushes on count
_RETRIES = 6


class PersistenceError(RuntimeError):
    """A run could not be written to tiled; its documents are in the backup directory."""


class _ExactlyOnceRunWriter(_RunWriter):
    def _append_with_retry(self, df_client, table, desc_name: str):
        delay = 0.2
        for attempt in range(_RETRIES):
            try:
                df_client.append_partition(0, table)
                return
            except (httpx.TransportError, httpx.HTTPStatusError) as err:
                if (isinstance(err, httpx.HTTPStatusError) and err.response.status_code < 500
                        and err.response.status_code != 429):
                    raise
                log.warning("append to %s failed (%r); checking what the server kept", desc_name, err)
                time.sleep(delay)
                delay *= 2
                table = self._rows_not_stored(df_client, table)
                if table.num_rows == 0:
                    return
        df_client.append_partition(0, table)

    @staticmethod
    def _rows_not_stored(df_client, table):
        for attempt in range(_RETRIES):
            try:
                stored = df_client.read(columns=["seq_num"])["seq_num"].to_numpy()
                break
            except (httpx.TransportError, httpx.HTTPStatusError):
                time.sleep(0.2 * 2 ** attempt)
        else:
            raise PersistenceError("cannot read back the stored rows to retry an append safely")
        keep = pyarrow.compute.invert(pyarrow.compute.is_in(table["seq_num"],
                                                            value_set=pyarrow.array(stored)))
        return table.filter(keep)

    def stop(self, doc):
        # Write what is cached once, here: the stock stop() writes the cached StreamDatums without
        # clearing them, so the worker's flush after the stop wrote them a second time (one
        # phantom frame per cached datum in the array's advertised shape).
        self.flush()
        return super().stop(doc)

    def flush(self) -> None:
        """Write the cached event rows and stream datums now."""
        for desc_name, cache in self._internal_data_cache.items():
            if cache:
                self._write_internal_data(cache, desc_node=self._desc_nodes[desc_name])
                cache.clear()
        cached = list(self._external_data_cache.values())
        self._external_data_cache.clear()
        for doc in cached:
            self._write_external_data(doc)


class ExactlyOnceTiledWriter(TiledWriter):
    """TiledWriter whose appends are never duplicated and whose open runs can be flushed."""

    def __init__(self, client, **kwargs):
        kwargs.setdefault("batch_size", _LARGE_BATCH)
        super().__init__(client, **kwargs)
        self.open_runs: dict[int, tuple[_ExactlyOnceRunWriter, object]] = {}

    def _factory(self, name, doc):
        run_writer = _ExactlyOnceRunWriter(self.client, batch_size=self._batch_size,
                                           max_array_size=self._max_array_size)
        cb = run_writer
        if self._normalizer:
            cb = self._normalizer(patches=self.patches, spec_to_mimetype=self.spec_to_mimetype)
            cb.subscribe(run_writer)
        if self.backup_directory:
            cb = _ConditionalBackup(cb, [JSONLinesWriter(self.backup_directory)])
        self.open_runs[doc["uid"]] = (run_writer, cb)
        return [cb], []

    def flush(self) -> None:
        for run_writer, _ in list(self.open_runs.values()):
            if run_writer.root_node is not None:
                run_writer.flush()

    def run_failed(self, start_uid: str) -> bool:
        _, cb = self.open_runs.get(start_uid, (None, None))
        return bool(getattr(cb, "_primary_failed", False))


class TiledPersister:
    """RunEngine callback: documents to tiled in a worker thread; `stop` waits for the whole run.

        RE.subscribe(TiledPersister(catalog, backup_directory=cfg.home / "backup"))
    """

    def __init__(self, catalog, *, backup_directory: str | Path | None = None,
                 stop_timeout_s: float = 600.0):
        self.backup_directory = Path(backup_directory) if backup_directory else None
        if self.backup_directory:
            self.backup_directory.mkdir(parents=True, exist_ok=True)
        self.writer = ExactlyOnceTiledWriter(
            catalog, backup_directory=str(self.backup_directory) if self.backup_directory else None)
        self.stop_timeout_s = stop_timeout_s
        self._queue: queue.Queue = queue.Queue()
        self._done: dict[str, threading.Event] = {}
        self._errors: dict[str, BaseException] = {}
        self._thread = threading.Thread(target=self._work, name="calbench-tiled-writer", daemon=True)
        self._thread.start()

    def __call__(self, name: str, doc: dict) -> None:
        if name == "stop":
            done = self._done[doc["run_start"]] = threading.Event()
            self._queue.put((name, doc))
            if not done.wait(self.stop_timeout_s):
                raise PersistenceError(
                    f"run {doc['run_start']} was not written to tiled within {self.stop_timeout_s} s;"
                    " is the server overloaded or down? The documents are kept in "
                    f"{self.backup_directory or 'memory only (set a backup_directory)'}")
            error = self._errors.pop(doc["run_start"], None)
            self._done.pop(doc["run_start"], None)
            if error is not None:
                raise PersistenceError(
                    f"run {doc['run_start']} could not be written to tiled ({error}); its documents "
                    f"are in {self.backup_directory} (JSONL) to replay with `calbench tiled replay`")
        else:
            self._queue.put((name, doc))

    def flush(self, timeout: float = 60.0) -> None:
        """Block until everything queued so far is in tiled."""
        marker = threading.Event()
        self._queue.put(("_flush", marker))
        marker.wait(timeout)

    def _work(self) -> None:
        while True:
            name, doc = self._queue.get()
            try:
                if name == "_flush":
                    self.writer.flush()
                    doc.set()
                    continue
                self.writer(name, doc)
                if self._queue.empty():
                    self.writer.flush()
            except Exception as exc:  # keep the worker alive: later runs must still be written
                run = doc.get("run_start") or doc.get("uid") if isinstance(doc, dict) else None
                log.exception("writing a %s document to tiled failed", name)
                if run:
                    self._errors[run] = exc
            finally:
                if name == "stop":
                    uid = doc["run_start"]
                    if self.writer.run_failed(uid) and uid not in self._errors:
                        self._errors[uid] = RuntimeError("the tiled writer failed during the run")
                    self.writer.open_runs.pop(uid, None)
                    event = self._done.get(uid)
                    if event is not None:
                        event.set()
