"""PSI EIGER trim/settings files (``noise.snXXX``) and slsDetector's trim-energy interpolation.

File format (slsDetectorPackage ``Module::readSettingsFile`` / ``saveSettingsFile``, sls_detector_tools
``io.write_trimbit_file``), one file per half module, everything int32 little-endian::

    16 DACs (index order of ``DAC_NAMES``) | iodelay | tau [ns] | 256 x 1024 trimbits (row-major)

= 18 + 262144 ints = 1,048,648 bytes, the layout slsDetectorPackage writes since 2017 (commit
0896704 "moved tau to settings file"). PSI's public settings directories still ship two older
layouts, read here and reported in ``TrimFile.layout``:

* 1,048,644 bytes, 16 DACs + iodelay, no tau (2016, e.g. ``settingsdir/eiger/standard/noise.sn031``
  and ``standard.trim``): tau reads as 0 (rate correction off);
* 1,048,640 bytes, 16 DACs only (until 2016, e.g. ``highgain/settings.snbeb045``): tau 0 and
  iodelay None (the file says nothing about it; a loader leaves the detector's iodelay alone).
  In the files of this age the DACs look like millivolts (vtgstv 1278, vishaper 775: half the
  DAC units of later files); they are returned as stored.

slsDetectorPackage 9 itself reads the header of 18 ints from every file and so refuses the two
older layouts ("Could not load all values"); ``write_trim_file`` writes the current layout only.
The trimbits are the half module's 256 x 1024 slice of the assembled image, as sls_detector_tools
writes them: the top half module is image rows 256:512, the bottom one rows 0:256 (per module),
no flip.

Trim energies (``Module::setThresholdEnergy`` / ``interpolateTrim``): the files live at
``{settings_dir}/{settings}/{E}eV/noise.sn{serial:03d}``. A threshold energy equal to a trim energy
loads that file; one strictly between two trim energies interpolates linearly between the bracketing
files with ``Module::linearInterpolation`` (:func:`linear_interpolation`, same operations in the
same order, so the results are bit-identical) for vtrim, vrpreamp, vrshaper, the four vcmp, vcp,
every trimbit and tau. The DACs svp, svn, vtgstv, rxb_rb, rxb_lb, vcn, vishaper and iodelay must be
equal in both files; vcal is taken from the first file. An energy outside the trim-energy list is
refused.

Pure numpy: no ophyd, bluesky or caproto.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike, NDArray

from calbench.contracts.eiger import (DAC_DEFAULTS, DAC_MAX, DAC_MIN, DAC_NAMES, IODELAY_DEFAULT,
                                      N_DACS, SETTINGS_NAMES, TRIMBIT_MAX)

__all__ = [
    "DAC_NAMES", "DAC_DEFAULTS", "IODELAY_DEFAULT", "DAC_MIN", "DAC_MAX", "N_DACS",
    "TRIMBIT_MAX", "HALF_MODULE_SHAPE", "TRIM_FILE_BYTES", "SETTINGS_NAMES",
    "INTERPOLATED_DACS", "EQUAL_DACS",
    "LAYOUT_DACS_IODELAY_TAU", "LAYOUT_DACS_IODELAY", "LAYOUT_DACS", "TRIM_FILE_LAYOUTS",
    "TrimFile", "TrimFileError", "read_trim_file", "write_trim_file",
    "trim_file_path", "serial_from_hostname", "bracket_trim_energies", "interpolate_trim",
    "settings_for_energy", "round_half_away", "linear_interpolation",
]

HALF_MODULE_SHAPE = (256, 1024)
N_TRIMBITS = HALF_MODULE_SHAPE[0] * HALF_MODULE_SHAPE[1]
TRIM_FILE_BYTES = 4 * (N_DACS + 2 + N_TRIMBITS)   # 1,048,648: the layout written

INTERPOLATED_DACS: tuple[str, ...] = ("vtrim", "vrpreamp", "vrshaper", "vcmp_ll", "vcmp_lr",
                                      "vcmp_rl", "vcmp_rr", "vcp")
EQUAL_DACS: tuple[str, ...] = ("vsvp", "vsvn", "vtgstv", "rxb_rb", "rxb_lb", "vcn", "vishaper")

_INT32_LE = np.dtype("<i4")

# The three layouts PSI's settings directories hold, newest first: name -> header ints after the
# trimbit count is taken away (16 DACs, then iodelay and tau where present).
LAYOUT_DACS_IODELAY_TAU = "16 DACs + iodelay + tau"
LAYOUT_DACS_IODELAY = "16 DACs + iodelay"
LAYOUT_DACS = "16 DACs"
_HEADER_INTS = {LAYOUT_DACS_IODELAY_TAU: N_DACS + 2, LAYOUT_DACS_IODELAY: N_DACS + 1,
                LAYOUT_DACS: N_DACS}
TRIM_FILE_LAYOUTS: dict[int, str] = {4 * (n + N_TRIMBITS): name
                                     for name, n in _HEADER_INTS.items()}


class TrimFileError(ValueError):
    """A trim file is malformed or inconsistent; the message names the file and the fix."""


@dataclass(frozen=True)
class TrimFile:
    """Content of one half module's trim/settings file.

    dacs: 16 DAC values (DAC units) in ``DAC_NAMES`` order; iodelay (DAC units; None when the file
    has none); tau_ns: default rate-correction dead time (ns; 0 when the file has none); trimbits:
    256 x 1024 codes 0..63; layout: which of ``TRIM_FILE_LAYOUTS`` the file had.
    """
    dacs: NDArray[np.int32]
    iodelay: int | None
    tau_ns: int
    trimbits: NDArray[np.int32]
    layout: str = LAYOUT_DACS_IODELAY_TAU

    def dac(self, name: str) -> int:
        """Value of one DAC by its slsdet name."""
        return int(self.dacs[DAC_NAMES.index(name)])

    def as_dict(self) -> dict[str, int]:
        """The DACs by name plus iodelay (when the file has one)."""
        out = {n: int(v) for n, v in zip(DAC_NAMES, self.dacs)}
        if self.iodelay is not None:
            out["iodelay"] = int(self.iodelay)
        return out


def _layouts_text() -> str:
    return "; ".join(f"{size:,} bytes ({name}, then 256 x 1024 trimbits)"
                     for size, name in TRIM_FILE_LAYOUTS.items())


def read_trim_file(path: str | os.PathLike) -> TrimFile:
    """Read a PSI EIGER trim/settings file (one half module) in any of the three layouts.

    ``TrimFile.layout`` names the layout read; tau is 0 where the file has none, iodelay None.
    Raises FileNotFoundError (naming the path and how such files are made) when it is missing and
    TrimFileError when its size is none of the layouts' or a trimbit is out of range.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"trim file {path} not found; write it with calbench.contracts.trimfile.write_trim_file "
            "(the calibration does) or copy the module's factory settings there")
    size = path.stat().st_size
    layout = TRIM_FILE_LAYOUTS.get(size)
    if layout is None:
        raise TrimFileError(
            f"{path} has {size:,} bytes; an EIGER trim file (int32 little-endian) has "
            f"{_layouts_text()}. It is truncated or not a trim file: copy it again from the "
            "module's settings directory")
    data = np.fromfile(path, dtype=_INT32_LE).astype(np.int32)
    n_header = _HEADER_INTS[layout]
    trimbits = data[n_header:].reshape(HALF_MODULE_SHAPE)
    bad = np.flatnonzero((trimbits < 0) | (trimbits > TRIMBIT_MAX))
    if bad.size:
        r, c = divmod(int(bad[0]), HALF_MODULE_SHAPE[1])
        raise TrimFileError(f"{path}: trimbit {int(trimbits[r, c])} at row {r}, column {c} is outside "
                            f"0..{TRIMBIT_MAX}; the file is corrupt")
    return TrimFile(dacs=data[:N_DACS].copy(),
                    iodelay=int(data[N_DACS]) if n_header > N_DACS else None,
                    tau_ns=int(data[N_DACS + 1]) if n_header > N_DACS + 1 else 0,
                    trimbits=trimbits.copy(), layout=layout)


