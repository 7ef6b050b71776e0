"""ophyd devices of the CAEN HV crate (PVs of iocs/caen_crate.py): channels, GEM layers, the crate.

* `HvChannel` is a positioner and owns the arrival rule (`held_setpoint`, `at_setpoint`): `set(V)`
  writes V0Set and completes when the channel is not ramping (Status bits 1-2 clear) and
  |VMon - V0Set| <= 1 V, V0Set as the crate holds it (capped at SVMax); it fails with
  `ChannelTripped` if the crate trips the channel on the way (or had tripped it), and with
  `ChannelOff` if the channel is (or is switched) off. Plans move channels with `bps.mv` and never
  judge arrival themselves.
* `GemLayer` groups the 7 channels of a triple-GEM layer in the QC6 order (Drift, G1T, G1B, G2T,
  G2B, G3T, G3B = channels 6..0, or 13..7 for layer 2) and emulates the ceramic divider the QC6
  procedure is written for: `layer.set(4600)` puts each electrode at its share of 4600 V
  (`divider_setpoints`), capped at the channel's SVMax; `layer.set({"g1t": 550, ...})` moves the
  named channels. Either is one move with one status: done when all arrived, failed at the first
  trip.
* `CaenCrate` is the instrument in the lab table: crate map, ClearAlarm, Kill, and `layer(n)`.
"""
from __future__ import annotations

import logging
import threading

from ophyd import Component as Cpt
from ophyd import Device, EpicsSignal, EpicsSignalRO
from ophyd import FormattedComponent as FCpt
from ophyd.status import DeviceStatus

from calbench.devices.base import CheckedSignal, InstrumentDevice, LongStringSignalRO
from calbench.devices.lease import ProcedureLease

log = logging.getLogger(__name__)

# CAEN channel status bits
STATUS_ON, STATUS_RUP, STATUS_RDW, STATUS_OVC = 0x1, 0x2, 0x4, 0x8
STATUS_ETRIP, STATUS_MAXV, STATUS_ITRIP = 0x40, 0x80, 0x200
RAMPING = STATUS_RUP | STATUS_RDW
TRIPPED = STATUS_ETRIP | STATUS_ITRIP
STATUS_NAMES = ("ON", "RUP", "RDW", "OVC", "OVV", "UNV", "ETRIP", "MAXV", "EXTDIS", "ITRIP",
                "CALERR", "UNPLUG", "", "OVP", "PF", "TE")

# QC6 layer: electrode -> channel offset within the layer, drift first (the reference's order 6..0)
ELECTRODES = ("drift", "g1t", "g1b", "g2t", "g2b", "g3t", "g3b")
ELECTRODE_OFFSET = {"drift": 6, "g1t": 5, "g1b": 4, "g2t": 3, "g2b": 2, "g3t": 1, "g3b": 0}
FOILS = ("g1t", "g2t", "g3t")          # GEM 1, GEM 2, GEM 3
CHANNELS_PER_LAYER = 7
# Equivalent divider of the QC6 procedure (MOhm), per electrode; total 4.698 MOhm
DIVIDER_MOHM = {"drift": 1.125, "g1t": 0.560, "g1b": 0.438, "g2t": 0.550, "g2b": 0.875,
                "g3t": 0.525, "g3b": 0.625}
TOLERANCE_V = 1.0


class ChannelTripped(RuntimeError):
    """The crate tripped a channel (over-current longer than Trip): `channel` (the HvChannel) and
    `bits` (its Status then)."""

    def __init__(self, message: str, *, channel=None, bits: int = 0):
        super().__init__(message)
        self.channel, self.bits = channel, int(bits)


class ChannelOff(RuntimeError):
    """A voltage was requested on a channel that is switched off, or it was switched off (without a
    trip) on the way: `channel` is the HvChannel."""

    def __init__(self, message: str, *, channel=None):
        super().__init__(message)
        self.channel = channel


def describe_status(bits: int) -> str:
    """'ON|RUP' for a CAEN status bitmask."""
    names = [n for i, n in enumerate(STATUS_NAMES) if n and bits & (1 << i)]
    return "|".join(names) or "OFF"


def divider_setpoints(v_divider: float, svmax: dict[str, float] | None = None) -> dict[str, float]:
    """Per-electrode voltages (V) of the QC6 divider emulation at `v_divider` (V) across the stack.

    The divider current is v_divider / 4.698 MOhm (uA); each electrode gets current x its
    resistance, capped at its SVMax (V) when given. 4600 V gives Drift 1101.5, G1T 548.3, ...
    """
    if v_divider < 0:
        raise ValueError(f"divider voltage {v_divider} V must be >= 0")
    i_eq_uA = v_divider / sum(DIVIDER_MOHM.values())
    out = {}
    for electrode, r in DIVIDER_MOHM.items():
        v = i_eq_uA * r
        if svmax is not None and electrode in svmax:
            v = held_setpoint(v, svmax[electrode])
        out[electrode] = v
    return out


