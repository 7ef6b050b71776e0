"""Document callbacks of the EIGER calibration: per-pixel data of a scan, its analysis, live plots.

A calibration scan (plans/eiger.py) says in its start document what it is (``step``: vrf_scan,
scurve, trimbit_scan, line_scan) and where its data are (``x_key`` the scanned setting,
``image_key`` the frames, ``chip_sums_key`` the per-chip sums, ``geometry``). From that:

* :class:`StepAnalysis` collects the frames (read from the HDF5 files the StreamResource /
  StreamDatum documents name, the same bytes tiled serves) and, when the run stops successfully,
  runs the step's analysis (:func:`analyse_step`). It never raises into the RunEngine (the other
  subscribers, e.g. the tiled writer, must still get the stop document): an analysis error is kept
  in ``.error`` for the plan to report.
* :class:`VrfScanPlot` plots the summed counts per half module and their gradient while the vrf scan
  runs and fits the edge at every point; :class:`ChipCurvesPlot` plots each chip's mean counts per
  pixel while a threshold or trimbit scan runs and fits the chip curves when it stops.

:func:`analyse_step` is also what the re-analysis from tiled runs (analysis/eiger_reanalysis.py):
the decisions taken live and offline are the same computation on the same numbers.

No ophyd, RunEngine or caproto; matplotlib only in the plot callbacks.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlparse

import h5py
import numpy as np
from bluesky.callbacks.mpl_plotting import QtAwareCallback
from event_model import DocumentRouter
from numpy.typing import NDArray

from calbench.analysis.eiger_calibration import (DEFAULTS, CalibrationError, KeptSCurve,
                                                 SCurveResult,
                                                 analyse_scurve, analyse_trimbit_scan,
                                                 analyse_vrf_scan, chip_inflections,
                                                 counts_from_frames, fit_vrf_edge)
from calbench.analysis.eiger_lazy_frames import FrameSource, LazyFrames
from calbench.contracts.eiger_geometry import EigerGeometry
from calbench.contracts.eiger_geometry import geometry as eiger_geometry
from calbench.analysis.scurve import FitStatus, fit_scurves

log = logging.getLogger(__name__)

__all__ = ["STEPS", "ScanData", "LAZY_ABOVE_PIXELS",
           "analyse_step", "FrameCollector", "StepAnalysis",
           "VrfScanPlot", "ChipCurvesPlot", "path_from_uri"]

# Detectors above this many pixels leave their frames in the files (read block by block by the
# analysis, on a dask cluster): a 9M scan is ~2 GB of frames; a 2M one is still held in memory.
LAZY_ABOVE_PIXELS = 2_097_152

# Step names of the raw runs (start["step"]).
STEPS = ("vrf_scan", "scurve", "trimbit_scan", "line_scan")


def path_from_uri(uri: str) -> Path:
    """Local path of a ``file://localhost/...`` (or ``file:///...``) URI of a StreamResource."""
    parsed = urlparse(uri)
    if parsed.scheme != "file":
        raise ValueError(f"frames at {uri!r} are not a local file; copy them to the data "
                         "directory or re-analyse from tiled")
    return Path(parsed.path)


class ScanData:
    """The numbers of one calibration scan: its start document, the scanned settings and the
    counts [rows, cols, n] (a view on the frames [n, rows, cols]; a dask array read block by
    block from the files when the frames are :class:`LazyFrames`)."""

    def __init__(self, start: dict, x: NDArray, frames: "NDArray | LazyFrames"):
        self.start = start
        self.x = np.asarray(x, dtype=np.float64)
        if isinstance(frames, LazyFrames):
            self.frames = frames
            if len(frames) != self.x.size:
                raise CalibrationError(
                    f"run {start.get('uid', '?')}: {self.x.size} settings but "
                    f"{len(frames)} frames; the run is incomplete")
            return
        self.frames = np.asarray(frames)
        if self.frames.ndim == 4:            # [n, frames per point, rows, cols]: their sum
            self.frames = (self.frames[:, 0] if self.frames.shape[1] == 1
                           else self.frames.sum(axis=1, dtype=np.uint64))
        if self.frames.ndim != 3 or len(self.frames) != self.x.size:
            raise CalibrationError(
                f"run {start.get('uid', '?')}: {self.x.size} settings but frames of shape "
                f"{self.frames.shape}; the run is incomplete")

    @property
    def counts(self):
        if isinstance(self.frames, LazyFrames):
            return self.frames.counts()
        return counts_from_frames(self.frames)

    @property
    def geometry(self) -> EigerGeometry:
        return eiger_geometry(self.start["geometry"])


