# Long by design: the tiled writer, its journal hand-off and every failure path of one document stream.
"""Persisting documents to tiled off the RunEngine's critical path, exactly once, whatever fails.

The stock TiledWriter with batch_size=1 makes one HTTP append + one SQL commit per event (~70 ms
here), which would pace every scan. `TiledPersister` instead:

* journals every document as it is emitted (calbench.journal: one JSONL line, written before the
  document goes anywhere else), so a killed session, a tiled outage or a crashed server lose
  nothing: what is not in tiled is in the journal;
* hands the document to a worker thread that writes what has queued up in one append (runs can be
  read live; under load the appends coalesce instead of falling behind);
* at `stop` waits at most `stop_timeout_s` for the run to be in tiled, then checks the stored
  seq_nums of every stream against the emitted ones. A duplicate, a gap or a write that failed
  during the run (a server busy with other sessions) is repaired by rewriting the run from its
  journal; if that fails too the run is marked in tiled and the user told. A run
  that is stored and checked leaves the journal; any other stays there for `calbench tiled replay`
  (also run at every session start), which stores it exactly once;
* retries a failed append only with the rows the server did not keep (read back by seq_num): the
  stock retry resends the whole batch and duplicated rows under load.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pyarrow
import pyarrow.compute
from bluesky_tiled_plugins.writing.tiled_writer import RunNormalizer, _RunWriter
from event_model import DocumentNames

from calbench.journal import RunJournal, pending, read_journal

log = logging.getLogger(__name__)

# Requests that need not wait for each other: the read-back check beside the stop document, the
# stream closes after the run is stored.
_CHECKS = ThreadPoolExecutor(1, thread_name_prefix="calbench-tiled-check")
_CLOSES = ThreadPoolExecutor(1, thread_name_prefix="calbench-tiled-close")

_LARGE_BATCH = 1_000_000     # the worker decides when to write; the writer never flushes on count
_RETRIES = 6
READ_BACK_RETRIES = 9
FLUSH_INTERVAL_S = 0.25      # rows wait at least this long in the worker before they are appended
WRITE_SHARE = 0.25           # ... and the timed appends take at most this share of the time
REPLAY_COMMAND = "calbench tiled replay"
INTERRUPTED = "interrupted: the session ended before the run closed (killed or crashed)"


class PersistenceError(RuntimeError):
    """A run is not (or not exactly) in tiled; its documents are kept in the journal."""


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
        # A server busy with other sessions' appends can answer errors for seconds: keep asking
        # (about 12 s in all) before the run falls back to the rewrite from its journal at stop.
        for attempt in range(READ_BACK_RETRIES):
            try:
                stored = df_client.read(columns=["seq_num"])["seq_num"].to_numpy()
                break
            except (httpx.TransportError, httpx.HTTPStatusError):
                time.sleep(min(0.2 * 2 ** attempt, 2.0))
        else:
            raise PersistenceError("cannot read back the stored rows to retry an append safely")
        keep = pyarrow.compute.invert(pyarrow.compute.is_in(table["seq_num"],
                                                            value_set=pyarrow.array(stored)))
        return table.filter(keep)

    def stop(self, doc):
        # Write what is cached once, here: the stock stop() writes the cached StreamDatums without
        # clearing them, so a flush after the stop wrote them a second time (one phantom frame per
        # cached datum in the array's advertised shape).
        self.flush()
        # Every row is in: read them back while the stop document is written (one round trip
        # less at stop; the stop document still lands after the last row).
        reading = _CHECKS.submit(self._read_stored_seq_nums)
        try:
            super().stop(doc)
        finally:
            self.stored = reading.result()

    @property
    def has_tables(self) -> bool:
        return bool(self._internal_tables)

    def _read_stored_seq_nums(self) -> dict[str, list[int]]:
        """seq_num of every row the server holds, per stream, read through the tables this writer
        appended to (no walk down the catalog)."""
        return {stream: [int(s) for s in table.read(columns=["seq_num"])["seq_num"]]
                for stream, table in self._internal_tables.items()}

    def _close_stream_tree(self) -> None:
        # Closing tells live subscribers that the run ended: one request per node, none of which
        # the stored run needs. The server takes one storage request at a time, so they are sent
        # once the run is stored and checked (close_streams_later), not beside the wait at stop.
        self._closes_due = True

    def close_streams_later(self) -> None:
        if getattr(self, "_closes_due", False):
            self._closes_due = False
            _CLOSES.submit(self._close_streams)

    def _close_streams(self) -> None:
        try:
            super()._close_stream_tree()
        except Exception as exc:
            log.info("closing the tiled streams of a run failed (%s); the run is stored", exc)

    def flush(self) -> None:
        """Write the cached event rows and stream datums now."""
        if self.root_node is None:
            return
        for desc_name, cache in self._internal_data_cache.items():
            if cache:
                self._write_internal_data(cache, desc_node=self._desc_nodes[desc_name])
                cache.clear()
        cached = list(self._external_data_cache.values())
        self._external_data_cache.clear()
        for doc in cached:
            self._write_external_data(doc)


class _RunNormalizer(RunNormalizer):
    """RunNormalizer without the schema check of every event it re-emits: 96 us of the ~110 us it
    spends on an event here, taken from the RunEngine's process. Events come from the RunEngine,
    which built them from their descriptor (and the check at stop compares the rows); every
    other document is still checked."""

    _UNCHECKED = frozenset({DocumentNames.event, DocumentNames.event_page})

    def emit(self, name, doc):
        if name in self._UNCHECKED:
            self.dispatcher.process(name, doc)
        else:
            super().emit(name, doc)


class RunPipe:
    """The documents of one run into tiled: RunNormalizer -> exactly-once run writer.

    `writable` is `catalog.include_data_sources()` (a request each time it is made: made once)."""

    def __init__(self, writable):
        self.writer = _ExactlyOnceRunWriter(writable, batch_size=_LARGE_BATCH)
        self.normalizer = _RunNormalizer()
        self.normalizer.subscribe(self.writer)

    def __call__(self, name: str, doc: dict) -> None:
        self.normalizer(name, doc)

    def flush(self) -> None:
        self.writer.flush()


@dataclass
class RunTally:
    """What a run emitted: seq_nums per stream (event streams; stored as `seq_num` rows)."""
    streams: dict[str, str] = field(default_factory=dict)          # descriptor uid -> stream
    seq_nums: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))

    def add(self, name: str, doc: dict) -> None:
        if name == "descriptor":
            self.streams[doc["uid"]] = doc.get("name", "primary")
            self.seq_nums.setdefault(self.streams[doc["uid"]], [])
        elif name == "event":
            self.seq_nums[self.streams[doc["descriptor"]]].append(doc["seq_num"])
        elif name == "event_page":
            self.seq_nums[self.streams[doc["descriptor"]]].extend(doc["seq_num"])

    @classmethod
    def of(cls, docs) -> "RunTally":
        tally = cls()
        for name, doc in docs:
            tally.add(name, doc)
        return tally

    @property
    def events(self) -> int:
        return sum(len(v) for v in self.seq_nums.values())


@dataclass(frozen=True)
class StoredCheck:
    """Emitted against stored rows of one run, per stream."""
    uid: str
    emitted: dict[str, int]
    stored: dict[str, int]
    duplicated: dict[str, int]
    lost: dict[str, int]
    unexpected: dict[str, int]
    has_stop: bool

    @property
    def ok(self) -> bool:
        return self.has_stop and not any(n for counts in (self.duplicated, self.lost,
                                                          self.unexpected) for n in counts.values())

    def summary(self) -> str:
        def total(d):
            return sum(d.values())
        return (f"emitted {total(self.emitted)}, stored {total(self.stored)}, duplicated "
                f"{total(self.duplicated)}, lost {total(self.lost)}, unexpected "
                f"{total(self.unexpected)}{'' if self.has_stop else ', no stop document'}")


def stored_seq_nums(run, stream: str) -> list[int]:
    """seq_num of every row stored for `stream` of `run` (a tiled run container)."""
    try:
        node = run[stream]
    except KeyError:
        return []
    node = getattr(node, "base", node)
    if "internal" not in node:
        return []
    return [int(s) for s in node["internal"].read(columns=["seq_num"])["seq_num"]]


def check_stored(catalog, uid: str, tally: RunTally) -> StoredCheck:
    """Compare the rows tiled holds for run `uid` with what the run emitted."""
    try:
        run = catalog[uid]
    except KeyError:
        run = None
    has_stop = run is not None and bool(run.metadata.get("stop"))
    return compare_stored(uid, tally, lambda stream: stored_seq_nums(run, stream)
                          if run is not None else [], has_stop)


def compare_stored(uid: str, tally: RunTally, read_seq_nums, has_stop: bool) -> StoredCheck:
    """The StoredCheck of run `uid`: `read_seq_nums(stream)` gives the stored rows' seq_nums."""
    emitted, stored, dup, lost, unexpected = {}, {}, {}, {}, {}
    for stream, seq in tally.seq_nums.items():
        have = read_seq_nums(stream)
        counts = Counter(have)
        emitted[stream], stored[stream] = len(seq), len(have)
        dup[stream] = sum(c - 1 for c in counts.values() if c > 1)
        lost[stream] = len(set(seq) - set(counts))
        unexpected[stream] = len(set(counts) - set(seq))
    return StoredCheck(uid, emitted, stored, dup, lost, unexpected, has_stop)


