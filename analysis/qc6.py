"""GEM QC6 results: the lab's file formats, I-V fits, trip statistics, plots, and the callbacks that
produce them from a run's documents.

File formats (reference/qc6_batmet.md part A), under <results>/<detector>/:
  Stress_Test/stress_<YYYY-mm-dd_HH-MM>.txt  "Time , Channel, Voltage of Trip" then
                                             "YYYY-mm-dd_HH-MM-SS,<ch>,<V, 2 dp>" per trip
  IV_Scan/iv_scan_<date>.txt                 "CH6Voltage,CH6Current,...,CH0Current" then one row of
                                             VMon (V), IMon (uA) per step, "%f"
  SS_test/sstest_<date>.txt, LS_test/LStest_<date>.txt
                                             "Started at <date>", "Channels, Timestamp", one line
                                             "<ch>,<ch>,...,<date>" per trip, "Test finished at <date>"
  Megger_Test/Megger_Test_<date>.xlsx        sheet "MEGGER Test (at 550 V)"
Plots go to <file's dir>/Plots/<stem>.png, as the lab's plotting scripts do. The readers also take the
legacy files of those scripts, including the long-stability end line written without a space.

Nothing here imports ophyd, bluesky's RunEngine or caproto: arrays and documents in, files and
figures out.
"""
from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Sequence

import numpy as np
from bluesky.callbacks.core import CallbackBase

ELECTRODE_LABELS = {6: "Drift", 5: "G1T", 4: "G1B", 3: "G2T", 2: "G2B", 1: "G3T", 0: "G3B"}
GEM_LABELS = {5: "GEM 1", 3: "GEM 2", 1: "GEM 3"}
FILE_DATE = "%Y-%m-%d_%H-%M"
TRIP_TIME = "%Y-%m-%d_%H-%M-%S"
STRESS_HEADER = "Time , Channel, Voltage of Trip"
STABILITY_COLUMNS = "Channels, Timestamp"
MEGGER_SHEET = "MEGGER Test (at 550 V)"

# kind -> (directory, file stem prefix, extension)
RESULT_KINDS = {
    "stress": ("Stress_Test", "stress_", ".txt"),
    "iv": ("IV_Scan", "iv_scan_", ".txt"),
    "short": ("SS_test", "sstest_", ".txt"),
    "long": ("LS_test", "LStest_", ".txt"),
    "megger": ("Megger_Test", "Megger_Test_", ".xlsx"),
}


class Qc6FileError(ValueError):
    """A QC6 result file is not in any of the known formats (the message says where and why)."""


def electrode_label(channel: int) -> str:
    """'Drift', 'G1T', ... for a crate channel (layer 2 channels 7-13 map like 0-6)."""
    return ELECTRODE_LABELS[int(channel) % 7]


def gem_label(channel: int) -> str:
    """'GEM 1/2/3' for a foil channel, else 'Channel <n>'."""
    return GEM_LABELS.get(int(channel) % 7, f"Channel {int(channel)}")


def _local(t_epoch: float) -> datetime:
    return datetime.fromtimestamp(float(t_epoch))


# -- paths --------------------------------------------------------------------------------------
def result_path(results_dir: str | os.PathLike, detector_name: str, kind: str,
                t_epoch: float) -> Path:
    """A new result file <results>/<detector>/<Dir>/<prefix><YYYY-mm-dd_HH-MM><ext> (a `_2`, `_3`...
    suffix when that minute's file exists). Creates the directory."""
    if kind not in RESULT_KINDS:
        raise ValueError(f"unknown QC6 result kind {kind!r}; kinds: {', '.join(RESULT_KINDS)}")
    directory, prefix, ext = RESULT_KINDS[kind]
    folder = Path(results_dir) / detector_name / directory
    folder.mkdir(parents=True, exist_ok=True)
    stem = prefix + _local(t_epoch).strftime(FILE_DATE)
    path, n = folder / (stem + ext), 1
    while path.exists():
        n += 1
        path = folder / f"{stem}_{n}{ext}"
    return path


