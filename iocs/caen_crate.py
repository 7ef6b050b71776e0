"""CaenCrateIOC: a CAEN SYx527 high-voltage crate as EPICS PVs, with CAENHVAsyn-style names.

PVs (after the instrument prefix P, e.g. CB:CAEN:), for every channel cc of every board in slot ss:
  P Sss:Ccc:V0Set (V)   I0Set (uA)   RUp, RDWn (V/s)   Trip (s)   SVMax (V)
            Pw (Off/On)  PDwn (Kill/Ramp)  ChName (<= 12 characters)
            VMon (V)  IMon (uA)  Status (CAEN bitmask: 0 ON, 1 RUP, 2 RDW, 3 OVC, 4 OVV, 5 UNV,
                                         6 ETRIP, 7 MAXV, 8 EXTDIS, 9 ITRIP, 10 CALERR, 11 UNPLUG)
  crate map: P SystemType_RBV, P Slots_RBV ("3" or "1,3"), P Sss:Model_RBV, Sss:Description_RBV,
             Sss:SerialNumber_RBV, Sss:Firmware_RBV, Sss:NumChannels_RBV
  crate commands: P ClearAlarm (put 1: clears latched trips), P Kill (put 1: every channel off now)
  common: StatusMessage_RBV, Refusals_RBV, Connected_RBV, WorldTime_RBV
  procedure lease (iocs/lease.py): P Lease:Take, Lease:Heartbeat, Lease:Release,
             Lease:State_RBV, ...; when the holder's renewals stop, every channel gets V0Set 0 and
             Pw Off (the crate ramps down at RDWn) and Pw On is refused until a lease is taken
             again. The crate's own trip protection is unchanged.
  simulated backend only: P Sim:Unreachable, Sim:SparkRateScale, Sim:DischargeChannel,
             Sim:ShortChannel (fault injection for tests and training)

Settings the crate changes by itself (Pw after a trip, V0Set clamped at SVMax, values set from the
crate's front panel) are published from the poll loop, so setpoint PVs always show the crate's state.
In each poll a channel's Status is published before its VMon: a client reading VMon then Status never
takes a voltage read after a trip for one read before it.
"""
from __future__ import annotations

import asyncio
import logging
import time

from caproto import ChannelType
from caproto.server import SubGroup, pvproperty

from calbench.iocs.base import (InstrumentFault, InstrumentGroup, InstrumentIOC, command_pv,
                                setting_pv, string_pv)
from calbench.contracts.caen import (BOARD_CHANNELS, HW_IMAX_UA, HW_VMAX_V, RAMP_LIMITS_V_PER_S,
                                     TRIP_LIMITS_S)
from calbench.iocs.lease import LeasePVs
from calbench.iocs.settings_table import DOUBLE, ENUM, Setting, settings_group

log = logging.getLogger(__name__)

OFF_ON = ["Off", "On"]
KILL_RAMP = ["Kill", "Ramp"]
SIM_DISCHARGE_S = 10.0        # an injected discharge outlasts any usual Trip setting
SIM_SHORT_GOHM = 0.01         # an injected short: 10 MOhm across the electrode
IDLE_POLL_PERIOD_S = 0.25     # poll period (wall s) of an idle crate
IDLE_AFTER_S = 5.0            # a crate is idle this long (wall s) after the last put


CHANNEL_NAME_CHARS = 12


def _double(name: str, units: str, precision: int, *, read_only: bool = False, doc: str = ""):
    return pvproperty(name=name, value=0.0, dtype=ChannelType.DOUBLE, units=units,
                      precision=precision, read_only=read_only, doc=doc)


def _param(name: str, units: str, precision: int, low: float, high: float, doc: str, *,
           attr: str) -> Setting:
    """A numeric channel parameter (backend.set_param(slot, channel, name, value))."""
    return Setting(name, "set_param", DOUBLE, low=low, high=high, units=units,
                   precision=precision, args=(name,), attr=attr, doc=doc)


def _index_in(states: list[str]):
    def index(value) -> int:
        return states.index(value) if isinstance(value, str) else int(value)
    return index


