"""How the studies of an experiment searched and what it cost: where each trial's point came from (the
given first point, TPE's random start-up, TPE's model), what that makes a study ("random search" when TPE
never left its start-up), the compute of a set of trials, and an ablation's tuning table."""
from __future__ import annotations

from pathlib import Path

import optuna

from dmkd.metrics import CPU_S
from orchestrator.report import text
from orchestrator.report.records import StoredTrial
from orchestrator.space import Resources, default_startup_trials
from orchestrator.storage import sqlite_url

ORIGINS = ("given", "random", "tpe")  # where a study's trial came from (orchestrator.searcher)
LOST = "lost"  # user attribute of a study trial whose Tune trial the driver lost (searcher.close_lost_trials)
FAR_FROM_CALIBRATED = 10.0  # a first point whose step-0 distillation loss is this many detector losses or more


def origin_counts(trials) -> dict[str, int]:
    """How many of a study's trials (Optuna ``FrozenTrial``s) came from each origin (``ORIGINS``); a trial
    its Tune trial never ran (``lost``: the driver was killed) is not counted."""
    counts = {origin: 0 for origin in ORIGINS}
    for trial in trials:
        if trial.user_attrs.get(LOST):
            continue
        origin = trial.user_attrs.get("origin", "unknown")
        counts[origin] = counts.get(origin, 0) + 1
    return counts


def search_label(counts: dict[str, int], startup: int | None) -> str:
    """What a study really was: TPE only if its model proposed at least one trial."""
    given = f", {counts['given']} given" if counts.get("given") else ""
    if not counts.get("tpe") and not counts.get("random") and counts.get("given"):
        return f"no search: the given point only ({counts['given']} trial{'s' if counts['given'] > 1 else ''})"
    if counts.get("tpe"):
        return f"TPE: {counts['tpe']} from its model, {counts.get('random', 0)} random start-up{given}"
    return f"random search (TPE start-up{f' of {startup}' if startup else ''}): {counts.get('random', 0)} random{given}"


def study_origins(folder: Path, study_name: str) -> dict[str, int]:
    """The origin counts of the study ``study_name`` in ``folder/optuna.db``; {} where there is none (a
    cloud storage, or the experiment folder was renamed)."""
    path = folder / "optuna.db"
    if not path.is_file():
        return {}
    try:
        return origin_counts(optuna.load_study(study_name=study_name, storage=sqlite_url(path)).trials)
    except KeyError:
        return {}


def sweep_search(experiment: Path, space: dict) -> dict:
    """How the sweep's study searched: counts of its trials by origin and what that makes it."""
    startup = (space.get("searcher") or {}).get("startup_trials") or default_startup_trials(space["num_samples"])
    counts = study_origins(experiment, experiment.name)
    label = search_label(counts, startup) if counts else f"not recorded (TPE with {startup} random start-up trials)"
    return {"origins": counts, "startup_trials": startup, "label": label}


def tuning_compute(trials: list[StoredTrial], resources: Resources) -> dict:
    """What a set of trials cost: epochs run, training + evaluation seconds, CPU seconds (every process of
    the trial), and GPU seconds (wall seconds x the trial's GPUs) when it used GPUs."""
    epochs = [e for t in trials for e in t.history if isinstance(e.get("epoch"), int)]
    wall = sum(e.get("time/train_s", 0.0) + e.get("time/eval_s", 0.0) for e in epochs)
    gpus = resources.num_workers * resources.gpus_per_worker if resources.use_gpu else 0
    return {"trial_epochs": len(epochs), "train_eval_s": wall, "cpu_s": sum(e.get(CPU_S, 0.0) for e in epochs),
            "gpu_s": wall * gpus}


def tuning_markdown(tuning: dict) -> list[str]:
    """Each row's tuning: what it searched and how (TPE, or random search where TPE never left its
    start-up), what it cost, where its first point comes from, and how large the distillation loss was
    against the detector's at step 0 (a first point far above 1 is far from a calibrated setting)."""
    tuned = {row: found for row, found in tuning.items() if found["trials"]}
    if not tuned:
        return []
    lines = ["", "## Tuning (selected on val AP; trials and compute per row)", "",
             "| row | search | trials | searched parameters | trial-epochs | CPU-s | GPU-s | first point | its source | "
             "its step-0 loss ratio | lowest step-0 ratio tried | chosen | val AP of the chosen trial |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for row, found in tuned.items():
        searched = ", ".join(f"{k} {v['type']} [{v['low']:.3g}, {v['high']:.3g}]" if v.get("low") is not None
                             else f"{k} {v['choices']}" for k, v in found["searched"].items())
        compute = found.get("compute") or {}
        label = search_label(found["origins"], found.get("startup_trials")) if found.get("origins") else "-"
        first_ratio, lowest = found.get("first_point_ratio_step0"), found.get("lowest_ratio_step0")
        lines.append(f"| {row} | {label} | {found['trials']} x {found['epochs']} ep | {len(found['searched'])}: {searched} | "
                     f"{compute.get('trial_epochs', '-')} | {text.count(compute.get('cpu_s'))} | {text.count(compute.get('gpu_s'))} | "
                     f"{text.params(found['first_point'])} | {found.get('first_point_source', '-')} | {text.ratio(first_ratio)} | "
                     f"{text.ratio(lowest)} | {text.params(found['chosen'])} | {text.num(found['val_AP'])} |")
        if isinstance(first_ratio, (int, float)) and first_ratio >= FAR_FROM_CALIBRATED:
            notes.append(f"- {row}: its published setting starts with a distillation loss {first_ratio:.3g}x the "
                         f"detector's on this pair, far from a calibrated setting (about 1x)"
                         + (f"; the search reached {lowest:.3g}x" if isinstance(lowest, (int, float)) else "") + ".")
        if isinstance(lowest, (int, float)) and lowest > 1.0:
            notes.append(f"- {row}: no tuning trial brought the step-0 loss ratio to 1x or below (lowest {lowest:.3g}x): "
                         f"its search range may not reach a calibrated setting on this pair.")
    return lines + (["", *notes] if notes else [])
