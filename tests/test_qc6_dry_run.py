"""A dry run of every QC6 procedure: bluesky's summarize_plan walks the whole plan against the lab's
devices with no RunEngine and prints its outline. The plans read the instruments only through
RunEngine messages: a Channel Access read in a plan's body fails here, and nothing reaches the
crate."""
from __future__ import annotations

import pytest
from bluesky.simulators import summarize_plan
from ophyd.signal import EpicsSignalBase

from calbench.plans.qc6 import (all_off, check_connection, divider_steps, iv_short_stability,
                                long_stability, megger_test, stress_test, stress_voltages)
from qc6_support import qc6  # noqa: F401  (a fixture)


@pytest.fixture
def reads_outside_messages(monkeypatch):
    """Channel Access reads of any device's signal, refused and named (ophyd's get is what a plan
    body would call; a read message never calls it in a dry run)."""
    seen: list[str] = []

    def refuse(self, *args, **kwargs):
        seen.append(self.name)
        raise AssertionError(f"{self.name} read outside a RunEngine message")

    monkeypatch.setattr(EpicsSignalBase, "get", refuse)
    return seen


def outline(plan, capsys) -> list[str]:
    summarize_plan(plan)
    return capsys.readouterr().out.splitlines()


def moves(lines: list[str], name: str) -> list[str]:
    """The values an outline sets `name` to, in order."""
    return [line.split(" -> ", 1)[1] for line in lines if line.startswith(f"{name} -> ")]


def runs(lines: list[str]) -> int:
    opened = sum("Open Run" in line for line in lines)
    assert opened == sum("Close Run" in line for line in lines)
    return opened


def test_every_qc6_procedure_has_a_dry_run(qc6, reads_outside_messages, capsys, tmp_path):
    _, layer, sim = qc6
    g1t, g2t, g3t = layer.foils

    lines = outline(check_connection(layer), capsys)
    assert runs(lines) == 1 and any(line.startswith("  Read [") for line in lines)

    lines = outline(megger_test(layer.detector_name, [14.2, 9.8, 22.0], [0, 3, 1],
                                results_dir=tmp_path), capsys)
    assert runs(lines) == 1 and sum("megger" in line for line in lines) == 3

    # stress: each foil on, up 0 -> 650 V in 10 V steps (a primary event each), off; then the layer
    lines = outline(stress_test(layer, results_dir=tmp_path), capsys)
    assert runs(lines) == 1 and any("stress_test" in line and "dry run" in line for line in lines)
    steps = [str(v) for v in stress_voltages(0.0, 650.0, 10.0)]
    for foil in (g1t, g2t, g3t):
        assert moves(lines, foil.name) == steps
        assert moves(lines, foil.pw.name) == ["1", "0", "0", "0"]   # on, off, the layer off twice
        assert moves(lines, foil.i0set.name) == ["2.0"]
    assert sum(line.startswith("  Read [") for line in lines) == 3 * len(steps)
    close = next(i for i, line in enumerate(lines) if "Close Run" in line)
    for ch in layer.channels:                   # off before the run closes, and again after it
        off = [i for i, line in enumerate(lines) if line == f"{ch.v0set.name} -> 0.0"]
        assert len(off) >= 2 and off[-2] < close < off[-1]

    # IV scan: the divider in 23 steps of one layer move each, then the foils at 550 V
    lines = outline(iv_short_stability(layer, results_dir=tmp_path), capsys)
    assert runs(lines) == 1
    layer_moves = moves(lines, layer.name)
    n = len(divider_steps(200.0, 4600.0, 200.0))
    assert len(set(layer_moves[:n])) == n and "'g1t': 548.3" in layer_moves[n - 1]
    # the hold's moves (the arrival, then at each look past a trip or the end) are the final one
    assert set(layer_moves[n:]) == {layer_moves[-1]} and "'g1t': 550.0" in layer_moves[-1]
    assert "'drift': 1101.5" in layer_moves[-1]
    # long stability: up the divider, the other electrodes off, the foils at 580 V for 15 h
    lines = outline(long_stability(layer, results_dir=tmp_path), capsys)
    assert runs(lines) == 1
    assert moves(lines, layer.name)[-1] == "{'g1t': 580.0, 'g2t': 580.0, 'g3t': 580.0}"
    progress = [line for line in lines if "qc6" in line and line.startswith("  Read [")]
    assert len(progress) >= 15 * 3600 / 600       # a progress event every 10 world minutes

    lines = outline(all_off(layer), capsys)
    assert [line for line in lines if line.endswith(" -> 0")] == [
        f"{ch.pw.name} -> 0" for ch in layer.channels]

    assert reads_outside_messages == []
    assert not any(sim.powered(sim.slot))        # nothing reached the crate
