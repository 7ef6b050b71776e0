"""FeeIOC: the Daya Bay FEE board in calibration mode as EPICS PVs.

PVs (after the instrument prefix, e.g. CB:FEE:):
  CalDAC, CalDAC_RBV              calibration DAC register (0..65535)
  CalCharge_RBV                   direct-pulse charge of that register (pC, 0..1834)
  Fire                            put 1: one calibration pulse on the enabled channels
  ChannelMask, ChannelMask_RBV    channels the calibration pulses go to (bit c = channel c)
  Seq:Start, Seq:Stop, Seq:Step   the sequencer's register range (inclusive) and step
  Seq:Acquire                     put 1: start a sweep; put 0: stop it
  Seq:Busy_RBV                    1 while the sequencer runs
  Seq:Progress_RBV, Seq:NumPulses_RBV   pulses done / in the sweep
  Seq:Count_RBV                   number of sweeps whose results have been published
  Seq:StartTime_RBV, Seq:PulsePeriod_RBV, Seq:Temperature_RBV, Seq:Complete_RBV
  Seq:Register_RBV                register of every pulse of the last sweep (waveform)
  Temperature_RBV                 cable temperature now (degC)
  TdcLsb_RBV (ns), AdcLsb_RBV (pC)
  ChNN:Threshold                  discriminator threshold (mV), NN = 00..15
  ChNN:DirectCharge_RBV, ChNN:DirectTime_RBV, ChNN:ReflectedCharge_RBV, ChNN:ReflectedTime_RBV
                                  the last single pulse (pC, ns; NaN: the discriminator did not fire)
  ChNN:Seq:DirectCharge_RBV, ...:DirectTime_RBV, ...:ReflectedCharge_RBV, ...:ReflectedTime_RBV
                                  per-pulse results of the last sweep (waveforms; empty for channels
                                  not in the mask)
  StatusMessage_RBV, Refusals_RBV, Connected_RBV, WorldTime_RBV
  Sim:CableLength (16 lengths, m; 0 = no cable), Sim:MeanTemperature (degC), Sim:DailySwing (K)
                                  (simulated backend only)

A sweep's waveforms are written before Seq:Busy_RBV drops to 0 and Seq:Count_RBV increments, so a
client that sees the count change reads complete data.
"""
from __future__ import annotations

import math

import numpy as np
from caproto import ChannelType
from caproto.server import SubGroup, pvproperty

from calbench.contracts.fee import (ADC_FINE_LSB_PC, DAC_FULL_SCALE_PC, DAC_MAX, MAX_SWEEP_PULSES,
                                    N_CHANNELS, TDC_LSB_NS, THRESHOLD_RANGE_MV)
from calbench.iocs.base import (InstrumentFault, InstrumentGroup, InstrumentIOC, command_pv, enum_pv,
                                setting_pv)
from calbench.iocs.settings_table import DOUBLE, Setting, settings_group

POLL_PERIOD_S = 0.05
MAX_CABLE_M = 2000.0
ACQUIRE = ["Done", "Acquire"]


def _waveform(name: str, doc: str, dtype=ChannelType.DOUBLE):
    return pvproperty(name=name, value=[], dtype=dtype, max_length=MAX_SWEEP_PULSES, read_only=True,
                      max_subscription_backlog=4, doc=doc)


def _scalar_rbv(name: str, units: str, doc: str = ""):
    return pvproperty(name=name, value=math.nan, dtype=ChannelType.DOUBLE, read_only=True,
                      precision=4, units=units, doc=doc)


class _ChannelSweep(InstrumentGroup):
    direct_charge = _waveform("DirectCharge_RBV", "direct-pulse charge of each pulse, pC")
    direct_time = _waveform("DirectTime_RBV", "direct-pulse TDC time of each pulse, ns")
    reflected_charge = _waveform("ReflectedCharge_RBV", "reflected-pulse charge of each pulse, pC")
    reflected_time = _waveform("ReflectedTime_RBV", "reflected-pulse TDC time of each pulse, ns")


