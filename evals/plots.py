"""PNG plots for reports (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def reliability_diagram(path, count, mean_confidence, accuracy, *, title: str) -> Path:
    plt = _pyplot()
    n_bins = len(count)
    edges = np.linspace(0, 1, n_bins + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    filled = count > 0
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(5, 6), gridspec_kw={"height_ratios": [3, 1]}, sharex=True
    )
    top.bar(centers[filled], accuracy[filled], width=1 / n_bins, edgecolor="black", label="accuracy")
    top.bar(
        centers[filled],
        (mean_confidence - accuracy)[filled],
        bottom=accuracy[filled],
        width=1 / n_bins,
        color="tab:red",
        alpha=0.35,
        edgecolor="tab:red",
        label="gap to confidence",
    )
    top.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    top.set_ylabel("accuracy")
    top.set_ylim(0, 1)
    top.set_title(title)
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(centers, count, width=1 / n_bins, color="gray", edgecolor="black")
    bottom.set_xlabel("confidence")
    bottom.set_ylabel("items")
    return _save(fig, path)


def risk_coverage_plot(path, curves: dict, *, title: str) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    for label, (coverage, risk) in curves.items():
        ax.plot(coverage, risk, label=label)
    ax.set_xlabel("coverage (fraction accepted)")
    ax.set_ylabel("error among accepted")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def frontier_plot(
    path, curves: dict, points: dict, *, title: str, x_label: str = "cost units per item"
) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for label, (x, y) in curves.items():
        ax.plot(x, y, label=label)
    for label, (x, y) in points.items():
        ax.scatter([x], [y], zorder=3, label=label)
    ax.set_xlabel(x_label)
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def _grid(plt, n_panels: int, *, width: float = 3.0, height: float = 2.4):
    columns = min(3, max(1, n_panels))
    rows = -(-n_panels // columns)
    fig, axes = plt.subplots(
        rows, columns, figsize=(width * columns, height * rows), sharex=True, sharey=True, squeeze=False
    )
    for ax in axes.ravel()[n_panels:]:
        ax.set_visible(False)
    return fig, axes.ravel()


def severity_curves(path, panels: dict, *, title: str, x_label: str = "severity (0 = clean)") -> Path:
    """One panel per metric, one line per series: ``{panel: {series: (severities, values)}}``."""
    plt = _pyplot()
    columns = min(2, max(1, len(panels)))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.2 * rows), squeeze=False)
    for ax in axes.ravel()[len(panels) :]:
        ax.set_visible(False)
    for i, (ax, (panel, series)) in enumerate(zip(axes.ravel(), panels.items())):
        for label, (x, y) in series.items():
            ax.plot(x, y, marker="o", markersize=3, label=label)
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel(x_label, fontsize=8)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=6, ncol=2)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def guarantee_under_shift(path, panels: dict, *, alpha: float, title: str) -> Path:
    """Accepted error per severity, one panel per corruption, against alpha.

    ``panels``: {corruption: {series: (severities, accepted_error, violated)}}; a violated point
    (accepted error significantly above alpha) is drawn as a cross."""
    plt = _pyplot()
    fig, axes = _grid(plt, len(panels))
    styles = {
        "no guard": ("tab:red", "-"),
        "per-request rule": ("tab:orange", ":"),
        "shift guard": ("tab:blue", "--"),
    }
    for ax, (panel, series) in zip(axes, panels.items()):
        for label, (x, y, violated) in series.items():
            color, line = styles.get(label, (None, "-"))
            x, y, violated = np.asarray(x), np.asarray(y), np.asarray(violated, bool)
            ax.plot(x, y, line, color=color, marker="o", markersize=3, label=label)
            ax.scatter(x[violated], y[violated], marker="x", s=40, color=color, zorder=3)
        ax.axhline(alpha, color="black", linewidth=1, label=f"alpha = {alpha:g}")
        ax.set_title(panel, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("error among accepted")
    axes[0].legend(fontsize=6)
    fig.suptitle(f"{title} (x: significantly above alpha)", fontsize=10)
    return _save(fig, path)


def routing_shares(path, panels: dict, *, title: str) -> Path:
    """Stacked shares accepted / escalated / reviewed per severity, one panel per corruption.

    ``panels``: {corruption: {"severities": [...], "accept": [...], "escalate": [...],
    "review": [...], "accept_guard": [...]}}."""
    plt = _pyplot()
    fig, axes = _grid(plt, len(panels))
    colors = {"accept": "tab:green", "escalate": "tab:orange", "review": "tab:gray"}
    for ax, (panel, shares) in zip(axes, panels.items()):
        x = np.asarray(shares["severities"])
        bottom = np.zeros(len(x))
        for decision, color in colors.items():
            values = np.asarray(shares[decision])
            ax.bar(x, values, bottom=bottom, color=color, width=0.8, label=decision)
            bottom += values
        if "accept_guard" in shares:
            ax.plot(x, shares["accept_guard"], "k--", marker=".", label="accept, with shift guard")
        ax.set_title(panel, fontsize=9)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("share of items")
    axes[0].legend(fontsize=6)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def router_frontier(path, *, certified: dict, sweeps: dict, points: dict, alpha: float, title: str) -> Path:
    """Cost per item (log) against the accuracy of accepted answers, one colour per router.

    ``certified``: {router: (costs, accuracies, alphas)}, one point per alpha (thick lines with
    markers, the bench's alpha circled); ``sweeps``: {router: (costs, accuracies)}, the router's
    two-model threshold sweep (thin lines, same colour); ``points``: {name: (cost, accuracy)}
    (squares); a dotted line at 1 - ``alpha``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colour = {name: palette[i % len(palette)] for i, name in enumerate(dict.fromkeys([*certified, *sweeps]))}
    for name, (x, y) in sweeps.items():
        ax.plot(
            x, y, color=colour[name], linewidth=0.9, alpha=0.55, label=f"{name}: sweep, every answer accepted"
        )
    for name, (x, y, alphas) in certified.items():
        ax.plot(
            x,
            y,
            color=colour[name],
            marker="o",
            markersize=4,
            linewidth=2,
            label=f"{name}: per alpha",
        )
        for xi, yi, a in zip(x, y, alphas):
            if abs(a - alpha) < 1e-12:
                ax.scatter([xi], [yi], s=90, facecolors="none", edgecolors=colour[name], zorder=4)
    for i, (label, (x, y)) in enumerate(points.items()):
        ax.scatter(
            [x], [y], marker="s", color=palette[(len(colour) + i) % len(palette)], zorder=3, label=label
        )
    ax.axhline(1 - alpha, color="black", linestyle=":", linewidth=1, label=f"1 - alpha ({1 - alpha:g})")
    ax.set_xscale("log")
    ax.set_xlabel("cost units per item (cheap 1, VLM 10, review 100; log scale)")
    ax.set_ylabel("accuracy of accepted answers")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, loc="lower right")
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)
