"""One worker thread per instrument: its backend calls run there, in the order they were made.

A backend call blocks until the instrument answers (a serial reply, a detector server, a crate's
library). On the IOC's event loop it would stall every PV of every instrument in the process;
here the loop only awaits the answer and keeps serving. One thread per instrument keeps that
instrument's calls in order (a put's call and the poll's read never overlap), while instruments
answer independently of each other.

The thread is a daemon, started on first use: an instrument that never answers cannot keep the
process from exiting.
"""
from __future__ import annotations

import asyncio
import queue
import threading


class BackendWorker:
    """Runs ``func(*args)`` on this instrument's own thread; ``await worker.run(func, *args)``."""

    def __init__(self, name: str):
        self.name = name
        self._queue: queue.SimpleQueue | None = None
        self._guard = threading.Lock()

    async def run(self, func, *args):
        """The result of ``func(*args)`` (or its exception), computed on the worker thread."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._start().put((func, args, loop, future))
        return await future

    def close(self) -> None:
        """Let the thread end once the calls queued before this one are done."""
        with self._guard:
            if self._queue is not None:
                self._queue.put(None)
                self._queue = None

    def _start(self) -> queue.SimpleQueue:
        with self._guard:
            if self._queue is None:
                self._queue = queue.SimpleQueue()
                threading.Thread(target=_serve, args=(self._queue,), name=self.name,
                                 daemon=True).start()
            return self._queue


def _serve(calls: queue.SimpleQueue) -> None:
    while (item := calls.get()) is not None:
        func, args, loop, future = item
        try:
            outcome = (_set_result, func(*args))
        except BaseException as exc:     # handed to the awaiting coroutine, which decides
            outcome = (_set_exception, exc)
        try:
            loop.call_soon_threadsafe(outcome[0], future, outcome[1])
        except RuntimeError:             # the loop closed meanwhile: nobody waits for it
            pass


def _set_result(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
