"""What every calbench IOC shares: a backend behind the PVs, world-clock timestamps, refused puts.

An instrument IOC is a caproto PVGroup that owns a *backend*: an object from iocs/sim/ (physics) or a
hardware driver. The PVGroup only translates between PVs and backend calls; all behaviour lives in the
backend. A put the instrument must not accept raises `Refused` in the backend (or in the putter): the
put fails at the client, the value is not stored, and the reason is published on `StatusMessage_RBV`
so an operator (or an ophyd device) can show it.

Every writable PV of an InstrumentGroup (the IOC and its subgroups) checks a put on the value the
client sent, before caproto converts it (iocs/put_check.py): its type, length, control limits, enum
states, text. A refused put leaves the state unchanged, publishes "refused: <PV> = <typed value>
<reason>" on StatusMessage_RBV, counts in Refusals_RBV, answers the client with an error (ECA_PUTFAIL
in the put-callback reply; an error message for a put without callback) and raises the PV's own
alarm (WRITE, MAJOR) until its next good put. Setting PVs declare their range and units with
`setting_pv` (published as control and display limits), or in a table (iocs/settings_table.py);
command PVs with `command_pv`. Who may write at all is the IOC's `access` rule (the lab file's
writers, see calbench/config.py).

Backend calls (`call`) run on the instrument's own worker thread (iocs/backend_worker.py), never on
the event loop: an instrument that answers slowly holds up only its own calls. Checks that talk to
no instrument (a range, the lease) run on the loop (`check`, `refuse`).
"""
from __future__ import annotations

import logging
import math
from contextvars import ContextVar
from dataclasses import dataclass

from caproto import AccessRights, AlarmSeverity, AlarmStatus, CAStatus, ChannelAlarm, ChannelType
from caproto.server import PVGroup, pvproperty
from caproto.server.server import pvspec_type_map

from calbench.contracts.clock import WorldClock
from calbench.iocs.backend_worker import BackendWorker
from calbench.contracts.errors import InstrumentFault, Refused
from calbench.iocs.put_check import Sent, check

__all__ = ["InstrumentIOC", "InstrumentGroup", "Refused", "InstrumentFault", "string_pv", "enum_pv",
           "setting_pv", "command_pv"]

log = logging.getLogger(__name__)

# True while the server handles a put with callback (set by iocs/server.py's circuit): such a put is
# answered with an error status, a put without callback with an error message
WRITE_NOTIFY: ContextVar[bool] = ContextVar("calbench_write_notify", default=False)


@dataclass
class _Put:
    """The put being served (a context variable, so backend calls inside it know it)."""
    where: str              # "<PV> = <typed value>"
    refused: bool = False   # the refusal is published and counted already


_PUT: ContextVar[_Put | None] = ContextVar("calbench_put", default=None)


class _CheckedPut:
    """Mixin of every writable PV class of an InstrumentGroup (see the module docstring).

    length: "exact" (a waveform takes exactly max_length values) or "up to"; max_chars: the longest
    text a string PV takes (default: what fits)."""

    def __init__(self, *, length: str = "exact", max_chars: int | None = None, **kwargs):
        kwargs["alarm"] = ChannelAlarm()     # its own alarm: a refusal alarms this PV only
        super().__init__(**kwargs)
        self.put_length, self.max_chars = length, max_chars

    def check_access(self, hostname, username):
        access = getattr(instrument_of(self.group), "access", None)
        if access is None or access.allows(hostname, username):
            return AccessRights.READ | AccessRights.WRITE
        return AccessRights.READ

    async def write_from_dbr(self, data, data_type, metadata, *, flags=0):
        if data_type in (ChannelType.PUT_ACKS, ChannelType.PUT_ACKT):
            return await super().write_from_dbr(data, data_type, metadata, flags=flags)
        sent = Sent.from_wire(data, data_type)
        put = _Put(f"{self.pvname} = {sent.shown()}")
        ioc = instrument_of(self.group)
        reason = check(self, sent)
        if reason is not None:
            return await self._refuse(ioc, put, f"refused: {put.where} {reason}")
        token = _PUT.set(put)
        try:
            if self.data_type == ChannelType.CHAR:
                # caproto converts neither a DBR_STRING nor an empty text to a CHAR waveform
                result = await self.write(sent.text(), flags=flags)
            else:
                result = await super().write_from_dbr(data, data_type, metadata, flags=flags)
        except (Refused, InstrumentFault) as exc:
            return await self._refuse(ioc, put, f"refused: {put.where}: {exc}")
        except Exception as exc:     # a check missed above: still a refusal with its reason
            log.error("put %s failed unexpectedly", put.where, exc_info=True)
            return await self._refuse(ioc, put, f"refused: {put.where}: {type(exc).__name__}: {exc}")
        finally:
            _PUT.reset(token)
        if self.alarm.status != AlarmStatus.NO_ALARM:
            await self.alarm.write(status=AlarmStatus.NO_ALARM, severity=AlarmSeverity.NO_ALARM)
        return result

    async def _refuse(self, ioc, put: _Put, message: str):
        if ioc is not None and not put.refused:
            put.refused = True
            await ioc.count_refusal(message)
        await self.alarm.write(status=AlarmStatus.WRITE, severity=AlarmSeverity.MAJOR_ALARM)
        if WRITE_NOTIFY.get():
            return CAStatus.ECA_PUTFAIL
        raise Refused(message)


