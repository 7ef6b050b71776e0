"""The paper's table of incremental transit times, reproduced on the simulated FEE board
(`calbench fee table`, calbench.procedures.fee).

The demonstration (reference/fee.md): short cables of 27.5, 57.5, 77.5, 106.5 and 137.5 mm are added
to a long RG58 cable and the transit time is calibrated at each length; the increments are compared
with 2 dL / v. Here the simulated board (iocs/sim/fee.py) plays the cable and the electronics, with
the temperature held at the reference so that only the length changes. For each length, one
"typical" calibration is reported (as in the paper) and `repeats` more give its two errors:

* statistical: the spread of the repeated calibrations (the paper's Gaussian width);
* systematic: the bias of the walk model on the simulated pulse shapes, from the truth the
  simulator knows: the model fitted (with the estimator's weighting and fit range) to the
  noise-free, unquantised threshold-crossing curves, minus the pulses' true start times. For the
  increments it is the change of that bias between dL and 0. In the absolute transit time the
  skin effect's group delay (the reflection's slow onset) dominates it; it cancels in increments.

The naive estimate has no walk model, so its systematic part is its constant walk difference,
which cancels in the increments: its table must stand on its statistical error alone.

Agreement. Each row's pull is (dt - 2 dL / v) / combined error, the two errors added in quadrature.
The typical calibration scatters by its statistical error, so an unbiased estimator with honest
errors puts a row outside one combined error about one time in three: "agrees within the combined
error" is judged on the whole table: its chi^2 against the number of rows (the p-value), with the
covariance the shared dL = 0 calibration gives the increments, and no row beyond three.

Every estimator sees the same sweeps: "binned" (the paper's), "likelihood", and the naive mean TDC
difference at one amplitude, which the table shows failing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from calbench.contracts.fee import TDC_LSB_NS

# The paper's table: added length (mm) -> (measured dt ns, its error ns); expected = 2 dL / v.
PAPER_ADDED_MM = (0.0, 27.5, 57.5, 77.5, 106.5, 137.5)
PAPER_MEASURED_NS = {0.0: (0.0, 0.0), 27.5: (0.279, 0.013), 57.5: (0.548, 0.011),
                     77.5: (0.736, 0.011), 106.5: (1.000, 0.011), 137.5: (1.337, 0.009)}
ESTIMATORS = ("binned", "likelihood", "naive")
BASE_LENGTH_M = 20.0


@dataclass(frozen=True)
class TableRow:
    """One added length, one estimator. Times in ns."""
    added_mm: float
    expected_ns: float            # 2 dL / v
    measured_ns: float            # the typical calibration's increment
    stat_ns: float                # spread of repeated increments
    sys_ns: float                 # walk-model bias of the increment (noise-free curves)
    mean_bias_ns: float           # mean repeated increment - expected (for comparison)
    calibration_stat_ns: float    # spread of repeated (absolute) calibrations at this length
    absolute_bias_ns: float       # mean repeated dt - simulated 2 L / v
    absolute_sys_ns: float        # walk-model bias of the absolute dt (noise-free curves)

    @property
    def combined_ns(self) -> float:
        return math.hypot(self.stat_ns, self.sys_ns)

    @property
    def deviation_ns(self) -> float:
        return self.measured_ns - self.expected_ns

    @property
    def pull(self) -> float:
        """Deviation from 2 dL / v in units of the combined error."""
        return self.deviation_ns / self.combined_ns if self.combined_ns > 0 else math.inf


@dataclass
class PaperTableStudy:
    """The reproduction: rows per estimator, the velocity fitted from each, the simulator's truth."""
    base_length_m: float
    velocity_m_per_ns: float      # the simulated cable's velocity (truth)
    repeats: int
    seed: int
    rows: dict[str, list[TableRow]] = field(default_factory=dict)
    velocity_fit: dict[str, tuple[float, float]] = field(default_factory=dict)

    def calibration_stat_ns(self, estimator: str) -> float:
        """Pooled spread of repeated calibrations (ns) over all lengths."""
        return float(np.sqrt(np.mean([r.calibration_stat_ns ** 2 for r in self.rows[estimator]])))

    def agreement(self, estimator: str) -> tuple[float, int, float, float]:
        """(chi^2, rows, p-value, largest |pull|) of the table's increments against 2 dL / v.

        Every increment subtracts the same dL = 0 calibration, so their errors share its variance:
        the chi^2 uses that covariance (the spread of calibrations at each length on the diagonal,
        the dL = 0 spread everywhere, the walk-model bias added on the diagonal)."""
        from scipy.stats import chi2
        rows = self.rows[estimator]
        base_var = rows[0].calibration_stat_ns ** 2
        dev = np.array([r.deviation_ns for r in rows[1:]])
        cov = np.full((len(dev), len(dev)), base_var)
        cov[np.diag_indices_from(cov)] += [r.calibration_stat_ns ** 2 + r.sys_ns ** 2
                                           for r in rows[1:]]
        total = float(dev @ np.linalg.solve(cov, dev))
        worst = float(np.max(np.abs([r.pull for r in rows[1:]])))
        return total, len(dev), float(chi2.sf(total, len(dev))), worst


