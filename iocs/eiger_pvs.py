"""The EIGER IOC's PV declarations: its setting PVs as a table (iocs/settings_table.py; slsdet names
for the DACs, areaDetector names for acquisition), the live-image and simulation subgroups, and the
helpers that declare the other PVs. EigerIOC (iocs/eiger.py) applies each setting through its
backend call, refused while an acquisition runs, then re-reads the readbacks."""
from __future__ import annotations

import numpy as np
from caproto import ChannelType
from caproto._constants import MAX_SUBSCRIPTION_BACKLOG, SUBSCRIPTION_BACKLOG_WARN_THRESHOLD_ELEMENTS
from caproto.server import pvproperty

from calbench.contracts.eiger import DAC_MAX, DAC_MIN, TRIMBIT_MAX
from calbench.contracts.trimfile import DAC_NAMES, SETTINGS_NAMES
from calbench.iocs.base import InstrumentGroup, command_pv, setting_pv
from calbench.iocs.settings_table import DOUBLE, ENUM, INT, LONG, TEXT, Setting, settings_group

ALL_DACS = tuple(DAC_NAMES) + ("iodelay",)
MAX_ENERGY_EV = 100_000
MAX_FRAMES = 100_000
MAX_TIME_S = 3600.0
MAX_TRIM_ENERGIES = 32
LIVE_BINNING = 4
SIZED = 2       # a waveform's length until EigerIOC sizes it for the detector (_create_pvdb)

# backend calls that change trimbits: their put re-reads the whole trimbit map
TRIMBIT_CALLS = frozenset({"set_trimbits", "set_trimval", "set_threshold_energy",
                           "load_trimbits"})


def int_pv(name, value=0, *, read_only=False, low=None, high=None, units="", doc=""):
    """A LONG readback, or a setting in low..high."""
    if not read_only:           # a setting: its range is declared (and published)
        return setting_pv(name, ChannelType.LONG, low=low, high=high, value=value, units=units,
                          doc=doc)
    return pvproperty(name=name, value=value, dtype=ChannelType.LONG, read_only=True, units=units,
                      doc=doc)


def float_pv(name, value=0.0, *, read_only=False, low=None, high=None, units="", precision=4,
              doc=""):
    """A DOUBLE readback, or a setting in low..high."""
    if not read_only:
        return setting_pv(name, low=low, high=high, value=value, units=units, precision=precision,
                          doc=doc)
    return pvproperty(name=name, value=value, dtype=ChannelType.DOUBLE, read_only=True, units=units,
                      precision=precision, doc=doc)


def array_pv(name, dtype, *, read_only=False, low=None, high=None, doc=""):
    """A waveform sized for the detector when the IOC is built (see EigerIOC._create_pvdb); a
    writable one takes exactly that many values in low..high."""
    zero = np.zeros(2, dtype={ChannelType.LONG: np.int32, ChannelType.INT: np.int16,
                              ChannelType.DOUBLE: np.float64, ChannelType.FLOAT: np.float32}[dtype])
    limits = {} if read_only else dict(lower_ctrl_limit=low, upper_ctrl_limit=high,
                                       lower_disp_limit=low, upper_disp_limit=high)
    return pvproperty(name=name, value=zero, dtype=dtype, max_length=2, read_only=read_only, doc=doc,
                      **limits)


def size_waveforms(ioc, lengths: dict[str, int]) -> None:
    """Re-create the waveforms named (attribute, or "subgroup.attribute") with the detector's
    length: caproto sizes waveforms per class, when the IOC is built."""
    for attr, n in lengths.items():
        if "." in attr:
            group_attr, sub = attr.split(".")
            group = ioc.groups[group_attr]
        else:
            group, sub = ioc, attr
        old = group.attr_pvdb[sub]
        cls, kwargs = old.pvspec.get_instantiation_info(group)
        # a subscription backlog that keeps a slow client's queue under caproto's memory limit
        backlog = max(1, (SUBSCRIPTION_BACKLOG_WARN_THRESHOLD_ELEMENTS - 1) // n)
        kwargs.update(value=np.zeros(n, dtype=np.asarray(old.value).dtype), max_length=n,
                      max_subscription_backlog=min(backlog, MAX_SUBSCRIPTION_BACKLOG))
        new = cls(**kwargs)
        for g in {group, ioc}:
            key = sub if g is group else attr
            g.attr_pvdb[key] = new
            g.pvdb[old.pvname] = new


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


class SimControls(InstrumentGroup):
    """Fault injection on the simulated detector (removed on hardware backends)."""
    unresponsive = command_pv("Unresponsive", "simulation: 1 makes the detector stop answering")

    @unresponsive.putter
    async def unresponsive(self, instance, value):
        self.parent.backend.unresponsive = bool(value)
        return int(bool(value))


class LiveImage(InstrumentGroup):
    """The live view: the last frame summed in LIVE_BINNING x LIVE_BINNING bins."""
    array_data = array_pv("ArrayData", ChannelType.FLOAT, read_only=True,
                           doc="last frame, summed in Binning x Binning bins, row-major")
    size_x = int_pv("ArraySizeX_RBV", read_only=True)
    size_y = int_pv("ArraySizeY_RBV", read_only=True)
    binning = int_pv("Binning_RBV", LIVE_BINNING, read_only=True)
