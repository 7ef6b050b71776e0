"""`calbench queue ...`: the lab's queue server (Redis + RE Manager) and what it is doing.

    calbench queue start [--no-open]     Redis and the RE Manager (as `calbench up` does)
    calbench queue stop [--force]        the RE Manager and our Redis (refuses while a plan runs)
    calbench queue status                the manager's state, the running plan and its progress
    calbench queue result [ITEM] [--json]  what a finished item's plan returned (the last item by
                                         default; ITEM: the start of its item uid)
    calbench queue keys                  a CurveZMQ key pair for the control socket (restart after)
"""
from __future__ import annotations

import json

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


class ItemNotFound(LookupError):
    """The history holds no such item; the message says how to list them."""


def history_item(cfg, item_uid: str | None = None) -> dict:
    """The finished item whose uid starts with `item_uid` (the last finished one if None)."""
    from calbench.queue_service import queue_client

    RM = queue_client(cfg)
    try:
        items = RM.history_get()["items"]
    finally:
        RM.close()
    found = [h for h in items if item_uid is None or h["item_uid"].startswith(item_uid)]
    if not found:
        raise ItemNotFound("the queue's history is empty" if not items else
                           f"no item {item_uid!r} in the queue's history; `qserver history get` "
                           "lists the items with their uids")
    return found[-1]


def item_result(cfg, item: dict) -> dict | None:
    """The return value the item's plan recorded (plans/plan_result.py), read from tiled; None
    when it recorded none (a plan returning nothing, or a failed item)."""
    from calbench.plans.plan_result import RESULT_PLAN_NAME
    from calbench.tiled_service import connect_catalog

    cat = connect_catalog(cfg, start=False)
    for uid in reversed(item["result"].get("run_uids") or []):
        try:
            start = cat[uid].metadata["start"]
        except KeyError:            # a run not (yet) in this catalog
            continue
        if start.get("plan_name") == RESULT_PLAN_NAME:
            return start.get("result")
    return None


def _result_lines(result, indent: str = "  ") -> list[str]:
    lines = []
    for key, value in result.items():
        if isinstance(value, list) and value and len(json.dumps(value)) > 90:
            lines.append(f"{indent}{key}:")
            lines += [f"{indent}  {json.dumps(v) if not isinstance(v, str) else v}" for v in value]
        elif isinstance(value, dict):
            lines.append(f"{indent}{key}:")
            lines += _result_lines(value, indent + "  ")
        else:
            lines.append(f"{indent}{key}: {json.dumps(value) if not isinstance(value, str) else value}")
    return lines


def format_item_result(item: dict, result) -> str:
    """A finished item in a few lines: name, exit status, runs, and its plan's result."""
    r = item["result"]
    took = (r.get("time_stop") or 0) - (r.get("time_start") or 0)
    head = (f"{item['name']} (item {item['item_uid'][:8]}): {r.get('exit_status')} in "
            f"{took:.1f} s, {len(r.get('run_uids') or [])} runs")
    lines = [head]
    if r.get("exit_status") != "completed" and r.get("msg"):
        lines.append(f"  {r['msg'].strip().splitlines()[-1]}")
    if result is None:
        lines.append("  no result recorded (the plan returned nothing); runs: "
                     + ", ".join(r.get("run_uids") or []))
    elif isinstance(result, dict):
        lines += _result_lines(result)
    else:
        lines += _result_lines({"result": result})
    return "\n".join(lines)


def cmd_result(args) -> int:
    from calbench.queue_service import manager_status
    from calbench.tiled_service import TiledUnavailable

    cfg = load_config(args.config)
    if manager_status(cfg) is None:
        print("RE Manager: no answer; start it with `calbench up`")
        return 1
    try:
        item = history_item(cfg, args.item)
    except ItemNotFound as exc:
        print(exc)
        return 1
    try:
        result = item_result(cfg, item)
    except TiledUnavailable as exc:
        print(f"the item's result lives in tiled, which does not answer: {exc}")
        return 1
    if args.json:
        print(json.dumps({"item_uid": item["item_uid"], "name": item["name"],
                          "exit_status": item["result"].get("exit_status"),
                          "run_uids": item["result"].get("run_uids"), "result": result},
                         indent=2))
    else:
        print(format_item_result(item, result))
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
    p = q.add_parser("result", help="what a finished item's plan returned (uids, files, numbers)")
    p.add_argument("item", nargs="?", help="the start of the item's uid (default: the last item)")
    p.add_argument("--json", action="store_true", help="print it as JSON")
    p.set_defaults(func=cmd_result)
