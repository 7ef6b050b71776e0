# Plans of every procedure, and the plans and stubs of bluesky.
from bluesky.plans import count, scan, rel_scan, list_scan, grid_scan  # noqa: F401
from bluesky.plan_stubs import mv, mvr, rd, sleep  # noqa: F401

from calbench.plans.xray import tube_on, select_target, open_xrf_shutter, close_shutters, xrf_exposure  # noqa: F401
from calbench.plans.eiger import (setup_detector, vrf_scan, scurve, trimbit_scan, load_trimbits,  # noqa: F401
                                  verification_scurve, global_calibration, calibrate_eiger,
                                  current_calibration)
from calbench.plans.eiger_scans import detector_scan  # noqa: F401
from calbench.analysis.eiger_reanalysis import reanalyse_calibration  # noqa: F401
from calbench.plans.batmet import (collect_sink_calibration, calibrate_sink,  # noqa: F401
                                   write_sink_calibration, verify_sink_calibration)
from calbench.plans.qc6 import (check_connection, megger_test, stress_test,  # noqa: F401
                                iv_short_stability, long_stability, resume_long_stability)
from calbench.plans.fee import transit_time_calibration, realtime_cable_monitor  # noqa: F401
# The same plans with signatures bluesky-queueserver can validate (JSON values and device names).
from calbench.plans.queue_facing import queue_facing_plans  # noqa: E402

globals().update(queue_facing_plans(globals(), catalog=cat))  # noqa: F821
# Runs by the names the lab uses: last_run(cat, "vrf_scan"), derived_runs(cat, uid).
from calbench.run_queries import derived_runs, last_run, parent_run, runs_named  # noqa: E402,F401
