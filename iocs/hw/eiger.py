# Long by design: one slsdet driver for both half modules: DACs, trimbits, thresholds, acquisition, files.
"""Hardware backend of the PSI EIGER: slsDetectorPackage's Python API (``from slsdet import Eiger``).

slsdet is imported only when a detector is opened (`open_eiger`), so the simulator runs without it.
The backend offers the interface of the simulator (iocs/sim/eiger.py:EigerSim) to the EigerIOC.
Checked against PSI's virtual EIGER server and slsReceiver 9.2.0 (tests/test_eiger_slsvirtual.py).

How each IOC PV maps to slsdet (d = slsdet.Eiger(slsdet_id); one slsdet "module" per half module)
--------------------------------------------------------------------------------------------------
  <dac>, <dac>_RBV           d.dacs.<dac> = v  (all half modules) / d.dacs.<dac>[:]  (per half module)
  iodelay                    d.dacs.iodelay
  DacTable(_RBV)             d.dacs.get_asarray() -> [17, n_half_modules]; set: d.dacs.<dac>[hm] = v
  Vthreshold(_RBV)           d.vthreshold = v / d.vthreshold (-1, or a list, when they differ)
  Vcmp(_RBV)                 d.vcmp = [...] / d.vcmp[:]   (chip order, bottom half modules reversed)
  Trimval(_RBV)              d.trimval = v / d.trimval (-1 when trimbits differ)
  Trimbits                   write {scratch}/set.snNNN per half module (current DACs, iodelay, tau +
                             the new trimbits), then d.loadTrimbits(prefix)
  Trimbits_RBV               d.saveTrimbits({scratch}/get), then read the .snNNN files
  LoadTrimbits               d.loadTrimbits(prefix)  (slsdet appends .snNNN; files checked first)
  SaveTrimbits               d.saveTrimbits(prefix)
  DynamicRange(_RBV)         d.dr           AcquireTime d.exptime    AcquirePeriod d.period
  NumImages                  d.frames (in a scan the server reports its steps, refuses others)
  Scan(_RBV)                 d.setScan(scanParameters(dacIndex.<DAC> | VTHRESHOLD | TRIMBIT_SCAN,
                             start, stop, step, settle)) / d.getScan(); "0": scanParameters()
  ThresholdEnergy(_RBV)      d.setThresholdEnergy(eV, detectorSettings.<SETTINGS>, True) / d.threshold
                             (-1 once a DAC, trimbit or tau was set directly: the server keeps the
                             old energy, but the settings it describes are gone)
  TrimEnergies(_RBV)         d.trimen       SettingsDir d.settingspath    Settings_RBV d.settings
  RateCorrTau(_RBV)          d.ratecorr = tau_ns * 1e-9 s / d.getRateCorrection() (exact, ns). The
                             server accepts tau != 0 only at 16 and 32 bit and switches it off when
                             the range leaves them: both are refused here before slsdet is asked
  TestPulses                 d.pulseChip(n) before every acquisition (n = 0: d.pulseChip(-1), normal
                             counter reset)
  Temperature_RBV            max(d.temp.fpga[:]) degC
  Acquire                    d.fpath = scratch; d.fname; d.findex; d.fwrite = True;
                             d.rx_framesperfile = 0; d.startReceiver(); d.startDetector(); poll
                             d.getDetectorStatus() (abort: d.stopDetector()); d.stopReceiver(); the
                             receiver's raw files are read back and assembled into images (below).
                             Never d.acquire(): its binding holds the GIL for the whole acquisition
  make_safe                  d.stop(); d.pulseChip(-1)

Serials: trim files are named ``.sn%03d`` of the module id (d.getModuleId(), the detid the server
reads), as slsdet's loadTrimbits/saveTrimbits/setThresholdEnergy name them; hostnames need not
carry a number (virtual servers, aliases).

Raw files (slsReceiver, binary format): ``{fname}_d{port}_f0_{findex}.raw``, ports 2*hm and
2*hm + 1 of half module hm; every frame is a 112-byte sls_receiver_header followed by 256 x 512
pixels: uint32/uint16/uint8 at 32/16/8 bit, two pixels per byte at 4 bit (low nibble first), two
pixels per three bytes at 12 bit (low 12 bits first). The header's column places a port: the
firmware tags a top half module's first port as its left column and a bottom one's first port as
its right column (slsDetectorPackage's DetectorImpl assembles by that column). Top half modules
(even) fill rows 256..511 of their module as read, bottom ones rows 0..255 flipped up-down, as is
the lone half module of a 250k (sls_detector_tools ``io.load_frame``).

slsdet errors: a RuntimeError whose message says the request is wrong (energy not defined, file not
found, value out of range) becomes `Refused`; anything else (no answer from the detector or the
receiver, or an error nobody expected) `InstrumentFault`.
"""
from __future__ import annotations

