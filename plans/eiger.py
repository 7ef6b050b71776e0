# Long by design: the steps of PSI's trimming share one calibration state (EigerCalibration) and its records.
"""EIGER trimming and energy calibration in the X-ray box as Bluesky plans (PSI's procedure).

Step by step at the prompt (the profile's ``det`` and ``box``), in the order of
reference/eiger.md section 1, or all at once:

    RE(tube_on(box))
    RE(setup_detector(det, target="Cu"))   # a new calibration: det_id, gain5, results directory
    RE(vrf_scan(det, box))                 # vrf per half module, exposure for ~1000 counts
    RE(scurve(det, box))                   # untrimmed S-curve (run 0): pixel fits, bad pixels,
                                           # vcmp per chip, vcp per half module
    RE(trimbit_scan(det, box))             # trimbits -> {det_id}_CuXRF_gain5.snNNN
    RE(load_trimbits(det))
    RE(verification_scurve(det, box))      # trimmed S-curve (run 1)
    RE(global_calibration(det, box))       # second XRF line (Ge for Cu): E(vcmp), files, report
    RE(calibrate_eiger(det, box, target="Cu"))     # all of the above

Every scan is a run in tiled whose start document says what it is (procedure "eiger_calibration",
calibration_id, step, det_id, gain, target, run_id, geometry, module serials, the scanned key). Its
analysis runs in a callback when the scan stops (analysis/eiger_callbacks.py: the same function
`reanalyse_calibration` runs on the stored run) and is recorded as a derived run (procedure
"eiger_calibration_analysis", ``parent_uid`` = the scan). The plan then applies the decision: vrf,
vcmp per chip and vcp, trimbits (through the trim files it writes). PSI's files go to
``{results_dir}/{det_id}/{gain}`` (analysis/eiger_files.py).

Every exposure goes through `xrf_exposure`, so the XRF shutter closes however a step ends. A step
that fails or is aborted puts back the detector settings it changed (DACs, trimbits, dynamic
range, exposure): the detector keeps its last good trim. The interrupted scan stays in tiled with
its stop document's exit_status ("fail" or "abort") and reason. Errors name the cause and the
remedy (`CalibrationStepError`).

Between steps the state lives in an `EigerCalibration` (``current_calibration(det)``), PSI's
``cfg.calibration`` plus what the steps decided.

Every plan reads the instruments through RunEngine messages, so ``summarize_plan(calibrate_eiger(det,
box))`` prints the whole procedure: in a dry run (reads answered by nothing) the calibration is a
nominal one (one 500k module, not made current) and each step takes the nominal decision (the
detector server's default vrf, vcmp and vcp, PSI's S-curve exposure); nothing is measured and no
file is written.
"""
from __future__ import annotations

import copy
import logging
import re
import uuid
from functools import partial
from dataclasses import dataclass, field, replace
from pathlib import Path

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import numpy as np
from bluesky.plans import list_scan
from bluesky.utils import RequestAbort, RequestStop

from calbench.analysis.eiger_calibration import (DEFAULTS, GLOBAL_TARGETS, CalibrationDefaults,
                                                 CalibrationResults, ChipInflections,
                                                 KeptSCurve, TrimbitResult, VrfScanResult,
                                                 default_gain, line_energy, vthreshold_for_gain)
from calbench.analysis.eiger_callbacks import ChipCurvesPlot, StepAnalysis, VrfScanPlot
from calbench.analysis.eiger_files import (fit_name, install_settings, report_name,
                                           save_calibration, save_fit, save_scan, save_trimbits,
                                           scurve_name, trim_prefix_name, trimbit_scan_name,
                                           trimbits_name, vrf_scan_name, write_calibration_text,
                                           write_trim_files)
from calbench.contracts.eiger_geometry import EigerGeometry
from calbench.contracts.eiger_geometry import geometry as eiger_geometry
from calbench.analysis.eiger_report import write_calibration_report
from calbench.contracts.trimfile import (DAC_DEFAULTS, DAC_NAMES, IODELAY_DEFAULT,
                                         serial_from_hostname)
from calbench.plans.derived_runs import record_results
from calbench.plans import eiger_scans
from calbench.plans.progress import point_progress
from calbench.plans.toolkit import is_dry_run, put, read_or_nominal, reason
from calbench.plans.toolkit import results_dir as toolkit_results_dir
from calbench.plans.xray import ShutterError, xrf_exposure

log = logging.getLogger(__name__)

__all__ = ["PROCEDURE", "ANALYSIS_PROCEDURE", "CalibrationStepError", "EigerCalibration",
           "current_calibration", "new_calibration", "setup_detector", "vrf_scan", "scurve",
           "trimbit_scan", "load_trimbits", "verification_scurve", "global_calibration",
           "calibrate_eiger"]

PROCEDURE = "eiger_calibration"
ANALYSIS_PROCEDURE = "eiger_calibration_analysis"
ANALYSIS_FUNCTION = "calbench.analysis.eiger_callbacks:analyse_step"
N_DAC_ROWS = len(DAC_NAMES) + 1          # 16 DACs + iodelay per half module
# The detector a dry run pretends to talk to (its reads are answered by nothing): one module.
DRY_RUN_GEOMETRY = "500k"
DRY_RUN_HOSTNAMES = "dryrun0+dryrun1"


class CalibrationStepError(RuntimeError):
    """A calibration step could not run or finish; the message names the cause and the remedy."""


# ---------------------------------------------------------------------------------------------
# State between the steps
# ---------------------------------------------------------------------------------------------

