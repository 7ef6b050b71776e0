# To be split (issue 15): circuit physics, SCPI/serial emulation and fault injection of the BatMet bench.
"""The bench world: lab supply -> BatMet current sink -> HP/Agilent 34401A multimeter, in series.

The circuit the lab wires for the BatMet current-sink calibration (reference/qc6_batmet.md part B): a
lab supply at 4 V with a 3 A limit feeds the BatMet's sink through the meter's current input. The
physics:

- **Sink.** The BatMet's 12-bit DAC drives a voltage-controlled current sink. Its transfer is the one
  the firmware's `csink min max a b c` inverts: the DAC code that gives current I is
  ``a*I**2 + b*I + c`` (about 763 codes per ampere, a small quadratic term, an offset c of about 520
  codes: the op-amp output stays at 0 below it, the *dead zone*). On top, the DAC's integral
  non-linearity (INL): a code-dependent error of about 1.5 LSB that no quadratic can follow, so the
  calibrated sink is accurate to about 2 mA, as the reference says. Each seed draws its own unit
  (a, b, c, INL) around the reference's `csink 0 4 0.209938 762.136354 522.857571`.
- **Quiescent current.** The BatMet's PSUPPLY divider (77 kOhm) draws V/R from the supply through the
  meter: about 52 uA at 4 V, the reading of the README's first line (DAC 450 -> 5.19e-5 A).
- **Supply.** CV at its voltage setpoint until the load wants more than its (slightly miscalibrated)
  current limit, then CC: the current clamps at the limit, the voltage drops, and the supply reports
  it (SCPI questionable-status bit 0, as the Agilent E3632A). Output off: no current at all.
- **Compliance.** The sink needs a little headroom; the series resistance is the meter's shunt
  (5 Ohm on the 10 mA and 100 mA ranges, 0.1 Ohm on 1 A and 3 A), the wires and the sense resistor.
- **Meter.** Noise ~1e-5 of the reading plus a floor set by the range, scaled by sqrt(10/NPLC);
  autorange with the 34401A's hysteresis (up above 120 % of the range, down below 10 %); a reading
  takes NPLC line cycles plus the range changes, in world time; overload reads +9.90000000E+37.

The instruments are simulated at their text interfaces: `Sim34401A` and `SimE3632A` answer SCPI
strings like a VISA resource (`write`, `read`, `query`), `SimBatmetPort` answers the BatMet firmware's
serial protocol like a pyserial port (`write`, `readline`). The hardware drivers (iocs/hw/) run on
top of them unchanged, so their parsing and validation are exercised by every simulated run. Each
link has fault injection (`LinkFaults`): garbled replies, timeouts, an absent instrument, another
identity. All randomness comes from the world seed.
"""
from __future__ import annotations

import math
import re
import threading
import time
from dataclasses import dataclass

import numpy as np

from calbench.contracts.clock import WorldClock

DAC_CODES = 4096
METER_RANGES_A = (0.01, 0.1, 1.0, 3.0)          # 34401A DC current ranges
METER_SHUNT_OHM = {0.01: 5.0, 0.1: 5.0, 1.0: 0.1, 3.0: 0.1}
METER_FLOOR_A = {0.01: 3e-8, 0.1: 3e-7, 1.0: 3e-6, 3.0: 9e-6}   # noise floor at NPLC 10
METER_VOLT_RANGES_V = (0.1, 1.0, 10.0, 100.0, 1000.0)
METER_NPLC = (0.02, 0.2, 1.0, 10.0, 100.0)
OVERLOAD = 9.9e37
METER_IDN = "HEWLETT-PACKARD,34401A,0,11-5-2"
SUPPLY_IDN = "Agilent Technologies,E3632A,0,1.5-5.0-1.0"
SUPPLY_MAX_V = 15.0        # E3632A 15 V / 7 A range
SUPPLY_MAX_A = 7.0


