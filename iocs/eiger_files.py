"""The EIGER IOC's file-writing PVs (areaDetector's HDF5 plugin names) and the acquisition guard.

  FilePath, FileName, FileNumber (+ _RBV), FilePathExists_RBV, AutoIncrement, Capture, Capture_RBV,
  FileWriteMode(_RBV), FullFileName_RBV, NumCaptured_RBV
                                           HDF5 files {FilePath}/{FileName}_{FileNumber:06d}.h5,
                                           dataset /entry/data/data [frames, rows, cols] in the dr
                                           dtype (SWMR), written by iocs/eiger_hdf5.py.
                                           FileWriteMode Single: with Capture = On, each
                                           acquisition writes one file (as slsReceiver does).
                                           Stream: Capture = On opens one file, every acquisition
                                           appends its frames, Capture = Off closes it (one file,
                                           one tiled asset per run: what the ophyd device uses)

EigerFilePVs is the base of EigerIOC (iocs/eiger.py), which writes the frames (iocs/eiger_hdf5.py)
into the file `_next_file` names (Single) or the stream file Capture = On opened (Stream).
"""
from __future__ import annotations

import os
from pathlib import Path

from calbench.iocs.base import InstrumentIOC, Refused, enum_pv, string_pv
from calbench.iocs.eiger_hdf5 import FrameFile
from calbench.iocs.eiger_pvs import int_pv

OFF_ON = ["Off", "On"]
NO_YES = ["No", "Yes"]
FILE_WRITE_MODES = ["Single", "Stream"]
MAX_COUNTER = 2 ** 31 - 1


class EigerFilePVs(InstrumentIOC):
    """Where the frames go; every put is refused while the detector acquires."""

    file_path = string_pv("FilePath", read_only=False, max_length=1024)
    file_path_rbv = string_pv("FilePath_RBV", max_length=1024)
    file_path_exists = enum_pv("FilePathExists_RBV", NO_YES, read_only=True)
    file_name = string_pv("FileName", "eiger", read_only=False)
    file_name_rbv = string_pv("FileName_RBV", "eiger")
    file_number = int_pv("FileNumber", 0, low=0, high=MAX_COUNTER)
    file_number_rbv = int_pv("FileNumber_RBV", 0, read_only=True)
    auto_increment = enum_pv("AutoIncrement", NO_YES, "Yes")
    file_write_mode = enum_pv("FileWriteMode", FILE_WRITE_MODES)
    file_write_mode_rbv = enum_pv("FileWriteMode_RBV", FILE_WRITE_MODES, read_only=True)
    capture = enum_pv("Capture", OFF_ON)
    capture_rbv = enum_pv("Capture_RBV", OFF_ON, read_only=True)
    num_captured = int_pv("NumCaptured_RBV", read_only=True, doc="frames in the current file")
    full_file_name = string_pv("FullFileName_RBV", max_length=1024)


    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._busy = False                          # an acquisition runs
        self._stream_file: FrameFile | None = None  # Stream mode: the file Capture = On opened

    async def refuse_if_busy(self) -> None:
        """Refuse a put during an acquisition (the detector server does too): reported, counted,
        raised."""
        if self._busy:       # answered at once: the acquisition holds the backend
            await self.refuse("the detector is acquiring; wait for DetectorState_RBV = Idle or "
                              "put Acquire = 0 to abort")


    @file_path.putter
    async def file_path(self, instance, value):
        await self.refuse_if_busy()
        path = str(value)
        if path and not os.path.isabs(path):
            await self.refuse(f"FilePath {path!r} must be an absolute directory")
        await self.publish(self.file_path_rbv, path)
        await self.publish(self.file_path_exists, NO_YES[int(bool(path) and os.path.isdir(path))])
        return value

    @file_name.putter
    async def file_name(self, instance, value):
        await self.refuse_if_busy()
        name = str(value)
        if not name or "/" in name or name.startswith("."):
            await self.refuse(f"FileName {name!r}: use a plain, non-empty name without '/' "
                              "(the directory is FilePath)")
        await self.publish(self.file_name_rbv, name)
        return value

    @file_number.putter
    async def file_number(self, instance, value):
        await self.refuse_if_busy()
        if int(value) < 0:
            await self.refuse(f"FileNumber {value} must be >= 0")
        await self.publish(self.file_number_rbv, int(value))
        return value

    @capture.putter
    async def capture(self, instance, value):
        await self.refuse_if_busy()
        if value == self.capture_rbv.value:
            return value
        stream = self.file_write_mode_rbv.value == "Stream"
        if value == "On" and stream:               # Stream: one file for every acquisition
            path = await self.call(self._next_file)
            try:       # on the worker thread: it asks the detector its dynamic range
                self._stream_file = await self.worker.run(FrameFile, path, self.geometry,
                                                          self.backend)
            except OSError as exc:
                await self.refuse(f"cannot create {path}: {exc}; check FilePath and its "
                                  "permissions")
            await self.publish(self.full_file_name, str(path))
            await self.publish(self.num_captured, 0)
        elif value == "Off" and self._stream_file is not None:
            stream_file, self._stream_file = self._stream_file, None
            await self.worker.run(stream_file.close)
            await self._advance_file_number()
        await self.publish(self.capture_rbv, value)
        return value

    @file_write_mode.putter
    async def file_write_mode(self, instance, value):
        await self.refuse_if_busy()
        if self.capture_rbv.value == "On":
            await self.refuse("FileWriteMode cannot change while capturing; put Capture = Off "
                              "first")
        await self.publish(self.file_write_mode_rbv, value)
        return value

    async def _advance_file_number(self) -> None:
        if self.auto_increment.value == "Yes":
            await self.file_number.write(int(self.file_number_rbv.value) + 1)

    def _next_file(self) -> Path:
        """The HDF5 file the next acquisition (Single) or capture (Stream) writes; Refused if it
        cannot be written."""
        directory = self.file_path_rbv.value
        if not directory:
            raise Refused("Capture is On but FilePath is empty; set FilePath to a directory the "
                          "tiled server can read (the lab's data directory)")
        name = f"{self.file_name_rbv.value}_{int(self.file_number_rbv.value):06d}.h5"
        path = Path(directory) / name
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise Refused(f"cannot create FilePath {directory}: {exc.strerror}; choose a writable "
                          "directory") from None
        if path.exists():
            raise Refused(f"{path} exists already; increase FileNumber or change FileName "
                          "(frames are never overwritten)")
        return path

    def make_safe(self) -> None:
        """Make the instrument safe (InstrumentIOC.make_safe), then close an open file."""
        super().make_safe()
        if self._stream_file is not None:
            self._stream_file.close()
            self._stream_file = None
