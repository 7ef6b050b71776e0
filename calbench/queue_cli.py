"""`calbench queue ...`: the lab's queue server (Redis + RE Manager) and what it is doing.

    calbench queue start [--no-open]     Redis and the RE Manager (as `calbench up` does)
    calbench queue stop [--force]        the RE Manager and our Redis (refuses while a plan runs)
    calbench queue status                the manager's state, the running plan and its progress
    calbench queue keys                  a CurveZMQ key pair for the control socket (restart after)
"""
from __future__ import annotations

import httpx

from calbench.config import load_config


def _progress_line(cfg, running: dict) -> str | None:
    """The last progress event of the running plan's run in tiled (QC6 stability holds)."""
    from tiled.queries import Key

    from calbench.tiled_service import TiledUnavailable, connect_catalog
    try:
        cat = connect_catalog(cfg, start=False)
    except (TiledUnavailable, OSError):
        return None
    runs = cat.search(Key("plan_name") == running.get("name"))
    if len(runs) == 0:
        return None
    run = runs.values().last()
    if "progress" not in run:
        return f"  run {run.metadata['start']['uid'][:8]}: no progress event yet"
    try:
        table = run["progress"].base["internal"].read()
    except (KeyError, LookupError, ValueError, OSError, httpx.HTTPError):   # table not stored yet
        table = ()
    if not len(table):
        return f"  run {run.metadata['start']['uid'][:8]}: no progress event yet"
    hold_h = run.metadata["start"].get("qc6_params", {}).get("hold_h")
    elapsed_h = float(table["qc6_elapsed_s"].iloc[-1]) / 3600
    of = f" of {hold_h:g} h" if hold_h else " h"
    return (f"  run {run.metadata['start']['uid'][:8]}: hold {elapsed_h:.2f}{of}, "
            f"{int(table['qc6_trips'].iloc[-1])} trips (progress event {len(table)})")


def cmd_status(args) -> int:
    from calbench.queue_service import control_address, manager_status, queue_client, redis_answers

    cfg = load_config(args.config)
    if not redis_answers(cfg):
        print(f"Redis: down on 127.0.0.1:{cfg.queue.redis_port}; start it with `calbench up`")
    status = manager_status(cfg)
    if status is None:
        print(f"RE Manager: no answer on {control_address(cfg)}; start it with `calbench up` "
              "(or check [queue] in the lab file, and the key if the socket is encrypted)")
        return 1
    env = "open" if status["worker_environment_exists"] else "closed (`qserver environment open`)"
    print(f"RE Manager: {status['manager_state']}, environment {env}, RunEngine "
          f"{status['re_state']}; {status['items_in_queue']} queued, "
          f"{status['items_in_history']} in history")
    if status.get("running_item_uid"):
        RM = queue_client(cfg)
        try:
            running = RM.queue_get()["running_item"]
        finally:
            RM.close()
        print(f"running: {running.get('name')} args={running.get('args', [])} "
              f"kwargs={running.get('kwargs', {})}")
        line = _progress_line(cfg, running)
        if line:
            print(line)
    return 0


def cmd_start(args) -> int:
    from calbench.queue_service import start_queue
    print(start_queue(load_config(args.config), open_env=not args.no_open))
    return 0


def cmd_stop(args) -> int:
    from calbench.queue_service import stop_queue
    stopped = stop_queue(load_config(args.config), force=args.force)
    print(", ".join(stopped) + " stopped" if stopped else "nothing of ours was running")
    return 0


def cmd_keys(args) -> int:
    from calbench.queue_service import make_keys
    private, public = make_keys(load_config(args.config))
    print(f"private key {private} (the manager's, mode 0600); public key {public}:\n"
          f"  {public.read_text().strip()}\n"
          "Restart the manager (`calbench queue stop; calbench queue start`); clients set "
          "QSERVER_ZMQ_PUBLIC_KEY to the public key")
    return 0


def add_cli(sub) -> None:
    q = sub.add_parser("queue", help="the queue server (Redis + RE Manager)").add_subparsers(
        dest="queue_cmd", required=True)
    p = q.add_parser("start", help="start Redis and the RE Manager, open its environment")
    p.add_argument("--no-open", action="store_true", help="leave the worker environment closed")
    p.set_defaults(func=cmd_start)
    p = q.add_parser("stop", help="stop the RE Manager and our Redis")
    p.add_argument("--force", action="store_true", help="even while a plan runs")
    p.set_defaults(func=cmd_stop)
    q.add_parser("status", help="state, running plan and its progress").set_defaults(func=cmd_status)
    q.add_parser("keys", help="generate a CurveZMQ key pair").set_defaults(func=cmd_keys)