def analyse_step(data: ScanData, *, untrimmed: SCurveResult | KeptSCurve | None = None):
    """The analysis of one calibration scan, chosen by its start document's ``step``.

    vrf_scan -> VrfScanResult; scurve -> (SCurveResult, ChipInflections); trimbit_scan ->
    TrimbitResult (needs the untrimmed S-curve's result, or what CalibrationResults keeps of
    it); line_scan -> ChipInflections."""
    start, g = data.start, data.geometry
    step = start.get("step")
    if step == "vrf_scan":
        return analyse_vrf_scan(data.x, data.counts, g, float(start["exptime_s"]),
                                target_counts=float(start.get("target_counts",
                                                              DEFAULTS.target_counts)))
    if step == "scurve":
        return (analyse_scurve(data.x, data.counts, g),
                chip_inflections(data.x, data.counts, g, start["target"]))
    if step == "trimbit_scan":
        if untrimmed is None:
            raise CalibrationError("a trimbit scan is analysed with the untrimmed S-curve's fit; "
                                   "run (or re-analyse) the S-curve first")
        return analyse_trimbit_scan(data.x, data.counts, untrimmed,
                                    untrimmed=int(start.get("untrimmed_trimval",
                                                                  DEFAULTS.trimval)))
    if step == "line_scan":
        return chip_inflections(data.x, data.counts, g, start["target"])
    raise CalibrationError(f"run {start.get('uid', '?')} is not an EIGER calibration scan "
                           f"(step {step!r}; expected one of {', '.join(STEPS)})")


class FrameCollector(DocumentRouter):
    """Collects a run's scanned settings (``start["x_key"]``) and frames (``start["image_key"]``,
    external data read from the files of its StreamResource documents)."""

    def __init__(self, *, lazy: bool | None = None):
        super().__init__()
        self.lazy_setting = lazy
        self.start_doc: dict | None = None
        self.stop_doc: dict | None = None
        self._resources: dict[str, dict] = {}
        self._frames: dict[int, np.ndarray | FrameSource] = {}
        self._x: dict[int, float] = {}
        self._per_event = 1
        self._dtype = np.dtype(np.uint32)

    def start(self, doc):
        self.start_doc, self.stop_doc = doc, None
        self._resources.clear()
        self._frames.clear()
        self._x.clear()
        self._per_event = 1
        self.lazy = self.lazy_setting
        if self.lazy is None:
            try:
                pixels = eiger_geometry(doc.get("geometry", "")).n_pixels
            except (KeyError, ValueError):
                pixels = 0
            self.lazy = pixels > LAZY_ABOVE_PIXELS

    def descriptor(self, doc):
        key = self.start_doc.get("image_key") if self.start_doc else None
        shape = doc.get("data_keys", {}).get(key, {}).get("shape") or []
        if len(shape) == 3:                  # NumImages frames per event
            self._per_event = int(shape[0])
        dtype = doc.get("data_keys", {}).get(key, {}).get("dtype_numpy")
        if dtype:
            self._dtype = np.dtype(dtype)

    def stream_resource(self, doc):
        if self.start_doc and doc.get("data_key") == self.start_doc.get("image_key"):
            self._resources[doc["uid"]] = doc

    def stream_datum(self, doc):
        res = self._resources.get(doc["stream_resource"])
        if res is None:
            return
        start, stop = doc["indices"]["start"], doc["indices"]["stop"]
        # a run's file may still be open for writing (SWMR) while its frames are read
        swmr = bool(res.get("parameters", {}).get("swmr", False))
        n = self._per_event                   # indices count events of n frames each
        if self.lazy:                         # the file is read where the analysis needs it
            path, dataset = str(path_from_uri(res["uri"])), res["parameters"]["dataset"]
            for i, seq in enumerate(range(doc["seq_nums"]["start"], doc["seq_nums"]["stop"])):
                self._frames[seq] = FrameSource(path, dataset, (start + i) * n, 1, n, swmr)
            return
        with h5py.File(path_from_uri(res["uri"]), "r", swmr=swmr) as f:
            block = f[res["parameters"]["dataset"]][start * n:stop * n]
        for i, seq in enumerate(range(doc["seq_nums"]["start"], doc["seq_nums"]["stop"])):
            frames = block[i * n:(i + 1) * n]
            self._frames[seq] = frames[0] if n == 1 else frames.sum(axis=0, dtype=np.uint64)

    def event(self, doc):
        key = self.start_doc.get("x_key") if self.start_doc else None
        if key in doc["data"]:
            self._x[doc["seq_num"]] = float(np.asarray(doc["data"][key]).ravel()[0])

    def stop(self, doc):
        self.stop_doc = doc

    def data(self) -> ScanData:
        """The scan so far, points in seq_num order (only events that have a frame)."""
        seqs = sorted(s for s in self._x if s in self._frames)
        if not seqs:
            raise CalibrationError("the scan recorded no frame; check the detector's data "
                                   "directory and that the run reached its first point")
        x = np.array([self._x[s] for s in seqs])
        if self.lazy:
            return ScanData(self.start_doc, x, self._lazy_frames(seqs))
        return ScanData(self.start_doc, x, np.stack([self._frames[s] for s in seqs]))

    def _lazy_frames(self, seqs: list[int]) -> LazyFrames:
        """The points' frame sources, consecutive frames of one dataset merged into one."""
        merged: list[FrameSource] = []
        for s in seqs:
            src = self._frames[s]
            last = merged[-1] if merged else None
            if (last is not None and (last.path, last.dataset, last.per_point, last.swmr) ==
                    (src.path, src.dataset, src.per_point, src.swmr)
                    and src.first == last.first + last.points * last.per_point):
                merged[-1] = replace(last, points=last.points + 1)
            else:
                merged.append(src)
        g = eiger_geometry(self.start_doc["geometry"])
        return LazyFrames(merged, g.shape, self._dtype)


