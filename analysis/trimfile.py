"""PSI EIGER trim/settings files (``noise.snXXX``) and slsDetector's trim-energy interpolation.

File format (slsDetectorPackage ``Module::readSettingsFile`` / ``saveSettingsFile``, sls_detector_tools
``io.write_trimbit_file``), one file per half module, everything int32 little-endian::

    16 DACs (index order of ``DAC_NAMES``) | iodelay | tau [ns] | 256 x 1024 trimbits (row-major)

= 18 + 262144 ints = 1,048,648 bytes. The trimbits are the half module's 256 x 1024 slice of the
assembled image, as sls_detector_tools writes them: the top half module is image rows 256:512, the
bottom one rows 0:256 (per module), no flip.

Trim energies (``Module::setThresholdEnergyAndSettings`` / ``interpolateTrim``): the files live at
``{settings_dir}/{settings}/{E}eV/noise.sn{serial:03d}``. A threshold energy equal to a trim energy
loads that file; one strictly between two trim energies interpolates linearly between the bracketing
files, ``y = round(k*E + y1 - k*E1)`` with ``k = (y2 - y1)/(E2 - E1)`` (rounded half away from zero as
C++ ``std::round``), for vtrim, vrpreamp, vrshaper, the four vcmp, vcp, every trimbit and tau. The
DACs svp, svn, vtgstv, rxb_rb, rxb_lb, vcn, vishaper and iodelay must be equal in both files; vcal
is taken from the first file. An energy outside the trim-energy list is refused.

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

__all__ = [
    "DAC_NAMES", "DAC_DEFAULTS", "IODELAY_DEFAULT", "DAC_MIN", "DAC_MAX", "N_DACS",
    "TRIMBIT_MAX", "HALF_MODULE_SHAPE", "TRIM_FILE_BYTES", "SETTINGS_NAMES",
    "INTERPOLATED_DACS", "EQUAL_DACS",
    "TrimFile", "TrimFileError", "read_trim_file", "write_trim_file",
    "trim_file_path", "serial_from_hostname", "bracket_trim_energies", "interpolate_trim",
    "settings_for_energy", "round_half_away",
]

# slsDetectorPackage eigerDetectorServer/slsDetectorServer_defs.h, index order of the trim file.
DAC_NAMES: tuple[str, ...] = (
    "vsvp", "vtrim", "vrpreamp", "vrshaper", "vsvn", "vtgstv", "vcmp_ll", "vcmp_lr",
    "vcal", "vcmp_rl", "rxb_rb", "rxb_lb", "vcmp_rr", "vcp", "vcn", "vishaper",
)
# Detector server defaults (DAC units).
DAC_DEFAULTS: dict[str, int] = {
    "vsvp": 0, "vtrim": 2480, "vrpreamp": 3300, "vrshaper": 1400, "vsvn": 4000, "vtgstv": 2556,
    "vcmp_ll": 1000, "vcmp_lr": 1000, "vcal": 0, "vcmp_rl": 1000, "rxb_rb": 1100, "rxb_lb": 1100,
    "vcmp_rr": 1000, "vcp": 1000, "vcn": 2000, "vishaper": 1550,
}
IODELAY_DEFAULT = 650
N_DACS = len(DAC_NAMES)
DAC_MIN, DAC_MAX = 0, 4000          # LTC2620, 12 bit, 2048 mV full scale
TRIMBIT_MAX = 63                    # 6-bit trimbits
HALF_MODULE_SHAPE = (256, 1024)
TRIM_FILE_BYTES = 4 * (N_DACS + 2 + HALF_MODULE_SHAPE[0] * HALF_MODULE_SHAPE[1])   # 1,048,648
SETTINGS_NAMES: tuple[str, ...] = ("standard", "highgain", "lowgain", "veryhighgain", "verylowgain")

INTERPOLATED_DACS: tuple[str, ...] = ("vtrim", "vrpreamp", "vrshaper", "vcmp_ll", "vcmp_lr",
                                      "vcmp_rl", "vcmp_rr", "vcp")
EQUAL_DACS: tuple[str, ...] = ("vsvp", "vsvn", "vtgstv", "rxb_rb", "rxb_lb", "vcn", "vishaper")

_INT32_LE = np.dtype("<i4")


class TrimFileError(ValueError):
    """A trim file is malformed or inconsistent; the message names the file and the fix."""


@dataclass(frozen=True)
class TrimFile:
    """Content of one half module's trim/settings file.

    dacs: 16 DAC values (DAC units) in ``DAC_NAMES`` order; iodelay (DAC units); tau_ns: default
    rate-correction dead time (ns); trimbits: 256 x 1024 codes 0..63.
    """
    dacs: NDArray[np.int32]
    iodelay: int
    tau_ns: int
    trimbits: NDArray[np.int32]

    def dac(self, name: str) -> int:
        """Value of one DAC by its slsdet name."""
        return int(self.dacs[DAC_NAMES.index(name)])

    def as_dict(self) -> dict[str, int]:
        """The DACs by name plus iodelay."""
        return {**{n: int(v) for n, v in zip(DAC_NAMES, self.dacs)}, "iodelay": int(self.iodelay)}


def read_trim_file(path: str | os.PathLike) -> TrimFile:
    """Read a PSI EIGER trim/settings file (one half module).

    Raises FileNotFoundError (naming the path and how such files are made) when it is missing and
    TrimFileError when its size is not 1,048,648 bytes or a value is out of range.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"trim file {path} not found; write it with calbench.analysis.trimfile.write_trim_file "
            "(the calibration does) or copy the module's factory settings there")
    size = path.stat().st_size
    if size != TRIM_FILE_BYTES:
        raise TrimFileError(
            f"{path} has {size} bytes, an EIGER trim file has {TRIM_FILE_BYTES} (16 DACs, iodelay, "
            "tau, 256 x 1024 trimbits as int32); it is truncated or not a trim file")
    data = np.fromfile(path, dtype=_INT32_LE).astype(np.int32)
    trimbits = data[N_DACS + 2:].reshape(HALF_MODULE_SHAPE)
    bad = np.flatnonzero((trimbits < 0) | (trimbits > TRIMBIT_MAX))
    if bad.size:
        r, c = divmod(int(bad[0]), HALF_MODULE_SHAPE[1])
        raise TrimFileError(f"{path}: trimbit {int(trimbits[r, c])} at row {r}, column {c} is outside "
                            f"0..{TRIMBIT_MAX}; the file is corrupt")
    return TrimFile(dacs=data[:N_DACS].copy(), iodelay=int(data[N_DACS]),
                    tau_ns=int(data[N_DACS + 1]), trimbits=trimbits.copy())