@dataclass
class EigerCalibration:
    """One calibration of one detector (det_id) at one gain with one trim target.

    Holds PSI's settings (``defaults``), the results directory, what the steps decided
    (``results``: analysis/eiger_calibration.py CalibrationResults), the uids of its runs and the
    files it wrote. ``exptime_s`` is the S-curve exposure (the vrf scan's suggestion)."""
    det_id: str
    gain: str
    target: str
    geometry: EigerGeometry
    hostnames: list[str]
    results_dir: Path
    settings_dir: Path | None = None
    defaults: CalibrationDefaults = DEFAULTS
    # trim-file serials as the detector reports them (its module ids); [] = from the hostnames
    module_serials: list[str] = field(default_factory=list)
    calibration_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    vthreshold: int = DEFAULTS.vthreshold
    exptime_s: float = DEFAULTS.exptime_s
    results: CalibrationResults | None = None
    runs: list[dict] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    trim_prefix: Path | None = None
    summary_uid: str | None = None
    dry_run: bool = False       # simulated (summarize_plan): nominal decisions, no files
    # scans run in the detector (its server's scan: one acquisition, a frame per point;
    # plans/eiger_scans.py); False: a Channel Access set, acquire and read per point, as PSI's
    # sls_detector_tools scripts loop in Python
    detector_scan: bool = True

    def __post_init__(self):
        self.results_dir = Path(self.results_dir)
        if self.results is None:
            self.results = CalibrationResults(self.det_id, self.gain, self.target, self.geometry)

    @property
    def out_dir(self) -> Path:
        """PSI's ``cfg.path.data``: {results_dir}/{det_id}/{gain}."""
        return self.results_dir / self.det_id / self.gain

    @property
    def serials(self) -> list[str]:
        """The .snNNN of each half module's trim and calibration files."""
        return list(self.module_serials) or [serial_from_hostname(h) for h in self.hostnames]

    @property
    def uids(self) -> list[str]:
        """Every run of this calibration (scans and derived runs), in order."""
        out = []
        for r in self.runs:
            out += [u for u in (r.get("uid"), r.get("derived_uid")) if u]
        return out + ([self.summary_uid] if self.summary_uid else [])

    def as_dict(self) -> dict:
        """JSON-able result (what the queue server reports)."""
        res = self.results
        disp = {name: float(getattr(getattr(res, name, None), "sigma_eV", float("nan")))
                for name in ("dispersion_untrimmed", "dispersion_trimmed")}
        return {"calibration_id": self.calibration_id, "det_id": self.det_id, "gain": self.gain,
                "target": self.target, "summary_uid": self.summary_uid, "uids": self.uids,
                "files": [str(p) for p in self.files],
                **{f"{k}_eV": v for k, v in disp.items()}}

    def summary(self) -> str:
        if self.dry_run:
            return (f"EIGER {self.det_id} {self.gain}, trimmed on {self.target}: dry run of "
                    f"calibration {self.calibration_id[:8]} (nominal decisions; nothing measured, "
                    "no file written)")
        d = self.as_dict()
        lines = [f"EIGER {self.det_id} {self.gain}, trimmed on {self.target}: calibration "
                 f"{self.calibration_id[:8]}, {len(self.runs)} scans",
                 f"  threshold dispersion: untrimmed {d['dispersion_untrimmed_eV']:.0f} eV, "
                 f"trimmed {d['dispersion_trimmed_eV']:.0f} eV"]
        # one screen: the files a detector loads (trim files and energy calibration, .snNNN, one
        # per half module); the scans and fits are counted
        loaded = [p for p in self.files if re.search(r"\.sn\d{3}$", str(p))][:8]
        lines += [f"  file {p}" for p in loaded]
        if len(self.files) > len(loaded):
            lines.append(f"  ... and {len(self.files) - len(loaded)} more files in {self.results_dir}")
        lines.append(f"  summary run {self.summary_uid}   (reanalyse_calibration(cat, uid))")
        return "\n".join(lines)

    def run_md(self, step: str, **extra) -> dict:
        """Start-document metadata of a run of this calibration."""
        return {"procedure": PROCEDURE, "calibration_id": self.calibration_id, "step": step,
                "det_id": self.det_id, "gain": self.gain, "geometry": self.geometry.name,
                "hostnames": list(self.hostnames), "module_serials": self.serials,
                "trim_target": self.target, **extra}

    def add_file(self, path: Path) -> Path:
        self.files.append(Path(path))
        return Path(path)


_CALIBRATIONS: dict[str, EigerCalibration] = {}


def current_calibration(det) -> EigerCalibration | None:
    """The calibration the step plans of ``det`` work on (None before setup_detector)."""
    return _CALIBRATIONS.get(det.name)