import atexit
import datetime
import logging
import shutil
import struct
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
                                         TrimFileError, read_trim_file, trim_file_path,
                                         write_trim_file)
from calbench.contracts.errors import InstrumentFault, Refused
from calbench.contracts.eiger import SCAN_TRIMBITS, Acquisition, ScanParameters, check_dac

log = logging.getLogger(__name__)

RECEIVER_HEADER_BYTES = 112          # sls_detector_header (48) + packets mask (64)
_HEADER = struct.Struct("<QIIQQHHHHIHBB")
_HEADER_ROW, _HEADER_COLUMN = 6, 7   # field indices in _HEADER
PORT_SHAPE = (256, 512)
RATE_CORRECTION_RANGES = (16, 32)    # the server computes its rate tables only at these depths
STATUS_POLL_S = 0.05                 # acquisition status poll (abort answers within one poll)
_REFUSAL_WORDS = ("not defined", "could not open", "out of range", "invalid", "not supported",
                  "cannot", "must be", "not allowed", "does not exist", "rate correction")
_UNREACHABLE_WORDS = ("cannot connect", "could not connect", "connection refused", "timeout",
                      "timed out", "no route")
_DONE_STATES = ("IDLE", "STOPPED", "RUN_FINISHED")


def _load_slsdet():
    try:
        import slsdet
    except ImportError as exc:
        raise InstrumentFault(
            "slsdet (PSI's slsDetectorPackage Python API) is not installed: `pip install "
            "calbench[hardware]` (slsdet from PyPI, the release of the detector server), or run "
            "the EIGER simulated (backend = \"sim\")") from exc
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
    return EigerHardware(det, settings, settings_enum=slsdet.detectorSettings,
                         scan_types=(slsdet.scanParameters, slsdet.dacIndex))


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


def _state_name(status) -> str:
    """slsdet's runStatus enum (or its name) as an upper-case name."""
    return str(getattr(status, "name", status)).split(".")[-1].upper()


