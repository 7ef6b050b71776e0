"""Procedure lease: the IOC makes its instrument safe by itself when the session driving it dies.

A plan that puts an instrument into a hazardous state (HV on, sink current, shutter open) takes the
instrument's lease with a token of its own; its session renews it by putting the token on the
heartbeat PV (devices/lease.py does that from a thread, also while the RunEngine is paused). When
no renewal arrives for `timeout_s` wall seconds (a killed RunEngine, a crashed or powered-off
control PC) the IOC makes the instrument safe itself, says why on StatusMessage_RBV and in its log,
and refuses hazardous puts until a lease is taken again. Without a lease taken, hazardous puts are
allowed (manual operation); the instrument's own protections (the crate's trips) stay as they are.

PVs (after the instrument prefix):
  Lease:Take        the holder's token (<= 39 characters): takes the lease (refused while another
                    holder's lease runs); taking it again with the same token renews it
  Lease:Heartbeat   the holder's token: renews the lease (another token is ignored)
  Lease:Release     the holder's token: gives the lease back (the plan left the instrument safe)
  Lease:State_RBV   Free | Held | Lapsed          Lease:Holder_RBV   the token holding it
  Lease:Timeout_RBV wall s without renewal before the IOC makes the instrument safe
  Lease:Remaining_RBV  wall s left before that
"""
from __future__ import annotations

import time

from caproto import ChannelType
from caproto.server import pvproperty

from calbench.iocs.base import InstrumentGroup
from calbench.contracts.errors import Refused

FREE, HELD, LAPSED = "Free", "Held", "Lapsed"
DEFAULT_LEASE_S = 30.0
CHECK_PERIOD_S = 0.1          # wall seconds between two looks at the lease's expiry


class Lease:
    """The bookkeeping of one instrument's lease, on the wall clock (time.monotonic)."""

    def __init__(self, timeout_s: float = DEFAULT_LEASE_S, *, clock=time.monotonic):
        if not timeout_s > 0:
            raise ValueError(f"lease timeout {timeout_s!r} s must be > 0")
        self.timeout_s = float(timeout_s)
        self.clock = clock
        self.state = FREE
        self.holder = ""
        self.expires = 0.0
        self.lapse_reason = ""

    def remaining_s(self) -> float:
        return max(0.0, self.expires - self.clock()) if self.state == HELD else 0.0

    def take(self, token: str) -> None:
        token = _token(token)
        if self.state == HELD and token != self.holder and self.remaining_s() > 0:
            raise Refused(f"the procedure lease is held by {self.holder!r} (lapses in "
                          f"{self.remaining_s():.0f} s without renewal); wait for its plan to "
                          "end, or stop that session")
        self.state, self.holder, self.lapse_reason = HELD, token, ""
        self.expires = self.clock() + self.timeout_s

    def renew(self, token: str) -> None:
        token = _token(token)
        if self.state != HELD or token != self.holder:
            raise Refused(f"heartbeat from {token!r}: it holds no lease here (state {self.state}"
                          f"{', holder ' + repr(self.holder) if self.holder else ''}); take the "
                          "lease again")
        self.expires = self.clock() + self.timeout_s

    def release(self, token: str) -> None:
        token = _token(token)
        if self.state == HELD and token != self.holder:
            raise Refused(f"release from {token!r}: the lease is held by {self.holder!r}")
        if self.state == HELD:
            self.state, self.holder = FREE, ""

    def due(self) -> bool:
        """The lease is held and its renewals stopped: time to make the instrument safe."""
        return self.state == HELD and self.clock() > self.expires

    def lapse(self, reason: str) -> None:
        self.state, self.lapse_reason = LAPSED, reason

    def check_hazard(self, what: str) -> None:
        """Refuse a hazardous put while a lapsed lease has not been taken again."""
        if self.state == LAPSED:
            raise Refused(f"{what} refused: {self.lapse_reason}; a plan takes the procedure "
                          "lease again (or put a token on Lease:Take) before this")


def _token(value) -> str:
    token = value if isinstance(value, str) else bytes(value).split(b"\0")[0].decode()
    token = token.strip()
    if not token:
        raise Refused("an empty lease token; put the holder's token (e.g. user@host:pid)")
    return token


class LeasePVs(InstrumentGroup):
    """The lease PVs of a hazardous instrument (puts checked and access ruled like the IOC's);
    the parent IOC (iocs/base.py) owns the Lease and implements `lease_lapsed()`."""

    take = pvproperty(name="Take", value="", dtype=ChannelType.STRING,
                      doc="the holder's token: take (or renew) the procedure lease")
    heartbeat = pvproperty(name="Heartbeat", value="", dtype=ChannelType.STRING,
                           doc="the holder's token: renew the lease")
    release = pvproperty(name="Release", value="", dtype=ChannelType.STRING,
                         doc="the holder's token: give the lease back")
    state = pvproperty(name="State_RBV", value=FREE, dtype=ChannelType.ENUM,
                       enum_strings=[FREE, HELD, LAPSED], read_only=True)
    holder = pvproperty(name="Holder_RBV", value="", dtype=ChannelType.STRING, read_only=True)
    timeout = pvproperty(name="Timeout_RBV", value=DEFAULT_LEASE_S, dtype=ChannelType.DOUBLE,
                         units="s", precision=1, read_only=True)
    remaining = pvproperty(name="Remaining_RBV", value=0.0, dtype=ChannelType.DOUBLE, units="s",
                           precision=1, read_only=True)

    @property
    def lease(self) -> Lease:
        return self.parent.procedure_lease

    async def _show(self) -> None:
        ioc = self.parent
        await ioc.publish(self.state, self.lease.state)
        await ioc.publish(self.holder, self.lease.holder[:39])
        await ioc.publish(self.timeout, self.lease.timeout_s)
        await ioc.publish(self.remaining, round(self.lease.remaining_s(), 1))

    @take.putter
    async def take(self, instance, value):
        renewal = self.lease.state == HELD and self.lease.holder == value
        await self.parent.check(self.lease.take, value)
        if not renewal:
            await self.parent.lease_taken()
        await self._show()
        return value

    @heartbeat.putter
    async def heartbeat(self, instance, value):
        # a heartbeat that renews nothing (not the holder, or lapsed) is ignored, not refused: a
        # refusal would count in Refusals_RBV and fail a client's put in flight on the instrument
        if self.lease.state == HELD and _token(value) == self.lease.holder:
            self.lease.renew(value)
        await self.parent.publish(self.remaining, round(self.lease.remaining_s(), 1))
        return value

    @release.putter
    async def release(self, instance, value):
        await self.parent.check(self.lease.release, value)
        await self._show()
        return value

    @remaining.scan(period=CHECK_PERIOD_S)
    async def remaining(self, instance, async_lib):
        if self.lease.due():
            holder, timeout = self.lease.holder, self.lease.timeout_s
            reason = (f"the procedure lease of {holder!r} lapsed (no renewal for {timeout:g} s: "
                      "its session stopped)")
            self.lease.lapse(reason)
            done = await self.parent.lease_lapsed()
            await self.parent.report(f"{reason}; {done}")   # logged there too
        await self._show()
