"""Progress with an ETA for long plan steps (tube warm-up, QC6 ramps and holds, scans): a tqdm bar
in the step's own units (seconds of instrument time, volts, steps, points). bluesky's
ProgressBarManager covers waits on statuses; these steps are loops of reads and sleeps, or scans of
many short points, which it does not see."""
from __future__ import annotations

from tqdm.auto import tqdm


class StepProgress:
    """`with StepProgress(20.0, "tube warm-up", unit="s") as p: ... p.update_to(done)`"""

    def __init__(self, total: float, desc: str, *, unit: str = "s"):
        self.total = max(float(total), 1e-9)
        self.bar = tqdm(total=round(self.total, 1), desc=desc, unit=unit, leave=True,
                        bar_format="{desc}: {percentage:3.0f}%|{bar:30}| {n:.1f}/{total:.1f} "
                                   "{unit} [{elapsed}<{remaining}]")

    def update_to(self, done: float) -> None:
        self.bar.n = round(min(max(float(done), 0.0), self.total), 1)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def point_progress(plan, total: int, desc: str):
    """Plan wrapper: a bar that advances with each event of `plan`'s primary stream (its points;
    a detector-side scan's all at once when collected), with an ETA; closed however the plan
    ends. A dry run (no run uid comes back) shows no bar."""
    from bluesky import preprocessors as bpp

    state = {"stream": None, "done": 0, "bar": None}

    def opened(msg):
        uid = yield msg
        if uid is not None and state["bar"] is None:
            state["bar"] = StepProgress(total, desc, unit="points")
        return uid

    def collected(msg):
        payload = yield msg          # a scan run in the detector: its points, collected at once
        if state["bar"] is not None and payload:
            state["done"] += len(payload)
            state["bar"].update_to(state["done"])
        return payload

    def count(msg):
        if msg.command == "open_run" and state["bar"] is None:
            return opened(msg), None
        if msg.command == "collect" and msg.kwargs.get("name", "primary") == "primary":
            return collected(msg), None
        if msg.command == "create":
            state["stream"] = msg.kwargs.get("name")
        elif msg.command == "save" and state["stream"] == "primary" and state["bar"] is not None:
            state["done"] += 1
            state["bar"].update_to(state["done"])
        return None, None

    def close():
        if state["bar"] is not None:
            state["bar"].close()
        yield from ()

    return (yield from bpp.finalize_wrapper(bpp.plan_mutator(plan, count), close()))
