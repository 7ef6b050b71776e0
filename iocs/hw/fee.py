"""Hardware backend of the Daya Bay FEE board: VME register access through CAEN's CAENComm library.

What it needs, none of which exists where the simulators and tests run (nothing here is exercised by
the test suite; the module imports without any of it):

* a CAEN VME bridge (V1718/V2718 with A2818/A3818/A4818, ...) and the board in its crate;
* CAEN's CAENComm and CAENVMELib C libraries, and their Python binding `caen_libs`
  (`pip install caen-libs`, the project's "hardware" extra);
* the FEE firmware's register map and hit-word format, which are not public: the lab describes them
  in a TOML file named by the `register_map` setting (format below). Without it the backend refuses
  to start and says so.

The backend offers the interface of the simulated board (`FeeBackend`, the one FeeIOC uses), so the
IOC, the device and the plans run unchanged on hardware. The sequencer is the host stepping the DAC
register over VME and reading each calibration pulse's hits from the board's output FIFO, in a
thread, far faster than a Channel Access step scan.

Register map file (all addresses are offsets from `vme_base_address`, A32/D32 cycles):

    [registers]
    cal_dac = 0x0040            # calibration DAC register, 16 bit
    cal_fire = 0x0044           # write 1: one calibration pulse into the enabled channels
    cal_mask = 0x0048           # bit c enables the calibration pulse of channel c
    fifo_words = 0x0050         # number of 32-bit words waiting in the output FIFO
    fifo = 0x0054               # output FIFO (each read pops one word)
    thresholds = [0x0100, 0x0104, ...]   # 16 discriminator threshold DAC registers

    [threshold]
    mV_per_code = 0.25          # threshold DAC: mV = (code - offset_code) * mV_per_code
    offset_code = 0

    [hit]                       # one FIFO word per hit: [shift, bits] of each field
    channel = [24, 4]
    kind = [28, 2]              # which value the word carries, codes below
    value = [0, 20]
    tdc_kind = 0                # TDC count (x 1.5625 ns)
    adc_fine_kind = 1           # ADC fine range (x 0.16 pC)
    adc_coarse_kind = 2         # ADC coarse range (x adc_coarse_pC)
    adc_coarse_pC = 0.44
    pulse_timeout_s = 0.01      # wait for a pulse's hits at most this long

A channel's first TDC/ADC pair after a calibration pulse is the direct pulse, the second (later in
time) the reflection from the cable's far end; a channel with no second hit has no reflection.
"""
from __future__ import annotations

import logging
import math
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from calbench.contracts.errors import InstrumentFault, Refused
from calbench.contracts.fee import (DAC_MAX, N_CHANNELS, TDC_LSB_NS, THRESHOLD_RANGE_MV,
                                    PulseResults, SweepResult)

log = logging.getLogger(__name__)


class FeeBackend(Protocol):
    """What FeeIOC needs from a board, simulated (iocs/sim/fee.py) or real (FeeVmeBoard)."""

    thresholds_mV: np.ndarray
    channel_mask: int
    seq_start: int
    seq_stop: int
    seq_step: int

    def set_register(self, code: int) -> None: ...
    def set_threshold(self, channel: int, mV: float) -> None: ...
    def set_channel_mask(self, mask: int) -> None: ...
    def set_sweep_range(self, start: int, stop: int, step: int) -> None: ...
    def start_sweep(self) -> int: ...
    def stop_sweep(self) -> None: ...
    def sweep_status(self) -> tuple[bool, int, int]: ...
    def sweep_result(self) -> SweepResult | None: ...
    def fire(self) -> dict[int, tuple[float, float, float, float]]: ...
    def temperature_C(self) -> float: ...
    def make_safe(self) -> None: ...


def _load_caencomm():
    try:
        from caen_libs import caencomm
    except ImportError as exc:
        raise InstrumentFault(
            "CAEN's Python binding is not installed: `pip install caen-libs`, and install CAEN's "
            "CAENComm and CAENVMELib libraries from caen.it; or run the FEE simulated "
            "(backend = \"sim\")") from exc
    except OSError as exc:
        raise InstrumentFault(f"CAENComm library not loadable ({exc}); install it from caen.it and "
                              "make sure it is on the library path") from exc
    return caencomm


