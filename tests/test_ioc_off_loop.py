"""Backend calls run off the IOC's event loop: while one instrument is slow to answer a put, the
other PVs of the same IOC still answer, and the held put completes once the instrument answers.

The simulated X-ray box holds its commands at a gate (an Event) the test opens; with backend calls
on the event loop the whole IOC would stop answering until then."""
from __future__ import annotations

import threading

import pytest
from caproto.threading.client import Context

from calbench.iocs.build import build_iocs
from calbench.iocs.server import IocThread
from conftest import own_ca_port, own_prefix

ANSWER_S = 10.0     # a bound on a failure, never waited out on success


@pytest.fixture
def box(lab_config, monkeypatch):
    own_ca_port(monkeypatch)
    cfg = own_prefix(lab_config, "L")
    groups = build_iocs(cfg, ["xraybox"])
    server = IocThread(groups).start()
    ctx = Context()
    try:
        yield cfg.prefix_of("xraybox"), groups[0].backend, ctx
    finally:
        groups[0].backend.answer_gate = None
        ctx.disconnect()
        server.stop()


def test_a_held_put_leaves_the_other_pvs_answering(box):
    prefix, backend, ctx = box
    voltage, current, status = ctx.get_pvs(prefix + "Voltage", prefix + "Current",
                                           prefix + "StatusMessage_RBV", timeout=ANSWER_S)
    current.write([12.5], wait=True, timeout=ANSWER_S)       # answered at once: no gate yet
    gate = backend.answer_gate = threading.Event()
    done: dict = {}

    def put():
        try:
            done["reply"] = voltage.write([30.0], wait=True, timeout=4 * ANSWER_S)
        except Exception as exc:      # reported by the assertion below
            done["error"] = exc

    putter = threading.Thread(target=put, daemon=True)
    putter.start()
    try:
        assert backend.waiting.wait(ANSWER_S), "the Voltage put never reached the box"
        # the box holds the put; the same IOC still answers reads of its other PVs
        assert current.read(timeout=ANSWER_S).data[0] == pytest.approx(12.5)
        assert status.read(timeout=ANSWER_S) is not None
        assert putter.is_alive() and "reply" not in done
    finally:
        gate.set()
    putter.join(4 * ANSWER_S)
    assert "error" not in done, done.get("error")
    assert "reply" in done
    assert voltage.read(timeout=ANSWER_S).data[0] == pytest.approx(30.0)
    assert backend.read().voltage_setpoint_kV == pytest.approx(30.0)


def test_one_worker_per_instrument_keeps_its_calls_in_order():
    """An instrument's calls run one at a time in the order made, on its own thread; another
    instrument's worker answers meanwhile."""
    import asyncio

    from calbench.iocs.backend_worker import BackendWorker

    async def scenario():
        slow, other = BackendWorker("slow-instrument"), BackendWorker("other-instrument")
        gate, entered, order = threading.Event(), threading.Event(), []

        def held():
            entered.set()
            gate.wait()
            order.append(("held", threading.current_thread().name))

        def quick(name):
            order.append((name, threading.current_thread().name))
            return name

        first = asyncio.ensure_future(slow.run(held))
        await asyncio.to_thread(entered.wait, ANSWER_S)
        queued = [asyncio.ensure_future(slow.run(quick, f"call {i}")) for i in range(3)]
        assert await asyncio.wait_for(other.run(quick, "other"), ANSWER_S) == "other"
        assert not any(q.done() for q in queued)      # behind the held call, not beside it
        gate.set()
        await asyncio.wait_for(asyncio.gather(first, *queued), ANSWER_S)
        slow.close()
        other.close()
        return order

    order = asyncio.run(scenario())
    assert order[0] == ("other", "other-instrument")
    assert order[1:] == [("held", "slow-instrument")] + [
        (f"call {i}", "slow-instrument") for i in range(3)]
