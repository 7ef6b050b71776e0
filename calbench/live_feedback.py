"""What the session shows while procedures run: bluesky's BestEffortCallback, fixed for derived
runs and saving its figures as PNG files when there is no display.

bluesky's BestEffortCallback sets `_cleanup_motor_heuristic` in start() when a run has no dimension
hints and clears it only on a 'primary' descriptor. Our derived runs (fits, reports) have no primary
stream, so the flag survived into the next run, whose primary descriptor then looked hinted field
names up as object names: KeyError, and no live table for the rest of the session.

Without a display, a live plot's `draw_idle` renders the whole figure synchronously on every event
(Agg has no idle loop): a QC6 stress test, seven channels of VMon and IMon, spent ~25 s drawing per
10 V step, longer than the step. There the figures are drawn once, when they are saved.
"""
from __future__ import annotations

import re
from pathlib import Path

from bluesky.callbacks.best_effort import BestEffortCallback


def has_display() -> bool:
    """True when matplotlib draws on a screen (a GUI backend), False for Agg and friends."""
    import matplotlib

    backend = matplotlib.get_backend().lower()
    return not (backend in ("agg", "pdf", "ps", "svg", "cairo", "template")
                or backend.startswith("module://matplotlib_inline"))


class SessionBestEffortCallback(BestEffortCallback):
    """BestEffortCallback whose state is per run; without a display, each run's figures are saved
    as `<plots_dir>/scan<scan_id>_<plan_name>_<uid8>[_N].png` and the paths printed."""

    def __init__(self, *args, plots_dir: str | Path | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.plots_dir = Path(plots_dir) if plots_dir else None
        self.saved: list[Path] = []        # PNG files of the last run

    def start(self, doc):
        self._cleanup_motor_heuristic = False       # per run, whatever the previous run left
        self.saved = []
        super().start(doc)

    def descriptor(self, doc):
        super().descriptor(doc)
        if not has_display():
            for fig in self._run_figures():
                fig.canvas.draw_idle = _nothing        # drawn by savefig at the end of the run

    def stop(self, doc):
        start = self._start_doc
        figures = self._run_figures()
        super().stop(doc)
        if self.plots_dir is not None and figures and start is not None and not has_display():
            self.saved = save_figures(figures, self.plots_dir, start)
            for path in self.saved:
                print(f"plot saved: {path}")

    def _run_figures(self) -> list:
        """The figures this run drew into (live plots, grids, scatters)."""
        figures = []
        for group in (self._live_plots, self._live_grids, self._live_scatters):
            for by_key in group.values():
                for cb in by_key.values():
                    fig = cb.ax.figure
                    if fig not in figures:
                        figures.append(fig)
        return figures


def _nothing(*args, **kwargs) -> None:
    pass


def save_figures(figures: list, directory: Path, start: dict) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    plan = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(start.get("plan_name", "run")))
    stem = f"scan{start.get('scan_id', '')}_{plan}_{start['uid'][:8]}"
    paths = []
    for i, fig in enumerate(figures):
        path = directory / (f"{stem}.png" if i == 0 else f"{stem}_{i + 1}.png")
        fig.savefig(path, dpi=90)
        paths.append(path)
    return paths
