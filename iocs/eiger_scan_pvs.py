"""The EIGER IOC's detector-side scan and per-frame records (a subgroup of EigerIOC, no prefix).

  Scan, Scan_RBV, ScanSteps_RBV            detector-side scan (slsdet setScan), in the syntax of
                                           ``sls_detector_put scan``: "vthreshold 0 2000 40 1ms"
                                           (DAC name, vthreshold or trimbits; start, stop
                                           inclusive, step, settle time); "0" = none. The next
                                           acquisition takes one frame per step (NumImages_RBV =
                                           ScanSteps_RBV) and leaves the setting at the last step
  FrameChipSums_RBV, FrameValues_RBV, FrameStartTimes_RBV
                                           per frame of the last acquisition (its first
                                           MAX_FRAME_RECORDS frames): counts per chip [frames x
                                           chips], the scan step's setting (-1 outside a scan),
                                           the exposure's start (world epoch s)

A scan is the detector server's own (slsDetectorServer set_scan): one acquisition instead of a
Channel Access round trip per point (devices/eiger_scan.py records it as a run of one event per
step).
"""
from __future__ import annotations

import numpy as np
from caproto import ChannelType

from calbench.contracts.eiger import MAX_SCAN_STEPS, parse_scan
from calbench.contracts.errors import Refused
from calbench.iocs.base import InstrumentGroup, string_pv
from calbench.iocs.eiger_pvs import array_pv, int_pv

MAX_FRAME_RECORDS = MAX_SCAN_STEPS    # per-frame waveforms: a whole scan (longer acquisitions: the first)


class EigerScanPVs(InstrumentGroup):
    """Scan PVs; the parent EigerIOC applies the scan (refused while acquiring) and publishes
    the records of each acquisition (`publish_records`)."""

    scan = string_pv("Scan", "0", read_only=False,
                     doc="detector-side scan: '<dac|vthreshold|trimbits> start stop step [settle]'"
                         " as sls_detector_put scan; '0' = none")
    scan_rbv = string_pv("Scan_RBV", "0")
    scan_steps = int_pv("ScanSteps_RBV", read_only=True, doc="frames a scan takes; 0 = no scan")
    frame_chip_sums = array_pv("FrameChipSums_RBV", ChannelType.DOUBLE, read_only=True,
                               doc="counts per chip of each frame of the last acquisition")
    frame_values = array_pv("FrameValues_RBV", ChannelType.LONG, read_only=True,
                            doc="the scanned setting during each frame; -1 outside a scan")
    frame_start_times = array_pv("FrameStartTimes_RBV", ChannelType.DOUBLE, read_only=True,
                                 doc="world time (epoch s) each frame's exposure started")

    @scan.putter
    async def scan(self, instance, value):
        ioc = self.parent
        await ioc.refuse_if_busy()
        try:
            params = parse_scan(str(value))
        except Refused as exc:
            await ioc.refuse(f"Scan: {exc}")
        await ioc._setting(ioc.backend.set_scan, params)
        return params.text if params else "0"

    async def publish_settings(self, scan) -> None:
        """The backend's scan (ScanParameters or None) on the readbacks."""
        await self.parent.publish(self.scan_rbv, scan.text if scan else "0")
        await self.parent.publish(self.scan_steps, len(scan.values) if scan else 0)

    async def publish_records(self, records) -> None:
        """Per-frame records (iocs/eiger_hdf5.py FrameRecords) of the acquisition so far, then
        their count on NumImagesCounter_RBV: a client that reads the count, then the records,
        finds at least that many."""
        n = records.n_frames
        kept = min(n, MAX_FRAME_RECORDS)
        values = records.scan_values if records.scan_values is not None else np.full(n, -1)
        ioc = self.parent
        await ioc.publish(self.frame_chip_sums, records.chip_sums[:kept].ravel(), force=True)
        await ioc.publish(self.frame_values, np.asarray(values[:kept], np.int32), force=True)
        await ioc.publish(self.frame_start_times, np.asarray(records.start_times[:kept], float),
                          force=True)
        await ioc.publish(ioc.images_counter, n)


def sized_lengths(n_chips: int) -> dict[str, int]:
    """The subgroup's waveform lengths for a detector of ``n_chips`` (EigerIOC sizes them)."""
    return {"scans.frame_chip_sums": n_chips * MAX_FRAME_RECORDS,
            "scans.frame_values": MAX_FRAME_RECORDS, "scans.frame_start_times": MAX_FRAME_RECORDS}
