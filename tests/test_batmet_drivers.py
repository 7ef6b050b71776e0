"""The bench's hardware drivers at the VISA and serial level, and the simulated bench's physics.

SCPI drivers run against pyvisa-sim (iocs/hw/sim_instruments.yaml, the package's own definitions);
the BatMet driver against pyserial's loop:// port and the in-process firmware fake of the simulated
bench. No IOC is involved.
"""
from __future__ import annotations

import math
import time

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from calbench.contracts.errors import InstrumentFault, Refused
from calbench.iocs.hw.agilent34401a import open_34401a
from calbench.iocs.hw.batmet_serial import BatmetSerial, open_batmet
from calbench.iocs.hw.scpi import READING_RE, ScpiLink, parse_reading
from calbench.iocs.hw.scpi_psu import open_scpi_psu
from calbench.iocs.sim.bench import BenchWorld, SimBatmetPort, build_bench, scpi_split
from calbench.contracts.clock import WorldClock


def visa_meter(resource: str):
    return open_34401a({"resource": resource, "visa_library": "sim", "timeout_s": 0.3})


# -- 34401A and supply over VISA (pyvisa-sim) -------------------------------------------------------

def test_34401a_over_visa_identifies_configures_and_reads():
    dmm = visa_meter("ASRL1::INSTR")
    assert dmm.open() == "HEWLETT-PACKARD,34401A,0,11-5-2"
    readings = dmm.read_samples(3)
    assert readings.shape == (3,) and np.all((readings >= 0) & (readings <= 3))
    assert 0 <= dmm.measure_current() <= 3
    assert dmm.range_in_use() == 3.0
    dmm.display("DAC-450")
    with pytest.raises(Refused, match="at most 12 printable characters"):
        dmm.display("DAC-450 and more")
    with pytest.raises(Refused, match="no 5 A range"):
        dmm.configure(range_=5.0)
    with pytest.raises(Refused, match="NPLC 3 not available"):
        dmm.configure(nplc=3)
    with pytest.raises(Refused, match="use 1..100"):
        dmm.read_samples(0)
    dmm.close()
    assert not dmm.is_open


def test_a_meter_that_is_not_a_34401a_is_refused():
    with pytest.raises(InstrumentFault, match=r"There is no 34401A multimeter connected to "
                                              r"ASRL2::INSTR: \*IDN\? answered 'FLUKE,8846A"):
        visa_meter("ASRL2::INSTR").open()


def test_garbled_and_out_of_range_replies_are_faults():
    dmm = visa_meter("ASRL3::INSTR")
    dmm.open()
    with pytest.raises(InstrumentFault, match=r"garbled reply '\+1.40#07706E-0' .* to READ\?"):
        dmm.read()
    # a well-formed number no 34401A current range can produce
    with pytest.raises(InstrumentFault, match=r"implausible reading \+5.00000000E\+02"):
        dmm.measure_current()


def test_errors_logged_by_the_meter_are_reported():
    # this 34401A does not know CONF/NPLC: its error queue says so after configuration
    with pytest.raises(InstrumentFault, match=r'-113,"Undefined header".*after CONF:CURR:DC AUTO'):
        visa_meter("ASRL5::INSTR").open()


@pytest.mark.filterwarnings("ignore:read string doesn't end with termination characters")
def test_missing_resource_and_silent_query():
    # pyvisa-sim opens any serial resource; nothing answers on one it does not define
    with pytest.raises(InstrumentFault, match=r"There is no 34401A multimeter connected to "
                                              r"ASRL9::INSTR: no answer to \*IDN\?"):
        visa_meter("ASRL9::INSTR").open()
    from calbench.iocs.hw.ports import open_visa_resource
    link = ScpiLink(lambda: open_visa_resource(
        resource="ASRL1::INSTR", visa_library="sim", baud_rate=9600, timeout_s=0.2,
        vid_pid="067b:2303", what="meter", setting="x"), what="34401A multimeter",
        port="ASRL1::INSTR")
    with pytest.raises(InstrumentFault, match=r"no answer from the 34401A multimeter on "
                                              r"ASRL1::INSTR to BOGUS\?"):
        link.query("BOGUS?")
    assert link.error_queue() == ['-113,"Undefined header"']