class StepAnalysis(FrameCollector):
    """Runs :func:`analyse_step` when the run stops successfully.

    ``result`` is the analysis (None until then), ``error`` the reason when it could not run,
    ``data`` the ScanData it used. ``untrimmed`` is passed to trimbit-scan analyses."""

    def __init__(self, *, untrimmed: SCurveResult | KeptSCurve | None = None,
                 analyse: Callable = analyse_step, lazy: bool | None = None):
        super().__init__(lazy=lazy)
        self.untrimmed = untrimmed
        self._analyse = analyse
        self.result = None
        self.error: str = ""
        self.data_used: ScanData | None = None

    def start(self, doc):
        super().start(doc)
        self.result, self.error, self.data_used = None, "", None

    def stop(self, doc):
        super().stop(doc)
        if doc.get("exit_status") != "success":
            self.error = (f"the scan ended with {doc.get('exit_status')}"
                          f"{': ' + doc['reason'] if doc.get('reason') else ''}")
            return
        try:
            self.data_used = self.data()
            self.result = self._analyse(self.data_used, untrimmed=self.untrimmed)
        except Exception as exc:  # noqa: BLE001 - reported to the plan, never into the RunEngine
            log.exception("analysis of run %s failed", doc.get("run_start"))
            self.error = str(exc) or type(exc).__name__


# ---------------------------------------------------------------------------------------------
# Live plots
# ---------------------------------------------------------------------------------------------

