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
