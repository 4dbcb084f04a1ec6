"""The report's pictures: AP per epoch (mean and min-max band per group), searched parameters against AP
at one epoch, and the Pareto front of two objectives."""
from __future__ import annotations

import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.ticker import LogLocator  # noqa: E402

from dmkd.metrics import VAL_AP  # noqa: E402
from orchestrator.report.fidelity import value_at  # noqa: E402
from orchestrator.report.records import StoredTrial  # noqa: E402


def plot_epochs(groups: dict[str, list[list[dict]]], path: Path) -> None:
    fig, axis = plt.subplots(figsize=(7, 4.5))
    for label, histories in groups.items():
        epochs = sorted({e["epoch"] for h in histories for e in h if VAL_AP in e})
        if not epochs:
            continue
        means, lows, highs = [], [], []
        for epoch in epochs:
            values = [e[VAL_AP] for h in histories for e in h if e.get("epoch") == epoch and VAL_AP in e]
            means.append(statistics.fmean(values))
            lows.append(min(values))
            highs.append(max(values))
        axis.plot(epochs, means, marker="o", label=label)
        axis.fill_between(epochs, lows, highs, alpha=0.2)
    axis.set_xlabel("epoch")
    axis.set_ylabel("val AP")
    axis.set_title("AP per epoch (mean; band: min-max over seeds)")
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_scatter(trials: list[StoredTrial], params: list[str], path: Path, log_scaled: set[str], epoch: int | None,
                  reached: int) -> None:
    """Each searched parameter against val AP at one epoch (the largest that enough trials reached), so
    that every point had the same budget; trials stopped at that epoch are drawn hollow."""
    fig, axes = plt.subplots(1, max(1, len(params)), figsize=(3.5 * max(1, len(params)), 3.6), squeeze=False)
    for axis, name in zip(axes[0], params):
        for stopped in (False, True):
            points = [(t.config.get(name), value_at(t.history, VAL_AP, epoch)) for t in trials
                      if t.history and (t.epochs == epoch) == stopped]
            points = [(x, y) for x, y in points if isinstance(x, (int, float)) and y is not None]
            if points:
                axis.scatter([p[0] for p in points], [p[1] for p in points], facecolors="none" if stopped else "C0",
                             edgecolors="C0", label="ended at this epoch" if stopped else "ran longer")
        axis.set_xlabel(name)
        axis.set_ylabel(f"val AP at epoch {epoch}")
        if name in log_scaled:
            axis.set_xscale("log")
            axis.xaxis.set_major_locator(LogLocator(numticks=4))  # a few decades, not a label per tick
        else:
            axis.locator_params(axis="x", nbins=4)
        axis.tick_params(labelsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        axes[0][0].legend(handles, labels, fontsize=7)
    fig.suptitle(f"val AP at epoch {epoch}: the {reached} trials that reached it", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_pareto(trials: list[StoredTrial], first: str, second: str, modes: tuple[str, str], path: Path) -> list[dict]:
    points = []
    for t in trials:
        if first in t.last and second in t.last:
            points.append({"trial_id": t.trial_id, first: t.last[first], second: t.last[second]})
    sign = [1 if m == "max" else -1 for m in modes]

    def dominated(p):
        return any(all(sign[i] * q[k] >= sign[i] * p[k] for i, k in enumerate((first, second))) and
                   any(sign[i] * q[k] > sign[i] * p[k] for i, k in enumerate((first, second))) for q in points)

    front = sorted([p for p in points if not dominated(p)], key=lambda p: p[first])
    fig, axis = plt.subplots(figsize=(5, 4))
    axis.scatter([p[first] for p in points], [p[second] for p in points], label="trials", alpha=0.6)
    axis.plot([p[first] for p in front], [p[second] for p in front], "r-o", label="Pareto front")
    axis.set_xlabel(first)
    axis.set_ylabel(second)
    axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return front
