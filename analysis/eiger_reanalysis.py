"""Re-analysis of a finished EIGER calibration from tiled alone.

``reanalyse_calibration(catalog, uid)`` takes the uid of any run of a calibration (typically its
summary run, which `calibrate_eiger` returns as ``summary_uid``), finds every scan of that
calibration (start.calibration_id), reads their settings and frames back from tiled, and runs the
same analysis the plans ran live (analysis/eiger_callbacks.py ``analyse_step``) in the same order:
vrf scan, untrimmed S-curve, trimbit scan, trimmed S-curve, second line, energy calibration. It
then compares every decision with the one stored in the derived runs: the numbers are identical
when the stored data are intact (``Reanalysis.differences`` is empty).

Takes a tiled client container (CatalogOfBlueskyRuns); no ophyd, RunEngine or caproto.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from calbench.analysis.eiger_calibration import CalibrationError, CalibrationResults
from calbench.analysis.eiger_callbacks import ScanData, analyse_step
from calbench.contracts.eiger_geometry import geometry as eiger_geometry

__all__ = ["PROCEDURE", "ANALYSIS_PROCEDURE", "Reanalysis", "reanalyse_calibration",
           "scan_data", "calibration_runs"]

PROCEDURE = "eiger_calibration"
ANALYSIS_PROCEDURE = "eiger_calibration_analysis"


@dataclass
class Reanalysis:
    """Recomputed results, the scans they came from (uids in procedure order), and the
    differences from the decisions stored in the derived runs (empty: identical)."""
    calibration_id: str
    results: CalibrationResults
    scan_uids: list[str]
    differences: list[str] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return not self.differences

    def __repr__(self) -> str:
        """One screen: what was recomputed and whether it matches; the numbers are in .results."""
        verdict = ("identical to the decisions stored in its derived runs" if self.identical else
                   f"{len(self.differences)} difference(s) from the stored decisions:\n  "
                   + "\n  ".join(self.differences[:10]))
        lines = [f"Reanalysis of EIGER calibration {self.calibration_id} from "
                 f"{len(self.scan_uids)} scans: {verdict}"]
        for key, value in self.results.summary().items():
            text = repr(value)
            lines.append(f"  {key}: {text if len(text) <= 90 else text[:87] + '...'}")
        return "\n".join(lines[:24])


def _start(run) -> dict:
    return dict(run.metadata["start"])


def _stop(run) -> dict:
    return dict(run.metadata.get("stop") or {})


def calibration_runs(catalog, uid: str) -> tuple[str, list, list]:
    """(calibration_id, scans, derived runs) of the calibration that run ``uid`` belongs to,
    each list in time order."""
    try:
        start = _start(catalog[uid])
    except KeyError:
        raise CalibrationError(f"run {uid} is not in this catalog; give the uid of a run of the "
                               "calibration (calibrate_eiger returns summary_uid)") from None
    cid = start.get("calibration_id")
    if not cid or start.get("procedure") not in (PROCEDURE, ANALYSIS_PROCEDURE):
        raise CalibrationError(f"run {uid} is not part of an EIGER calibration "
                               f"(procedure {start.get('procedure')!r})")
    from tiled.queries import Key
    found = catalog.search(Key("start.calibration_id") == cid)
    runs = sorted((found[k] for k in found), key=lambda r: _start(r)["time"])
    scans = [r for r in runs if _start(r).get("procedure") == PROCEDURE]
    derived = [r for r in runs if _start(r).get("procedure") == ANALYSIS_PROCEDURE]
    return cid, scans, derived


def scan_data(run) -> ScanData:
    """Settings and frames of a stored calibration scan, as the live analysis saw them."""
    start = _start(run)
    stream = run["primary"]
    x = np.asarray(stream[start["x_key"]].read(), dtype=np.float64)
    frames = np.asarray(stream[start["image_key"]].read())
    return ScanData(start, x, frames)


def _stored(derived_run, key: str) -> np.ndarray:
    value = np.asarray(derived_run["results"][key].read())
    return value[0] if value.ndim and value.shape[0] == 1 else value


def _compare(differences: list[str], what: str, recomputed, stored) -> None:
    """Note in ``differences`` where ``recomputed`` and ``stored`` are not identical (NaN = NaN)."""
    a, b = np.asarray(recomputed), np.asarray(stored)
    if a.shape != b.shape:
        differences.append(f"{what}: shape {a.shape} recomputed vs {b.shape} stored")
        return
    if a.dtype.kind in "fc" or b.dtype.kind in "fc":
        fa, fb = a.astype(np.float64), b.astype(np.float64)
        differ = ~((fa == fb) | (np.isnan(fa) & np.isnan(fb)))
    else:
        differ = a != b
    n = int(np.count_nonzero(differ))
    if n:
        i = int(np.flatnonzero(np.ravel(differ))[0])
        differences.append(f"{what}: {n} of {a.size} values differ (e.g. {a.ravel()[i]!r} "
                           f"recomputed, {b.ravel()[i]!r} stored)")


def reanalyse_calibration(catalog, uid: str) -> Reanalysis:
    """Recompute every decision of the calibration run ``uid`` belongs to from tiled alone and
    compare them with the stored derived runs (see the module docstring)."""
    cid, scans, derived = calibration_runs(catalog, uid)
    summaries = [r for r in derived if _start(r).get("step") == "summary"]
    if summaries:
        order = list(_start(summaries[-1]).get("parent_uids") or [])
        by_uid = {_start(r)["uid"]: r for r in scans}
        missing = [u for u in order if u not in by_uid]
        if missing:
            raise CalibrationError(f"calibration {cid}: scan(s) {', '.join(missing)} of its "
                                   "summary are not in this catalog")
        scans = [by_uid[u] for u in order]
    else:
        scans = [r for r in scans if _stop(r).get("exit_status") == "success"]
    if not scans:
        raise CalibrationError(f"calibration {cid} has no complete scan to re-analyse")
    derived_of = {_start(r).get("parent_uid"): r for r in derived
                  if _start(r).get("step") != "summary"}
    first = _start(scans[0])
    results = CalibrationResults(first["det_id"], first["gain"], first["trim_target"],
                                 eiger_geometry(first["geometry"]))
    differences: list[str] = []
    for run in scans:
        start = _start(run)
        step, run_id, target = start["step"], int(start.get("run_id", 0)), start["target"]
        out = analyse_step(scan_data(run), untrimmed=results.untrimmed)
        stored = derived_of.get(start["uid"])
        label = f"{step} {target} run {run_id} ({start['uid'][:8]})"
        if stored is None:
            differences.append(f"{label}: no derived run stores its decision")
        if step == "vrf_scan":
            results.vrf = out
            if stored is not None:
                _compare(differences, f"{label} vrf", out.vrf, _stored(stored, "vrf"))
                _compare(differences, f"{label} exposure", out.exptime_s,
                         _stored(stored, "exptime_s"))
        elif step == "scurve":
            result, chips = out
            if run_id == 0:              # kept as the plans keep it: the same dispersions
                results.untrimmed = result.kept(trimbit_targets=True)
            else:
                results.trimmed = result.kept()
                results.add_line(chips)
            if stored is not None:
                _compare(differences, f"{label} vcmp", result.vcmp, _stored(stored, "vcmp"))
                _compare(differences, f"{label} vcp", result.vcp, _stored(stored, "vcp"))
                _compare(differences, f"{label} mu", result.fit["mu"], _stored(stored, "mu"))
                _compare(differences, f"{label} bad pixels", result.bad.codes(),
                         _stored(stored, "bad"))
        elif step == "trimbit_scan":
            results.trimbits = out.kept()
            if stored is not None:
                _compare(differences, f"{label} trimbits", out.trimbits,
                         _stored(stored, "trimbits"))
        elif step == "line_scan":
            results.add_line(out)
            if stored is not None:
                _compare(differences, f"{label} chip inflections", out.mu,
                         _stored(stored, "chip_mu"))
    if results.lines and len(results.lines) >= 2:
        results.finish()
        if summaries:
            s = summaries[-1]
            _compare(differences, "energy calibration m", results.calibration.m, _stored(s, "m"))
            _compare(differences, "energy calibration k", results.calibration.k, _stored(s, "k"))
            if results.dispersion_trimmed is not None:
                _compare(differences, "trimmed dispersion", results.dispersion_trimmed.sigma_eV,
                         _stored(s, "dispersion_trimmed_eV"))
    return Reanalysis(cid, results, [_start(r)["uid"] for r in scans], differences)