def new_calibration(det, *, target: str = "Cu", gain: str | None = None,
                    results_dir: str | Path | None = None, settings_dir: str | Path | None = None,
                    defaults: CalibrationDefaults | None = None, detector_scan: bool = True):
    """Plan: start a calibration of ``det`` (reads its det_id, geometry and hostnames) and make it
    the current one. results_dir defaults to the lab configuration's; gain to PSI's gain for the
    target (Cu -> gain5). Returns the EigerCalibration."""
    line_energy(target)
    gain = gain or default_gain(target)
    defaults = defaults or DEFAULTS
    results_dir = toolkit_results_dir(results_dir)
    raw_id = yield from read_or_nominal(det.det_id, None)
    dry = raw_id is None            # a dry run: a nominal detector, never the current calibration
    det_id = det.name if dry else str(raw_id or "")
    geometry_name = str((yield from read_or_nominal(det.geometry, DRY_RUN_GEOMETRY)) or "")
    hostnames = [h for h in str((yield from read_or_nominal(det.hostnames, DRY_RUN_HOSTNAMES))
                                or "").split("+") if h]
    if not det_id or not geometry_name or not hostnames:
        raise CalibrationStepError(
            f"{det.prefix}: the detector does not report its id, geometry or hostnames "
            f"(DetId_RBV {det_id!r}, Geometry_RBV {geometry_name!r}, Hostnames_RBV "
            f"{'+'.join(hostnames)!r}); check that the EIGER IOC is running and connected")
    # the detector's module ids name the files (hostnames of virtual servers carry no serial)
    serials = [s for s in str((yield from read_or_nominal(det.serials, "")) or "").split("+")
               if s]
    geometry = eiger_geometry(geometry_name)
    if len(hostnames) != geometry.n_half_modules:
        raise CalibrationStepError(f"a {geometry.name} has {geometry.n_half_modules} half modules "
                                   f"but the detector names {len(hostnames)} hostnames "
                                   f"({'+'.join(hostnames)}); fix [instruments.eiger] hostnames")
    if serials and len(serials) != geometry.n_half_modules:
        raise CalibrationStepError(f"{det.prefix}Serials_RBV lists {len(serials)} serials "
                                   f"({'+'.join(serials)}) for {geometry.n_half_modules} half "
                                   "modules; check the detector's module ids (detid)")
    cal = EigerCalibration(det_id=det_id, gain=gain, target=target, geometry=geometry,
                           hostnames=hostnames, module_serials=serials,
                           results_dir=Path(results_dir),
                           settings_dir=Path(settings_dir) if settings_dir else None,
                           defaults=defaults, vthreshold=vthreshold_for_gain(gain, defaults),
                           exptime_s=defaults.exptime_s, dry_run=dry,
                           detector_scan=bool(detector_scan))
    if not dry:
        _CALIBRATIONS[det.name] = cal
    return cal


# ---------------------------------------------------------------------------------------------
# Helpers: puts that explain themselves, settings snapshots, the scan of a step
# ---------------------------------------------------------------------------------------------

def _reason(exc: BaseException) -> str:
    """The instrument's own words inside a failed put (FailedStatus -> InstrumentRefused)."""
    return reason(exc, also=(ShutterError, CalibrationStepError))


# a refusal becomes a CalibrationStepError saying what failed
_put = partial(put, error=CalibrationStepError, also=(ShutterError, CalibrationStepError))


def _read_dac_table(det, n_hm: int):
    # a dry run: the detector server's defaults
    nominal = [[DAC_DEFAULTS[name]] * n_hm for name in DAC_NAMES] + [[IODELAY_DEFAULT] * n_hm]
    table = np.asarray((yield from read_or_nominal(det.dac_table, nominal)), dtype=np.int64)
    if table.size != N_DAC_ROWS * n_hm:
        raise CalibrationStepError(f"{det.prefix}DacTable_RBV has {table.size} values, expected "
                                   f"{N_DAC_ROWS} x {n_hm}; is this the EIGER the calibration "
                                   "was set up for?")
    return table.reshape(N_DAC_ROWS, n_hm)


def _set_dacs(det, cal: EigerCalibration, per_half_module: dict[str, list[int]] | None = None,
              *, chip_vcmp: list[int] | None = None, what: str):
    """Change some DACs per half module (and the four vcmp from per-chip values) in one put."""
    table = yield from _read_dac_table(det, cal.geometry.n_half_modules)
    for name, values in (per_half_module or {}).items():
        table[DAC_NAMES.index(name), :] = np.asarray(values, dtype=np.int64)
    for chip, value in enumerate(chip_vcmp or []):
        hm, name = cal.geometry.chip_vcmp(chip)
        table[DAC_NAMES.index(name), hm] = int(value)
    yield from _put(det.dac_table, table.ravel(), what)


@dataclass
class _Snapshot:
    dac_table: np.ndarray
    dynamic_range: int
    exptime: float
    frames: int
    trimbits: np.ndarray | None


def _snapshot(det, cal: EigerCalibration, *, trimbits: bool):
    d = cal.defaults
    table = yield from _read_dac_table(det, cal.geometry.n_half_modules)
    dr = int((yield from read_or_nominal(det.dynamic_range, d.dynamic_range)))
    exptime = float((yield from read_or_nominal(det.exptime, cal.exptime_s)))
    frames = int((yield from read_or_nominal(det.frames, d.nframes)))
    tb = None
    if trimbits:
        nominal = np.full(cal.geometry.shape, d.trimval, dtype=np.int32)
        tb = np.asarray((yield from read_or_nominal(det.trimbits, nominal))).copy()
    return _Snapshot(table, dr, exptime, frames, tb)


def _restore(det, snap: _Snapshot, step: str):
    """Put back the settings a step changed (finalize plan: runs however the step ends)."""
    try:
        yield from bps.mv(det.dac_table, snap.dac_table.ravel())
        if snap.trimbits is not None:
            yield from bps.mv(det.trimbits, snap.trimbits)
        yield from bps.mv(det.dynamic_range, snap.dynamic_range)
        yield from bps.mv(det.exptime, snap.exptime)
        yield from bps.mv(det.frames, snap.frames)
    except (RequestAbort, RequestStop):
        raise
    except Exception as exc:
        raise CalibrationStepError(
            f"after the {step} the detector did not take back its previous settings "
            f"({_reason(exc)}); check the detector and reload the last good trim with "
            "RE(load_trimbits(det, '<trim file prefix>'))") from exc


