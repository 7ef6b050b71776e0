"""GEM QC6 analysis: leakage resistance from an electrode's I-V points, trips against time."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from calbench.analysis.qc6_files import StabilityLog

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
