"""How a report writes its figures in markdown: a summary over seeds, a paired difference, parameter
values, seed lists, ratios (COCO's -1, "no objects of this size", is n/a); and what a section of a report
gives back (:class:`Section`)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Section:
    """A report's body: its markdown lines, its plots, and the figures the pair table shows (the
    undistilled and the best distilled student's AP, on ``split``)."""

    lines: list[str]
    plots: list[str]
    baseline_AP: float | None
    best_distilled_AP: float | None
    split: str


def num(value) -> str:
    if isinstance(value, (int, float)) and value < 0:  # COCOeval's -1: no ground truth of that size
        return "n/a"
    return f"{value:.3f}" if isinstance(value, (int, float)) else "-"


def fmt(summary: dict) -> str:
    if summary["mean"] is None:
        return "-"
    if summary["mean"] < 0:  # COCOeval's -1: no ground truth of that size
        return "n/a"
    text = f"{summary['mean']:.3f}"
    if summary["std"] is not None:
        text += f" ± {summary['std']:.3f}"
    return text


def delta(found: dict | None) -> str:
    """``+0.012 ± 0.008 (n=5), p=0.03, Holm 0.09 n.s.``: paired over n seeds with the 95 % CI
    half-width; "n.s." when the Holm-adjusted p is >= 0.05."""
    if not found or found["mean"] is None:
        return "-"
    text = f"{found['mean']:+.3f}"
    if found["ci95"] is not None:
        text += f" ± {found['ci95']:.3f}"
    text += f" (n={found['n']})"
    if found["p"] is not None:
        text += f", p={found['p']:.2g}"
        if found.get("p_holm") is not None:
            text += f", Holm {found['p_holm']:.2g}"
        if found.get("test", "paired t") != "paired t":
            text += f" [{found['test']}]"
        text += "" if found["significant"] else " n.s."
    return text


def params(values: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()) or "-"


def tuning_cell(tuning: dict | None) -> str:
    if not tuning:
        return "not tuned"
    if not tuning["trials"]:
        return tuning.get("note", "nothing to tune")
    return f"{tuning['trials']} trials x {tuning['epochs']} ep"


def seed_range(seeds: list[int] | None) -> str:
    if not seeds:
        return "-"
    return f"{seeds[0]}-{seeds[-1]}" if seeds == list(range(seeds[0], seeds[-1] + 1)) and len(seeds) > 2 else \
        ", ".join(str(seed) for seed in seeds)


def ratio(value) -> str:
    return f"{value:.3g}x" if isinstance(value, (int, float)) else "-"


def count(value) -> str:
    return f"{value:.0f}" if isinstance(value, (int, float)) and value else "-"