# -- physics -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SinkTransfer:
    """The BatMet sink of one unit: DAC code needed for current I is a*I**2 + b*I + c, plus INL.

    a: codes/A^2, b: codes/A, c: codes (the dead-zone edge). inl_*: the DAC's integral
    non-linearity as a sum of sines over the code range (amplitudes in LSB)."""
    a: float
    b: float
    c: float
    inl_amplitude: tuple[float, ...]
    inl_cycles: tuple[int, ...]
    inl_phase: tuple[float, ...]
    sense_ohm: float = 0.1
    headroom_V: float = 0.3

    def inl(self, dac: float) -> float:
        """Integral non-linearity at a DAC code (LSB): the code the sink effectively sees is
        dac + inl(dac)."""
        return float(sum(A * math.sin(2 * math.pi * k * dac / DAC_CODES + p)
                         for A, k, p in zip(self.inl_amplitude, self.inl_cycles, self.inl_phase)))

    def demand_A(self, dac: int) -> float:
        """Current (A) the sink regulates to at a DAC code, given enough supply voltage."""
        if dac <= 0:
            return 0.0
        e = dac + self.inl(dac) - self.c
        if e <= 0:
            return 0.0          # dead zone: the op-amp output sits at 0
        if self.a == 0:
            return e / self.b
        # positive root of a*I^2 + b*I - e = 0, written to stay accurate for small a*e
        return 2 * e / (self.b + math.sqrt(self.b * self.b + 4 * self.a * e))

    def dac_for(self, current_A: float) -> float:
        """The nominal transfer (no INL): DAC code for a current (A)."""
        return self.a * current_A ** 2 + self.b * current_A + self.c


def draw_sink(rng: np.random.Generator) -> SinkTransfer:
    """One BatMet unit around the reference's calibration `csink 0 4 0.209938 762.136354 522.857571`."""
    cycles = (4, 8, 16, 32)      # DAC segment structure: no low-order polynomial follows it
    return SinkTransfer(
        a=float(0.21 + 0.05 * rng.normal()),
        b=float(762.136 * (1 + 0.01 * rng.normal())),
        c=float(522.86 + 6.0 * rng.normal()),
        inl_amplitude=tuple(float(x) for x in rng.normal(0.0, 0.5, len(cycles))),
        inl_cycles=cycles,
        inl_phase=tuple(float(x) for x in rng.uniform(0, 2 * math.pi, len(cycles))),
    )


@dataclass
class SupplyState:
    """The lab supply: setpoints, output switch and the true (miscalibrated) current limit."""
    voltage_V: float = 4.0
    current_limit_A: float = 3.0
    output_on: bool = False
    limit_gain: float = 1.0          # true limit = limit_gain * setpoint + limit_offset_A
    limit_offset_A: float = 0.0
    voltage_gain: float = 1.0

    def true_limit_A(self) -> float:
        return max(0.0, self.limit_gain * self.current_limit_A + self.limit_offset_A)


@dataclass(frozen=True)
class OperatingPoint:
    """The series circuit now: one current through supply, meter and BatMet."""
    current_A: float
    supply_V: float        # at the supply terminals
    batmet_V: float        # at the BatMet's input (after meter shunt and wires)
    sink_A: float          # through the sense resistor
    mode: str              # "OFF", "CV" or "CC"


