"""The client side of the procedure lease (PVs of iocs/lease.py): take, renew, release.

`ProcedureLease` is a component of every hazardous instrument's device (`box.lease`, `crate.lease`,
`batmet.lease`, `psu.lease`). `lease.set(("take", scope))` takes the lease with this process's
token and hands it to the process's renewer thread, which puts the token on Lease:Heartbeat a few
times per lease timeout, whatever the RunEngine does (a paused or suspended plan keeps its lease);
`lease.set(("release", scope))` lets go of it. Scopes nest: the lease is released when the last
scope lets go; taking a scope that is already held does nothing, so a RunEngine that replays a
plan's messages after a pause does not take it twice. `lease.set(1)` / `set(0)` take and release the
scope "manual" (at the prompt). If this process dies, renewals stop and the IOC makes the
instrument safe by itself after Lease:Timeout_RBV seconds. Plans use plans/lease.py:under_lease.
"""
from __future__ import annotations

import getpass
import logging
import os
import socket
import threading
import uuid

from ophyd import Component as Cpt
from ophyd import Device, EpicsSignal, EpicsSignalRO
from ophyd.status import Status

from calbench.devices.base import CheckedSignal

log = logging.getLogger(__name__)

RENEWALS_PER_TIMEOUT = 4       # heartbeats per lease timeout: three may be lost before it lapses


def process_token() -> str:
    """This process's lease token, `user@host:pid:tag` in at most 39 characters (a CA string)."""
    global _TOKEN
    if _TOKEN is None or not _TOKEN.split(":")[1] == str(os.getpid()):
        tag = uuid.uuid4().hex[:4]
        head = f"{getpass.getuser()[:8]}@{socket.gethostname().split('.')[0][:12]}"
        _TOKEN = f"{head}:{os.getpid()}:{tag}"[:39]
    return _TOKEN


_TOKEN: str | None = None


class ProcedureLease(Device):
    """An instrument's procedure lease (prefix "<instrument prefix>Lease:"). set(("take",
    scope)) takes it, set(("release", scope)) lets go; stop() and the RunEngine's pause leave it
    as it is."""

    take_cmd = Cpt(CheckedSignal, "Take", string=True, kind="omitted")
    heartbeat = Cpt(EpicsSignal, "Heartbeat", string=True, kind="omitted")
    release_cmd = Cpt(CheckedSignal, "Release", string=True, kind="omitted")
    state = Cpt(EpicsSignalRO, "State_RBV", string=True, kind="omitted")
    holder = Cpt(EpicsSignalRO, "Holder_RBV", string=True, kind="omitted")
    timeout_s = Cpt(EpicsSignalRO, "Timeout_RBV", kind="omitted")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._scopes: set[str] = set()
        self._scopes_lock = threading.Lock()

    @property
    def held(self) -> bool:
        return bool(self._scopes)

    def set(self, value, **kwargs):
        """("take", scope) / ("release", scope); 1 and 0 for the scope "manual". The IOC is asked
        only when the first scope takes and when the last one lets go."""
        action, scope = (value if isinstance(value, tuple)
                         else ("take" if value else "release", "manual"))
        if action not in ("take", "release"):
            raise ValueError(f"lease action {action!r}: use ('take', scope) or ('release', scope)")
        token = process_token()
        with self._scopes_lock:
            before = bool(self._scopes)
            if action == "take":
                self._scopes.add(scope)
            else:
                self._scopes.discard(scope)
            after = bool(self._scopes)
        if before == after:
            status = Status(self)
            status.set_finished()
            return status
        if after:
            # renewed from the moment it is taken (a heartbeat ahead of the take is refused,
            # harmlessly: the next one renews)
            RENEWER.add(self, token, float(self.timeout_s.get(use_monitor=False)))
            status = self.take_cmd.set(token)

            def taken(st):
                if not st.success:
                    RENEWER.remove(self)
                    with self._scopes_lock:
                        self._scopes.clear()
            status.add_callback(taken)
            return status
        RENEWER.remove(self)      # a failed release lets it lapse: the plan left it safe anyway
        return self.release_cmd.set(token)

    def stop(self, *, success: bool = False) -> None:
        """A pause or stop of the RunEngine keeps the lease: the plan's exit path releases it."""


class _Renewer:
    """One daemon thread per process putting the token on every held lease's heartbeat PV."""

    def __init__(self):
        self._lock = threading.Lock()
        self._leases: dict[ProcedureLease, tuple[str, float]] = {}
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, lease: ProcedureLease, token: str, timeout_s: float) -> None:
        with self._lock:
            self._leases[lease] = (token, max(timeout_s, 0.1))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="calbench-lease-renewer",
                                                daemon=True)
                self._thread.start()
        self._wake.set()

    def remove(self, lease: ProcedureLease) -> None:
        with self._lock:
            self._leases.pop(lease, None)

    def holding(self) -> list[ProcedureLease]:
        with self._lock:
            return list(self._leases)

    def _run(self) -> None:
        while True:
            with self._lock:
                leases = dict(self._leases)
            period = min((t for _, t in leases.values()), default=5.0) / RENEWALS_PER_TIMEOUT
            for lease, (token, _) in leases.items():
                try:
                    lease.heartbeat.put(token, use_complete=False)
                except Exception as exc:     # the IOC may be restarting; the next one may pass
                    log.warning("lease heartbeat to %s failed: %s", lease.prefix, exc)
            self._wake.wait(period)
            self._wake.clear()


RENEWER = _Renewer()
