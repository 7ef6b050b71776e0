# calbench session: lab configuration, RunEngine (persistent metadata, tiled persistence, progress
# bars, BestEffortCallback), the usual bluesky names. All logic lives in calbench.session.
import matplotlib

if not matplotlib.get_backend().lower().startswith(("qt", "tk", "macosx", "nbagg", "module")):
    matplotlib.use("Agg")

import numpy as np  # noqa: E402,F401
import bluesky.plans as bp  # noqa: E402,F401
import bluesky.plan_stubs as bps  # noqa: E402,F401
import bluesky.preprocessors as bpp  # noqa: E402,F401
from bluesky import SupplementalData  # noqa: E402
from bluesky.simulators import summarize_plan  # noqa: E402,F401
from bluesky_queueserver import is_re_worker_active  # noqa: E402
from IPython import get_ipython  # noqa: E402
from tiled.queries import Key  # noqa: E402,F401

from calbench.config import load_config  # noqa: E402
from calbench.session import configure_ca, configure_ipython, make_run_engine  # noqa: E402
from calbench.session_console import install_quiet_exit  # noqa: E402

cfg = load_config()
configure_ca(cfg)
RE, bec, cat = make_run_engine(cfg)
db = cat                      # the catalog under its usual name too
peaks = bec.peaks
sd = SupplementalData()       # baseline: the lab's state at the start and end of every run
RE.preprocessors.append(sd)
install_quiet_exit(getattr(RE, "persister", None))
if get_ipython() is not None and not is_re_worker_active():  # at the prompt only
    configure_ipython(get_ipython(), cfg, RE)
