"""XrayBoxIOC: the PSI X-ray box as EPICS PVs (setpoint / _RBV pairs, areaDetector style).

PVs (after the instrument prefix, e.g. CB:XRAY:):
  HV, HV_RBV (Off/On)             WarmupRemaining_RBV (s)
  Voltage, Voltage_RBV (kV)       Current, Current_RBV (mA)
  Target, Target_RBV (enum of the installed targets), TargetEnergy_RBV (keV), TargetMoving_RBV
  Shutter:XRF, Shutter:XRF_RBV, Shutter:Direct, Shutter:Direct_RBV (Closed/Open)
  Locked_RBV, Unlock, Lock        Safe_RBV (door may be opened), DoorOpen_RBV
  StatusMessage_RBV, Connected_RBV, WorldTime_RBV
  Lease:Take, Lease:Heartbeat, Lease:Release, Lease:State_RBV, ... (iocs/lease.py): when the
                                  holder's renewals stop, the IOC closes both shutters and switches
                                  the tube HV off; HV On and shutter Open are then refused until a
                                  lease is taken again
  Sim:DoorOpen, Sim:ShutterStuck  (simulated backend only: fault injection for tests and training)
"""
from __future__ import annotations

from caproto import ChannelType
from caproto.server import SubGroup, pvproperty

from calbench.iocs.base import InstrumentFault, InstrumentGroup, InstrumentIOC, command_pv, enum_pv
from calbench.iocs.lease import LeasePVs
from calbench.iocs.settings_table import DOUBLE, ENUM, Setting, settings_group
from calbench.contracts.xray import MAX_KV, MAX_MA, XRF_LINES_KEV

OFF_ON = ["Off", "On"]
CLOSED_OPEN = ["Closed", "Open"]
POLL_PERIOD_S = 0.1


def _on(value) -> bool:
    return value == "On"


def _open(value) -> bool:
    return value == "Open"


XRAYBOX_SETTINGS = (
    Setting("HV", "set_hv", ENUM, states=tuple(OFF_ON), convert=_on, hazard=("On", "HV On")),
    Setting("Voltage", "set_voltage", DOUBLE, low=0.0, high=MAX_KV, units="kV", precision=2),
    Setting("Current", "set_current", DOUBLE, low=0.0, high=MAX_MA, units="mA", precision=2),
    Setting("Target", "set_target", ENUM, states=tuple(XRF_LINES_KEV), value="Cu"),
    Setting("Shutter:XRF", "set_shutter", ENUM, states=tuple(CLOSED_OPEN), args=("XRF",),
            convert=_open, hazard=("Open", "XRF shutter Open"), attr="xrf_shutter"),
    Setting("Shutter:Direct", "set_shutter", ENUM, states=tuple(CLOSED_OPEN), args=("Direct",),
            convert=_open, hazard=("Open", "Direct shutter Open"), attr="direct_shutter"),
)


class _SimControls(InstrumentGroup):
    door_open = command_pv("DoorOpen", "simulation: 1 opens the box door (trips the HV)")
    shutter_stuck = command_pv("ShutterStuck", "simulation: 1 jams the XRF shutter closed")

    @door_open.putter
    async def door_open(self, instance, value):
        self.parent.backend.set_door(bool(value))
        return int(bool(value))

    @shutter_stuck.putter
    async def shutter_stuck(self, instance, value):
        self.parent.backend.shutter_stuck = bool(value)
        return int(bool(value))