class _LivePlot(QtAwareCallback):
    """Shared plumbing: a figure per scan kind, lines updated per event, never raising."""

    title = "EIGER"

    def __init__(self, *, figure_label: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.figure_label = figure_label or self.title
        self.fig = None
        self.start_doc: dict | None = None
        self.x: list[float] = []
        self.y: list[NDArray] = []

    def __call__(self, name, doc, *args, **kwargs):
        try:
            return super().__call__(name, doc, *args, **kwargs)
        except Exception:  # noqa: BLE001 - a plot must never stop a calibration
            log.exception("live plot %s failed on a %s document", self.figure_label, name)

    def start(self, doc):
        import matplotlib.pyplot as plt

        self.start_doc = doc
        self.x, self.y = [], []
        self.geometry = eiger_geometry(doc["geometry"])
        self.fig = plt.figure(self.figure_label, figsize=(11, 5))
        self.fig.clf()
        self.setup(doc)
        super().start(doc)

    def event(self, doc):
        data = doc["data"]
        xk, ck = self.start_doc.get("x_key"), self.start_doc.get("chip_sums_key")
        if xk not in data or ck not in data:
            return
        self.x.append(float(np.asarray(data[xk]).ravel()[0]))
        self.y.append(np.asarray(data[ck], dtype=np.float64).ravel())
        self.update()
        self._draw()
        super().event(doc)

    def _draw(self) -> None:
        # only a GUI canvas shows anything; drawing an off-screen one per point only costs time
        if getattr(type(self.fig.canvas), "required_interactive_framework", None):
            self.fig.canvas.draw_idle()

    def setup(self, doc):
        raise NotImplementedError

    def update(self):
        raise NotImplementedError


class VrfScanPlot(_LivePlot):
    """vrf scan: counts per half module vs vrf and their gradient with the edge fit, live."""

    title = "EIGER vrf scan"

    def setup(self, doc):
        n_hm = self.geometry.n_half_modules
        self.ax_sum, self.ax_grad = self.fig.subplots(1, 2)
        hosts = doc.get("hostnames") or [f"half module {i}" for i in range(n_hm)]
        self.lines = [self.ax_sum.plot([], [], "o-", ms=3, label=hosts[i])[0] for i in range(n_hm)]
        self.glines = [self.ax_grad.plot([], [], "o", ms=3, color=self.lines[i].get_color())[0]
                       for i in range(n_hm)]
        self.fits = [self.ax_grad.plot([], [], "-", color=self.lines[i].get_color())[0]
                     for i in range(n_hm)]
        self.ax_sum.set(xlabel="vrf [DAC]", ylabel="counts",
                        title=f"{doc.get('det_id', '')} vrf scan: {doc.get('target', '')}")
        self.ax_grad.set(xlabel="vrf [DAC]", ylabel="d counts / d vrf")
        self.ax_sum.legend(loc="upper left")

    def update(self):
        x = np.array(self.x)
        sums = np.array(self.y)                       # [n, n_chips]
        for hm, line in enumerate(self.lines):
            y = sums[:, 4 * hm:4 * hm + 4].sum(axis=1)
            line.set_data(x, y)
            if x.size >= 3:
                self.glines[hm].set_data(x, np.gradient(y, x))
            if x.size >= 8:
                try:
                    par, (lo, hi) = fit_vrf_edge(x, y)
                except CalibrationError:
                    continue
                xx = np.linspace(lo, hi, 100)
                self.fits[hm].set_data(xx, par[0] * np.exp(-0.5 * ((xx - par[1]) / par[2]) ** 2))
                self.fits[hm].set_label(f"vrf {par[1]:.0f}")
        for ax in (self.ax_sum, self.ax_grad):
            ax.relim()
            ax.autoscale_view()
        if any(f.get_label() and not f.get_label().startswith("_") for f in self.fits):
            self.ax_grad.legend(loc="upper left")


class ChipCurvesPlot(_LivePlot):
    """Threshold or trimbit scan: mean counts per pixel of each chip, live; the chip curves'
    S-curve fits (inflection per chip) when a threshold scan stops."""

    title = "EIGER chip curves"

    def setup(self, doc):
        self.ax = self.fig.subplots(1, 1)
        self.pixels = float(256 * 256)
        self.lines = [self.ax.plot([], [], "o-", ms=3, label=f"chip {c}")[0]
                      for c in range(self.geometry.n_chips)]
        what = {"scurve": "S-curve", "line_scan": "threshold scan",
                "trimbit_scan": "trimbit scan"}.get(doc.get("step"), doc.get("step", ""))
        xlabel = "trimbit" if doc.get("step") == "trimbit_scan" else "vthreshold [DAC]"
        self.ax.set(xlabel=xlabel, ylabel="mean counts per pixel",
                    title=f"{doc.get('det_id', '')} {what}: {doc.get('target', '')} "
                          f"(run {doc.get('run_id', '')})")
        self.ax.legend(loc="upper left", fontsize=8)

    def update(self):
        x = np.array(self.x)
        means = np.array(self.y) / self.pixels
        for chip, line in enumerate(self.lines):
            line.set_data(x, means[:, chip])
        self.ax.relim()
        self.ax.autoscale_view()

    def stop(self, doc):
        if (self.start_doc or {}).get("step") in ("scurve", "line_scan") and len(self.x) >= 8:
            x = np.array(self.x)
            means = np.array(self.y) / self.pixels
            order = np.argsort(x)
            fit = fit_scurves(x[order], means.T[None, :, order], weighting="none",
                              max_chi2=None)[0]
            for chip, line in enumerate(self.lines):
                if fit["status"][chip] == FitStatus.OK:
                    line.set_label(f"chip {chip}: mu {fit['mu'][chip]:.0f}")
            self.ax.legend(loc="upper left", fontsize=8)
            self._draw()
        super().stop(doc)

