"""EIGER scans the detector runs itself: one acquisition, one frame per step (devices/eiger_scan.py).

    RE(detector_scan(det, det.vthreshold, np.arange(0, 2001, 40)))      # an S-curve
    RE(detector_scan(det, det.trimval, np.arange(0, 64, 2)))            # a trimbit scan
    RE(detector_scan(det, det.dacs.vrpreamp, np.arange(2500, 3700, 30)))

The run is recorded as a step scan of the same points would be (primary stream: the setting,
counts per chip and total, the frame of each step), without a Channel Access round trip per
point: the detector server's own scan (slsdet ``scan``; PSI's calibration scripts loop over
the points in Python instead, reference/eiger.md). The points are recorded as they are
acquired (live plots and progress follow; an interrupted scan keeps what it took). The
detector's scan is switched off however the plan ends, which also puts its frames per
acquisition back to 1.
"""
from __future__ import annotations

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp

from calbench.devices.eiger_scan import EigerScan

__all__ = ["detector_scan"]


def detector_scan(det, signal, points: list[int], *, settle_s: float = 1e-3,
                  flush_period_s: float = 0.5, md: dict | None = None):
    """Plan: scan ``signal`` (``det.vthreshold``, ``det.trimval`` or one of ``det.dacs``) over
    ``points`` (evenly spaced integers) in the detector, ``settle_s`` after each setting, with one
    frame of the detector's exposure per point; the points acquired so far are recorded every
    ``flush_period_s`` while it runs. Returns the run's uid."""
    flyer = EigerScan(det, signal)
    params = flyer.parameters(points, settle_s)
    n = len(params.values)
    _md = {"detectors": [det.name], "motors": [signal.name], "num_points": n,
           "num_intervals": n - 1, "plan_name": "detector_scan",
           "plan_args": {"signal": signal.name, "start": params.start, "stop": params.stop,
                         "step": params.step, "settle_s": params.settle_s},
           "detector_scan": params.text,
           "hints": {"dimensions": [([signal.name], "primary")]}, **(md or {})}

    @bpp.stage_decorator([flyer])
    @bpp.run_decorator(md=_md)
    def run():
        yield from bps.declare_stream(flyer, name="primary", collect=True)
        yield from bps.kickoff(flyer, wait=True)
        group = f"{flyer.name}-complete"
        yield from bps.complete(flyer, group=group, wait=False)
        done = False
        while not done:          # the steps so far, every flush period, and the last ones
            done = yield from bps.wait(group=group, timeout=flush_period_s,
                                       error_on_timeout=False)
            done = done is not False         # None: a dry run, nothing to wait for
            yield from bps.collect(flyer, name="primary")

    def scan():
        yield from bps.mv(det.scan, params.text)
        return (yield from run())

    def off():
        yield from bps.mv(det.scan, "0")

    return (yield from bpp.finalize_wrapper(scan(), off()))
