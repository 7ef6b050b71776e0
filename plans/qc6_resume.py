"""Resuming an interrupted long_stability test from its runs in tiled: elapsed hold, trips so far."""
from __future__ import annotations

from calbench.devices.caen import GemLayer
from calbench.plans.qc6_steps import Qc6Error


def long_stability_state(catalog, uid: str | None = None) -> dict:
    """What a resumption needs from an interrupted long_stability run in tiled: uid, parameters,
    elapsed hold (world s), trips so far and the result file. The last such run by default."""
    from tiled.queries import Key
    if uid is None:
        runs = catalog.search(Key("qc6_test") == "long_stability")
        if len(runs) == 0:
            raise Qc6Error("no long_stability run in the catalog to resume")
        uid = max(runs.items(), key=lambda kv: kv[1].metadata["start"]["time"])[0]
    run = catalog[uid]
    start, stop = run.metadata["start"], run.metadata.get("stop")
    if stop and stop.get("exit_status") == "success" and not start.get("resumable_after_success"):
        raise Qc6Error(f"long_stability run {uid[:8]} ended normally ({stop.get('reason') or 'done'});"
                       " nothing to resume")
    elapsed, trips = float(start.get("elapsed_before_s", 0.0)), int(start.get("trips_before", 0))
    streams = set(run)
    if "progress" in streams:
        prog = run["progress"].base["internal"].read()
        if len(prog):
            elapsed = max(elapsed, float(prog["qc6_elapsed_s"].max()))
            trips = max(trips, int(prog["qc6_trips"].max()))
    if "trips" in streams:
        tr = run["trips"].base["internal"].read()
        if len(tr):
            trips = max(trips, int(tr["trip_incident"].max()))
    return {"resumed_from": uid, "elapsed_before_s": elapsed, "trips_before": trips,
            "qc6_params": dict(start.get("qc6_params", {})),
            "qc6_files": dict(start.get("qc6_files", {})), "layer": start.get("layer"),
            "results_dir": start.get("results_dir")}


def resume_long_stability(layer: GemLayer, catalog, uid: str | None = None, **overrides):
    """Resume an interrupted long_stability from tiled: ramps up again, then holds the foils for the
    rest of the hold time, counting on from the trips already made, appending to the same result
    file. `overrides` change parameters (e.g. hold_h)."""
    state = long_stability_state(catalog, uid)
    if state["layer"] not in (None, layer.layer):
        raise Qc6Error(f"run {state['resumed_from'][:8]} tested layer {state['layer']}, not "
                       f"layer {layer.layer}: pass the matching GemLayer")
    params = {**state["qc6_params"], **overrides}
    print(f"QC6: resuming long stability {state['resumed_from'][:8]} after "
          f"{state['elapsed_before_s'] / 3600:.2f} h and {state['trips_before']} trips")
    from calbench.plans.qc6 import long_stability    # the procedure imports this module
    return (yield from long_stability(layer, **params, results_dir=state["results_dir"],
                                      _resume=state))

