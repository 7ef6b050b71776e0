"""ophyd devices: clients of the calbench IOCs' PV interfaces (no physics, no IOC imports).

ophyd talks Channel Access through caproto's pure-Python client unless CALBENCH_CA_LAYER says
otherwise ("pyepics"), so no native CA library is needed.
"""
import os

import ophyd

if ophyd.get_cl().name != os.environ.get("CALBENCH_CA_LAYER", "caproto"):
    ophyd.set_cl(os.environ.get("CALBENCH_CA_LAYER", "caproto"))

from calbench.devices.ca_whole_sends import install as _install_whole_sends  # noqa: E402

_install_whole_sends()      # large waveform puts (trimbit maps) must not break the circuit