def _guarded(plan, step: str):
    """Run ``plan``; an error becomes a CalibrationStepError naming the step (abort/stop pass)."""
    try:
        return (yield from plan)
    except (RequestAbort, RequestStop, CalibrationStepError):
        raise
    except ShutterError as exc:
        raise CalibrationStepError(f"{step}: {exc}; the shutter is closed and the detector "
                                   "keeps its previous settings") from exc
    except Exception as exc:
        reason = _reason(exc)
        if reason == "no reason given":
            reason = f"{type(exc).__name__}: {exc}"
        raise CalibrationStepError(f"{step} stopped: {reason}; the shutter is closed and the "
                                   "detector keeps its previous settings") from exc


def _step(det, cal: EigerCalibration, step: str, body, *, trimbits: bool = False):
    """Run a step's body between a snapshot of the detector settings and their restoration."""
    snap = yield from _snapshot(det, cal, trimbits=trimbits)
    return (yield from bpp.finalize_wrapper(_guarded(body, step), _restore(det, snap, step)))


def _check_box(box, target: str):
    """Refuse to start an exposure step with the tube off or warming up (before any change)."""
    hv = yield from read_or_nominal(box.hv, "On")
    if hv != "On":
        raise CalibrationStepError(
            f"the X-ray tube's high voltage is {hv!r}: no {target} fluorescence would reach the "
            "detector. Switch it on with RE(tube_on(box)) and repeat the step")
    warmup = float((yield from read_or_nominal(box.warmup_remaining, 0.0)))
    if warmup > 0:
        raise CalibrationStepError(f"the X-ray tube is still warming up ({warmup:.0f} s left); "
                                   "wait for it (RE(tube_on(box)) waits) and repeat the step")


def _scan(det, box, cal: EigerCalibration, *, step: str, motor, points, target: str,
          run_id: int, exptime_s: float, plot, untrimmed: KeptSCurve | None = None,
          md: dict | None = None):
    """One calibration scan with the XRF shutter open on ``target``; returns (uid, analysis)."""
    yield from _put(det.frames, cal.defaults.nframes, "setting the frames per point")
    points = [int(p) for p in points]
    analysis = StepAnalysis(untrimmed=untrimmed)
    callbacks = [analysis] + ([plot()] if plot else [])
    # the operator's metadata first: the keys the analysis relies on cannot be overridden
    _md = {**(md or {}), **cal.run_md(
        step, target=target, energy_keV=line_energy(target), run_id=int(run_id),
        exptime_s=float(exptime_s), x_key=motor.name, image_key=det.image_key,
        chip_sums_key=det.chip_sums.name, target_counts=float(cal.defaults.target_counts),
        untrimmed_trimval=int(cal.defaults.trimval),
        hints={"dimensions": [([motor.name], "primary")]},
        # found by the step's name, not list_scan's (list_scan lets md override both)
        plan_name=step, plan_args={"motor": motor.name, "points": points,
                                   "target": target, "exptime_s": float(exptime_s),
                                   "run_id": int(run_id), "detector_scan": cal.detector_scan})}
    scan_plan = (eiger_scans.detector_scan(det, motor, points, md=_md) if cal.detector_scan
                 else list_scan([det], motor, points, md=_md))
    inner = point_progress(bpp.subs_wrapper(scan_plan, callbacks), len(points),
                           f"EIGER {step} on {target}")
    uid = yield from xrf_exposure(box, target, inner)
    if uid is None:           # a dry run: no run, no analysis; the step takes nominal decisions
        return None, None
    cal.runs.append({"step": step, "run_id": int(run_id), "target": target, "uid": uid})
    if analysis.result is None:
        raise CalibrationStepError(f"the {step} on {target} (run {uid}) gave no result: "
                                   f"{analysis.error or 'the run recorded no data'}")
    return uid, analysis


def _record(det, cal: EigerCalibration, step: str, parent_uid: str, values: dict, arrays: dict,
            summary: dict, **extra_md):
    """Derived run of a step's analysis; its uid is noted next to the scan's."""
    base = Path(det.data_dir) if det.data_dir else cal.out_dir
    path = base / "eiger_analysis" / cal.calibration_id / f"{step}_{(parent_uid or 'dry')[:8]}.h5"
    md = cal.run_md(step, parent_uid=parent_uid, analysis=ANALYSIS_FUNCTION, results=summary,
                    plan_name="calibrate_eiger" if step == "summary" else f"{step}_analysis",
                    plan_args={"parent_uid": parent_uid}, **extra_md)
    md["procedure"] = ANALYSIS_PROCEDURE
    uid = yield from record_results(values, arrays, path, md=md)
    for r in reversed(cal.runs if step != "summary" else []):   # the summary is cal.summary_uid
        if r.get("uid") == parent_uid:
            r["derived_uid"] = uid
            break
    return uid


def _record_nominal(det, cal: EigerCalibration, step: str, parent_uid: str | None,
                    decisions: dict, **extra_md):
    """The derived run of a step a dry run took nominal decisions for (no arrays, no files)."""
    return (yield from _record(det, cal, step, parent_uid, values=decisions, arrays={},
                               summary={**decisions, "dry_run": True}, **extra_md))


def _nominal_vcmp_vcp(cal: EigerCalibration) -> tuple[list[int], list[int]]:
    """A dry run's vcmp per chip and vcp per half module: the detector server's defaults."""
    return ([DAC_DEFAULTS["vcmp_ll"]] * cal.geometry.n_chips,
            [DAC_DEFAULTS["vcp"]] * cal.geometry.n_half_modules)


