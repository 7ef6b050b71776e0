"""GEM QC6 plots: trips per foil against voltage (stress), I-V per electrode, trips against time
(stability), and a result file's plot under <file's dir>/Plots/<stem>.png as the lab's scripts draw."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from calbench.analysis.qc6_files import (IvTable, StabilityLog, StressTrips, detect_kind,
                                         detector_name_of, electrode_label, gem_label, plot_path,
                                         read_iv_file, read_stability_file, read_stress_file)
from calbench.analysis.qc6_fits import cumulative_trips

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
