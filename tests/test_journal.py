"""The write-ahead journal: any document value round-trips, lines are whole, live runs are locked."""
from __future__ import annotations

import numpy as np
from hypothesis import given, strategies as st

from calbench.journal import RunJournal, dumps_line, pending, read_journal

values = st.recursive(st.none() | st.booleans() | st.integers() | st.text() | st.binary()
                      | st.floats(allow_nan=False),
                      lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=5), inner, max_size=4), max_leaves=12)


@given(values)
def test_any_value_round_trips_through_a_journal_line(tmp_path_factory, value):
    path = tmp_path_factory.mktemp("j") / "run.jsonl"
    path.write_bytes(dumps_line("start", {"uid": "u", "v": value}))
    assert read_journal(path) == [("start", {"uid": "u", "v": value})]


def test_numpy_and_bytes_values_of_an_instrument_are_journaled(tmp_path):
    journal = RunJournal(tmp_path, "u1")
    journal.append("start", {"uid": "u1", "limits": b"\x00+1.2E+00\xff", "gain": np.float32(2.5),
                             "shape": np.arange(3), "n": np.int64(7)})
    (name, doc), = read_journal(journal.path)
    assert doc == {"uid": "u1", "limits": b"\x00+1.2E+00\xff", "gain": 2.5, "shape": [0, 1, 2],
                   "n": 7}
    journal.close()


def test_a_torn_last_line_is_dropped_and_a_live_run_is_not_adopted(tmp_path):
    journal = RunJournal(tmp_path, "u2")
    journal.append("start", {"uid": "u2"})
    assert RunJournal.adopt(journal.path) is None          # its session holds the lock
    with open(journal.path, "ab") as fh:
        fh.write(b'{"name":"descriptor","doc":{"ui')        # the machine stopped mid-write
    journal.close()
    adopted = RunJournal.adopt(journal.path)
    assert adopted is not None and pending(tmp_path) == [journal.path]
    assert adopted.documents() == [("start", {"uid": "u2"})]
    adopted.discard()
    assert pending(tmp_path) == []
