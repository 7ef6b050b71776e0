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

from calbench.devices.base import CheckedSignal, InstrumentDevice, LongStringSignalRO

LINE_FREQUENCY_HZ = 50.0


class PutSignal(CheckedSignal):
    """A CheckedSignal that is done when the IOC completes the put. The bench IOCs publish every
    readback before they complete a put, so no readback tolerance (derived by ophyd from the PV's
    display precision) is waited for."""

    @property
    def tolerance(self):
        return None

    @tolerance.setter
    def tolerance(self, value):
        pass


class Multimeter34401a(InstrumentDevice):
    """HP/Agilent 34401A: `dmm.reading` is the mean of `samples` readings (A or V) per trigger."""

    instrument = "dmm"

    identity = Cpt(LongStringSignalRO, "Identity_RBV", kind="config")
    function = Cpt(PutSignal, "Function_RBV", write_pv="Function", string=True, kind="config")
    range_setting = Cpt(PutSignal, "Range", kind="config")
    nplc = Cpt(PutSignal, "NPLC_RBV", write_pv="NPLC", kind="config")
    samples = Cpt(PutSignal, "Samples", kind="config")
    measure = Cpt(PutSignal, "Measure", kind="omitted")
    reading = Cpt(EpicsSignalRO, "Reading_RBV", auto_monitor=False, kind="hinted")
    reading_std = Cpt(EpicsSignalRO, "ReadingStd_RBV", auto_monitor=False, kind="normal")
    range_in_use = Cpt(EpicsSignalRO, "Range_RBV", auto_monitor=False, kind="normal")
    display_text = Cpt(PutSignal, "DisplayText", string=True, kind="omitted")
    display_clear = Cpt(PutSignal, "DisplayClear", kind="omitted")
    remote = Cpt(PutSignal, "Remote_RBV", write_pv="Remote", string=True, kind="omitted")
    clear_status = Cpt(PutSignal, "ClearStatus", kind="omitted")
    reconnect_cmd = Cpt(PutSignal, "Reconnect", kind="omitted")

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
    voltage = Cpt(PutSignal, "Voltage_RBV", write_pv="Voltage", kind="config")
    current_limit = Cpt(PutSignal, "CurrentLimit_RBV", write_pv="CurrentLimit", kind="config")
    output = Cpt(PutSignal, "Output_RBV", write_pv="Output", string=True, kind="config")
    voltage_meas = Cpt(EpicsSignalRO, "VoltageMeas_RBV", auto_monitor=False, kind="normal")
    current_meas = Cpt(EpicsSignalRO, "CurrentMeas_RBV", auto_monitor=False, kind="normal")
    mode = Cpt(EpicsSignalRO, "Mode_RBV", string=True, auto_monitor=False, kind="normal")
    over_current = Cpt(EpicsSignalRO, "OverCurrent_RBV", auto_monitor=False, kind="normal")
    update = Cpt(PutSignal, "Update", kind="omitted")
    reconnect_cmd = Cpt(PutSignal, "Reconnect", kind="omitted")

    def trigger(self):
        return self.update.set(1)


class Batmet(InstrumentDevice):
    """BatMet current sink: raw DAC code, calibrated `sink` current (A), stored csink, ADC (V)."""

    instrument = "batmet"

    identity = Cpt(LongStringSignalRO, "Identity_RBV", kind="config")
    dac = Cpt(PutSignal, "DAC_RBV", write_pv="DAC", kind="hinted")
    sink = Cpt(PutSignal, "Sink_RBV", write_pv="Sink", kind="omitted")
    cal_min = Cpt(PutSignal, "CalMin", kind="omitted")
    cal_max = Cpt(PutSignal, "CalMax", kind="omitted")
    cal_a = Cpt(PutSignal, "CalA", kind="omitted")
    cal_b = Cpt(PutSignal, "CalB", kind="omitted")
    cal_c = Cpt(PutSignal, "CalC", kind="omitted")
    cal_write = Cpt(PutSignal, "CalWrite", kind="omitted")
    calibration = Cpt(LongStringSignalRO, "Calibration_RBV", kind="config")
    adc_ext = Cpt(EpicsSignalRO, "AdcExt_RBV", auto_monitor=False, kind="omitted")
    adc_supply = Cpt(EpicsSignalRO, "AdcSupply_RBV", auto_monitor=False, kind="normal")
    adc_sense = Cpt(EpicsSignalRO, "AdcSense_RBV", auto_monitor=False, kind="normal")
    update = Cpt(PutSignal, "Update", kind="omitted")
    reconnect_cmd = Cpt(PutSignal, "Reconnect", kind="omitted")

    def trigger(self):
        return self.update.set(1)
