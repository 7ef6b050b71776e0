"""What the bench IOCs (34401A, lab supply, BatMet) share: drivers called off the event loop,
faults reported like refusals, reconnection, and the simulated links' fault-injection PVs.

The bench backends are the hardware drivers of iocs/hw/ (on the simulated bench they talk to the
in-process fakes of iocs/sim/bench.py). A driver call blocks for the instrument's answer (a 34401A
reading integrates for 10 power-line cycles), so it runs on the instrument's worker thread
(InstrumentIOC.call): the one CA server keeps serving every other instrument meanwhile.

A put whose driver call fails with `InstrumentFault` (no answer, garbled reply, wrong instrument)
fails like a refused one: the reason goes to StatusMessage_RBV, Refusals_RBV counts it (so ophyd's
CheckedSignal fails the put with that message instead of timing out) and Connected_RBV drops to 0.

PVs added to InstrumentIOC's: Identity_RBV (*IDN? / help line), Reconnect (1: close and reopen the
link), and on simulated backends Sim:GarbleNext, Sim:TimeoutNext (the next N replies garbled / lost),
Sim:Absent (nothing answers), Sim:Identity (the identity the instrument reports; '' = its own).
"""
from __future__ import annotations

import time

from caproto import ChannelType
from caproto.server import SubGroup, pvproperty

from calbench.iocs.base import InstrumentGroup, InstrumentIOC, command_pv, setting_pv, string_pv

RECONNECT_PERIOD_S = 3.0
MAX_INJECTED_FAULTS = 1000


class LinkFaultPVs(InstrumentGroup):
    """Fault injection on a simulated link (removed on hardware backends)."""

    garble_next = setting_pv("GarbleNext", ChannelType.LONG, low=0, high=MAX_INJECTED_FAULTS,
                             doc="simulation: the next N replies arrive garbled")
    timeout_next = setting_pv("TimeoutNext", ChannelType.LONG, low=0, high=MAX_INJECTED_FAULTS,
                              doc="simulation: the next N replies never arrive")
    absent = command_pv("Absent", "simulation: 1 = the instrument does not answer at all")
    identity = string_pv("Identity", read_only=False,
                         doc="simulation: identity the instrument reports ('' = its own)")

    def _faults(self):
        return self.parent.backend.sim.faults

    @garble_next.putter
    async def garble_next(self, instance, value):
        self._faults().garble_next = max(0, int(value))
        return max(0, int(value))

    @timeout_next.putter
    async def timeout_next(self, instance, value):
        self._faults().timeout_next = max(0, int(value))
        return max(0, int(value))

    @absent.putter
    async def absent(self, instance, value):
        self._faults().absent = bool(value)
        return int(bool(value))

    @identity.putter
    async def identity(self, instance, value):
        text = value if isinstance(value, str) else bytes(value).split(b"\0")[0].decode()
        self._faults().identity = text
        return text


class BenchInstrumentIOC(InstrumentIOC):
    """Base PVGroup of the bench instruments (backend: a driver from iocs/hw/)."""

    identity = string_pv("Identity_RBV", doc="the instrument's identification (*IDN? or help)")
    reconnect = command_pv("Reconnect", "1: close the link and open it again (after fixing a cable)")
    sim = SubGroup(LinkFaultPVs, prefix="Sim:")

    def __init__(self, *, prefix, backend, clock=None, **kwargs):
        super().__init__(prefix=prefix, backend=backend, clock=clock, **kwargs)
        if getattr(backend, "sim", None) is None:        # hardware: no fault injection PVs
            for name in list(self.pvdb):
                if name.startswith(prefix + "Sim:"):
                    del self.pvdb[name]
        self._last_attempt = 0.0

    async def run(self, func, *args):
        """Call a driver method on the instrument's worker thread (InstrumentIOC.call: refusals
        and faults published; a fault fails and counts only a put it happens in, not a poll),
        then show the link as up."""
        result = await self.call(func, *args)
        await self._connected_now()
        return result

    async def apply_setting(self, setting, value):
        """A table-declared setting (iocs/settings_table.py), then the link shown up (as `run`)."""
        await super().apply_setting(setting, value)
        await self._connected_now()

    async def _connected_now(self) -> None:
        if getattr(self.backend, "is_open", False):
            await self.publish(self.connected, 1)
            await self.publish(self.identity, self.backend.identity[:255])

    async def connect_backend(self) -> bool:
        """Open the link (at start-up, and every few seconds while disconnected)."""
        self._last_attempt = time.monotonic()
        try:
            await self.run(self.backend.open)
        except Exception:       # reported on StatusMessage_RBV by run()
            return False
        await self.report("")
        await self.after_connect()
        return True

    async def after_connect(self) -> None:
        """Hook: publish the instrument's state once it answers."""

    async def refresh(self) -> None:
        """Hook: read the instrument and publish its readbacks."""

    async def poll(self) -> None:
        """One period of a poll loop: keep the link up and, while connected, refresh the
        readbacks (a failure is reported on StatusMessage_RBV and tried again next period)."""
        if await self.keep_connected():
            try:
                await self.refresh()
            except Exception:       # reported by run(); the instrument may come back
                pass

    async def keep_connected(self) -> bool:
        """In a poll loop: True if connected; otherwise retry the link now and then."""
        await self.world_time.write(self.clock.now(), timestamp=self.clock.now())
        if self.connected.value and getattr(self.backend, "is_open", False):
            return True
        if time.monotonic() - self._last_attempt < RECONNECT_PERIOD_S:
            return False
        return await self.connect_backend()

    @reconnect.putter
    async def reconnect(self, instance, value):
        if value:
            await self.run(self.backend.reconnect)
            await self.report("")
            await self.after_connect()
        return 0
