import numpy as np
from bluesky.plans import count
from calbench.devices.base import set_and_check
from calbench.plans.xray import tube_on, xrf_exposure

def test_dbg(lab, RE):
    box = lab.device("xraybox")
    det = lab.device("eiger"); det.data_dir = lab.cfg.data_dir
    set_and_check(det.dynamic_range, 32); set_and_check(det.exptime, 0.1)
    docs = []
    RE(tube_on(box, 40, 40))
    (uid,) = RE(xrf_exposure(box, "Cu", count([det], num=3)), lambda n, d: docs.append((n, d)))
    for n, d in docs:
        if n in ("stream_resource", "stream_datum"):
            print(n, {k: d[k] for k in d if k in ("uid", "uri", "indices", "seq_nums", "stream_resource", "descriptor")})
    node = RE.catalog[uid]["primary"]["eiger_image"]
    ds = node.data_sources()[0]
    print(ds.structure, [a.data_uri for a in ds.assets]); print(node.shape)
