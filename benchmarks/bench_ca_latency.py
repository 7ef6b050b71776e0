"""Put -> monitor latency through a calbench IOC server, against caproto's defaults (the baseline,
measured in the same run).

    python benchmarks/bench_ca_latency.py [--puts 40] [--poll-ms 10]

An IOC with one setpoint PV and a readback that a poll loop republishes every --poll-ms, plus a
noisy PV updated at each poll (the background a crate IOC has: VMon/IMon of live channels). A client
puts the setpoint and waits for the readback's monitor. Rows:

  caproto defaults   caproto's asyncio server as shipped: accepted sockets keep Nagle's algorithm
                     (a small packet waits for the client's delayed ACK, 40 ms on Linux) and monitor
                     updates are batched while more arrive within 10 ms
  calbench server    iocs/server.py: TCP_NODELAY on every circuit, 1 ms batching window

Each row prints the median and 90th percentile of the latency (ms). The QC6 plans wait for such a
readback at every voltage step, so this latency is paid hundreds of times per stress test.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import threading
import time
import uuid

from calbench.iocs.server import free_port, loopback_ca_environment

os.environ.update(loopback_ca_environment())


def _make_group(prefix: str, poll_s: float):
    import numpy as np
    from caproto.server import PVGroup, pvproperty

    class Echo(PVGroup):
        setpoint = pvproperty(name="SP", value=0.0)
        readback = pvproperty(name="RBV", value=0.0, read_only=True)
        noise = pvproperty(name="Noise", value=0.0, read_only=True)

        @setpoint.putter
        async def setpoint(self, instance, value):
            return value

        @readback.startup
        async def readback(self, instance, async_lib):
            rng = np.random.default_rng(0)
            while True:
                await instance.write(self.setpoint.value)
                await self.noise.write(float(rng.normal()))
                await asyncio.sleep(poll_s)

    return Echo(prefix=prefix)


def _serve(context_cls, group, stop: threading.Event, ready: threading.Event):
    async def main():
        ctx = context_cls(group.pvdb, ["127.0.0.1"])
        task = asyncio.ensure_future(ctx.run(log_pv_names=False))
        await asyncio.sleep(0.2)
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.05)
        task.cancel()

    asyncio.run(main())


def measure(tuned: bool, puts: int, poll_s: float) -> list[float]:
    from caproto.asyncio.server import Context
    from caproto.server import common
    from caproto.threading.client import Context as ClientContext

    from calbench.iocs import server as calbench_server

    default_timeout = common.HIGH_LOAD_TIMEOUT
    if tuned:
        calbench_server._tune_caproto()
        context_cls = calbench_server._NoDelayContext
    else:
        common.HIGH_LOAD_TIMEOUT = 0.01          # caproto's default
        context_cls = Context
    prefix = f"B{uuid.uuid4().hex[:6]}:"
    port = str(free_port())      # a port of this run's own: no other server answers
    os.environ.update({"EPICS_CA_SERVER_PORT": port, "EPICS_CAS_SERVER_PORT": port})
    stop, ready = threading.Event(), threading.Event()
    thread = threading.Thread(target=_serve, daemon=True,
                              args=(context_cls, _make_group(prefix, poll_s), stop, ready))
    thread.start()
    ready.wait(10)
    client = ClientContext()
    sp, rbv, noise = client.get_pvs(prefix + "SP", prefix + "RBV", prefix + "Noise")
    for pv in (sp, rbv, noise):
        pv.wait_for_connection(timeout=10)
    arrived, target = threading.Event(), {"v": None}

    def on_update(sub, response):
        if float(response.data[0]) == target["v"]:
            arrived.set()
    sub = rbv.subscribe()
    sub.add_callback(on_update)
    noise.subscribe().add_callback(lambda sub, response: None)
    time.sleep(0.3)
    delays = []
    for k in range(puts):
        arrived.clear()
        target["v"] = float(k + 1)
        t = time.monotonic()
        sp.write([target["v"]], wait=True)
        if arrived.wait(5.0):
            delays.append(time.monotonic() - t)
        time.sleep(0.003)
    client.disconnect()
    stop.set()
    thread.join(5)
    common.HIGH_LOAD_TIMEOUT = default_timeout
    return delays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--puts", type=int, default=40)
    parser.add_argument("--poll-ms", type=float, default=10.0)
    args = parser.parse_args()
    for label, tuned in (("caproto defaults", False), ("calbench server", True)):
        d = sorted(measure(tuned, args.puts, args.poll_ms / 1e3))
        p90 = d[int(0.9 * (len(d) - 1))]
        print(f"{label:18s} put -> monitor  median {1e3 * statistics.median(d):6.1f} ms   "
              f"p90 {1e3 * p90:6.1f} ms   ({len(d)} puts)")


if __name__ == "__main__":
    main()