def plot_path(result_file: str | os.PathLike) -> Path:
    """<dir>/Plots/<stem>.png for a result file (directory created)."""
    result_file = Path(result_file)
    folder = result_file.parent / "Plots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / (result_file.stem + ".png")


def detector_name_of(result_file: str | os.PathLike) -> str:
    """<detector> of <results>/<detector>/<Test dir>/<file>."""
    return Path(result_file).resolve().parent.parent.name


# -- stress test file ---------------------------------------------------------------------------
@dataclass
class StressTrips:
    """Trips of a stress test: when (local time), which channel, at what voltage (V)."""
    times: list[datetime] = field(default_factory=list)
    channels: list[int] = field(default_factory=list)
    voltages: list[float] = field(default_factory=list)

    def of_channel(self, channel: int) -> np.ndarray:
        return np.array([v for c, v in zip(self.channels, self.voltages) if c == channel])


def stress_row(t_epoch: float, channel: int, voltage_V: float) -> str:
    """One trip line of a stress file."""
    return f"{_local(t_epoch).strftime(TRIP_TIME)},{int(channel)},{round(float(voltage_V), 2)}\n"


def read_stress_file(path: str | os.PathLike) -> StressTrips:
    lines = Path(path).read_text().splitlines()
    if not lines or lines[0].replace(" ", "") != STRESS_HEADER.replace(" ", ""):
        raise Qc6FileError(f"{path}: first line must be {STRESS_HEADER!r} (a stress-test file)")
    out = StressTrips()
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(",")]
        try:
            if len(parts) != 3:
                raise ValueError(f"{len(parts)} fields")
            out.times.append(datetime.strptime(parts[0], TRIP_TIME))
            out.channels.append(int(parts[1]))
            out.voltages.append(float(parts[2]))
        except ValueError as exc:
            raise Qc6FileError(f"{path}:{n}: {line!r} is not 'YYYY-mm-dd_HH-MM-SS,<channel>,"
                               f"<volts>' ({exc})") from None
    return out


def write_stress_file(path: str | os.PathLike, trips: StressTrips) -> Path:
    path = Path(path)
    with open(path, "w") as fh:
        fh.write(STRESS_HEADER + "\n")
        for t, c, v in zip(trips.times, trips.channels, trips.voltages):
            fh.write(stress_row(t.timestamp(), c, v))
    return path


# -- IV scan file -------------------------------------------------------------------------------
@dataclass
class IvTable:
    """An I-V scan: one row per divider step; columns in the file's channel order."""
    channels: list[int]
    voltage_V: np.ndarray          # (steps, channels)
    current_uA: np.ndarray

    def column(self, channel: int) -> tuple[np.ndarray, np.ndarray]:
        i = self.channels.index(channel)
        return self.voltage_V[:, i], self.current_uA[:, i]


def iv_header(channels: Sequence[int]) -> str:
    return ",".join(f"CH{c}Voltage,CH{c}Current" for c in channels) + "\n"


def iv_row(voltages_V: Sequence[float], currents_uA: Sequence[float]) -> str:
    return ",".join(f"{v:f},{i:f}" for v, i in zip(voltages_V, currents_uA)) + "\n"


_IV_COLUMN = re.compile(r"^CH(\d+)(Voltage|Current)$")


def read_iv_file(path: str | os.PathLike) -> IvTable:
    lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
    if not lines:
        raise Qc6FileError(f"{path}: empty file (an IV scan starts with 'CH6Voltage,CH6Current,...')")
    names = [h.strip() for h in lines[0].split(",")]
    channels: list[int] = []
    for k, name in enumerate(names):
        m = _IV_COLUMN.match(name)
        want = "Voltage" if k % 2 == 0 else "Current"
        if m is None or m.group(2) != want or (k % 2 == 1 and int(m.group(1)) != channels[-1]):
            raise Qc6FileError(f"{path}: header column {k + 1} is {name!r}; an IV scan header "
                               "alternates CH<n>Voltage,CH<n>Current")
        if k % 2 == 0:
            channels.append(int(m.group(1)))
    if len(names) % 2:
        raise Qc6FileError(f"{path}: header ends with {names[-1]!r} alone; an IV scan header "
                           "alternates CH<n>Voltage,CH<n>Current")
    rows = []
    for n, line in enumerate(lines[1:], start=2):
        try:
            row = [float(x) for x in line.split(",")]
        except ValueError:
            raise Qc6FileError(f"{path}:{n}: {line!r} has a value that is not a number") from None
        if len(row) != len(names):
            raise Qc6FileError(f"{path}:{n}: {len(row)} values for {len(names)} columns")
        rows.append(row)
    data = np.array(rows, dtype=float).reshape(len(rows), len(names))
    return IvTable(channels, data[:, 0::2], data[:, 1::2])


