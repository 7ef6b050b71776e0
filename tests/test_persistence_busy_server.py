"""A tiled server that answers errors for a while (busy with other sessions' appends) loses and
duplicates nothing: appends it carried out but whose answer was lost, appends it refused, and
read-backs of the stored rows it refused for longer than the writer retries them. Real tiled
server (the embedded default) behind a proxy that injects the errors (tests/faulty_http_proxy.py)."""
from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import tiled.client.utils
from bluesky import RunEngine
from bluesky.plans import count
from ophyd.sim import det

from calbench.iocs.server import free_port
from calbench.persistence import READ_BACK_RETRIES, TiledPersister
from calbench.tiled_service import runs_catalog, start_embedded
from faulty_http_proxy import FaultyProxy
from persist_support import count_run

EVENTS = 60


@pytest.fixture(scope="module")
def tiled_server(tmp_path_factory):
    endpoint, proc = start_embedded(tmp_path_factory.mktemp("tiled"), [], free_port())
    yield endpoint
    if proc is not None:
        proc.terminate()
        proc.wait(30)


def run_through(proxy_endpoint, direct_endpoint, journal):
    persister = TiledPersister(runs_catalog(proxy_endpoint), journal_directory=journal)
    RE = RunEngine({})
    RE.subscribe(persister)
    (uid,) = RE(count([det], num=EVENTS, delay=0.01))
    return count_run(runs_catalog(direct_endpoint), uid, EVENTS), persister.checks[uid]


def test_appends_carried_out_whose_answer_was_lost_are_not_repeated(tiled_server, tmp_path,
                                                                    caplog):
    with FaultyProxy(tiled_server.uri) as proxy:
        lost = proxy.fail("PATCH", "/table/partition/", times=3, reply_lost=True)
        stored, check = run_through(replace(tiled_server, uri=proxy.uri), tiled_server,
                                    tmp_path / "journal")
    assert lost.done >= 1          # the appends coalesce while the retry waits
    assert (stored.stored, stored.duplicated, stored.lost, stored.exit_status) == (
        EVENTS, 0, 0, "success")
    assert check.ok and list((tmp_path / "journal").glob("*.jsonl")) == []
    assert "checking what the server kept" in caplog.text


def test_read_backs_refused_past_every_retry_end_in_a_rewrite_from_the_journal(
        tiled_server, tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.WARNING, logger="calbench.persistence")
    # tiled's client retries each request itself (10 times by default): once here, so that the
    # refusals below outlast exactly the writer's own read-back retries
    monkeypatch.setattr(tiled.client.utils, "TILED_RETRY_ATTEMPTS", 1)
    with FaultyProxy(tiled_server.uri) as proxy:
        refused = proxy.fail("PATCH", "/table/partition/", times=1)
        # every read-back the writer tries: only the journal can complete the run
        reads = proxy.fail("GET", "/table/partition/", times=READ_BACK_RETRIES)
        stored, check = run_through(replace(tiled_server, uri=proxy.uri), tiled_server,
                                    tmp_path / "journal")
    assert (refused.done, reads.done) == (1, READ_BACK_RETRIES)
    assert (stored.stored, stored.duplicated, stored.lost, stored.exit_status) == (
        EVENTS, 0, 0, "success")
    assert check.ok and list((tmp_path / "journal").glob("*.jsonl")) == []
    assert "rewriting it from the journal after" in caplog.text
