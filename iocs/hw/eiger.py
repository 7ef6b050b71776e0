"""Hardware backend of the PSI EIGER: slsDetectorPackage's Python API (``from slsdet import Eiger``).

slsdet is imported only when a detector is opened (`open_eiger`), so the simulator runs without it.
The backend offers the interface of the simulator (iocs/sim/eiger.py:EigerSim) to the EigerIOC.

How each IOC PV maps to slsdet (d = slsdet.Eiger(slsdet_id); one slsdet "module" per half module)
--------------------------------------------------------------------------------------------------
  <dac>, <dac>_RBV           d.dacs.<dac> = v  (all half modules) / d.dacs.<dac>[:]  (per half module)
  iodelay                    d.dacs.iodelay
  DacTable(_RBV)             d.dacs.get_asarray() -> [17, n_half_modules]; set: d.dacs.<dac>[hm] = v
  Vthreshold(_RBV)           d.vthreshold = v / d.vthreshold (-1, or a list, when they differ)
  Vcmp(_RBV)                 d.vcmp = [...] / d.vcmp[:]   (chip order, bottom half modules reversed)
  Trimval(_RBV)              d.trimval = v / d.trimval (-1 when trimbits differ)
  Trimbits                   write {scratch}/set.snXXX per half module (current DACs, iodelay, tau +
                             the new trimbits), then d.loadTrimbits(prefix)
  Trimbits_RBV               d.saveTrimbits({scratch}/get), then read the .snXXX files
  LoadTrimbits               d.loadTrimbits(prefix)  (slsdet appends .snXXX; files checked first)
  SaveTrimbits               d.saveTrimbits(prefix)
  DynamicRange(_RBV)         d.dr           AcquireTime d.exptime    AcquirePeriod d.period
  NumImages                  d.frames
  ThresholdEnergy(_RBV)      d.setThresholdEnergy(eV, detectorSettings.<SETTINGS>, True) / d.threshold
  TrimEnergies(_RBV)         d.trimen       SettingsDir d.settingspath    Settings_RBV d.settings
  RateCorrTau(_RBV)          d.ratecorr = tau_ns * 1e-9 s (slsdet's getter rounds to us: the value set
                             is kept here)
  TestPulses                 d.pulseChip(n) before every acquisition (n = 0: d.pulseChip(-1), normal
                             counter reset)
  Temperature_RBV            max(d.temp.fpga[:]) degC
  Acquire                    d.fpath = scratch; d.fname; d.findex; d.fwrite = True;
                             d.rx_framesperfile = 0; d.acquire(); the receiver's raw files are read
                             back and assembled into images (below); abort: d.stop()
  make_safe                  d.stop(); d.pulseChip(-1)

Raw files (slsReceiver, binary format): ``{fname}_d{port}_f0_{findex}.raw``, ports 2*hm (left, columns
0..511) and 2*hm + 1 (right, 512..1023); every frame is a 112-byte sls_receiver_header followed by
256 x 512 pixels: uint32/uint16/uint8 at 32/16/8 bit, two pixels per byte at 4 bit (low nibble
first), two pixels per three bytes at 12 bit (low 12 bits first; not yet checked on a module). Top
half modules (even) fill rows 256..511 of their module as read, bottom ones rows 0..255 flipped up-
down, as is the lone half module of a 250k (sls_detector_tools ``io.load_frame``).

slsdet errors: a RuntimeError whose message says the request is wrong (energy not defined, file not
found, value out of range) becomes `Refused`; anything else (no answer from the detector or the
receiver) `InstrumentFault`.
"""
from __future__ import annotations

import atexit
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from calbench.contracts.eiger_geometry import DYNAMIC_RANGES, geometry as eiger_geometry
from calbench.contracts.eiger_geometry import frame_dtype
from calbench.contracts.trimfile import (DAC_NAMES, SETTINGS_NAMES, TRIMBIT_MAX,
                                        TrimFileError, read_trim_file, serial_from_hostname,
                                        trim_file_path, write_trim_file)
from calbench.iocs.eiger_limits import check_dac
from calbench.iocs.errors import InstrumentFault, Refused
from calbench.contracts.eiger import Acquisition

log = logging.getLogger(__name__)

RECEIVER_HEADER_BYTES = 112          # sls_detector_header (48) + packets mask (64)
PORT_SHAPE = (256, 512)
_REFUSAL_WORDS = ("not defined", "could not open", "out of range", "invalid", "not supported",
                  "cannot", "must be", "not allowed", "does not exist")


