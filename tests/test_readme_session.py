"""The README's interactive block, run top to bottom in the lab's IPython profile as `make run` opens
it (against the session's simulated IOCs, accelerated, and its tiled server): every line works as
written."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_session_profile import run_profile

ROOT = Path(__file__).resolve().parents[1]


def readme_interactive_block() -> str:
    """The first python block of the README's quick start (what a user types after `make run`)."""
    text = (ROOT / "README.md").read_text()
    quick_start = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", quick_start, re.S)
    assert blocks, "the README's quick start has no python block"
    return blocks[0]


def _statements(block: str) -> list[str]:
    """The block's statements, comments cut (continuation lines of a comment start indented)."""
    return [line.split("  #")[0].strip() for line in block.splitlines()
            if line.strip() and not line[0].isspace()]


@pytest.mark.timeout(1500)
def test_the_readme_interactive_block_works_as_written(lab, tiled_server, tmp_path):
    statements = _statements(readme_interactive_block())
    script = []
    for n, statement in enumerate(statements):
        if statement.startswith("RE(") or re.match(r"^\w+ = ", statement):
            script += [statement, f"print('DONE {n}')"]
        else:                    # an expression: what the user would see, in one line
            script += [f"_value = {statement}",
                       f"print('DONE {n}', type(_value).__name__, "
                       "len(_value) if hasattr(_value, '__len__') else 1)"]
    done = run_profile(lab, tiled_server, tmp_path, "\n".join(script) + "\n", timeout=1500)
    # tiled's download progress bars are not output to judge
    out = "\n".join(line for line in (done.stdout + done.stderr).splitlines()
                    if "\x1b" not in line and "Retrying" not in line)
    print(out)                   # `pytest -s` shows the session as the user saw it
    assert done.returncode == 0, out[-6000:]
    assert "Traceback" not in out, out[-6000:]
    finished = re.findall(r"^DONE (\d+)(?: (\w+) (\d+))?$", out, re.M)
    assert [int(n) for n, _, _ in finished] == list(range(len(statements))), out[-6000:]
    # every procedure ends with a summary that fits on one screen
    for header in (r"^EIGER \S+ \S+, trimmed on Cu: calibration ",
                   r"^QC6 stress_test on .*: (passed|FAILED), \d+ trips", r"^BatMet current sink: csink ",
                   r"^FEE channel \d+: transit time dt = "):
        assert re.search(header, out, re.M), f"no summary {header!r} in\n{out[-6000:]}"
    eiger = re.search(r"^EIGER \S+ \S+, trimmed on Cu: calibration .*?^  summary run ", out,
                      re.M | re.S).group(0)
    assert len(eiger.splitlines()) <= 14, eiger
    for (n, kind, size), statement in zip(finished, statements):
        if kind:                 # every read returns data, the search finds the stress test
            assert int(size) > 0, f"{statement} gave an empty {kind}"