def write_trim_file(path: str | os.PathLike, dacs: ArrayLike, iodelay: int, tau: int,
                    trimbits: ArrayLike) -> Path:
    """Write a PSI EIGER trim/settings file for one half module, bit-compatible with slsDetector.

    dacs: 16 values (DAC units, ``DAC_NAMES`` order) or 17 (with iodelay, as slsdet's
    ``dacs.get_asarray()[:, i]``; then it must agree with ``iodelay``); iodelay (DAC units); tau:
    dead time (ns); trimbits: 256 x 1024 (or 262144) integer codes 0..63. Parent directories are
    created; the file appears atomically. Returns the path.
    """
    path = Path(path)
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
    """Round half away from zero (C++ std::round), elementwise, to int64."""
    x = np.asarray(x, dtype=float)
    return (np.sign(x) * np.floor(np.abs(x) + 0.5)).astype(np.int64)


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
    if a.iodelay != b.iodelay:
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
        k = (np.asarray(y2, float) - np.asarray(y1, float)) / (e2 - e1)
        return round_half_away(k * energy_eV + np.asarray(y1, float) - k * e1)

    dacs = a.dacs.astype(np.int64).copy()
    for name in INTERPOLATED_DACS:
        i = DAC_NAMES.index(name)
        dacs[i] = lin(a.dacs[i], b.dacs[i])
    tb = (lin(a.trimbits, b.trimbits) if trimbits else a.trimbits).astype(np.int32)
    return TrimFile(dacs=dacs.astype(np.int32), iodelay=a.iodelay,
                    tau_ns=int(lin(a.tau_ns, b.tau_ns)), trimbits=tb)


def settings_for_energy(energy_eV: int, trim_energies: Sequence[int],
                        load: Callable[[int], TrimFile], *, trimbits: bool = True) -> TrimFile:
    """The settings slsDetector applies for a threshold energy (eV): the matching trim file, or the
    interpolation of the two bracketing ones. ``load(E)`` returns the TrimFile for trim energy E."""
    found = bracket_trim_energies(energy_eV, trim_energies)
    if isinstance(found, int):
        return load(found)
    e1, e2 = found
    return interpolate_trim(int(energy_eV), e1, load(e1), e2, load(e2), trimbits=trimbits)
