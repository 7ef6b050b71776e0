"""ophyd device of the PSI EIGER detector (PVs of iocs/eiger.py).

Frames never travel through Channel Access or event documents: the IOC writes them to HDF5 in the
data directory (dataset /entry/data/data [frames, rows, cols]) and the device emits StreamResource /
StreamDatum documents, so tiled registers the frames as external data
(``run["primary"]["eiger_image"]``). Events carry the per-chip count sums and the total computed by
the IOC. By default a run is one file (the IOC's FileWriteMode Stream: each trigger appends its
frames; one StreamResource, one StreamDatum per event); ``file_per_trigger=True`` makes every
trigger its own file and StreamResource (FileWriteMode Single), which costs tiled one more asset per
event (see benchmarks/bench_eiger_frames.py). The run's file is open for writing (HDF5 SWMR) until
unstage: other processes read it with ``h5py.File(path, "r", swmr=True)``; a StreamDatum's indices
count events, each holding NumImages frames of the file.

    det = Eiger.from_settings("CB:EIGER:", name="eiger", settings=cfg.instruments["eiger"].settings,
                              lab=cfg)
    RE(count([det]))
    RE(scan([det], det.vthreshold, 0, 2000, 51))      # S-curve
    det.dacs.vrpreamp.set(3050).wait()

`stage()` points FilePath at ``<data_dir>/eiger/<YYYY-MM-DD>`` with a file name unique to the run
and switches Capture on; `unstage()` switches it off (closing the file).
"""
from __future__ import annotations

import datetime as _dt
import queue
import threading
import time
import uuid
from collections import deque
from pathlib import Path

import numpy as np
from event_model import compose_stream_resource
from ophyd import Component as Cpt
from ophyd import Device, EpicsSignal, EpicsSignalRO
from ophyd.status import DeviceStatus

from calbench.contracts.eiger_geometry import frame_dtype
from calbench.contracts.trimfile import DAC_NAMES
from calbench.devices.base import (CheckedSignal, InstrumentDevice, InstrumentRefused,
                                   LongStringSignal, LongStringSignalRO, reports_fault,
                                   set_and_check)

DATASET = "/entry/data/data"
IMAGE_KEY_SUFFIX = "_image"
# How long a trigger waits, once the Acquire put has completed, for the monitor update of the
# counter (or of the refusal count): the IOC publishes them before it answers the put, but CA sends
# monitor updates apart from put replies. Past it, the device asks the IOC directly (a fault
# changes neither; a loaded machine may delay the updates).
MONITOR_GRACE_S = 0.5
PROGRESS_POLL_S = 0.5      # how often a long acquisition's frame count is checked


class EigerError(RuntimeError):
    """An acquisition did not produce its frames; the message says why and what to do."""



def _dac_components() -> dict:
    comps = {}
    for dac in tuple(DAC_NAMES) + ("iodelay",):
        # vrpreamp is scanned (vrf scan): in the events; the others are configuration
        comps[dac] = Cpt(CheckedSignal, f"{dac}_RBV", write_pv=dac,
                         kind="normal" if dac == "vrpreamp" else "config",
                         doc=f"{dac}, DAC units (readback -1 when half modules differ)")
    return comps


EigerDacs = type("EigerDacs", (Device,), {**_dac_components(),
                                          "__doc__": "The 16 EIGER DACs and iodelay (slsdet names)."})