def write_iv_file(path: str | os.PathLike, table: IvTable) -> Path:
    path = Path(path)
    with open(path, "w") as fh:
        fh.write(iv_header(table.channels))
        for v, i in zip(table.voltage_V, table.current_uA):
            fh.write(iv_row(v, i))
    return path


# -- short / long stability files -----------------------------------------------------------------
@dataclass
class StabilityLog:
    """A stability test: its start, each trip (channels, time), and its end (None if unfinished)."""
    start: datetime
    trips: list[tuple[tuple[int, ...], datetime]] = field(default_factory=list)
    end: datetime | None = None


def stability_header(t_epoch: float) -> str:
    return f"Started at {_local(t_epoch).strftime(FILE_DATE)}\n{STABILITY_COLUMNS}\n"


def stability_trip_line(channels: Sequence[int], t_epoch: float) -> str:
    return ",".join(str(int(c)) for c in channels) + "," + _local(t_epoch).strftime(FILE_DATE) + "\n"


def stability_end_line(t_epoch: float) -> str:
    return f"Test finished at {_local(t_epoch).strftime(FILE_DATE)}\n"


def read_stability_file(path: str | os.PathLike) -> StabilityLog:
    lines = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]
    if not lines or not lines[0].startswith("Started at"):
        raise Qc6FileError(f"{path}: first line must be 'Started at YYYY-mm-dd_HH-MM' "
                           "(a short or long stability file)")

    def when(text: str, n: int) -> datetime:
        try:
            return datetime.strptime(text.strip(), FILE_DATE)
        except ValueError:
            raise Qc6FileError(f"{path}:{n}: {text!r} is not a YYYY-mm-dd_HH-MM date") from None

    log = StabilityLog(start=when(lines[0][len("Started at"):], 1))
    for n, line in enumerate(lines[1:], start=2):
        if line.replace(" ", "") == STABILITY_COLUMNS.replace(" ", ""):
            continue
        if line.startswith("Test finished at"):       # the legacy writer left out the space
            log.end = when(line[len("Test finished at"):], n)
            continue
        parts = line.split(",")
        try:
            channels = tuple(int(p) for p in parts[:-1])
        except ValueError:
            raise Qc6FileError(f"{path}:{n}: {line!r} is not '<ch>,<ch>,...,<date>'") from None
        if not channels:
            raise Qc6FileError(f"{path}:{n}: {line!r} names no channel")
        log.trips.append((channels, when(parts[-1], n)))
    return log


def write_stability_file(path: str | os.PathLike, log: StabilityLog) -> Path:
    path = Path(path)
    with open(path, "w") as fh:
        fh.write(stability_header(log.start.timestamp()))
        for channels, t in log.trips:
            fh.write(stability_trip_line(channels, t.timestamp()))
        if log.end is not None:
            fh.write(stability_end_line(log.end.timestamp()))
    return path


def detect_kind(path: str | os.PathLike) -> str:
    """'stress', 'iv', 'short' or 'long' from a file's first line (and name, for stability)."""
    path = Path(path)
    try:
        first = next((ln for ln in path.read_text().splitlines() if ln.strip()), "")
    except UnicodeDecodeError:
        raise Qc6FileError(f"{path}: not a text file; QC6 result files are text") from None
    except FileNotFoundError:
        raise Qc6FileError(f"{path}: no such file") from None
    if first.replace(" ", "") == STRESS_HEADER.replace(" ", ""):
        return "stress"
    if first.startswith("CH") and "Voltage" in first:
        return "iv"
    if first.startswith("Started at"):
        name = (path.name + " " + path.parent.name).lower()
        return "long" if "lstest" in name or "ls_test" in name or "long" in name else "short"
    raise Qc6FileError(f"{path}: first line {first[:60]!r} matches no QC6 result format (stress: "
                       f"{STRESS_HEADER!r}; IV: 'CH6Voltage,...'; stability: 'Started at ...')")


