"""GEM QC6 callbacks on a run's documents: the lab's result files written as the documents arrive,
with their plots at the stop, and a live view for an interactive session. No ophyd, no RunEngine."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from bluesky.callbacks.core import CallbackBase

from calbench.analysis.qc6_files import (FILE_DATE, STRESS_HEADER, IvTable, Qc6FileError,
                                         StressTrips, iv_header, iv_row, local_time,
                                         stability_end_line, stability_header,
                                         stability_trip_line, stress_row, write_megger_sheet)
from calbench.analysis.qc6_plots import plot_iv, plot_result_file, plot_stress

# -- callbacks on a run's documents ---------------------------------------------------------------
class Qc6ResultFiles(CallbackBase):
    """Writes the QC6 result files of a run as its documents arrive (a crash loses no trip), and at
    the stop saves their plots to <dir>/Plots/<stem>.png.

    The plan names the files in its start document (`qc6_files`: {kind: path}); the trips stream
    carries trip_channel / trip_voltage / trip_time (world epoch s) / trip_incident; IV points are in
    the primary stream of an `iv_short_stability` run under the keys of `qc6_channel_keys`.
    """

    def __init__(self, *, plots: bool = True):
        super().__init__()
        self.plots = plots
        self._reset()

    def _reset(self):
        self.files: dict[str, Path] = {}
        self.test = ""
        self._streams: dict[str, str] = {}
        self._pending: tuple[int, list[int], float] | None = None
        self._last_world = 0.0
        self._iv_keys: list[tuple[str, str]] = []
        self._megger: dict[int, tuple[float, int]] = {}
        self._start: dict = {}
        self.written: list[Path] = []

    def start(self, doc):
        self._reset()
        self._start = doc
        self.test = doc.get("qc6_test", "")
        self.files = {k: Path(v) for k, v in doc.get("qc6_files", {}).items()}
        self._last_world = float(doc.get("world_start", doc["time"]))
        appending = bool(doc.get("resumed_from"))
        for kind, path in self.files.items():
            if kind == "megger" or (appending and path.exists()):
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            if kind == "stress":
                path.write_text(STRESS_HEADER + "\n")
            elif kind == "iv":
                channels = doc["qc6_iv_channels"]
                keys = doc["qc6_channel_keys"]
                self._iv_keys = [(keys[str(c)]["vmon"], keys[str(c)]["imon"]) for c in channels]
                path.write_text(iv_header(channels))
            elif kind in ("short", "long"):
                path.write_text(stability_header(self._last_world))
        if "iv" in self.files and not self._iv_keys:
            keys = doc["qc6_channel_keys"]
            self._iv_keys = [(keys[str(c)]["vmon"], keys[str(c)]["imon"])
                             for c in doc["qc6_iv_channels"]]

    def descriptor(self, doc):
        self._streams[doc["uid"]] = doc.get("name", "primary")

    def _append(self, kind: str, text: str) -> None:
        with open(self.files[kind], "a") as fh:
            fh.write(text)

    def event(self, doc):
        stream = self._streams.get(doc["descriptor"], "primary")
        data = doc["data"]
        if "qc6_world_time" in data:
            self._last_world = max(self._last_world, float(data["qc6_world_time"]))
        if stream == "trips":
            t = float(data["trip_time"])
            self._last_world = max(self._last_world, t)
            if "stress" in self.files:
                self._append("stress", stress_row(t, data["trip_channel"], data["trip_voltage"]))
            else:
                incident = int(data["trip_incident"])
                if self._pending is not None and self._pending[0] != incident:
                    self._flush_incident()
                if self._pending is None:
                    self._pending = (incident, [], t)
                self._pending[1].append(int(data["trip_channel"]))
        else:
            self._flush_incident()
            if stream == "primary" and "iv" in self.files and self._iv_keys:
                self._append("iv", iv_row([data[v] for v, _ in self._iv_keys],
                                          [data[i] for _, i in self._iv_keys]))
            elif stream == "primary" and self.test == "megger":
                self._megger[int(data["megger_gem"])] = (float(data["megger_impedance_GOhm"]),
                                                         int(data["megger_sparks"]))

    def _flush_incident(self):
        if self._pending is None:
            return
        _, channels, t = self._pending
        self._pending = None
        kind = "long" if "long" in self.files else "short"
        if kind in self.files:
            self._append(kind, stability_trip_line(channels, t))

    def stop(self, doc):
        self._flush_incident()
        # the end line marks a test that ran to its end (the lab's scripts omit it on failure)
        finished = (doc.get("exit_status") == "success"
                    and not str(doc.get("reason", "")).startswith("Test Failed"))
        for kind in ("short", "long"):
            if kind in self.files and finished:
                self._append(kind, stability_end_line(self._last_world))
        if "megger" in self.files and len(self._megger) == 3:
            gems = [self._megger[k] for k in (1, 2, 3)]
            write_megger_sheet(self.files["megger"], [g[0] for g in gems], [g[1] for g in gems],
                               comments=self._start.get("megger_comments", ""),
                               detector_name=self._start.get("detector_name", ""),
                               voltage_V=float(self._start.get("megger_voltage_V", 550.0)),
                               date=local_time(self._last_world).strftime(FILE_DATE))
        self.written = [p for p in self.files.values() if p.exists()]
        if self.plots:
            for kind, path in self.files.items():
                if kind != "megger" and path.exists():
                    try:
                        plot_result_file(path, detector_name=self._start.get("detector_name"))
                    except (Qc6FileError, ValueError) as exc:   # e.g. an IV scan with no row yet
                        print(f"no plot for {path}: {exc}")


class Qc6LivePlot(CallbackBase):
    """Live view of a QC6 run: trip number vs voltage per foil (stress), I-V per electrode
    (IV scan), cumulative trips vs hours (stability). Figures are pyplot figures, so they show in an
    interactive session; the saved PNGs come from Qc6ResultFiles. Redrawing takes ~0.1 s, so it
    happens at most every `redraw_every_s` wall seconds (and at the end of the run): the plan's
    events must not wait for the figures."""

    def __init__(self, *, redraw_every_s: float = 1.0):
        super().__init__()
        self.figures: dict[str, object] = {}
        self._streams: dict[str, str] = {}
        self.redraw_every_s = redraw_every_s
        self._last_draw = -float("inf")
        self._stale = False

    def start(self, doc):
        import matplotlib.pyplot as plt
        self.test = doc.get("qc6_test", "")
        self.name = doc.get("detector_name", "")
        self._world_start = float(doc.get("world_start", doc["time"]))
        self._trips: dict[int, list[float]] = {}
        self._trip_hours: list[float] = []
        self._iv: dict[int, tuple[list[float], list[float]]] = {}
        self._keys = doc.get("qc6_channel_keys", {})
        self._hold_start = None
        self.figures = {}
        if self.test == "stress":
            self.figures["stress"] = plt.figure(f"{self.name} Stress Test")
        if self.test == "iv_short_stability":
            self.figures["iv"] = plt.figure(f"{self.name} IV Scan")
        if self.test in ("iv_short_stability", "long_stability"):
            self.figures["stability"] = plt.figure(f"{self.name} stability: trips vs time")

    def descriptor(self, doc):
        self._streams[doc["uid"]] = doc.get("name", "primary")

    def event(self, doc):
        stream, data = self._streams.get(doc["descriptor"], "primary"), doc["data"]
        if stream == "trips":
            ch = int(data["trip_channel"])
            self._trips.setdefault(ch, []).append(float(data["trip_voltage"]))
            self._trip_hours.append((float(data["trip_time"]) - self._world_start) / 3600.0)
            self._changed()
        elif stream == "primary" and self.test == "iv_short_stability":
            for ch, keys in self._keys.items():
                v, i = self._iv.setdefault(int(ch), ([], []))
                v.append(float(data[keys["vmon"]]))
                i.append(float(data[keys["imon"]]))
            self._changed()

    def _changed(self):
        self._stale = True
        if time.monotonic() - self._last_draw >= self.redraw_every_s:
            self._redraw()

    def _redraw(self):
        self._stale, self._last_draw = False, time.monotonic()
        if "stress" in self.figures:
            fig = self.figures["stress"]
            fig.clf()
            trips = StressTrips()
            for ch, volts in self._trips.items():
                trips.channels += [ch] * len(volts)
                trips.voltages += volts
            plot_stress(trips, f"{self.name} Stress Test", ax=fig.add_subplot())
        if "iv" in self.figures and self._iv:
            fig = self.figures["iv"]
            fig.clf()
            chans = sorted(self._iv, reverse=True)
            n = min(len(self._iv[c][0]) for c in chans)
            table = IvTable(chans, np.array([self._iv[c][0][:n] for c in chans]).T.reshape(n, -1),
                            np.array([self._iv[c][1][:n] for c in chans]).T.reshape(n, -1))
            plot_iv(table, f"{self.name} IV Scan", ax=fig.add_subplot())
        if "stability" in self.figures:
            fig = self.figures["stability"]
            fig.clf()
            ax = fig.add_subplot()
            h = np.repeat(self._trip_hours, 2)
            n = np.arange(len(self._trip_hours))
            ax.plot(np.r_[0.0, h], np.r_[0, np.ravel(np.column_stack([n, n + 1]))], marker="o")
            ax.set_xlabel("Time [h]")
            ax.set_ylabel("Trips")
            ax.set_title(f"{self.name} trips")
        for fig in self.figures.values():
            fig.canvas.draw_idle()

    def stop(self, doc):
        import matplotlib
        import matplotlib.pyplot as plt
        if matplotlib.get_backend().lower() == "agg":     # nothing to look at: free the figures
            for fig in self.figures.values():
                plt.close(fig)
        elif self._stale:
            self._redraw()
