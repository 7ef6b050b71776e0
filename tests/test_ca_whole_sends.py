"""A put far larger than the socket buffers, sent while the IOC reads nothing (its event loop busy,
as on a loaded control PC), arrives whole once the IOC reads again, and the circuit goes on
answering (calbench/devices/ca_whole_sends.py; caproto's own send breaks the circuit part-way)."""
from __future__ import annotations

import fcntl
import termios
import threading
import time

import numpy as np
import pytest
from caproto.server import PVGroup, pvproperty
from caproto.threading.client import Context

from calbench.devices.ca_whole_sends import install
from calbench.iocs.server import IocThread
from conftest import own_ca_port

N = 2_000_000           # 16 MB of doubles: more than the client's send and the IOC's receive buffers


class BigWaveform(PVGroup):
    wave = pvproperty(name="Wave", value=[0.0] * N, max_length=N)
    echo = pvproperty(name="Echo", value=0)


def _unsent_bytes(sock) -> int:
    return int.from_bytes(fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4), "little")


def _wait(condition, what: str, cap_s: float = 120.0) -> None:
    deadline = time.monotonic() + cap_s
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {cap_s} s"
        time.sleep(0.01)


@pytest.fixture
def big_ioc(monkeypatch):
    own_ca_port(monkeypatch)
    group = BigWaveform("BIG:")
    server = IocThread([group]).start()
    ctx = Context()
    yield server, group, ctx
    ctx.disconnect()
    server.stop()


def test_a_huge_put_to_a_stalled_ioc_arrives_whole(big_ioc):
    server, group, ctx = big_ioc
    install()
    wave, echo = ctx.get_pvs("BIG:Wave", "BIG:Echo", timeout=10)
    wave.wait_for_connection(timeout=30)
    echo.wait_for_connection(timeout=30)
    sock = wave.circuit_manager.socket
    stall, stalled = threading.Event(), threading.Event()

    def hold_the_loop():            # the IOC's event loop does nothing else until released
        stalled.set()
        stall.wait(300)

    server._loop.call_soon_threadsafe(hold_the_loop)
    assert stalled.wait(30)
    sent = np.arange(N, dtype=float)
    outcome: list = []

    def put():
        try:
            outcome.append(wave.write(sent, wait=False))
        except Exception as exc:      # what caproto's own send raises part-way
            outcome.append(exc)

    writer = threading.Thread(target=put)
    writer.start()
    try:
        # the client has filled its buffers and waits (caproto's own send fails here instead)
        _wait(lambda: outcome or _unsent_bytes(sock) > 0, "client waiting on a full socket")
    finally:
        stall.set()
    writer.join(120)
    assert not writer.is_alive()
    assert outcome == [None], outcome
    _wait(lambda: np.array_equal(group.wave.value, sent), "the whole waveform at the IOC")
    echo.write([7], wait=True, timeout=30)          # the circuit still answers
    assert echo.read(timeout=30).data[0] == 7