CHANNEL_SETTINGS = (
    _param("V0Set", "V", 1, 0.0, HW_VMAX_V, "voltage setpoint (clamped to SVMax by the crate)",
           attr="v0set"),
    _param("I0Set", "uA", 3, 0.0, HW_IMAX_UA, "current limit: above it for Trip s, the channel "
           "trips", attr="i0set"),
    _param("RUp", "V/s", 1, *RAMP_LIMITS_V_PER_S, "ramp-up rate", attr="rup"),
    _param("RDWn", "V/s", 1, *RAMP_LIMITS_V_PER_S, "ramp-down rate", attr="rdwn"),
    _param("Trip", "s", 1, *TRIP_LIMITS_S, "time above I0Set before a trip", attr="trip"),
    _param("SVMax", "V", 1, 0.0, HW_VMAX_V, "software voltage limit", attr="svmax"),
    Setting("Pw", "set_param", ENUM, states=tuple(OFF_ON), args=("Pw",), convert=_index_in(OFF_ON),
            hazard=("On", "Pw On"), doc="power; the crate switches it Off on a trip"),
    Setting("PDwn", "set_param", ENUM, states=tuple(KILL_RAMP), args=("PDwn",),
            convert=_index_in(KILL_RAMP), doc="after a trip: Kill (at once) or Ramp (at RDWn)"),
)


class ChannelPVs(settings_group("ChannelSettings", CHANNEL_SETTINGS)):
    """The PVs of one crate channel; puts go to the crate through the IOC's backend."""

    ch_name = pvproperty(name="ChName", value="", dtype=ChannelType.STRING,
                         max_chars=CHANNEL_NAME_CHARS, doc="channel name")
    vmon = _double("VMon", "V", 2, read_only=True, doc="monitored voltage")
    imon = _double("IMon", "uA", 4, read_only=True, doc="monitored current")
    status = pvproperty(name="Status", value=0, dtype=ChannelType.LONG, read_only=True,
                        doc="CAEN channel status bitmask")

    def __init__(self, prefix: str, *, ioc: "CaenCrateIOC", slot: int, channel: int, **kwargs):
        self.ioc, self.slot, self.channel = ioc, slot, channel
        super().__init__(prefix, **kwargs)

    async def _put(self, param: str, value):
        self.ioc._last_put = time.monotonic()
        async with self.ioc.crate_lock:
            held = await self.ioc.call(self.ioc.backend.set_param, self.slot, self.channel, param,
                                       value)
            if param in ("V0Set", "Pw"):      # Status and VMon follow at once, not a poll later
                await self.ioc.poll_unlocked()
        if param == "V0Set":
            self.ioc.poll_after_ramp(abs(float(held) - float(self.vmon.value)),
                                     float(self.rup.value), float(self.rdwn.value))
        if param == "V0Set" and held is not None and held < float(value):
            await self.ioc.report(f"S{self.slot:02d}:C{self.channel:02d} V0Set {float(value):g} V "
                                  f"clamped to SVMax = {held:g} V")
        return held

    async def apply_setting(self, setting, value):
        """A channel parameter of the table: numbers store what the crate holds (V0Set clamped
        at SVMax), states the state sent."""
        if setting.hazard and value == setting.hazard[0]:
            await self.ioc.require_lease(
                f"S{self.slot:02d}:C{self.channel:02d} {setting.hazard[1]}")
        held = await self._put(setting.args[0], setting.argument(value))
        return None if setting.dtype == ENUM else float(held)

    @ch_name.putter
    async def ch_name(self, instance, value):
        return await self._put("ChName", str(value))

    async def _show(self, instance, value) -> None:
        """Publish what the crate holds without running the putter (that would send it back)."""
        if instance.value != value:
            await instance.write(value, verify_value=False, timestamp=self.ioc.clock.now())

    async def update(self, board: dict[str, list]) -> None:
        """Publish this channel's entries of a board reading (Status before VMon, see module doc)."""
        c, pub = self.channel, self._show
        await pub(self.status, int(board["Status"][c]))
        await pub(self.pw, OFF_ON[int(board["Pw"][c])])
        await pub(self.vmon, round(float(board["VMon"][c]), 2))
        await pub(self.imon, round(float(board["IMon"][c]), 4))
        await pub(self.v0set, float(board["V0Set"][c]))
        await pub(self.i0set, float(board["I0Set"][c]))
        await pub(self.rup, float(board["RUp"][c]))
        await pub(self.rdwn, float(board["RDWn"][c]))
        await pub(self.trip, float(board["Trip"][c]))
        await pub(self.svmax, float(board["SVMax"][c]))
        await pub(self.pdwn, KILL_RAMP[int(board["PDwn"][c])])
        await pub(self.ch_name, str(board["ChName"][c])[:39])


