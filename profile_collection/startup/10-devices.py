# Devices of every instrument in the lab configuration, under their usual names (box, det, ...),
# and the lab's state they record in every run's baseline.
from calbench.session import lab_baseline, make_lab_devices  # noqa: E402

globals().update(make_lab_devices(cfg))
sd.baseline = lab_baseline(globals())
