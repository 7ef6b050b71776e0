"""A plan's result where the queue server's users can read it: recorded as a run of its own.

bluesky-queueserver keeps, of a finished item, its exit status and the uids of the runs it opened;
the plan's return value (uids, files, key numbers: `SinkCalibration`, `EigerCalibration`,
`CableCalibration`, ...) stays in the worker. `record_result(plan_name, value)` opens one more run,
without events, whose start document holds that value in JSON form:

    plan_name  "plan_result"          result_of  the plan's name
    result     the value's as_dict() (else its dataclass fields, else the value), JSON-safe
    parent_uids  the run uids the result names

The run is one of the item's runs, so `calbench queue result [ITEM]` finds it from the history.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import PurePath

import bluesky.plan_stubs as bps
import numpy as np

__all__ = ["RESULT_PLAN_NAME", "result_json", "record_result"]

RESULT_PLAN_NAME = "plan_result"
MAX_LIST = 1000          # longer arrays are summarised (a start document is not a data store)


def result_json(value):
    """`value` as JSON values: as_dict() or dataclass fields, numpy as lists, paths as strings,
    non-finite numbers as None; lists longer than MAX_LIST become a one-line description."""
    if hasattr(value, "as_dict") and callable(value.as_dict):
        value = value.as_dict()
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): result_json(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        if value.size > MAX_LIST:
            return f"<{value.dtype} array of shape {list(value.shape)}>"
        value = value.tolist()
    if isinstance(value, (list, tuple, set)):
        items = list(value)
        if len(items) > MAX_LIST:
            return f"<{len(items)} values>"
        return [result_json(v) for v in items]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, PurePath):
        return str(value)
    return repr(value)


def _uids_in(value) -> list[str]:
    """Run uids a result names (keys ending in 'uid' or 'uids'), in order, once each."""
    found: list[str] = []

    def walk(v, key=""):
        if isinstance(v, dict):
            for k, item in v.items():
                walk(item, k)
        elif isinstance(v, list):
            for item in v:
                walk(item, key)
        elif isinstance(v, str) and key.endswith(("uid", "uids")) and v not in found:
            found.append(v)

    walk(value)
    return found


def record_result(plan_name: str, value):
    """Plan: a run holding `value` (see the module docstring); none when the plan returned
    nothing. Returns the run's uid."""
    if value is None:
        return None
    result = result_json(value)
    md = {"plan_name": RESULT_PLAN_NAME, "result_of": plan_name, "result": result,
          "parent_uids": _uids_in(result)}
    uid = yield from bps.open_run(md=md)
    yield from bps.close_run()
    return uid