def _calibration_for(det, cal: EigerCalibration | None):
    """The calibration a step works on: the one given, the current one, or a new one set up with
    PSI's defaults (so that RE(vrf_scan(det, box)) works on its own)."""
    if cal is None:
        cal = current_calibration(det)
        if cal is None:
            return (yield from setup_detector(det))
    if not cal.dry_run and (yield from is_dry_run(det.det_id)):
        # a dry run works on a copy: the lab's calibration stays as it is
        return replace(cal, dry_run=True, runs=list(cal.runs), files=list(cal.files),
                       results=copy.copy(cal.results))
    return cal


# ---------------------------------------------------------------------------------------------
# The steps
# ---------------------------------------------------------------------------------------------

def setup_detector(det, *, target: str = "Cu", gain: str | None = None,
                   results_dir: str | Path | None = None, settings_dir: str | Path | None = None,
                   defaults: CalibrationDefaults | None = None, detector_scan: bool = True):
    """Plan: PSI's ``setup_detector`` and a new current calibration.

    No detector-side scan, frames 1, period 0 s, exposure ``defaults.exptime_s`` (3 s), dynamic
    range 32 bit, every trimbit 32, vtrim 2500, vrshaper 1600 (DAC units). The calibration's
    scans run in the detector unless ``detector_scan=False`` (then point by point over Channel
    Access). Returns the EigerCalibration."""
    cal = yield from new_calibration(det, target=target, gain=gain, results_dir=results_dir,
                                     settings_dir=settings_dir, defaults=defaults,
                                     detector_scan=detector_scan)
    d = cal.defaults
    for signal, value, what in ((det.scan, "0", "no detector-side scan"),
                                (det.frames, d.nframes, "frames"),
                                (det.period, d.period_s, "period"),
                                (det.exptime, d.exptime_s, "exposure time"),
                                (det.dynamic_range, d.dynamic_range, "dynamic range"),
                                (det.trimval, d.trimval, "trimval"),
                                (det.dacs.vtrim, d.vtrim, "vtrim"),
                                (det.dacs.vrshaper, d.vrshaper, "vrshaper")):
        yield from _put(signal, value, f"setting {what} = {value}")
    return cal


def vrf_scan(det, box, *, start: int = DEFAULTS.vrf_scan[0], stop: int = DEFAULTS.vrf_scan[1],
             step: int = DEFAULTS.vrf_scan[2], cal: EigerCalibration | None = None,
             plot: bool = True, md: dict | None = None):
    """Plan: PSI's ``do_vrf_scan``: vrpreamp over ``np.arange(start, stop, step)`` (DAC) at
    vthreshold 1200 (1500 for gain0), 16 bit, 0.1 s per point, on the trim target's line.

    Sets each half module's vrf where the line's inflection sits at that vthreshold, and the
    S-curve exposure (s) that gives ~1000 counts there. Returns the VrfScanResult."""
    cal = yield from _calibration_for(det, cal)
    d = cal.defaults
    x = np.arange(start, stop, step)
    yield from _check_box(box, cal.target)

    def body():
        yield from _put(det.dynamic_range, d.vrf_scan_dynamic_range, "setting the dynamic range")
        yield from _put(det.exptime, d.vrf_scan_exptime_s, "setting the exposure time")
        yield from _put(det.vthreshold, cal.vthreshold, "setting vthreshold")
        return (yield from _scan(det, box, cal, step="vrf_scan", motor=det.dacs.vrpreamp,
                                 points=x, target=cal.target, run_id=d.run_untrimmed,
                                 exptime_s=d.vrf_scan_exptime_s, plot=VrfScanPlot if plot else None,
                                 md={**(md or {}), "vthreshold": cal.vthreshold}))

    uid, analysis = yield from _step(det, cal, "vrf scan", body())
    result: VrfScanResult | None = analysis.result if analysis else None
    # a dry run: the detector server's vrf and PSI's S-curve exposure
    vrf = result.vrf if result else [DAC_DEFAULTS["vrpreamp"]] * cal.geometry.n_half_modules
    exptime_s = result.exptime_s if result else cal.exptime_s
    yield from _set_dacs(det, cal, {"vrpreamp": vrf}, what="setting vrf per half module")
    yield from _put(det.exptime, exptime_s, "setting the S-curve exposure")
    cal.exptime_s = exptime_s
    if result is None:
        yield from _record_nominal(det, cal, "vrf_scan", uid, {"vrf": vrf, "exptime_s": exptime_s},
                                   target=cal.target, run_id=d.run_untrimmed)
        return None
    cal.results.vrf = result
    data = analysis.data_used
    cal.add_file(save_scan(cal.out_dir / vrf_scan_name(cal.det_id, cal.target, d.run_untrimmed),
                           data.x, data.counts))
    yield from _record(det, cal, "vrf_scan", uid, values={
        "x": result.x, "vrf": result.vrf, "exptime_s": result.exptime_s,
        "counts_at_vrf": result.counts_at_vrf, "sums": result.sums, "gradient": result.gradient,
        "gauss": result.gauss, "window": result.window}, arrays={"cleaned": result.cleaned},
        summary=result.summary(), target=cal.target, run_id=d.run_untrimmed)
    log.info("vrf %s, S-curve exposure %.4f s", list(result.vrf), result.exptime_s)
    return result