def _load_slsdet():
    try:
        import slsdet
    except ImportError as exc:
        raise InstrumentFault(
            "slsdet (PSI's slsDetectorPackage Python API) is not installed: `conda install -c "
            "slsdetectorgroup slsdet` (or build slsDetectorPackage with Python), or run the EIGER "
            "simulated (backend = \"sim\")") from exc
    return slsdet


def open_eiger(settings: dict) -> "EigerHardware":
    """Connect to the EIGER in slsdet shared memory ``slsdet_id`` (configured with its config file:
    hostnames, receiver) and wrap it for the EigerIOC."""
    slsdet = _load_slsdet()
    try:
        det = slsdet.Eiger(int(settings.get("slsdet_id", 0)))
    except RuntimeError as exc:
        raise InstrumentFault(f"slsdet could not open the EIGER ({exc}); load its configuration "
                              "file first (sls_detector_put config <file>)") from exc
    return EigerHardware(det, settings, settings_enum=slsdet.detectorSettings)


def unpack_port(raw: bytes | NDArray[np.uint8], dr: int) -> NDArray:
    """Pixels of one port frame (256 x 512) from its raw data bytes at dynamic range ``dr``."""
    buf = np.frombuffer(raw, dtype=np.uint8)
    n = PORT_SHAPE[0] * PORT_SHAPE[1]
    if dr == 4:
        out = np.empty(n, np.uint8)
        out[0::2] = buf & 0x0F
        out[1::2] = buf >> 4
    elif dr == 12:
        b = buf.reshape(-1, 3).astype(np.uint16)
        out = np.empty(n, np.uint16)
        out[0::2] = b[:, 0] | ((b[:, 1] & 0x0F) << 8)
        out[1::2] = (b[:, 1] >> 4) | (b[:, 2] << 4)
    else:
        out = buf.view(frame_dtype(dr))
    return out.reshape(PORT_SHAPE)


def port_bytes(dr: int) -> int:
    """Bytes of pixel data per port frame at dynamic range ``dr``."""
    return PORT_SHAPE[0] * PORT_SHAPE[1] * dr // 8


