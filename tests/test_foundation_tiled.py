"""The embedded tiled server: persistent across restarts, key file private, dead server reported."""
from __future__ import annotations

import stat

import pyarrow

import pytest
from bluesky import RunEngine
from bluesky.plans import count
from ophyd.sim import SynSignal

from calbench.journal import read_journal
from calbench.persistence import PersistenceError, TiledPersister
from calbench.tiled_service import TiledUnavailable, runs_catalog, start_embedded, stop_embedded

from conftest import free_port


def test_runs_survive_a_server_restart(tmp_path):
    directory, port = tmp_path / "tiled", free_port()
    endpoint, proc = start_embedded(directory, [tmp_path / "data"], port)
    try:
        RE = RunEngine({})
        RE.subscribe(TiledPersister(runs_catalog(endpoint), journal_directory=tmp_path / "journal"))
        det = SynSignal(func=lambda: 42.0, name="det")
        (uid,) = RE(count([det], num=3), sample="restart")
    finally:
        assert stop_embedded(directory)
    for name in ("api_key", "catalog.db", "tables.duckdb", "server.log"):
        assert stat.S_IMODE((directory / name).stat().st_mode) == 0o600, name
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert endpoint.api_key not in (directory / "server.log").read_text()
    with pytest.raises(TiledUnavailable, match="cannot reach tiled"):
        runs_catalog(endpoint)
    endpoint2, proc2 = start_embedded(directory, [tmp_path / "data"], port)
    try:
        assert endpoint2.api_key == endpoint.api_key
        run = runs_catalog(endpoint2)[uid]
        assert list(run["primary"].read()["det"].values) == [42.0, 42.0, 42.0]
        assert run.start["sample"] == "restart"
    finally:
        stop_embedded(directory)


def test_a_dead_server_is_reported_at_stop_and_the_run_kept_in_the_journal(tmp_path):
    directory = tmp_path / "tiled"
    endpoint, proc = start_embedded(directory, [tmp_path / "data"], free_port())
    catalog = runs_catalog(endpoint)
    RE = RunEngine({})
    RE.subscribe(TiledPersister(catalog, journal_directory=tmp_path / "journal", stop_timeout_s=5))
    stop_embedded(directory)
    det = SynSignal(func=lambda: 1.0, name="det")
    with pytest.raises(PersistenceError, match="calbench tiled replay") as err:
        RE(count([det], num=2), limits=b"\x00\xff")       # bytes, as the 34401A's limits
    (journal,) = (tmp_path / "journal").glob("*.jsonl")
    assert str(journal) in str(err.value)
    docs = read_journal(journal)
    assert [name for name, _ in docs] == ["start", "descriptor", "event", "event", "stop"]
    assert docs[0][1]["limits"] == b"\x00\xff"


def test_a_row_stored_twice_is_found_at_stop_and_the_run_rewritten_from_the_journal(
        RE, tiled_server, caplog):
    """A second client appends a copy of a stored row mid-run (as a retried append the server had
    already taken would): the check at stop sees it and rewrites the run from its journal."""
    other = runs_catalog(tiled_server, RE.catalog.item["id"])
    det = SynSignal(func=lambda: 7.0, name="det")
    started = {}

    def duplicate_a_row(name, doc):
        if doc["seq_num"] == 3:
            RE.persister.flush()                  # rows 1..3 are in tiled now
            table = other[started["uid"]]["primary"].base["internal"]
            row = pyarrow.Table.from_pandas(table.read().iloc[:1], preserve_index=False)
            table.append_partition(0, row.cast(table.structure().arrow_schema_decoded))

    RE.subscribe(lambda name, doc: started.update(doc), "start")
    RE.subscribe(duplicate_a_row, "event")
    with caplog.at_level("WARNING", logger="calbench.persistence"):
        (uid,) = RE(count([det], num=6))
    assert "duplicated 1" in caplog.text and "rewriting it from the journal" in caplog.text
    check = RE.persister.checks[uid]
    assert (check.stored, check.duplicated, check.lost) == ({"primary": 6}, {"primary": 0},
                                                           {"primary": 0})
    rows = RE.catalog[uid]["primary"].base["internal"].read()
    assert sorted(rows["seq_num"]) == [1, 2, 3, 4, 5, 6]
    assert RE.catalog[uid].metadata["stop"]["exit_status"] == "success"