def simulate_paper_table(*, repeats: int = 20, seed: int = 2014, base_length_m: float = BASE_LENGTH_M,
                         added_mm=PAPER_ADDED_MM, channel: int = 0, board=None) -> PaperTableStudy:
    """Calibrate the simulated cable at each added length, 1 + `repeats` times, with every estimator.

    board: a calbench.iocs.sim.fee.FeeBoardSim to use (default: a fresh one with the lab's defaults,
    seeded with `seed`); its temperature is held at the cable's reference temperature."""
    from calbench.analysis.timewalk import fit_transit_time, fit_velocity, naive_transit_time
    from calbench.contracts.clock import WorldClock
    from calbench.iocs.sim.fee import FeeBoardSim

    if repeats < 2:
        raise ValueError(f"repeats = {repeats}: at least 2 repeated calibrations give a spread")
    if board is None:
        board = FeeBoardSim(WorldClock(), seed)
    cable = board.cables[channel]
    board.environment.mean_C = cable.reference_C
    board.environment.daily_swing_K = 0.0
    board.environment.weather_K = 0.0
    registers = np.arange(500, 12001)
    times = np.full(registers.size, board.clock.now())
    n = repeats + 1
    dt = {e: np.full((len(added_mm), n), np.nan) for e in ESTIMATORS}
    model_bias = {e: np.zeros(len(added_mm)) for e in ESTIMATORS}
    truth = np.empty(len(added_mm))
    for i, added in enumerate(added_mm):
        cable.length_m = base_length_m + added * 1e-3
        truth[i] = board.truth(channel)["transit_ns"]
        curve = board.walk_curve(channel, registers)
        for rep in range(n):
            rng = np.random.default_rng([seed, i, rep])
            r = board.pulses(channel, registers, times, rng=rng)
            for method in ("binned", "likelihood"):
                fit = fit_transit_time(
                    r.direct_charge_pC, r.direct_time_ns, r.reflected_charge_pC, r.reflected_time_ns,
                    method, amplitude=registers, label=f"dL = {added} mm")
                dt[method][i, rep] = fit.dt_ns
                if rep == 0:    # the model's bias over the fit range this calibration used
                    model_bias[method][i] = (
                        walk_model_bias(method, curve["q_reflected_pC"], curve["t_reflected_ns"],
                                        curve["t0_reflected_ns"], fit.reflected.q_min_pC)
                        - walk_model_bias(method, curve["q_direct_pC"], curve["t_direct_ns"],
                                          curve["t0_direct_ns"], fit.direct.q_min_pC))
            dt["naive"][i, rep] = naive_transit_time(r.direct_time_ns, r.reflected_time_ns,
                                                     registers)[0]
    cable.length_m = base_length_m
    v = cable.velocity_m_per_ns
    study = PaperTableStudy(base_length_m, v, repeats, seed)
    dl_m = np.asarray(added_mm) * 1e-3
    for e in ESTIMATORS:
        d = dt[e]
        inc = d - d[0]
        rows = []
        for i, added in enumerate(added_mm):
            expected = 2 * dl_m[i] / v
            rep_inc = inc[i, 1:]
            rows.append(TableRow(
                added, expected, float(inc[i, 0]),
                stat_ns=float(rep_inc.std(ddof=1)) if i else 0.0,
                sys_ns=float(model_bias[e][i] - model_bias[e][0]),
                mean_bias_ns=float(rep_inc.mean() - expected) if i else 0.0,
                calibration_stat_ns=float(d[i, 1:].std(ddof=1)),
                absolute_bias_ns=float(d[i, 1:].mean() - truth[i]),
                absolute_sys_ns=float(model_bias[e][i])))
        study.rows[e] = rows
        errs = [max(r.combined_ns, 1e-3) for r in rows[1:]]
        vf = fit_velocity(dl_m[1:], [r.measured_ns for r in rows[1:]], errs)
        study.velocity_fit[e] = (vf.velocity_m_per_ns, vf.velocity_err_m_per_ns)
    return study


def walk_model_bias(method: str, q_pC: np.ndarray, t_exact_ns: np.ndarray, t0_true_ns: float,
                    q_min_pC: float, lsb_ns: float = TDC_LSB_NS) -> float:
    """T0 of the walk model fitted to a noise-free crossing curve, minus the true start (ns).

    The estimator's weighting is kept: "likelihood" weighs every pulse alike (points uniform in
    charge), "binned" every TDC bin alike (one point per LSB of walk)."""
    ok = np.isfinite(t_exact_ns) & np.isfinite(q_pC) & (q_pC >= q_min_pC)
    q, t = q_pC[ok], t_exact_ns[ok]
    if method == "binned":
        # one point per TDC bin, at the bin centres the estimator uses
        order = np.argsort(t)
        first = (math.floor(t[order][0] / lsb_ns) + 1.5) * lsb_ns
        grid = np.arange(first, t[order][-1], lsb_ns)
        q = np.interp(grid, t[order], q[order])
        t = grid
    x = np.column_stack([np.ones_like(q), q ** -0.5, q ** -1.5])
    coef, *_ = np.linalg.lstsq(x, t, rcond=None)
    return float(coef[0] - t0_true_ns)