def _checked_class(cls):
    return type(f"Checked{cls.__name__}", (_CheckedPut, cls), {})


class InstrumentGroup(PVGroup):
    """A PVGroup whose writable PVs check every put (the IOC and each of its subgroups)."""

    type_map = {dtype: _checked_class(cls) for dtype, cls in pvspec_type_map.items()}

    async def apply_setting(self, setting, value):
        """Apply a put to a setting PV declared in a table (iocs/settings_table.py); returns the
        value the PV stores (None: the one sent). A subgroup's go to its IOC."""
        return await instrument_of(self).apply_setting(setting, value)


def instrument_of(group):
    """The InstrumentIOC a (sub)group belongs to, or None."""
    while group is not None and not isinstance(group, InstrumentIOC):
        group = getattr(group, "parent", None)
    return group


def setting_pv(name: str, dtype=ChannelType.DOUBLE, *, low: float, high: float, units: str = "",
               value=None, precision: int | None = None, doc: str = "", **kwargs):
    """A setting PV: puts outside low..high are refused; the range is published as control and
    display limits, with the units. Integer settings are LONG: a client converts a put to the PV's
    type before sending, and 65537 for a 16-bit PV would arrive as 1."""
    if value is None:
        value = 0.0 if dtype in (ChannelType.DOUBLE, ChannelType.FLOAT) else 0
        value = min(max(value, type(value)(low)), type(value)(high))
    extra = {} if precision is None else {"precision": precision}
    return pvproperty(name=name, value=value, dtype=dtype, units=units, lower_ctrl_limit=low,
                      upper_ctrl_limit=high, lower_disp_limit=low, upper_disp_limit=high, doc=doc,
                      **extra, **kwargs)


def set_limits(pv, low: float, high: float) -> None:
    """Set a setting PV's range when the IOC is built (from the lab file or the instrument)."""
    for which, limit in (("lower", low), ("upper", high)):
        for kind in ("ctrl", "disp"):
            pv._data[f"{which}_{kind}_limit"] = limit   # caproto's metadata store; no setter


def command_pv(name: str, doc: str, *, values: tuple[int, int] = (0, 1)):
    """A command PV: takes only its documented values (by default 0: nothing, 1: do it)."""
    return setting_pv(name, ChannelType.LONG, low=values[0], high=values[1], value=0, doc=doc)


def string_pv(name: str, value: str = "", *, read_only: bool = True, max_length: int = 256, doc="",
              **kwargs):
    """A long string PV (a CHAR waveform, `caget -S`), for messages and file names."""
    return pvproperty(name=name, value=value, dtype=ChannelType.CHAR, max_length=max_length,
                      string_encoding="utf-8", read_only=read_only, doc=doc, **kwargs)


def enum_pv(name: str, strings: list[str], value: str | None = None, *, read_only=False, doc=""):
    return pvproperty(name=name, value=value if value is not None else strings[0],
                      dtype=ChannelType.ENUM, enum_strings=list(strings), read_only=read_only, doc=doc)


