"""databroker's v2 API on our catalog: search by plan name, runs and streams read back."""
from __future__ import annotations

from bluesky.plans import count, list_scan


def test_databroker_v2_search_and_read(lab, RE, catalog):
    from databroker.queries import Key, ScanID

    dmm, psu = lab.device("dmm"), lab.device("psu")
    (uid_count,) = RE(count([dmm], 2))
    (uid_scan,) = RE(list_scan([dmm], psu.voltage, [1.0, 2.0]))
    scan_id = catalog[uid_scan].metadata["start"]["scan_id"]

    found = catalog.search(Key("plan_name") == "list_scan")
    assert list(found) == [uid_scan]
    assert list(catalog.search(ScanID(scan_id))) == [uid_scan]
    run = catalog[uid_count]
    assert type(run).__module__.startswith(("databroker", "bluesky_tiled_plugins"))
    assert run.start["plan_name"] == "count" and run.stop["exit_status"] == "success"
    table = run.primary.read()                       # v2 attribute access to a stream
    assert len(table["dmm_reading"]) == 2
    assert catalog[-1].start["uid"] == uid_scan