def format_paper_table(study: PaperTableStudy) -> str:
    """The table as text: paper vs each estimator (typical increment, statistical, systematic)."""
    lines = [f"Incremental transit time, {study.base_length_m:g} m of simulated RG58 plus dL "
             f"(v = {study.velocity_m_per_ns} m/ns; 1 typical + {study.repeats} repeated "
             f"calibrations per length, seed {study.seed}).",
             "Per estimator, in ns: dt = increment of the typical calibration, stat = spread of the "
             "repeated increments,",
             "sys = walk-model bias of the increment on the simulated pulse shapes (the naive "
             "estimate has none).", ""]
    head = f"{'dL mm':>6} {'2dL/v':>6} {'paper':>12}"
    sub = f"{'':>6} {'':>6} {'':>12}"
    for e in ESTIMATORS:
        head += f" | {e:^22}"
        sub += f" | {'dt':>7} {'stat':>6} {'sys':>7}"
    lines += [head, sub, "-" * len(head)]
    for i, row in enumerate(study.rows["binned"]):
        paper = PAPER_MEASURED_NS.get(row.added_mm)
        line = f"{row.added_mm:6.1f} {row.expected_ns:6.3f} "
        line += f"{paper[0]:5.3f}+-{paper[1]:.3f}" if paper else f"{'':12}"
        for e in ESTIMATORS:
            r = study.rows[e][i]
            line += f" | {r.measured_ns:7.3f} {r.stat_ns:6.3f} {r.sys_ns:+7.3f}"
        lines.append(line)
    lines.append("")
    for e in ESTIMATORS:
        chi2, n, p, worst = study.agreement(e)
        v, v_err = study.velocity_fit[e]
        lines.append(
            f"{e:>10}: spread of repeated calibrations {study.calibration_stat_ns(e):.3f} ns; "
            f"(dt - 2dL/v) / (stat (+) sys): chi2 {chi2:.1f} for {n} rows, p = {p:.2g}, "
            f"largest |pull| {worst:.1f}; fitted v = {v:.4f} +- "
            f"{v_err:.4f} m/ns; absolute dt - 2L/v "
            f"{np.mean([r.absolute_bias_ns for r in study.rows[e]]):+.3f} ns (walk-model bias "
            f"{np.mean([r.absolute_sys_ns for r in study.rows[e]]):+.3f} ns)")
    return "\n".join(lines) + "\n"


def plot_paper_table(study: PaperTableStudy, path=None):
    """Figure: incremental dt against dL for each estimator with the expected line and the paper's
    points (left), and measured - expected with the combined errors (right)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.4))
    ax1, ax2 = fig.subplots(1, 2)
    dl = np.array([r.added_mm for r in study.rows["binned"]])
    xs = np.linspace(0, dl.max() * 1.05, 50)
    ax1.plot(xs, 2 * xs * 1e-3 / study.velocity_m_per_ns, "-", color="0.5", label="2 dL / v")
    paper = np.array([PAPER_MEASURED_NS[d] for d in dl if d in PAPER_MEASURED_NS])
    if len(paper) == len(dl):
        ax1.errorbar(dl, paper[:, 0], paper[:, 1], fmt="k^", ms=5, label="paper (measured)")
    styles = {"binned": ("o", "tab:blue"), "likelihood": ("s", "tab:green"),
              "naive": ("x", "tab:red")}
    for k, e in enumerate(ESTIMATORS):
        rows = study.rows[e]
        marker, color = styles[e]
        y = np.array([r.measured_ns for r in rows])
        err = np.array([r.combined_ns for r in rows])
        shift = (k - 1) * 1.5
        ax1.errorbar(dl + shift, y, err, fmt=marker, color=color, ms=5, capsize=2, label=e)
        ax2.errorbar(dl + shift, y - np.array([r.expected_ns for r in rows]), err, fmt=marker,
                     color=color, ms=5, capsize=2, label=e)
    ax2.axhline(0, color="0.5")
    ax1.set_xlabel("added length dL (mm)")
    ax1.set_ylabel("incremental transit time (ns)")
    ax1.legend(fontsize=8)
    ax2.set_xlabel("added length dL (mm)")
    ax2.set_ylabel("measured - expected (ns)")
    ax2.set_title("error bars: statistical (+) systematic", fontsize=9)
    fig.suptitle(f"FEE cable calibration, simulated: {study.base_length_m:g} m RG58 + dL, "
                 "1.5625 ns TDC")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def reproduce_paper_table(results_dir: str | Path, *, repeats: int = 20,
                          seed: int = 2014) -> tuple[PaperTableStudy, list[Path]]:
    """Run the study and write fee_paper_table.png and fee_paper_table.txt under results_dir."""
    out = Path(results_dir)
    out.mkdir(parents=True, exist_ok=True)
    study = simulate_paper_table(repeats=repeats, seed=seed)
    png, txt = out / "fee_paper_table.png", out / "fee_paper_table.txt"
    plot_paper_table(study, png)
    txt.write_text(format_paper_table(study))
    return study, [png, txt]
