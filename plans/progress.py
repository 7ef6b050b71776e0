"""Progress with an ETA for long plan steps (tube warm-up, QC6 ramps and holds): a tqdm bar in the
step's own units (seconds of instrument time, volts, steps). bluesky's ProgressBarManager covers
waits on statuses; these steps are loops of reads and sleeps, which it does not see."""
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