class BoardPVs(InstrumentGroup):
    """Crate-map entry of one slot."""
    model = string_pv("Model_RBV", doc="board model, e.g. A1515TG")
    description = string_pv("Description_RBV")
    serial_number = pvproperty(name="SerialNumber_RBV", value=0, dtype=ChannelType.LONG,
                               read_only=True)
    firmware = string_pv("Firmware_RBV")
    n_channels = pvproperty(name="NumChannels_RBV", value=0, dtype=ChannelType.LONG, read_only=True)


class _SimControls(InstrumentGroup):
    unreachable = command_pv("Unreachable", "simulation: 1 makes the crate stop answering")
    spark_rate_scale = setting_pv("SparkRateScale", low=0.0, high=1e6, value=1.0,
                                  doc="simulation: multiplies every foil's discharge rate")
    discharge_channel = setting_pv("DischargeChannel", ChannelType.LONG, low=-1,
                                   high=BOARD_CHANNELS - 1, value=-1,
                                   doc="simulation: put a channel number to start a 10 s discharge")
    short_channel = setting_pv("ShortChannel", ChannelType.LONG, low=-1, high=BOARD_CHANNELS - 1,
                               value=-1, doc="simulation: put a channel number to short its "
                                             "electrode (10 MOhm), -1 repairs")

    @unreachable.putter
    async def unreachable(self, instance, value):
        self.parent.backend.unreachable = bool(value)
        return int(bool(value))

    @spark_rate_scale.putter
    async def spark_rate_scale(self, instance, value):
        self.parent.backend.spark_rate_scale = max(0.0, float(value))
        return max(0.0, float(value))

    @discharge_channel.putter
    async def discharge_channel(self, instance, value):
        if value >= 0:
            await self.parent.call(self.parent.backend.inject_discharge, self.parent.sim_slot,
                                   int(value), SIM_DISCHARGE_S)
        return -1

    @short_channel.putter
    async def short_channel(self, instance, value):
        backend, slot = self.parent.backend, self.parent.sim_slot
        for ch in range(self.parent.n_channels(slot)):
            backend.set_short(slot, ch, SIM_SHORT_GOHM if ch == value else None)
        return int(value)