class BenchWorld:
    """The circuit: supply -> meter current input -> BatMet (sink + PSUPPLY divider)."""

    quiescent_ohm = 77e3
    wire_ohm = 0.05

    def __init__(self, clock: WorldClock, seed: int):
        self.clock = clock
        seq = np.random.SeedSequence([seed, 0xBA73E7])
        unit, supply, meter, faults = (np.random.default_rng(s) for s in seq.spawn(4))
        self.sink = draw_sink(unit)
        self.supply = SupplyState(limit_gain=float(1 + 0.002 * supply.normal()),
                                  limit_offset_A=float(supply.uniform(-0.005, 0.010)),
                                  voltage_gain=float(1 + 0.0005 * supply.normal()))
        self.meter_rng = meter
        self.fault_rng = faults
        self.dac = 0
        self.meter_range_A = 3.0        # the shunt in circuit (the meter keeps its last range)
        self.lock = threading.RLock()   # instruments are driven from several threads

    def operating_point(self) -> OperatingPoint:
        """Solve the series circuit for the present settings."""
        s = self.supply
        if not s.output_on:
            return OperatingPoint(0.0, 0.0, 0.0, 0.0, "OFF")
        v_set = s.voltage_V * s.voltage_gain
        r_series = METER_SHUNT_OHM[self.meter_range_A] + self.wire_ohm
        sink = self.sink.demand_A(self.dac)
        # the sink cannot pull more than its headroom allows
        r_loop = r_series + self.sink.sense_ohm
        sink = min(sink, max(0.0, (v_set - self.sink.headroom_V) / r_loop))
        quiescent = v_set / self.quiescent_ohm
        current = sink + quiescent
        limit = s.true_limit_A()
        if current <= limit:
            v_batmet = v_set - current * r_series
            return OperatingPoint(current, v_set, v_batmet, sink, "CV")
        # constant current: the sink leaves regulation, the supply voltage sags to what the
        # clamped current needs
        sink_cc = max(0.0, limit - quiescent)
        v_out = min(v_set, self.sink.headroom_V + limit * r_loop)
        return OperatingPoint(limit, v_out, v_out - limit * r_series, sink_cc, "CC")


# -- links: text interfaces with fault injection ----------------------------------------------------

class LinkTimeout(TimeoutError):
    """No reply within the link's timeout (what pyvisa reports as VI_ERROR_TMO)."""


@dataclass
class LinkFaults:
    """Fault injection on one instrument link (set by tests, or through the IOCs' Sim: PVs)."""
    garble_next: int = 0        # the next N replies arrive corrupted
    timeout_next: int = 0       # the next N replies never arrive
    absent: bool = False        # nothing answers (cable out, instrument off)
    identity: str = ""          # when set, *IDN? (or help) answers this instead


class _SimLink:
    """Common part of the simulated links: reply queue, timeouts, garbling, world-time delays."""

    def __init__(self, world: BenchWorld, name: str, timeout_s: float = 2.0):
        self.world = world
        self.name = name
        self.faults = LinkFaults()
        self.timeout_s = timeout_s
        self._replies: list[str] = []
        self._busy_s = 0.0

    def _sleep(self, world_s: float) -> None:
        if world_s > 0:
            time.sleep(self.world.clock.wall_seconds(world_s))

    def _push(self, reply: str) -> None:
        f = self.faults
        if f.absent:
            return
        if f.timeout_next > 0:
            f.timeout_next -= 1
            return
        if f.garble_next > 0:
            f.garble_next -= 1
            reply = _garble(reply, self.world.fault_rng)
        self._replies.append(reply)

    def _take(self) -> str | None:
        """The next reply, or None after the link's timeout (world time, accelerated)."""
        with self.world.lock:
            reply = self._replies.pop(0) if self._replies else None
        if reply is None:
            self._sleep(self.timeout_s)
        return reply

    def _run(self, execute) -> None:
        """Run firmware under the world lock, then let the instrument's busy time pass outside it
        (other instruments keep working meanwhile)."""
        with self.world.lock:
            self._busy_s = 0.0
            execute()
            busy = self._busy_s
        self._sleep(busy)

    def clear(self) -> None:
        """Drop pending replies (a VISA device clear / pyserial reset_input_buffer)."""
        with self.world.lock:
            self._replies.clear()


def _garble(reply: str, rng: np.random.Generator) -> str:
    """Corrupt a reply the way a bad RS-232 link does: a dropped and a flipped character."""
    chars = list(reply) or ["?"]
    i = int(rng.integers(len(chars)))
    chars[i] = "\x1a"                                  # framing error shows up as a SUB byte
    if len(chars) > 3:
        del chars[int(rng.integers(1, len(chars)))]
    return "".join(chars) + "#"


