"""The sweep's results: a leaderboard from Tune's ResultGrid, written to results.csv and best.json."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from dmkd.io import atomic_write, atomic_write_json

FIGURES = ("val/AP", "val/AP50", "val/AP75", "val/APs", "val/APm", "val/APl")


def trial_status(failed: bool, epochs: int, budget: int, scheduler: str) -> str:
    """failed, completed, stopped early (by the scheduler) or unfinished (interrupted: rerun to continue)."""
    if failed:
        return "failed"
    if epochs >= budget:
        return "completed"
    if epochs == 0 or scheduler == "none":  # no scheduler stop: Ctrl-C ended it
        return "unfinished"
    return "stopped early"


def trial_rows(result_grid, space) -> list[dict]:
    """One row per trial: id, searched parameters, figures, epochs run, status."""
    rows = []
    for result in result_grid:
        metrics = result.metrics or {}
        config = result.config or {}
        epochs = int(metrics.get("epoch", 0) or 0)
        status = trial_status(result.error is not None, epochs, space.budget.epochs, space.scheduler.type)
        trial_id = metrics.get("trial_id") or _trial_id(result)
        objectives = [m for m in (space.objective.metric, space.objective.second_metric) if m and m not in FIGURES]
        row = {"trial": f"run_trial_{trial_id}", "trial_id": trial_id,
               **{f"param/{name}": config.get(name) for name in space.search},
               **{name: metrics.get(name) for name in (*FIGURES, *objectives)},
               "epochs": epochs, "status": status,
               "error": _one_line(result.error) if result.error is not None else ""}
        rows.append(row)
    metric = space.objective.metric
    sign = -1 if space.objective.mode == "max" else 1

    def key(row):
        value = row.get(metric)
        missing = value is None or (isinstance(value, float) and math.isnan(value))
        return (missing, sign * (value or 0.0))

    return sorted(rows, key=key)


def _trial_id(result) -> str:
    """From Tune's trial folder name, run_trial_<id>_<n>_<params>_<date>, for trials without metrics."""
    parts = Path(result.path).name.split("_") if result.path else []
    return parts[2] if len(parts) > 2 else "?"


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[-1] if text else type(error).__name__


def write_results(rows: list[dict], folder: Path, space) -> dict | None:
    """results.csv (every trial) and best.json (the best trial with its full config); returns the best row."""
    columns = list(rows[0]) if rows else ["trial"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(folder / "results.csv", lambda handle: handle.write(buffer.getvalue()))
    best = next((row for row in rows if row.get(space.objective.metric) is not None and row["status"] != "failed"), None)
    if best is not None:
        params = {k.split("/", 1)[1]: v for k, v in best.items() if k.startswith("param/") and v is not None}
        train, distill = space.routed({**space.fixed, **params})
        atomic_write_json(folder / "best.json", {"trial": best["trial"], "objective": space.objective.metric,
                                                 "value": best[space.objective.metric], "params": params,
                                                 "method": space.method, "train": train, "distill": distill,
                                                 "figures": {k: best[k] for k in FIGURES}})
    return best


def leaderboard(rows: list[dict], space, limit: int = 20) -> str:
    names = [f"param/{n}" for n in space.search]
    header = ["trial", *[n.split("/", 1)[1] for n in names], "AP", "AP50", "epochs", "status"]
    lines = [header]
    for row in rows[:limit]:
        def fmt(value):
            if value is None:
                return "-"
            if isinstance(value, float):
                return f"{value:.4g}"
            return str(value)
        lines.append([row["trial"], *[fmt(row[n]) for n in names], fmt(row["val/AP"]), fmt(row["val/AP50"]),
                      str(row["epochs"]), row["status"]])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)) for line in lines)
