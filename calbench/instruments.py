"""The table of instruments calbench knows: where each one's IOC, simulated world and ophyd device live.

Everything that needs to go from an instrument name to code (the `calbench ioc` CLI, the lab
configuration's validation, the device factory of the profile) reads this table. Entries are import
strings so that this module imports nothing heavy and no layer imports another through it.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class InstrumentSpec:
    name: str
    description: str
    ioc: str                 # "module:Class" of the PVGroup
    world: str               # simulated world the instrument lives in (iocs/sim/<world>.py)
    device: str              # "module:Class" of the ophyd device
    default_prefix: str
    hardware: str = ""       # "module:function(settings) -> backend" building the hardware backend
    settings: dict = field(default_factory=dict)   # instrument-specific keys and their defaults


INSTRUMENTS: dict[str, InstrumentSpec] = {}


def register(spec: InstrumentSpec) -> InstrumentSpec:
    INSTRUMENTS[spec.name] = spec
    return spec


def load_object(path: str):
    """Import "package.module:Name" (or "module:Class.attribute") and return the named object."""
    module, _, name = path.partition(":")
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


register(InstrumentSpec(
    name="xraybox",
    description="PSI X-ray box: tube HV, kV, mA, XRF target wheel, shutters, door interlock",
    ioc="calbench.iocs.xraybox:XrayBoxIOC",
    world="xray",
    device="calbench.devices.xraybox:XrayBox",
    default_prefix="XRAY:",
    hardware="calbench.iocs.hw.xraybox:XrayBoxClient.from_settings",
    settings={"client": "xrayClient64", "box": "BigXrayBox",
              "targets": ["In", "Ti", "Cr", "Fe", "Cu", "Ge", "Zr", "Mo", "Ag", "Sn"],
              "warmup_s": 20.0, "lease_s": 30.0},
))

register(InstrumentSpec(
    name="caen",
    description="CAEN SY5527 HV crate, 14-channel floating board powering two triple-GEM layers (QC6)",
    ioc="calbench.iocs.caen_crate:CaenCrateIOC",
    world="qc6",
    device="calbench.devices.caen:CaenCrate",
    default_prefix="CAEN:",
    hardware="calbench.iocs.hw.caen:from_settings",
    settings={"detector_name": "Detector1", "layer": 1, "slot": 3, "system_type": "SY5527",
              "link_type": "TCPIP", "address": "192.168.0.1", "username": "admin",
              "password_env": "CALBENCH_CAEN_PASSWORD", "poll_period_s": 0.5, "lease_s": 30.0},
))

register(InstrumentSpec(
    name="dmm",
    description="HP/Agilent 34401A multimeter (SCPI over RS-232): DC current/voltage, display",
    ioc="calbench.iocs.multimeter34401a:Multimeter34401aIOC",
    world="bench",
    device="calbench.devices.bench:Multimeter34401a",
    default_prefix="DMM:",
    hardware="calbench.iocs.hw.agilent34401a:open_34401a",
    settings={"resource": "", "visa_library": "", "usb_vid_pid": "067b:2303", "baud_rate": 9600,
              "timeout_s": 2.0, "retries": 1},
))

register(InstrumentSpec(
    name="psu",
    description="single-output SCPI lab supply (E3632A commands): V, current limit, output, CC",
    ioc="calbench.iocs.scpi_psu:ScpiPsuIOC",
    world="bench",
    device="calbench.devices.bench:ScpiPsu",
    default_prefix="PSU:",
    hardware="calbench.iocs.hw.scpi_psu:open_scpi_psu",
    settings={"resource": "", "visa_library": "", "usb_vid_pid": "", "baud_rate": 9600,
              "timeout_s": 2.0, "idn_contains": "", "max_voltage_V": 15.0, "max_current_A": 7.0,
              "lease_s": 30.0},
))

register(InstrumentSpec(
    name="batmet",
    description="BatMet current sink (serial text protocol): raw DAC, calibrated sink, ADC",
    ioc="calbench.iocs.batmet:BatmetIOC",
    world="bench",
    device="calbench.devices.bench:Batmet",
    default_prefix="BATMET:",
    hardware="calbench.iocs.hw.batmet_serial:open_batmet",
    settings={"port": "", "usb_vid_pid": "0403:6015", "baud_rate": 115200, "timeout_s": 2.0,
              "lease_s": 30.0},
))

register(InstrumentSpec(
    name="eiger",
    description="PSI EIGER single-photon-counting detector (slsdet): DACs, trimbits, threshold "
                "energy, frames to HDF5",
    ioc="calbench.iocs.eiger:EigerIOC",
    world="xray",
    device="calbench.devices.eiger:Eiger",
    default_prefix="EIGER:",
    hardware="calbench.iocs.hw.eiger:open_eiger",
    settings={"geometry": "500k", "det_id": "T63", "hostnames": ["beb058", "beb059"],
              "settings_dir": "", "data_dir": "", "trimen": [4500, 5400, 6400],
              "slsdet_id": 0, "scratch_dir": ""},
))

register(InstrumentSpec(
    name="fee",
    description="Daya Bay FEE board (VME, 16 channels): calibration DAC, ADC/TDC of direct and "
                "reflected pulses, DAC-sweep sequencer; simulated with RG58 cables",
    ioc="calbench.iocs.fee:FeeIOC",
    world="fee",
    device="calbench.devices.fee:Fee",
    default_prefix="FEE:",
    hardware="calbench.iocs.hw.fee:open_fee",
    settings={"cable_lengths_m": [20.0] * 16, "velocity_m_per_ns": 0.208, "temp_coeff_per_K": 1.0e-4,
              "threshold_mV": 0.7, "pulse_rate_hz": 10000.0, "rise_ns": 80.0,
              "mean_temperature_C": 20.0, "daily_swing_K": 8.0,
              "vme_link": "USB", "vme_link_number": 0, "vme_conet_node": 0,
              "vme_base_address": 0, "register_map": ""},
))
