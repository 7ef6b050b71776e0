"""What every calbench device shares: connection checks with a remedy, and puts that fail loudly.

Each calbench IOC publishes StatusMessage_RBV and counts refused puts in Refusals_RBV. A
`CheckedSignal` watches that counter while its put is in flight, so `set()` returns a Status that
fails with `InstrumentRefused("<the IOC's reason and remedy>")` instead of a bare CA timeout.
"""
from __future__ import annotations

import threading

from ophyd import Component as Cpt
from ophyd import Device, EpicsSignal, EpicsSignalRO
from ophyd.status import Status

DEFAULT_PUT_TIMEOUT_S = 10.0


class InstrumentRefused(RuntimeError):
    """The IOC refused a put; the message is the instrument's reason and remedy.

    `fault`: the instrument could not be reached or failed (the IOC said "fault: ..."), so the
    value itself was not refused and the same put may pass once the instrument answers again."""

    def __init__(self, message: str, *, fault: bool = False):
        super().__init__(message)
        self.fault = fault


def reports_fault(status_message: str) -> bool:
    """The IOC's StatusMessage_RBV tells of a fault (instrument unreachable or failing), not of a
    refused value (iocs/base.py writes "fault: ..." and "refused: ...")."""
    return status_message.startswith("fault:")


class IocNotAnswering(ConnectionError):
    """No IOC answers on a prefix."""


class _CharWaveformText:
    """Read a CHAR-waveform string PV in full (DBR_STRING would cut it at 40 characters)."""

    def get(self, **kwargs):
        return decode_char_waveform(super().get(**kwargs))

    def describe(self):
        desc = super().describe()
        desc[self.name].update(dtype="string", shape=[])
        return desc


class LongStringSignalRO(_CharWaveformText, EpicsSignalRO):
    """A read-only long string PV (messages, identities, file names)."""


def decode_char_waveform(value) -> str:
    """A CHAR waveform (bytes up to the first NUL) as text; strings pass through."""
    if isinstance(value, str):
        return value
    return bytes(bytearray(int(v) & 0xFF for v in value)).split(b"\0", 1)[0].decode("utf-8", "replace")


class InstrumentDevice(Device):
    """Base device of a calbench instrument IOC (the PVs of iocs/base.py:InstrumentIOC)."""

    # Instrument name in calbench's table, for error messages; subclasses set it.
    instrument = "instrument"

    status_message = Cpt(LongStringSignalRO, "StatusMessage_RBV", kind="omitted")
    refusals = Cpt(EpicsSignalRO, "Refusals_RBV", kind="omitted")
    connected_rbv = Cpt(EpicsSignalRO, "Connected_RBV", kind="omitted")
    world_time = Cpt(EpicsSignalRO, "WorldTime_RBV", kind="omitted")

    def ensure_connected(self, timeout: float = 5.0) -> "InstrumentDevice":
        """Wait for every PV; raise IocNotAnswering naming the prefix and how to start the IOC."""
        wait_for_ioc(self, timeout)
        return self

    def world_now(self) -> float:
        """The instrument's clock (epoch s; accelerated in simulations). Plans time holds with it."""
        return float(self.world_time.get(use_monitor=False))


def wait_for_ioc(device: Device, timeout: float = 5.0) -> None:
    try:
        device.wait_for_connection(timeout=timeout)
    except TimeoutError as exc:
        missing = unconnected_pvs(device)[:3]
        name = getattr(device, "instrument", device.name)
        raise IocNotAnswering(
            f"no IOC answers on {device.prefix!r} for {name} (unconnected: {', '.join(missing)}); "
            f"start it with `calbench ioc run {name} --sim` (or `make iocs`), or check the prefix "
            "and EPICS_CA_ADDR_LIST") from exc


def _signals(device: Device):
    for walk in device.walk_signals(include_lazy=True):
        if hasattr(walk.item, "pvname"):
            yield walk.item


def unconnected_pvs(device: Device) -> list[str]:
    """The PV names of the device's signals that are not connected (yet)."""
    return [s.pvname for s in _signals(device) if not s.connected]