def scurve(det, box, *, start: int = DEFAULTS.scurve[0], stop: int = DEFAULTS.scurve[1],
           step: int = DEFAULTS.scurve[2], run_id: int = DEFAULTS.run_untrimmed,
           cal: EigerCalibration | None = None, plot: bool = True, md: dict | None = None):
    """Plan: PSI's ``do_scurve`` + ``do_scurve_fit`` + ``find_mean_and_set_vcmp`` (decision only):
    vthreshold over ``np.arange(start, stop, step)`` (DAC), 32 bit, the calibration's exposure, on
    the trim target. Run 0 is the untrimmed detector, run 1 the trimmed one (the verification).

    Per-pixel fits, bad pixels, vcmp per chip and vcp per half module; writes
    ``{det_id}_vcmp_{t}XRF_{run}.npz`` and ``..._fit.npy``. Returns the SCurveResult."""
    cal = yield from _calibration_for(det, cal)
    d = cal.defaults
    x = np.arange(start, stop, step)
    yield from _check_box(box, cal.target)

    def body():
        yield from _put(det.dynamic_range, d.dynamic_range, "setting the dynamic range")
        yield from _put(det.exptime, cal.exptime_s, "setting the exposure time")
        return (yield from _scan(det, box, cal, step="scurve", motor=det.vthreshold, points=x,
                                 target=cal.target, run_id=run_id, exptime_s=cal.exptime_s,
                                 plot=ChipCurvesPlot if plot else None, md=md))

    uid, analysis = yield from _step(det, cal, f"S-curve (run {run_id})", body())
    if analysis is None:            # a dry run: no fit; the trimbit scan takes nominal vcmp, vcp
        vcmp, vcp = _nominal_vcmp_vcp(cal)
        yield from _record_nominal(det, cal, "scurve", uid, {"vcmp": vcmp, "vcp": vcp},
                                   target=cal.target, run_id=int(run_id))
        return None
    result, chips = analysis.result
    # kept without the fit map (written to the fit file below); the untrimmed with the targets
    # of the trimbit scan
    if run_id == d.run_untrimmed:
        cal.results.untrimmed = result.kept(trimbit_targets=True)
    else:
        cal.results.trimmed = result.kept()
        cal.results.add_line(chips)
    data = analysis.data_used
    cal.add_file(save_scan(cal.out_dir / scurve_name(cal.det_id, cal.target, run_id), data.x,
                           data.counts))
    cal.add_file(save_fit(cal.out_dir / fit_name(cal.det_id, cal.target, run_id), result.fit))
    fit = result.fit
    yield from _record(det, cal, "scurve", uid, values={
        "x": result.x, "vcmp": result.vcmp, "vcp": result.vcp, "mu_mean": result.mu_mean,
        "mu_std": result.mu_std, "chip_mu": chips.mu, "chip_sums": chips.sums},
        # the maps people look at; every fit parameter is in the PSI fit file named here
        arrays={"mu": fit["mu"], "sigma": fit["sigma"], "status": fit["status"],
                "bad": result.bad.codes()},
        summary={**result.summary(), "chip_mu": [float(v) for v in chips.mu]},
        target=cal.target, run_id=int(run_id), fit_file=str(cal.files[-1]))
    return result


def verification_scurve(det, box, *, start: int = DEFAULTS.scurve[0],
                        stop: int = DEFAULTS.scurve[1], step: int = DEFAULTS.scurve[2],
                        cal: EigerCalibration | None = None, plot: bool = True,
                        md: dict | None = None):
    """Plan: the S-curve of the trimmed detector (run 1), after load_trimbits."""
    cal = yield from _calibration_for(det, cal)
    return (yield from scurve(det, box, start=start, stop=stop, step=step,
                              run_id=cal.defaults.run_trimmed, cal=cal, plot=plot, md=md))