class CaenCrateIOC(InstrumentIOC):
    """The crate: per-channel PVs built from the crate map the backend reports at start."""

    system_type = string_pv("SystemType_RBV", doc="crate model, e.g. SY5527")
    slots = string_pv("Slots_RBV", doc="occupied slots, comma separated")
    clear_alarm = command_pv("ClearAlarm", "put 1: clear latched trips on every channel")
    kill = command_pv("Kill", "put 1: switch every channel off at once")

    sim = SubGroup(_SimControls, prefix="Sim:")
    lease = SubGroup(LeasePVs, prefix="Lease:")

    def __init__(self, *, prefix, backend, clock=None, **kwargs):
        super().__init__(prefix=prefix, backend=backend, clock=clock, **kwargs)
        if not hasattr(backend, "inject_discharge"):       # hardware: no fault injection PVs
            for name in list(self.pvdb):
                if name.startswith(prefix + "Sim:"):
                    del self.pvdb[name]
        self.boards = {b.slot: b for b in backend.crate_map()}
        self.sim_slot = min(self.boards) if self.boards else 0
        self.board_pvs: dict[int, BoardPVs] = {}
        self.channel_pvs: dict[int, list[ChannelPVs]] = {}
        for slot, board in self.boards.items():
            bp = BoardPVs(f"{prefix}S{slot:02d}:", parent=self)
            self.board_pvs[slot] = bp
            self.pvdb.update(bp.pvdb)
            self.channel_pvs[slot] = []
            for ch in range(board.n_channels):
                cp = ChannelPVs(f"{prefix}S{slot:02d}:C{ch:02d}:", ioc=self, slot=slot, channel=ch,
                                parent=self)
                self.channel_pvs[slot].append(cp)
                self.pvdb.update(cp.pvdb)
        self._last_fault = ""
        self._crate_lock: asyncio.Lock | None = None
        self._last_put = time.monotonic()

    def n_channels(self, slot: int) -> int:
        return len(self.channel_pvs.get(slot, []))

    @clear_alarm.putter
    async def clear_alarm(self, instance, value):
        if value:
            self._last_put = time.monotonic()
            async with self.crate_lock:
                await self.poll_unlocked()   # trips since the last poll are shown before clearing
                await self.call(self.backend.clear_alarm)
                await self.poll_unlocked()
        return 0

    @kill.putter
    async def kill(self, instance, value):
        if value:
            async with self.crate_lock:
                await self.call(self.backend.kill)
                await self.poll_unlocked()
        return 0

    async def lease_lapsed(self) -> str:
        """Every channel to 0 V and off: the crate ramps them down at RDWn."""
        self._last_put = time.monotonic()      # poll fast while they ramp down
        async with self.crate_lock:
            try:
                await self.worker.run(self.backend.make_safe)
            except Exception as exc:           # reported: the operator must act
                log.exception("%smaking the crate safe after the lease lapsed", self.prefix)
                return (f"COULD NOT switch the channels off: {exc}; switch them off at the crate "
                        "now")
            finally:
                await self.poll_unlocked()
        return "every channel set to 0 V and switched off (ramping down at RDWn)"

    @system_type.startup
    async def system_type(self, instance, async_lib):
        await self.publish(self.system_type, str(self.backend.system_type))
        await self.publish(self.slots, ",".join(str(s) for s in sorted(self.boards)))
        for slot, board in self.boards.items():
            bp = self.board_pvs[slot]
            await self.publish(bp.model, board.model)
            await self.publish(bp.description, board.description)
            await self.publish(bp.serial_number, int(board.serial_number))
            await self.publish(bp.firmware, str(board.firmware))
            await self.publish(bp.n_channels, int(board.n_channels))
        while True:
            await self.poll()
            await asyncio.sleep(self.poll_period())

    def poll_period(self) -> float:
        """The backend's poll period while anything is on, ramping or was just set; slower when
        the crate sits idle (every channel off at 0 V), where only IMon noise would change."""
        fast = float(getattr(self.backend, "poll_period_s", 0.5))
        busy = time.monotonic() - self._last_put < IDLE_AFTER_S or any(
            ch.pw.value == "On" or ch.vmon.value > 0.0
            for channels in self.channel_pvs.values() for ch in channels)
        return fast if busy else max(fast, IDLE_POLL_PERIOD_S)

    def poll_after_ramp(self, delta_V: float, rup: float, rdwn: float) -> None:
        """Poll again when a short ramp should have ended, if that is before the next regular poll
        (on an accelerated world clock a 10 V step lasts well under one poll period)."""
        wall_s = delta_V / max(min(rup, rdwn), 0.1) / self.clock.time_scale
        if wall_s < float(getattr(self.backend, "poll_period_s", 0.5)):
            loop = asyncio.get_running_loop()
            loop.call_later(wall_s + 0.001, lambda: asyncio.ensure_future(self.poll()))

    @property
    def crate_lock(self) -> asyncio.Lock:
        """Serialises polls and puts: a poll must not publish a reading taken before a put."""
        if self._crate_lock is None:
            self._crate_lock = asyncio.Lock()
        return self._crate_lock

    async def poll(self) -> None:
        """Read every board and publish what changed (world-clock timestamps)."""
        async with self.crate_lock:
            await self.poll_unlocked()

    def _read_boards(self) -> dict[int, dict[str, list]]:
        return {slot: self.backend.read_board(slot) for slot in self.channel_pvs}

    async def poll_unlocked(self) -> None:
        try:       # on the crate's worker thread: a slow crate holds up only its own PVs
            readings = await self.worker.run(self._read_boards)
        except Exception as exc:     # a fault (or a driver bug) must not stop the IOC
            if not isinstance(exc, InstrumentFault):
                log.exception("reading the crate failed")
            if str(exc) != self._last_fault:
                self._last_fault = str(exc)
                await self.report(f"fault: {exc}")
            await self.heartbeat(False)
            return
        if self._last_fault:
            self._last_fault = ""
            await self.report("the crate answers again")
        for slot, board in readings.items():
            for channel in self.channel_pvs[slot]:
                await channel.update(board)
        await self.heartbeat(True)
