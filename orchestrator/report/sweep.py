"""A sweep's leaderboard, in one row shape for the terminal, ``results.csv``, ``best.json`` and the
report (:class:`LeaderboardRow`), and the sweep's report section: the leaderboard with each trial's Δ AP
against the undistilled student, how the search went, whether the stopping epochs rank trials like the
last one, and parameter importances and plots at one epoch."""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

from dmkd.io import atomic_write, atomic_write_json
from dmkd.metrics import COCO_FIGURES, VAL_AP, split_metric
from orchestrator.report import text
from orchestrator.report.fidelity import common_epoch, importances_at, rung_validity
from orchestrator.report.plots import plot_epochs, plot_pareto, plot_scatter
from orchestrator.report.records import ExperimentRecord, StoredTrial, reference_ap, trial_folder, trial_status
from orchestrator.report.search import sweep_search
from orchestrator.report.text import Section
from orchestrator.space import SweepSpace

VAL_FIGURES = tuple(split_metric("val", name) for name in COCO_FIGURES)


@dataclass(frozen=True)
class LeaderboardRow:
    """One trial of a sweep: its searched values, figures as last reported (COCO's on val and the
    objectives), the epochs it ran, its status, and its Δ AP against the undistilled student (at the
    full budget only)."""

    trial_id: str
    params: dict
    figures: dict
    epochs: int
    status: str
    error: str = ""
    delta_AP: float | None = None

    def as_dict(self) -> dict:
        """The flat record of ``results.csv``, ``report.csv`` and ``report.json``."""
        return {"trial_id": self.trial_id, **{f"param/{k}": v for k, v in self.params.items()}, **self.figures,
                "epochs": self.epochs, "status": self.status, "error": self.error, "delta_AP": self.delta_AP}


def leaderboard(trials: list[StoredTrial], space: dict, reference: float | None = None) -> list[LeaderboardRow]:
    """One row per trial, best first by the objective (trials without a value last); ``space`` is the
    described space of the sweep (``sweep.json``'s)."""
    budget, objective = space["budget"]["epochs"], space["objective"]
    metrics = [*VAL_FIGURES, *(m for m in (objective["metric"], objective.get("second_metric")) if m and m not in VAL_FIGURES)]
    rows = []
    for trial in trials:
        figures = {metric: trial.latest(metric) for metric in metrics}
        full = trial.epochs == budget and figures[VAL_AP] is not None and reference is not None
        rows.append(LeaderboardRow(trial.trial_id, {name: trial.config.get(name) for name in sorted(space.get("search", {}))},
                                   figures, trial.epochs,
                                   trial_status(trial.failed(budget), trial.epochs, budget, space["scheduler"]["type"]),
                                   (trial.error or "") if trial.failed(budget) else "", figures[VAL_AP] - reference if full else None))
    sign = -1 if objective["mode"] == "max" else 1

    def key(row: LeaderboardRow):
        value = row.figures.get(objective["metric"])
        missing = value is None or (isinstance(value, float) and math.isnan(value))
        return (missing, sign * (value or 0.0))

    return sorted(rows, key=key)


def leaderboard_text(rows: list[LeaderboardRow], limit: int = 20) -> str:
    """The leaderboard as the terminal shows it."""
    params = list(rows[0].params) if rows else []
    lines = [["trial", *params, "AP", "Δ AP", "AP50", "epochs", "status"]]
    for row in rows[:limit]:
        values = [row.params[name] for name in params] + [row.figures.get(VAL_AP)]
        cells = ["-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v) for v in values]
        delta, ap50 = row.delta_AP, row.figures.get(split_metric("val", "AP50"))
        cells += ["-" if delta is None else f"{delta:+.4f}", "-" if ap50 is None else f"{ap50:.4g}"]
        lines.append([trial_folder(row.trial_id), *cells, str(row.epochs), row.status])
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)) for line in lines)


def write_csv(path: Path, records: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(records[0]) if records else ["trial_id"])
    writer.writeheader()
    writer.writerows(records)
    atomic_write(path, lambda handle: handle.write(buffer.getvalue()))


def write_results(rows: list[LeaderboardRow], folder: Path, space: SweepSpace, *,
                  interrupted: bool = False) -> LeaderboardRow | None:
    """``results.csv`` (every trial) and ``best.json`` (the best trial with its full config, split into
    training and distillation settings; ``interrupted``: the best so far of a sweep Ctrl-C stopped, which
    ``orchestrator.ablate --from-sweep`` refuses); returns the best row."""
    write_csv(folder / "results.csv", [row.as_dict() for row in rows])
    metric = space.objective.metric
    best = next((row for row in rows if row.figures.get(metric) is not None and row.status != "failed"), None)
    if best is not None:
        params = {k: v for k, v in best.params.items() if v is not None}
        train, distill = space.routed({**space.fixed, **params})
        atomic_write_json(folder / "best.json", {"trial": trial_folder(best.trial_id), "objective": metric,
                                                 "value": best.figures[metric], "params": params, "method": space.method,
                                                 "train": train, "distill": distill,
                                                 "figures": {k: best.figures.get(k) for k in VAL_FIGURES},
                                                 "interrupted": interrupted})
    return best