@dataclass(frozen=True)
class RegisterMap:
    """The firmware's register offsets and hit-word layout (the TOML file described above)."""
    cal_dac: int
    cal_fire: int
    cal_mask: int
    fifo_words: int
    fifo: int
    thresholds: tuple[int, ...]
    mV_per_code: float
    offset_code: int
    channel_field: tuple[int, int]
    kind_field: tuple[int, int]
    value_field: tuple[int, int]
    tdc_kind: int
    adc_fine_kind: int
    adc_coarse_kind: int
    adc_coarse_pC: float
    pulse_timeout_s: float = 0.01
    source: str = ""

    @classmethod
    def load(cls, path: str | Path) -> "RegisterMap":
        if not path:
            raise InstrumentFault("no FEE register map: set [instruments.fee] register_map to the "
                                  "TOML file with the firmware's registers and hit format (see "
                                  "calbench/iocs/hw/fee.py)")
        p = Path(path).expanduser()
        try:
            raw = tomllib.loads(p.read_text())
            reg, thr, hit = raw["registers"], raw["threshold"], raw["hit"]
            thresholds = tuple(int(a) for a in reg["thresholds"])
            if len(thresholds) != N_CHANNELS:
                raise ValueError(f"registers.thresholds needs {N_CHANNELS} addresses")
            return cls(int(reg["cal_dac"]), int(reg["cal_fire"]), int(reg["cal_mask"]),
                       int(reg["fifo_words"]), int(reg["fifo"]), thresholds,
                       float(thr["mV_per_code"]), int(thr.get("offset_code", 0)),
                       tuple(hit["channel"]), tuple(hit["kind"]), tuple(hit["value"]),
                       int(hit["tdc_kind"]), int(hit["adc_fine_kind"]), int(hit["adc_coarse_kind"]),
                       float(hit["adc_coarse_pC"]), float(hit.get("pulse_timeout_s", 0.01)), str(p))
        except FileNotFoundError:
            raise InstrumentFault(f"FEE register map {p} not found; fix [instruments.fee] "
                                  "register_map") from None
        except (KeyError, ValueError, TypeError, tomllib.TOMLDecodeError) as exc:
            raise InstrumentFault(f"FEE register map {p} is invalid ({exc!r}); see the format in "
                                  "calbench/iocs/hw/fee.py") from None

    def decode(self, word: int) -> tuple[int, int, int]:
        """(channel, kind, value) of one FIFO word."""
        def field_(spec):
            shift, bits = spec
            return (word >> shift) & ((1 << bits) - 1)
        return field_(self.channel_field), field_(self.kind_field), field_(self.value_field)


@dataclass
class _SweepState:
    registers: np.ndarray
    t_start: float
    results: dict[int, dict[str, np.ndarray]]
    done: int = 0
    running: bool = True
    stop: threading.Event = field(default_factory=threading.Event)
    error: str = ""


