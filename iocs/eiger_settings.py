"""The EIGER's setting PVs as a table (iocs/settings_table.py): slsdet names for the DACs,
areaDetector names for acquisition. EigerIOC (iocs/eiger.py) applies each through its backend
call, refused while an acquisition runs, then re-reads the readbacks."""
from __future__ import annotations

import numpy as np
from caproto import ChannelType
from caproto.server import pvproperty

from calbench.contracts.eiger import DAC_MAX, DAC_MIN, TRIMBIT_MAX
from calbench.contracts.trimfile import DAC_NAMES, SETTINGS_NAMES
from calbench.iocs.settings_table import DOUBLE, ENUM, INT, LONG, TEXT, Setting, settings_group

ALL_DACS = tuple(DAC_NAMES) + ("iodelay",)
MAX_ENERGY_EV = 100_000
MAX_FRAMES = 100_000
MAX_TIME_S = 3600.0
MAX_TRIM_ENERGIES = 32
SIZED = 2       # a waveform's length until EigerIOC sizes it for the detector (_create_pvdb)

# backend calls that change trimbits: their put re-reads the whole trimbit map
TRIMBIT_CALLS = frozenset({"set_trimbits", "set_trimval", "set_threshold_energy",
                           "load_trimbits"})


def _trim_energies(value) -> list:
    return list(np.atleast_1d(value))


DAC_SETTINGS = tuple(
    Setting(dac, "set_dac", LONG, low=DAC_MIN, high=DAC_MAX, args=(dac,),
            doc=f"{dac} of every half module, DAC units")
    for dac in ALL_DACS)

EIGER_SETTINGS = (
    Setting("DacTable", "set_dac_table", LONG, low=DAC_MIN, high=DAC_MAX, max_length=SIZED,
            doc="[17 x half modules] DACs + iodelay"),
    Setting("Vthreshold", "set_vthreshold", LONG, low=DAC_MIN, high=DAC_MAX,
            doc="vcmp_ll/lr/rl/rr and vcp of every half module"),
    Setting("Vcmp", "set_vcmp", LONG, low=DAC_MIN, high=DAC_MAX, max_length=SIZED,
            doc="per-chip vcmp (slsdet order)"),
    Setting("Trimbits", "set_trimbits", INT, low=0, high=TRIMBIT_MAX, max_length=SIZED,
            doc="rows x cols trimbits"),
    Setting("Trimval", "set_trimval", LONG, low=0, high=TRIMBIT_MAX, value=32,
            doc="set every trimbit to this value"),
    Setting("DynamicRange", "set_dynamic_range", LONG, low=4, high=32, units="bit", value=16,
            doc="bits: 4, 8, 12, 16 or 32"),
    Setting("AcquireTime", "set_exptime", DOUBLE, low=0.0, high=MAX_TIME_S, units="s", value=1.0,
            precision=4),
    Setting("AcquirePeriod", "set_period", DOUBLE, low=0.0, high=MAX_TIME_S, units="s",
            value=0.0, precision=4),
    Setting("NumImages", "set_frames", LONG, low=1, high=MAX_FRAMES, value=1),
    Setting("ThresholdEnergy", "set_threshold_energy", LONG, low=1, high=MAX_ENERGY_EV,
            units="eV", value=-1, doc="loads/interpolates trim files"),
    Setting("TrimEnergies", "set_trim_energies", LONG, low=1, high=MAX_ENERGY_EV, units="eV",
            value=[4500, 5400, 6400], max_length=MAX_TRIM_ENERGIES, length="up to",
            convert=_trim_energies, doc="energies for which trim files exist"),
    Setting("Settings", "set_settings", ENUM, states=tuple(SETTINGS_NAMES), value="standard"),
    Setting("SettingsDir", "set_settings_dir", TEXT, max_length=1024),
    Setting("RateCorrTau", "set_rate_correction", DOUBLE, low=0.0, high=10_000.0, units="ns",
            value=0.0, precision=1),
    Setting("TestPulses", "set_test_pulses", LONG, low=0, high=65535, value=0,
            doc="test pulses per frame; 0 = off"),
)

EigerDacs = settings_group("EigerDacs", DAC_SETTINGS, **{
    f"{dac}_rbv": pvproperty(name=f"{dac}_RBV", value=0, dtype=ChannelType.LONG, read_only=True,
                             doc=f"{dac}; -1 if half modules differ")
    for dac in ALL_DACS})
