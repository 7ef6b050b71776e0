"""The embedded tiled server: persistent across restarts, key file private, dead server reported."""
from __future__ import annotations

import stat

import pytest
from bluesky import RunEngine
from bluesky.plans import count
from ophyd.sim import SynSignal

from calbench.persistence import TiledPersister
from calbench.tiled_service import TiledUnavailable, runs_catalog, start_embedded, stop_embedded

from conftest import free_port


def test_runs_survive_a_server_restart(tmp_path):
    directory, port = tmp_path / "tiled", free_port()
    endpoint, proc = start_embedded(directory, [tmp_path / "data"], port)
    try:
        RE = RunEngine({})
        RE.subscribe(TiledPersister(runs_catalog(endpoint), backup_directory=tmp_path / "backup"))
        det = SynSignal(func=lambda: 42.0, name="det")
        (uid,) = RE(count([det], num=3), sample="restart")
    finally:
        assert stop_embedded(directory)
    assert stat.S_IMODE((directory / "api_key").stat().st_mode) == 0o600
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


def test_a_dead_server_fails_the_run_loudly_and_keeps_its_documents(tmp_path):
    directory = tmp_path / "tiled"
    endpoint, proc = start_embedded(directory, [tmp_path / "data"], free_port())
    catalog = runs_catalog(endpoint)
    RE = RunEngine({})
    persister = TiledPersister(catalog, backup_directory=tmp_path / "backup")
    RE.subscribe(persister)
    stop_embedded(directory)
    det = SynSignal(func=lambda: 1.0, name="det")
    from calbench.persistence import PersistenceError
    with pytest.raises(PersistenceError, match="could not be written to tiled"):
        RE(count([det], num=2))
    backups = list((tmp_path / "backup").glob("*.jsonl"))
    assert backups and '"stop"' in backups[0].read_text()