def trimbit_scan(det, box, *, step: int = DEFAULTS.trimbit_step, tau_ns: int = DEFAULTS.tau_ns,
                 cal: EigerCalibration | None = None, plot: bool = True, md: dict | None = None):
    """Plan: PSI's ``do_trimbit_scan`` + ``find_and_write_trimbits``.

    Sets each chip's vcmp and each half module's vcp from the untrimmed S-curve, scans every
    pixel's trimbit over ``np.arange(0, 64, step)``, finds each good pixel's trimbit where its
    counts reach p0 + p1*mu + A/2 (masked pixels keep trimval 32) and writes the trim files
    ``{det_id}_{t}XRF_{gain}.snNNN`` (DACs with those vcmp/vcp, iodelay, tau_ns, trimbits) and
    ``{...}.npz``. The detector's trimbits and DACs are put back afterwards; load_trimbits loads
    the new ones. Returns the TrimbitResult."""
    cal = yield from _calibration_for(det, cal)
    d = cal.defaults
    untrimmed = cal.results.untrimmed
    if untrimmed is None and not cal.dry_run:
        raise CalibrationStepError("the trimbit scan needs the untrimmed S-curve's fit: run "
                                   "RE(scurve(det, box)) first")
    yield from _check_box(box, cal.target)
    x = np.arange(0, 64, step)
    vcmp, vcp = (untrimmed.vcmp, untrimmed.vcp) if untrimmed else _nominal_vcmp_vcp(cal)

    def body():
        yield from _set_dacs(det, cal, {"vcp": vcp}, chip_vcmp=list(vcmp),
                             what="setting vcmp per chip and vcp")
        table = yield from _read_dac_table(det, cal.geometry.n_half_modules)
        yield from _put(det.dynamic_range, d.dynamic_range, "setting the dynamic range")
        yield from _put(det.exptime, cal.exptime_s, "setting the exposure time")
        uid, analysis = yield from _scan(
            det, box, cal, step="trimbit_scan", motor=det.trimval, points=x, target=cal.target,
            run_id=d.run_untrimmed, exptime_s=cal.exptime_s, untrimmed=untrimmed,
            plot=ChipCurvesPlot if plot else None,
            md={**(md or {}), "vcmp": [int(v) for v in vcmp], "vcp": [int(v) for v in vcp]})
        return uid, analysis, table

    # the detector gets its previous trimbits and DACs back; the trim files carry the new ones
    uid, analysis, table = yield from _step(det, cal, "trimbit scan", body(), trimbits=True)
    if analysis is None:      # a dry run: no trimbits, no files; load_trimbits names these
        cal.trim_prefix = cal.out_dir / trim_prefix_name(cal.det_id, cal.target, cal.gain)
        yield from _record_nominal(det, cal, "trimbit_scan", uid, {
            "vcmp": vcmp, "vcp": vcp, "tau_ns": int(tau_ns), "trim_prefix": str(cal.trim_prefix)},
            target=cal.target, run_id=d.run_untrimmed)
        return None
    result: TrimbitResult = analysis.result
    cal.results.trimbits = result.kept()
    data = analysis.data_used
    cal.add_file(save_scan(cal.out_dir / trimbit_scan_name(cal.det_id, cal.target,
                                                           d.run_untrimmed), data.x, data.counts))
    prefix = cal.out_dir / trim_prefix_name(cal.det_id, cal.target, cal.gain)
    for path in write_trim_files(prefix, cal.geometry, table, tau_ns, result.trimbits,
                                 cal.serials):
        cal.add_file(path)
    cal.trim_prefix = prefix
    cal.add_file(save_trimbits(cal.out_dir / trimbits_name(cal.det_id, cal.target, cal.gain),
                               result.trimbits, result.fit, result.target, result.trimmed,
                               untrimmed.bad_codes))
    yield from _record(det, cal, "trimbit_scan", uid, values={
        "x": result.x, "vcmp": untrimmed.vcmp, "vcp": untrimmed.vcp, "tau_ns": int(tau_ns),
        "trim_prefix": str(prefix)},
        arrays={"trimbits": result.trimbits, "trimmed": result.trimmed},
        summary={**result.summary(), "trim_prefix": str(prefix)}, target=cal.target,
        run_id=d.run_untrimmed, trimbits_file=str(cal.files[-1]))
    return result


def load_trimbits(det, prefix: str | Path | None = None, *, cal: EigerCalibration | None = None):
    """Plan: load trim files ``{prefix}.snNNN`` into the detector (DACs, iodelay, tau, trimbits);
    by default the ones the calibration's trimbit scan wrote."""
    cal = cal or current_calibration(det)
    if prefix is None:
        if cal is None or cal.trim_prefix is None:
            raise CalibrationStepError("no trim files to load: run RE(trimbit_scan(det, box)) "
                                       "first or give the path prefix of existing ones")
        prefix = cal.trim_prefix
    prefix = Path(prefix)
    serials = cal.serials if cal is not None else None
    if serials and not cal.dry_run:
        missing = [f"{prefix}.sn{s}" for s in serials if not Path(f"{prefix}.sn{s}").is_file()]
        if missing:
            raise CalibrationStepError(f"trim file(s) {', '.join(missing)} not found; run the "
                                       "trimbit scan or give the right prefix")
    yield from _put(det.load_trimbits, str(prefix), f"loading the trim files {prefix}.snNNN")
    return prefix


def global_calibration(det, box, *, start: int = DEFAULTS.scurve[0],
                       stop: int = DEFAULTS.scurve[1], step: int = DEFAULTS.scurve[2],
                       targets: tuple[str, ...] | None = None, cal: EigerCalibration | None = None,
                       plot: bool = True, report: bool = True, md: dict | None = None):
    """Plan: PSI's ``take_global_calibration_data`` + ``per_chip_global_calibration`` +
    ``write_calibration_files`` + ``generate_calibration_report``.

    For each second target (PSI's pairing, Ge for Cu) a vthreshold scan at 0.1 s per point on the
    trimmed detector; with the verification S-curve's line, a straight line E = p0 + p1*vcmp per
    chip. Writes calibration.npz, calibration.snNNN ("m k" per chip), the settings directory's
    noise.snNNN and the PDF report, and records a summary run. Returns the EnergyCalibration."""
    cal = yield from _calibration_for(det, cal)
    d = cal.defaults
    if cal.target not in (cal.results.lines or {}) and not cal.dry_run:
        raise CalibrationStepError("the energy calibration starts from the trimmed detector's "
                                   "S-curve on the trim target: run RE(load_trimbits(det)) and "
                                   "RE(verification_scurve(det, box)) first")
    targets = tuple(targets or GLOBAL_TARGETS.get(cal.target, ()))
    if not targets:
        raise CalibrationStepError(f"no second XRF target is paired with {cal.target}; give one, "
                                   "e.g. global_calibration(det, box, targets=('Ge',))")
    for target in targets:
        line_energy(target)
    x = np.arange(start, stop, step)
    for target in targets:
        yield from _check_box(box, target)

        def body(target=target):
            yield from _put(det.dynamic_range, d.dynamic_range, "setting the dynamic range")
            yield from _put(det.exptime, d.vrf_scan_exptime_s, "setting the exposure time")
            return (yield from _scan(det, box, cal, step="line_scan", motor=det.vthreshold,
                                     points=x, target=target, run_id=d.run_trimmed,
                                     exptime_s=d.vrf_scan_exptime_s,
                                     plot=ChipCurvesPlot if plot else None, md=md))

        uid, analysis = yield from _step(det, cal, f"threshold scan on {target}", body())
        if analysis is None:        # a dry run: no inflections
            yield from _record_nominal(det, cal, "line_scan", uid, {"energy_keV": line_energy(
                target)}, target=target, run_id=d.run_trimmed)
            continue
        point: ChipInflections = analysis.result
        cal.results.add_line(point)
        data = analysis.data_used
        cal.add_file(save_scan(cal.out_dir / scurve_name(cal.det_id, target, d.run_trimmed),
                               data.x, data.counts))
        yield from _record(det, cal, "line_scan", uid, values={
            "x": point.x, "chip_mu": point.mu, "chip_sums": point.sums,
            "energy_keV": point.energy_keV}, arrays={},
            summary={"target": target, "energy_keV": point.energy_keV,
                     "chip_mu": [float(v) for v in point.mu]}, target=target,
            run_id=d.run_trimmed)
    yield from _finish(det, cal, report=report)
    return cal.results.calibration