_SCPI_SHORT = {
    "SYSTEM": "SYST", "REMOTE": "REM", "LOCAL": "LOC", "ERROR": "ERR", "DISPLAY": "DISP",
    "CLEAR": "CLE", "MEASURE": "MEAS", "CURRENT": "CURR", "VOLTAGE": "VOLT",
    "CONFIGURE": "CONF", "RANGE": "RANG", "OUTPUT": "OUTP", "STATE": "STAT", "STATUS": "STAT",
    "QUESTIONABLE": "QUES", "CONDITION": "COND", "NPLCYCLES": "NPLC", "SENSE": "SENS",
    "SOURCE": "SOUR", "LEVEL": "LEV", "IMMEDIATE": "IMM", "AMPLITUDE": "AMPL",
}


class ScpiError(Exception):
    """A command the simulated instrument puts in its error queue (code, message)."""

    def __init__(self, code: int, message: str):
        super().__init__(f'{code:+d},"{message}"')
        self.code = code


def scpi_split(command: str) -> tuple[str, str]:
    """Normalise a SCPI command to (short-form header, arguments), e.g.
    ':MEASURE:CURRENT:DC? 3' -> ('MEAS:CURR:DC?', '3'); optional SENS:/SOUR:/LEV:/IMM:/AMPL nodes
    are dropped."""
    command = command.strip()
    header, _, args = command.partition(" ")
    header = header.upper().lstrip(":")
    query = header.endswith("?")
    nodes = [_SCPI_SHORT.get(n, n) for n in header.rstrip("?").split(":") if n]
    nodes = [n for i, n in enumerate(nodes)
             if not (i == 0 and n in ("SENS", "SOUR")) and n not in ("LEV", "IMM", "AMPL")]
    return ":".join(nodes) + ("?" if query else ""), args.strip()


class _SimScpiResource(_SimLink):
    """A SCPI instrument behind a message-based link: write(), read(), query() like pyvisa."""

    identity = ""

    def __init__(self, world, name, timeout_s=2.0):
        super().__init__(world, name, timeout_s)
        self.errors: list[str] = []
        self.remote = False

    # pyvisa MessageBasedResource subset
    def write(self, command: str) -> int:
        if not self.faults.absent:
            self._run(lambda: self._command(command))
        return len(command)

    def read(self) -> str:
        reply = self._take()
        if reply is None:
            raise LinkTimeout(f"{self.name}: no reply within {self.timeout_s:g} s")
        return reply

    def query(self, command: str) -> str:
        self.write(command)
        return self.read()

    def close(self) -> None:
        self.clear()

    # instrument firmware
    def _command(self, command: str) -> None:
        header, args = scpi_split(command)
        try:
            reply = self._execute(header, args)
        except ScpiError as exc:
            self.errors.append(str(exc))
            del self.errors[:-20]          # the 34401A keeps 20 errors
            return
        if reply is not None:
            self._push(reply)

    def _common(self, header: str, args: str) -> str | None:
        if header == "*IDN?":
            return self.faults.identity or self.identity
        if header == "*CLS":
            self.errors.clear()
            return None
        if header == "SYST:ERR?":
            return self.errors.pop(0) if self.errors else '+0,"No error"'
        if header == "SYST:REM":
            self.remote = True
            return None
        if header == "SYST:LOC":
            self.remote = False
            return None
        raise ScpiError(-113, "Undefined header")

    def _execute(self, header: str, args: str) -> str | None:
        return self._common(header, args)


def _number(args: str) -> float:
    try:
        value = float(args.split(",")[0])
    except ValueError:
        raise ScpiError(-224, "Illegal parameter value") from None
    if not math.isfinite(value):
        raise ScpiError(-224, "Illegal parameter value")
    return value