class EigerHardware:
    """The EigerIOC backend over an slsdet ``Eiger`` object (tests pass a fake with its interface)."""

    def __init__(self, det, settings: dict, *, settings_enum=None, scan_types=None):
        self.det = det
        self.geometry = eiger_geometry(settings.get("geometry", "500k"))
        n_hm = self._call(lambda: int(det.size()))
        if n_hm != self.geometry.n_half_modules:
            raise InstrumentFault(
                f"slsdet reports {n_hm} half modules but the lab configuration says a "
                f"{self.geometry.name} ({self.geometry.n_half_modules}); fix [instruments.eiger] "
                "geometry or the detector's config file")
        self.hostnames = [str(h) for h in self._call(lambda: list(det.hostname))]
        # trim files are named after the module ids, as slsdet names them (not the hostnames)
        self.serials = [f"{int(m):03d}" for m in self._call(lambda: list(det.getModuleId()))]
        self._check_top_bottom()
        self.det_id = settings.get("det_id", "")
        self._settings_enum = settings_enum
        # slsdet's (scanParameters, dacIndex): tests pass a fake's
        self._scan_types = scan_types
        self._abort = threading.Event()
        scratch = settings.get("scratch_dir") or ""
        self._scratch = Path(scratch) if scratch else Path(tempfile.mkdtemp(prefix="calbench-eiger-"))
        self._scratch.mkdir(parents=True, exist_ok=True)
        if not scratch:
            atexit.register(shutil.rmtree, self._scratch, True)
        self.settings = "standard"
        self.test_pulses = 0
        self._findex = 0
        # a DAC, trimbit or tau set directly leaves the server's threshold energy in place, but
        # the settings it names are gone: ThresholdEnergy_RBV reads -1 until the next threshold
        self._settings_changed = False
        if settings.get("settings_dir"):
            self.set_settings_dir(str(settings["settings_dir"]))
        if settings.get("trimen"):
            self.set_trim_energies(settings["trimen"])

    def _check_top_bottom(self) -> None:
        """Half modules alternate top (even), bottom (odd), as the geometry and the frame assembly
        assume; a server configured otherwise would give mirrored images."""
        if self.geometry.single_half_module or not hasattr(self.det, "getTop"):
            return
        top = [bool(t) for t in self._call(lambda: list(self.det.getTop()))]
        wrong = [hm for hm, t in enumerate(top) if t != (hm % 2 == 0)]
        if wrong:
            hm = wrong[0]
            raise InstrumentFault(
                f"half module {hm} ({self.hostnames[hm]}, module id {self.serials[hm]}) is "
                f"configured as {'top' if top[hm] else 'bottom'}, but a {self.geometry.name} "
                "lists top and bottom half modules alternately (top first); fix the hostname "
                "order in the detector's config file or 'top' in the server's config_eiger.txt")

    # -- error mapping --------------------------------------------------------------------------
    @staticmethod
    def _call(func: Callable):
        try:
            return func()
        except (Refused, InstrumentFault):
            raise
        except (RuntimeError, ValueError) as exc:
            message = str(exc).strip()
            lower = message.lower()
            if "receiver" in lower and any(w in lower for w in _UNREACHABLE_WORDS):
                raise InstrumentFault(f"slsdet: {message}; start slsReceiver there (rx_hostname) "
                                      "and load the detector's config file again") from exc
            if any(w in lower for w in _UNREACHABLE_WORDS):
                raise InstrumentFault(f"slsdet: {message}; switch the detector on (or start its "
                                      "server) and check the network to it") from exc
            if any(word in lower for word in _REFUSAL_WORDS):
                raise Refused(f"the detector refused: {message}") from None
            raise InstrumentFault(f"slsdet: {message}; check that the detector and its receiver "
                                  "are on and reachable") from exc
        except Exception as exc:        # nothing slsdet raises may take the IOC down
            log.exception("unexpected error from slsdet")
            raise InstrumentFault(f"slsdet raised {type(exc).__name__}: {exc}; check the "
                                  "detector, its receiver and the slsdet version") from exc

    # -- DACs ---------------------------------------------------------------------------------------
    def dac_table(self) -> NDArray[np.int64]:
        table = self._call(lambda: np.asarray(self.det.dacs.get_asarray()))
        return np.rint(table).astype(np.int64).reshape(len(DAC_NAMES) + 1, -1)

    _check_dac = staticmethod(check_dac)

    def set_dac(self, name: str, value: int, hm: int | None = None) -> None:
        if name not in DAC_NAMES and name != "iodelay":
            raise Refused(f"no DAC {name!r}; EIGER DACs are {', '.join(DAC_NAMES)}, iodelay")
        v = self._check_dac(name, value)
        self._settings_changed = True
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
        self._settings_changed = True
        for i, name in enumerate(names):
            for h in range(n_hm):
                self._call(lambda: getattr(self.det.dacs, name).__setitem__(h, checked[i][h]))

    def vthreshold(self) -> int:
        return _common(self._call(lambda: self.det.vthreshold))

    def set_vthreshold(self, value: int) -> None:
        v = self._check_dac("vthreshold", value)
        self._settings_changed = True
        self._call(lambda: setattr(self.det, "vthreshold", v))

    def _check_vcmp_chips(self) -> None:
        # slsdet's Eiger sizes its vcmp list when the object is made: one made before the
        # hostnames were set has none, and would drop every per-chip put without a word
        n = len(self._call(lambda: list(self.det.vcmp[:])))
        if n != self.geometry.n_chips:
            raise InstrumentFault(f"slsdet's per-chip vcmp lists {n} chips, the detector has "
                                  f"{self.geometry.n_chips}; restart the IOC after loading the "
                                  "detector's config file")

    def vcmp(self) -> list[int]:
        self._check_vcmp_chips()
        return [int(v) for v in self._call(lambda: self.det.vcmp[:])]

    def set_vcmp(self, values) -> None:
        values = [self._check_dac("vcmp", v) for v in np.asarray(values).ravel()]
        if len(values) != self.geometry.n_chips:
            raise Refused(f"vcmp needs one value per chip ({self.geometry.n_chips}), "
                          f"got {len(values)}")
        self._check_vcmp_chips()
        self._settings_changed = True
        self._call(lambda: setattr(self.det, "vcmp", values))

    # -- trimbits -----------------------------------------------------------------------------------
    def _files(self, prefix: str | Path) -> list[str]:
        return [f"{prefix}.sn{s}" for s in self.serials]

    @staticmethod
    def _check_prefix(prefix: str) -> None:
        # slsdet appends .snNNN only when the name holds neither ".sn" nor ".trim"
        name = Path(prefix).name
        if ".sn" in name or ".trim" in name:
            raise Refused(f"trim-file prefix {prefix!r}: give the name without '.snNNN' (and "
                          "without '.trim'); slsdet appends each module's .snNNN itself")
        if not Path(prefix).is_absolute():
            raise Refused(f"trim-file prefix {prefix!r} must be an absolute path")

    def trimbits(self) -> NDArray[np.int8]:
        prefix = self._scratch / "readback"
        self._call(lambda: self.det.saveTrimbits(str(prefix)))
        blocks = [_saved_trimbits(f) for f in self._files(prefix)]
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
        tau = max(self.tau_ns, 0)
        prefix = self._scratch / "set"
        for hm, path in enumerate(self._files(prefix)):
            write_trim_file(path, table[:len(DAC_NAMES), hm], int(table[-1, hm]), tau,
                            image[g.half_module_slice(hm)])
        self._settings_changed = True
        self._call(lambda: self.det.loadTrimbits(str(prefix)))

    def trimval(self) -> int:
        return _common(self._call(lambda: self.det.trimval))

    def set_trimval(self, value: int) -> None:
        v = float(value)
        if not v.is_integer() or not 0 <= v <= TRIMBIT_MAX:
            raise Refused(f"trimbit {value} outside 0..{TRIMBIT_MAX}")
        self._settings_changed = True
        self._call(lambda: setattr(self.det, "trimval", int(v)))

    def load_trimbits(self, prefix: str) -> list[str]:
        self._check_prefix(prefix)
        files = self._files(prefix)
        for f in files:                    # a clear refusal before slsdet half-loads a set
            try:
                read_trim_file(f)
            except (FileNotFoundError, TrimFileError) as exc:
                raise Refused(str(exc)) from None
        self._settings_changed = True
        self._call(lambda: self.det.loadTrimbits(str(prefix)))
        return files

    def save_trimbits(self, prefix: str) -> list[str]:
        self._check_prefix(prefix)
        try:
            Path(prefix).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise Refused(f"cannot create {Path(prefix).parent}: {exc.strerror}; choose a "
                          "writable directory") from None
        self._call(lambda: self.det.saveTrimbits(str(prefix)))
        return self._files(prefix)

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
        if self._settings_changed:
            return "undefined"
        value = self._call(lambda: self.det.settings)
        name = getattr(value, "name", str(value)).split(".")[-1].lower()
        return name if name in SETTINGS_NAMES else "undefined"

    @property
    def threshold_eV(self) -> int:
        if self.loaded_settings == "undefined":
            return -1
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
            for s in self.serials:
                path = trim_file_path(self.settings_dir, self.settings, energy, s)
                if not path.is_file():
                    raise Refused(f"trim file {path} not found; copy the module's settings into "
                                  "SettingsDir or remove that energy from TrimEnergies")
        enum = getattr(self._settings_enum, self.settings.upper())
        self._settings_changed = True          # until slsdet has loaded every module
        self._call(lambda: self.det.setThresholdEnergy(int(e), enum, bool(trimbits)))
        self._settings_changed = False

    # -- acquisition settings -------------------------------------------------------------------------
    @property
    def dr(self) -> int:
        return int(self._call(lambda: self.det.dr))

    def set_dynamic_range(self, dr: int) -> None:
        if int(dr) != dr or int(dr) not in DYNAMIC_RANGES:
            raise Refused(f"dynamic range {dr} bit not supported; EIGER counts with "
                          f"{', '.join(map(str, DYNAMIC_RANGES))} bit")
        tau = self.tau_ns
        if tau != 0 and int(dr) not in RATE_CORRECTION_RANGES:
            raise Refused(f"rate correction is on (tau {tau} ns) and works only at 16 or 32 bit; "
                          f"put RateCorrTau = 0 first to count at {int(dr)} bit")
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
        scan = self.scan()
        if scan is not None and int(n) != len(scan.values):
            raise Refused(f"the detector scans ({scan.text}): it takes one frame per step, "
                          f"{len(scan.values)} frames; put Scan = 0 first to set the frames")
        self._call(lambda: setattr(self.det, "frames", int(n)))

    @property
    def tau_ns(self) -> int:
        """The rate-correction dead time the detector applies (ns; 0 = off), read back: the
        server loads a trim file's tau only while rate correction is on."""
        values = self._call(lambda: list(self.det.getRateCorrection()))
        return _common([int(round(v.total_seconds() * 1e9)) for v in values])

    # -- detector-side scan ---------------------------------------------------------------------
    def _scan_index(self, target: str):
        _, dac_index = self._scan_types
        name = {"vthreshold": "VTHRESHOLD", SCAN_TRIMBITS: "TRIMBIT_SCAN"}.get(target,
                                                                               target.upper())
        return getattr(dac_index, name)

    def scan(self) -> ScanParameters | None:
        """The server's scan (d.getScan(), the same on every half module), or None."""
        if self._scan_types is None:
            return None
        per_module = self._call(lambda: list(self.det.getScan()))
        first = per_module[0]
        if not first.enable:
            return None
        index = first.dacInd
        name = str(getattr(index, "name", index)).split(".")[-1].lower()
        target = {"vthreshold": "vthreshold", "trimbit_scan": SCAN_TRIMBITS}.get(name, name)
        return ScanParameters(target, int(first.startOffset), int(first.stopOffset),
                              int(first.stepSize), int(first.dacSettleTime_ns) * 1e-9)

    def set_scan(self, params: ScanParameters | None) -> None:
        """d.setScan: the server then takes one frame per step (frames = steps) or, with None,
        goes back to one frame per acquisition."""
        if self._scan_types is None:
            raise Refused("this EIGER backend was opened without slsdet's scan types; open it "
                          "with open_eiger")
        scan_parameters, _ = self._scan_types
        if params is None:
            value = scan_parameters()
        else:
            if params.target != SCAN_TRIMBITS:
                check_dac(params.target, params.start)
                check_dac(params.target, params.stop)
            value = scan_parameters(self._scan_index(params.target), params.start, params.stop,
                                    params.step, datetime.timedelta(seconds=params.settle_s))
        self._call(lambda: self.det.setScan(value))

    def set_rate_correction(self, tau_ns: float) -> None:
        if not 0 <= float(tau_ns) <= 10000:
            raise Refused(f"rate-correction tau {tau_ns} ns outside 0..10000 ns (0 disables it)")
        dr = self.dr
        if float(tau_ns) != 0 and dr not in RATE_CORRECTION_RANGES:
            raise Refused(f"rate correction works only at 16 or 32 bit and the detector counts "
                          f"with {dr}; put DynamicRange = 16 or 32 first")
        self._settings_changed = True
        self._call(lambda: setattr(self.det, "ratecorr", float(tau_ns) * 1e-9))

    def set_test_pulses(self, n: int) -> None:
        if int(n) != n or not 0 <= int(n) <= 65535:
            raise Refused(f"test pulse count {n} outside 0..65535")
        self.test_pulses = int(n)

    def temperature(self) -> float:
        return float(max(self._call(lambda: self.det.temp.fpga[:])))

    # -- acquisition ----------------------------------------------------------------------------------
    def acquire(self, on_frame: Callable[[int, NDArray, float], None] | None = None
                ) -> Acquisition:
        """Acquire through the receiver's raw files (see the module docstring); run it in a worker
        thread. slsdet is asked for short things only (start, status, stop), so other threads
        (the IOC's event loop) keep running; `abort` ends it within one status poll."""
        self._abort.clear()
        dr, n, scan = self.dr, self.frames, self.scan()
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
            if _state_name(_common_state(d.getReceiverStatus())) != "IDLE":
                d.stopReceiver()           # left running by a client that died mid-acquisition

        self._call(setup)
        self._call(d.startReceiver)
        start = time.time()
        try:
            self._call(d.startDetector)
            aborted = self._wait_for_detector()
        finally:
            self._call(d.stopReceiver)      # the receiver closes its files
        try:
            frames = self._read_raw(fname, findex, dr, n)
        finally:
            for path in self._scratch.glob(f"{fname}_*_{findex}.*"):
                path.unlink(missing_ok=True)
        period = max(self.period, self.exptime)
        if scan is not None:            # the server set each step before its frame
            period += scan.settle_s
            self._settings_changed = True
        starts = start + period * np.arange(len(frames))
        if on_frame is not None:
            for i, frame in enumerate(frames):
                on_frame(i, frame, float(starts[i]))
        return Acquisition(frames=frames, start_times=starts,
                           aborted=aborted or len(frames) < n,
                           scan_values=scan.values[:len(frames)] if scan else None)

    def _wait_for_detector(self) -> bool:
        """Poll the run status until every half module is done; stop them on abort. Returns
        whether the acquisition was aborted."""
        d = self.det
        aborted = False
        while True:
            if self._abort.is_set() and not aborted:
                aborted = True
                self._call(d.stopDetector)
            states = [_state_name(s) for s in self._call(lambda: list(d.getDetectorStatus()))]
            if "ERROR" in states:
                raise InstrumentFault(f"the detector reports an error status ({states}); check "
                                      "the detector server's log")
            if all(s in _DONE_STATES for s in states):
                return aborted
            self._abort.wait(STATUS_POLL_S)

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
        if not len(frames):
            return frames
        order = [self._port_order(per_port, hm) for hm in range(g.n_half_modules)]
        for i in range(len(frames)):
            blocks = []
            for hm, (left, right) in enumerate(order):
                block = np.hstack([unpack_port(per_port[p][i, RECEIVER_HEADER_BYTES:], dr)
                                   for p in (left, right)])
                # bottom half modules (and the lone half module of a 250k) read out upside down
                flipped = hm % 2 == 1 or g.single_half_module
                blocks.append(np.flipud(block) if flipped else block)
            frames[i] = g.join_half_modules(blocks)
        return frames

    @staticmethod
    def _port_order(per_port: list[NDArray], hm: int) -> tuple[int, int]:
        """(left port, right port) of half module ``hm``, by the column in their first frame's
        header (the firmware puts a bottom half module's first port on the right)."""
        a, b = 2 * hm, 2 * hm + 1
        col_a = _HEADER.unpack_from(per_port[a][0].tobytes(), 0)[_HEADER_COLUMN]
        col_b = _HEADER.unpack_from(per_port[b][0].tobytes(), 0)[_HEADER_COLUMN]
        if col_a == col_b:
            raise InstrumentFault(f"both ports of half module {hm} carry column {col_a} in their "
                                  "headers; the frames cannot be placed (check the detector's "
                                  "position settings and the receiver)")
        return (a, b) if col_a < col_b else (b, a)

    def abort(self) -> None:
        """Ask a running acquisition to stop (the acquiring thread stops the detector)."""
        self._abort.set()

    def make_safe(self) -> None:
        """Stop any acquisition and switch the test pulses off."""
        self._abort.set()
        try:
            self.det.stop()
            self.det.pulseChip(-1)
        except Exception:      # shutting down: log, never raise
            log.exception("could not make the EIGER safe")


