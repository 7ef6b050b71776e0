"""Every document stored exactly once whatever fails: a RunEngine killed with SIGKILL mid-run, the
tiled server killed mid-run (past the stop timeout), and 2 and 4 sessions of one lab home writing at
once; on the embedded default and on tiled over a real PostgreSQL server. Each test prints events
emitted, stored, duplicated and lost (pytest -s shows them)."""
from __future__ import annotations

import signal

import pytest

from persist_support import STOP_TIMEOUT_S, EmbeddedStore, PostgresStore, count_run, read_until

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def postgres():
    from pg_support import Postgres
    with Postgres() as pg:
        yield pg


@pytest.fixture(params=["embedded", "postgresql"])
def store(request, tmp_path):
    home = tmp_path / "lab"
    home.mkdir()
    if request.param == "embedded":
        s = EmbeddedStore(home)
    else:
        s = PostgresStore(home, request.getfixturevalue("postgres"))
    s.start_server()
    yield s
    s.close()


def emitted_of(lines: list[str]) -> int:
    return max((int(line.split()[1]) for line in lines if line.startswith("EMITTED")), default=0)


def test_a_killed_session_is_completed_from_the_journal_at_the_next_start(store):
    session = store.session(events=400, delay_s=0.01)
    lines = read_until(session, lambda line: line == "EMITTED 40")
    session.send_signal(signal.SIGKILL)
    session.wait(30)
    (journal,) = store.journaled()
    uid = journal.stem
    journaled = journal.read_text().count('"name":"event"')
    assert journaled >= emitted_of(lines) == 40          # write-ahead: nothing emitted is missing

    nxt = store.session(events=3, delay_s=0)          # the next session start replays the journal
    out, err = nxt.communicate(timeout=300)
    assert nxt.returncode == 0, out[-2000:] + err[-3000:]
    assert f"journal -> tiled: run {uid} ({journaled} events): interrupted, stored" in out
    assert store.journaled() == []

    catalog = store.catalog()
    count = count_run(catalog, uid, journaled)
    print(f"\n[{store.kind}] " + count.line("kill -9 of the RunEngine at event 40"))
    assert (count.stored, count.duplicated, count.lost) == (journaled, 0, 0)
    stop = catalog[uid].metadata["stop"]
    assert stop["exit_status"] == "abort" and "interrupted" in stop["reason"]
    assert stop["num_events"] == {"primary": journaled}
    assert "no run waits" in store.cli("tiled", "replay").stdout      # exactly once: nothing left


def test_a_store_outage_is_reported_at_stop_and_replayed_once(store):
    session = store.session(events=60, delay_s=0.02)
    read_until(session, lambda line: line == "EMITTED 10")
    store.kill_server()
    out, err = session.communicate(timeout=300)
    # The RunEngine waited at most the stop timeout, then finished into the journal, one message.
    assert session.returncode == 3, out[-2000:] + err[-3000:]
    (message,) = [line for line in out.splitlines() if line.startswith("NOT_STORED")]
    assert "calbench tiled replay" in message and "journal" in message
    (journal,) = store.journaled()
    assert str(journal) in message

    store.start_server()
    replayed = store.cli("tiled", "replay")
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert f"run {journal.stem} (60 events): stored" in replayed.stdout
    count = count_run(store.catalog(), journal.stem, 60)
    print(f"\n[{store.kind}] " + count.line(f"tiled killed at event 10 (> {STOP_TIMEOUT_S} s)"))
    assert (count.stored, count.duplicated, count.lost, count.exit_status) == (60, 0, 0, "success")
    assert store.journaled() == []


@pytest.mark.parametrize("sessions", [2, 4])
def test_concurrent_sessions_of_one_lab_home_store_every_event_once(store, sessions):
    events = 100
    procs = [store.session(events=events, delay_s=0.005) for _ in range(sessions)]
    outputs = [p.communicate(timeout=400) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, out[-2000:] + err[-3000:]
    runs = [line.split()[1:] for out, _ in outputs for line in out.splitlines()
            if line.startswith("RUN ")]
    assert len(runs) == sessions
    assert len({scan_id for _, scan_id in runs}) == sessions       # scan ids never repeat
    catalog = store.catalog()
    counts = [count_run(catalog, uid, events) for uid, _ in runs]
    for i, c in enumerate(counts):
        print(f"\n[{store.kind}] " + c.line(f"{sessions} concurrent sessions, #{i + 1}"), end="")
    retried = sum(err.count("checking what the server kept") for _, err in outputs)
    print(f"\n[{store.kind}] appends retried after a server error: {retried}")
    assert [(c.stored, c.duplicated, c.lost, c.exit_status) for c in counts] == (
        [(events, 0, 0, "success")] * sessions)
    assert store.journaled() == []
