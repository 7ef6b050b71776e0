"""Progress with an ETA for the long steps a session shows: a scan's points (EIGER scans, the
BatMet DAC scan) and the FEE sequencer's pulses (through bluesky's progress-bar hook)."""
from __future__ import annotations

import bluesky.plans as bp
import pytest

from calbench.iocs.build import build_iocs
from calbench.iocs.server import IocThread
from calbench.lab import make_device
from calbench.plans.progress import point_progress
from conftest import own_ca_port, own_prefix


def test_a_scan_shows_its_points_with_an_eta(lab, RE, capsys):
    dmm, psu = lab.device("dmm"), lab.device("psu")
    RE(point_progress(bp.list_scan([dmm], psu.voltage, [1.0, 1.5, 2.0]), 3, "supply scan"))
    err = capsys.readouterr().err
    assert "supply scan: 100%" in err and "3.0/3.0 points" in err, err


def test_a_failing_scan_closes_its_bar(lab, RE, capsys):
    psu = lab.device("psu")
    with pytest.raises(Exception):
        RE(point_progress(bp.list_scan([], psu.voltage, [1.0, 1e6]), 2, "bad scan"))
    err = capsys.readouterr().err
    assert "bad scan:" in err and "1.0/2.0 points" in err, err


@pytest.fixture
def realtime_fee(lab_config, monkeypatch):
    """A FEE IOC of its own whose world runs in real time (its own prefix and CA port)."""
    own_ca_port(monkeypatch)
    cfg = own_prefix(lab_config, "P")
    with IocThread(build_iocs(cfg, ["fee"], force_sim=True, time_scales={"fee": 1.0})):
        yield make_device(cfg, "fee", timeout=30)


def test_the_fee_sweep_reports_its_pulses_to_progress_bars(realtime_fee):
    """What bluesky's ProgressBarManager (the session's waiting hook) sees of a 1.15 s sweep."""
    fee, updates = realtime_fee, []
    fee.channel_mask.set(1).wait(10)
    fee.seq_step.set(1).wait(10)
    fee.seq_start.set(500).wait(10)
    fee.seq_stop.set(12000).wait(10)                     # 11,501 pulses at 10 kHz
    fee.kickoff().wait(10)
    status = fee.complete()
    status.watch(lambda **kw: updates.append(kw))
    status.wait(120)
    pulses = [u for u in updates if u.get("unit") == "pulses"]
    done = [u["current"] for u in pulses]
    assert len(set(done)) >= 3, updates                 # seen on the way, not only at the end
    assert done == sorted(done) and done[-1] == pulses[-1]["target"] == 11501
    assert pulses[-1]["fraction"] == 0.0 and pulses[-1]["time_remaining"] == 0.0
    # a watcher added after the sweep ended sees it complete at once
    finished = []
    status.watch(lambda **kw: finished.append(kw))
    assert finished[-1]["current"] == 11501 and finished[-1]["fraction"] == 0.0
