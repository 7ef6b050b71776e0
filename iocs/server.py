"""Serving calbench IOCs with caproto: one process, one Channel Access server, any set of instruments.

All instruments of a run share one server (one UDP search port): several CA servers on one loopback
address would steal each other's search requests. `serve_forever` is the `calbench ioc run` main loop
(SIGINT/SIGTERM shut it down cleanly and leave every instrument safe); `IocThread` runs the same server
in a background thread, which is what the tests and the demo use.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import threading
from collections.abc import Iterable

import caproto as ca
from caproto._data import Forbidden
from caproto.asyncio.server import Context, VirtualCircuit
from caproto.server import common as caproto_server_common
from caproto.server import PVGroup

from calbench.iocs.base import WRITE_NOTIFY, InstrumentIOC
from calbench.contracts.errors import Refused
from calbench.iocs.one_server import AlreadyServed, describe_this_server, refuse_if_served

__all__ = ["serve_forever", "IocThread", "AlreadyServed", "loopback_ca_environment", "free_port"]

log = logging.getLogger(__name__)


class _RefusalsAreNotCrashes(logging.Filter):
    """caproto logs every failed put with a traceback; a refusal (or a put from a client without
    write access) is expected behaviour, already published on StatusMessage_RBV or answered with
    the access rights, so keep it out of the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, (Refused, Forbidden))


for _name in ("caproto.circ", "caproto.ctx", "caproto"):
    logging.getLogger(_name).addFilter(_RefusalsAreNotCrashes())


def loopback_ca_environment(interfaces: Iterable[str] = ("127.0.0.1",)) -> dict[str, str]:
    """CA client settings that find servers on the given interfaces without broadcasting to the LAN."""
    return {"EPICS_CA_AUTO_ADDR_LIST": "NO", "EPICS_CA_ADDR_LIST": " ".join(interfaces),
            "EPICS_CAS_INTF_ADDR_LIST": " ".join(interfaces),
            "EPICS_CA_MAX_ARRAY_BYTES": "100000000"}


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port nobody listens on at 127.0.0.1 now (TCP by default, socket.SOCK_DGRAM for UDP): for
    test and benchmark servers that must not answer one another."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def merged_pvdb(groups: Iterable[PVGroup]) -> dict:
    pvdb: dict = {}
    for group in groups:
        clash = set(pvdb) & set(group.pvdb)
        if clash:
            raise ValueError(f"PV names served twice: {sorted(clash)[:5]}; give the instruments "
                             "different prefixes in the lab configuration")
        pvdb.update(group.pvdb)
    return pvdb


def make_safe_all(groups: Iterable[PVGroup]) -> list[str]:
    """Make every instrument safe; returns what could not be made safe (prefix: reason)."""
    unsafe = []
    for group in groups:
        try:
            getattr(group, "make_safe", lambda: None)()
        except Exception as exc:  # one instrument failing must not keep the others unsafe
            log.exception("could not make %s safe", group.prefix)
            unsafe.append(f"{group.prefix} {exc}")
    return unsafe


class _Circuit(VirtualCircuit):
    """A client circuit that tells a put which answer its client waits for (WRITE_NOTIFY) and
    judges access by the client's address, not by the host name the client claims."""

    @property
    def client_hostname(self) -> str:
        return self.circuit.address[0]

    @client_hostname.setter
    def client_hostname(self, claimed) -> None:
        self.claimed_hostname = claimed

    async def _process_command(self, command):
        token = WRITE_NOTIFY.set(isinstance(command, ca.WriteNotifyRequest))
        try:
            return await super()._process_command(command)
        finally:
            WRITE_NOTIFY.reset(token)


class _NoDelayContext(Context):
    """caproto's asyncio server with Nagle's algorithm off on every client circuit.

    caproto binds its listening sockets with protocol 0, so asyncio does not set TCP_NODELAY on the
    accepted ones; a monitor update sent right after another small packet then waits for the
    client's delayed ACK (40 ms on Linux) and every put-then-readback costs ~40-90 ms."""

    CircuitClass = _Circuit

    async def tcp_handler(self, client, addr):
        sock = client.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return await super().tcp_handler(client, addr)


# caproto batches monitor updates while more arrive within this many seconds (10 ms by default,
# and the batch latency then doubles up to 1 s while updates keep coming): an IOC polling every
# 20 ms would send its readings tens of ms late. Its environment variable still overrides.
HIGH_LOAD_TIMEOUT_S = 0.001