class XrayBoxIOC(settings_group("XrayBoxSettings", XRAYBOX_SETTINGS, InstrumentIOC)):
    hv_rbv = enum_pv("HV_RBV", OFF_ON, read_only=True)
    warmup_remaining = pvproperty(name="WarmupRemaining_RBV", value=0.0, read_only=True,
                                  dtype=ChannelType.DOUBLE, precision=1, units="s")
    voltage_rbv = pvproperty(name="Voltage_RBV", value=0.0, read_only=True, dtype=ChannelType.DOUBLE,
                             precision=2, units="kV")
    current_rbv = pvproperty(name="Current_RBV", value=0.0, read_only=True, dtype=ChannelType.DOUBLE,
                             precision=2, units="mA")
    target_rbv = enum_pv("Target_RBV", list(XRF_LINES_KEV), "Cu", read_only=True)
    target_energy = pvproperty(name="TargetEnergy_RBV", value=XRF_LINES_KEV["Cu"], read_only=True,
                               dtype=ChannelType.DOUBLE, precision=3, units="keV")
    target_moving = pvproperty(name="TargetMoving_RBV", value=0, read_only=True, dtype=ChannelType.INT)
    xrf_shutter_rbv = enum_pv("Shutter:XRF_RBV", CLOSED_OPEN, read_only=True)
    direct_shutter_rbv = enum_pv("Shutter:Direct_RBV", CLOSED_OPEN, read_only=True)
    locked = pvproperty(name="Locked_RBV", value=0, read_only=True, dtype=ChannelType.INT)
    unlock = command_pv("Unlock", "1: take the box for this IOC (the box's client lock)")
    lock = command_pv("Lock", "1: give the box back (lock it for other clients)")
    safe = pvproperty(name="Safe_RBV", value=1, read_only=True, dtype=ChannelType.INT,
                      doc="1: HV off and shutters closed, the door may be opened")
    door_open = pvproperty(name="DoorOpen_RBV", value=0, read_only=True, dtype=ChannelType.INT)

    sim = SubGroup(_SimControls, prefix="Sim:")
    lease = SubGroup(LeasePVs, prefix="Lease:")

    def __init__(self, *, prefix, backend, clock=None, **kwargs):
        super().__init__(prefix=prefix, backend=backend, clock=clock, **kwargs)
        if not hasattr(backend, "set_door"):       # hardware: no fault injection PVs
            for name in list(self.pvdb):
                if name.startswith(prefix + "Sim:"):
                    del self.pvdb[name]

    @unlock.putter
    async def unlock(self, instance, value):
        if value:
            await self.call(self.backend.unlock)
        return 0

    @lock.putter
    async def lock(self, instance, value):
        if value:
            await self.call(self.backend.lock)
        return 0

    async def lease_lapsed(self) -> str:
        """Shutters closed and tube HV off (each tried even if another fails)."""
        failed = []
        backend = self.backend
        for what, action in (("close the XRF shutter", lambda: backend.set_shutter("XRF", False)),
                             ("close the Direct shutter",
                              lambda: backend.set_shutter("Direct", False)),
                             ("switch the tube HV off", lambda: backend.set_hv(False))):
            try:
                await self.worker.run(action)
            except Exception as exc:      # the others must still be done
                failed.append(f"could not {what}: {exc}")
        if failed:
            return "; ".join(failed) + "; make the box safe at its panel now"
        return "shutters closed and tube HV switched off"

    @hv_rbv.scan(period=POLL_PERIOD_S)
    async def hv_rbv(self, instance, async_lib):
        try:
            s = await self.worker.run(self.backend.read)
        except InstrumentFault as exc:
            await self.report(f"fault: {exc}")
            await self.heartbeat(False)
            return
        await self.heartbeat(True)
        await self.publish(instance, OFF_ON[int(s.hv_on)])
        await self.publish(self.warmup_remaining, round(s.warmup_remaining_s, 1))
        await self.publish(self.voltage_rbv, round(s.voltage_kV, 3))
        await self.publish(self.current_rbv, round(s.current_mA, 3))
        await self.publish(self.target_rbv, s.target)
        await self.publish(self.target_energy, XRF_LINES_KEV[s.target])
        await self.publish(self.target_moving, int(s.target_moving))
        await self.publish(self.xrf_shutter_rbv, CLOSED_OPEN[int(s.shutters["XRF"])])
        await self.publish(self.direct_shutter_rbv, CLOSED_OPEN[int(s.shutters["Direct"])])
        await self.publish(self.locked, int(s.locked))
        await self.publish(self.safe, int(s.safe))
        await self.publish(self.door_open, int(s.door_open))
