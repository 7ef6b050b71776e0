"""The bench's SCPI instruments at their text interface, as a VISA resource answers (`write`,
`read`, `query`): the HP/Agilent 34401A multimeter and the Agilent E3632A supply, on the circuit of
iocs/sim/bench_circuit.py, through a link with fault injection (iocs/sim/bench_links.py).
"""
from __future__ import annotations

import math
import re

from calbench.contracts.bench_instruments import (CURRENT_RANGES_A, NPLC_VALUES, OVERLOAD, SUPPLY_MAX_A,
                                                  SUPPLY_MAX_V, VOLTAGE_RANGES_V)
from calbench.iocs.sim.bench_circuit import METER_FLOOR_A, METER_IDN, SUPPLY_IDN
from calbench.iocs.sim.bench_links import LinkTimeout, SimLink


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


class _SimScpiResource(SimLink):
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
        return CURRENT_RANGES_A if function == "CURR" else VOLTAGE_RANGES_V

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
                allowed = [n for n in NPLC_VALUES if n >= value * 0.999]
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
                for _ in range(len(CURRENT_RANGES_A)):
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
        ranges = CURRENT_RANGES_A
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

