"""Multimeter34401aIOC: an HP/Agilent 34401A (SCPI over RS-232) as EPICS PVs.

PVs (after the instrument prefix, e.g. CB:DMM:):
  Function, Function_RBV      CURR:DC | VOLT:DC
  Range, Range_RBV            requested range (A or V; 0 = autorange) / range in use after a reading
  NPLC, NPLC_RBV              integration time in power-line cycles (0.02, 0.2, 1, 10, 100)
  Samples                     readings averaged per Measure (1..100)
  Measure                     1: take Samples readings (READ?); the put completes when they are in
  Reading_RBV                 their mean (A or V); ReadingStd_RBV their standard deviation
  ReadingCount_RBV            measurements completed (changes once per Measure)
  DisplayText                 front-panel text, up to 12 characters
  DisplayClear                1: clear the front-panel text (the normal display returns)
  Remote, Remote_RBV          Local | Remote (SYSTEM:LOCAL / SYSTEM:REMOTE)
  ClearStatus                 1: read out and clear the error queue (*CLS)
  Identity_RBV, Reconnect, StatusMessage_RBV, Refusals_RBV, Connected_RBV, WorldTime_RBV
  Sim:GarbleNext, Sim:TimeoutNext, Sim:Absent, Sim:Identity   (simulated backend only)
"""
from __future__ import annotations

import numpy as np
from caproto import ChannelType
from caproto.server import pvproperty

from calbench.iocs.base import Refused, command_pv, enum_pv, setting_pv, string_pv
from calbench.iocs.bench_ioc import BenchInstrumentIOC
from calbench.contracts.bench_instruments import DISPLAY_CHARS, FUNCTIONS, MAX_SAMPLES, NPLC_VALUES, VOLTAGE_RANGES_V
from calbench.iocs.settings_table import DOUBLE, ENUM, Setting, settings_group

LOCAL_REMOTE = ["Local", "Remote"]
POLL_PERIOD_S = 0.5


# the meter's configuration, each through configure(function=, range_=, nplc=)
DMM_SETTINGS = (
    Setting("Function", "configure", ENUM, states=FUNCTIONS, keyword="function"),
    Setting("Range", "configure", DOUBLE, low=0.0, high=max(VOLTAGE_RANGES_V), precision=3,
            keyword="range_", attr="range_setpoint", doc="requested range, A or V; 0 = autorange"),
    Setting("NPLC", "configure", DOUBLE, low=min(NPLC_VALUES), high=max(NPLC_VALUES), value=10.0,
            precision=2, keyword="nplc",
            doc=f"power-line cycles per reading: {', '.join(f'{n:g}' for n in NPLC_VALUES)}"),
)


def _check_samples(count: int) -> int:
    if not 1 <= count <= MAX_SAMPLES:
        raise Refused(f"{count} samples per measurement; use 1..{MAX_SAMPLES}")
    return count


_MultimeterSettings = settings_group("MultimeterSettings", DMM_SETTINGS, BenchInstrumentIOC)


class Multimeter34401aIOC(_MultimeterSettings):
    function_rbv = enum_pv("Function_RBV", list(FUNCTIONS), read_only=True)
    range_rbv = pvproperty(name="Range_RBV", value=0.0, read_only=True, dtype=ChannelType.DOUBLE,
                           precision=3, doc="range in use at the last reading")
    nplc_rbv = pvproperty(name="NPLC_RBV", value=10.0, read_only=True, dtype=ChannelType.DOUBLE,
                          precision=2)
    samples = setting_pv("Samples", ChannelType.LONG, low=1, high=MAX_SAMPLES, value=1,
                         doc="readings averaged per Measure")
    measure = command_pv("Measure", "1: measure; the put completes when Reading_RBV is updated")
    reading = pvproperty(name="Reading_RBV", value=0.0, read_only=True, dtype=ChannelType.DOUBLE,
                         precision=9)
    reading_std = pvproperty(name="ReadingStd_RBV", value=0.0, read_only=True,
                             dtype=ChannelType.DOUBLE, precision=9)
    reading_count = pvproperty(name="ReadingCount_RBV", value=0, read_only=True,
                               dtype=ChannelType.INT)
    display_text = string_pv("DisplayText", read_only=False, max_length=40,
                             max_chars=DISPLAY_CHARS, doc="front-panel text (12 characters)")
    display_clear = command_pv("DisplayClear", "1: clear the front-panel text")
    remote = enum_pv("Remote", LOCAL_REMOTE)
    remote_rbv = enum_pv("Remote_RBV", LOCAL_REMOTE, read_only=True)
    clear_status = command_pv("ClearStatus", "1: read out and clear the error queue (*CLS)")

    async def after_connect(self) -> None:
        # open() configured the meter and put it in remote
        await self.publish(self.function_rbv, self.backend.function)
        await self.publish(self.nplc_rbv, float(self.backend.nplc))
        await self.publish(self.remote_rbv, "Remote")

    async def apply_setting(self, setting, value):
        """Function, Range or NPLC through configure, then what the meter now uses."""
        await super().apply_setting(setting, value)
        await self.publish(self.function_rbv, self.backend.function)
        await self.publish(self.nplc_rbv, float(self.backend.nplc))

    @samples.putter
    async def samples(self, instance, value):
        await self.check(_check_samples, int(value))
        return int(value)

    @measure.putter
    async def measure(self, instance, value):
        if not value:
            return 0
        values = await self.run(self.backend.read_samples, int(self.samples.value))
        in_use = await self.run(self.backend.range_in_use)
        now = self.clock.now()
        await self.reading.write(float(np.mean(values)), timestamp=now)
        await self.reading_std.write(float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                                     timestamp=now)
        await self.publish(self.range_rbv, float(in_use))
        await self.reading_count.write(self.reading_count.value + 1, timestamp=now)
        return 0

    @display_text.putter
    async def display_text(self, instance, value):
        text = value if isinstance(value, str) else bytes(value).split(b"\0")[0].decode()
        await self.run(self.backend.display, text)
        return text

    @display_clear.putter
    async def display_clear(self, instance, value):
        if value:
            await self.run(self.backend.display, "")
            await self.publish(self.display_text, "")
        return 0

    @remote.putter
    async def remote(self, instance, value):
        await self.run(self.backend.set_remote, value == "Remote")
        await self.publish(self.remote_rbv, value)
        return value

    @clear_status.putter
    async def clear_status(self, instance, value):
        if value:
            errors = await self.run(self.backend.clear_status)
            await self.report(f"error queue: {'; '.join(errors)}" if errors else "")
        return 0

    @reading_count.scan(period=POLL_PERIOD_S)
    async def reading_count(self, instance, async_lib):
        # the meter is only talked to on request (it may be in local mode on the bench); the poll
        # keeps the clock readback fresh and reconnects a meter that was absent
        await self.poll()

    def make_safe(self) -> None:
        """Front panel back to the operator: display cleared, local mode."""
        self.backend.make_safe()