def held_setpoint(requested_V: float, svmax_V: float) -> float:
    """The V0Set the crate holds for a request (V): capped at the channel's SVMax."""
    return min(float(requested_V), float(svmax_V))


def at_setpoint(bits: int, vmon_V: float, target_V: float) -> bool:
    """A channel has arrived: not ramping (Status bits 1-2 clear) and |VMon - target| <= 1 V."""
    return not bits & RAMPING and abs(vmon_V - target_V) <= TOLERANCE_V


RECHECK_S = 1.0       # wall s between fresh looks while a channel moves (monitors do the work)
OFF_LOOKS = 2         # fresh looks in a row that show a moving channel off before the move fails


def _later(delay_s: float, func) -> None:
    timer = threading.Timer(delay_s, func)
    timer.daemon = True
    timer.start()


class HvChannel(Device):
    """One HV channel (prefix "<P>Sss:Ccc:") as a positioner in volts.

    Components are read in definition order; VMon comes before Status so that a voltage read just
    after a trip is always seen together with the trip bit (the IOC publishes Status first).
    """

    vmon = Cpt(EpicsSignalRO, "VMon", kind="hinted", auto_monitor=True)
    imon = Cpt(EpicsSignalRO, "IMon", kind="hinted", auto_monitor=True)
    status = Cpt(EpicsSignalRO, "Status", kind="normal", auto_monitor=True)
    v0set = Cpt(CheckedSignal, "V0Set", kind="normal", auto_monitor=True)
    pw = Cpt(CheckedSignal, "Pw", kind="normal", auto_monitor=True)
    i0set = Cpt(CheckedSignal, "I0Set", kind="config", auto_monitor=True)
    rup = Cpt(CheckedSignal, "RUp", kind="config", auto_monitor=True)
    rdwn = Cpt(CheckedSignal, "RDWn", kind="config", auto_monitor=True)
    trip = Cpt(CheckedSignal, "Trip", kind="config", auto_monitor=True)
    svmax = Cpt(CheckedSignal, "SVMax", kind="config", auto_monitor=True)
    pdwn = Cpt(CheckedSignal, "PDwn", kind="config", auto_monitor=True)
    ch_name = Cpt(EpicsSignal, "ChName", string=True, kind="config")

    def __init__(self, prefix: str = "", *, channel: int | None = None, electrode: str = "",
                 **kwargs):
        self.channel = channel
        self.electrode = electrode
        super().__init__(prefix, **kwargs)

    @property
    def position(self) -> float:
        """VMon (V)."""
        return float(self.vmon.get())

    @property
    def egu(self) -> str:
        return "V"

    def label(self) -> str:
        return f"{self.electrode or self.name} (channel {self.channel})"

    def set(self, value, *, timeout: float | None = None, settle_time: float | None = None):
        """Write V0Set; done when not ramping and |VMon - V0Set| <= 1 V (V0Set as held by the
        crate, i.e. capped at SVMax). Fails with ChannelTripped if the crate trips the channel on
        the way, ChannelOff if it is off (or is switched off without a trip on the way: seen off in
        OFF_LOOKS fresh looks in a row), InstrumentRefused if the crate refuses the value. A new
        set() or stop() ends the move before (its status completes: nobody waits on it any more)."""
        value = float(value)
        status = DeviceStatus(self, timeout=timeout, settle_time=settle_time)
        self._withdraw()
        if int(self.pw.get(use_monitor=False)) != 1:
            bits = int(self.status.get(use_monitor=False))
            if bits & TRIPPED:                # the crate switched it off: say why
                status.set_exception(ChannelTripped(
                    f"{self.label()} has tripped (Status {describe_status(bits)}) and is off: "
                    "clear the alarm (the crate's ClearAlarm) and switch it on before setting "
                    f"{value:g} V", channel=self, bits=bits))
                return status
            status.set_exception(ChannelOff(
                f"{self.label()} is switched off (Pw = Off): switch it on first "
                f"({self.pw.pvname} = On, e.g. RE(bps.mv(<device>.{self.pw.dotted_name}, 1))), "
                "then set the voltage", channel=self))
            return status
        lock = threading.Lock()
        tokens: list = []
        off_looks = [0]

        def finish(exc: Exception | None = None):
            with lock:
                if status.done:
                    return
                for sig, cid in tokens:
                    sig.unsubscribe(cid)
                tokens.clear()
                if exc is None:
                    status.set_finished()
                else:
                    status.set_exception(exc)

        def judge(bits: int, vmon: float, svmax: float) -> None:
            if bits & TRIPPED:
                finish(ChannelTripped(f"{self.label()} tripped on the way to {value:g} V "
                                      f"(Status {describe_status(bits)}, VMon {vmon:.1f} V)",
                                      channel=self, bits=bits))
            elif at_setpoint(bits, vmon, held_setpoint(value, svmax)):
                finish()

        def check(*args, **kwargs):
            # SVMax read each time: its monitor may trail a recent change
            judge(int(self.status.get()), self.position, float(self.svmax.get()))

        def recheck():
            """A fresh look every RECHECK_S: a monitor update lost or late on a loaded machine
            must not leave the move hanging; a channel off in OFF_LOOKS fresh looks in a row (not
            a trip: the trip bit comes with it) was switched off by someone or an interlock."""
            if status.done:
                return
            try:
                bits = int(self.status.get(use_monitor=False))
                judge(bits, float(self.vmon.get(use_monitor=False)),
                      float(self.svmax.get(use_monitor=False)))
                off = not status.done and int(self.pw.get(use_monitor=False)) != 1
                off_looks[0] = off_looks[0] + 1 if off else 0
                if off_looks[0] >= OFF_LOOKS and not bits & TRIPPED:
                    finish(ChannelOff(f"{self.label()} went off without a trip on the way to "
                                      f"{value:g} V: someone switched it off, or the crate's "
                                      "interlock; check the crate before going on", channel=self))
            except Exception as exc:       # the next monitor update or look decides
                log.debug("%s: fresh look failed: %r", self.name, exc)
            if not status.done:
                _later(RECHECK_S, recheck)

        def put_done(st):
            if not st.success:
                finish(st.exception() or RuntimeError(f"V0Set put to {value} failed"))
                return
            with lock:
                if status.done:
                    return
                for sig in (self.vmon, self.status, self.svmax):
                    tokens.append((sig, sig.subscribe(check, run=False)))
            check()
            _later(RECHECK_S, recheck)

        self._move = (status, finish)
        self.v0set.set(value).add_callback(put_done)
        return status

    def _withdraw(self, only=None) -> None:
        """End the pending move (if `only` is given: if it is that move's status): its status
        completes (the crate is told nothing; the channel goes on to its V0Set as HV channels do)."""
        status, finish = getattr(self, "_move", (None, None))
        if status is None or (only is not None and status is not only):
            return
        self._move = (None, None)
        if not status.done:
            finish()

    def stop(self, *, success: bool = False) -> None:
        """A pause (the RunEngine's stop(success=True)) does not touch the high voltage: the channel
        holds its setpoint and a pending move goes on. A plan's own `bps.stop` withdraws the pending
        move (see `_withdraw`): it stops waiting, e.g. before switching the layer off."""
        if not success:
            self._withdraw()