CHANNEL_SETTINGS = (
    Setting("Threshold", "set_threshold", DOUBLE, low=THRESHOLD_RANGE_MV[0],
            high=THRESHOLD_RANGE_MV[1], units="mV", precision=3,
            doc="leading-edge discriminator threshold"),
)


class _Channel(settings_group("FeeChannelSettings", CHANNEL_SETTINGS)):
    direct_charge = _scalar_rbv("DirectCharge_RBV", "pC", "last single pulse")
    direct_time = _scalar_rbv("DirectTime_RBV", "ns")
    reflected_charge = _scalar_rbv("ReflectedCharge_RBV", "pC")
    reflected_time = _scalar_rbv("ReflectedTime_RBV", "ns")
    sweep = SubGroup(_ChannelSweep, prefix="Seq:")

    @property
    def channel(self) -> int:
        return int(self.prefix.rstrip(":").rsplit("Ch", 1)[1])

    async def apply_setting(self, setting, value):
        """backend.<call>(channel, value) for this channel."""
        ioc = self.parent
        await ioc.call(setting.bind(ioc.backend, value, self.channel))


class _SimControls(InstrumentGroup):
    cable_length = setting_pv("CableLength", low=0.0, high=MAX_CABLE_M, value=[0.0] * N_CHANNELS,
                              max_length=N_CHANNELS, units="m",
                              doc="simulation: RG58 length on each channel, 0 = nothing connected")
    mean_temperature = setting_pv("MeanTemperature", low=-40.0, high=80.0, value=20.0, units="degC",
                                  doc="simulation: mean cable temperature")
    daily_swing = setting_pv("DailySwing", low=0.0, high=40.0, units="K",
                             doc="simulation: amplitude of the daily temperature cycle")

    @cable_length.putter
    async def cable_length(self, instance, value):
        lengths = np.asarray(value, dtype=float)
        if lengths.size != N_CHANNELS:
            raise ValueError(f"Sim:CableLength takes {N_CHANNELS} lengths, got {lengths.size}")
        for channel, length in enumerate(lengths):
            await self.parent.call(self.parent.backend.set_cable_length, channel, float(length))
        return lengths

    @mean_temperature.putter
    async def mean_temperature(self, instance, value):
        self.parent.backend.environment.mean_C = float(value)
        return value

    @daily_swing.putter
    async def daily_swing(self, instance, value):
        self.parent.backend.environment.daily_swing_K = float(value)
        return value


