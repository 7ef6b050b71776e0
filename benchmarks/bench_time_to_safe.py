"""Time from a killed session to a safe instrument, per procedure (the procedure lease, iocs/lease.py).

    python benchmarks/bench_time_to_safe.py [--lease-s 3] [qc6 batmet xray]

Each row: a session running the procedure is killed (SIGKILL) in its hazardous phase (QC6 long
stability: foils at 580 V; BatMet calibration: sink current, supply on; X-ray exposure: XRF shutter
open, HV on); the figures are the wall seconds from the kill to the IOC's lease lapse and to a safe
instrument (simulator's truth). The baseline in the same row is the lease itself: the lapse comes
within one lease of the kill, the safe state after the instrument's own ramp-down or shutter motion.
Without the lease the instrument stayed hazardous until someone came (issue 12).
"""
from __future__ import annotations

import sys

from calbench.procedures.kill_drill import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
