"""The run around a QC6 test: preflight, result-file names, metadata, callbacks, one run inside the
lease and the safety wrapper, and the one-screen summary at its end."""
from __future__ import annotations

import bluesky.plan_stubs as bps
from bluesky.preprocessors import subs_wrapper
from bluesky.utils import RunEngineControlException

from calbench.analysis.qc6_callbacks import Qc6LivePlot, Qc6ResultFiles
from calbench.analysis.qc6_files import result_path
from calbench.devices.caen import GemLayer
from calbench.plans.lease import under_lease
from calbench.plans.qc6_safety import _preflight, all_off, qc6_safety
from calbench.plans.qc6_steps import _last_look
from calbench.plans.toolkit import results_dir as _results_dir


# plan_name of each test's run: the plan the lab calls (cat.search(Key("plan_name") == "stress_test"))
_PLAN_NAMES = {"stress": "stress_test"}


def _base_md(layer: GemLayer, test: str, params: dict, md: dict | None) -> dict:
    return {"procedure": "qc6", "qc6_test": test, "step": test,
            "plan_name": _PLAN_NAMES.get(test, test), "plan_args": params,
            "detector_name": layer.detector_name,
            "layer": layer.layer, "slot": layer.slot, "crate_prefix": layer.prefix,
            "channels": [ch.channel for ch in layer.channels],
            "foil_channels": [ch.channel for ch in layer.foils],
            "qc6_params": params, **(md or {})}


def _run(plan, md: dict):
    """One run around `plan`, returning the plan's result; the stop document says how it ended
    (a failed QC verdict is a successful run whose reason starts with "Test Failed")."""
    yield from bps.open_run(md)
    try:
        result = yield from plan
    except GeneratorExit:
        raise
    except RunEngineControlException as exc:
        yield from bps.close_run(exit_status=exc.exit_status, reason=str(exc))
        raise
    except BaseException as exc:
        yield from bps.close_run(exit_status="fail", reason=f"{type(exc).__name__}: {exc}")
        raise
    passed = result.get("passed", True) if isinstance(result, dict) else True
    yield from bps.close_run(reason="passed" if passed else
                             "Test Failed: Max number of trips exceeded")
    return result


def _with_callbacks(plan, live_plot: bool, files: bool = True):
    subs = ([Qc6ResultFiles()] if files else []) + ([Qc6LivePlot()] if live_plot else [])
    return (yield from subs_wrapper(plan, subs))



def _summary(test: str, layer: GemLayer, result, files: dict) -> str:
    """One screen at the end of a QC6 test: verdict, trips and the result files."""
    lines = [f"QC6 {_PLAN_NAMES.get(test, test)} on {layer.detector_name} layer {layer.layer}: "
             + (("passed" if result.get("passed", True) else "FAILED")
                + f", {_trips(result)} trips"
                + (f", held {result['held_s'] / 3600:.2f} h" if result.get("held_s") else "")
                if isinstance(result, dict) else "done")]
    lines += [f"  {kind} file {path}" for kind, path in sorted(files.items())]
    lines.append(f"  runs: last_run(cat, {_PLAN_NAMES.get(test, test)!r})")
    return "\n".join(lines)


def _trips(result: dict) -> int:
    """Trips of a test's result (the stress test counts them per foil)."""
    if "foils" in result:
        return sum(int(v.get("trips", 0)) for v in result["foils"].values())
    return int(result.get("trips", 0))


def _verdict(trips: int, tripmax: int, phase: str, elapsed_s: float) -> dict:
    passed = trips < tripmax
    if not passed:
        print(f"QC6: Test Failed: Max number of trips exceeded ({trips} during the {phase})")
    return {"passed": passed, "trips": trips, "tripmax": tripmax, "phase": phase,
            "held_s": elapsed_s}


# -- the run around a procedure -------------------------------------------------------------------
def _qc6_run(layer: GemLayer, test: str, params: dict, body, kinds: set[str], results_dir,
             live_plot: bool, md: dict | None, files: dict | None = None):
    """Preflight, result-file names, metadata, callbacks, one run, and the safety wrapper."""
    def inner():
        session = yield from _preflight(layer)
        t0 = yield from session.now()
        rdir = _results_dir(results_dir)
        names = dict(files) if files else {k: str(result_path(rdir, layer.detector_name, k, t0))
                                           for k in sorted(kinds)}
        keys = {str(ch.channel): {"vmon": ch.vmon.name, "imon": ch.imon.name}
                for ch in layer.channels}
        run_md = _base_md(layer, test, params, {
            "qc6_files": names, "world_start": t0, "results_dir": str(rdir),
            "qc6_iv_channels": [ch.channel for ch in layer.channels],
            "qc6_channel_keys": keys, **(md or {})})

        def run_body():
            try:
                result = yield from body(session)
            except GeneratorExit:
                raise
            except BaseException:
                # off inside the run, so that a trip made just before is still recorded in it;
                # if that fails too, qc6_safety tries again and reports
                try:
                    yield from all_off(layer)
                    yield from _last_look(session, layer.channels)
                except RunEngineControlException:     # an abort or stop meanwhile: that wins
                    raise
                except Exception as exc:
                    print(f"QC6: switching off inside the run failed ({exc}); trying again")
                raise
            # switch off before the stop document: its callbacks (plots) must not keep HV on
            yield from all_off(layer)
            late = yield from _last_look(session, layer.channels)
            if late and isinstance(result, dict) and "trips" in result:
                result = _verdict(result["trips"] + late, result.get("tripmax", 0) or 10**9,
                                  result.get("phase", ""), result.get("held_s", 0.0))
            return result

        result = yield from _with_callbacks(_run(run_body(), run_md), live_plot)
        if session.dry:
            print(f"QC6 {_PLAN_NAMES.get(test, test)} on {layer.detector_name} layer "
                  f"{layer.layer}: dry run (outline above; nothing moved, no file written)")
        else:
            print(_summary(test, layer, result, names))
        return result

    # the lease outside the safety wrapper: released only once the layer is off
    return (yield from under_lease([layer], qc6_safety(layer, inner())))