def write_trim_file(path: str | os.PathLike, dacs: ArrayLike, iodelay: int, tau: int,
                    trimbits: ArrayLike) -> Path:
    """Write a PSI EIGER trim/settings file for one half module in the current layout (16 DACs +
    iodelay + tau, 1,048,648 bytes), bit-compatible with slsDetectorPackage.

    dacs: 16 values (DAC units, ``DAC_NAMES`` order) or 17 (with iodelay, as slsdet's
    ``dacs.get_asarray()[:, i]``; then it must agree with ``iodelay``); iodelay (DAC units); tau:
    dead time (ns); trimbits: 256 x 1024 (or 262144) integer codes 0..63. Parent directories are
    created; the file appears atomically. Returns the path.
    """
    path = Path(path)
    if iodelay is None:
        raise TrimFileError(f"{path}: no iodelay given (a 16-DAC file has none); the current "
                            "layout needs one: pass the detector's iodelay")
    dacs = np.asarray(dacs)
    if dacs.ndim != 1 or dacs.size not in (N_DACS, N_DACS + 1):
        raise TrimFileError(f"{path}: need {N_DACS} DAC values ({', '.join(DAC_NAMES)}), "
                            f"got an array of shape {dacs.shape}")
    if dacs.size == N_DACS + 1:
        if int(round(float(dacs[-1]))) != int(iodelay):
            raise TrimFileError(f"{path}: the 17th DAC value (iodelay {dacs[-1]}) disagrees with "
                                f"iodelay={iodelay}; pass 16 DACs or make them agree")
        dacs = dacs[:N_DACS]
    if not np.all(np.isfinite(dacs.astype(float))) or np.any(np.round(dacs) != dacs):
        raise TrimFileError(f"{path}: DAC values must be integers, got {dacs.tolist()}")
    tb = np.asarray(trimbits)
    if tb.size != HALF_MODULE_SHAPE[0] * HALF_MODULE_SHAPE[1]:
        raise TrimFileError(f"{path}: need 256 x 1024 trimbits (one half module), got shape "
                            f"{tb.shape}")
    if np.any(np.round(tb) != tb) or tb.min() < 0 or tb.max() > TRIMBIT_MAX:
        raise TrimFileError(f"{path}: trimbits must be integers 0..{TRIMBIT_MAX} (got "
                            f"{tb.min()}..{tb.max()}); clip and round them first")
    header = np.concatenate([dacs.astype(np.int64), [int(iodelay), int(tau)]])
    if np.any(np.abs(header) > np.iinfo(np.int32).max):
        raise TrimFileError(f"{path}: a DAC, iodelay or tau does not fit in int32")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        f.write(header.astype(_INT32_LE).tobytes())
        f.write(np.ascontiguousarray(tb.reshape(HALF_MODULE_SHAPE), dtype=_INT32_LE).tobytes())
    os.replace(tmp, path)
    return path


