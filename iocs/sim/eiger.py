# Long by design: one class holds the detector server's whole state, as slsDetectorServer does (pixels: eiger_pixels.py).
"""Simulated PSI EIGER, the detector server: DACs, trimbits, settings and trim files, acquisition
settings and the acquisition's timing, as slsDetectorServer holds them. What the pixels count at these
settings is the pixel physics of iocs/sim/eiger_pixels.py (documented there; EigerSim inherits it).
The hidden truth is returned by `EigerSim.truth()` for tests; analysis never sees it.
"""
from __future__ import annotations

import atexit
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from calbench.contracts.eiger_geometry import DYNAMIC_RANGES, frame_dtype
from calbench.contracts.eiger_geometry import geometry as eiger_geometry
from calbench.contracts.trimfile import (DAC_DEFAULTS, DAC_NAMES, IODELAY_DEFAULT, SETTINGS_NAMES,
                                        TRIMBIT_MAX, TrimFile, TrimFileError, bracket_trim_energies,
                                        interpolate_trim, read_trim_file, serial_from_hostname,
                                        trim_file_path, write_trim_file)
from calbench.contracts.errors import InstrumentFault, Refused
from calbench.contracts.clock import WorldClock
from calbench.contracts.eiger import SCAN_TRIMBITS, Acquisition, ScanParameters, check_dac
from calbench.iocs.sim.eiger_pixels import FACTORY_TAU_NS, EigerTruth, PixelResponse, make_truth

BeamSource = Callable[[], tuple[float, float]]


