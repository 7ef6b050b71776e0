# Long by design: EigerIOC is the detector's whole PV interface (settings table, files, scan PVs and reductions live in their own modules).
"""EigerIOC: the PSI EIGER detector as EPICS PVs (slsdet names for DACs, areaDetector for acquisition).

PVs after the instrument prefix (e.g. CB:EIGER:). Setpoints have an _RBV readback; DAC setpoints
write every half module and their _RBV reads -1 when the half modules differ.

  Geometry_RBV, ArraySizeY_RBV (rows), ArraySizeX_RBV (cols), NumHalfModules_RBV, NumChips_RBV,
  Hostnames_RBV ("beb058+beb059"), Serials_RBV (trim-file serials "031+032": the module ids the
  detector reports; the simulator's come from its hostnames), DetId_RBV
  vsvp vtrim vrpreamp vrshaper vsvn vtgstv vcmp_ll vcmp_lr vcal vcmp_rl rxb_rb rxb_lb vcmp_rr vcp
  vcn vishaper iodelay (+ _RBV)            DAC units 0..4000
  DacTable, DacTable_RBV                   all DACs [17 x n_half_modules] row-major (slsdet
                                           dacs.get_asarray(): 16 DACs in index order, iodelay)
  Vthreshold, Vthreshold_RBV               the four vcmp + vcp of every half module; -1 on mismatch
  Vcmp, Vcmp_RBV                           per-chip vcmp, slsdet order (bottom half modules reversed)
  Trimbits, Trimbits_RBV                   whole-detector trimbits (rows x cols, row-major), 0..63
  Trimval, Trimval_RBV                     all trimbits to one value; -1 when they differ
  LoadTrimbits, SaveTrimbits               path prefix; ".snXXX" is appended per half module
  DynamicRange, DynamicRange_RBV           4, 8, 12, 16 or 32 bit
  AcquireTime, AcquirePeriod, NumImages (+ _RBV)   s, s, frames per acquisition
  ThresholdEnergy, ThresholdEnergy_RBV     eV, trim-energy interpolation; -1 = settings undefined
  TrimEnergies, TrimEnergies_RBV           eV list; Settings (folder for ThresholdEnergy),
  Settings_RBV (loaded settings or "undefined"); SettingsDir, SettingsDir_RBV
  RateCorrTau, RateCorrTau_RBV             dead-time correction tau, ns (0 = off)
  TestPulses, TestPulses_RBV               test pulses per frame (height set by vcal; 0 = off)
  Temperature_RBV                          FPGA temperature, degC
  Acquire (Done/Acquire; the put completes when the frames are written), Acquire_RBV,
  DetectorState_RBV, ArrayCounter, ArrayCounter_RBV, NumImagesCounter_RBV, AcquireStartTime_RBV
  FilePath, FileName, FileNumber, Capture, FileWriteMode, ... (+ _RBV)   HDF5 file writing,
                                           see iocs/eiger_files.py
  ChipSums_RBV, TotalCounts_RBV            counts per chip / in total of the last acquisition
  Scan, Scan_RBV, ScanSteps_RBV, FrameChipSums_RBV, FrameValues_RBV, FrameStartTimes_RBV
                                           detector-side scan and per-frame records
                                           (iocs/eiger_scan_pvs.py)
  Image:ArrayData, Image:ArraySizeX_RBV, Image:ArraySizeY_RBV, Image:Binning_RBV
                                           live view: last frame summed in 4 x 4 bins (float32)
  StatusMessage_RBV, Refusals_RBV, Connected_RBV, WorldTime_RBV   (iocs/base.py)
  Sim:Unresponsive                         simulated backend only: 1 = the detector stops answering

Settings puts are refused while an acquisition runs ("detector is acquiring"), as the real
detector server does. The setting PVs are declared in a table (iocs/eiger_pvs.py). Backend calls
run on the detector's worker thread, one at a time, so a slow detector never holds up Channel
Access; an error of the backend nobody expected becomes a fault on StatusMessage_RBV
(Connected_RBV = 0) and the IOC keeps serving.
"""
from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import numpy as np
from caproto import ChannelType
from caproto.server import SubGroup, pvproperty

