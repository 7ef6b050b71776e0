"""PDF report of an EIGER calibration (PSI's ``generate_calibration_report``), with matplotlib.

Page 1: E(vcmp) per chip with the fitted lines and the calibration's numbers (threshold range over
vcmp 100..1900, trim energy, p0/p1 and m/k per chip, vrf per half module); the trimmed inflection
histograms per chip (DAC); the threshold dispersion in energy, untrimmed vs trimmed (sigma in eV).
Page 2: the vrf scan (counts per half module and their gradient with the edge fit); the trimmed
detector's chip sums against energy and their gradient; the trimbit map and histogram.
Page 3: the untrimmed inflection histograms per chip; the bad-pixel map and counts.

Figures are built with matplotlib's object API (no pyplot state), so writing a report never touches
the session's open figures. Pure numpy/matplotlib.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from calbench.analysis.eiger_calibration import (DEFAULTS, CalibrationResults, gauss, line_energy,
                                                 trimbit_statistics)

__all__ = ["write_calibration_report"]

A4_LANDSCAPE = (11.69, 8.27)
BAD_COLOURS = ListedColormap(["#f0f0f0", "#000000", "#d62728", "#ff7f0e", "#1f77b4"])
BAD_NAMES = ("good", "dead", "hot", "noisy", "unfitted")


def write_calibration_report(path: str | os.PathLike, results: CalibrationResults, *,
                             hostnames: list[str] | None = None,
                             thrange: tuple[float, float] = DEFAULTS.mu_range) -> Path:
    """Write the report of a finished calibration (every step done) to ``path``; returns it.

    Raises ValueError naming the missing step when ``results`` is incomplete."""
    missing = [name for name in ("vrf", "untrimmed", "trimbits", "trimmed", "calibration",
                                 "dispersion_untrimmed", "dispersion_trimmed")
               if getattr(results, name) is None]
    if missing:
        raise ValueError(f"the calibration lacks {', '.join(missing)}; run the whole procedure "
                         "(calibrate_eiger) before writing its report")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    hosts = hostnames or [f"half module {i}" for i in range(results.geometry.n_half_modules)]
    tmp = path.with_name(path.name + ".part")
    with PdfPages(tmp) as pdf:
        pdf.savefig(_summary_page(results, hosts, thrange))
        pdf.savefig(_scans_page(results, hosts))
        pdf.savefig(_pixels_page(results))
        info = pdf.infodict()
        info["Title"] = f"EIGER calibration {results.det_id} {results.gain}"
        info["Subject"] = f"trimmed on {results.target} XRF"
    os.replace(tmp, path)
    return path


def _colours(n: int):
    from matplotlib import colormaps
    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _summary_page(r: CalibrationResults, hosts: list[str], thrange) -> Figure:
    fig = Figure(figsize=A4_LANDSCAPE)
    grid = fig.add_gridspec(2, 2)
    cal, g = r.calibration, r.geometry
    colours = _colours(g.n_chips)

    ax = fig.add_subplot(grid[0, 0])
    span = np.linspace(cal.mu.min() * 0.8, cal.mu.max() * 1.2, 100)
    for chip in range(g.n_chips):
        ax.plot(cal.mu[chip], cal.energies, "o", color=colours[chip], label=f"chip {chip}")
        ax.plot(span, cal.p0[chip] + cal.p1[chip] * span, "-", color=colours[chip])
    ax.set(xlabel="vcmp [DAC]", ylabel="energy [keV]", title="E(vcmp) per chip")
    ax.legend(fontsize=7)

    text = fig.add_subplot(grid[0, 1])
    text.axis("off")
    low, high = cal.threshold_range(thrange)
    lines = [f"EIGER calibration - {r.det_id} \"{r.gain}\"",
             f"trim energy: {line_energy(r.target):g} keV ({r.target} XRF); "
             f"lines: {', '.join(cal.targets)}",
             f"threshold range (vcmp {thrange[1]:g}..{thrange[0]:g}): "
             f"{low:.2f} .. {high:.2f} keV",
             "vrf = [" + ", ".join(f"{h}: {v}" for h, v in zip(hosts, r.vrf.vrf)) + "]",
             f"exposure {r.vrf.exptime_s:g} s per point", ""]
    for chip in range(g.n_chips):
        lines.append(f"chip {chip}: p0 {cal.p0[chip]:7.2f}  p1 {cal.p1[chip]: .3e}   "
                     f"m {cal.m[chip]:7.1f}  k {cal.k[chip]:6.2f}")
    text.text(0.0, 1.0, "\n".join(lines), va="top", family="monospace", fontsize=8,
              transform=text.transAxes)

    ax = fig.add_subplot(grid[1, 0])
    _mu_histograms(ax, r.trimmed.mu, r.trimmed.good & r.trimbits.trimmed, g, colours,
                   "trimmed inflection points")

    ax = fig.add_subplot(grid[1, 1])
    e0 = line_energy(r.target)
    bins = np.linspace(e0 - 1.5, e0 + 1.5, 301)
    for label, d, colour in (("untrimmed", r.dispersion_untrimmed, colours[0]),
                             ("trimmed", r.dispersion_trimmed, colours[1])):
        e = d.energy[np.isfinite(d.energy)]
        ax.hist(e, bins=bins, histtype="stepfilled", alpha=0.6, color=colour,
                label=f"{label}\nmu {d.mean_keV:.2f} keV\nsigma {d.sigma_eV:.1f} eV")
    ax.set(xlabel="threshold energy [keV]", ylabel="pixels", title="threshold dispersion",
           xlim=(bins[0], bins[-1]))
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _mu_histograms(ax, mu, good, g, colours, title: str) -> None:
    bins = np.linspace(0, 2000, 301)
    for chip in range(g.n_chips):
        sl = g.chip_slice(chip)
        v = mu[sl][good[sl] & np.isfinite(mu[sl])]
        if v.size:
            ax.hist(v, bins=bins, histtype="step", color=colours[chip],
                    label=f"{chip}: mu {v.mean(dtype=np.float64):.0f}  sigma "
                          f"{v.std(dtype=np.float64):.2f}")
    ax.set(xlabel="vcmp [DAC]", ylabel="pixels", title=title)
    ax.legend(fontsize=7, loc="upper left")


def _scans_page(r: CalibrationResults, hosts: list[str]) -> Figure:
    fig = Figure(figsize=A4_LANDSCAPE)
    grid = fig.add_gridspec(2, 6)
    v, g, cal = r.vrf, r.geometry, r.calibration
    colours = _colours(max(g.n_chips, g.n_half_modules))

    ax_sum, ax_grad = fig.add_subplot(grid[0, 0:3]), fig.add_subplot(grid[0, 3:6])
    for hm in range(g.n_half_modules):
        ax_sum.plot(v.x, v.sums[hm], "o-", ms=3, color=colours[hm], label=hosts[hm])
        ax_grad.plot(v.x, v.gradient[hm], "o", ms=3, color=colours[hm])
        xx = np.linspace(*v.window[hm], 100)
        ax_grad.plot(xx, gauss(xx, *v.gauss[hm]), "-", color=colours[hm],
                     label=f"{hosts[hm]}: vrf {v.vrf[hm]}")
    ax_sum.set(xlabel="vrf [DAC]", ylabel="counts", title=f"vrf scan, {r.target} XRF")
    ax_grad.set(xlabel="vrf [DAC]", ylabel="d counts / d vrf")
    ax_sum.legend(fontsize=8)
    ax_grad.legend(fontsize=8)

    line = (r.lines or {}).get(r.target)
    ax_e = fig.add_subplot(grid[1, 0:3])
    if line is not None:
        for chip in range(g.n_chips):
            energy = cal.energy(line.x, chip)
            grad = np.gradient(line.sums[chip], line.x)
            ax_e.plot(energy, grad / np.max(np.abs(grad)), color=colours[chip],
                      label=f"chip {chip}")
        ax_e.set(xlabel="threshold energy [keV]", ylabel="d counts (normalised)",
                 title=f"trimmed chip sums, {r.target} XRF", ylim=(-0.1, 1.1))
        ax_e.legend(fontsize=7)

    tb = r.trimbits
    ax_tb = fig.add_subplot(grid[1, 3:5])
    im = ax_tb.imshow(tb.trimbits, cmap="coolwarm", origin="lower", interpolation="nearest",
                      vmin=0, vmax=63, aspect="auto")
    fig.colorbar(im, ax=ax_tb, fraction=0.05)
    ax_tb.set(title="trimbit map", xlabel="column", ylabel="row")
    ax_h = fig.add_subplot(grid[1, 5])
    ax_h.hist(tb.trimbits[tb.trimmed], bins=np.arange(-0.5, 64.5, 1.0), histtype="stepfilled")
    st = trimbit_statistics(tb.trimbits, g)
    low, high = tb.on_rails
    ax_h.set(xlabel="trimbit", ylabel="pixels", xlim=(0, 64),
             title=f"mean {st.mean:.1f}, sd {st.std:.1f}")
    # pixels the trim range cannot reach: a sensor's tails, counted so that they are not hidden
    ax_h.text(0.02, 0.98, f"on rail 0: {int(low.sum())}\non rail 63: {int(high.sum())}\n"
              f"at 0: {st.percent_at_0:.2f} %\nat 63: {st.percent_at_63:.2f} %",
              transform=ax_h.transAxes, va="top", fontsize=7, family="monospace")
    fig.tight_layout()
    return fig


def _pixels_page(r: CalibrationResults) -> Figure:
    fig = Figure(figsize=A4_LANDSCAPE)
    grid = fig.add_gridspec(2, 3)
    g = r.geometry
    ax = fig.add_subplot(grid[0, 0:3])
    _mu_histograms(ax, r.untrimmed.mu, r.untrimmed.good, g, _colours(g.n_chips),
                   "untrimmed inflection points")
    codes = r.untrimmed.bad_codes
    ax = fig.add_subplot(grid[1, 0:2])
    ax.imshow(codes, cmap=BAD_COLOURS, vmin=-0.5, vmax=4.5, origin="lower",
              interpolation="nearest", aspect="auto")
    ax.set(title="bad pixels (masked, not trimmed)", xlabel="column", ylabel="row")
    table = fig.add_subplot(grid[1, 2])
    table.axis("off")
    counts = r.untrimmed.bad.counts()
    rows = [f"{name:>9}: {counts[name]:7d}" for name in BAD_NAMES[1:]]
    rows += [f"{'total':>9}: {counts['total']:7d}",
             f"{'trimmed':>9}: {int(r.trimbits.trimmed.sum()):7d} of {g.n_pixels}"]
    for name, colour in zip(BAD_NAMES[1:], BAD_COLOURS.colors[1:]):
        table.plot([], [], "s", color=colour, label=name)
    table.legend(loc="lower left", fontsize=8)
    table.text(0.0, 1.0, "\n".join(rows), va="top", family="monospace", fontsize=9,
               transform=table.transAxes)
    fig.tight_layout()
    return fig
