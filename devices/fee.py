"""ophyd device of the Daya Bay FEE board (PVs of iocs/fee.py), with fly-scan support.

The board's sequencer sweeps the calibration DAC far faster than a step scan could, so the device is
a flyer over it:

    yield from bps.kickoff(fee, wait=True)     # Seq:Acquire = 1 (fails with the IOC's reason)
    yield from bps.complete(fee, wait=True)    # until Seq:Count_RBV says the results are published
    yield from bps.collect(fee)                # one event: the sweep's per-pulse arrays

A sweep lands in the run as ONE event of stream `fee_sweep` whose fields are arrays with one entry
per pulse (register, and for every enabled channel the direct/reflected charge and TDC time). An
event per pulse would cost 11,501 database writes per calibration through the tiled writer.
"""
from __future__ import annotations

import threading
import time

import numpy as np
from ophyd import Component as Cpt
from ophyd import Device, EpicsSignalRO
from ophyd.status import DeviceStatus, Status

from calbench.devices.base import CheckedSignal, InstrumentDevice

N_CHANNELS = 16
SWEEP_STREAM = "fee_sweep"
# Per-channel sweep fields: (component, units, what)
SWEEP_FIELDS = (("sweep_direct_charge", "pC", "direct-pulse charge"),
                ("sweep_direct_time", "ns", "direct-pulse TDC time"),
                ("sweep_reflected_charge", "pC", "reflected-pulse charge"),
                ("sweep_reflected_time", "ns", "reflected-pulse TDC time"))


class FeeChannel(Device):
    """One input of the board: discriminator threshold, last pulse, last sweep's arrays."""

    threshold = Cpt(CheckedSignal, "Threshold", kind="config")
    direct_charge = Cpt(EpicsSignalRO, "DirectCharge_RBV", kind="normal")
    direct_time = Cpt(EpicsSignalRO, "DirectTime_RBV", kind="normal")
    reflected_charge = Cpt(EpicsSignalRO, "ReflectedCharge_RBV", kind="normal")
    reflected_time = Cpt(EpicsSignalRO, "ReflectedTime_RBV", kind="normal")
    sweep_direct_charge = Cpt(EpicsSignalRO, "Seq:DirectCharge_RBV", kind="omitted")
    sweep_direct_time = Cpt(EpicsSignalRO, "Seq:DirectTime_RBV", kind="omitted")
    sweep_reflected_charge = Cpt(EpicsSignalRO, "Seq:ReflectedCharge_RBV", kind="omitted")
    sweep_reflected_time = Cpt(EpicsSignalRO, "Seq:ReflectedTime_RBV", kind="omitted")


def _channels():
    return {f"ch{c:02d}": (FeeChannel, f"Ch{c:02d}:", {"kind": "omitted"}) for c in range(N_CHANNELS)}


