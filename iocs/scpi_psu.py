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
"""
from __future__ import annotations

from caproto import ChannelType
from caproto.server import pvproperty

from calbench.iocs.base import enum_pv
from calbench.iocs.bench_ioc import BenchInstrumentIOC

OFF_ON = ["Off", "On"]
MODES = ["Off", "CV", "CC"]
POLL_PERIOD_S = 0.5


class ScpiPsuIOC(BenchInstrumentIOC):
    voltage = pvproperty(name="Voltage", value=0.0, dtype=ChannelType.DOUBLE, precision=4,
                         units="V")
    voltage_rbv = pvproperty(name="Voltage_RBV", value=0.0, read_only=True,
                             dtype=ChannelType.DOUBLE, precision=4, units="V")
    current_limit = pvproperty(name="CurrentLimit", value=0.0, dtype=ChannelType.DOUBLE,
                               precision=4, units="A")
    current_limit_rbv = pvproperty(name="CurrentLimit_RBV", value=0.0, read_only=True,
                                   dtype=ChannelType.DOUBLE, precision=4, units="A")
    output = enum_pv("Output", OFF_ON)
    output_rbv = enum_pv("Output_RBV", OFF_ON, read_only=True)
    voltage_meas = pvproperty(name="VoltageMeas_RBV", value=0.0, read_only=True,
                              dtype=ChannelType.DOUBLE, precision=4, units="V")
    current_meas = pvproperty(name="CurrentMeas_RBV", value=0.0, read_only=True,
                              dtype=ChannelType.DOUBLE, precision=4, units="A")
    mode = enum_pv("Mode_RBV", MODES, read_only=True)
    over_current = pvproperty(name="OverCurrent_RBV", value=0, read_only=True,
                              dtype=ChannelType.INT)
    update = pvproperty(name="Update", value=0, dtype=ChannelType.INT,
                        doc="1: read the supply now; completes when the readbacks are published")

    async def refresh(self, *, put: bool = True) -> None:
        r = await self.run(self.backend.read, put=put)
        await self.publish(self.voltage_rbv, r.voltage_setpoint_V)
        await self.publish(self.current_limit_rbv, r.current_limit_A)
        await self.publish(self.output_rbv, OFF_ON[int(r.output_on)])
        await self.publish(self.voltage_meas, r.voltage_V)
        await self.publish(self.current_meas, r.current_A)
        await self.publish(self.mode, r.mode)
        await self.publish(self.over_current, int(r.over_current))

    async def after_connect(self) -> None:
        await self.refresh(put=False)

    @voltage.putter
    async def voltage(self, instance, value):
        await self.run(self.backend.set_voltage, float(value))
        await self.refresh()
        return value

    @current_limit.putter
    async def current_limit(self, instance, value):
        await self.run(self.backend.set_current_limit, float(value))
        await self.refresh()
        return value

    @output.putter
    async def output(self, instance, value):
        await self.run(self.backend.set_output, value == "On")
        await self.refresh()
        return value

    @update.putter
    async def update(self, instance, value):
        if value:
            await self.refresh()
        return 0

    @over_current.scan(period=POLL_PERIOD_S)
    async def over_current(self, instance, async_lib):
        await self.poll()

    def make_safe(self) -> None:
        """Output off."""
        self.backend.make_safe()
