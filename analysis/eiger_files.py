"""Files of an EIGER calibration in the names and layouts of PSI's detector software.

In the calibration's results directory (``{results_dir}/{det_id}/{gain}``, PSI's ``cfg.path.data``),
``{t}`` the target and ``{r}`` the run id (0 untrimmed, 1 trimmed):

    {det_id}_vrf_{t}XRF_{r}.npz         vrf scan: data [rows, cols, n] float64, x (vrf DAC)
    {det_id}_vcmp_{t}XRF_{r}.npz        threshold scan: data [rows, cols, n] float64, x (vthreshold)
    {det_id}_vcmp_{t}XRF_{r}_fit.npy    per-pixel S-curve fit, structured [rows, cols]: p0, p1, mu,
                                        sigma, A, C (PSI's fields) + errors, chi2, status
    {det_id}_tbscan_{t}XRF_{r}.npz      trimbit scan: data [rows, cols, n] float64, x (trimbits)
    {det_id}_{t}XRF_{gain}.npz          trimbits [rows, cols] int32, fit (crossing fit), target,
                                        trimmed, bad (0 good, 1 dead, 2 hot, 3 noisy, 4 unfitted)
    {det_id}_{t}XRF_{gain}.snNNN        binary trim file per half module (calbench/contracts/trimfile.py)
    calibration.npz                     p0, p1 (E = p0 + p1*vcmp per chip), mu, energy
    calibration.snNNN                   text, per chip of the half module "m k" (%.2f %.2f), with
                                        vcmp = m - k*E[keV], chips in vcmp_ll, lr, rl, rr order
                                        (top half module chips 0..3, bottom 7..4); PSI's own
                                        files (slsDetectorPackage settingsdir) add a fifth line,
                                        tau [ns]
    settings/{gain}/noise.snNNN         the trim files as a settings directory holds them
    {det_id}_{gain}_calibration_report.pdf

PSI builds the fit file name with ``.strip('.npz')``, which strips characters, not a suffix; for
these names (ending in the run id) that is the same as removing the suffix, as done here.

Also here: the HDF5 layout of analysis arrays that derived runs register in tiled
(:func:`write_result_arrays`). Pure numpy/h5py.
"""
from __future__ import annotations

import math
import os
import shutil
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np
from numpy.typing import ArrayLike, NDArray

from calbench.analysis.eiger_calibration import EnergyCalibration
from calbench.contracts.eiger_geometry import VCMP_NAMES, EigerGeometry
from calbench.contracts.trimfile import DAC_MAX, DAC_MIN, N_DACS, write_trim_file

__all__ = [
    "vrf_scan_name", "scurve_name", "fit_name", "trimbit_scan_name", "trim_prefix_name",
    "trimbits_name", "calibration_text_name", "report_name", "save_scan", "load_scan",
    "save_fit", "save_trimbits", "write_trim_files", "chips_in_file_order",
    "write_calibration_text", "CalibrationText", "CalibrationFileError", "read_calibration_text",
    "save_calibration", "install_settings",
    "RESULTS_DATASET_ROOT", "write_result_arrays",
]

RESULTS_DATASET_ROOT = "/entry/results"


def vrf_scan_name(det_id: str, target: str, run_id: int) -> str:
    return f"{det_id}_vrf_{target}XRF_{int(run_id)}.npz"


def scurve_name(det_id: str, target: str, run_id: int) -> str:
    return f"{det_id}_vcmp_{target}XRF_{int(run_id)}.npz"


def fit_name(det_id: str, target: str, run_id: int) -> str:
    return scurve_name(det_id, target, run_id).removesuffix(".npz") + "_fit.npy"


def trimbit_scan_name(det_id: str, target: str, run_id: int) -> str:
    return f"{det_id}_tbscan_{target}XRF_{int(run_id)}.npz"


def trim_prefix_name(det_id: str, target: str, gain: str) -> str:
    """Trim files without the ``.snNNN`` suffix (what slsdet's ``d.trimbits = path`` takes)."""
    return f"{det_id}_{target}XRF_{gain}"


def trimbits_name(det_id: str, target: str, gain: str) -> str:
    return trim_prefix_name(det_id, target, gain) + ".npz"


def calibration_text_name(serial: str) -> str:
    return f"calibration.sn{serial}"


def report_name(det_id: str, gain: str) -> str:
    return f"{det_id}_{gain}_calibration_report.pdf"


# a numpy scan is taken by save_scan in bands of rows of about this size (as float64)
SCAN_BAND_BYTES = 64 * 2**20


