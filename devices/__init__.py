"""ophyd devices: clients of the calbench IOCs' PV interfaces (no physics, no IOC imports).

ophyd talks Channel Access through caproto's pure-Python client unless CALBENCH_CA_LAYER says
otherwise ("pyepics"), so no native CA library is needed.
"""
import os

import ophyd

if ophyd.get_cl().name != os.environ.get("CALBENCH_CA_LAYER", "caproto"):
    ophyd.set_cl(os.environ.get("CALBENCH_CA_LAYER", "caproto"))
