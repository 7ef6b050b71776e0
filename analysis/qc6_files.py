"""GEM QC6 results: the lab's file formats, their paths and the detector's electrode labels.

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

Fits are in analysis/qc6_fits.py, plots in analysis/qc6_plots.py, the callbacks that write the files
and plots from a run's documents in analysis/qc6_callbacks.py. Pure Python: no ophyd, bluesky or
caproto.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Sequence

import numpy as np

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


def local_time(t_epoch: float) -> datetime:
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
    stem = prefix + local_time(t_epoch).strftime(FILE_DATE)
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
    return f"{local_time(t_epoch).strftime(TRIP_TIME)},{int(channel)},{round(float(voltage_V), 2)}\n"


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
    return f"Started at {local_time(t_epoch).strftime(FILE_DATE)}\n{STABILITY_COLUMNS}\n"


def stability_trip_line(channels: Sequence[int], t_epoch: float) -> str:
    return ",".join(str(int(c)) for c in channels) + "," + local_time(t_epoch).strftime(FILE_DATE) + "\n"


def stability_end_line(t_epoch: float) -> str:
    return f"Test finished at {local_time(t_epoch).strftime(FILE_DATE)}\n"


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