class FeeIOC(InstrumentIOC):
    cal_dac = setting_pv("CalDAC", ChannelType.LONG, low=0, high=DAC_MAX,
                         doc="calibration DAC register")
    cal_dac_rbv = pvproperty(name="CalDAC_RBV", value=0, dtype=ChannelType.LONG, read_only=True)
    cal_charge = pvproperty(name="CalCharge_RBV", value=0.0, dtype=ChannelType.DOUBLE, read_only=True,
                            precision=3, units="pC")
    fire = command_pv("Fire", "put 1: one calibration pulse at CalDAC on the enabled channels")
    channel_mask = setting_pv("ChannelMask", ChannelType.LONG, low=1, high=(1 << N_CHANNELS) - 1,
                              value=(1 << N_CHANNELS) - 1, doc="bit c enables channel c")
    channel_mask_rbv = pvproperty(name="ChannelMask_RBV", value=(1 << N_CHANNELS) - 1,
                                  dtype=ChannelType.LONG, read_only=True)
    seq_start = setting_pv("Seq:Start", ChannelType.LONG, low=0, high=DAC_MAX, value=500)
    seq_stop = setting_pv("Seq:Stop", ChannelType.LONG, low=0, high=DAC_MAX, value=12000)
    seq_step = setting_pv("Seq:Step", ChannelType.LONG, low=1, high=DAC_MAX, value=1)
    seq_acquire = enum_pv("Seq:Acquire", ACQUIRE)
    seq_busy = pvproperty(name="Seq:Busy_RBV", value=0, dtype=ChannelType.LONG, read_only=True)
    seq_progress = pvproperty(name="Seq:Progress_RBV", value=0, dtype=ChannelType.LONG,
                              read_only=True)
    seq_num_pulses = pvproperty(name="Seq:NumPulses_RBV", value=0, dtype=ChannelType.LONG,
                                read_only=True)
    seq_count = pvproperty(name="Seq:Count_RBV", value=0, dtype=ChannelType.LONG, read_only=True,
                           doc="sweeps whose results are published")
    seq_start_time = pvproperty(name="Seq:StartTime_RBV", value=0.0, dtype=ChannelType.DOUBLE,
                                read_only=True, precision=3, units="s")
    seq_period = pvproperty(name="Seq:PulsePeriod_RBV", value=0.0, dtype=ChannelType.DOUBLE,
                            read_only=True, precision=9, units="s")
    seq_temperature = pvproperty(name="Seq:Temperature_RBV", value=math.nan,
                                 dtype=ChannelType.DOUBLE, read_only=True, precision=3, units="degC")
    seq_complete = pvproperty(name="Seq:Complete_RBV", value=0, dtype=ChannelType.LONG,
                              read_only=True, doc="1: the last sweep ran to its end")
    seq_registers = _waveform("Seq:Register_RBV", "DAC register of each pulse", ChannelType.LONG)
    temperature = pvproperty(name="Temperature_RBV", value=math.nan, dtype=ChannelType.DOUBLE,
                             read_only=True, precision=3, units="degC")
    tdc_lsb = pvproperty(name="TdcLsb_RBV", value=TDC_LSB_NS, dtype=ChannelType.DOUBLE,
                         read_only=True, precision=4, units="ns")
    adc_lsb = pvproperty(name="AdcLsb_RBV", value=ADC_FINE_LSB_PC, dtype=ChannelType.DOUBLE,
                         read_only=True, precision=3, units="pC")

    for _c in range(N_CHANNELS):
        locals()[f"ch{_c:02d}"] = SubGroup(_Channel, prefix=f"Ch{_c:02d}:")
    del _c

    sim = SubGroup(_SimControls, prefix="Sim:")

    def __init__(self, *, prefix, backend, clock=None, **kwargs):
        super().__init__(prefix=prefix, backend=backend, clock=clock, **kwargs)
        self._published_sweeps = 0
        self._sweep_running = False
        self.channels = [getattr(self, f"ch{c:02d}") for c in range(N_CHANNELS)]
        if not hasattr(backend, "set_cable_length"):         # hardware: no simulation PVs
            for name in list(self.pvdb):
                if name.startswith(prefix + "Sim:"):
                    del self.pvdb[name]

    # -- start-up: readbacks that reflect the backend's state -------------------------------------
    @cal_dac_rbv.startup
    async def cal_dac_rbv(self, instance, async_lib):
        for channel in self.channels:
            await channel.threshold.write(float(self.backend.thresholds_mV[channel.channel]))
        await self.seq_start.write(self.backend.seq_start)
        await self.seq_stop.write(self.backend.seq_stop)
        await self.seq_step.write(self.backend.seq_step)
        await self.channel_mask.write(self.backend.channel_mask)
        if hasattr(self.backend, "cables"):
            await self.sim.cable_length.write([c.length_m for c in self.backend.cables])
            await self.sim.mean_temperature.write(self.backend.environment.mean_C)
            await self.sim.daily_swing.write(self.backend.environment.daily_swing_K)

    # -- puts ------------------------------------------------------------------------------------
    @cal_dac.putter
    async def cal_dac(self, instance, value):
        await self.call(self.backend.set_register, int(value))
        await self.publish(self.cal_dac_rbv, int(value))
        await self.publish(self.cal_charge, int(value) * DAC_FULL_SCALE_PC / DAC_MAX)
        return value

    @fire.putter
    async def fire(self, instance, value):
        if value:
            results = await self.call(self.backend.fire)
            for channel, values in results.items():
                ch = self.channels[channel]
                for pv, v in zip((ch.direct_charge, ch.direct_time, ch.reflected_charge,
                                  ch.reflected_time), values):
                    await self.publish(pv, float(v), force=True)
        return 0

    @channel_mask.putter
    async def channel_mask(self, instance, value):
        await self.call(self.backend.set_channel_mask, int(value))
        await self.publish(self.channel_mask_rbv, int(value))
        return value

    @seq_start.putter
    async def seq_start(self, instance, value):
        b = self.backend
        await self.call(b.set_sweep_range, int(value), b.seq_stop, b.seq_step)
        return value

    @seq_stop.putter
    async def seq_stop(self, instance, value):
        b = self.backend
        await self.call(b.set_sweep_range, b.seq_start, int(value), b.seq_step)
        return value

    @seq_step.putter
    async def seq_step(self, instance, value):
        b = self.backend
        await self.call(b.set_sweep_range, b.seq_start, b.seq_stop, int(value))
        return value

    @seq_acquire.putter
    async def seq_acquire(self, instance, value):
        if value == "Acquire":
            n = await self.call(self.backend.start_sweep)
            self._sweep_running = True
            await self.publish(self.seq_num_pulses, int(n))
            await self.publish(self.seq_progress, 0)
            await self.publish(self.seq_busy, 1)
            return value
        await self.call(self.backend.stop_sweep)
        return value

    # -- poll: progress, end of sweep, temperature, heartbeat --------------------------------------
    @seq_busy.scan(period=POLL_PERIOD_S)
    async def seq_busy(self, instance, async_lib):
        try:       # on the board's worker thread, as every backend call
            (busy, done, total), temperature = await self.worker.run(self._status)
        except InstrumentFault as exc:
            await self.report(f"fault: {exc}")
            await self.heartbeat(False)
            return
        await self.heartbeat(True)
        await self.publish(self.temperature, round(float(temperature), 4))
        await self.publish(self.seq_progress, int(done))
        if self._sweep_running and not busy:
            await self._publish_sweep()
            self._sweep_running = False
            await self.publish(self.seq_acquire, "Done")
            await self.publish(instance, 0)
            await self.seq_count.write(self.seq_count.value + 1, timestamp=self.clock.now())

    def _status(self):
        return self.backend.sweep_status(), self.backend.temperature_C()

    async def _publish_sweep(self) -> None:
        result = await self.worker.run(self.backend.sweep_result)
        if result is None:
            return
        ts = float(result.pulse_times[0]) if len(result.pulse_times) else self.clock.now()
        await self.seq_registers.write(result.registers.astype(np.int32), timestamp=ts)
        empty = np.zeros(0)
        for ch in self.channels:
            r = result.channels.get(ch.channel)
            arrays = ((empty,) * 4 if r is None else
                      (r.direct_charge_pC, r.direct_time_ns, r.reflected_charge_pC,
                       r.reflected_time_ns))
            sweep = ch.sweep
            for pv, arr in zip((sweep.direct_charge, sweep.direct_time, sweep.reflected_charge,
                                sweep.reflected_time), arrays):
                await pv.write(np.asarray(arr, dtype=float), timestamp=ts)
        await self.seq_start_time.write(float(result.pulse_times[0]) if len(result.pulse_times)
                                        else math.nan, timestamp=ts)
        await self.seq_period.write(float(result.period_s), timestamp=ts)
        await self.seq_temperature.write(float(result.temperature_C), timestamp=ts)
        await self.seq_complete.write(int(result.complete), timestamp=ts)
        if not result.complete:
            await self.report(f"sweep stopped after {len(result.registers)} pulses")
