"""Every document stored exactly once whatever fails, on the embedded default and on tiled over a
real PostgreSQL server: a RunEngine killed with SIGKILL mid-run (the next sessions, two starting at
once, complete it from the journal), the tiled server killed mid-run past the stop timeout, and 2
and 4 sessions of one lab home writing at once. Each test prints events emitted, stored,
duplicated and lost per run (pytest -s shows them)."""
from __future__ import annotations

import signal

import pytest

from persist_support import STOP_TIMEOUT_S, EmbeddedStore, PostgresStore, count_run, read_until

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def postgres():
    from pg_support import Postgres
    with Postgres() as pg:
        yield pg


@pytest.fixture(scope="module", params=["embedded", "postgresql"])
def store(request, tmp_path_factory):
    """One lab home and its running tiled server per backend, shared by the tests below."""
    home = tmp_path_factory.mktemp(f"lab-{request.param}")
    if request.param == "embedded":
        s = EmbeddedStore(home)
    else:
        s = PostgresStore(home, request.getfixturevalue("postgres"))
    s.start_server()
    yield s
    s.close()


def sessions_at_once(store, n: int, events: int) -> list[tuple[str, str, str]]:
    """Run n sessions of one lab home at once; (uid, scan_id, stdout) of each run."""
    procs = [store.session(events=events, delay_s=0.005) for _ in range(n)]
    outputs = [p.communicate(timeout=600) for p in procs]
    runs = []
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, out[-2000:] + err[-3000:]
        (line,) = [line for line in out.splitlines() if line.startswith("RUN ")]
        runs.append((*line.split()[1:], out))
    retried = sum(err.count("checking what the server kept") for _, err in outputs)
    print(f"\n[{store.kind}] {n} sessions at once: appends retried after a server error: {retried}")
    return runs


def check_concurrent(store, runs, events: int) -> None:
    assert len({scan_id for _, scan_id, _ in runs}) == len(runs)      # scan ids never repeat
    catalog = store.catalog()
    counts = [count_run(catalog, uid, events) for uid, _, _ in runs]
    for i, c in enumerate(counts):
        print(f"[{store.kind}] " + c.line(f"{len(runs)} concurrent sessions, #{i + 1}"))
    assert [(c.stored, c.duplicated, c.lost, c.exit_status) for c in counts] == (
        [(events, 0, 0, "success")] * len(runs))
    assert store.journaled() == []


def test_a_killed_session_is_completed_once_by_the_next_two_starting_at_once(store):
    session = store.session(events=400, delay_s=0.01)
    lines = read_until(session, lambda line: line == "EMITTED 20")
    session.send_signal(signal.SIGKILL)
    session.wait(30)
    (journal,) = store.journaled()
    uid = journal.stem
    journaled = journal.read_text().count('"name":"event"')
    assert journaled >= max(int(line.split()[1]) for line in lines if line.startswith("EMITTED"))

    # Both new sessions look at the journal as they start; exactly one stores the killed run.
    runs = sessions_at_once(store, 2, events=60)
    replayed = [out for _, _, out in runs
                if f"journal -> tiled: run {uid} ({journaled} events): interrupted, stored" in out]
    assert len(replayed) == 1, [out[:2000] for _, _, out in runs]

    catalog = store.catalog()
    count = count_run(catalog, uid, journaled)
    print(f"[{store.kind}] " + count.line("kill -9 of the RunEngine at event 20"))
    assert (count.stored, count.duplicated, count.lost) == (journaled, 0, 0)
    stop = catalog[uid].metadata["stop"]
    assert stop["exit_status"] == "abort" and "interrupted" in stop["reason"]
    assert stop["num_events"] == {"primary": journaled}
    check_concurrent(store, runs, 60)                     # ... and the journal is empty


def test_a_store_outage_is_reported_at_stop_and_replayed_once(store):
    session = store.session(events=60, delay_s=0.02, stop_timeout_s=STOP_TIMEOUT_S)
    read_until(session, lambda line: line == "EMITTED 10")
    store.kill_server()
    out, err = session.communicate(timeout=300)
    # The RunEngine waited at most the stop timeout, then finished into the journal, one message.
    assert session.returncode == 3, out[-2000:] + err[-3000:]
    (message,) = [line for line in out.splitlines() if line.startswith("NOT_STORED")]
    assert "calbench tiled replay" in message
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


def test_four_sessions_of_one_lab_home_store_every_event_once(store):
    check_concurrent(store, sessions_at_once(store, 4, events=100), 100)
    scan_ids = [run.metadata["start"]["scan_id"] for run in store.catalog().values()]
    assert len(scan_ids) == len(set(scan_ids))             # in the whole catalog, too