def _atomic_save(path: Path, write) -> Path:
    """Write through ``path.part`` and rename, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as fh:
        write(fh)
    os.replace(tmp, path)
    return path


def save_scan(path: str | os.PathLike, x: ArrayLike, counts: ArrayLike) -> Path:
    """PSI scan file: ``data`` [rows, cols, n] float64 and ``x`` [n] (setting per point).

    ``counts`` may be a numpy or a dask array [rows, cols, n]: ``data`` is written band of rows by
    band (a dask array's row chunks), so a scan is never held whole as float64 (a 9M S-curve would
    be 3.8 GB); the file is the zip of .npy entries ``np.savez`` writes and ``np.load`` reads."""
    xa = np.asarray(x)
    shape = tuple(int(n) for n in np.shape(counts))
    if len(shape) != 3 or shape[-1] != xa.size:
        raise ValueError(f"scan data must be [rows, cols, {xa.size}], got {shape}")
    return _atomic_save(Path(path), lambda fh: _write_npz_streamed(fh, counts, xa))


def _row_bands(counts, shape: tuple[int, ...]):
    """The counts [rows, cols, n] as bands of rows, in order, each computed when asked."""
    if hasattr(counts, "compute"):                          # dask: its own row chunks
        stops = np.cumsum(counts.chunks[0])
        for start, stop in zip(np.concatenate([[0], stops[:-1]]), stops):
            yield np.asarray(counts[int(start):int(stop)].compute())
        return
    rows_per_band = max(1, SCAN_BAND_BYTES // max(1, 8 * shape[1] * shape[2]))
    for start in range(0, shape[0], rows_per_band):
        yield np.asarray(counts[start:start + rows_per_band])


def _write_npz_streamed(fh, counts, x: NDArray) -> None:
    """``np.savez(fh, data=counts as float64, x=x)``, with ``data`` written band by band."""
    fmt = np.lib.format
    shape = tuple(int(n) for n in np.shape(counts))
    header = {"descr": fmt.dtype_to_descr(np.dtype(np.float64)), "fortran_order": False,
              "shape": shape}
    with zipfile.ZipFile(fh, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("data.npy", "w", force_zip64=True) as entry:
            fmt.write_array_header_1_0(entry, header)
            for band in _row_bands(counts, shape):
                for row in band:            # converted a row at a time: no float64 copy of the band
                    entry.write(np.ascontiguousarray(row, dtype=np.float64).data)
        with zf.open("x.npy", "w", force_zip64=True) as entry:
            fmt.write_array(entry, x, allow_pickle=False)


def load_scan(path: str | os.PathLike) -> tuple[NDArray, NDArray]:
    """(x, data [rows, cols, n]) of a PSI scan file."""
    with np.load(path) as f:
        return f["x"], f["data"]


def save_fit(path: str | os.PathLike, fit: NDArray) -> Path:
    """A per-pixel fit result (structured [rows, cols]) with ``np.save``."""
    return _atomic_save(Path(path), lambda fh: np.save(fh, np.asarray(fit)))


def save_trimbits(path: str | os.PathLike, trimbits: ArrayLike, fit: NDArray, target: ArrayLike,
                  trimmed: ArrayLike, bad: ArrayLike) -> Path:
    """PSI's ``{base}.npz``: trimbits and the crossing fit, plus targets and the pixel masks."""
    return _atomic_save(Path(path), lambda fh: np.savez(
        fh, trimbits=np.asarray(trimbits, np.int32), fit=np.asarray(fit),
        target=np.asarray(target, np.float64), trimmed=np.asarray(trimmed, bool),
        bad=np.asarray(bad, np.uint8)))


def write_trim_files(prefix: str | os.PathLike, geometry: EigerGeometry, dac_table: ArrayLike,
                     tau_ns: int, trimbits: ArrayLike, serials: Sequence[str]) -> list[Path]:
    """One binary trim file ``{prefix}.sn{serial}`` per half module.

    dac_table: [17, n_half_modules] (16 DACs in trim-file order + iodelay, slsdet's
    ``dacs.get_asarray()``); tau_ns: rate-correction tau (ns); trimbits: image-shaped 0..63."""
    table = np.asarray(dac_table)
    if table.shape != (N_DACS + 1, geometry.n_half_modules):
        raise ValueError(f"DAC table must be [{N_DACS + 1}, {geometry.n_half_modules}], got "
                         f"{table.shape}")
    if len(serials) != geometry.n_half_modules:
        raise ValueError(f"{geometry.n_half_modules} module serials needed, got {list(serials)}")
    tb = np.asarray(trimbits)
    files = []
    for hm, serial in enumerate(serials):
        path = Path(f"{prefix}.sn{serial}")
        files.append(write_trim_file(path, table[:N_DACS, hm], int(table[N_DACS, hm]),
                                     int(tau_ns), tb[geometry.half_module_slice(hm)]))
    return files