class Sim34401A(_SimScpiResource):
    """The 34401A's SCPI subset the lab uses (MEAS?, CONF/READ?, NPLC, ranges, DISP:TEXT, SYST)."""

    identity = METER_IDN
    line_frequency_Hz = 50.0
    overhead_s = 0.03            # trigger and reply formatting per reading
    range_change_s = 0.02        # relay settling per autorange step
    relative_noise = 1e-5

    def __init__(self, world, timeout_s=2.0):
        super().__init__(world, "34401A", timeout_s)
        self._reset()

    def _reset(self) -> None:
        self.function = "CURR"          # CURR or VOLT (DC)
        self.auto_range = True
        self.range = {"CURR": 1.0, "VOLT": 10.0}
        self.nplc = {"CURR": 10.0, "VOLT": 10.0}
        self.display_text = ""

    def _ranges(self, function: str) -> tuple[float, ...]:
        return METER_RANGES_A if function == "CURR" else METER_VOLT_RANGES_V

    def _select_range(self, function: str, arg: str) -> None:
        """Apply a range parameter (MIN, MAX, DEF, AUTO or a value in A / V)."""
        ranges = self._ranges(function)
        arg = arg.split(",")[0].strip().upper()
        if arg in ("", "DEF", "AUTO"):
            self.auto_range = True
            return
        self.auto_range = False
        if arg == "MIN":
            self.range[function] = ranges[0]
        elif arg == "MAX":
            self.range[function] = ranges[-1]
        else:
            value = abs(_number(arg))
            fitting = [r for r in ranges if r >= value]
            if not fitting:
                raise ScpiError(-222, "Data out of range")
            self.range[function] = fitting[0]

    def _execute(self, header: str, args: str) -> str | None:
        if header == "*RST":
            self._reset()
            return None
        if header in ("DISP:TEXT", "DISP:TEXT:DATA"):
            m = re.fullmatch(r'"([^"]*)"|\'([^\']*)\'', args)
            if m is None:
                raise ScpiError(-151, "Invalid string data")
            text = m.group(1) if m.group(1) is not None else m.group(2)
            if len(text) > 12:
                raise ScpiError(-223, "Too much data")
            self.display_text = text
            return None
        if header == "DISP:TEXT:CLE":
            self.display_text = ""
            return None
        m = re.fullmatch(r"(MEAS|CONF):(CURR|VOLT)(:DC)?(\?)?", header)
        if m and (m.group(1) == "MEAS") == bool(m.group(4)):
            self.function = m.group(2)
            self._select_range(self.function, args)
            return self._reading() if m.group(1) == "MEAS" else None
        if header in ("READ?", "MEAS?"):
            return self._reading()
        if header == "CONF?":
            r = self.range[self.function]
            return f'"{self.function} {r:+.6E},{r * 3e-6:+.6E}"'
        m = re.fullmatch(r"(CURR|VOLT)(:DC)?:(NPLC|RANG|RANG:AUTO)(\?)?", header)
        if m:
            function, what, query = m.group(1), m.group(3), bool(m.group(4))
            if what == "NPLC":
                if query:
                    return f"{self.nplc[function]:+.8E}"
                value = _number(args)
                allowed = [n for n in METER_NPLC if n >= value * 0.999]
                if not allowed:
                    raise ScpiError(-222, "Data out of range")
                self.nplc[function] = allowed[0]
                return None
            if what == "RANG":
                if query:
                    return f"{self.range[function]:+.8E}"
                self._select_range(function, args)
                return None
            if query:
                return "1" if self.auto_range else "0"
            self.auto_range = args.strip().upper() in ("ON", "1")
            return None
        return self._common(header, args)

    def _reading(self) -> str:
        """One reading of the configured function, taking its integration time in world time."""
        world = self.world
        function = self.function
        ranges = self._ranges(function)
        if function == "CURR":
            steps = 0
            if self.auto_range:
                # the shunt of the new range changes the circuit's current: settle like the meter
                for _ in range(len(METER_RANGES_A)):
                    step = self._autorange(abs(world.operating_point().current_A))
                    world.meter_range_A = self.range["CURR"]
                    steps += step
                    if step == 0:
                        break
            world.meter_range_A = self.range["CURR"]
            true_value = world.operating_point().current_A
            floor = METER_FLOOR_A[self.range["CURR"]]
        else:
            steps = 0
            true_value = 0.0         # the voltage input is not wired in this circuit
            if self.auto_range:
                self.range["VOLT"] = ranges[0]
            floor = 3e-6 * self.range["VOLT"]
        nplc = self.nplc[function]
        self._busy_s += nplc / self.line_frequency_Hz + self.overhead_s + steps * self.range_change_s
        if abs(true_value) > 1.2 * self.range[function]:
            return f"{OVERLOAD:+.8E}"
        sigma = (self.relative_noise * abs(true_value) + floor) * math.sqrt(10.0 / nplc)
        return f"{true_value + world.meter_rng.normal(0.0, sigma):+.8E}"

    def _autorange(self, current_A: float) -> int:
        """34401A autorange: up above 120 % of the range, down below 10 %; returns the steps."""
        ranges = METER_RANGES_A
        i = ranges.index(self.range["CURR"])
        start = i
        while i < len(ranges) - 1 and current_A > 1.2 * ranges[i]:
            i += 1
        while i > 0 and current_A < 0.1 * ranges[i]:
            i -= 1
        self.range["CURR"] = ranges[i]
        return abs(i - start)


