"""The embedded tiled server: persistent across restarts, key file private, dead server reported."""
from __future__ import annotations

import stat

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
    for name in ("api_key", "catalog.db", "tables.sqlite", "server.log"):
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