def _saved_trimbits(path: str) -> NDArray[np.int32]:
    """The trimbits of a trim file slsdet saved; -1 where the server never had any (a server
    that has not loaded trimbits since it started saves -1 for every pixel)."""
    try:
        return read_trim_file(path).trimbits
    except TrimFileError as exc:
        data = np.fromfile(path, dtype="<i4")
        block = data[len(DAC_NAMES) + 2:]
        unset = block == -1
        if block.size != 256 * 1024 or not np.all(unset | ((block >= 0) & (block <= TRIMBIT_MAX))):
            raise InstrumentFault(f"the trimbits slsdet saved cannot be read back: {exc}") from None
        return block.reshape(256, 1024).astype(np.int32)
    except OSError as exc:
        raise InstrumentFault(f"the trimbits slsdet saved cannot be read back: {exc}") from None


def _common(value) -> int:
    """slsdet returns a scalar when modules agree and a list otherwise; -1 for disagreement."""
    values = np.atleast_1d(value)
    return int(values[0]) if np.all(values == values[0]) else -1


def _common_state(value):
    """One run status for all modules (slsdet returns one or a list); "ERROR" if they differ."""
    if isinstance(value, (list, tuple)):
        names = {_state_name(v) for v in value}
        return names.pop() if len(names) == 1 else "ERROR"
    return value
