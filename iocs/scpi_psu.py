"""ScpiPsuIOC: a single-output SCPI lab supply (E3632A command set) as EPICS PVs.

PVs (after the instrument prefix, e.g. CB:PSU:):
  Voltage, Voltage_RBV            voltage setpoint (V) and its readback from the supply
  CurrentLimit, CurrentLimit_RBV  current limit (A)
  Output, Output_RBV              Off | On
  VoltageMeas_RBV, CurrentMeas_RBV  measured output voltage (V) and current (A)
  Mode_RBV                        Off | CV | CC (CC: the supply is clamping the current)
  OverCurrent_RBV                 1 while the current is clamped at the limit
  Update                          1: read everything now (the put completes when the readbacks are in)
  Identity_RBV, Reconnect, StatusMessage_RBV, Refusals_RBV, Connected_RBV, WorldTime_RBV
  Sim:GarbleNext, Sim:TimeoutNext, Sim:Absent, Sim:Identity   (simulated backend only)
  Lease:Take, Lease:Heartbeat, Lease:Release, Lease:State_RBV, ... (iocs/lease.py): when the
                                  holder's renewals stop the IOC switches the output off if it was
                                  switched on under the lease; Output On is then refused until a
                                  lease is taken again
"""
from __future__ import annotations

from caproto import ChannelType
from caproto.server import SubGroup, pvproperty

from calbench.iocs.base import command_pv, enum_pv, set_limits
from calbench.iocs.bench_ioc import BenchInstrumentIOC
from calbench.contracts.bench_instruments import SUPPLY_MAX_A, SUPPLY_MAX_V
from calbench.iocs.lease import LeasePVs
from calbench.iocs.settings_table import DOUBLE, ENUM, Setting, settings_group

OFF_ON = ["Off", "On"]
MODES = ["Off", "CV", "CC"]
POLL_PERIOD_S = 0.5
DEFAULT_MAX_V = SUPPLY_MAX_V
DEFAULT_MAX_A = SUPPLY_MAX_A


def _on(value) -> bool:
    return value == "On"


# the lab file narrows Voltage and CurrentLimit to this supply's maxima (ScpiPsuIOC.__init__)
PSU_SETTINGS = (
    Setting("Voltage", "set_voltage", DOUBLE, low=0.0, high=DEFAULT_MAX_V, units="V",
            precision=4),
    Setting("CurrentLimit", "set_current_limit", DOUBLE, low=0.0, high=DEFAULT_MAX_A, units="A",
            precision=4),
    Setting("Output", "set_output", ENUM, states=tuple(OFF_ON), convert=_on,
            hazard=("On", "Output On")),
)


class ScpiPsuIOC(settings_group("PsuSettings", PSU_SETTINGS, BenchInstrumentIOC)):
    voltage_rbv = pvproperty(name="Voltage_RBV", value=0.0, read_only=True,
                             dtype=ChannelType.DOUBLE, precision=4, units="V")
    current_limit_rbv = pvproperty(name="CurrentLimit_RBV", value=0.0, read_only=True,
                                   dtype=ChannelType.DOUBLE, precision=4, units="A")
    output_rbv = enum_pv("Output_RBV", OFF_ON, read_only=True)
    voltage_meas = pvproperty(name="VoltageMeas_RBV", value=0.0, read_only=True,
                              dtype=ChannelType.DOUBLE, precision=4, units="V")
    current_meas = pvproperty(name="CurrentMeas_RBV", value=0.0, read_only=True,
                              dtype=ChannelType.DOUBLE, precision=4, units="A")
    mode = enum_pv("Mode_RBV", MODES, read_only=True)
    over_current = pvproperty(name="OverCurrent_RBV", value=0, read_only=True,
                              dtype=ChannelType.INT)
    update = command_pv("Update", "1: read the supply now; completes when the readbacks are published")
    lease = SubGroup(LeasePVs, prefix="Lease:")
    _on_before_lease = False

    def __init__(self, *, prefix, backend, clock=None, **kwargs):
        super().__init__(prefix=prefix, backend=backend, clock=clock, **kwargs)
        # the lab file sets this supply's maxima (max_voltage_V, max_current_A)
        set_limits(self.voltage, 0.0, float(getattr(backend, "max_voltage_V", DEFAULT_MAX_V)))
        set_limits(self.current_limit, 0.0, float(getattr(backend, "max_current_A", DEFAULT_MAX_A)))

    async def refresh(self) -> None:
        r = await self.run(self.backend.read)
        await self.publish(self.voltage_rbv, r.voltage_setpoint_V)
        await self.publish(self.current_limit_rbv, r.current_limit_A)
        await self.publish(self.output_rbv, OFF_ON[int(r.output_on)])
        await self.publish(self.voltage_meas, r.voltage_V)
        await self.publish(self.current_meas, r.current_A)
        await self.publish(self.mode, r.mode)
        await self.publish(self.over_current, int(r.over_current))

    async def after_connect(self) -> None:
        await self.refresh()

    async def apply_setting(self, setting, value):
        """A setting of the table, then every readback (the supply may clamp or trip)."""
        await super().apply_setting(setting, value)
        await self.refresh()

    @update.putter
    async def update(self, instance, value):
        if value:
            await self.refresh()
        return 0

    async def lease_taken(self) -> None:
        self._on_before_lease = self.output_rbv.value == "On"

    async def lease_lapsed(self) -> str:
        if self._on_before_lease:
            return "the output was on before the lease was taken and stays on"
        try:
            await self.run(self.backend.set_output, False)
            await self.refresh()
        except Exception as exc:      # reported by run(); the operator must act
            return f"COULD NOT switch the output off: {exc}; switch it off at the supply now"
        return "output switched off"

    @over_current.scan(period=POLL_PERIOD_S)
    async def over_current(self, instance, async_lib):
        await self.poll()

    def make_safe(self) -> None:
        """Output off."""
        self.backend.make_safe()
