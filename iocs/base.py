"""What every calbench IOC shares: a backend behind the PVs, world-clock timestamps, refused puts.

An instrument IOC is a caproto PVGroup that owns a *backend*: an object from iocs/sim/ (physics) or a
hardware driver. The PVGroup only translates between PVs and backend calls; all behaviour lives in the
backend. A put the instrument must not accept raises `Refused` in the backend (or in the putter): the
put fails at the client, the value is not stored, and the reason is published on `StatusMessage_RBV`
so an operator (or an ophyd device) can show it.
"""
from __future__ import annotations

import logging
import math

from caproto import ChannelType
from caproto.server import PVGroup, pvproperty

from calbench.iocs.errors import InstrumentFault, Refused
from calbench.contracts.clock import WorldClock

__all__ = ["InstrumentIOC", "Refused", "InstrumentFault", "string_pv", "enum_pv"]

log = logging.getLogger(__name__)


def string_pv(name: str, value: str = "", *, read_only: bool = True, max_length: int = 256, doc=""):
    """A long string PV (a CHAR waveform, `caget -S`), for messages and file names."""
    return pvproperty(name=name, value=value, dtype=ChannelType.CHAR, max_length=max_length,
                      string_encoding="utf-8", read_only=read_only, doc=doc)


def enum_pv(name: str, strings: list[str], value: str | None = None, *, read_only=False, doc=""):
    return pvproperty(name=name, value=value if value is not None else strings[0],
                      dtype=ChannelType.ENUM, enum_strings=list(strings), read_only=read_only, doc=doc)


class InstrumentIOC(PVGroup):
    """Base PVGroup: holds the backend and the world clock; StatusMessage_RBV; Connected_RBV."""

    status_message = string_pv("StatusMessage_RBV", doc="last refusal or fault, with its remedy")
    connected = pvproperty(name="Connected_RBV", value=0, read_only=True, dtype=ChannelType.INT,
                           doc="1 while the backend answers")
    refusals = pvproperty(name="Refusals_RBV", value=0, read_only=True, dtype=ChannelType.INT,
                          doc="count of refused puts; a change tells a client its put was refused")
    world_time = pvproperty(name="WorldTime_RBV", value=0.0, read_only=True, dtype=ChannelType.DOUBLE,
                            precision=3, doc="instrument clock, epoch seconds (accelerated in sims)")

    def __init__(self, *, prefix: str, backend, clock: WorldClock | None = None, **kwargs):
        super().__init__(prefix, **kwargs)
        self.backend = backend
        self.clock = clock or WorldClock()

    async def publish(self, instance, value, *, force: bool = False) -> None:
        """Write a readback with a world-clock timestamp (only when it changed, unless forced)."""
        old = instance.value
        if not force and _same(old, value):
            return
        # verify_value=False: a readback published from the poll loop must not run a putter
        await instance.write(value, timestamp=self.clock.now(), verify_value=False)

    async def report(self, message: str) -> None:
        """Publish a status message (refusal, fault or note) for operators and devices."""
        if message:
            log.warning("%s%s", self.prefix, message)
        await self.status_message.write(message[:255], timestamp=self.clock.now())

    async def call(self, func, *args):
        """Call a backend method on behalf of a put; a refusal is published (StatusMessage_RBV,
        Refusals_RBV), then re-raised so the put fails and the old value stays."""
        try:
            result = func(*args)
        except Refused as exc:
            await self.report(f"refused: {exc}")
            await self.refusals.write(self.refusals.value + 1, timestamp=self.clock.now())
            raise
        except InstrumentFault as exc:
            await self.report(f"fault: {exc}")
            await self.publish(self.connected, 0)
            raise
        return result

    async def heartbeat(self, ok: bool) -> None:
        await self.publish(self.connected, int(ok))
        await self.world_time.write(self.clock.now(), timestamp=self.clock.now())

    def make_safe(self) -> None:
        """Leave the instrument safe (shutters closed, HV down, currents zero). Called at shutdown;
        every backend implements `make_safe`."""
        make_safe = getattr(self.backend, "make_safe", None)
        if make_safe is not None:
            make_safe()


def _same(a, b) -> bool:
    try:
        if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
            return True
        return bool(a == b)
    except (ValueError, TypeError):  # arrays: always publish
        return False
