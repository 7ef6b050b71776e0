"""`calbench batmet collect|fit`: the lab's file format on stdout, runs in tiled, the csink line."""
from __future__ import annotations

import re

import numpy as np
import pytest

from calbench.analysis.batmet import read_calibration_file, write_calibration_file
from calbench.cli import main
from calbench.iocs.sim.bench import BenchWorld
from calbench.contracts.clock import WorldClock

CSINK_RE = re.compile(r"csink 0 4 -?\d+\.\d{6} \d+\.\d{6} \d+\.\d{6}")


@pytest.fixture
def lab_toml(lab, tiled_server, tmp_path):
    """A lab configuration file pointing at the test session's IOCs and tiled server."""
    cfg = lab.cfg
    path = tmp_path / "lab.toml"
    path.write_text(f"""
[lab]
home = "{tmp_path / 'home'}"
pv_prefix = "{cfg.pv_prefix}"
seed = {cfg.seed}

[tiled]
uri = "{tiled_server.uri}"
api_key = "{tiled_server.api_key}"
catalog = "batmet_cli"

[instruments.dmm]
[instruments.psu]
[instruments.batmet]
""")
    yield path
    for name in ("batmet", "psu"):
        lab.backend(name).make_safe()


def test_collect_prints_the_lab_format_and_stores_the_run(lab, lab_toml, tmp_path, capsys):
    out = tmp_path / "calibration_d_i.txt"
    code = main(["--config", str(lab_toml), "batmet", "collect", "--dac-stop", "700",
                 "--timeout", "30", "-o", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = captured.out.splitlines()
    assert len(lines) == 25 and lines[0].startswith("450\t")
    assert all(re.fullmatch(r"\d+\t-?\d\.?\d*(e-?\d+)?", line) for line in lines), lines[:3]
    dac, current = read_calibration_file(out)
    assert out.read_text().splitlines() == lines          # the file is exactly what was printed
    assert dac.tolist() == list(range(450, 700, 10))
    world = lab.backend("batmet").sim.world
    assert world.dac == 0 and not world.supply.output_on
    uid = re.search(r"run (\S+) stored in tiled", captured.err).group(1)

    # the same run fitted from tiled and from the file give the same line
    code = main(["--config", str(lab_toml), "batmet", "fit", "--run", uid,
                 "--plot", str(tmp_path / "run.png")])
    from_run = capsys.readouterr().out.strip()
    assert code == 0 and CSINK_RE.fullmatch(from_run)
    code = main(["--config", str(lab_toml), "batmet", "fit", "-c", str(out)])
    from_file = capsys.readouterr().out.strip()
    assert code == 0 and from_file == from_run
    assert (tmp_path / "calibration_d_i_fit.png").read_bytes()[:4] == b"\x89PNG"


def test_fit_a_lab_file(tmp_path, capsys):
    """A full-range scan of a simulated unit, in the lab's file format: the csink line recovers it."""
    world = BenchWorld(WorldClock(1.0), seed=7)
    world.supply.output_on = True
    dac, current = [], []
    for code in range(450, 4100, 10):
        world.dac = code
        dac.append(code)
        current.append(world.operating_point().current_A)
        if current[-1] > 3.0:
            break
    path = write_calibration_file(tmp_path / "calibration_d_i.txt", dac, current)
    assert main(["batmet", "fit", "-c", str(path), "--plot", str(tmp_path / "f.png")]) == 0
    captured = capsys.readouterr()
    line = captured.out.strip()
    assert CSINK_RE.fullmatch(line)
    _, lo, hi, a, b, c = line.split()
    truth = world.sink
    assert float(b) == pytest.approx(truth.b, rel=3e-3)
    assert float(c) == pytest.approx(truth.c, abs=2.0)
    grid = np.linspace(0, 3, 31)
    assert np.max(np.abs(float(a) * grid ** 2 + float(b) * grid + float(c) - truth.dac_for(grid))) \
        < 2.0
    assert "accuracy over" in captured.err and "max" in captured.err
    assert (tmp_path / "f.png").is_file()


def test_fit_rejects_a_malformed_file_without_writing_anything(tmp_path, capsys):
    bad = tmp_path / "calibration_d_i.txt"
    bad.write_text("450\t5.19e-05\n460\toops\n")
    assert main(["batmet", "fit", "-c", str(bad)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "calibration_d_i.txt:2" in captured.err and "not two numbers" in captured.err
    assert not (tmp_path / "calibration_d_i_fit.png").exists()
