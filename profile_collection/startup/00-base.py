# calbench session: lab configuration, RunEngine (persistent metadata, tiled persistence, progress
# bars, BestEffortCallback). All logic lives in calbench.session.
import matplotlib

if not matplotlib.get_backend().lower().startswith(("qt", "tk", "macosx", "nbagg", "module")):
    matplotlib.use("Agg")

from calbench.session import configure_ca, make_run_engine  # noqa: E402
from calbench.config import load_config  # noqa: E402

cfg = load_config()
configure_ca(cfg)
RE, bec, cat = make_run_engine(cfg)
peaks = bec.peaks