# -- analysis -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class IvFit:
    """Straight-line fit of an electrode's I-V: I = V / R + offset (with 1-sigma errors)."""
    channel: int
    resistance_GOhm: float
    offset_uA: float
    residual_rms_uA: float
    n_points: int
    resistance_err_GOhm: float = math.nan
    offset_err_uA: float = math.nan


def fit_iv(voltage_V: Sequence[float], current_uA: Sequence[float], *, channel: int = -1,
           min_voltage_V: float = 1.0) -> IvFit:
    """Leakage resistance (GOhm) and current offset (uA) of one electrode from its I-V points
    (points below min_voltage_V, e.g. channels held off, are left out)."""
    v, i = np.asarray(voltage_V, float), np.asarray(current_uA, float)
    keep = np.isfinite(v) & np.isfinite(i) & (v >= min_voltage_V)
    v, i = v[keep], i[keep]
    if len(np.unique(v)) < 2:
        raise ValueError(f"channel {channel}: an I-V fit needs 2 distinct voltages, got {len(v)}")
    (slope, offset), cov = np.polyfit(v, i, 1, cov="unscaled") if len(v) > 2 else (
        np.polyfit(v, i, 1), np.full((2, 2), np.nan))
    residual = i - (slope * v + offset)
    rms = float(np.sqrt(np.mean(residual ** 2)))
    sigma2 = float(residual @ residual) / (len(v) - 2) if len(v) > 2 else math.nan
    slope_err, offset_err = np.sqrt(np.diag(cov) * sigma2)
    r = 1e-3 / slope if slope > 0 else math.inf
    r_err = 1e-3 * slope_err / slope ** 2 if slope > 0 else math.inf
    return IvFit(channel, float(r), float(offset), rms, int(len(v)), float(r_err),
                 float(offset_err))


def cumulative_trips(log: StabilityLog) -> tuple[np.ndarray, np.ndarray]:
    """(hours since start, cumulative trips) as a step curve ending at the end of the test."""
    hours, counts, n = [0.0], [0], 0
    for _, t in log.trips:
        h = (t - log.start).total_seconds() / 3600.0
        hours += [h, h]
        counts += [n, n + 1]
        n += 1
    if log.end is not None:
        hours.append((log.end - log.start).total_seconds() / 3600.0)
        counts.append(n)
    return np.array(hours), np.array(counts)


# -- plots --------------------------------------------------------------------------------------
def _figure(size=(10, 8)):
    from matplotlib.figure import Figure
    fig = Figure(figsize=size)
    return fig, fig.add_subplot()


def plot_stress(trips: StressTrips, title: str = "Stress Test", *, ax=None):
    """Trip number (1, 2, ...) vs voltage of the trip, one line per foil."""
    fig, ax = _figure() if ax is None else (ax.figure, ax)
    for c in dict.fromkeys(trips.channels):
        v = trips.of_channel(c)
        ax.plot(np.arange(1, len(v) + 1), v, marker="o", label=gem_label(c))
    ax.set_xlabel("Trip Iteration")
    ax.set_ylabel("Voltage [V]")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title(title)
    if trips.channels:
        ax.legend(frameon=True, loc="upper right")
    return fig


def plot_iv(table: IvTable, title: str = "IV Scan", *, ax=None):
    """Current vs voltage per electrode."""
    fig, ax = _figure() if ax is None else (ax.figure, ax)
    for c in table.channels:
        v, i = table.column(c)
        ax.plot(v, i, marker="o", label=electrode_label(c))
    ax.set_xlabel("Voltage [V]")
    ax.set_ylabel("Current [$\\mu$A]")
    ax.set_title(title)
    ax.legend(frameon=True, loc="upper right", fontsize=12)
    return fig


