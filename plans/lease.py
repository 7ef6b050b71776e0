"""Plans that hold instruments' procedure leases (iocs/lease.py, devices/lease.py) while they run.

    yield from under_lease([layer], plan)

takes the lease of every device that has one, runs `plan`, and releases the leases on every exit
path, after the plan's own finalizers have made the instruments safe. While the plan runs (paused
or suspended included) the session's renewer thread keeps the leases alive; if the RunEngine's
process dies, renewals stop and each IOC makes its instrument safe by itself.
"""
from __future__ import annotations

import logging
import uuid

import bluesky.plan_stubs as bps
from bluesky.preprocessors import finalize_wrapper

log = logging.getLogger(__name__)


def leases_of(devices) -> list:
    """The lease components of the devices that have one (None entries and others skipped)."""
    return [d.lease for d in devices if d is not None and hasattr(d, "lease")]


def under_lease(devices, plan):
    """Run `plan` holding the procedure lease of each device; released however it ends."""
    leases = leases_of(devices)
    scope = uuid.uuid4().hex      # this call's scope: a replayed take does not count twice

    def inner():
        for lease in leases:
            yield from bps.mv(lease, ("take", scope))
        return (yield from plan)

    def release():
        for lease in leases:
            try:
                yield from bps.mv(lease, ("release", scope))
            except Exception as exc:    # it lapses by itself; the instrument is already safe
                log.warning("lease of %s not released: %s", lease.prefix, exc)

    return (yield from finalize_wrapper(inner(), release()))
