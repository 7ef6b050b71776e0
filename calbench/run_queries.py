"""Finding runs in the catalog by the names the lab uses.

Every run carries `plan_name` (the step that measured: "vrf_scan", "stress_test",
"collect_sink_calibration", "transit_time_calibration"; derived runs the analysis that made them:
"vrf_scan_analysis", "fit_sink", "fit_transit_time", "calibrate_eiger" for an EIGER summary),
`procedure` and `step`. A derived run names its source in `parent_uid`; its source finds it with
`derived_runs(cat, uid)`.
"""
from __future__ import annotations

from tiled.queries import Key


def runs_named(catalog, plan_name: str):
    """Runs whose plan_name is `plan_name`, oldest first (index [-1] is the latest)."""
    return catalog.search(Key("plan_name") == plan_name)


def last_run(catalog, plan_name: str):
    """The latest run of `plan_name`; LookupError naming what the catalog holds if none."""
    found = runs_named(catalog, plan_name)
    if len(found) == 0:
        raise LookupError(f"no run with plan_name {plan_name!r} in the catalog; run the plan, or "
                          "list what is there with sorted({r.metadata['start'].get('plan_name') "
                          "for r in cat.values()})")
    return found[-1]


def derived_runs(catalog, uid: str) -> list:
    """The derived runs (fits, summaries) made from run `uid`, oldest first."""
    return list(catalog.search(Key("parent_uid") == uid).values())


def parent_run(catalog, run):
    """The run a derived run was made from (None for a raw run)."""
    parent = run.metadata["start"].get("parent_uid")
    return catalog[parent] if parent else None