from calbench.contracts.eiger import SCAN_TRIMBITS
from calbench.contracts.eiger_geometry import EigerGeometry, frame_dtype
from calbench.contracts.trimfile import SETTINGS_NAMES, serial_from_hostname
from calbench.iocs.base import InstrumentFault, Refused, enum_pv, string_pv
from calbench.iocs.eiger_files import MAX_COUNTER, EigerFilePVs
from calbench.iocs.eiger_hdf5 import FrameRecords, acquire_to_file
from calbench.iocs.eiger_pvs import (ALL_DACS, EIGER_SETTINGS, LIVE_BINNING, MAX_TRIM_ENERGIES,
                                     TRIMBIT_CALLS, EigerDacs, LiveImage, SimControls, array_pv,
                                     float_pv, int_pv, size_waveforms)
from calbench.iocs.eiger_reductions import Reductions
from calbench.iocs.eiger_scan_pvs import EigerScanPVs, sized_lengths
from calbench.iocs.settings_table import settings_group

log = logging.getLogger(__name__)

DETECTOR_STATES = ["Idle", "Acquire", "Readout", "Correct", "Saving", "Aborting", "Error",
                   "Waiting", "Initializing", "Disconnected", "Aborted"]
ACQUIRE = ["Done", "Acquire"]
POLL_PERIOD_S = 1.0