def _leaderboard_lines(rows: list[LeaderboardRow], baseline: float | None, search: dict) -> list[str]:
    params = list(rows[0].params) if rows else []
    lines = ["## Leaderboard (val split)", "", f"Search: {search['label']}.", "",
             f"Student without distillation (same budget and seed): val AP {text.num(baseline)}; Δ AP is each trial's "
             f"difference to it at the full budget (one seed: no confidence interval; the ablation runner gives paired "
             f"statistics). AP is measured at the epoch given; trials stopped early have no Δ.", "",
             "| trial | " + " | ".join(params) + " | AP | Δ AP | AP50 | AP75 | at epoch | status |",
             "|---|" + "---|" * (len(params) + 6)]
    for r in rows:
        cells = [f"{r.params[p]:.4g}" if isinstance(r.params[p], float) else str(r.params[p]) for p in params]
        delta = f"{r.delta_AP:+.3f}" if r.delta_AP is not None else "-"
        figures = [text.num(r.figures.get(VAL_AP)), delta, text.num(r.figures.get(split_metric("val", "AP50"))),
                   text.num(r.figures.get(split_metric("val", "AP75")))]
        lines.append(f"| {r.trial_id} | " + " | ".join(cells + figures) + f" | {r.epochs} | {r.status} |")
    return lines


def _rung_lines(trials: list[StoredTrial], budget: int, metric: str, report: dict) -> list[str]:
    rungs = rung_validity(trials, budget, metric)
    report["rungs"] = rungs
    if not rungs:
        return []
    lines = ["", "## Early stopping: do the stopping epochs rank trials like the last one?", "",
             f"Spearman correlation between {metric} at each epoch where trials were stopped and "
             f"at epoch {budget}, over the trials that completed:", ""]
    for rung in rungs:
        rho = f"{rung['spearman']:.2f}" if rung["spearman"] is not None else "n/a"
        lines.append(f"- epoch {rung['epoch']} (stopped {rung['stopped']} trials): Spearman {rho} over "
                     f"{rung['completed']} completed trials" + (f". **Warning: {rung['warning']}**" if rung["warning"] else ""))
    return lines


def _importance_lines(trials: list[StoredTrial], space: dict, report: dict) -> tuple[list[str], int | None, int]:
    metric = space["objective"]["metric"]
    epoch, reached = common_epoch(trials, VAL_AP)
    report["compared_at_epoch"] = epoch
    importances, skipped = importances_at(trials, space.get("search", {}), metric, epoch)
    report["importances"] = importances
    lines = ["", f"## Parameter importances (Optuna fANOVA, {metric} at epoch {epoch})", ""]
    if importances:
        lines += ["| parameter | importance |", "|---|---|", *[f"| {k} | {v:.3f} |" for k, v in importances.items()]]
    else:
        lines.append(skipped or "")
    return lines, epoch, reached


def sweep_section(experiment: ExperimentRecord, trials: list[StoredTrial], teacher: dict | None, report: dict,
                  out: Path) -> Section:
    """Leaderboard with Δ AP, the search, rung validity, importances and plots at one budget."""
    space = experiment.space
    baseline = reference_ap(experiment.folder)
    rows = leaderboard(trials, space, baseline)
    report["leaderboard"] = [row.as_dict() for row in rows]
    report["reference_AP"] = baseline
    report["search"] = sweep_search(experiment.folder, space)
    lines = _leaderboard_lines(rows, baseline, report["search"])
    lines += _rung_lines(trials, experiment.budget, space["objective"]["metric"], report)
    importance_lines, epoch, reached = _importance_lines(trials, space, report)
    lines += importance_lines
    plot_epochs({t.trial_id: [t.history] for t in trials if t.history}, out / "ap_per_epoch.png")
    log_scaled = {k for k, v in space.get("search", {}).items() if v.get("type") == "loguniform"}
    plot_scatter(trials, sorted(space.get("search", {})), out / "param_scatter.png", log_scaled, epoch, reached)
    plots = ["ap_per_epoch.png", "param_scatter.png"]
    objective = space["objective"]
    if objective.get("second_metric"):
        report["pareto_front"] = plot_pareto(trials, objective["metric"], objective["second_metric"],
                                             (objective["mode"], objective["second_mode"]), out / "pareto.png")
        plots.append("pareto.png")
    best = rows[0].figures.get(VAL_AP) if rows else None
    return Section(lines, plots, baseline, best, "val")
