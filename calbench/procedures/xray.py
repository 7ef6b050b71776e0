"""The X-ray box of the EIGER calibration: its demo step (the box has no subcommands of its own; the
EIGER procedure drives it)."""
from __future__ import annotations


def demo_step(ctx):
    """`calbench demo`: tube on, then a scan of the tube current read back through Channel Access."""
    from bluesky.plans import scan

    from calbench.plans.xray import tube_on
    from calbench.procedures.demo import DemoResult

    box = ctx.devices["xraybox"]
    ctx.RE(tube_on(box, 40.0, 10.0))
    result = ctx.RE(scan([box.voltage], box.current, 10.0, 40.0, 4), purpose="demo")
    return DemoResult("X-ray box: tube current scan", list(result.run_start_uids),
                      summary=f"current set 10..40 mA, read back {box.current.get():.2f} mA")
