"""Setting PVs declared from a table: name, type, limits or states, units, backend call.

One `Setting` row gives a setting PV everything it needs:
- the pvproperty, with its range published as control and display limits (and its units), its
  enum states or its text length;
- the put check, from that declaration (iocs/put_check.py, run by every InstrumentGroup): a put
  outside it is refused with the typed value and the reason, before any conversion;
- the putter: the group's `apply_setting(setting, value)`, which by default calls
  ``backend.<call>(*args, value)`` (`Setting.bind`) on the instrument's worker thread
  (InstrumentIOC.call), off the event loop. An IOC overrides `apply_setting` for what its instrument adds around the call
  (the EIGER refuses while acquiring and re-reads its readbacks; the crate names slot and channel).

    TABLE = (Setting("AcquireTime", "set_exptime", low=0.0, high=3600.0, units="s", value=1.0),
             Setting("NumImages", "set_frames", LONG, low=1, high=100_000, value=1))

    class DetectorIOC(settings_group("DetectorSettings", TABLE, InstrumentIOC)):
        acquire_time_rbv = pvproperty(...)

The attribute of a setting is its PV name in snake case (AcquireTime: acquire_time) unless the row
names one.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
from caproto import ChannelType

from calbench.iocs.base import InstrumentGroup, enum_pv, setting_pv, string_pv

LONG, DOUBLE, INT, ENUM, TEXT = (ChannelType.LONG, ChannelType.DOUBLE, ChannelType.INT,
                                 ChannelType.ENUM, ChannelType.CHAR)
_ARRAY_DTYPES = {ChannelType.LONG: np.int32, ChannelType.INT: np.int16,
                 ChannelType.DOUBLE: np.float64, ChannelType.FLOAT: np.float32}


@dataclass(frozen=True)
class Setting:
    """One setting PV. `call` names the backend method that applies it; `args` go before the
    value. Numbers: `low`..`high` in `units`; an array takes `max_length` values ("exact" or "up
    to" that many, see `length`). ENUM: `states`. TEXT: up to `max_length` - 1 characters.
    `convert` turns the stored value into the backend's argument (default: by type); `keyword`
    passes it by that name instead of after `args`. `hazard`:
    (value, what) when putting that value needs the procedure lease (iocs/lease.py)."""
    name: str
    call: str
    dtype: ChannelType = DOUBLE
    low: float | None = None
    high: float | None = None
    units: str = ""
    value: Any = None
    precision: int | None = None
    states: tuple[str, ...] = ()
    max_length: int = 1
    length: str = "exact"
    args: tuple = ()
    convert: Callable[[Any], Any] | None = None
    keyword: str = ""
    hazard: tuple[Any, str] = ()
    attr: str = ""
    doc: str = ""

    @property
    def attribute(self) -> str:
        return self.attr or re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", self.name).lower()

    def argument(self, value):
        """The put's value as the backend takes it."""
        if self.convert is not None:
            return self.convert(value)
        if self.max_length > 1 and self.dtype not in (ENUM, TEXT):
            return np.asarray(value)
        if self.dtype in (ENUM, TEXT):
            return str(value)
        return float(value) if self.dtype in (DOUBLE, ChannelType.FLOAT) else int(value)

    def bind(self, backend, value, *leading) -> functools.partial:
        """The backend call that applies ``value``: ``backend.<call>(*leading, *args, value)``."""
        func = getattr(backend, self.call)
        if self.keyword:
            return functools.partial(func, *leading, *self.args, **{self.keyword: self.argument(value)})
        return functools.partial(func, *leading, *self.args, self.argument(value))

    def pvproperty(self):
        """The PV, its putter applying the value through the group's `apply_setting`."""
        if self.dtype == ENUM:
            prop = enum_pv(self.name, list(self.states), self.value, doc=self.doc)
        elif self.dtype == TEXT:
            prop = string_pv(self.name, self.value or "", read_only=False,
                             max_length=self.max_length if self.max_length > 1 else 256,
                             doc=self.doc)
        else:
            extra = {}
            if self.max_length > 1:
                value = (self.value if self.value is not None
                         else np.zeros(self.max_length, _ARRAY_DTYPES[self.dtype]))
                extra = dict(max_length=self.max_length, length=self.length)
            else:
                value = self.value
            prop = setting_pv(self.name, self.dtype, low=self.low, high=self.high, units=self.units,
                              value=value, precision=self.precision, doc=self.doc, **extra)
        setting = self

        async def put(group, instance, value):
            stored = await group.apply_setting(setting, value)
            return value if stored is None else stored

        return prop.putter(put)


def setting_properties(table: Iterable[Setting]) -> dict[str, Any]:
    """attribute name -> pvproperty for every row."""
    return {s.attribute: s.pvproperty() for s in table}


def settings_group(name: str, table: Iterable[Setting], base: type = InstrumentGroup,
                   **extra) -> type:
    """A PVGroup class (subclass of `base`) with a setting PV per row, plus `extra` attributes
    (readbacks, say): an IOC's base class or a SubGroup's class."""
    return type(name, (base,), {**setting_properties(table), **extra})
