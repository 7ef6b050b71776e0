# Devices of every instrument in the lab configuration, under their usual names (box, det, ...).
from calbench.session import make_lab_devices  # noqa: E402

globals().update(make_lab_devices(cfg))