class CheckedSignal(EpicsSignal):
    """An EpicsSignal whose set() fails with InstrumentRefused when the IOC refuses the put.

    Completion is the CA put callback; with a `tolerance` given explicitly, also the readback
    reaching the setpoint within it (a positioner-like setpoint/readback pair, e.g. tube current).
    ophyd's fallback tolerance from the PV's display precision is not used: an instrument may hold
    a value other than the request (a clamped V0Set) and the put must still complete.
    """

    def __init__(self, *args, set_timeout_s: float = DEFAULT_PUT_TIMEOUT_S, **kwargs):
        super().__init__(*args, **kwargs)
        self.set_timeout_s = set_timeout_s   # ramped setpoints (tube kV, HV) need longer

    def set(self, value, *, timeout: float | None = None, settle_time: float | None = None, **kwargs):
        timeout = self.set_timeout_s if timeout is None else timeout
        owner = self.root if hasattr(self.root, "refusals") else None
        status = Status(self, timeout=timeout, settle_time=settle_time)
        lock = threading.Lock()
        tokens = []
        finished = []

        def finish(exc: Exception | None = None):
            with lock:
                if finished:
                    return
                finished.append(True)
                for sig, cid in tokens:
                    sig.unsubscribe(cid)
                if exc is None:
                    status.set_finished()
                else:
                    status.set_exception(exc)

        if owner is not None:
            start_count = owner.refusals.get(use_monitor=False)

            def on_refusal(value, **_):
                if value != start_count:
                    message = owner.status_message.get(use_monitor=False)
                    fault = reports_fault(message)
                    if self.setpoint_pvname not in message:     # the IOC names PV and value
                        message = f"{self.setpoint_pvname} = {request!r}: {message}"
                    finish(InstrumentRefused(message, fault=fault))

            tokens.append((owner.refusals, owner.refusals.subscribe(on_refusal, run=False)))

        request = value

        tolerance = self._tolerance

        def reached(value=None, **_):
            if tolerance is None or abs(self.get() - request) <= tolerance:
                finish()

        def put_done(*args, **kw):
            # a refused put also completes (with ECA_PUTFAIL, which ophyd does not pass on); the
            # IOC counts the refusal before it answers, so a fresh read of the count tells
            if owner is not None and owner.refusals.get(use_monitor=False) != start_count:
                on_refusal(None)
                return
            if tolerance is None:
                finish()
            else:
                tokens.append((self, self.subscribe(reached, event_type=self.SUB_VALUE, run=True)))

        self.put(value, use_complete=True, callback=put_done)
        return status


def refusal_reason(exc: BaseException | None, *, also: tuple[type, ...] = ()) -> str | None:
    """The instrument's own words inside a failed set: bluesky raises FailedStatus, whose status
    holds the InstrumentRefused (or one of the `also` exception types). None if there is none."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (InstrumentRefused, *also)):
            return str(exc)
        status = exc.args[0] if exc.args and hasattr(exc.args[0], "exception") else None
        if status is not None and status.done and status.exception() is not None:
            exc = status.exception()
            continue
        exc = exc.__cause__ or exc.__context__
    return None


class PauseSafeSignal(CheckedSignal):
    """A setting whose instrument makes itself safe while the RunEngine pauses. The RunEngine
    calls pause()/resume() on the objects a plan touched, which for a setting is this signal: it
    hands them to its instrument device (whose hooks act once however many of its signals ask)."""

    def pause(self):
        self.root.pause()

    def resume(self):
        self.root.resume()

    def stop(self, *, success: bool = False):
        # the RunEngine stops what a plan moved before it pauses and when a run ends (an abort
        # after a pause included): a pause never resumed must not keep the next from acting
        self.root.forget_pause()


class PauseHooks:
    """Device mixin: `make_pause_safe()` returns what to restore on resume (None: nothing);
    `restore_after_pause(saved)` restores it. pause()/resume() run each once per pause."""

    def pause(self):
        lock = self.__dict__.setdefault("_pause_lock", threading.Lock())
        with lock:
            if self.__dict__.get("_pause_saved") is not None:
                return
            self._pause_saved = self.make_pause_safe() or ()

    def resume(self):
        lock = self.__dict__.setdefault("_pause_lock", threading.Lock())
        with lock:
            saved, self._pause_saved = self.__dict__.get("_pause_saved"), None
        if saved:
            self.restore_after_pause(saved)

    def forget_pause(self) -> None:
        """The pause (if any) is over without a resume: nothing to restore."""
        lock = self.__dict__.setdefault("_pause_lock", threading.Lock())
        with lock:
            self._pause_saved = None

    def make_pause_safe(self):
        raise NotImplementedError

    def restore_after_pause(self, saved) -> None:
        raise NotImplementedError


class LongStringSignal(_CharWaveformText, CheckedSignal):
    """A writable long string PV (paths, file names); a refused put raises."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("string", True)
        super().__init__(*args, **kwargs)


def set_and_check(signal: CheckedSignal, value, timeout: float | None = None):
    """Blocking set for code outside the RunEngine (CLIs, staging); raises InstrumentRefused."""
    timeout = getattr(signal, "set_timeout_s", DEFAULT_PUT_TIMEOUT_S) if timeout is None else timeout
    status = signal.set(value, timeout=timeout)
    try:
        status.wait(timeout + 1)
    except Exception as exc:
        inner = status.exception() if status.done else None
        raise (inner or exc) from None
    return status