def serial_from_hostname(hostname: str) -> str:
    """Module serial used in trim-file names: 'beb058' -> '058' (sls_detector_tools: hostname[3:])."""
    digits = "".join(ch for ch in hostname if ch.isdigit())
    if not digits:
        raise ValueError(f"hostname {hostname!r} carries no serial number (expected e.g. 'beb058')")
    return f"{int(digits):03d}"


def trim_file_path(settings_dir: str | os.PathLike, settings: str, energy_eV: int,
                   serial: str | int) -> Path:
    """``{settings_dir}/{settings}/{E}eV/noise.sn{serial:03d}`` (slsDetector getTrimbitFilename)."""
    if settings not in SETTINGS_NAMES:
        raise ValueError(f"settings {settings!r} unknown for EIGER; use one of "
                         f"{', '.join(SETTINGS_NAMES)}")
    serial = f"{int(serial):03d}"
    return Path(settings_dir) / settings / f"{int(energy_eV)}eV" / f"noise.sn{serial}"


def round_half_away(x: ArrayLike) -> NDArray[np.int64]:
    """Round half away from zero (C ``round``), elementwise, to int64.

    Exact for every double: the fraction ``x - trunc(x)`` is computed without rounding, so e.g.
    0.49999999999999994 gives 0 (``floor(|x| + 0.5)`` would give 1)."""
    x = np.asarray(x, dtype=float)
    whole = np.trunc(x)
    return (whole + np.where(np.abs(x - whole) >= 0.5, np.sign(x), 0.0)).astype(np.int64)