def test_supply_over_visa():
    psu = open_scpi_psu({"resource": "ASRL4::INSTR", "visa_library": "sim", "timeout_s": 0.3,
                         "idn_contains": "E3632A"})
    assert "E3632A" in psu.open()
    psu.set_voltage(4.0)
    psu.set_current_limit(3.0)
    psu.set_output(True)
    r = psu.read()
    assert (r.voltage_setpoint_V, r.current_limit_A, r.output_on, r.mode) == (4.0, 3.0, True, "CV")
    with pytest.raises(Refused, match="20 V outside 0..15 V"):
        psu.set_voltage(20.0)
    with pytest.raises(Refused, match="8 A outside 0..7 A"):
        psu.set_current_limit(8.0)
    psu.make_safe()
    assert not psu.read().output_on
    wrong = open_scpi_psu({"resource": "ASRL1::INSTR", "visa_library": "sim",
                           "idn_contains": "E3632A"})
    with pytest.raises(InstrumentFault, match="HEWLETT-PACKARD.*not the configured supply"):
        wrong.open()


@given(st.floats(-3.6, 3.6, allow_nan=False).filter(lambda v: v == 0 or abs(v) >= 1e-99))
def test_readings_in_the_34401a_format_parse_back(value):
    text = f"{value:+.8E}"
    assert READING_RE.fullmatch(text)
    assert parse_reading(text, command="READ?", where="x") == float(text)


@given(st.text(max_size=20).filter(lambda s: not READING_RE.fullmatch(s.strip())))
def test_anything_else_is_a_garbled_reading(text):
    with pytest.raises(InstrumentFault, match="garbled reply"):
        parse_reading(text, command="READ?", where="x")


# -- BatMet over a serial port ----------------------------------------------------------------------

@pytest.fixture
def firmware():
    """The simulated BatMet firmware behind a fake serial port (world at 100x, short timeouts)."""
    world = BenchWorld(WorldClock(100.0), seed=5)
    return SimBatmetPort(world, timeout_s=0.5)


def test_batmet_protocol_over_the_fake_port(firmware):
    bat = BatmetSerial(lambda: firmware, port="fake")
    assert bat.open().startswith("Supported commands")
    assert bat.set_dac(1234) == 1234 and firmware.world.dac == 1234
    with pytest.raises(Refused, match="outside 0..4095"):
        bat.set_dac(4096)
    with pytest.raises(Refused, match="not calibrated"):
        bat.sink(1.0)
    line = bat.write_calibration(0, 4, 0.209938, 762.136354, 522.857571)
    assert line == "csink 0 4 0.209938 762.136354 522.857571"
    assert bat.sink(3.0) == 2811 == firmware.world.dac      # the reference's check
    with pytest.raises(Refused, match="above the calibrated range 0..4 A"):
        bat.sink(4.5)
    with pytest.raises(Refused, match="must rise with current"):
        bat.write_calibration(0, 4, -200.0, 762.0, 522.0)
    adc = bat.read_adc()
    assert set(adc) == {"EXT", "PSUPPLY", "SENS"}
    bat.make_safe()
    assert firmware.world.dac == 0


def test_batmet_garbled_reply_and_timeout(firmware):
    bat = BatmetSerial(lambda: firmware, port="fake")
    bat.open()
    firmware.faults.garble_next = 1
    with pytest.raises(InstrumentFault, match=r"garbled reply .* to 'd 100'"):
        bat.set_dac(100)
    assert bat.set_dac(100) == 100            # the next command works again
    firmware.faults.absent = True
    t0 = time.monotonic()
    with pytest.raises(InstrumentFault, match=r"no answer from the BatMet on fake to 'd 5'"):
        bat.set_dac(5)
    assert time.monotonic() - t0 < 1.0       # 0.5 s world timeout at 100x
    firmware.faults.absent = False
    firmware.faults.identity = "Zephyr shell: unknown"
    with pytest.raises(InstrumentFault, match="no BatMet answers on fake"):
        bat.reconnect()


def test_a_port_that_only_echoes_is_not_a_batmet():
    """pyserial's loop:// port sends every command straight back: no firmware behind it."""
    bat = open_batmet({"port": "loop://", "timeout_s": 0.1})
    with pytest.raises(InstrumentFault, match=r"no BatMet answers on loop://: `help` got 'help'"):
        bat.open()


class EchoingPort:
    """A shell that echoes each command line before answering (as an interactive shell may)."""

    def __init__(self, port):
        self.port = port
        self.echo = []

    def write(self, data):
        self.echo.append(data.decode().strip())
        return self.port.write(data)

    def readline(self):
        if self.echo:
            return self.echo.pop(0).encode() + b"\r\n"
        return self.port.readline()

    def reset_input_buffer(self):
        self.echo.clear()
        self.port.reset_input_buffer()

    def close(self):
        self.port.close()