class FeeVmeBoard:
    """A Daya Bay FEE board on a CAEN VME bridge (`device` is an open caencomm.Device)."""

    def __init__(self, device, comm, regs: RegisterMap, *, where: str = "FEE"):
        self.device = device
        self.comm = comm
        self.regs = regs
        self.where = where
        self.thresholds_mV = np.full(N_CHANNELS, math.nan)
        self.channel_mask = (1 << N_CHANNELS) - 1
        self.seq_start, self.seq_stop, self.seq_step = 500, 12000, 1
        self.register = 0
        self._lock = threading.Lock()
        self._sweep: _SweepState | None = None
        self._thread: threading.Thread | None = None
        for c, address in enumerate(regs.thresholds):
            self.thresholds_mV[c] = (self._read(address) - regs.offset_code) * regs.mV_per_code
        self.channel_mask = self._read(regs.cal_mask) & ((1 << N_CHANNELS) - 1)

    @classmethod
    def open(cls, *, link: str = "USB", link_number: int = 0, conet_node: int = 0,
             base_address: int = 0, register_map: str = "", comm=None) -> "FeeVmeBoard":
        regs = RegisterMap.load(register_map)
        comm = comm or _load_caencomm()
        where = f"FEE at VME {base_address:#010x} ({link} link {link_number}, node {conet_node})"
        try:
            connection = comm.ConnectionType[link]
        except KeyError:
            raise InstrumentFault(f"unknown CAENComm connection {link!r}; known: "
                                  f"{', '.join(t.name for t in comm.ConnectionType)}") from None
        try:
            device = comm.Device.open(connection, link_number, conet_node, base_address)
        except comm.Error as exc:
            raise InstrumentFault(f"cannot open the {where}: {exc}; check the bridge, the link "
                                  "number and the board's base-address switches") from exc
        return cls(device, comm, regs, where=where)

    # -- VME access --------------------------------------------------------------------------------
    def _read(self, offset: int) -> int:
        try:
            with self._lock:
                return int(self.device.read32(offset))
        except self.comm.Error as exc:
            raise InstrumentFault(f"{self.where}: VME read at {offset:#06x} failed: {exc}") from exc

    def _write(self, offset: int, value: int) -> None:
        try:
            with self._lock:
                self.device.write32(offset, int(value))
        except self.comm.Error as exc:
            raise InstrumentFault(f"{self.where}: VME write at {offset:#06x} failed: {exc}") from exc

    # -- settings ----------------------------------------------------------------------------------
    def set_register(self, code: int) -> None:
        if not float(code).is_integer() or not 0 <= code <= DAC_MAX:
            raise Refused(f"DAC register {code} outside 0..{DAC_MAX}; use an integer in that range")
        self._check_idle("set the DAC")
        self._write(self.regs.cal_dac, int(code))
        self.register = int(code)

    def set_threshold(self, channel: int, mV: float) -> None:
        if not 0 <= channel < N_CHANNELS:
            raise Refused(f"no channel {channel}; the board has channels 0..{N_CHANNELS - 1}")
        lo, hi = THRESHOLD_RANGE_MV
        if not lo <= mV <= hi:
            raise Refused(f"channel {channel}: threshold {mV} mV outside {lo}..{hi} mV")
        code = int(round(mV / self.regs.mV_per_code)) + self.regs.offset_code
        self._write(self.regs.thresholds[channel], code)
        self.thresholds_mV[channel] = (code - self.regs.offset_code) * self.regs.mV_per_code

    def set_channel_mask(self, mask: int) -> None:
        if not 0 < mask < 1 << N_CHANNELS:
            raise Refused(f"channel mask {mask:#x} must enable at least one of the {N_CHANNELS} "
                          f"channels (1..{(1 << N_CHANNELS) - 1:#x})")
        self._check_idle("change the channel mask")
        self._write(self.regs.cal_mask, int(mask))
        self.channel_mask = int(mask)

    def set_sweep_range(self, start: int, stop: int, step: int) -> None:
        for what, value in (("start", start), ("stop", stop)):
            if not float(value).is_integer() or not 0 <= value <= DAC_MAX:
                raise Refused(f"sweep {what} {value} outside the DAC register 0..{DAC_MAX}; "
                              "choose a register in that range")
        if not float(step).is_integer() or step < 1:
            raise Refused(f"sweep step {step} must be a positive integer number of DAC codes")
        self._check_idle("change the sweep range")
        self.seq_start, self.seq_stop, self.seq_step = int(start), int(stop), int(step)

    def temperature_C(self) -> float:
        """The board has no cable thermometer: NaN (a monitor records the temperature elsewhere)."""
        return math.nan

    # -- pulses ------------------------------------------------------------------------------------
    def _pulse(self, channels: list[int]) -> dict[int, tuple[float, float, float, float]]:
        """Fire one calibration pulse and read its hits: per channel (direct pC, ns, reflected
        pC, ns), NaN for a hit that did not come."""
        regs = self.regs
        self._write(regs.cal_fire, 1)
        deadline = time.monotonic() + regs.pulse_timeout_s
        hits: dict[int, list[list[float]]] = {c: [] for c in channels}
        pending: dict[int, list[float]] = {}
        while True:
            n = self._read(regs.fifo_words)
            for _ in range(n):
                channel, kind, value = regs.decode(self._read(regs.fifo))
                if channel not in hits:
                    continue
                hit = pending.setdefault(channel, [math.nan, math.nan])
                if kind == regs.tdc_kind:
                    hit[1] = value * TDC_LSB_NS
                elif kind == regs.adc_fine_kind:
                    hit[0] = value * 0.16
                elif kind == regs.adc_coarse_kind:
                    hit[0] = value * regs.adc_coarse_pC
                else:
                    raise InstrumentFault(f"{self.where}: FIFO word of unknown kind {kind} on "
                                          f"channel {channel}; check the [hit] section of "
                                          f"{regs.source}")
                if not math.isnan(hit[0]) and not math.isnan(hit[1]):
                    hits[channel].append(pending.pop(channel))
            if all(len(h) >= 2 for h in hits.values()) or time.monotonic() > deadline:
                break
        out = {}
        for c, h in hits.items():
            h = sorted(h, key=lambda x: x[1])
            direct = h[0] if h else [math.nan, math.nan]
            reflected = h[1] if len(h) > 1 else [math.nan, math.nan]
            out[c] = (direct[0], direct[1], reflected[0], reflected[1])
        return out

    def fire(self) -> dict[int, tuple[float, float, float, float]]:
        self._check_idle("fire a single pulse")
        return self._pulse(self.enabled_channels())

    def enabled_channels(self) -> list[int]:
        return [c for c in range(N_CHANNELS) if self.channel_mask >> c & 1]

    # -- sequencer ---------------------------------------------------------------------------------
    def start_sweep(self) -> int:
        self._check_idle("start another sweep")
        if self.seq_start > self.seq_stop:
            raise Refused(f"sweep start {self.seq_start} is above stop {self.seq_stop}; "
                          "set Seq:Start <= Seq:Stop")
        registers = np.arange(self.seq_start, self.seq_stop + 1, self.seq_step)
        channels = self.enabled_channels()
        results = {c: {k: np.full(registers.size, np.nan) for k in ("qd", "td", "qr", "tr")}
                   for c in channels}
        state = _SweepState(registers, time.time(), results)
        self._sweep = state
        self._thread = threading.Thread(target=self._run_sweep, args=(state, channels),
                                        name="fee-sweep", daemon=True)
        self._thread.start()
        return int(registers.size)

    def _run_sweep(self, state: _SweepState, channels: list[int]) -> None:
        try:
            for i, code in enumerate(state.registers):
                if state.stop.is_set():
                    break
                self._write(self.regs.cal_dac, int(code))
                for c, (qd, td, qr, tr) in self._pulse(channels).items():
                    arrays = state.results[c]
                    for key, value in zip(("qd", "td", "qr", "tr"), (qd, td, qr, tr)):
                        arrays[key][i] = value
                state.done = i + 1
        except InstrumentFault as exc:
            state.error = str(exc)
            log.error("FEE sweep aborted: %s", exc)
        finally:
            try:
                self._write(self.regs.cal_dac, 0)
            except InstrumentFault:
                log.exception("could not park the FEE DAC at 0")
            state.running = False

    def stop_sweep(self) -> None:
        if self._sweep is not None:
            self._sweep.stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    def sweep_status(self) -> tuple[bool, int, int]:
        s = self._sweep
        if s is None:
            return False, 0, 0
        if s.error:
            raise InstrumentFault(s.error)
        return s.running, s.done, int(s.registers.size)

    def sweep_result(self) -> SweepResult | None:
        s = self._sweep
        if s is None or s.running:
            return None
        n = s.done
        period = (time.time() - s.t_start) / max(n, 1)
        channels = {c: PulseResults(a["qd"][:n], a["td"][:n], a["qr"][:n], a["tr"][:n])
                    for c, a in s.results.items()}
        return SweepResult(s.registers[:n], s.t_start + np.arange(n) * period, period, math.nan,
                           channels, n == s.registers.size)

    def make_safe(self) -> None:
        """Stop the sequencer and park the DAC at 0: no calibration pulses reach the detectors."""
        self.stop_sweep()
        self._write(self.regs.cal_dac, 0)
        self.register = 0

    def _check_idle(self, action: str) -> None:
        if self._sweep is not None and self._sweep.running:
            raise Refused(f"cannot {action}: a sweep is running; wait for Seq:Busy_RBV = 0 or stop "
                          "it (Seq:Acquire = 0)")


def open_fee(settings: dict, *, comm=None) -> FeeVmeBoard:
    """The hardware backend for the lab configuration's [instruments.fee] settings."""
    return FeeVmeBoard.open(link=settings.get("vme_link", "USB"),
                            link_number=int(settings.get("vme_link_number", 0)),
                            conet_node=int(settings.get("vme_conet_node", 0)),
                            base_address=int(settings.get("vme_base_address", 0)),
                            register_map=settings.get("register_map", ""), comm=comm)