def _tune_caproto() -> None:
    if "CAPROTO_SERVER_HIGH_LOAD_TIMEOUT_SEC" not in os.environ:
        caproto_server_common.HIGH_LOAD_TIMEOUT = HIGH_LOAD_TIMEOUT_S


async def _serve(groups: list[PVGroup], interfaces: list[str], stop: asyncio.Event,
                 started: threading.Event | None = None, who: str = "", check: bool = True,
                 port: int | None = None) -> None:
    _tune_caproto()
    pvdb = merged_pvdb(groups)
    instruments = [g for g in groups if isinstance(g, InstrumentIOC)]
    if check:   # one IOC per prefix: refuse to start while another server answers for these PVs
        await asyncio.to_thread(refuse_if_served, [g.prefix for g in instruments], list(interfaces))
    for group in instruments:
        await group.server.write(who or describe_this_server())
    ctx = _NoDelayContext(pvdb, list(interfaces))
    if port is not None:            # a CA port of its own instead of the environment's
        ctx.ca_server_port = int(port)
    task = asyncio.ensure_future(ctx.run(log_pv_names=False))
    if started is not None:
        # caproto binds its sockets at the start of run(); give it a moment, then report readiness
        await asyncio.sleep(0.05)
        started.set()
    stopper = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if task in done and task.exception() is not None:
        stopper.cancel()
        raise task.exception()
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    finally:
        for group in instruments:      # their worker threads end once idle
            group.worker.close()


class _Announce:
    """Prints a line once the server is bound (what `calbench up` waits for)."""

    def __init__(self, line: str):
        self.line = line

    def set(self) -> None:
        if self.line:
            print(self.line, flush=True)


def serve_forever(groups: list[PVGroup], interfaces: Iterable[str] = ("127.0.0.1",), *,
                  who: str = "", check: bool = True, announce: str = "") -> list[str]:
    """Run the IOCs until SIGINT or SIGTERM; on the way out every instrument is made safe, and
    what could not be is returned (empty when all is safe).
    Raises AlreadyServed (leaving the instruments to the IOC that serves them) if another IOC
    answers for these PVs (check=False: the caller looked already, see `refuse_if_served`); `who`
    (published on Server_RBV) tells such a second IOC how to stop this one; `announce` is printed
    once the server listens."""
    ca_serving_environment(interfaces)

    async def main():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await _serve(groups, list(interfaces), stop, _Announce(announce), who=who, check=check)

    try:
        asyncio.run(main())
    except AlreadyServed:
        raise           # not ours to make safe: another IOC drives these instruments
    except BaseException:
        make_safe_all(groups)
        raise
    return make_safe_all(groups)


def ca_serving_environment(interfaces: Iterable[str]) -> None:
    """This process serves on the interfaces (and searches only there, for `refuse_if_served`)."""
    os.environ.update({k: v for k, v in loopback_ca_environment(interfaces).items()
                       if k.startswith("EPICS_CAS")})


class IocThread:
    """The IOCs served from a daemon thread of this process (tests, demos, notebooks)."""

    def __init__(self, groups: list[PVGroup], interfaces: Iterable[str] = ("127.0.0.1",), *,
                 port: int | None = None):
        self.groups = list(groups)
        self.interfaces = list(interfaces)
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self.error: BaseException | None = None

    @property
    def pvnames(self) -> list[str]:
        return sorted(merged_pvdb(self.groups))

    def start(self, timeout: float = 10.0) -> "IocThread":
        def target():
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            self._stop = asyncio.Event()
            try:
                self._loop.run_until_complete(
                    _serve(self.groups, self.interfaces, self._stop, self._started,
                           port=self.port))
            except BaseException as exc:  # surfaced by start()/stop()
                self.error = exc
                self._started.set()
            finally:
                self._loop.close()

        self._thread = threading.Thread(target=target, name="calbench-iocs", daemon=True)
        self._thread.start()
        if self._started.wait(timeout) and isinstance(self.error, AlreadyServed):
            raise self.error
        if not self._started.is_set() or self.error is not None:
            raise RuntimeError(f"the IOC server did not start: {self.error!r}")
        return self

    def stop(self, timeout: float = 10.0) -> list[str]:
        """Stop serving and make every instrument safe; returns what could not be made safe."""
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout)
        return make_safe_all(self.groups)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
