# A client of the lab's queue server (`calbench up` starts it): RM.status(), RM.item_add(BPlan(...)),
# RM.queue_start(). Not in the queue server's own worker, which loads this profile too.
from bluesky_queueserver import is_re_worker_active  # noqa: E402

if not is_re_worker_active():
    from bluesky_queueserver_api import BPlan  # noqa: F401
    from calbench.queue_service import queue_client

    RM = queue_client(cfg)  # noqa: F821