class SimE3632A(_SimScpiResource):
    """A single-output SCPI lab supply (Agilent E3632A command set)."""

    identity = SUPPLY_IDN
    meas_s = 0.05

    def __init__(self, world, timeout_s=2.0):
        super().__init__(world, "E3632A", timeout_s)

    def _execute(self, header: str, args: str) -> str | None:
        s = self.world.supply
        if header == "*RST":
            s.output_on, s.voltage_V, s.current_limit_A = False, 0.0, SUPPLY_MAX_A
            return None
        if header == "VOLT":
            value = _number(args)
            if not 0 <= value <= SUPPLY_MAX_V * 1.03:
                raise ScpiError(-222, "Data out of range")
            s.voltage_V = value
            return None
        if header == "CURR":
            value = _number(args)
            if not 0 <= value <= SUPPLY_MAX_A * 1.03:
                raise ScpiError(-222, "Data out of range")
            s.current_limit_A = value
            return None
        if header == "VOLT?":
            return f"{s.voltage_V:+.8E}"
        if header == "CURR?":
            return f"{s.current_limit_A:+.8E}"
        if header in ("OUTP", "OUTP:STAT"):
            word = args.strip().upper()
            if word not in ("ON", "OFF", "1", "0"):
                raise ScpiError(-224, "Illegal parameter value")
            s.output_on = word in ("ON", "1")
            return None
        if header in ("OUTP?", "OUTP:STAT?"):
            return "1" if s.output_on else "0"
        if header in ("MEAS:VOLT?", "MEAS:VOLT:DC?", "MEAS:CURR?", "MEAS:CURR:DC?"):
            self._busy_s += self.meas_s
            op = self.world.operating_point()
            rng = self.world.meter_rng
            if header.startswith("MEAS:VOLT"):
                return f"{op.supply_V + rng.normal(0, 2e-4):+.8E}"
            return f"{op.current_A + rng.normal(0, 2e-4):+.8E}"
        if header == "STAT:QUES:COND?":
            # bit 0: voltage unregulated (CC), bit 1: current unregulated (CV)
            mode = self.world.operating_point().mode
            return {"CC": "1", "CV": "2"}.get(mode, "0")
        return self._common(header, args)


