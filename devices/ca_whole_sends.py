"""Whole messages from caproto's threading client (ophyd's control layer here), however large.

caproto 1.3's client sends with `sendall()` on a non-blocking socket. A request bigger than the
socket's free send buffer (an EIGER trimbit map is 524,288 values, 2-4 MB) raises BlockingIOError
part-way when the IOC reads slower than the client writes (a loaded control PC): half a message is
left on the circuit, and every later request on it goes unanswered until it is dropped. `install()`
replaces that send with one that waits for the socket to drain, and fails with a clear error only if
the IOC reads nothing for SEND_TIMEOUT_S.
"""
from __future__ import annotations

import select
import threading
import time
import weakref

from caproto.threading import client as _client

SEND_TIMEOUT_S = 60.0

_locks: "weakref.WeakKeyDictionary[object, threading.RLock]" = weakref.WeakKeyDictionary()
_locks_guard = threading.Lock()


def _lock_of(manager) -> threading.RLock:
    with _locks_guard:
        lock = _locks.get(manager)
        if lock is None:
            lock = _locks[manager] = threading.RLock()
        return lock


def _send_whole(self, *commands, extra=None):
    # one sender at a time per circuit: the state machine's order is the order on the wire
    with _lock_of(self):
        sock = self.socket
        if sock is None:
            return
        data = memoryview(b"".join(self.circuit.send(*commands, extra=extra)))
        deadline = time.monotonic() + SEND_TIMEOUT_S
        while data:
            try:
                data = data[sock.send(data):]
                continue
            except BlockingIOError:
                pass
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"the IOC at {self.circuit.address[0]}:{self.circuit.address[1]} read nothing "
                    f"for {SEND_TIMEOUT_S:g} s while {len(data)} bytes of a request were waiting: "
                    "it is stalled or the network is down; check the IOC, then reconnect")
            select.select([], [sock], [], min(left, 1.0))


def install() -> None:
    """Make every caproto threading-client circuit send whole messages (idempotent)."""
    _client.VirtualCircuitManager.send = _send_whole
