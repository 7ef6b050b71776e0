"""ophyd devices of the BatMet calibration bench (PVs of iocs/multimeter34401a.py, iocs/scpi_psu.py,
iocs/batmet.py): the 34401A multimeter, the lab supply and the BatMet current sink.

Each device's trigger() asks its IOC for fresh values (the meter measures, the supply and the BatMet
are read out) and completes when they are published, so `trigger_and_read([dmm, psu, batmet])`
records one consistent point. Readbacks are read with a CA get (auto_monitor=False), never from a
monitor that may still be in flight.
"""
from __future__ import annotations

from ophyd import Component as Cpt
from ophyd import EpicsSignalRO

from calbench.devices.lease import ProcedureLease
from calbench.devices.base import (CheckedSignal, InstrumentDevice, LongStringSignalRO,
                                   PauseHooks, PauseSafeSignal, set_and_check)

LINE_FREQUENCY_HZ = 50.0



class Multimeter34401a(InstrumentDevice):
    """HP/Agilent 34401A: `dmm.reading` is the mean of `samples` readings (A or V) per trigger."""

    instrument = "dmm"

    identity = Cpt(LongStringSignalRO, "Identity_RBV", kind="config")
    function = Cpt(CheckedSignal, "Function_RBV", write_pv="Function", string=True, kind="config")
    range_setting = Cpt(CheckedSignal, "Range", kind="config")
    nplc = Cpt(CheckedSignal, "NPLC_RBV", write_pv="NPLC", kind="config")
    samples = Cpt(CheckedSignal, "Samples", kind="config")
    measure = Cpt(CheckedSignal, "Measure", kind="omitted")
    reading = Cpt(EpicsSignalRO, "Reading_RBV", auto_monitor=False, kind="hinted")
    reading_std = Cpt(EpicsSignalRO, "ReadingStd_RBV", auto_monitor=False, kind="normal")
    range_in_use = Cpt(EpicsSignalRO, "Range_RBV", auto_monitor=False, kind="normal")
    display_text = Cpt(CheckedSignal, "DisplayText", string=True, kind="omitted")
    display_clear = Cpt(CheckedSignal, "DisplayClear", kind="omitted")
    remote = Cpt(CheckedSignal, "Remote_RBV", write_pv="Remote", string=True, kind="omitted")
    clear_status = Cpt(CheckedSignal, "ClearStatus", kind="omitted")
    reconnect_cmd = Cpt(CheckedSignal, "Reconnect", kind="omitted")

    def measure_timeout_s(self) -> float:
        """Wall-time bound of one Measure on real hardware: samples x (integration + trigger and
        RS-232 overhead), twice (one re-ask per garbled reply), plus margin."""
        samples = max(1, int(self.samples.get()))
        nplc = float(self.nplc.get())
        return 10.0 + 2 * samples * (nplc / LINE_FREQUENCY_HZ + 0.3)

    def trigger(self):
        return self.measure.set(1, timeout=self.measure_timeout_s())


class ScpiPsu(InstrumentDevice):
    """Single-output SCPI lab supply: setpoints, output, measured V and A, CC (over-current)."""

    instrument = "psu"

    identity = Cpt(LongStringSignalRO, "Identity_RBV", kind="config")
    voltage = Cpt(CheckedSignal, "Voltage_RBV", write_pv="Voltage", kind="config")
    current_limit = Cpt(CheckedSignal, "CurrentLimit_RBV", write_pv="CurrentLimit", kind="config")
    output = Cpt(CheckedSignal, "Output_RBV", write_pv="Output", string=True, kind="config")
    voltage_meas = Cpt(EpicsSignalRO, "VoltageMeas_RBV", auto_monitor=False, kind="normal")
    current_meas = Cpt(EpicsSignalRO, "CurrentMeas_RBV", auto_monitor=False, kind="normal")
    mode = Cpt(EpicsSignalRO, "Mode_RBV", string=True, auto_monitor=False, kind="normal")
    over_current = Cpt(EpicsSignalRO, "OverCurrent_RBV", auto_monitor=False, kind="normal")
    update = Cpt(CheckedSignal, "Update", kind="omitted")
    reconnect_cmd = Cpt(CheckedSignal, "Reconnect", kind="omitted")
    lease = Cpt(ProcedureLease, "Lease:", kind="omitted")

    def trigger(self):
        return self.update.set(1)


class Batmet(PauseHooks, InstrumentDevice):
    """BatMet current sink: raw DAC code, calibrated `sink` current (A), stored csink, ADC (V).
    A RunEngine pause (Ctrl-C) sets the DAC to 0 (no sink current) and its resume restores the code
    it had; the supply stays as it is."""

    instrument = "batmet"

    identity = Cpt(LongStringSignalRO, "Identity_RBV", kind="config")
    dac = Cpt(PauseSafeSignal, "DAC_RBV", write_pv="DAC", kind="hinted")
    sink = Cpt(PauseSafeSignal, "Sink_RBV", write_pv="Sink", kind="omitted")
    cal_min = Cpt(CheckedSignal, "CalMin", kind="omitted")
    cal_max = Cpt(CheckedSignal, "CalMax", kind="omitted")
    cal_a = Cpt(CheckedSignal, "CalA", kind="omitted")
    cal_b = Cpt(CheckedSignal, "CalB", kind="omitted")
    cal_c = Cpt(CheckedSignal, "CalC", kind="omitted")
    cal_write = Cpt(CheckedSignal, "CalWrite", kind="omitted")
    calibration = Cpt(LongStringSignalRO, "Calibration_RBV", kind="config")
    adc_ext = Cpt(EpicsSignalRO, "AdcExt_RBV", auto_monitor=False, kind="omitted")
    adc_supply = Cpt(EpicsSignalRO, "AdcSupply_RBV", auto_monitor=False, kind="normal")
    adc_sense = Cpt(EpicsSignalRO, "AdcSense_RBV", auto_monitor=False, kind="normal")
    update = Cpt(CheckedSignal, "Update", kind="omitted")
    reconnect_cmd = Cpt(CheckedSignal, "Reconnect", kind="omitted")
    lease = Cpt(ProcedureLease, "Lease:", kind="omitted")

    def trigger(self):
        return self.update.set(1)

    def make_pause_safe(self):
        """DAC 0; returns the code to restore (None when it was 0 already)."""
        code = int(self.dac.get(use_monitor=False))
        if code > 0:
            set_and_check(self.dac, 0)
        return (code,) if code > 0 else None

    def restore_after_pause(self, saved) -> None:
        set_and_check(self.dac, saved[0])
