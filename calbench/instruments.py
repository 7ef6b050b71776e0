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
    """Import "package.module:Name" and return the named object."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


register(InstrumentSpec(
    name="xraybox",
    description="PSI X-ray box: tube HV, kV, mA, XRF target wheel, shutters, door interlock",
    ioc="calbench.iocs.xraybox:XrayBoxIOC",
    world="xray",
    device="calbench.devices.xraybox:XrayBox",
    default_prefix="XRAY:",
    hardware="calbench.iocs.xraybox_client:XrayBoxClient.from_settings",
    settings={"client": "xrayClient64", "box": "BigXrayBox",
              "targets": ["In", "Ti", "Cr", "Fe", "Cu", "Ge", "Zr", "Mo", "Ag", "Sn"],
              "warmup_s": 20.0},
))