class EigerIOC(settings_group("EigerSettings", EIGER_SETTINGS, EigerFilePVs)):
    """PVs of an EIGER detector over a backend (iocs/sim/eiger.py:EigerSim or iocs/hw/eiger.py)."""

    geometry_name = string_pv("Geometry_RBV")
    size_y = int_pv("ArraySizeY_RBV", read_only=True, doc="rows")
    size_x = int_pv("ArraySizeX_RBV", read_only=True, doc="columns")
    n_half_modules = int_pv("NumHalfModules_RBV", read_only=True)
    n_chips = int_pv("NumChips_RBV", read_only=True)
    hostnames = string_pv("Hostnames_RBV")
    serials = string_pv("Serials_RBV", doc="trim-file serials (.snNNN) of the half modules")
    det_id = string_pv("DetId_RBV")

    dacs = SubGroup(EigerDacs, prefix="")
    dac_table_rbv = array_pv("DacTable_RBV", ChannelType.LONG, read_only=True)
    vthreshold_rbv = int_pv("Vthreshold_RBV", read_only=True, doc="-1 if they differ")
    vcmp_rbv = array_pv("Vcmp_RBV", ChannelType.LONG, read_only=True)

    trimbits_rbv = array_pv("Trimbits_RBV", ChannelType.INT, read_only=True)
    trimval_rbv = int_pv("Trimval_RBV", read_only=True, doc="-1 if trimbits differ")
    load_trimbits = string_pv("LoadTrimbits", read_only=False,
                              doc="path prefix of trim files to load (.snXXX appended)")
    save_trimbits = string_pv("SaveTrimbits", read_only=False,
                              doc="path prefix to save the trim files to (.snXXX appended)")

    dynamic_range_rbv = int_pv("DynamicRange_RBV", 16, read_only=True)
    acquire_time_rbv = float_pv("AcquireTime_RBV", 1.0, units="s", read_only=True)
    acquire_period_rbv = float_pv("AcquirePeriod_RBV", 0.0, units="s", read_only=True)
    num_images_rbv = int_pv("NumImages_RBV", 1, read_only=True)

    threshold_energy_rbv = int_pv("ThresholdEnergy_RBV", -1, read_only=True,
                                   doc="eV; -1 when DACs or trimbits were set directly")
    trim_energies_rbv = pvproperty(name="TrimEnergies_RBV", value=[4500, 5400, 6400],
                                   dtype=ChannelType.LONG, max_length=MAX_TRIM_ENERGIES,
                                   read_only=True)
    settings_rbv = enum_pv("Settings_RBV", list(SETTINGS_NAMES) + ["undefined"], "undefined",
                           read_only=True)
    settings_dir_rbv = string_pv("SettingsDir_RBV", max_length=1024)
    rate_corr_tau_rbv = float_pv("RateCorrTau_RBV", 0.0, units="ns", precision=1, read_only=True)
    test_pulses_rbv = int_pv("TestPulses_RBV", 0, read_only=True)
    temperature = float_pv("Temperature_RBV", 0.0, units="degC", precision=2, read_only=True)

    acquire = enum_pv("Acquire", ACQUIRE)
    acquire_rbv = enum_pv("Acquire_RBV", ACQUIRE, read_only=True)
    detector_state = enum_pv("DetectorState_RBV", DETECTOR_STATES, read_only=True)
    array_counter = int_pv("ArrayCounter", low=0, high=MAX_COUNTER)
    array_counter_rbv = int_pv("ArrayCounter_RBV", read_only=True)
    images_counter = int_pv("NumImagesCounter_RBV", read_only=True)
    acquire_start = float_pv("AcquireStartTime_RBV", 0.0, units="s", precision=3, read_only=True,
                              doc="world time (epoch s) of the last acquisition's first exposure")

    chip_sums = array_pv("ChipSums_RBV", ChannelType.DOUBLE, read_only=True,
                          doc="counts per chip in the last acquisition (all frames)")
    total_counts = float_pv("TotalCounts_RBV", 0.0, precision=0, read_only=True)
    scans = SubGroup(EigerScanPVs, prefix="")

    image = SubGroup(LiveImage, prefix="Image:")
    sim = SubGroup(SimControls, prefix="Sim:")

    def __init__(self, *, prefix, backend, clock=None, **kwargs):
        self.geometry: EigerGeometry = backend.geometry
        super().__init__(prefix=prefix, backend=backend, clock=clock, **kwargs)
        if not hasattr(backend, "truth"):             # hardware: no fault-injection PVs
            for name in list(self.pvdb):
                if name.startswith(prefix + "Sim:"):
                    del self.pvdb[name]

    # -- waveforms sized for this detector ------------------------------------------------------
    def _sized_lengths(self) -> dict[str, int]:
        g = self.geometry
        return {"dac_table": len(ALL_DACS) * g.n_half_modules, "dac_table_rbv": len(ALL_DACS)
                * g.n_half_modules, "vcmp": g.n_chips, "vcmp_rbv": g.n_chips,
                "trimbits": g.n_pixels, "trimbits_rbv": g.n_pixels, "chip_sums": g.n_chips,
                **sized_lengths(g.n_chips),
                "image.array_data": (g.rows // LIVE_BINNING) * (g.cols // LIVE_BINNING)}

    def _create_pvdb(self):
        super()._create_pvdb()
        size_waveforms(self, self._sized_lengths())

    # -- helpers --------------------------------------------------------------------------------
    def _serials(self) -> list[str]:
        """Trim-file serials: the detector's module ids (hardware), else from the hostnames."""
        serials = getattr(self.backend, "serials", None)
        return list(serials) if serials else [serial_from_hostname(h)
                                              for h in self.backend.hostnames]

    async def call(self, func, *args):
        """A backend call on the detector's worker thread (InstrumentIOC.call). Any exception but
        a refusal or a fault becomes a fault: no error of a backend may take the IOC down."""
        return await super().call(_guarded, func, *args)

    def _read_settings(self, trimbits: bool) -> dict:
        """Every settings readback from the backend (worker thread)."""
        b = self.backend
        table = b.dac_table()
        loaded = b.loaded_settings
        values = {"table": table, "vthreshold": int(b.vthreshold()),
                  "vcmp": np.asarray(b.vcmp(), np.int32), "trimval": int(b.trimval()),
                  "dr": int(b.dr), "exptime": float(b.exptime), "period": float(b.period),
                  "frames": int(b.frames), "threshold": int(b.threshold_eV),
                  "trim_energies": list(b.trim_energies) or [0],
                  "settings": loaded if loaded in SETTINGS_NAMES else "undefined",
                  "settings_dir": str(b.settings_dir), "tau": float(b.tau_ns),
                  "test_pulses": int(b.test_pulses), "scan": b.scan()}
        if trimbits:
            values["trimbits"] = np.asarray(b.trimbits(), np.int16).ravel()
        return values

    async def refresh_settings(self, *, trimbits: bool = True) -> None:
        """Publish every settings readback from the backend. A fault on the way is published
        (StatusMessage_RBV, Connected_RBV = 0) and re-raised."""
        v = await self.call(self._read_settings, trimbits)
        table = v["table"]
        same = np.all(table == table[:, :1], axis=1)
        for i, dac in enumerate(ALL_DACS):
            value = int(table[i, 0]) if same[i] else -1
            await self.publish(getattr(self.dacs, f"{dac}_rbv"), value)
        await self.publish(self.dac_table_rbv, table.astype(np.int32).ravel())
        await self.publish(self.vthreshold_rbv, v["vthreshold"])
        await self.publish(self.vcmp_rbv, v["vcmp"])
        await self.publish(self.trimval_rbv, v["trimval"])
        if trimbits:
            await self.publish(self.trimbits_rbv, v["trimbits"], force=True)
        await self.publish(self.dynamic_range_rbv, v["dr"])
        await self.publish(self.acquire_time_rbv, v["exptime"])
        await self.publish(self.acquire_period_rbv, v["period"])
        await self.publish(self.num_images_rbv, v["frames"])
        await self.publish(self.threshold_energy_rbv, v["threshold"])
        await self.publish(self.trim_energies_rbv, v["trim_energies"])
        await self.publish(self.settings_rbv, v["settings"])
        await self.publish(self.settings_dir_rbv, v["settings_dir"])
        await self.publish(self.rate_corr_tau_rbv, v["tau"])
        await self.publish(self.test_pulses_rbv, v["test_pulses"])
        await self.scans.publish_settings(v["scan"])

    async def _show_settings_in_setpoints(self) -> None:
        """Start the setpoint PVs at the detector's values (without applying them again)."""
        for dac in ALL_DACS:
            rbv = getattr(self.dacs, f"{dac}_rbv").value
            if rbv >= 0:
                await getattr(self.dacs, dac).write(rbv, verify_value=False)
        pairs = ((self.vthreshold, self.vthreshold_rbv), (self.trimval, self.trimval_rbv),
                 (self.dynamic_range, self.dynamic_range_rbv),
                 (self.acquire_time, self.acquire_time_rbv),
                 (self.acquire_period, self.acquire_period_rbv),
                 (self.num_images, self.num_images_rbv),
                 (self.threshold_energy, self.threshold_energy_rbv),
                 (self.trim_energies, self.trim_energies_rbv),
                 (self.rate_corr_tau, self.rate_corr_tau_rbv),
                 (self.test_pulses, self.test_pulses_rbv))
        for setpoint, rbv in pairs:
            await setpoint.write(rbv.value, verify_value=False)
        await self.settings_dir.write(self.settings_dir_rbv.value, verify_value=False)
        await self.scans.scan.write(self.scans.scan_rbv.value, verify_value=False)

    async def apply_setting(self, setting, value):
        """A setting PV of the table (iocs/eiger_pvs.py): its backend call, as `_setting`."""
        await self._setting(setting.bind(self.backend, value),
                            trimbits=setting.call in TRIMBIT_CALLS)

    async def _setting(self, func, *args, trimbits: bool = False):
        """A settings put: refused while acquiring, then the backend call, then the readbacks,
        also after a refusal (a detector may refuse half way: the readbacks show what it holds)."""
        await self.refuse_if_busy()
        try:
            await self.call(func, *args)
        except Refused:
            await self.refresh_settings(trimbits=trimbits)
            raise
        await self.refresh_settings(trimbits=trimbits)

    # -- startup and polling ----------------------------------------------------------------------
    @geometry_name.startup
    async def geometry_name(self, instance, async_lib):
        g = self.geometry
        await instance.write(g.name)
        await self.size_y.write(g.rows)
        await self.size_x.write(g.cols)
        await self.n_half_modules.write(g.n_half_modules)
        await self.n_chips.write(g.n_chips)
        await self.hostnames.write("+".join(self.backend.hostnames))
        try:
            await self.serials.write("+".join(self._serials()))
        except ValueError as exc:          # a simulator's hostname without a number
            await self.report(f"fault: {exc}")
        await self.det_id.write(str(getattr(self.backend, "det_id", "")))
        await self.image.size_x.write(g.cols // LIVE_BINNING)
        await self.image.size_y.write(g.rows // LIVE_BINNING)
        try:
            await self.refresh_settings()
            await self._show_settings_in_setpoints()
            await self.heartbeat(True)
        except (Refused, InstrumentFault):      # published by call(); the IOC keeps serving
            await self.heartbeat(False)

    @temperature.scan(period=POLL_PERIOD_S)
    async def temperature(self, instance, async_lib):
        if self._busy:          # the detector server answers one client at a time
            await self.heartbeat(True)
            return
        try:
            t = await self.worker.run(_guarded, self.backend.temperature)
        except (Refused, InstrumentFault) as exc:
            await self.report(f"fault: {exc}")
            await self.heartbeat(False)
            await self.publish(self.detector_state, "Disconnected")
            return
        await self.heartbeat(True)
        await self.publish(instance, float(t))
        if self.detector_state.value == "Disconnected":
            await self.publish(self.detector_state, "Idle")

    # -- trimbit files (the other settings are the table's, iocs/eiger_pvs.py) --------------------
    @load_trimbits.putter
    async def load_trimbits(self, instance, value):
        if value:
            await self._refuse_relative("LoadTrimbits", str(value))
            await self._setting(self.backend.load_trimbits, str(value), trimbits=True)
        return value

    @save_trimbits.putter
    async def save_trimbits(self, instance, value):
        if value:
            await self._refuse_relative("SaveTrimbits", str(value))
            await self.refuse_if_busy()
            await self.call(self.backend.save_trimbits, str(value))
        return value

    async def _refuse_relative(self, pv: str, path: str) -> None:
        """A relative path would land in whatever directory the IOC was started from."""
        if not os.path.isabs(path):
            await self.refuse(f"{pv} {path!r} must be an absolute path prefix")

    @array_counter.putter
    async def array_counter(self, instance, value):
        await self.publish(self.array_counter_rbv, int(value))
        return value

    # -- acquisition ----------------------------------------------------------------------------------
    @acquire.putter
    async def acquire(self, instance, value):
        """Acquire = Acquire: take NumImages frames; the put completes when they are written.

        A refused or failed acquisition still completes the put (as areaDetector does):
        DetectorState_RBV goes to Error, the reason is on StatusMessage_RBV (a refusal also counts
        in Refusals_RBV) and ArrayCounter_RBV does not advance, which is what clients check."""
        if value == "Done":
            if self._busy:
                await self.publish(self.detector_state, "Aborting")
                self.backend.abort()
            return "Done"
        try:
            await self.refuse_if_busy()
        except Refused:
            return "Done"                 # the acquisition in progress goes on undisturbed
        try:
            result = await self._acquire()
        except (Refused, InstrumentFault):
            await self.publish(self.detector_state, "Error")
            return "Done"
        await self.publish(self.detector_state, "Aborted" if result else "Idle")
        return "Done"

    async def _acquire(self) -> bool:
        """The acquisition behind the Acquire put; returns whether it was aborted. Refusals and
        faults go through `self.call` (reported, counted) and are re-raised."""
        call = self.call
        dr = await call(lambda: int(self.backend.dr))
        if self._stream_file is not None and self._stream_file.dtype != frame_dtype(dr):
            await self.refuse(
                f"the open file {self._stream_file.path.name} holds {self._stream_file.dtype} "
                "frames but DynamicRange changed; put Capture = Off and On to start a new file")
        single = self.capture_rbv.value == "On" and self._stream_file is None
        path = await call(self._next_file) if single else None
        self._busy = True
        try:
            await self.publish(self.acquire_rbv, "Acquire")
            await self.publish(self.detector_state, "Acquire")
            await self.publish(self.images_counter, 0)
            try:
                # on the worker thread; other puts are refused meanwhile
                progress, published = self._progress_publisher()
                try:
                    result, reduced = await self.worker.run(
                        acquire_to_file, self.backend, self.geometry, path, self._stream_file,
                        progress)
                finally:     # the last records are the whole acquisition's, published below
                    await asyncio.gather(*map(asyncio.wrap_future, published),
                                         return_exceptions=True)
            except OSError as exc:
                await self.refuse(f"writing {path or self._stream_file.path} failed: {exc}; "
                                  "check FilePath, free space and permissions")
            except (Refused, InstrumentFault) as exc:
                await call(_raise, exc)
            except Exception as exc:                # never a crash: a fault, the IOC serves on
                await call(_raise, exc)
            await self._publish_acquisition(result, reduced, path)
        finally:
            self._busy = False
            await self.publish(self.acquire_rbv, "Done")
        if result.scan_values is not None:      # the scan left its setting at the last step
            await self.refresh_settings(
                trimbits=self.scans.scan_rbv.value.startswith(SCAN_TRIMBITS))
        if path is not None:
            await self._advance_file_number()
        await self.array_counter.write(int(self.array_counter_rbv.value))
        return result.aborted

    def _progress_publisher(self):
        """(progress, published): progress(records), for the worker thread, publishes a long
        acquisition's records so far on the loop; published lists those publications."""
        loop = asyncio.get_running_loop()
        published: list = []

        def progress(records: FrameRecords) -> None:
            published.append(asyncio.run_coroutine_threadsafe(
                self.scans.publish_records(records), loop))

        return progress, published

    async def _publish_acquisition(self, result, reduced: Reductions | None,
                                   path: Path | None) -> None:
        """Reductions (computed on the worker thread), live image, per-frame records and
        counters of a finished acquisition. ArrayCounter_RBV goes last: a client that sees it
        advance (monitor updates arrive in the order they were published) already holds this
        acquisition's values."""
        n_frames, starts = result.n_frames, result.start_times
        if reduced is not None:
            await self.publish(self.chip_sums, reduced.chip_sums, force=True)
            await self.publish(self.total_counts, reduced.total)
            await self.publish(self.image.array_data, reduced.live_image, force=True)
            await self.publish(self.acquire_start, float(starts[0]))
            await self.scans.publish_records(      # NumImagesCounter_RBV last
                FrameRecords(reduced.frame_chip_sums, starts, result.scan_values))
        else:
            await self.publish(self.images_counter, n_frames)
        if path is not None:
            await self.publish(self.full_file_name, str(path))
            await self.publish(self.num_captured, n_frames)
        elif self._stream_file is not None:
            await self.publish(self.num_captured, self._stream_file.n_frames)
        await self.publish(self.array_counter_rbv, int(self.array_counter_rbv.value) + n_frames)


def _raise(exc: BaseException):
    raise exc


def _guarded(func, *args):
    """``func(*args)`` with any exception but a refusal or a fault turned into a fault naming it."""
    try:
        return func(*args)
    except (Refused, InstrumentFault):
        raise
    except Exception as exc:
        log.exception("unexpected error in the EIGER backend")
        raise InstrumentFault(f"unexpected {type(exc).__name__} in the detector backend: {exc}; "
                              "the IOC keeps serving, check the detector and the IOC log") from exc