def plot_stability(log: StabilityLog, title: str = "Stability Test", *, ax=None):
    """Cumulative trips vs hours since the start."""
    fig, ax = _figure((11, 8)) if ax is None else (ax.figure, ax)
    hours, counts = cumulative_trips(log)
    ax.plot(hours, counts, marker="o")
    ax.set_xlabel("Time [h]")
    ax.set_ylabel("Trips")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_title(title)
    return fig


def plot_result_file(path: str | os.PathLike, *, detector_name: str | None = None) -> Path:
    """Plot a QC6 result file (ours or a legacy one) to <dir>/Plots/<stem>.png; returns the PNG."""
    path = Path(path)
    kind = detect_kind(path)
    name = detector_name or detector_name_of(path)
    if kind == "stress":
        fig = plot_stress(read_stress_file(path), f"{name} Stress Test")
    elif kind == "iv":
        fig = plot_iv(read_iv_file(path), f"{name} IV Scan")
    else:
        title = "Long Stability Test" if kind == "long" else "Short Stability Test"
        fig = plot_stability(read_stability_file(path), f"{name} {title}")
    out = plot_path(path)
    fig.savefig(out)
    return out


# -- Megger spreadsheet -------------------------------------------------------------------------
def write_megger_sheet(path: str | os.PathLike, impedance_GOhm: Sequence[float],
                       sparks: Sequence[int], *, comments: str = "", detector_name: str = "",
                       voltage_V: float = 550.0, date: str = "") -> Path:
    """The lab's Megger spreadsheet: impedance (GOhm) and sparks in 1 min per GEM 1/2/3."""
    from openpyxl import Workbook
    from openpyxl.styles import Alignment, Font

    if len(impedance_GOhm) != 3 or len(sparks) != 3:
        raise ValueError("the Megger test records 3 foils (GEM 1, GEM 2, GEM 3): give 3 impedances "
                         f"and 3 spark counts, got {len(impedance_GOhm)} and {len(sparks)}")
    wb = Workbook()
    ws = wb.active
    ws.title = MEGGER_SHEET if voltage_V == 550.0 else f"MEGGER Test (at {voltage_V:g} V)"
    bold = Font(bold=True)
    ws["A1"] = f"{ws.title}"
    ws["A1"].font = Font(bold=True, size=14)
    ws["A2"], ws["B2"] = "Detector", detector_name
    ws["A3"], ws["B3"] = "Date", date
    ws["A5"] = "Foil"
    ws["B5"], ws["C5"] = "Impedance (GΩ)", "Number of Sparks (1 min.)"
    for cell in ("A5", "B5", "C5"):
        ws[cell].font = bold
        ws[cell].alignment = Alignment(horizontal="center", wrap_text=True)
    for k in range(3):
        ws.cell(row=6 + k, column=1, value=f"GEM {k + 1}").font = bold
        ws.cell(row=6 + k, column=2, value=float(impedance_GOhm[k]))
        ws.cell(row=6 + k, column=3, value=int(sparks[k]))
    ws["A10"] = "COMMENTS"
    ws["A10"].font = bold
    ws["A11"] = comments
    ws.column_dimensions["A"].width = 14
    ws.column_dimensions["B"].width = 18
    ws.column_dimensions["C"].width = 26
    path = Path(path)
    wb.save(path)
    return path


def read_megger_sheet(path: str | os.PathLike) -> dict:
    """{'impedance_GOhm': [3], 'sparks': [3], 'comments': str, 'detector_name': str}."""
    from openpyxl import load_workbook
    ws = load_workbook(path).active
    if not str(ws.title).startswith("MEGGER Test"):
        raise Qc6FileError(f"{path}: the sheet is {ws.title!r}, not a Megger test sheet")
    return {"impedance_GOhm": [float(ws.cell(row=6 + k, column=2).value) for k in range(3)],
            "sparks": [int(ws.cell(row=6 + k, column=3).value) for k in range(3)],
            "comments": ws["A11"].value or "", "detector_name": ws["B2"].value or ""}


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
                               date=_local(self._last_world).strftime(FILE_DATE))
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