class EigerSim(PixelResponse):
    """Simulated EIGER backend (the interface the EigerIOC drives; iocs/hw/eiger.py has the same).

    DAC state is a [17, n_half_modules] int table (16 DACs in ``DAC_NAMES`` order + iodelay), as
    slsdet's ``dacs.get_asarray()``; trimbits are image-shaped."""

    def __init__(self, clock: WorldClock, *, geometry: str = "500k", seed: int = 0,
                 source: BeamSource | None = None, hostnames: list[str] | None = None,
                 det_id: str = "T63", settings_dir: str = "",
                 trim_energies: list[int] | None = None):
        self.clock = clock
        self.geometry = eiger_geometry(geometry)
        g = self.geometry
        self.source = source
        self.det_id = det_id
        hostnames = list(hostnames or [])
        if len(hostnames) < g.n_half_modules:     # name the missing half modules after the first
            first = int(serial_from_hostname(hostnames[0])) if hostnames else 58
            hostnames += [f"beb{first + i:03d}" for i in range(len(hostnames), g.n_half_modules)]
        self.hostnames = hostnames[:g.n_half_modules]
        self._truth = make_truth(g, seed)
        self._rng = np.random.default_rng([seed, 0xF4A3E])
        self._lock = threading.RLock()
        self._abort = threading.Event()
        self.unresponsive = False          # fault injection: the detector stops answering
        self._tmpdir: Path | None = None
        if settings_dir:
            self.settings_dir = str(Path(settings_dir).expanduser())
        else:                               # the module's own factory settings, private to this IOC
            self._tmpdir = Path(tempfile.mkdtemp(prefix="calbench-eiger-settings-"))
            atexit.register(shutil.rmtree, self._tmpdir, True)
            self.settings_dir = str(self._tmpdir)
        self.trim_energies = sorted(int(e) for e in (trim_energies or [4500, 5400, 6400]))
        self.settings = "standard"          # folder used by set_threshold_energy
        self.loaded_settings = "undefined"
        self.threshold_eV = -1
        # detector state (server defaults)
        dac0 = [DAC_DEFAULTS[n] for n in DAC_NAMES] + [IODELAY_DEFAULT]
        self._dacs = np.tile(np.array(dac0, np.int64)[:, None], (1, g.n_half_modules))
        self._trimbits = np.zeros(g.shape, np.int8)
        self.dr = 16
        self.exptime = 1.0
        self.period = 0.0
        self._frames = 1
        self._scan: ScanParameters | None = None
        self.tau_ns = 0
        self.test_pulses = 0
        self._cache: dict | None = None
        self._trim_version = 0
        self.ensure_factory_settings()

    # -- hidden truth -----------------------------------------------------------------------------
    def truth(self) -> EigerTruth:
        """The hidden parameters (tests only; analysis must never call this)."""
        return self._truth

    # -- checks -------------------------------------------------------------------------------------
    def _check_responsive(self) -> None:
        if self.unresponsive:
            raise InstrumentFault(f"no answer from {'+'.join(self.hostnames)}: the detector server "
                                  "does not respond; power-cycle the module and check the network")

    _check_dac = staticmethod(check_dac)

    def _changed(self) -> None:
        """Direct DAC/trimbit edits make the loaded settings undefined (slsDetector #1507)."""
        self.loaded_settings = "undefined"
        self.threshold_eV = -1

    def _check_hm(self, hm: int | None) -> list[int]:
        if hm is None:
            return list(range(self.geometry.n_half_modules))
        if not 0 <= hm < self.geometry.n_half_modules:
            raise Refused(f"half module {hm} does not exist (0..{self.geometry.n_half_modules - 1})")
        return [hm]

    # -- DACs ---------------------------------------------------------------------------------------
    def dac_table(self) -> NDArray[np.int64]:
        """[17, n_half_modules]: 16 DACs (``DAC_NAMES`` order) and iodelay, DAC units."""
        self._check_responsive()
        return self._dacs.copy()

    def set_dac(self, name: str, value: int, hm: int | None = None) -> None:
        """Set a DAC (slsdet name, or 'iodelay') on one or all half modules."""
        self._check_responsive()
        index = self._dac_index(name)
        v = self._check_dac(name, value)
        with self._lock:
            for h in self._check_hm(hm):
                self._dacs[index, h] = v
            self._changed()

    def set_dac_table(self, table) -> None:
        """Set every DAC of every half module from a [17, n_half_modules] table."""
        self._check_responsive()
        t = np.asarray(table, dtype=float)
        shape = self._dacs.shape
        if t.size != self._dacs.size:
            raise Refused(f"DAC table needs {shape[0]} x {shape[1]} = {self._dacs.size} values "
                          f"(DACs x half modules), got {t.size}")
        t = t.reshape(shape)
        names = list(DAC_NAMES) + ["iodelay"]
        checked = np.array([[self._check_dac(names[i], t[i, h]) for h in range(shape[1])]
                            for i in range(shape[0])], np.int64)
        with self._lock:
            self._dacs[:] = checked
            self._changed()

    @staticmethod
    def _dac_index(name: str) -> int:
        if name == "iodelay":
            return len(DAC_NAMES)
        try:
            return DAC_NAMES.index(name)
        except ValueError:
            raise Refused(f"no DAC {name!r}; EIGER DACs are {', '.join(DAC_NAMES)}, iodelay") from None

    def vthreshold(self) -> int:
        """Common value of vcmp_ll/lr/rl/rr and vcp of every half module, or -1 if they differ."""
        self._check_responsive()
        idx = [DAC_NAMES.index(n) for n in ("vcmp_ll", "vcmp_lr", "vcmp_rl", "vcmp_rr", "vcp")]
        values = self._dacs[idx]
        return int(values.flat[0]) if np.all(values == values.flat[0]) else -1

    def set_vthreshold(self, value: int) -> None:
        """Set the four vcmp and vcp of every half module (slsdet E_VTHRESHOLD)."""
        self._check_responsive()
        v = self._check_dac("vthreshold", value)
        idx = [DAC_NAMES.index(n) for n in ("vcmp_ll", "vcmp_lr", "vcmp_rl", "vcmp_rr", "vcp")]
        with self._lock:
            self._dacs[idx, :] = v
            self._changed()

    def vcmp(self) -> list[int]:
        """Per-chip vcmp in chip order (slsdet ``d.vcmp[:]``: bottom half modules reversed)."""
        self._check_responsive()
        g = self.geometry
        out = []
        for chip in range(g.n_chips):
            hm, name = g.chip_vcmp(chip)
            out.append(int(self._dacs[DAC_NAMES.index(name), hm]))
        return out

    def set_vcmp(self, values) -> None:
        """Set the vcmp of every chip (chip order, as slsdet ``d.vcmp = [...]``)."""
        self._check_responsive()
        g = self.geometry
        values = list(np.asarray(values).ravel())
        if len(values) != g.n_chips:
            raise Refused(f"vcmp needs one value per chip ({g.n_chips}), got {len(values)}")
        checked = [self._check_dac("vcmp", v) for v in values]
        with self._lock:
            for chip, v in enumerate(checked):
                hm, name = g.chip_vcmp(chip)
                self._dacs[DAC_NAMES.index(name), hm] = v
            self._changed()

    # -- trimbits -----------------------------------------------------------------------------------
    def trimbits(self) -> NDArray[np.int8]:
        """Image-shaped trimbits (0..63)."""
        self._check_responsive()
        return self._trimbits.copy()

    def set_trimbits(self, values) -> None:
        """Set every pixel's trimbit from an image-shaped (or flat) array of 0..63."""
        self._check_responsive()
        g = self.geometry
        a = np.asarray(values)
        if a.size != g.n_pixels:
            raise Refused(f"trimbits need {g.n_pixels} values ({g.rows} x {g.cols}, a {g.name}), "
                          f"got {a.size}")
        if a.size and (a.min() < 0 or a.max() > TRIMBIT_MAX or np.any(np.round(a) != a)):
            raise Refused(f"trimbits must be integers 0..{TRIMBIT_MAX}, got {a.min()}..{a.max()}")
        with self._lock:
            self._trimbits[:] = a.reshape(g.shape)
            self._trim_version += 1
            self._changed()

    def trimval(self) -> int:
        """The common trimbit of every pixel, -1 if they differ (slsdet ``trimval``)."""
        self._check_responsive()
        t = self._trimbits
        return int(t.flat[0]) if np.all(t == t.flat[0]) else -1

    def set_trimval(self, value: int) -> None:
        """Set all trimbits to one value 0..63."""
        self._check_responsive()
        v = float(value)
        if not v.is_integer() or not 0 <= v <= TRIMBIT_MAX:
            raise Refused(f"trimbit {value} outside 0..{TRIMBIT_MAX}")
        with self._lock:
            self._trimbits[:] = int(v)
            self._trim_version += 1
            self._changed()

    # -- trim / settings files ------------------------------------------------------------------------
    def _serials(self) -> list[str]:
        return [serial_from_hostname(h) for h in self.hostnames]

    def _apply(self, per_hm: list[TrimFile], *, trimbits: bool = True) -> None:
        g = self.geometry
        with self._lock:
            for hm, tf in enumerate(per_hm):
                self._dacs[:len(DAC_NAMES), hm] = tf.dacs
                if tf.iodelay is not None:      # a 16-DAC file leaves iodelay as it was
                    self._dacs[len(DAC_NAMES), hm] = tf.iodelay
                if trimbits:
                    self._trimbits[g.half_module_slice(hm)] = tf.trimbits
            self.tau_ns = int(per_hm[0].tau_ns)
            self._trim_version += 1

    def load_trimbits(self, prefix: str) -> list[str]:
        """Load ``{prefix}.sn{serial}`` for every half module (slsdet ``d.trimbits = prefix``): DACs,
        iodelay, tau and trimbits. Returns the file names."""
        self._check_responsive()
        files = [f"{prefix}.sn{s}" for s in self._serials()]
        per_hm = [self._read(f) for f in files]
        self._apply(per_hm)
        self._changed()
        return files

    def save_trimbits(self, prefix: str) -> list[str]:
        """Write the current settings of every half module to ``{prefix}.sn{serial}``."""
        self._check_responsive()
        g = self.geometry
        files = []
        for hm, serial in enumerate(self._serials()):
            path = f"{prefix}.sn{serial}"
            try:
                write_trim_file(path, self._dacs[:len(DAC_NAMES), hm], int(self._dacs[-1, hm]),
                                self.tau_ns, self._trimbits[g.half_module_slice(hm)])
            except OSError as exc:
                raise Refused(f"cannot write trim file {path}: {exc.strerror}; choose a writable "
                              "directory") from None
            files.append(path)
        return files

    @staticmethod
    def _read(path) -> TrimFile:
        try:
            return read_trim_file(path)
        except FileNotFoundError as exc:
            raise Refused(str(exc)) from None
        except TrimFileError as exc:
            raise Refused(f"{exc}") from None

    def set_trim_energies(self, energies) -> None:
        """The trim energies (eV) for which trim files exist in the settings directory."""
        self._check_responsive()
        values = [float(e) for e in np.asarray(energies).ravel() if float(e) > 0]
        if any(not v.is_integer() for v in values) or len(set(values)) != len(values):
            raise Refused(f"trim energies must be distinct whole eV values, got {values}")
        self.trim_energies = sorted(int(v) for v in values)

    def set_settings_dir(self, path: str) -> None:
        """Root of the settings tree ``{dir}/{settings}/{E}eV/noise.snXXX`` (slsdet settingspath)."""
        self._check_responsive()
        if not path or not Path(path).is_absolute():
            raise Refused(f"settings directory {path!r} must be an absolute path")
        if not Path(path).is_dir():
            raise Refused(f"settings directory {path} does not exist; create it or copy the "
                          "module's settings there")
        self.settings_dir = str(path)

    def set_settings(self, name: str) -> None:
        """Settings folder used by the next threshold energy (standard, highgain, ...)."""
        if name not in SETTINGS_NAMES:
            raise Refused(f"settings {name!r} unknown; use one of {', '.join(SETTINGS_NAMES)}")
        self.settings = name

    def set_threshold_energy(self, energy_eV: int, trimbits: bool = True) -> None:
        """slsDetector ``setThresholdEnergy``: load or interpolate the trim files of the settings
        folder; refused outside the trim energies or when a file is missing or inconsistent."""
        self._check_responsive()
        e = float(energy_eV)
        if not e.is_integer():
            raise Refused(f"threshold energy {energy_eV} eV must be a whole number of eV")
        e = int(e)
        try:
            found = bracket_trim_energies(e, self.trim_energies)
        except ValueError as exc:
            raise Refused(str(exc)) from None
        serials = self._serials()

        def load(energy: int) -> list[TrimFile]:
            return [self._read(trim_file_path(self.settings_dir, self.settings, energy, s))
                    for s in serials]

        if isinstance(found, int):
            per_hm = load(found)
        else:
            e1, e2 = found
            a, b = load(e1), load(e2)
            try:
                per_hm = [interpolate_trim(e, e1, x, e2, y, trimbits=trimbits) for x, y in zip(a, b)]
            except TrimFileError as exc:
                raise Refused(str(exc)) from None
        self._apply(per_hm, trimbits=trimbits)
        self.loaded_settings = self.settings
        self.threshold_eV = e

    def ensure_factory_settings(self) -> list[Path]:
        """Write the module's factory trim files (standard settings, each trim energy) where they
        are missing, as PSI ships them with a module: the line at vcmp ~1150, trimmed. Existing
        files are never touched. Returns the files written."""
        written = []
        for energy in self.trim_energies:
            paths = [trim_file_path(self.settings_dir, "standard", energy, s) for s in self._serials()]
            if all(p.is_file() for p in paths):
                continue
            files = self.factory_trim(energy / 1000.0)
            tau = FACTORY_TAU_NS.get(energy, 300)
            for path, tf in zip(paths, files):
                if not path.is_file():
                    write_trim_file(path, tf.dacs, tf.iodelay, tau, tf.trimbits)
                    written.append(path)
        return written

    # -- acquisition settings -------------------------------------------------------------------------
    def set_dynamic_range(self, dr: int) -> None:
        self._check_responsive()
        if int(dr) != dr or int(dr) not in DYNAMIC_RANGES:
            raise Refused(f"dynamic range {dr} bit not supported; EIGER counts with "
                          f"{', '.join(map(str, DYNAMIC_RANGES))} bit")
        self.dr = int(dr)

    def set_exptime(self, seconds: float) -> None:
        self._check_responsive()
        if not 0 < float(seconds) <= 3600:
            raise Refused(f"exposure time {seconds} s outside (0, 3600] s")
        self.exptime = float(seconds)

    def set_period(self, seconds: float) -> None:
        self._check_responsive()
        if not 0 <= float(seconds) <= 3600:
            raise Refused(f"period {seconds} s outside 0..3600 s (0: as fast as possible)")
        self.period = float(seconds)

    @property
    def frames(self) -> int:
        """Frames per acquisition: in a scan, its number of steps (as the server reports)."""
        return len(self._scan.values) if self._scan else self._frames

    def set_frames(self, n: int) -> None:
        self._check_responsive()
        if int(n) != n or not 1 <= int(n) <= 100000:
            raise Refused(f"number of frames {n} outside 1..100000")
        if self._scan and int(n) != self.frames:
            raise Refused(f"the detector scans ({self._scan.text}): it takes one frame per step, "
                          f"{self.frames} frames; put Scan = 0 first to set the frames")
        self._frames = int(n)

    def scan(self) -> ScanParameters | None:
        """The detector-side scan the next acquisition runs, or None."""
        self._check_responsive()
        return self._scan

    def set_scan(self, params: ScanParameters | None) -> None:
        """Enable a detector-side scan (one frame per step) or, with None, disable it; either
        way the frames per acquisition go back to 1 (slsDetectorServer set_scan)."""
        self._check_responsive()
        if params is not None and params.target != SCAN_TRIMBITS:
            self._check_dac(params.target, params.start)
            self._check_dac(params.target, params.stop)
        self._scan = params
        self._frames = 1

    def _apply_scan_step(self, value: int) -> None:
        target = self._scan.target
        if target == SCAN_TRIMBITS:
            self.set_trimval(value)
        elif target == "vthreshold":
            self.set_vthreshold(value)
        else:
            self.set_dac(target, value)

    def set_rate_correction(self, tau_ns: float) -> None:
        self._check_responsive()
        if not 0 <= float(tau_ns) <= 10000:
            raise Refused(f"rate-correction tau {tau_ns} ns outside 0..10000 ns (0 disables it)")
        self.tau_ns = int(round(float(tau_ns)))

    def set_test_pulses(self, n: int) -> None:
        """Test pulses injected into every pixel during each exposure (0: off)."""
        self._check_responsive()
        if int(n) != n or not 0 <= int(n) <= 65535:
            raise Refused(f"test pulse count {n} outside 0..65535")
        self.test_pulses = int(n)

    def temperature(self) -> float:
        """FPGA temperature (degC): warm module drifting with the room's air conditioning."""
        self._check_responsive()
        t = self.clock.now()
        return round(41.0 + 1.2 * np.sin(2 * np.pi * t / 5400.0) + 0.3 * np.sin(t / 97.0), 2)

    def _beam(self) -> tuple[float, float]:
        return self.source() if self.source is not None else (0.0, 0.0)

    def acquire(self, on_frame: Callable[[int, NDArray, float], None] | None = None
                ) -> Acquisition:
        """Take ``frames`` exposures of ``exptime`` world seconds, ``period`` apart (blocking; the
        IOC runs it in a worker thread). ``on_frame(i, frame, start)`` is called as each frame is
        read out (and the frame is not kept). `abort()` ends it early with the frames taken so
        far."""
        self._check_responsive()
        self._abort.clear()
        n, exptime, scan = self.frames, self.exptime, self._scan
        # a scan waits its settle time after each setting (slsDetectorServer start_state_machine)
        spacing = max(self.period, exptime) + (scan.settle_s if scan else 0.0)
        # kept only for a caller without on_frame (the IOC streams each frame to its file)
        frames = (np.empty((n,) + self.geometry.shape, frame_dtype(self.dr))
                  if on_frame is None else None)
        starts = np.empty(n)
        t0 = self.clock.now()
        done = 0
        for i in range(n):
            if scan:
                self._apply_scan_step(int(scan.values[i]))
            start = t0 + i * spacing + (scan.settle_s if scan else 0.0)
            self._sleep_until(start)
            if self._abort.is_set():
                break
            e0, f0 = self._beam()
            frame = self._count(e0, f0, exptime)         # computed while the exposure runs
            self._sleep_until(start + exptime)
            if self._abort.is_set():
                break
            e1, f1 = self._beam()
            if abs(f1 - f0) > 1e-6 * max(f0, f1, 1.0) or e1 != e0:
                # the beam changed during the exposure (shutter, target): average what was seen
                frame = self._count(e1 if f1 >= f0 else e0, 0.5 * (f0 + f1), exptime)
            if frames is not None:
                frames[i] = frame
            starts[i] = start
            done += 1
            if on_frame is not None:
                on_frame(i, frame, start)
        return Acquisition(frames=frames[:done] if frames is not None else None,
                           start_times=starts[:done],
                           aborted=done < n, scan_values=scan.values[:done] if scan else None)

    def _sleep_until(self, world_t: float) -> None:
        while not self._abort.is_set():
            remaining = world_t - self.clock.now()
            if remaining <= 0:
                return
            self._abort.wait(min(self.clock.wall_seconds(remaining), 0.05))

    def abort(self) -> None:
        """Stop an acquisition in progress."""
        self._abort.set()

    def make_safe(self) -> None:
        """Stop any acquisition and the test pulses (the sensor bias stays: it is safe on)."""
        self._abort.set()
        self.test_pulses = 0


def build_eiger(clock: WorldClock, seed: int, settings: dict, source: BeamSource | None) -> EigerSim:
    """The EIGER simulator from its instrument settings (calbench/instruments.py)."""
    return EigerSim(clock, geometry=settings.get("geometry", "500k"), seed=seed, source=source,
                    hostnames=list(settings.get("hostnames", ["beb058", "beb059"])),
                    det_id=settings.get("det_id", "T63"),
                    settings_dir=settings.get("settings_dir", ""),
                    trim_energies=list(settings.get("trimen", [4500, 5400, 6400])))
