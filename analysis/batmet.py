"""BatMet current-sink calibration: the quadratic fit, the `csink` line, the lab's file format, plots.

The procedure (reference/qc6_batmet.md part B, `cal_sink.py`): the sink's DAC code is scanned while a
34401A in series measures the current; the points before the current first exceeds 0.1 mA (the DAC
dead zone) are dropped, and the DAC code is fitted as a quadratic in the current,

    DAC = a*I**2 + b*I + c          (I in A; b in codes/A, about 763; c about 520 codes)

which the BatMet firmware evaluates for `sink <I>` once `csink <min> <max> <a> <b> <c>` has stored it
(min and max: the allowed current range, 0 and 4 A in the lab's tool).

The accuracy figures are currents: for every fitted point, the measured current minus the current the
fitted transfer predicts at that DAC code (max and RMS over the fitted range, 0..3 A in the lab's
scan). The lab quotes about 2 mA. A `sink` setting adds at most half a DAC code of rounding
(`lsb_A / 2`, about 0.66 mA).

Files: `DAC<TAB>current` per line (`450\\t5.1925633333333336e-05`), as `collect.py | tee` writes them.
Pure numpy/matplotlib: no ophyd, no RunEngine, no caproto.
"""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike

from calbench.contracts.batmet import DAC_MAX

__all__ = [
    "CSINK_RANGE_A", "MIN_CURRENT_A", "DAC_MAX", "CalibrationFileError", "SinkFit",
    "SinkAccuracy", "fit_sink", "csink_line", "read_calibration_file", "write_calibration_file",
    "format_point", "setting_accuracy", "plot_sink_fit", "sink_data_from_table",
]

CSINK_RANGE_A = (0.0, 4.0)     # the lab tool's hard-coded `csink 0 4 ...` range
MIN_CURRENT_A = 1e-4           # points at or below 0.1 mA are the dead zone (reference: 1e-4 A)


class CalibrationFileError(ValueError):
    """A calibration file that cannot be read; the message names the file, the line and the fix."""


@dataclass(frozen=True)
class SinkFit:
    """A fitted sink transfer DAC = a*I^2 + b*I + c, the points it used and its accuracy.

    a: codes/A^2, b: codes/A, c: codes; *_err their standard errors. current_error_A: per fitted
    point, measured current minus the current the fit predicts at its DAC code (A)."""
    a: float
    b: float
    c: float
    a_err: float
    b_err: float
    c_err: float
    dac: np.ndarray = field(repr=False)
    current_A: np.ndarray = field(repr=False)
    current_error_A: np.ndarray = field(repr=False)
    n_dropped: int = 0

    @property
    def n_points(self) -> int:
        return int(self.dac.size)

    @property
    def max_error_A(self) -> float:
        """Largest |current error| over the fitted points (A)."""
        return float(np.max(np.abs(self.current_error_A)))

    @property
    def rms_error_A(self) -> float:
        """RMS current error over the fitted points (A)."""
        return float(np.sqrt(np.mean(self.current_error_A ** 2)))

    @property
    def current_range_A(self) -> tuple[float, float]:
        return float(self.current_A.min()), float(self.current_A.max())

    @property
    def lsb_A(self) -> float:
        """Current per DAC code at the top of the fitted range (A): the setting resolution."""
        return float(1.0 / (2 * self.a * self.current_range_A[1] + self.b))

    def dac_for(self, current_A: ArrayLike) -> np.ndarray:
        """DAC code (not rounded) for currents in A."""
        i = np.asarray(current_A, dtype=float)
        return self.a * i * i + self.b * i + self.c

    def current_for(self, dac: ArrayLike) -> np.ndarray:
        """Current (A) the fitted transfer gives at DAC codes; 0 below the dead-zone edge c."""
        return _current_for(np.asarray(dac, dtype=float), self.a, self.b, self.c)

    def csink_line(self, min_A: float = CSINK_RANGE_A[0], max_A: float = CSINK_RANGE_A[1]) -> str:
        """The BatMet command that stores this calibration."""
        return csink_line(self.a, self.b, self.c, min_A, max_A)

    def as_dict(self) -> dict:
        """JSON-able summary (for run metadata and reports)."""
        return {"a": self.a, "b": self.b, "c": self.c, "a_err": self.a_err, "b_err": self.b_err,
                "c_err": self.c_err, "n_points": self.n_points, "n_dropped": self.n_dropped,
                "max_error_A": self.max_error_A, "rms_error_A": self.rms_error_A,
                "lsb_A": self.lsb_A, "current_range_A": list(self.current_range_A),
                "csink": self.csink_line()}