class Fee(InstrumentDevice):
    """The FEE board in calibration mode: DAC register, channel mask, sequencer, 16 channels."""

    instrument = "fee"

    cal_dac = Cpt(CheckedSignal, "CalDAC_RBV", write_pv="CalDAC", kind="config")
    cal_charge = Cpt(EpicsSignalRO, "CalCharge_RBV", kind="omitted")
    fire_cmd = Cpt(CheckedSignal, "Fire", kind="omitted")
    channel_mask = Cpt(CheckedSignal, "ChannelMask_RBV", write_pv="ChannelMask", kind="config")
    seq_start = Cpt(CheckedSignal, "Seq:Start", kind="config")
    seq_stop = Cpt(CheckedSignal, "Seq:Stop", kind="config")
    seq_step = Cpt(CheckedSignal, "Seq:Step", kind="config")
    seq_acquire = Cpt(CheckedSignal, "Seq:Acquire", string=True, kind="omitted")
    seq_busy = Cpt(EpicsSignalRO, "Seq:Busy_RBV", kind="omitted", auto_monitor=True)
    seq_progress = Cpt(EpicsSignalRO, "Seq:Progress_RBV", kind="omitted", auto_monitor=True)
    seq_num_pulses = Cpt(EpicsSignalRO, "Seq:NumPulses_RBV", kind="omitted")
    seq_count = Cpt(EpicsSignalRO, "Seq:Count_RBV", kind="omitted", auto_monitor=True)
    seq_start_time = Cpt(EpicsSignalRO, "Seq:StartTime_RBV", kind="omitted")
    seq_period = Cpt(EpicsSignalRO, "Seq:PulsePeriod_RBV", kind="omitted")
    seq_temperature = Cpt(EpicsSignalRO, "Seq:Temperature_RBV", kind="omitted")
    seq_complete = Cpt(EpicsSignalRO, "Seq:Complete_RBV", kind="omitted")
    seq_registers = Cpt(EpicsSignalRO, "Seq:Register_RBV", kind="omitted")
    temperature = Cpt(EpicsSignalRO, "Temperature_RBV", kind="normal")
    tdc_lsb = Cpt(EpicsSignalRO, "TdcLsb_RBV", kind="config")
    adc_lsb = Cpt(EpicsSignalRO, "AdcLsb_RBV", kind="config")

    locals().update({k: Cpt(*v[:2], **v[2]) for k, v in _channels().items()})

    #: wall seconds complete() waits for the sequencer before failing (a sweep of 65,536 pulses at
    #: 10 kHz lasts 6.6 s of world time; simulations run it faster)
    complete_timeout_s = 120.0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._count_at_kickoff: int | None = None

    def channel(self, number: int) -> FeeChannel:
        if not 0 <= number < N_CHANNELS:
            raise ValueError(f"the FEE board has channels 0..{N_CHANNELS - 1}, not {number}")
        return getattr(self, f"ch{number:02d}")

    def enabled_channels(self) -> list[int]:
        mask = int(self.channel_mask.get(use_monitor=False))
        return [c for c in range(N_CHANNELS) if mask >> c & 1]

    # -- flyer -------------------------------------------------------------------------------------
    def kickoff(self) -> Status:
        """Start the sequencer over Seq:Start..Seq:Stop; the status fails if the IOC refuses."""
        self._count_at_kickoff = int(self.seq_count.get(use_monitor=False))
        return self.seq_acquire.set("Acquire")

    def complete(self) -> DeviceStatus:
        """Finishes when the sweep's results are published (Seq:Count_RBV increments); reports the
        pulses done to progress bars (bluesky's ProgressBarManager) meanwhile."""
        if self._count_at_kickoff is None:
            raise RuntimeError("complete() before kickoff(): start a sweep with kickoff() first")
        start = self._count_at_kickoff
        status = SweepStatus(self, int(self.seq_num_pulses.get(use_monitor=False)),
                             timeout=self.complete_timeout_s)
        lock = threading.Lock()

        def check(value, **_):
            with lock:
                if status.done or value is None or int(value) <= start:
                    return
                self.seq_count.clear_sub(check)
                self.seq_progress.clear_sub(status.pulses_done)
                status.pulses_done(status.total)       # the bar ends full, however fast
                status.set_finished()

        self.seq_progress.subscribe(status.pulses_done, run=False)
        self.seq_count.subscribe(check, run=True)
        return status

    def _data_keys(self) -> dict[str, tuple]:
        """Signal of every field of the sweep event, with its units."""
        fields = {self.seq_registers.name: (self.seq_registers, "")}
        for c in self.enabled_channels():
            ch = self.channel(c)
            for attr, units, _ in SWEEP_FIELDS:
                sig = getattr(ch, attr)
                fields[sig.name] = (sig, units)
        return fields

    def describe_collect(self) -> dict:
        n = int(self.seq_num_pulses.get(use_monitor=False))
        keys = {}
        for key, (sig, units) in self._data_keys().items():
            keys[key] = {"source": f"PV:{sig.pvname}", "dtype": "array", "shape": [n],
                         "dtype_numpy": "<i4" if sig is self.seq_registers else "<f8",
                         "units": units}
        for sig, units in ((self.seq_temperature, "degC"), (self.seq_start_time, "s"),
                           (self.seq_period, "s")):
            keys[sig.name] = {"source": f"PV:{sig.pvname}", "dtype": "number", "shape": [],
                              "units": units}
        return {SWEEP_STREAM: keys}

    def collect(self):
        """One partial event with the last sweep's arrays (world timestamps of the sweep start)."""
        start_time = float(self.seq_start_time.get(use_monitor=False))
        data, timestamps = {}, {}
        for key, (sig, _) in self._data_keys().items():
            value = np.asarray(sig.get(use_monitor=False))
            data[key] = value.astype(np.int32 if sig is self.seq_registers else np.float64)
            timestamps[key] = start_time
        for sig in (self.seq_temperature, self.seq_start_time, self.seq_period):
            data[sig.name] = float(sig.get(use_monitor=False))
            timestamps[sig.name] = start_time
        yield {"data": data, "timestamps": timestamps, "time": start_time}

    def stop(self, *, success: bool = False) -> None:
        """Stop a running sweep (RunEngine pause/abort)."""
        try:
            if int(self.seq_busy.get()):
                self.seq_acquire.put("Done")
        finally:
            super().stop(success=success)


class SweepStatus(DeviceStatus):
    """The status of a sequencer sweep: its watchers (progress bars) see the pulses done."""

    def __init__(self, fee: Fee, total_pulses: int, **kwargs):
        super().__init__(fee, call_stop_on_failure=False, **kwargs)
        self.total = max(int(total_pulses), 1)
        self.started = time.monotonic()

    def watch(self, func) -> None:
        """As DeviceStatus.watch; a watcher added after the sweep ended sees it complete."""
        super().watch(func)
        if self.done and self.success:
            self._report([func], self.total)

    def pulses_done(self, value=None, **_) -> None:
        if value is not None and not self.done:
            self._report(list(self._watchers), min(int(value), self.total))

    def _report(self, watchers, done: int) -> None:
        """What bluesky's progress bars read (as ophyd's MoveStatus reports it)."""
        elapsed = time.monotonic() - self.started
        left = elapsed * (self.total - done) / done if done else None
        for watcher in watchers:
            watcher(name=self.device.name, current=done, initial=0, target=self.total,
                    unit="pulses", precision=0, fraction=1.0 - done / self.total,
                    time_elapsed=elapsed, time_remaining=left)

