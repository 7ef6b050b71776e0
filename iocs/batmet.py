"""BatmetIOC: the BatMet's current sink and ADC (serial text protocol) as EPICS PVs.

PVs (after the instrument prefix, e.g. CB:BATMET:):
  DAC, DAC_RBV                    raw sink DAC code 0..4095 (`d <code>`)
  Sink, Sink_RBV                  sink current (A) through the stored calibration (`sink <A>`);
                                  refused when not calibrated or outside the calibrated range
  CalMin, CalMax, CalA, CalB, CalC  a calibration to store: DAC = a*I^2 + b*I + c on CalMin..CalMax A
  CalWrite                        1: send `csink CalMin CalMax CalA CalB CalC`
  Calibration_RBV                 the csink line last stored through this IOC
  AdcExt_RBV, AdcSupply_RBV, AdcSense_RBV   ADC channels EXT, PSUPPLY, SENS (V), from `a`
  Update                          1: read the ADC now
  Identity_RBV, Reconnect, StatusMessage_RBV, Refusals_RBV, Connected_RBV, WorldTime_RBV
  Sim:GarbleNext, Sim:TimeoutNext, Sim:Absent, Sim:Identity   (simulated backend only)
  Lease:Take, Lease:Heartbeat, Lease:Release, Lease:State_RBV, ... (iocs/lease.py): when the
                                  holder's renewals stop the IOC sets the DAC to 0; a DAC or sink
                                  above 0 is then refused until a lease is taken again
"""
from __future__ import annotations

from caproto import ChannelType
from caproto.server import SubGroup, pvproperty

from calbench.iocs.base import command_pv, setting_pv, string_pv
from calbench.iocs.bench_ioc import BenchInstrumentIOC
from calbench.contracts.batmet import DAC_MAX
from calbench.iocs.lease import LeasePVs

POLL_PERIOD_S = 1.0
MAX_SINK_A = 4.0            # the sink's design range (and the calibration's default CalMax)
MAX_COEFFICIENT = 1e5       # DAC codes per A (per A^2): far beyond any real sink's


class BatmetIOC(BenchInstrumentIOC):
    dac = setting_pv("DAC", ChannelType.LONG, low=0, high=DAC_MAX, doc="raw DAC code")
    dac_rbv = pvproperty(name="DAC_RBV", value=0, read_only=True, dtype=ChannelType.INT)
    sink = setting_pv("Sink", low=0.0, high=MAX_SINK_A, units="A", precision=6,
                      doc="sink current through the stored calibration")
    sink_rbv = pvproperty(name="Sink_RBV", value=0.0, read_only=True, dtype=ChannelType.DOUBLE,
                          precision=6, units="A")
    cal_min = setting_pv("CalMin", low=0.0, high=MAX_SINK_A, units="A", precision=3)
    cal_max = setting_pv("CalMax", low=0.0, high=MAX_SINK_A, value=MAX_SINK_A, units="A",
                         precision=3)
    cal_a = setting_pv("CalA", low=-MAX_COEFFICIENT, high=MAX_COEFFICIENT, units="1/A^2",
                       precision=6, doc="DAC = a*I^2 + b*I + c")
    cal_b = setting_pv("CalB", low=-MAX_COEFFICIENT, high=MAX_COEFFICIENT, units="1/A",
                       precision=6)
    cal_c = setting_pv("CalC", low=-DAC_MAX, high=DAC_MAX, precision=6)
    cal_write = command_pv("CalWrite", "1: store CalMin CalMax CalA CalB CalC in the BatMet (csink)")
    calibration = string_pv("Calibration_RBV", doc="the csink line last stored")
    adc_ext = pvproperty(name="AdcExt_RBV", value=0.0, read_only=True, dtype=ChannelType.DOUBLE,
                         precision=4, units="V")
    adc_supply = pvproperty(name="AdcSupply_RBV", value=0.0, read_only=True,
                            dtype=ChannelType.DOUBLE, precision=4, units="V")
    adc_sense = pvproperty(name="AdcSense_RBV", value=0.0, read_only=True,
                           dtype=ChannelType.DOUBLE, precision=4, units="V")
    update = command_pv("Update", "1: read the ADC now")
    lease = SubGroup(LeasePVs, prefix="Lease:")

    async def refresh(self) -> None:
        adc = await self.run(self.backend.read_adc)
        await self.publish(self.adc_ext, adc["EXT"])
        await self.publish(self.adc_supply, adc["PSUPPLY"])
        await self.publish(self.adc_sense, adc["SENS"])

    async def after_connect(self) -> None:
        await self.publish(self.dac_rbv, int(self.backend.dac))

    @dac.putter
    async def dac(self, instance, value):
        if value > 0:
            await self.require_lease(f"DAC {value}")
        code = await self.run(self.backend.set_dac, int(value))
        await self.publish(self.dac_rbv, code)
        return code

    @sink.putter
    async def sink(self, instance, value):
        if value > 0:
            await self.require_lease(f"sink {value} A")
        code = await self.run(self.backend.sink, float(value))
        await self.publish(self.sink_rbv, float(value))
        if code >= 0:
            await self.publish(self.dac_rbv, code)
        return value

    @cal_write.putter
    async def cal_write(self, instance, value):
        if value:
            line = await self.run(self.backend.write_calibration, self.cal_min.value,
                                  self.cal_max.value, self.cal_a.value, self.cal_b.value,
                                  self.cal_c.value)
            await self.publish(self.calibration, line)
        return 0

    @update.putter
    async def update(self, instance, value):
        if value:
            await self.refresh()
        return 0

    async def lease_lapsed(self) -> str:
        try:
            code = await self.run(self.backend.set_dac, 0)
        except Exception as exc:      # reported by run(); the operator must act
            return f"COULD NOT set the DAC to 0: {exc}; unplug the BatMet's supply now"
        await self.publish(self.dac_rbv, code)
        return "DAC set to 0 (no sink current)"

    @adc_sense.scan(period=POLL_PERIOD_S)
    async def adc_sense(self, instance, async_lib):
        await self.poll()

    def make_safe(self) -> None:
        """No sink current: DAC 0."""
        self.backend.make_safe()