def _channel_cpt(electrode: str, kind: str):
    return FCpt(HvChannel, "{prefix}{_ch_prefix[" + electrode + "]}", electrode=electrode,
                kind=kind)


class BoardInfo(Device):
    """Crate-map entry of a slot (prefix "<P>Sss:")."""
    model = Cpt(LongStringSignalRO, "Model_RBV", kind="normal")
    description = Cpt(LongStringSignalRO, "Description_RBV", kind="normal")
    serial_number = Cpt(EpicsSignalRO, "SerialNumber_RBV", kind="normal")
    firmware = Cpt(LongStringSignalRO, "Firmware_RBV", kind="normal")
    n_channels = Cpt(EpicsSignalRO, "NumChannels_RBV", kind="normal")


class _CrateCommon(InstrumentDevice):
    """PVs of the crate itself; subclasses set `slot` before initialising."""
    instrument = "caen"
    # monitored: plans read the world clock and the crate's link state at every look
    connected_rbv = Cpt(EpicsSignalRO, "Connected_RBV", kind="omitted", auto_monitor=True)
    world_time = Cpt(EpicsSignalRO, "WorldTime_RBV", kind="omitted", auto_monitor=True)
    clear_alarm_cmd = Cpt(CheckedSignal, "ClearAlarm", kind="omitted")
    kill_cmd = Cpt(CheckedSignal, "Kill", kind="omitted")
    system_type = Cpt(LongStringSignalRO, "SystemType_RBV", kind="config")
    board = FCpt(BoardInfo, "{prefix}S{slot:02d}:", kind="config")
    lease = Cpt(ProcedureLease, "Lease:", kind="omitted")