@dataclass(frozen=True)
class SinkAccuracy:
    """Errors of currents set with `sink` (measured - requested, A)."""
    target_A: np.ndarray = field(repr=False)
    error_A: np.ndarray = field(repr=False)

    @property
    def max_error_A(self) -> float:
        return float(np.max(np.abs(self.error_A)))

    @property
    def rms_error_A(self) -> float:
        return float(np.sqrt(np.mean(self.error_A ** 2)))


def _current_for(dac: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
    e = np.maximum(dac - c, 0.0)
    # positive root of a*I^2 + b*I - e = 0, in the form that stays accurate for small a*e
    disc = np.maximum(b * b + 4 * a * e, 0.0)
    return 2 * e / (b + np.sqrt(disc))


def _as_points(dac: ArrayLike, current_A: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    d = np.asarray(dac, dtype=float)
    i = np.asarray(current_A, dtype=float)
    if d.ndim != 1 or i.ndim != 1 or d.shape != i.shape:
        raise ValueError(f"dac and current_A must be 1-D arrays of equal length (got shapes "
                         f"{d.shape} and {i.shape})")
    bad = ~(np.isfinite(d) & np.isfinite(i))
    if bad.any():
        k = int(np.argmax(bad))
        raise ValueError(f"point {k} (DAC {d[k]}, current {i[k]}) is not a finite number; "
                         "remove it or re-measure")
    return d, i


def fit_sink(dac: ArrayLike, current_A: ArrayLike, *, min_current_A: float = MIN_CURRENT_A,
             max_current_A: float | None = None, valid: ArrayLike | None = None) -> SinkFit:
    """Fit DAC = a*I^2 + b*I + c to a sink scan (DAC codes, currents in A).

    As the lab's tool does, the points before the current first exceeds min_current_A (the dead
    zone) are dropped; of the rest, those at or below min_current_A, above max_current_A (if given)
    or not `valid` (e.g. the supply was clamping the current) are left out too. The fit is ordinary
    least squares of the DAC code on the current (the tool's curve_fit). Raises ValueError, saying
    why, when fewer than 4 points are left or the transfer does not rise with current."""
    d, i = _as_points(dac, current_A)
    keep = np.ones(d.size, bool) if valid is None else np.asarray(valid, bool).copy()
    if keep.shape != d.shape:
        raise ValueError(f"valid has shape {keep.shape}, expected {d.shape}")
    above = i > min_current_A
    if not above.any():
        raise ValueError(f"no current above {min_current_A * 1e3:g} mA in {d.size} points: the "
                         "sink never conducted; check that the supply is on and the meter is in "
                         "series on its current input")
    first = int(np.argmax(above))
    keep[:first] = False
    keep &= above
    if max_current_A is not None:
        keep &= i <= max_current_A
    n_kept = int(keep.sum())
    if n_kept < 4:
        raise ValueError(f"only {n_kept} usable points above {min_current_A * 1e3:g} mA; a "
                         "quadratic fit needs at least 4: scan more DAC codes")
    dk, ik = d[keep], i[keep]
    design = np.column_stack([ik * ik, ik, np.ones_like(ik)])
    coef, *_ = np.linalg.lstsq(design, dk, rcond=None)
    a, b, c = (float(x) for x in coef)
    residual = dk - design @ coef
    dof = max(n_kept - 3, 1)
    cov = np.linalg.inv(design.T @ design) * float(residual @ residual) / dof
    errs = np.sqrt(np.maximum(np.diag(cov), 0.0))
    if np.any(2 * a * ik + b <= 0):
        raise ValueError(f"the fitted DAC code does not rise with current (a={a:g}, b={b:g}); "
                         "the scan is not a sink transfer: check the wiring and the meter range")
    error_A = ik - _current_for(dk, a, b, c)
    return SinkFit(a, b, c, float(errs[0]), float(errs[1]), float(errs[2]), dk, ik, error_A,
                   n_dropped=int(d.size - n_kept))


def csink_line(a: float, b: float, c: float, min_A: float = CSINK_RANGE_A[0],
               max_A: float = CSINK_RANGE_A[1]) -> str:
    """`csink <min> <max> <a> <b> <c>`: the range in A, the coefficients with 6 decimals (as the
    lab's tool prints them), e.g. `csink 0 4 0.209938 762.136354 522.857571`."""
    values = (min_A, max_A, a, b, c)
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"csink values {values} must all be finite")
    if not 0 <= min_A < max_A:
        raise ValueError(f"csink range {min_A:g}..{max_A:g} A: need 0 <= min < max")
    return f"csink {min_A:g} {max_A:g} {a:.6f} {b:.6f} {c:.6f}"


def setting_accuracy(target_A: ArrayLike, measured_A: ArrayLike) -> SinkAccuracy:
    """Errors of a `sink` verification sweep: measured - requested current (A)."""
    t, m = _as_points(target_A, measured_A)
    if t.size == 0:
        raise ValueError("no verification points")
    return SinkAccuracy(t, m - t)


# -- the lab's file format ---------------------------------------------------------------------------

def format_point(dac: int, current_A: float) -> str:
    """One line of a calibration file, as the lab's `collect.py` prints it: `450\\t5.19...e-05`."""
    return f"{int(dac)}\t{float(current_A)!r}"


def read_calibration_file(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a `DAC<TAB>current` file: (DAC codes, currents in A). Blank lines and `#` comments are
    skipped; fields may be separated by tabs or spaces. Raises CalibrationFileError naming the line
    for anything else (missing file, wrong column count, a DAC code that is not an integer in
    0..4095 or does not increase, a current that is not a finite number)."""
    p = Path(path)
    if not p.is_file():
        raise CalibrationFileError(f"calibration file {p} not found; collect one with "
                                   f"`calbench batmet collect -o {p.name}` (or `... | tee {p.name}`)")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CalibrationFileError(f"{p} is not a text file; expected lines 'DAC<TAB>current'") \
            from None
    hint = "expected 'DAC<TAB>current', e.g. '450\\t5.19e-05'"
    dacs: list[int] = []
    currents: list[float] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) != 2:
            raise CalibrationFileError(f"{p}:{lineno}: {len(fields)} fields in {raw!r}; {hint}")
        try:
            code_f = float(fields[0])
            current = float(fields[1])
        except ValueError:
            raise CalibrationFileError(f"{p}:{lineno}: {raw!r} is not two numbers; {hint}") \
                from None
        if not code_f.is_integer() or not 0 <= code_f <= DAC_MAX:
            raise CalibrationFileError(f"{p}:{lineno}: DAC {fields[0]!r} is not an integer code "
                                       f"in 0..{DAC_MAX}; {hint}")
        if not math.isfinite(current):
            raise CalibrationFileError(f"{p}:{lineno}: current {fields[1]!r} is not a finite "
                                       "number; re-measure that point or delete the line")
        if dacs and int(code_f) <= dacs[-1]:
            raise CalibrationFileError(
                f"{p}:{lineno}: DAC {int(code_f)} after {dacs[-1]}: codes must increase line by "
                "line (are two collections in one file?); keep one scan per file")
        dacs.append(int(code_f))
        currents.append(current)
    if not dacs:
        raise CalibrationFileError(f"{p} has no data lines; {hint}")
    return np.array(dacs, dtype=int), np.array(currents, dtype=float)


def write_calibration_file(path: str | os.PathLike, dac: ArrayLike, current_A: ArrayLike) -> Path:
    """Write a `DAC<TAB>current` file atomically (complete or not at all); returns the path."""
    d, i = _as_points(dac, current_A)
    text = "".join(format_point(x, y) + "\n" for x, y in zip(d, i))
    return _atomic_write(Path(path), text.encode())


def _atomic_write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# -- stored runs ---------------------------------------------------------------------------------

def sink_data_from_table(table, *, dac_key: str, current_key: str,
                         limited_key: str | None = None
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(DAC codes, currents A, limited flags) from a run's event table (a mapping of column name to
    array: an xarray Dataset or a pandas DataFrame read from tiled). `limited` marks points where
    the supply was clamping the current (all False without a supply column)."""
    missing = [k for k in (dac_key, current_key) if k not in table]
    if missing:
        raise ValueError(f"the run has no column(s) {', '.join(missing)}; it is not a BatMet sink "
                         "scan (columns: " + ", ".join(map(str, list(table)[:12])) + ")")
    dac = np.asarray(table[dac_key], dtype=float)
    current = np.asarray(table[current_key], dtype=float)
    if limited_key and limited_key in table:
        limited = np.asarray(table[limited_key]).astype(bool)
    else:
        limited = np.zeros(dac.shape, bool)
    return dac, current, limited


# -- plots ---------------------------------------------------------------------------------------

def plot_sink_fit(fit: SinkFit, dac: ArrayLike | None = None, current_A: ArrayLike | None = None,
                  *, path: str | os.PathLike | None = None, title: str = "BatMet current sink"):
    """Figure of a sink calibration: the scan and the fitted transfer (top), the current error of
    each fitted point in mA with its max and RMS (bottom). Saved (atomically) when path is given;
    returns the matplotlib Figure."""
    from matplotlib.figure import Figure

    d_all = fit.dac if dac is None else np.asarray(dac, dtype=float)
    i_all = fit.current_A if current_A is None else np.asarray(current_A, dtype=float)
    fig = Figure(figsize=(8, 7), constrained_layout=True)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    top.plot(i_all, d_all, ".", color="0.6", ms=4, label="scan")
    top.plot(fit.current_A, fit.dac, ".", ms=4, label=f"fitted ({fit.n_points} points)")
    grid = np.linspace(0, fit.current_range_A[1], 200)
    top.plot(grid, fit.dac_for(grid), "-", lw=1, color="C3",
             label=f"DAC = {fit.a:.4g} I² + {fit.b:.6g} I + {fit.c:.6g}")
    top.set_ylabel("DAC code")
    top.legend(loc="upper left", fontsize=8)
    top.set_title(f"{title}\n{fit.csink_line()}", fontsize=10)
    err_mA = fit.current_error_A * 1e3
    bottom.axhline(0, color="0.5", lw=0.8)
    bottom.plot(fit.current_A, err_mA, ".", ms=4, color="C0")
    for sign in (1, -1):
        bottom.axhline(sign * fit.max_error_A * 1e3, color="C3", lw=0.8, ls="--")
        bottom.axhline(sign * fit.rms_error_A * 1e3, color="C2", lw=0.8, ls=":")
    bottom.set_xlabel("Current [A]")
    bottom.set_ylabel("measured − fit [mA]")
    bottom.text(0.01, 0.95, f"max {fit.max_error_A * 1e3:.2f} mA (dashed), "
                f"RMS {fit.rms_error_A * 1e3:.2f} mA (dotted), 1 DAC code = "
                f"{fit.lsb_A * 1e3:.2f} mA", transform=bottom.transAxes, va="top", fontsize=8)
    if path is not None:
        p = Path(path)
        suffix = p.suffix.lstrip(".") or "png"
        import io
        buf = io.BytesIO()
        fig.savefig(buf, format=suffix, dpi=120)
        _atomic_write(p, buf.getvalue())
    return fig