def linear_interpolation(x: int, x1: int, x2: int, y1: ArrayLike, y2: ArrayLike
                         ) -> NDArray[np.int64]:
    """slsDetectorPackage's ``Module::linearInterpolation`` elementwise, bit for bit.

    Upstream (C++, doubles): ``k = double(y2 - y1) / (x2 - x1)``, ``m = y1 - k * x1``,
    ``y = round(k * x + m)``; the integer differences are exact, every double operation here is
    the same IEEE operation in the same order, and C ``round`` is :func:`round_half_away`. This
    matches builds that do not fuse ``k * x + m`` into one multiply-add (x86-64 without -mfma,
    slsDetectorPackage's default); an FMA build can differ at exact .5 ties. x, x1, x2: energies
    (eV, integers); y1, y2: integer values at x1 and x2 (DACs, trimbits, tau)."""
    y1 = np.asarray(y1, dtype=np.int64)
    y2 = np.asarray(y2, dtype=np.int64)
    k = (y2 - y1).astype(np.float64) / float(int(x2) - int(x1))
    m = y1.astype(np.float64) - k * float(x1)
    return round_half_away(k * float(x) + m)


def bracket_trim_energies(energy_eV: int, trim_energies: Sequence[int]) -> tuple[int, int] | int:
    """The trim energy equal to ``energy_eV`` (an int) or the two bracketing it (a tuple).

    Raises ValueError, naming the allowed range, if the energy is outside the (sorted) list."""
    energies = sorted(int(e) for e in trim_energies)
    e = int(energy_eV)
    if not energies or e < energies[0] or e > energies[-1]:
        span = f"{energies[0]}..{energies[-1]} eV" if energies else "empty"
        raise ValueError(f"This energy {e} not defined for this module! (trim energies {span}); "
                         "choose an energy inside the trim-energy list or add trim files for it")
    if e in energies:
        return e
    for lo, hi in zip(energies[:-1], energies[1:]):
        if lo < e < hi:
            return lo, hi
    raise AssertionError("unreachable: energy inside the range but not bracketed")


def interpolate_trim(energy_eV: int, e1: int, a: TrimFile, e2: int, b: TrimFile,
                     *, trimbits: bool = True) -> TrimFile:
    """slsDetector's interpolation of two trim files to a threshold energy between them (eV).

    Raises TrimFileError when a DAC that must agree (``EQUAL_DACS``, iodelay) differs; vcal is taken
    from the first file (a warning when they differ). With trimbits=False the result carries the
    first file's trimbits (slsDetector leaves the detector's trimbits alone then)."""
    if not e1 < energy_eV < e2:
        raise ValueError(f"energy {energy_eV} eV is not strictly between {e1} and {e2} eV")
    if a.iodelay != b.iodelay:          # None (a 16-DAC file) matches only None
        raise TrimFileError(f"iodelay differs between the {e1} eV and {e2} eV trim files "
                            f"({a.iodelay} vs {b.iodelay}); they cannot be interpolated")
    for name in EQUAL_DACS:
        if a.dac(name) != b.dac(name):
            raise TrimFileError(f"DAC {name} differs between the {e1} eV and {e2} eV trim files "
                                f"({a.dac(name)} vs {b.dac(name)}); they cannot be interpolated")
    if a.dac("vcal") != b.dac("vcal"):
        warnings.warn(f"DAC vcal differs between the {e1} eV and {e2} eV trim files "
                      f"({a.dac('vcal')}, {b.dac('vcal')}); taking the first", stacklevel=2)

    def lin(y1, y2):
        return linear_interpolation(energy_eV, e1, e2, y1, y2)

    dacs = a.dacs.astype(np.int64).copy()
    for name in INTERPOLATED_DACS:
        i = DAC_NAMES.index(name)
        dacs[i] = lin(a.dacs[i], b.dacs[i])
    tb = (lin(a.trimbits, b.trimbits) if trimbits else a.trimbits).astype(np.int32)
    # the result is no file: it carries the older layout of the two (what its fields can say)
    layout = max(a.layout, b.layout, key=lambda name: -_HEADER_INTS[name])
    return TrimFile(dacs=dacs.astype(np.int32), iodelay=a.iodelay,
                    tau_ns=int(lin(a.tau_ns, b.tau_ns)), trimbits=tb, layout=layout)


def settings_for_energy(energy_eV: int, trim_energies: Sequence[int],
                        load: Callable[[int], TrimFile], *, trimbits: bool = True) -> TrimFile:
    """The settings slsDetector applies for a threshold energy (eV): the matching trim file, or the
    interpolation of the two bracketing ones. ``load(E)`` returns the TrimFile for trim energy E."""
    found = bracket_trim_energies(energy_eV, trim_energies)
    if isinstance(found, int):
        return load(found)
    e1, e2 = found
    return interpolate_trim(int(energy_eV), e1, load(e1), e2, load(e2), trimbits=trimbits)