class SimBatmetPort(_SimLink):
    """The BatMet's USB serial port running its firmware's text protocol (115200 baud, lines end
    in CR LF): help, `d <0..4095>`, `sink <A>`, `csink min max a b c`, `a` (ADC channels)."""

    help_text = ("Supported commands: help, d <0..4095>, sink <amps>, "
                 "csink <min> <max> <a> <b> <c>, a")

    def __init__(self, world, timeout_s=2.0):
        super().__init__(world, "BatMet", timeout_s)
        self.calibration: tuple[float, float, float, float, float] | None = None
        self._rx = b""
        self.baudrate = 115200

    # pyserial Serial subset
    @property
    def timeout(self) -> float:
        return self.timeout_s

    @timeout.setter
    def timeout(self, value: float) -> None:
        self.timeout_s = float(value)

    def write(self, data: bytes) -> int:
        def receive():
            self._rx += bytes(data)
            while b"\n" in self._rx:
                line, _, self._rx = self._rx.partition(b"\n")
                if not self.faults.absent:
                    for reply in self._execute(line.decode("ascii", "replace").strip()):
                        self._push(reply)
        self._run(receive)
        return len(data)

    def readline(self) -> bytes:
        reply = self._take()
        if reply is None:
            return b""                        # pyserial returns b"" after its timeout
        return reply.encode("latin-1", "replace") + b"\r\n"

    @property
    def in_waiting(self) -> int:
        return sum(len(r) + 2 for r in self._replies)

    def reset_input_buffer(self) -> None:
        self.clear()

    def close(self) -> None:
        self.clear()

    # firmware
    def _execute(self, line: str) -> list[str]:
        world = self.world
        if not line:
            return []
        cmd, *args = line.split()
        if cmd == "help":
            return [self.faults.identity or self.help_text]
        if cmd == "d":
            if len(args) != 1 or not re.fullmatch(r"\d+", args[0]) or int(args[0]) >= DAC_CODES:
                return ["Invalid value"]
            world.dac = int(args[0])
            return [f"dac {world.dac}"]
        if cmd == "sink":
            try:
                current = float(args[0]) if len(args) == 1 else math.nan
            except ValueError:
                current = math.nan
            if not math.isfinite(current):
                return ["Invalid value"]
            if self.calibration is None:
                return ["Not calibrated"]
            lo, hi, a, b, c = self.calibration
            if current < lo:
                return ["Too low"]
            if current > hi:
                return ["Too high"]
            code = int(a * current * current + b * current + c + 0.5)
            world.dac = min(max(code, 0), DAC_CODES - 1)
            return [f"dac {world.dac}"]
        if cmd == "csink":
            try:
                values = tuple(float(x) for x in args)
            except ValueError:
                values = ()
            if len(values) != 5 or not all(math.isfinite(v) for v in values):
                return ["Invalid value"]
            self.calibration = values       # firmware: settings key cal/dac
            return ["Calibration saved"]
        if cmd == "a":
            op = world.operating_point()
            noise = world.meter_rng.normal(0.0, 1e-3, 3)
            sense = op.sink_A * world.sink.sense_ohm
            return [f"EXT={noise[0]:.4f} PSUPPLY={op.batmet_V + noise[1]:.4f} "
                    f"SENS={sense + noise[2] * 0.1:.4f}"]
        return [f"Unknown command: {cmd}"]


@dataclass
class BenchHandles:
    """The simulated bench's parts, for tests that read the hidden truth or inject faults."""
    world: BenchWorld
    meter: Sim34401A
    supply: SimE3632A
    batmet: SimBatmetPort


def build_bench(clock: WorldClock, seed: int, timeout_s: float = 2.0) -> BenchHandles:
    """The bench's simulated instruments (text interfaces) on one world."""
    world = BenchWorld(clock, seed)
    return BenchHandles(world, Sim34401A(world, timeout_s), SimE3632A(world, timeout_s),
                        SimBatmetPort(world, timeout_s))
