"""The BatMet at its serial interface, as a pyserial port answers (`write`, `readline`): the
firmware's text protocol driving the sink of iocs/sim/bench_circuit.py, through a link with fault
injection (iocs/sim/bench_links.py).
"""
from __future__ import annotations

import math
import re

from calbench.iocs.sim.bench_circuit import DAC_CODES
from calbench.iocs.sim.bench_links import SimLink


class SimBatmetPort(SimLink):
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