class InstrumentIOC(InstrumentGroup):
    """Base PVGroup: holds the backend and the world clock; StatusMessage_RBV; Connected_RBV."""

    status_message = string_pv("StatusMessage_RBV", doc="last refusal or fault, with its remedy")
    connected = pvproperty(name="Connected_RBV", value=0, read_only=True, dtype=ChannelType.INT,
                           doc="1 while the backend answers")
    refusals = pvproperty(name="Refusals_RBV", value=0, read_only=True, dtype=ChannelType.INT,
                          doc="count of refused puts; a change tells a client its put was refused")
    server = string_pv("Server_RBV", doc="the process serving these PVs and how to stop it")
    world_time = pvproperty(name="WorldTime_RBV", value=0.0, read_only=True, dtype=ChannelType.DOUBLE,
                            precision=3, doc="instrument clock, epoch seconds (accelerated in sims)")

    def __init__(self, *, prefix: str, backend, clock: WorldClock | None = None,
                 lease_s: float | None = None, **kwargs):
        super().__init__(prefix, **kwargs)
        self.backend = backend
        self.clock = clock or WorldClock()
        self.worker = BackendWorker(f"{prefix}backend")
        self.access = None       # who may write (calbench.config.WriteAccess); None: anybody
        # the procedure lease (iocs/lease.py); served by the IOCs that have a LeasePVs subgroup
        from calbench.iocs.lease import DEFAULT_LEASE_S, Lease   # lease.py builds on this module
        self.procedure_lease = Lease(DEFAULT_LEASE_S if lease_s is None else lease_s)

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

    async def count_refusal(self, message: str) -> None:
        """Publish why a put failed, then count it (a client seeing the count change reads the
        message); once per put."""
        put = _PUT.get()
        if put is not None:
            if put.refused:
                return
            put.refused = True
        await self.report(message)
        await self.refusals.write(self.refusals.value + 1, timestamp=self.clock.now())

    async def call(self, func, *args):
        """Call a backend method on behalf of a put (or a poll) on the instrument's worker thread;
        a refusal is published (StatusMessage_RBV, Refusals_RBV), then re-raised so the put fails
        and the old value stays. A fault inside a put fails the put the same way (and drops
        Connected_RBV); outside a put it is reported and re-raised."""
        return await self._answer(self.worker.run(func, *args))

    async def apply_setting(self, setting, value):
        """A table-declared setting: ``backend.<call>(*args, value)`` on the worker thread, after
        the lease check of a hazardous value."""
        if setting.hazard and value == setting.hazard[0]:
            await self.require_lease(setting.hazard[1])
        await self.call(setting.bind(self.backend, value))

    async def check(self, func, *args):
        """Like `call`, but on the event loop: for checks that talk to no instrument."""
        return await self._answer(_on_loop(func, args))

    async def refuse(self, reason: str):
        """Refuse the put being served: published and counted like a backend's refusal."""
        await self.check(_raise, Refused(reason))

    async def _answer(self, answer):
        put = _PUT.get()
        where = f"{put.where}: " if put is not None else ""
        try:
            return await answer
        except Refused as exc:
            await self.count_refusal(f"refused: {where}{exc}")
            raise
        except InstrumentFault as exc:
            if put is not None:
                await self.count_refusal(f"fault: {where}{exc}")
            else:
                await self.report(f"fault: {exc}")
            await self.publish(self.connected, 0)
            raise

    async def heartbeat(self, ok: bool) -> None:
        await self.publish(self.connected, int(ok))
        await self.world_time.write(self.clock.now(), timestamp=self.clock.now())

    def make_safe(self) -> None:
        """Leave the instrument safe (shutters closed, HV down, currents zero). Called at shutdown;
        every backend implements `make_safe` and raises InstrumentFault naming what it could not
        do."""
        make_safe = getattr(self.backend, "make_safe", None)
        if make_safe is not None:
            make_safe()

    # -- the procedure lease (iocs/lease.py) ----------------------------------------------------
    async def require_lease(self, what: str) -> None:
        """Before a hazardous put: refused (published like any refusal) while a lapsed lease has
        not been taken again."""
        await self.check(self.procedure_lease.check_hazard, what)

    async def lease_taken(self) -> None:
        """Hook: a lease was taken (e.g. note what the plan then switches on)."""

    async def lease_lapsed(self) -> str:
        """The holder's renewals stopped: make the instrument safe now, off the event loop; returns
        what was done (or what could not be), for StatusMessage_RBV and the log."""
        try:
            await self.worker.run(self.make_safe)
        except Exception as exc:      # reported: the operator must act
            log.exception("%smaking the instrument safe after the lease lapsed", self.prefix)
            return f"COULD NOT make the instrument safe: {exc}; do it by hand now"
        return "the instrument was made safe"


async def _on_loop(func, args):
    return func(*args)


def _raise(exc: BaseException):
    raise exc


def _same(a, b) -> bool:
    try:
        if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
            return True
        return bool(a == b)
    except (ValueError, TypeError):  # arrays: always publish
        return False