def chips_in_file_order(geometry: EigerGeometry, hm: int) -> list[int]:
    """Chips of half module ``hm`` in vcmp_ll, lr, rl, rr order (top 0..3, bottom 7..4)."""
    by_name = {geometry.chip_vcmp(chip)[1]: chip for chip in range(4 * hm, 4 * hm + 4)}
    return [by_name[name] for name in VCMP_NAMES]


def write_calibration_text(directory: str | os.PathLike, calibration: EnergyCalibration,
                           geometry: EigerGeometry, serials: Sequence[str]) -> list[Path]:
    """``calibration.snNNN`` per half module: one "m k" line per chip (vcmp = m - k*E[keV])."""
    if len(serials) != geometry.n_half_modules:
        raise ValueError(f"{geometry.n_half_modules} module serials needed, got {list(serials)}")
    m, k = calibration.m, calibration.k
    files = []
    for hm, serial in enumerate(serials):
        text = "".join("%.2f %.2f\n" % (m[c], k[c]) for c in chips_in_file_order(geometry, hm))
        path = Path(directory) / calibration_text_name(serial)
        files.append(_atomic_save(path, lambda fh, t=text: fh.write(t.encode("ascii"))))
    return files


class CalibrationFileError(ValueError):
    """A calibration.snNNN file is malformed or physically impossible; the message names the file,
    the line and the reason."""


class CalibrationText(NamedTuple):
    """A ``calibration.snNNN`` file: per chip (file order vcmp_ll, lr, rl, rr) m (DAC) and
    k (DAC/keV) of ``vcmp = m - k*E[keV]``, and tau (ns) from PSI's fifth line (None without)."""
    m: NDArray[np.float64]
    k: NDArray[np.float64]
    tau_ns: int | None


CHIPS_PER_HALF_MODULE = 4
# Beyond these a number is a corrupt file, not a calibration: m is a vcmp, a few 12-bit DAC ranges
# at most; a slope that moves the threshold by less than 0.1 keV over the whole DAC range, or
# thresholds of more than 1000 keV (EIGER's sensors stop near 30 keV), are no detector's.
_M_LIMIT_DAC = 10.0 * DAC_MAX
_K_LIMIT_DAC_PER_KEV = 10.0 * DAC_MAX
_E_LIMIT_KEV = 1000.0
_TAU_LIMIT_NS = 10000


