"""The session's live feedback: BestEffortCallback tables for every scan after a derived run (no
primary stream), figures saved as PNG without a display."""
from __future__ import annotations

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
from bluesky.plans import list_scan
from ophyd import Signal

from calbench.live_feedback import SessionBestEffortCallback


@bpp.run_decorator(md={"plan_name": "fit_step"})
def _derived_run(result):
    """A run like our derived ones: no dimension hints, no primary stream."""
    yield from bps.declare_stream(result, name="fit")
    yield from bps.trigger_and_read([result], name="fit")


def test_table_and_plot_after_a_derived_run(lab, RE, tmp_path, capsys):
    dmm, psu = lab.device("dmm"), lab.device("psu")
    bec = SessionBestEffortCallback(plots_dir=tmp_path / "plots")
    RE.subscribe(bec)
    RE(_derived_run(Signal(name="slope", value=1.5)))
    # dimensions hinted by field name (not an object name), as the EIGER and QC6 plans hint them:
    # the stock callback's leftover heuristic looked the field up as an object (KeyError)
    RE(list_scan([dmm], psu.voltage, [1.0, 2.0, 3.0],
                 md={"hints": {"dimensions": [(["dmm_reading_std"], "primary")]}}))
    out = capsys.readouterr().out
    header = [line for line in out.splitlines() if "seq_num" in line and "dmm_reading_std" in line]
    assert header, out                      # the live table of the scan after the derived run
    assert len([line for line in out.splitlines() if line.startswith("|   ")
                and line.split("|")[1].strip() in "123"]) >= 3, out
    assert len(bec.saved) == 1 and bec.saved[0].stat().st_size > 0
    assert bec.saved[0].parent == tmp_path / "plots" and "list_scan" in bec.saved[0].name
    assert f"plot saved: {bec.saved[0]}" in out