class GemLayer(_CrateCommon):
    """A triple-GEM layer on a CAEN board: 7 HvChannel components and the divider emulation.

    layer = GemLayer("CB:CAEN:", slot=3, layer=1, name="gem")
    layer.drift / g1t / g1b / g2t / g2b / g3t / g3b; layer.foils -> [g1t, g2t, g3t]
    RE(bps.mv(layer, 4600))       # every electrode at its divider share (channels must be on)
    """

    drift = _channel_cpt("drift", "normal")
    g1t = _channel_cpt("g1t", "hinted")
    g1b = _channel_cpt("g1b", "normal")
    g2t = _channel_cpt("g2t", "hinted")
    g2b = _channel_cpt("g2b", "normal")
    g3t = _channel_cpt("g3t", "hinted")
    g3b = _channel_cpt("g3b", "normal")

    def __init__(self, prefix: str = "", *, slot: int = 3, layer: int = 1,
                 detector_name: str = "Detector1", **kwargs):
        if layer not in (1, 2):
            raise ValueError(f"layer must be 1 (channels 0-6) or 2 (channels 7-13), not {layer!r}")
        self.slot, self.layer, self.detector_name = int(slot), int(layer), detector_name
        first = CHANNELS_PER_LAYER * (self.layer - 1)
        self._channel = {e: first + o for e, o in ELECTRODE_OFFSET.items()}
        self._ch_prefix = {e: f"S{self.slot:02d}:C{c:02d}:" for e, c in self._channel.items()}
        super().__init__(prefix, **kwargs)
        for e in ELECTRODES:
            getattr(self, e).channel = self._channel[e]

    @property
    def channels(self) -> list[HvChannel]:
        """The 7 channels, drift first (the QC6 order 6..0)."""
        return [getattr(self, e) for e in ELECTRODES]

    @property
    def foils(self) -> list[HvChannel]:
        """G1T, G2T, G3T (GEM 1, 2, 3)."""
        return [getattr(self, e) for e in FOILS]

    def channel_number(self, electrode: str) -> int:
        return self._channel[electrode]

    def setpoints(self, v_divider: float) -> dict[str, float]:
        """Divider emulation at `v_divider` (V), capped at each channel's SVMax."""
        svmax = {e: float(getattr(self, e).svmax.get()) for e in ELECTRODES}
        return divider_setpoints(v_divider, svmax)

    def set(self, value, **kwargs):
        """Every electrode to its divider share of `value` (V), or the channels named in a mapping
        {electrode: V} to their voltages; one status, done when all arrived, failed at the first
        channel that fails (the others' moves are then withdrawn: the plan looks at them)."""
        if isinstance(value, dict):
            targets = {getattr(self, e) if isinstance(e, str) else e: v for e, v in value.items()}
        else:
            targets = {getattr(self, e): v for e, v in self.setpoints(value).items()}
        status = DeviceStatus(self)
        lock = threading.RLock()      # withdrawing a move calls back here
        moves: dict = {}

        def one_done(st):
            with lock:
                if status.done:
                    return
                if not st.success:
                    status.set_exception(st.exception())     # the channel's own reason
                    for ch, own in moves.items():            # nobody waits on the others now
                        ch._withdraw(only=own)
                elif all(m.done and m.success for m in moves.values()):
                    status.set_finished()

        for ch, v in targets.items():
            moves[ch] = ch.set(v, **kwargs)
        for st in list(moves.values()):
            st.add_callback(one_done)
        return status

    def stop(self, *, success: bool = False) -> None:
        """See HvChannel.stop: a pause leaves the voltages as they are; a plan's `bps.stop`
        withdraws the channels' pending moves."""
        for ch in self.channels:
            ch.stop(success=success)


class CaenCrate(_CrateCommon):
    """The crate as registered in the lab table: crate map, commands, and the GEM layers."""

    slots = Cpt(LongStringSignalRO, "Slots_RBV", kind="config")

    def __init__(self, prefix: str = "", *, slot: int = 3, layer: int = 1,
                 detector_name: str = "Detector1", **kwargs):
        self.slot, self.default_layer, self.detector_name = int(slot), int(layer), detector_name
        super().__init__(prefix, **kwargs)

    @classmethod
    def from_settings(cls, prefix: str, *, name: str, settings: dict) -> "CaenCrate":
        return cls(prefix, name=name, slot=settings.get("slot", 3), layer=settings.get("layer", 1),
                   detector_name=settings.get("detector_name", "Detector1"))

    def layer(self, layer: int | None = None, *, connect: bool = True,
              timeout: float = 5.0) -> GemLayer:
        """The GEM layer device (layer 1: channels 0-6, layer 2: 7-13) on this crate's board."""
        layer = self.default_layer if layer is None else int(layer)
        device = GemLayer(self.prefix, slot=self.slot, layer=layer,
                          detector_name=self.detector_name, name=f"{self.name}_l{layer}")
        if connect:
            device.ensure_connected(timeout)
        return device
