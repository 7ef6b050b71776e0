"""Devices of the lab, built from the lab configuration (the profile and the CLIs use this)."""
from __future__ import annotations

import inspect

from calbench.config import LabConfig
from calbench.instruments import INSTRUMENTS, load_object


def make_device(cfg: LabConfig, name: str, *, connect: bool = True, timeout: float = 5.0):
    """The ophyd device of instrument `name` at its configured prefix.

    A device class may define `from_settings(prefix, name=, settings=[, lab=])` to take instrument
    settings (geometry, det_id, ...) and the lab configuration; otherwise it is built as
    `cls(prefix, name=name)`."""
    cls = load_object(INSTRUMENTS[name].device)
    prefix = cfg.prefix_of(name)
    settings = cfg.instruments[name].settings
    if hasattr(cls, "from_settings"):
        extra = {}
        if "lab" in inspect.signature(cls.from_settings).parameters:
            extra["lab"] = cfg          # e.g. the EIGER's frames go to the lab's data directory
        device = cls.from_settings(prefix, name=name, settings=settings, **extra)
    else:
        device = cls(prefix, name=name)
    if connect:
        device.ensure_connected(timeout)
    return device