def _finish(det, cal: EigerCalibration, *, report: bool):
    """Energy calibration, PSI's files, the report and the summary run of a calibration."""
    if cal.dry_run:           # nothing measured: no calibration, no files; the summary run opens
        cal.summary_uid = yield from _record_nominal(det, cal, "summary", None, {},
                                                     target=cal.target)
        return cal.summary_uid
    try:
        calibration = cal.results.finish()
    except ValueError as exc:
        raise CalibrationStepError(f"the energy calibration failed: {exc}") from exc
    out = cal.out_dir
    cal.add_file(save_calibration(out / "calibration.npz", calibration))
    texts = write_calibration_text(out, calibration, cal.geometry, cal.serials)
    for path in texts:
        cal.add_file(path)
    if cal.trim_prefix is not None:
        trims = [Path(f"{cal.trim_prefix}.sn{s}") for s in cal.serials]
        for path in install_settings(trims, texts, cal.settings_dir or out / "settings", cal.gain,
                                     cal.serials):
            cal.add_file(path)
    if report:
        cal.add_file(write_calibration_report(out / report_name(cal.det_id, cal.gain),
                                              cal.results, hostnames=cal.hostnames))
    scans = [r["uid"] for r in cal.runs if r.get("uid")]
    summary = cal.results.summary()
    values = {"m": calibration.m, "k": calibration.k, "p0": calibration.p0, "p1": calibration.p1,
              "energies_keV": calibration.energies, "mu": calibration.mu}
    for name in ("dispersion_untrimmed", "dispersion_trimmed"):
        disp = getattr(cal.results, name)
        if disp is not None:
            values[f"{name}_eV"] = disp.sigma_eV
            values[f"{name}_chip_eV"] = disp.chip_sigma_eV
    arrays = {}
    if cal.results.trimmed is not None:
        arrays["trimmed_mu"] = cal.results.trimmed.mu
    cal.summary_uid = yield from _record(
        det, cal, "summary", scans[-1], values=values, arrays=arrays, summary=summary,
        parent_uids=scans, derived_uids=[r["derived_uid"] for r in cal.runs
                                         if r.get("derived_uid")],
        files=[str(p) for p in cal.files], target=cal.target)
    return cal.summary_uid


def calibrate_eiger(det, box, target: str = "Cu", gain: str | None = None, *,
                    results_dir: str | Path | None = None, settings_dir: str | Path | None = None,
                    vrf_range: tuple[int, int, int] = DEFAULTS.vrf_scan,
                    scurve_range: tuple[int, int, int] = DEFAULTS.scurve,
                    trimbit_step: int = DEFAULTS.trimbit_step, tau_ns: int = DEFAULTS.tau_ns,
                    defaults: CalibrationDefaults | None = None, plot: bool = True,
                    report: bool = True, detector_scan: bool = True, md: dict | None = None):
    """Plan: the whole procedure (reference/eiger.md section 1) on ``target`` at ``gain`` (PSI's
    gain for the target by default: Cu -> gain5).

    setup_detector, vrf_scan, scurve (run 0), trimbit_scan, load_trimbits, verification_scurve
    (run 1), global_calibration. Results in {results_dir}/{det_id}/{gain}. Returns the
    EigerCalibration (``.results``, ``.files``, ``.uids``, ``.summary_uid`` for
    ``reanalyse_calibration(catalog, summary_uid)``). The scans run in the detector (one
    acquisition each) unless ``detector_scan=False``."""
    line_energy(target)
    second = GLOBAL_TARGETS.get(target)
    if not second:
        raise CalibrationStepError(f"{target} has no second XRF target in PSI's pairing "
                                   f"({', '.join(GLOBAL_TARGETS)}); calibrate with one of those")
    cal = yield from setup_detector(det, target=target, gain=gain, results_dir=results_dir,
                                    settings_dir=settings_dir, defaults=defaults,
                                    detector_scan=detector_scan)
    yield from vrf_scan(det, box, start=vrf_range[0], stop=vrf_range[1], step=vrf_range[2],
                        cal=cal, plot=plot, md=md)
    sc = {"start": scurve_range[0], "stop": scurve_range[1], "step": scurve_range[2]}
    yield from scurve(det, box, **sc, run_id=cal.defaults.run_untrimmed, cal=cal, plot=plot, md=md)
    yield from trimbit_scan(det, box, step=trimbit_step, tau_ns=tau_ns, cal=cal, plot=plot, md=md)
    yield from load_trimbits(det, cal=cal)
    yield from verification_scurve(det, box, **sc, cal=cal, plot=plot, md=md)
    yield from global_calibration(det, box, **sc, cal=cal, plot=plot, report=report, md=md)
    print(cal.summary())
    return cal