def test_echoed_commands_are_skipped(firmware):
    bat = BatmetSerial(lambda: EchoingPort(firmware), port="echo")
    assert bat.open().startswith("Supported commands")
    assert bat.set_dac(777) == 777 and firmware.world.dac == 777


# -- the simulated bench's physics ------------------------------------------------------------------

def test_bench_physics_dead_zone_limit_and_autorange():
    bench = build_bench(WorldClock(1e4), seed=11, timeout_s=0.1)
    world, meter, supply = bench.world, bench.meter, bench.supply
    supply.write("VOLT 4.0")
    supply.write("CURR 3.0")
    assert world.operating_point().mode == "OFF" and world.operating_point().current_A == 0.0
    supply.write("OUTP ON")
    # dead zone: only the PSUPPLY divider draws current, V / 77 kOhm
    world.dac = int(world.sink.c) - 20
    op = world.operating_point()
    assert op.sink_A == 0.0 and op.current_A == pytest.approx(4.0 / 77e3, rel=1e-2)
    # about 763 codes per ampere above it
    world.dac = 1500
    assert world.operating_point().current_A == pytest.approx(
        (1500 - world.sink.c) / world.sink.b, rel=0.01)
    # beyond the limit the supply clamps and reports constant current
    world.dac = 4000
    op = world.operating_point()
    assert op.mode == "CC" and op.current_A == pytest.approx(world.supply.true_limit_A())
    assert supply.query("STAT:QUES:COND?") == "1"
    # autorange follows the current with the 34401A's hysteresis and noise floors
    seen = {}
    for dac in (0, int(world.sink.c) + 4, 560, 900, 2500):
        world.dac = dac
        readings = [float(meter.query("MEAS:CURR:DC?")) for _ in range(20)]
        seen[dac] = (meter.range["CURR"], np.std(readings))
    assert [seen[d][0] for d in sorted(seen)] == [0.01, 0.01, 0.1, 1.0, 3.0]
    assert seen[0][1] < 1e-7 < seen[2500][1] < 1e-4     # nA on 10 mA, tens of uA on 3 A
    world.meter_range_A, meter.auto_range = 0.01, False
    meter.range["CURR"] = 0.01
    assert float(meter.query("READ?")) == 9.9e37         # overload on a fixed 10 mA range
    assert meter.query("SYST:ERR?") == '+0,"No error"'
    meter.write("FOO:BAR 1")
    assert meter.query("SYST:ERR?") == '-113,"Undefined header"'


def test_scpi_headers_normalise_to_short_form():
    assert scpi_split(":MEASURE:CURRENT:DC? 3") == ("MEAS:CURR:DC?", "3")
    assert scpi_split("sense:curr:dc:nplc 10") == ("CURR:DC:NPLC", "10")
    assert scpi_split("SOURce:VOLTage:LEVel:IMMediate 4") == ("VOLT", "4")
    assert math.isclose(float("+1.40307706E-01"), 0.140307706)


def test_hardware_backends_from_the_lab_configuration():
    """The instrument table's hardware factories give IOCs whose drivers talk VISA and serial
    (pyvisa-sim and pyserial's loop:// here), without the simulation's fault-injection PVs."""
    from calbench.config import parse_config
    from calbench.iocs.build import build_iocs
    from calbench.iocs.hw.agilent34401a import Agilent34401A

    cfg = parse_config({"instruments": {
        "dmm": {"backend": "hardware", "resource": "ASRL1::INSTR", "visa_library": "sim",
                "timeout_s": 0.3},
        "psu": {"backend": "hardware", "resource": "ASRL4::INSTR", "visa_library": "sim"},
        "batmet": {"backend": "hardware", "port": "loop://", "timeout_s": 0.1}}})
    dmm, psu, batmet = build_iocs(cfg)
    assert isinstance(dmm.backend, Agilent34401A) and dmm.backend.sim is None
    assert not [pv for g in (dmm, psu, batmet) for pv in g.pvdb if ":Sim:" in pv]
    assert dmm.backend.open().startswith("HEWLETT-PACKARD,34401A")
    assert "E3632A" in psu.backend.open()
    with pytest.raises(InstrumentFault, match="no BatMet answers on loop://"):
        batmet.backend.open()