class EigerHardware:
    """The EigerIOC backend over an slsdet ``Eiger`` object (tests pass a fake with its interface)."""

    def __init__(self, det, settings: dict, *, settings_enum=None):
        self.det = det
        self.geometry = eiger_geometry(settings.get("geometry", "500k"))
        n_hm = self._call(lambda: int(det.size()))
        if n_hm != self.geometry.n_half_modules:
            raise InstrumentFault(
                f"slsdet reports {n_hm} half modules but the lab configuration says a "
                f"{self.geometry.name} ({self.geometry.n_half_modules}); fix [instruments.eiger] "
                "geometry or the detector's config file")
        hostnames = self._call(lambda: list(det.hostname))
        self.hostnames = [str(h) for h in hostnames]
        self.det_id = settings.get("det_id", "")
        self._settings_enum = settings_enum
        self._abort = threading.Event()
        scratch = settings.get("scratch_dir") or ""
        self._scratch = Path(scratch) if scratch else Path(tempfile.mkdtemp(prefix="calbench-eiger-"))
        self._scratch.mkdir(parents=True, exist_ok=True)
        if not scratch:
            atexit.register(shutil.rmtree, self._scratch, True)
        self.settings = "standard"
        self.tau_ns = 0
        self.test_pulses = 0
        self._findex = 0
        if settings.get("settings_dir"):
            self.set_settings_dir(str(settings["settings_dir"]))
        if settings.get("trimen"):
            self.set_trim_energies(settings["trimen"])

    # -- error mapping --------------------------------------------------------------------------
    @staticmethod
    def _call(func: Callable):
        try:
            return func()
        except (Refused, InstrumentFault):
            raise
        except (RuntimeError, ValueError) as exc:
            message = str(exc)
            if any(word in message.lower() for word in _REFUSAL_WORDS):
                raise Refused(f"the detector refused: {message}") from None
            raise InstrumentFault(f"slsdet: {message}; check that the detector and its receiver "
                                  "are on and reachable") from exc

    # -- DACs ---------------------------------------------------------------------------------------
    def dac_table(self) -> NDArray[np.int64]:
        table = self._call(lambda: np.asarray(self.det.dacs.get_asarray()))
        return np.rint(table).astype(np.int64).reshape(len(DAC_NAMES) + 1, -1)

    _check_dac = staticmethod(check_dac)

    def set_dac(self, name: str, value: int, hm: int | None = None) -> None:
        if name not in DAC_NAMES and name != "iodelay":
            raise Refused(f"no DAC {name!r}; EIGER DACs are {', '.join(DAC_NAMES)}, iodelay")
        v = self._check_dac(name, value)
        if hm is None:
            self._call(lambda: setattr(self.det.dacs, name, v))
        else:
            self._call(lambda: getattr(self.det.dacs, name).__setitem__(hm, v))

    def set_dac_table(self, table) -> None:
        names = list(DAC_NAMES) + ["iodelay"]
        t = np.asarray(table, float)
        n_hm = self.geometry.n_half_modules
        if t.size != len(names) * n_hm:
            raise Refused(f"DAC table needs {len(names)} x {n_hm} values, got {t.size}")
        t = t.reshape(len(names), n_hm)
        checked = [[self._check_dac(names[i], t[i, h]) for h in range(n_hm)]
                   for i in range(len(names))]
        for i, name in enumerate(names):
            for h in range(n_hm):
                self._call(lambda: getattr(self.det.dacs, name).__setitem__(h, checked[i][h]))

    def vthreshold(self) -> int:
        return _common(self._call(lambda: self.det.vthreshold))

    def set_vthreshold(self, value: int) -> None:
        v = self._check_dac("vthreshold", value)
        self._call(lambda: setattr(self.det, "vthreshold", v))

    def vcmp(self) -> list[int]:
        return [int(v) for v in self._call(lambda: self.det.vcmp[:])]

    def set_vcmp(self, values) -> None:
        values = [self._check_dac("vcmp", v) for v in np.asarray(values).ravel()]
        if len(values) != self.geometry.n_chips:
            raise Refused(f"vcmp needs one value per chip ({self.geometry.n_chips}), "
                          f"got {len(values)}")
        self._call(lambda: setattr(self.det, "vcmp", values))

    # -- trimbits -----------------------------------------------------------------------------------
    def _serials(self) -> list[str]:
        return [serial_from_hostname(h) for h in self.hostnames]

    def trimbits(self) -> NDArray[np.int8]:
        prefix = self._scratch / "readback"
        self._call(lambda: self.det.saveTrimbits(str(prefix)))
        blocks = [read_trim_file(f"{prefix}.sn{s}").trimbits for s in self._serials()]
        return self.geometry.join_half_modules(blocks, dtype=np.int8)

    def set_trimbits(self, values) -> None:
        g = self.geometry
        a = np.asarray(values)
        if a.size != g.n_pixels:
            raise Refused(f"trimbits need {g.n_pixels} values ({g.rows} x {g.cols}, a {g.name}), "
                          f"got {a.size}")
        if a.min() < 0 or a.max() > TRIMBIT_MAX or np.any(np.round(a) != a):
            raise Refused(f"trimbits must be integers 0..{TRIMBIT_MAX}, got {a.min()}..{a.max()}")
        image = a.reshape(g.shape)
        table = self.dac_table()
        prefix = self._scratch / "set"
        for hm, serial in enumerate(self._serials()):
            write_trim_file(f"{prefix}.sn{serial}", table[:len(DAC_NAMES), hm], int(table[-1, hm]),
                            self.tau_ns, image[g.half_module_slice(hm)])
        self._call(lambda: self.det.loadTrimbits(str(prefix)))

    def trimval(self) -> int:
        return _common(self._call(lambda: self.det.trimval))

    def set_trimval(self, value: int) -> None:
        v = float(value)
        if not v.is_integer() or not 0 <= v <= TRIMBIT_MAX:
            raise Refused(f"trimbit {value} outside 0..{TRIMBIT_MAX}")
        self._call(lambda: setattr(self.det, "trimval", int(v)))

    def load_trimbits(self, prefix: str) -> list[str]:
        files = [f"{prefix}.sn{s}" for s in self._serials()]
        for f in files:                    # a clear refusal before slsdet half-loads a set
            try:
                read_trim_file(f)
            except (FileNotFoundError, TrimFileError) as exc:
                raise Refused(str(exc)) from None
        self._call(lambda: self.det.loadTrimbits(str(prefix)))
        self.tau_ns = read_trim_file(files[0]).tau_ns
        return files

    def save_trimbits(self, prefix: str) -> list[str]:
        Path(prefix).parent.mkdir(parents=True, exist_ok=True)
        self._call(lambda: self.det.saveTrimbits(str(prefix)))
        return [f"{prefix}.sn{s}" for s in self._serials()]

    # -- settings -----------------------------------------------------------------------------------
    @property
    def settings_dir(self) -> str:
        return str(self._call(lambda: self.det.settingspath))

    def set_settings_dir(self, path: str) -> None:
        if not path or not Path(path).is_absolute():
            raise Refused(f"settings directory {path!r} must be an absolute path")
        self._call(lambda: setattr(self.det, "settingspath", str(path)))

    @property
    def trim_energies(self) -> list[int]:
        return [int(e) for e in np.atleast_1d(self._call(lambda: self.det.trimen))]

    def set_trim_energies(self, energies) -> None:
        values = [float(e) for e in np.asarray(energies).ravel() if float(e) > 0]
        if any(not v.is_integer() for v in values) or len(set(values)) != len(values):
            raise Refused(f"trim energies must be distinct whole eV values, got {values}")
        self._call(lambda: setattr(self.det, "trimen", sorted(int(v) for v in values)))

    def set_settings(self, name: str) -> None:
        if name not in SETTINGS_NAMES:
            raise Refused(f"settings {name!r} unknown; use one of {', '.join(SETTINGS_NAMES)}")
        self.settings = name

    @property
    def loaded_settings(self) -> str:
        value = self._call(lambda: self.det.settings)
        name = getattr(value, "name", str(value)).split(".")[-1].lower()
        return name if name in SETTINGS_NAMES else "undefined"

    @property
    def threshold_eV(self) -> int:
        return _common(self._call(lambda: self.det.threshold))

    def set_threshold_energy(self, energy_eV: int, trimbits: bool = True) -> None:
        e = float(energy_eV)
        if not e.is_integer():
            raise Refused(f"threshold energy {energy_eV} eV must be a whole number of eV")
        energies = self.trim_energies
        if not energies or not energies[0] <= e <= energies[-1]:
            raise Refused(f"This energy {int(e)} not defined for this module! (trim energies "
                          f"{energies}); choose an energy inside the trim-energy list")
        bracket = [x for x in energies if x == e] or [max(x for x in energies if x < e),
                                                      min(x for x in energies if x > e)]
        for energy in bracket:                 # name the missing file before slsdet does
            for s in self._serials():
                path = trim_file_path(self.settings_dir, self.settings, energy, s)
                if not path.is_file():
                    raise Refused(f"trim file {path} not found; copy the module's settings into "
                                  "SettingsDir or remove that energy from TrimEnergies")
        enum = getattr(self._settings_enum, self.settings.upper())
        self._call(lambda: self.det.setThresholdEnergy(int(e), enum, bool(trimbits)))
        tau = read_trim_file(trim_file_path(self.settings_dir, self.settings, bracket[0],
                                            self._serials()[0])).tau_ns
        self.tau_ns = int(tau) if len(bracket) == 1 else self.tau_ns

    # -- acquisition settings -------------------------------------------------------------------------
    @property
    def dr(self) -> int:
        return int(self._call(lambda: self.det.dr))

    def set_dynamic_range(self, dr: int) -> None:
        if int(dr) != dr or int(dr) not in DYNAMIC_RANGES:
            raise Refused(f"dynamic range {dr} bit not supported; EIGER counts with "
                          f"{', '.join(map(str, DYNAMIC_RANGES))} bit")
        self._call(lambda: setattr(self.det, "dr", int(dr)))

    @property
    def exptime(self) -> float:
        return float(self._call(lambda: self.det.exptime))

    def set_exptime(self, seconds: float) -> None:
        if not 0 < float(seconds) <= 3600:
            raise Refused(f"exposure time {seconds} s outside (0, 3600] s")
        self._call(lambda: setattr(self.det, "exptime", float(seconds)))

    @property
    def period(self) -> float:
        return float(self._call(lambda: self.det.period))

    def set_period(self, seconds: float) -> None:
        if not 0 <= float(seconds) <= 3600:
            raise Refused(f"period {seconds} s outside 0..3600 s (0: as fast as possible)")
        self._call(lambda: setattr(self.det, "period", float(seconds)))

    @property
    def frames(self) -> int:
        return int(self._call(lambda: self.det.frames))

    def set_frames(self, n: int) -> None:
        if int(n) != n or not 1 <= int(n) <= 100000:
            raise Refused(f"number of frames {n} outside 1..100000")
        self._call(lambda: setattr(self.det, "frames", int(n)))

    def set_rate_correction(self, tau_ns: float) -> None:
        if not 0 <= float(tau_ns) <= 10000:
            raise Refused(f"rate-correction tau {tau_ns} ns outside 0..10000 ns (0 disables it)")
        self._call(lambda: setattr(self.det, "ratecorr", float(tau_ns) * 1e-9))
        self.tau_ns = int(round(float(tau_ns)))

    def set_test_pulses(self, n: int) -> None:
        if int(n) != n or not 0 <= int(n) <= 65535:
            raise Refused(f"test pulse count {n} outside 0..65535")
        self.test_pulses = int(n)

    def temperature(self) -> float:
        return float(max(self._call(lambda: self.det.temp.fpga[:])))

    # -- acquisition ----------------------------------------------------------------------------------
    def acquire(self, on_frame: Callable[[int, NDArray], None] | None = None) -> Acquisition:
        """Blocking acquisition through the receiver's raw files (see the module docstring)."""
        self._abort.clear()
        dr, n = self.dr, self.frames
        fname = "calbench"
        findex = self._findex
        self._findex += 1
        d = self.det

        def setup():
            d.fpath = str(self._scratch)
            d.fname = fname
            d.findex = findex
            d.fwrite = True
            d.rx_framesperfile = 0
            d.pulseChip(self.test_pulses if self.test_pulses else -1)

        self._call(setup)
        start = time.time()
        self._call(d.acquire)
        aborted = self._abort.is_set()
        frames = self._read_raw(fname, findex, dr, n)
        for path in self._scratch.glob(f"{fname}_*_{findex}.*"):
            path.unlink(missing_ok=True)
        if on_frame is not None:
            for i, frame in enumerate(frames):
                on_frame(i, frame)
        period = max(self.period, self.exptime)
        return Acquisition(frames=frames, start_times=start + period * np.arange(len(frames)),
                           aborted=aborted or len(frames) < n)

    def _read_raw(self, fname: str, findex: int, dr: int, n: int) -> NDArray:
        g = self.geometry
        size = RECEIVER_HEADER_BYTES + port_bytes(dr)
        per_port = []
        for port in range(2 * g.n_half_modules):
            path = self._scratch / f"{fname}_d{port}_f0_{findex}.raw"
            if not path.is_file():
                raise InstrumentFault(f"the receiver wrote no file {path}; check rx_hostname, the "
                                      "receiver process and the free space on its disk")
            data = path.read_bytes()
            if len(data) % size:
                raise InstrumentFault(f"{path}: {len(data)} bytes is not a whole number of "
                                      f"{size}-byte frames at {dr} bit; the receiver wrote "
                                      "garbage or another dynamic range")
            per_port.append(np.frombuffer(data, np.uint8).reshape(-1, size))
        count = min(len(p) for p in per_port)
        frames = np.empty((min(count, n),) + g.shape, frame_dtype(dr))
        for i in range(len(frames)):
            blocks = []
            for hm in range(g.n_half_modules):
                left = unpack_port(per_port[2 * hm][i, RECEIVER_HEADER_BYTES:], dr)
                right = unpack_port(per_port[2 * hm + 1][i, RECEIVER_HEADER_BYTES:], dr)
                block = np.hstack([left, right])
                # bottom half modules (and the lone half module of a 250k) read out upside down
                flipped = hm % 2 == 1 or g.single_half_module
                blocks.append(np.flipud(block) if flipped else block)
            frames[i] = g.join_half_modules(blocks)
        return frames

    def abort(self) -> None:
        self._abort.set()
        self._call(self.det.stop)

    def make_safe(self) -> None:
        """Stop any acquisition and switch the test pulses off."""
        try:
            self.det.stop()
            self.det.pulseChip(-1)
        except Exception:      # shutting down: log, never raise
            log.exception("could not make the EIGER safe")


def _common(value) -> int:
    """slsdet returns a scalar when modules agree and a list otherwise; -1 for disagreement."""
    values = np.atleast_1d(value)
    return int(values[0]) if np.all(values == values[0]) else -1