def read_calibration_text(path: str | os.PathLike) -> CalibrationText:
    """Read a ``calibration.snNNN`` file: four "m k" chip lines, optionally PSI's fifth line tau.

    Refused (CalibrationFileError naming the file, the line and the reason): a line that is not
    two numbers (or one, tau, after the four chips), a chip count other than a half module's 4,
    non-finite or absurd values, a slope k <= 0 (vcmp falls as the threshold energy rises), and a
    chip whose threshold energy ``(m - vcmp)/k`` is nowhere positive for vcmp in the DAC range."""
    m, k, tau = [], [], None
    where = []
    lines = Path(path).read_text().splitlines()

    def refuse(n: int | None, reason: str):
        at = f"{path}:{n}: " if n is not None else f"{path}: "
        raise CalibrationFileError(at + reason)

    for n, line in enumerate(lines, 1):
        parts = line.split()
        if not parts:
            continue
        try:
            values = [float(p) for p in parts]      # "inf"/"nan" parse here, refused below
        except ValueError:
            values = []
        if tau is not None:
            refuse(n, f"{line.strip()!r} follows the tau line; a calibration file ends with it")
        if len(values) == 1 and len(m) == CHIPS_PER_HALF_MODULE:
            t = values[0]
            if not math.isfinite(t) or not t.is_integer() or not 0 <= t <= _TAU_LIMIT_NS:
                refuse(n, f"tau {t:.6g} ns must be a whole number of ns in 0..{_TAU_LIMIT_NS}")
            tau = int(t)
            continue
        if len(values) != 2:
            refuse(n, f"{line.strip()[:60]!r} is not 'm k' (two numbers) nor, after the four "
                      "chips, a tau; the file is not an EIGER calibration file")
        if len(m) == CHIPS_PER_HALF_MODULE:
            refuse(n, f"a fifth chip line; a half module has {CHIPS_PER_HALF_MODULE} chips "
                      "(vcmp_ll, lr, rl, rr): this is not one half module's calibration")
        mi, ki = values
        if not (math.isfinite(mi) and math.isfinite(ki)):
            refuse(n, f"m = {mi:.6g}, k = {ki:.6g}: not finite numbers; the file is corrupt")
        if ki <= 0:
            refuse(n, f"slope k = {ki:.6g} DAC/keV is not positive: vcmp = m - k*E must fall as "
                      "the threshold energy rises; the file is corrupt or the signs are swapped")
        if abs(mi) > _M_LIMIT_DAC or ki > _K_LIMIT_DAC_PER_KEV:
            refuse(n, f"m = {mi:.6g} DAC, k = {ki:.6g} DAC/keV are absurd for a 12-bit vcmp "
                      f"(|m| <= {_M_LIMIT_DAC:g}, k <= {_K_LIMIT_DAC_PER_KEV:g}); the file is "
                      "corrupt")
        top = (mi - DAC_MIN) / ki        # the highest threshold energy the chip reaches (keV)
        if top <= 0:
            refuse(n, f"m = {mi:.6g}, k = {ki:.6g} give no positive threshold energy for vcmp "
                      f"{DAC_MIN}..{DAC_MAX} (E = (m - vcmp)/k <= {top:.3g} keV); repeat the "
                      "energy calibration")
        if top > _E_LIMIT_KEV:
            refuse(n, f"m = {mi:.6g}, k = {ki:.6g} give a threshold of {top:.6g} keV at vcmp "
                      f"{DAC_MIN}, an absurd energy for EIGER; the file is corrupt")
        m.append(mi)
        k.append(ki)
        where.append(n)
    if len(m) != CHIPS_PER_HALF_MODULE:
        last = f" (chip lines: {', '.join(map(str, where))})" if where else ""
        refuse(None, f"{len(m)} chip line(s){last}; a half module's calibration has "
                     f"{CHIPS_PER_HALF_MODULE} (vcmp_ll, lr, rl, rr): the file is incomplete or "
                     "not an EIGER calibration file")
    return CalibrationText(np.array(m), np.array(k), tau)


def save_calibration(path: str | os.PathLike, calibration: EnergyCalibration) -> Path:
    """PSI's ``calibration.npz``: p0, p1 per chip, mu [n_chips, n_points], energy [n_points]."""
    return _atomic_save(Path(path), lambda fh: np.savez(
        fh, p0=calibration.p0, p1=calibration.p1, mu=calibration.mu,
        energy=calibration.energies, targets=np.array(calibration.targets)))


def install_settings(trim_files: Sequence[str | os.PathLike], calibration_files:
                     Sequence[str | os.PathLike], settings_dir: str | os.PathLike, gain: str,
                     serials: Sequence[str]) -> list[Path]:
    """Copy the trim files to ``{settings_dir}/{gain}/noise.snNNN`` and the calibration files next
    to them (PSI's ``write_calibration_files``). Returns the files written."""
    destination = Path(settings_dir) / gain
    destination.mkdir(parents=True, exist_ok=True)
    out = []
    for src, serial in zip(trim_files, serials):
        out.append(Path(shutil.copyfile(src, destination / f"noise.sn{serial}")))
    for src in calibration_files:
        out.append(Path(shutil.copyfile(src, destination / Path(src).name)))
    return out


def write_result_arrays(path: str | os.PathLike, arrays: Mapping[str, ArrayLike]) -> dict[str, str]:
    """Analysis arrays into one HDF5 file for tiled to serve as external data.

    Each array is stored as ``/entry/results/<name>`` with a leading axis of length 1 (one event);
    booleans become uint8. Returns {name: dataset path}."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    datasets = {}
    with h5py.File(tmp, "w") as f:
        group = f.require_group(RESULTS_DATASET_ROOT)
        for name, value in arrays.items():
            a = np.asarray(value)
            if a.dtype == bool:
                a = a.astype(np.uint8)
            group.create_dataset(name, data=a[None, ...], chunks=(1, *a.shape) if a.ndim else None)
            datasets[name] = f"{RESULTS_DATASET_ROOT}/{name}"
    os.replace(tmp, path)
    return datasets