class Eiger(InstrumentDevice):
    """PSI EIGER: DACs, vthreshold, per-chip vcmp, trimbits, threshold energy, exposures, HDF5 frames.

    Settable signals complete when the IOC has applied the value and fail with InstrumentRefused
    (the IOC's reason) when it refuses it. `data_dir` is where the frames go (a directory the tiled
    server can read). The settings calibration scans over (vthreshold, trimval, dacs.vrpreamp) are
    read into every event, so `scan([det], det.vthreshold, ...)` records them although they are
    components of the detector."""

    instrument = "eiger"

    geometry = Cpt(LongStringSignalRO, "Geometry_RBV", kind="config")
    rows = Cpt(EpicsSignalRO, "ArraySizeY_RBV", kind="config")
    cols = Cpt(EpicsSignalRO, "ArraySizeX_RBV", kind="config")
    n_half_modules = Cpt(EpicsSignalRO, "NumHalfModules_RBV", kind="omitted")
    n_chips = Cpt(EpicsSignalRO, "NumChips_RBV", kind="omitted")
    hostnames = Cpt(LongStringSignalRO, "Hostnames_RBV", kind="config")
    serials = Cpt(LongStringSignalRO, "Serials_RBV", kind="config",
                  doc="trim-file serials (.snNNN) of the half modules, '+'-joined")
    det_id = Cpt(LongStringSignalRO, "DetId_RBV", kind="config")

    dacs = Cpt(EigerDacs, "")
    dac_table = Cpt(CheckedSignal, "DacTable_RBV", write_pv="DacTable", kind="omitted")
    vthreshold = Cpt(CheckedSignal, "Vthreshold_RBV", write_pv="Vthreshold", kind="normal")
    vcmp = Cpt(CheckedSignal, "Vcmp_RBV", write_pv="Vcmp", kind="config")
    trimbits = Cpt(CheckedSignal, "Trimbits_RBV", write_pv="Trimbits", kind="omitted")
    trimval = Cpt(CheckedSignal, "Trimval_RBV", write_pv="Trimval", kind="normal")
    load_trimbits = Cpt(LongStringSignal, "LoadTrimbits", kind="omitted")
    save_trimbits = Cpt(LongStringSignal, "SaveTrimbits", kind="omitted")

    dynamic_range = Cpt(CheckedSignal, "DynamicRange_RBV", write_pv="DynamicRange", kind="config")
    exptime = Cpt(CheckedSignal, "AcquireTime_RBV", write_pv="AcquireTime", kind="config")
    period = Cpt(CheckedSignal, "AcquirePeriod_RBV", write_pv="AcquirePeriod", kind="config")
    frames = Cpt(CheckedSignal, "NumImages_RBV", write_pv="NumImages", kind="config")
    threshold_energy = Cpt(CheckedSignal, "ThresholdEnergy_RBV", write_pv="ThresholdEnergy",
                           kind="config")
    trim_energies = Cpt(CheckedSignal, "TrimEnergies_RBV", write_pv="TrimEnergies", kind="config")
    settings = Cpt(CheckedSignal, "Settings", string=True, kind="omitted")
    settings_rbv = Cpt(EpicsSignalRO, "Settings_RBV", string=True, kind="config")
    settings_dir = Cpt(LongStringSignal, "SettingsDir", kind="omitted")
    rate_corr_tau = Cpt(CheckedSignal, "RateCorrTau_RBV", write_pv="RateCorrTau", kind="config")
    test_pulses = Cpt(CheckedSignal, "TestPulses_RBV", write_pv="TestPulses", kind="config")
    temperature = Cpt(EpicsSignalRO, "Temperature_RBV", kind="normal", auto_monitor=True)

    acquire = Cpt(EpicsSignal, "Acquire", string=True, kind="omitted")
    acquire_rbv = Cpt(EpicsSignalRO, "Acquire_RBV", string=True, kind="omitted")
    detector_state = Cpt(EpicsSignalRO, "DetectorState_RBV", string=True, kind="omitted")
    # Monitored, with the acquisition's values below: the IOC publishes the counter after them
    # and CA delivers one IOC's monitor updates in order, so once a trigger has seen the counter
    # advance, the events read this acquisition's values without asking the IOC again.
    array_counter = Cpt(EpicsSignalRO, "ArrayCounter_RBV", kind="omitted", auto_monitor=True)
    refusals = Cpt(EpicsSignalRO, "Refusals_RBV", kind="omitted", auto_monitor=True)
    images_counter = Cpt(EpicsSignalRO, "NumImagesCounter_RBV", kind="omitted")
    acquire_start = Cpt(EpicsSignalRO, "AcquireStartTime_RBV", kind="omitted")

    file_path = Cpt(LongStringSignal, "FilePath", kind="omitted")
    file_name = Cpt(LongStringSignal, "FileName", kind="omitted")
    file_number = Cpt(CheckedSignal, "FileNumber_RBV", write_pv="FileNumber", kind="omitted")
    file_write_mode = Cpt(CheckedSignal, "FileWriteMode_RBV", write_pv="FileWriteMode", string=True,
                          kind="omitted")
    num_captured = Cpt(EpicsSignalRO, "NumCaptured_RBV", kind="omitted")
    auto_increment = Cpt(CheckedSignal, "AutoIncrement", string=True, kind="omitted")
    capture = Cpt(CheckedSignal, "Capture_RBV", write_pv="Capture", string=True, kind="omitted")
    full_file_name = Cpt(LongStringSignalRO, "FullFileName_RBV", kind="omitted", auto_monitor=True)

    chip_sums = Cpt(EpicsSignalRO, "ChipSums_RBV", kind="normal", auto_monitor=True)
    total_counts = Cpt(EpicsSignalRO, "TotalCounts_RBV", kind="hinted", auto_monitor=True)
    live_image = Cpt(EpicsSignalRO, "Image:ArrayData", kind="omitted")

    # detector-side scan (devices/eiger_scan.py): "vthreshold 0 2000 40 1ms", "0" = none
    scan = Cpt(LongStringSignal, "Scan_RBV", write_pv="Scan", kind="config")
    scan_steps = Cpt(EpicsSignalRO, "ScanSteps_RBV", kind="omitted")
    frame_chip_sums = Cpt(EpicsSignalRO, "FrameChipSums_RBV", kind="omitted")
    frame_values = Cpt(EpicsSignalRO, "FrameValues_RBV", kind="omitted")
    frame_start_times = Cpt(EpicsSignalRO, "FrameStartTimes_RBV", kind="omitted")

    def __init__(self, prefix="", *, name, data_dir: str | Path | None = None,
                 trigger_timeout_s: float = 30.0, file_per_trigger: bool = False, **kwargs):
        super().__init__(prefix, name=name, **kwargs)
        self.data_dir = Path(data_dir) if data_dir else None
        self.trigger_timeout_s = float(trigger_timeout_s)
        self.file_per_trigger = bool(file_per_trigger)
        self._asset_docs: deque = deque()
        self._stream = None                 # the run's ComposeStreamResourceBundle (Stream mode)
        self._events = 0
        self._frame_shape: tuple[int, ...] | None = None
        self._frame_dtype: np.dtype | None = None
        self._acquisition_s = 0.0
        self._news = threading.Condition()     # notified on monitor updates of the counters
        self._triggers: queue.SimpleQueue | None = None    # finishes the triggers, in order
        for sig in (self.array_counter, self.refusals):
            sig.subscribe(self._notify, run=False)

    def _notify(self, **_):
        with self._news:
            self._news.notify_all()

    @classmethod
    def from_settings(cls, prefix: str, *, name: str = "eiger", settings: dict | None = None,
                      lab=None, **kwargs) -> "Eiger":
        """The device for an [instruments.eiger] section; frames go to settings["data_dir"] or, if
        empty, to the lab's data directory (``lab.data_dir``, a calbench LabConfig)."""
        settings = settings or {}
        data_dir = settings.get("data_dir") or (getattr(lab, "data_dir", None))
        return cls(prefix, name=name, data_dir=data_dir, **kwargs)

    @property
    def image_key(self) -> str:
        return self.name + IMAGE_KEY_SUFFIX

    # -- staging --------------------------------------------------------------------------------
    def _run_directory(self) -> Path:
        base = self.data_dir
        if base is None:
            current = self.file_path.get(use_monitor=False)
            if current:
                return Path(current)
            raise EigerError(
                "no data directory for EIGER frames: set [instruments.eiger] data_dir in the lab "
                "configuration, build the device with Eiger.from_settings(..., lab=cfg), or set "
                "det.data_dir to a directory the tiled server can read")
        return Path(base) / "eiger" / _dt.date.today().isoformat()

    def stage(self):
        """Point the IOC's file writer at a fresh file name in the data directory, Capture on."""
        directory = self._run_directory()
        staged = super().stage()
        try:
            self._prepare_files(directory)
        except Exception:
            super().unstage()
            raise
        return staged

    def _prepare_files(self, directory: Path) -> None:
        set_and_check(self.capture, "Off")          # close what an interrupted run left open
        set_and_check(self.file_write_mode, "Single" if self.file_per_trigger else "Stream")
        set_and_check(self.file_path, str(directory))
        set_and_check(self.file_name, f"{self.name}_{uuid.uuid4().hex[:12]}")
        set_and_check(self.file_number, 0)
        set_and_check(self.auto_increment, "Yes")
        self._asset_docs.clear()
        self._frame_shape = self._shape()
        self._frame_dtype = frame_dtype(int(self.dynamic_range.get(use_monitor=False)))
        set_and_check(self.capture, "On")
        self._events = 0
        self._stream = None
        if not self.file_per_trigger:           # one file for the run, opened by Capture = On
            self._stream = self._resource(self.full_file_name.get(use_monitor=False))
            self._asset_docs.append(("stream_resource", self._stream.stream_resource_doc))
        frames = self._frame_shape[0] if len(self._frame_shape) == 3 else 1
        self._acquisition_s = frames * max(float(self.exptime.get(use_monitor=False)),
                                           float(self.period.get(use_monitor=False)))

    def unstage(self):
        try:
            self._end_acquisition()
            set_and_check(self.capture, "Off")
        finally:
            self._frame_shape = None
        return super().unstage()

    def _end_acquisition(self) -> None:
        """Abort an acquisition still running (an interrupted plan: the RunEngine stops only
        what it moved) and wait until the IOC takes puts again."""
        if self.acquire_rbv.get(use_monitor=False) != "Acquire":
            return
        self.acquire.put("Done")
        deadline = time.monotonic() + self.trigger_timeout_s
        while self.acquire_rbv.get(use_monitor=False) == "Acquire":
            if time.monotonic() > deadline:
                raise EigerError(f"{self.prefix}Acquire did not end within "
                                 f"{self.trigger_timeout_s:g} s of the abort; check the IOC "
                                 f"({self.prefix}StatusMessage_RBV) and the detector")
            time.sleep(0.02)

    def _shape(self) -> tuple[int, ...]:
        rows = int(self.rows.get(use_monitor=False))
        cols = int(self.cols.get(use_monitor=False))
        n = int(self.frames.get(use_monitor=False))
        return (rows, cols) if n == 1 else (n, rows, cols)

    # -- acquisition ----------------------------------------------------------------------------
    def trigger(self) -> DeviceStatus:
        """Acquire NumImages frames (appended to the run's file, or into a file of their own);
        done when they are written. Fails with InstrumentRefused or EigerError naming the cause."""
        if self._frame_shape is None:
            raise EigerError(f"{self.name} is not staged; use it inside a plan (count, scan) or "
                             "call det.stage() first")
        # No timeout on the status itself (ophyd would start a thread per trigger for it): the
        # device's own trigger thread waits for the put with the timeout, then checks the frames.
        status = DeviceStatus(self)
        before = (int(self.array_counter.get()), int(self.refusals.get()))   # monitored
        put_done = threading.Event()
        # exposure in world seconds: an upper bound of the wall time at time_scale >= 1
        deadline = time.monotonic() + self.trigger_timeout_s + self._acquisition_s
        self.acquire.put("Acquire", use_complete=True, callback=lambda *a, **k: put_done.set())
        self._trigger_jobs().put((status, before, put_done, deadline))   # the put was sent
        return status

    def _trigger_jobs(self) -> queue.SimpleQueue:
        """The queue of the device's trigger thread (a daemon: a session may exit while an
        acquisition hangs), started on first use."""
        if self._triggers is None:
            jobs: queue.SimpleQueue = queue.SimpleQueue()

            def work():
                while True:
                    self._finish_trigger(*jobs.get())

            threading.Thread(target=work, name=f"{self.name}-trigger", daemon=True).start()
            self._triggers = jobs
        return self._triggers

    def _finish_trigger(self, status: DeviceStatus, before: tuple[int, int],
                        put_done: threading.Event, deadline: float) -> None:
        """On the trigger thread (CA reads are not allowed from the put callback's thread)."""
        try:
            self._wait_for_acquisition(put_done, deadline)
            self._after_acquisition(*before)
        except Exception as exc:
            status.set_exception(exc)
        else:
            status.set_finished()

    def _wait_for_acquisition(self, put_done: threading.Event, deadline: float) -> None:
        """Until the Acquire put completes. It fails when the acquisition makes no progress for
        trigger_timeout_s past its deadline: the IOC counts a long acquisition's frames as they
        are written (NumImagesCounter_RBV), and a big detector's frames may take longer to write
        than to expose."""
        frames = -1
        while not put_done.wait(min(PROGRESS_POLL_S, max(0.0, deadline - time.monotonic()))):
            now = self.images_counter.get(use_monitor=False)
            if now != frames:
                frames = now
                deadline = max(deadline, time.monotonic() + self.trigger_timeout_s)
            elif time.monotonic() >= deadline:
                raise EigerError(
                    f"{self.prefix}Acquire did not complete: no new frame within "
                    f"{self.trigger_timeout_s:g} s ({frames} taken); check the IOC "
                    f"({self.prefix}DetectorState_RBV, {self.prefix}StatusMessage_RBV) and retry")

    def _after_acquisition(self, counter_before: int, refusals_before: int) -> None:
        def news():
            return (int(self.array_counter.get()) != counter_before
                    or int(self.refusals.get()) != refusals_before)

        with self._news:
            seen = self._news.wait_for(news, timeout=MONITOR_GRACE_S)
        if seen:
            refusals, counter = int(self.refusals.get()), int(self.array_counter.get())
        else:
            refusals = int(self.refusals.get(use_monitor=False))
            counter = int(self.array_counter.get(use_monitor=False))
        if refusals != refusals_before or counter == counter_before:
            message = self.status_message.get(use_monitor=False)
            state = self.detector_state.get(use_monitor=False)
            if refusals != refusals_before and not reports_fault(message):
                raise InstrumentRefused(f"{self.prefix}Acquire: {message}")
            raise EigerError(f"{self.prefix}Acquire produced no frame (state {state}): "
                             f"{message or 'no message'}; check the detector and retry")
        if not seen:        # the events read monitored values: they must be this acquisition's
            with self._news:
                if not self._news.wait_for(lambda: int(self.array_counter.get()) == counter,
                                           timeout=self.trigger_timeout_s):
                    raise EigerError(
                        f"no monitor update of {self.prefix}ArrayCounter_RBV within "
                        f"{self.trigger_timeout_s:g} s although the IOC counts {counter}; check "
                        "the network to the IOC (EPICS_CA_ADDR_LIST) and retry")
        if self.file_per_trigger:
            bundle = self._resource(self.full_file_name.get())
            self._asset_docs.append(("stream_resource", bundle.stream_resource_doc))
            index = 0
        else:
            bundle, index = self._stream, self._events
        self._events += 1
        self._asset_docs.append(("stream_datum", bundle.compose_stream_datum(
            indices={"start": index, "stop": index + 1})))

    def _resource(self, path: str):
        """StreamResource bundle for one HDF5 file of this detector's frames."""
        uri = Path(path).as_uri().replace("file:///", "file://localhost/")
        return compose_stream_resource(
            mimetype="application/x-hdf5", uri=uri, data_key=self.image_key,
            parameters={"dataset": DATASET, "chunk_shape": (1, *self._frame_shape[-2:]),
                        "swmr": True})

    def collect_asset_docs(self):
        """StreamResource / StreamDatum documents of the triggers since the last call."""
        while self._asset_docs:
            yield self._asset_docs.popleft()

    def describe(self):
        desc = super().describe()
        if self._frame_shape is not None:
            desc[self.image_key] = {
                "source": f"CA:{self.prefix}FullFileName_RBV",
                "shape": list(self._frame_shape),
                "dtype": "array",
                "dtype_numpy": self._frame_dtype.str,
                "external": "STREAM:",
                "dims": (["frame"] if len(self._frame_shape) == 3 else []) + ["row", "column"],
            }
        return desc

    def stop(self, *, success: bool = False):
        """Abort an acquisition in progress."""
        if self.acquire_rbv.get(use_monitor=False) == "Acquire":
            self.acquire.put("Done")
        super().stop(success=success)