def write_run(catalog, docs: list[tuple[str, dict]]) -> None:
    """Write a whole run into tiled, replacing whatever part of it is there."""
    uid = docs[0][1]["uid"]
    if uid in catalog:
        catalog[uid].delete(recursive=True, external_only=False)
    pipe = RunPipe(catalog.include_data_sources())
    for name, doc in docs:
        pipe(name, doc)
    pipe.writer.close_streams_later()


def closed(docs: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    """The run's documents, with a stop document saying it was interrupted if it has none."""
    if not docs or docs[0][0] != "start":
        raise ValueError("a journal must begin with the run's start document")
    if docs[-1][0] == "stop":
        return docs
    tally = RunTally.of(docs)
    stop = {"run_start": docs[0][1]["uid"], "uid": str(uuid.uuid4()),
            "time": max(d.get("time", 0) for _, d in docs), "exit_status": "abort",
            "reason": INTERRUPTED, "num_events": {s: len(v) for s, v in tally.seq_nums.items()}}
    return [*docs, ("stop", stop)]


def store_exactly_once(catalog, docs: list[tuple[str, dict]]) -> StoredCheck:
    """Make run `docs` be in tiled exactly once: keep it if tiled already holds all of it, else
    (re)write it. Raises PersistenceError if the stored rows still differ."""
    tally = RunTally.of(docs)
    uid = docs[0][1]["uid"]
    check = check_stored(catalog, uid, tally)
    if check.ok:
        return check
    write_run(catalog, docs)
    check = check_stored(catalog, uid, tally)
    if not check.ok:
        _mark(catalog, uid, check)
        raise PersistenceError(f"run {uid} differs from what it emitted even after rewriting it "
                               f"({check.summary()}); it is marked in tiled (metadata "
                               "'calbench_integrity') and kept in the journal")
    return check


def _mark(catalog, uid: str, check: StoredCheck) -> None:
    try:
        catalog[uid].update_metadata({"calbench_integrity": {
            "emitted": check.emitted, "stored": check.stored, "duplicated": check.duplicated,
            "lost": check.lost, "unexpected": check.unexpected}})
    except Exception:      # the mark is a courtesy; the journal keeps the truth
        log.exception("could not mark run %s in tiled", uid)


@dataclass
class ReplayResult:
    uid: str
    outcome: str            # "stored", "already stored", "interrupted, stored", "failed: ..."
    events: int


def replay(catalog, directory: Path) -> list[ReplayResult]:
    """Store every journaled run no live session holds into tiled, exactly once; a run without a
    stop document (its session was killed) is closed with exit_status 'abort'."""
    results = []
    for path in pending(directory):
        journal = RunJournal.adopt(path)
        if journal is None:
            continue                     # a live session is writing it
        try:
            docs = journal.documents()
            if not docs:
                journal.discard()
                continue
            full = closed(docs)
            already = check_stored(catalog, full[0][1]["uid"], RunTally.of(full)).ok
            check = store_exactly_once(catalog, full)
            outcome = ("already stored" if already else
                       "interrupted, stored" if full[-1] is not docs[-1] else "stored")
            results.append(ReplayResult(check.uid, outcome, sum(check.emitted.values())))
            journal.discard()
        except Exception as exc:         # one bad run must not keep the others out of tiled
            log.exception("replaying %s failed", path)
            results.append(ReplayResult(path.stem, f"failed: {exc}", -1))
            journal.close()
    return results


@dataclass
class _Run:
    uid: str
    journal: RunJournal
    pipe: RunPipe | None = None
    tally: RunTally = field(default_factory=RunTally)
    error: BaseException | None = None
    check: StoredCheck | None = None
    done: threading.Event = field(default_factory=threading.Event)


# Document name -> key holding the uid of the document it belongs to (None: the run's start).
_PARENT = {"descriptor": "run_start", "resource": "run_start", "stream_resource": "run_start",
           "stop": "run_start", "event": "descriptor", "event_page": "descriptor",
           "datum": "resource", "datum_page": "resource", "stream_datum": "stream_resource"}


class TiledPersister:
    """RunEngine callback: journal, then tiled in a worker thread; `stop` waits for the run.

        RE.subscribe(TiledPersister(catalog, journal_directory=cfg.home / "journal"))

    With `catalog=None` the runs are only journaled (tiled unreachable at session start).
    """

    def __init__(self, catalog, *, journal_directory: str | Path, stop_timeout_s: float = 30.0):
        self.catalog = catalog
        self.journal_directory = Path(journal_directory)
        self.stop_timeout_s = stop_timeout_s
        self.checks: dict[str, StoredCheck] = {}      # uid -> check of each run stored (latest 100)
        self._runs: dict[str, _Run] = {}
        self._owner: dict[str, str] = {}              # descriptor/resource uid -> start uid
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="calbench-tiled-writer", daemon=True)
        self._thread.start()

    # -- RunEngine thread ------------------------------------------------------------------------
    def __call__(self, name: str, doc: dict) -> None:
        if name == "start":
            run = self._runs[doc["uid"]] = _Run(doc["uid"], RunJournal(self.journal_directory,
                                                                      doc["uid"]))
        else:
            parent = doc.get(_PARENT.get(name, ""))
            uid = parent if parent in self._runs else self._owner.get(parent)
            run = self._runs.get(uid)
            if run is None:
                log.warning("a %s document outside any open run was not stored", name)
                return
            if name in ("descriptor", "resource", "stream_resource"):
                self._owner[doc["uid"]] = run.uid
        run.journal.append(name, doc)
        if name != "stop":
            if self.catalog is not None:
                self._queue.put((run, name, doc))
            return
        self._forget(run)
        if self.catalog is None:
            run.journal.sync()
            run.journal.close()
            return
        self._queue.put((run, name, doc))
        # The closed run reaches the disk (power cut) while the worker stores it.
        run.journal.sync()
        if not run.done.wait(self.stop_timeout_s):
            raise PersistenceError(self._not_stored(run, f"tiled did not take it within "
                                                         f"{self.stop_timeout_s:g} s"))
        if run.error is not None:
            raise PersistenceError(self._not_stored(run, str(run.error)))

    def _forget(self, run: _Run) -> None:
        self._runs.pop(run.uid, None)
        for key in [k for k, v in self._owner.items() if v == run.uid]:
            del self._owner[key]

    def _not_stored(self, run: _Run, cause: str) -> str:
        return (f"run {run.uid} is not in tiled ({cause}); it is complete in the journal "
                f"{run.journal.path}. `{REPLAY_COMMAND}` stores it when tiled answers (the next "
                "session start does too)")

    def flush(self, timeout: float = 60.0) -> None:
        """Block until everything queued so far is in tiled and the streams of the runs stored
        are closed (before a session or its tiled server ends)."""
        marker = threading.Event()
        self._queue.put((None, "_flush", marker))
        marker.wait(timeout)
        try:
            _CLOSES.submit(lambda: None).result(timeout)    # one thread: after the closes due
        except (TimeoutError, RuntimeError) as exc:     # RuntimeError: the interpreter exits
            log.info("the tiled streams of the last runs were not all closed (%r)", exc)

    # -- worker thread ---------------------------------------------------------------------------
    def _work(self) -> None:
        active: dict[str, _Run] = {}
        writable = None
        due = None                  # when what has queued up since the last append is written
        last_flush_s = 0.0          # how long the last timed append took
        while True:
            try:
                run, name, doc = self._queue.get(
                    timeout=None if due is None else max(0.0, due - time.monotonic()))
            except queue.Empty:
                t0 = time.monotonic()
                self._flush(active)
                last_flush_s, due = time.monotonic() - t0, None
                continue
            if name == "_flush":
                self._flush(active)
                due = None
                doc.set()
                continue
            try:
                if run.error is None:
                    if name == "start":
                        if writable is None:
                            writable = self.catalog.include_data_sources()
                        run.pipe = RunPipe(writable)
                        active[run.uid] = run
                    run.tally.add(name, doc)
                    run.pipe(name, doc)
                    if name == "stop":
                        self._verify(run)
                    elif name in ("event", "event_page", "stream_datum") and due is None:
                        # A live reader sees rows FLUSH_INTERVAL_S late (more when the server
                        # is slow: the appends, each a request and SQL work on the server, take
                        # at most WRITE_SHARE of the time and so of a shared machine's CPU).
                        # The first goes at once: it creates the table while the scan runs.
                        wait = max(FLUSH_INTERVAL_S, last_flush_s / WRITE_SHARE)
                        due = time.monotonic() + (wait if run.pipe.writer.has_tables else 0.0)
            except Exception as exc:  # keep the worker alive: later runs must still be written
                log.warning("run %s: writing a %s document to tiled failed (%s); the run is "
                            "kept in the journal", run.uid, name, exc)
                run.error = exc
            finally:
                if name == "stop":
                    active.pop(run.uid, None)
                    if run.error is not None:
                        self._rewrite_from_journal(run)
                    if run.error is None:
                        run.journal.discard()
                    else:
                        run.journal.close()
                    run.done.set()
                    if run.pipe is not None:
                        run.pipe.writer.close_streams_later()

    def _flush(self, active: dict[str, _Run]) -> None:
        for run in list(active.values()):
            if run.error is None:
                try:
                    run.pipe.flush()
                except Exception as exc:
                    log.warning("run %s: writing to tiled failed (%s); the run is kept in the "
                                "journal", run.uid, exc)
                    run.error = exc

    def _rewrite_from_journal(self, run: _Run) -> None:
        """A write failed during the run (the server refused or dropped a request): the journal
        holds the whole run, so store it from there, exactly once. If that fails too, the run
        stays in the journal for replay."""
        log.warning("run %s: rewriting it from the journal after %s", run.uid, run.error)
        try:
            self.checks[run.uid] = store_exactly_once(self.catalog, run.journal.documents())
        except Exception as exc:
            log.warning("run %s: rewriting it from the journal failed too (%s)", run.uid, exc)
            return
        run.pipe, run.error = None, None      # its streams were closed by the rewrite

    def _verify(self, run: _Run) -> None:
        # The stop document is stored (the writer's stop returned); the rows are read back
        # through the tables the writer appended to.
        stored = run.pipe.writer.stored
        check = compare_stored(run.uid, run.tally, lambda stream: stored.get(stream, []), True)
        if not check.ok:
            log.warning("run %s: tiled holds other rows than were emitted (%s); rewriting it from "
                        "the journal", run.uid, check.summary())
            check = store_exactly_once(self.catalog, run.journal.documents())
        self.checks[run.uid] = check
        while len(self.checks) > 100:
            self.checks.pop(next(iter(self.checks)))


def journaled_runs(directory: Path) -> int:
    """How many runs wait in the journal (for messages)."""
    return len(pending(directory))


__all__ = ["TiledPersister", "PersistenceError", "replay", "check_stored", "RunTally",
           "store_exactly_once", "read_journal", "REPLAY_COMMAND"]
