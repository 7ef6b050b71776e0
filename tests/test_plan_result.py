"""A plan's result in JSON form, as the queue server's users read it (plans/plan_result.py)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from bluesky import RunEngine

from calbench.plans.plan_result import MAX_LIST, RESULT_PLAN_NAME, record_result, result_json


@dataclass
class _Entry:
    channel: int
    dt_ns: float
    uids: list


class _WithDict:
    def as_dict(self):
        return {"csink": "csink 0 4 1 2 3", "fit_uid": "u2", "run_uids": ["u1", "u2"]}


def test_values_become_json_and_nothing_is_lost_silently():
    value = {"files": [Path("/a/b.sn058")], "dt": np.float64(1.5), "n": np.int32(3),
             "bad": math.nan, "map": np.zeros((512, 1024)), "few": np.arange(3),
             "entries": [_Entry(1, math.inf, ["u"])], "obj": object}
    out = result_json(value)
    json.dumps(out, allow_nan=False)
    assert out["files"] == ["/a/b.sn058"] and out["dt"] == 1.5 and out["n"] == 3
    assert out["bad"] is None and out["few"] == [0, 1, 2]
    assert out["map"] == "<float64 array of shape [512, 1024]>"
    assert out["entries"] == [{"channel": 1, "dt_ns": None, "uids": ["u"]}]
    assert out["obj"] == repr(object)
    assert result_json(list(range(MAX_LIST + 1))) == f"<{MAX_LIST + 1} values>"


def test_the_result_run_holds_the_value_and_names_its_runs():
    RE = RunEngine({}, call_returns_result=True)
    starts = []
    RE.subscribe(lambda name, doc: starts.append(doc) if name == "start" else None)
    RE(record_result("calibrate_sink", _WithDict()))
    (start,) = starts
    assert start["plan_name"] == RESULT_PLAN_NAME and start["result_of"] == "calibrate_sink"
    assert start["result"]["csink"] == "csink 0 4 1 2 3"
    assert start["parent_uids"] == ["u2", "u1"]
    starts.clear()
    RE(record_result("count", None))
    assert starts == []
