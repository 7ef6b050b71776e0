"""The session lab's X-ray box and EIGER as the EIGER tests start them: the box made safe after
each test, the detector at known settings (32 bit, 0.1 s, one frame, no detector-side scan,
trimval 32, vthreshold 1200, vrf 3040, vtrim 2500, no test pulses) and answering again after.

    from eiger_lab_fixtures import box, det  # noqa: F401 - pytest fixtures
"""
from __future__ import annotations

import pytest

from calbench.devices.base import set_and_check


@pytest.fixture
def box(lab):
    box = lab.device("xraybox")
    yield box
    lab.backend("xraybox").make_safe()


@pytest.fixture
def det(lab):
    det = lab.device("eiger")
    det.data_dir = lab.cfg.data_dir
    sim = lab.backend("eiger")
    for name, value in ((det.scan, "0"), (det.dynamic_range, 32), (det.exptime, 0.1),
                        (det.frames, 1), (det.period, 0.0), (det.trimval, 32),
                        (det.vthreshold, 1200), (det.dacs.vrpreamp, 3040), (det.dacs.vtrim, 2500),
                        (det.test_pulses, 0)):
        set_and_check(name, value)
    yield det
    sim.unresponsive = False
    set_and_check(det.scan, "0")
