"""Reports from stored results only (nothing is re-run): paper-style tables, the teacher/student pair
comparison, plots, CSV/JSON, and a W&B summary run.

    python -m orchestrator.report experiments/ablation [--out DIR]

Reads the experiment folder that a sweep or an ablation wrote: Tune's per-trial ``params.json`` and
``result.json``, ``sweep.json`` / ``ablation.json``, ``teacher.json`` and the Optuna study.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import statistics
import os
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dmkd.errors import UserError, one_line  # noqa: E402
from dmkd.io import atomic_write, atomic_write_json, read_json  # noqa: E402
from orchestrator.fidelity import common_epoch, importances_at, rung_validity, value_at  # noqa: E402
from orchestrator.results import trial_status  # noqa: E402
from orchestrator.space import default_startup_trials  # noqa: E402

FIGURES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
SIGNIFICANCE = 0.05  # a paired difference whose Holm-adjusted p is >= this is marked "n.s."
ORIGINS = ("given", "random", "tpe")  # where a study's trial came from (orchestrator.searcher)
FAR_FROM_CALIBRATED = 10.0  # a first point whose step-0 distillation loss is this many detector losses or more


def summarize(values: list[float]) -> dict:
    """Mean, sample standard deviation and the 95 % confidence half-width (Student t) of ``values``."""
    from scipy import stats

    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "ci95": None}
    mean = statistics.fmean(values)
    if n == 1:
        return {"n": 1, "mean": mean, "std": None, "ci95": None}
    std = statistics.stdev(values)
    return {"n": n, "mean": mean, "std": std, "ci95": float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)}


def paired_difference(values: dict, baseline: dict) -> dict:
    """``values - baseline`` paired by seed (the seeds both have): the mean difference, its 95 % CI
    half-width and the two-sided p-value of the paired t-test (Student t, n - 1 degrees of freedom).

    When every seed moved by exactly the same amount the t statistic is undefined: the p-value is then
    the exact sign-flip test's (each of the 2^n sign patterns equally likely under no difference; only
    the two of equal signs are as extreme), ``test`` says so, and the CI is left out."""
    from scipy import stats

    seeds = sorted(set(values) & set(baseline))
    differences = [values[seed] - baseline[seed] for seed in seeds]
    found = {**summarize(differences), "seeds": seeds, "p": None, "p_holm": None, "significant": None,
             "test": "paired t"}
    n = found["n"]
    if n < 2:
        return found
    if found["std"] == 0:
        found.update(p=1.0 if found["mean"] == 0 else 2.0 ** (1 - n), ci95=None, test="exact sign-flip (identical differences)")
    else:
        t = found["mean"] / (found["std"] / math.sqrt(n))
        found["p"] = float(2 * stats.t.sf(abs(t), n - 1))
    found["significant"] = found["p"] < SIGNIFICANCE
    return found


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment of ``p_values`` (one family of tests): the k-th smallest is multiplied
    by (m - k + 1), kept monotone, capped at 1. It controls the chance of any false claim in the family."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted = [1.0] * len(p_values)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def correct_family(comparisons: list[dict]) -> None:
    """Holm over every comparison given that has a p-value: each gets ``p_holm``, and ``significant``
    is decided by it."""
    tested = [c for c in comparisons if c is not None and c.get("p") is not None]
    for comparison, adjusted in zip(tested, holm([c["p"] for c in tested])):
        comparison["p_holm"] = adjusted
        comparison["significant"] = adjusted < SIGNIFICANCE
        comparison["family"] = len(tested)


def origin_counts(trials) -> dict[str, int]:
    """How many of a study's trials (Optuna ``FrozenTrial``s) came from each origin (``ORIGINS``)."""
    counts = {origin: 0 for origin in ORIGINS}
    for trial in trials:
        origin = trial.user_attrs.get("origin", "unknown")
        counts[origin] = counts.get(origin, 0) + 1
    return counts


def search_label(counts: dict[str, int], startup: int | None) -> str:
    """What a study really was: TPE only if its model proposed at least one trial."""
    given = f", {counts['given']} given" if counts.get("given") else ""
    if counts.get("tpe"):
        return f"TPE: {counts['tpe']} from its model, {counts.get('random', 0)} random start-up{given}"
    return f"random search (TPE start-up{f' of {startup}' if startup else ''}): {counts.get('random', 0)} random{given}"


def tuning_compute(trials: list[dict], resources) -> dict:
    """What a set of trials cost: epochs run, training + evaluation seconds, CPU seconds (every process of
    the trial), and GPU seconds (wall seconds x the trial's GPUs) when it used GPUs."""
    epochs = [e for t in trials for e in t["history"] if isinstance(e.get("epoch"), int)]
    wall = sum(e.get("time/train_s", 0.0) + e.get("time/eval_s", 0.0) for e in epochs)
    gpus = resources.num_workers * resources.gpus_per_worker if resources.use_gpu else 0
    return {"trial_epochs": len(epochs), "train_eval_s": wall, "cpu_s": sum(e.get("time/cpu_s", 0.0) for e in epochs),
            "gpu_s": wall * gpus}


def read_trials(experiment: Path) -> list[dict]:
    """Every trial Tune stored: its config, per-epoch results, and status."""
    trials = []
    for folder in sorted(experiment.glob("run_trial_*")):
        params_file, result_file = folder / "params.json", folder / "result.json"
        config = read_json(params_file, "trial parameters") if params_file.is_file() else {}
        history = []
        if result_file.is_file():
            for number, line in enumerate(result_file.read_text().splitlines(), start=1):
                if line.strip():
                    try:
                        history.append(json.loads(line))
                    except json.JSONDecodeError:
                        raise UserError(f"{result_file}: line {number} is not valid JSON (a trial's results "
                                        f"file was damaged)") from None
        error = None
        for name in ("error.txt",):
            if (folder / name).is_file():
                lines = [l for l in (folder / name).read_text().strip().splitlines() if l.strip()]
                error = lines[-1] if lines else "failed"
        trials.append({"trial_id": folder.name.split("_")[2], "folder": folder.name, "config": config,
                       "history": history, "error": error})
    return trials


def _figure(history: list[dict], name: str):
    for entry in reversed(history):
        if f"val/{name}" in entry:
            return entry[f"val/{name}"]
    return None


def reference_trials(experiment: Path, row_name: str) -> list[dict]:
    """The reference row (the undistilled student, one per seed) in the shape of Tune's trials."""
    path = experiment / "reference.json"
    if not path.is_file():
        return []
    stored = read_json(path, "reference results")
    return [{"trial_id": f"reference-seed{seed}", "folder": None, "config": {"row": row_name, "seed": int(seed)},
             "history": found["history"], "error": None} for seed, found in stored.items()]


def _final(history: list[dict], budget: int) -> dict | None:
    return history[-1] if history and history[-1].get("epoch") == budget else None


def reporting_split(trials: list[dict]) -> str:
    """``test`` when the trials evaluated a held-out test split, else ``val``."""
    return "test" if any("test/AP" in t["history"][-1] for t in trials if t["history"]) else "val"


def ablation_table(trials: list[dict], rows: dict, budget: int, tuning: dict | None = None) -> list[dict]:
    """One entry per row: figures on the reporting split per seed and summarised, the validation AP,
    and Δ AP paired by seed against the reference (``none``) row and against the best baseline (the
    non-DMKD distiller with the highest mean validation AP)."""
    split = reporting_split(trials)
    table = []
    for row_name, row in rows.items():
        members = [t for t in trials if t["config"].get("row") == row_name]
        finals = {t["config"].get("seed"): _final(t["history"], budget) for t in members if t["error"] is None}
        finals = {seed: final for seed, final in finals.items() if final is not None}
        failed = [t for t in members if t["error"] is not None]
        firsts = [t["history"][0] for t in members if t["error"] is None and t["history"]]
        entry = {"row": row_name, "method": row["method"], "params": row.get("params", {}), "split": split,
                 "seeds": sorted(finals), "failed": len(failed), "tuning": (tuning or {}).get(row_name),
                 "failures": [f"seed {t['config'].get('seed')}: {t['error']}" for t in failed],
                 "per_seed": {seed: final.get(f"{split}/AP") for seed, final in sorted(finals.items())},
                 "val_AP": summarize([f["val/AP"] for f in finals.values() if "val/AP" in f]),
                 "loss_ratio_step0": summarize([f["loss_ratio/step0"] for f in firsts if "loss_ratio/step0" in f]),
                 "loss_ratio_epoch1": summarize([f["loss_ratio"] for f in firsts if "loss_ratio" in f]),
                 "student_init": sorted({f.get("pairing/student_init") for f in finals.values()} - {None})}
        for name in FIGURES:
            entry[name] = summarize([f[f"{split}/{name}"] for f in finals.values() if f"{split}/{name}" in f])
        table.append(entry)
    reference = next((e for e in table if e["method"] == "none"), None)
    baselines = [e for e in table if e["method"] != "none" and not e["method"].startswith("dmkd") and e["val_AP"]["mean"] is not None]
    best_baseline = max(baselines, key=lambda e: e["val_AP"]["mean"], default=None)
    for entry in table:
        entry["best_baseline"] = best_baseline["row"] if best_baseline else None
        entry["delta_AP"] = (paired_difference(entry["per_seed"], reference["per_seed"])
                             if reference is not None and entry is not reference else None)
        entry["delta_best_baseline"] = (paired_difference(entry["per_seed"], best_baseline["per_seed"])
                                        if best_baseline is not None and entry["method"] != "none" and entry is not best_baseline
                                        else None)
    # one family: every comparison this table prints
    correct_family([c for e in table for c in (e["delta_AP"], e["delta_best_baseline"])])
    return table


def best_distilled(table: list[dict]) -> dict | None:
    """The distilled row a reader would pick: the highest mean val AP (selection never looks at test)."""
    rows = [e for e in table if e["method"] != "none" and e["val_AP"]["mean"] is not None]
    return max(rows, key=lambda e: e["val_AP"]["mean"], default=None)


def pairing_check(trials: list[dict]) -> str:
    """One line: whether every row of a seed started from the same student weights and data order."""
    by_seed: dict = {}
    for t in trials:
        if t["history"] and "pairing/student_init" in t["history"][0]:
            first = t["history"][0]
            by_seed.setdefault(t["config"].get("seed"), set()).add((first["pairing/student_init"], first.get("pairing/data_order")))
    if not by_seed:
        return "Pairing: not recorded by these trials."
    broken = sorted(seed for seed, found in by_seed.items() if len(found) > 1)
    if broken:
        return (f"Pairing: **broken** for seed(s) {broken}: rows of one seed started from different student weights "
                f"or data orders, so the paired differences below are not paired.")
    return (f"Pairing: every row of a seed started from the same student weights and saw the same data order "
            f"(checked for seeds {sorted(by_seed)}).")


def _fmt(summary: dict) -> str:
    if summary["mean"] is None:
        return "-"
    if summary["mean"] < 0:  # COCOeval's -1: no ground truth of that size
        return "n/a"
    text = f"{summary['mean']:.3f}"
    if summary["std"] is not None:
        text += f" ± {summary['std']:.3f}"
    return text


LATENCY_RUNS = 15
LATENCY_BUDGET_S = 10.0


def cpu_latency(model, image) -> dict:
    """Forward latency of ``model`` on ``image`` on this CPU: 2 warm-up runs, then up to LATENCY_RUNS
    runs (fewer if they pass LATENCY_BUDGET_S). The minimum is the figure to compare: other work on the
    machine only ever adds time, so the fastest run is the least disturbed one."""
    import torch

    with torch.no_grad():
        for _ in range(2):
            model(image)
        times, started = [], time.perf_counter()
        while len(times) < LATENCY_RUNS and (len(times) < 3 or time.perf_counter() - started < LATENCY_BUDGET_S):
            begin = time.perf_counter()
            model(image)
            times.append(1000 * (time.perf_counter() - begin))
    return {"min_ms": min(times), "median_ms": statistics.median(times), "runs": len(times),
            "threads": torch.get_num_threads()}


def pair_comparison(space: dict, teacher: dict | None, student_baseline, best_distilled, split: str = "val") -> dict:
    """Parameters, forward FLOPs and CPU latency (batch 1, see :func:`cpu_latency`) of teacher and
    student, with AP on ``split`` (the split the students' figures are on)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from dmkd.config import from_dict
    from dmkd.models import DetectorConfig, build_detector
    from dmkd.provenance import cpu_name

    result = {"machine": cpu_name()}
    for role in ("teacher", "student"):
        cfg = from_dict(DetectorConfig, space["pair"][role], where=f"pair.{role}")
        model = build_detector(cfg).eval()
        image = [torch.rand(3, cfg.image_size, cfg.image_size)]
        with torch.no_grad():
            counter = FlopCounterMode(display=False)
            with counter:
                model(image)
        latency = cpu_latency(model, image)
        result[role] = {"detector": space["pair"][role], "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
                        "gflops": counter.get_total_flops() / 1e9, "latency_ms_cpu": latency["min_ms"],
                        "latency": latency}
    result["teacher"]["AP"] = teacher.get(f"{split}/AP") if teacher else None
    result["student"]["AP_without_distillation"] = student_baseline
    result["student"]["AP_best_distilled"] = best_distilled
    return result


def _plot_epochs(groups: dict[str, list[list[dict]]], path: Path) -> None:
    fig, axis = plt.subplots(figsize=(7, 4.5))
    for label, histories in groups.items():
        epochs = sorted({e["epoch"] for h in histories for e in h if "val/AP" in e})
        if not epochs:
            continue
        means, lows, highs = [], [], []
        for epoch in epochs:
            values = [e["val/AP"] for h in histories for e in h if e.get("epoch") == epoch and "val/AP" in e]
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


def _plot_scatter(trials: list[dict], params: list[str], path: Path, log_scaled: set[str], epoch: int | None,
                  reached: int) -> None:
    """Each searched parameter against val AP at one epoch (the largest that enough trials reached), so
    that every point had the same budget; trials stopped at that epoch are drawn hollow."""
    from matplotlib.ticker import LogLocator

    fig, axes = plt.subplots(1, max(1, len(params)), figsize=(3.5 * max(1, len(params)), 3.6), squeeze=False)
    for axis, name in zip(axes[0], params):
        for stopped in (False, True):
            points = [(t["config"].get(name), value_at(t["history"], "val/AP", epoch)) for t in trials
                      if t["history"] and (t["history"][-1].get("epoch") == epoch) == stopped]
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


def _plot_pareto(trials: list[dict], first: str, second: str, modes: tuple[str, str], path: Path) -> list[dict]:
    points = []
    for t in trials:
        if t["history"] and first in t["history"][-1] and second in t["history"][-1]:
            points.append({"trial_id": t["trial_id"], first: t["history"][-1][first], second: t["history"][-1][second]})
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


def write_report(experiment: str | Path, out: str | Path | None = None) -> Path:
    experiment = Path(experiment)
    out = Path(out) if out else experiment
    kind, record = _read_record(experiment)
    space = record["space"]
    budget = space["budget"]["epochs"]
    trials = read_trials(experiment)
    teacher = read_json(experiment / "teacher.json", "teacher figures") if (experiment / "teacher.json").is_file() else None
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"kind": kind, "experiment": str(experiment), "pair": space["pair_name"], "trials": len(trials)}
    lines = [f"# {kind.title()} report: {experiment.name}", "", f"Pair: `{space['pair_name']}`; {len(trials)} trials; "
             f"{budget} epochs per trial; git {record.get('git_commit')}.", ""]
    section = _ablation_section if kind == "ablation" else _sweep_section
    body, plots, baseline, best_distilled, split = section(experiment, record, trials, teacher, report, out)
    lines += body
    pair = pair_comparison(space, teacher, baseline, best_distilled, split)
    report["pair"] = pair
    lines += _pair_lines(pair, split, baseline, best_distilled) + ["", *[f"![{p}]({p})" for p in plots]]
    atomic_write(out / "report.md", lambda handle: handle.write("\n".join(lines) + "\n"))
    atomic_write_json(out / "report.json", report)
    _write_csv(out / "report.csv", report)
    _log_to_wandb(record, report, out, plots)
    return out / "report.md"


def _read_record(experiment: Path) -> tuple[str, dict]:
    """The experiment's kind (ablation or sweep) and its record, checked."""
    if not experiment.is_dir():
        raise UserError(f"{experiment}: experiment folder not found")
    kind = "ablation" if (experiment / "ablation.json").is_file() else "sweep" if (experiment / "sweep.json").is_file() else None
    if kind is None:
        raise UserError(f"{experiment}: holds neither ablation.json nor sweep.json (not an experiment folder?)")
    record = read_json(experiment / f"{kind}.json", f"{kind} record")
    if not (isinstance(record, dict) and isinstance(record.get("space"), dict) and "budget" in record["space"]):
        raise UserError(f"{experiment / f'{kind}.json'}: not a {kind} record (no 'space' with a 'budget')")
    return kind, record


def _ablation_section(experiment: Path, record: dict, trials: list, teacher, report: dict, out: Path):
    """The method table with paired statistics and the per-epoch plot; returns (lines, plots, reference AP,
    best distilled AP, the split they were measured on)."""
    budget = record["space"]["budget"]["epochs"]
    rows = record["rows"]
    reference_row = next((name for name, row in rows.items() if row["method"] == "none"), None)
    trials = trials + (reference_trials(experiment, reference_row) if reference_row else [])
    table = ablation_table(trials, rows, budget, record.get("tuning"))
    report["table"] = table
    report["pairing"] = pairing_check(trials)
    split = reporting_split(trials)
    reference = next((e for e in table if e["method"] == "none"), None)
    chosen = best_distilled(table)
    report["best_distilled"] = chosen["row"] if chosen else None
    report["seeds"] = record.get("seeds")
    report["tuning_seed"] = (record.get("plan") or {}).get("tuning_seed")
    lines = ablation_markdown(table, teacher, split, report["pairing"], record.get("tuning") or {},
                              seeds=report["seeds"], tuning_seed=report["tuning_seed"])
    groups = {e["row"]: [t["history"] for t in trials if t["config"].get("row") == e["row"] and t["error"] is None]
              for e in table}
    _plot_epochs(groups, out / "ap_per_epoch.png")
    return (lines, ["ap_per_epoch.png"], reference["AP"]["mean"] if reference else None,
            chosen["AP"]["mean"] if chosen else None, split)


def _sweep_section(experiment: Path, record: dict, trials: list, teacher, report: dict, out: Path):
    """Leaderboard with Δ AP, rung validity, importances and plots at one budget (same returns as above)."""
    space = record["space"]
    budget = space["budget"]["epochs"]
    params = sorted(space.get("search", {}))
    rows, baseline = _sweep_rows(experiment, trials, space)
    report["leaderboard"] = rows
    report["reference_AP"] = baseline
    search = sweep_search(experiment, space)
    report["search"] = search
    lines = ["## Leaderboard (val split)", "", f"Search: {search['label']}.", "",
             f"Student without distillation (same budget and seed): val AP {_num(baseline)}; Δ AP is each trial's "
             f"difference to it at the full budget (one seed: no confidence interval; the ablation runner gives paired "
             f"statistics). AP is measured at the epoch given; trials stopped early have no Δ.", "",
             "| trial | " + " | ".join(params) + " | AP | Δ AP | AP50 | AP75 | at epoch | status |",
             "|---|" + "---|" * (len(params) + 6)]
    for r in rows:
        cells = [f"{r[p]:.4g}" if isinstance(r[p], float) else str(r[p]) for p in params]
        delta = f"{r['delta_AP']:+.3f}" if r["delta_AP"] is not None else "-"
        figures = [_num(r["AP"]), delta, _num(r["AP50"]), _num(r["AP75"])]
        lines.append(f"| {r['trial_id']} | " + " | ".join(cells + figures) + f" | {r['epochs']} | {r['status']} |")
    objective = space["objective"]
    lines += _rung_lines(trials, budget, objective["metric"], report)
    epoch, reached = common_epoch(trials, "val/AP")
    report["compared_at_epoch"] = epoch
    importances, skipped = importances_at(trials, space.get("search", {}), objective["metric"], epoch)
    report["importances"] = importances
    lines += ["", f"## Parameter importances (Optuna fANOVA, {objective['metric']} at epoch {epoch})", ""]
    if importances:
        lines += ["| parameter | importance |", "|---|---|", *[f"| {k} | {v:.3f} |" for k, v in importances.items()]]
    else:
        lines.append(skipped)
    _plot_epochs({t["trial_id"]: [t["history"]] for t in trials if t["history"]}, out / "ap_per_epoch.png")
    log_scaled = {k for k, v in space.get("search", {}).items() if v.get("type") == "loguniform"}
    _plot_scatter(trials, params, out / "param_scatter.png", log_scaled, epoch, reached)
    plots = ["ap_per_epoch.png", "param_scatter.png"]
    if objective.get("second_metric"):
        report["pareto_front"] = _plot_pareto(trials, objective["metric"], objective["second_metric"],
                                              (objective["mode"], objective["second_mode"]), out / "pareto.png")
        plots.append("pareto.png")
    return lines, plots, baseline, rows[0]["AP"] if rows else None, "val"


def sweep_search(experiment: Path, space: dict) -> dict:
    """How the sweep's study searched: counts of its trials by origin and what that makes it."""
    import optuna

    startup = (space.get("searcher") or {}).get("startup_trials") or default_startup_trials(space["num_samples"])
    path = experiment / "optuna.db"
    counts = {}
    if path.is_file():
        try:
            counts = origin_counts(optuna.load_study(study_name=experiment.name, storage=f"sqlite:///{path}").trials)
        except KeyError:  # a study of another name: the experiment folder was renamed
            counts = {}
    label = search_label(counts, startup) if counts else f"not recorded (TPE with {startup} random start-up trials)"
    return {"origins": counts, "startup_trials": startup, "label": label}


def _sweep_rows(experiment: Path, trials: list, space: dict) -> tuple[list[dict], float | None]:
    """One row per trial, best first, with its Δ AP to the cached reference student (full budget only)."""
    budget = space["budget"]["epochs"]
    params = sorted(space.get("search", {}))
    rows = []
    for t in trials:
        last = t["history"][-1] if t["history"] else {}
        status = trial_status(t["error"] is not None, last.get("epoch", 0), budget, space["scheduler"]["type"])
        rows.append({"trial_id": t["trial_id"], **{p: t["config"].get(p) for p in params},
                     **{f: _figure(t["history"], f) for f in FIGURES}, "epochs": last.get("epoch", 0),
                     "status": status, "error": t["error"] or ""})
    rows.sort(key=lambda r: (r["AP"] is None, -(r["AP"] or 0)))
    references = reference_trials(experiment, "none")
    baseline = _figure(references[0]["history"], "AP") if references else None
    for r in rows:
        full = r["epochs"] == budget  # the reference ran the full budget: a stopped trial has no Δ
        r["delta_AP"] = r["AP"] - baseline if full and r["AP"] is not None and baseline is not None else None
    return rows, baseline


def _rung_lines(trials: list, budget: int, metric: str, report: dict) -> list[str]:
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


def _pair_lines(pair: dict, split: str, baseline, best_distilled) -> list[str]:
    latency = pair["teacher"]["latency"]
    return ["", "## Teacher and student", "",
            f"| | params (M) | GFLOPs (1 image) | CPU latency (ms, batch 1, fastest of {latency['runs']}) | {split} AP |",
            "|---|---|---|---|---|",
            f"| teacher | {pair['teacher']['params_M']:.2f} | {pair['teacher']['gflops']:.2f} | "
            f"{pair['teacher']['latency_ms_cpu']:.1f} | {_num(pair['teacher']['AP'])} |",
            f"| student, no distillation | {pair['student']['params_M']:.2f} | {pair['student']['gflops']:.2f} | "
            f"{pair['student']['latency_ms_cpu']:.1f} | {_num(baseline)} |",
            f"| student, best distilled (chosen on val) | | | | {_num(best_distilled)} |", "",
            f"Latency measured on {pair['machine']}, {latency['threads']} torch threads, while the report was "
            f"written (the fastest run is the least disturbed by other work on the machine)."]


def _delta(found: dict | None) -> str:
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


def _params(params: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()) or "-"


def _tuning_cell(tuning: dict | None) -> str:
    if not tuning:
        return "not tuned"
    if not tuning["trials"]:
        return tuning.get("note", "nothing to tune")
    return f"{tuning['trials']} trials x {tuning['epochs']} ep"


def _seed_range(seeds: list[int] | None) -> str:
    if not seeds:
        return "-"
    return f"{seeds[0]}-{seeds[-1]}" if seeds == list(range(seeds[0], seeds[-1] + 1)) and len(seeds) > 2 else \
        ", ".join(str(seed) for seed in seeds)


def _ratio(value) -> str:
    return f"{value:.3g}x" if isinstance(value, (int, float)) else "-"


def ablation_markdown(table: list[dict], teacher: dict | None, split: str, pairing: str, tuning: dict, *,
                      seeds: list[int] | None = None, tuning_seed: int | None = None) -> list[str]:
    """The paper-style table: figures on the reporting split, paired Δ AP with CI, raw and Holm-adjusted p."""
    best = next((e["best_baseline"] for e in table if e.get("best_baseline")), None)
    family = next((c["family"] for e in table for c in (e["delta_AP"], e["delta_best_baseline"])
                   if c and c.get("family")), 0)
    lines = [f"## Results on the {split} split (mean ± std over seeds)", ""]
    if split == "val":
        lines += ["Note: this data has no test split, so tuning selected on the same split this table reports "
                  "(optimistic); give `data.test_ann`/`test_images` or carve one with `python -m dmkd.split`.", ""]
    else:
        lines += ["Selection (tuning, best trial, best baseline) used the val split only; the figures below are on "
                  "the held-out test split, with val AP beside them for reference.", ""]
    lines += [f"Reported seeds: {_seed_range(seeds)}." + (f" Tuning trained at seed {tuning_seed}, which is never "
              f"reported (a reported run is never the one its selection picked), and never evaluated the test split."
              if tuning_seed is not None else ""), "",
              f"Δ AP is the difference to the row named, paired by seed over the n seeds both rows have: mean ± 95 % "
              f"CI half-width (Student t), the two-sided p-value of a paired t-test, and that p-value adjusted by "
              f"Holm's method over all {family} comparisons this table makes (against `none` and against the best "
              f"baseline); n.s. marks an adjusted p >= {SIGNIFICANCE}. Not significant means no evidence of a "
              f"difference at this number of seeds, not evidence of none. "
              f"Best baseline (highest val AP among non-DMKD distillers): {best or '-'}.", "", pairing, "",
              f"| row | method | {split} AP | 95 % CI | Δ AP vs none | Δ AP vs best baseline | val AP | AP50 | AP75 | "
              f"APs | APm | APl | seeds | distill/detector loss, step 0 | tuning | parameters | failed |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    if teacher:
        prefix = split if f"{split}/AP" in teacher else "val"
        lines.append(f"| teacher | - | {_num(teacher.get(f'{prefix}/AP'))} | - | - | - | {_num(teacher.get('val/AP'))} | "
                     + " | ".join(_num(teacher.get(f"{prefix}/{f}")) for f in FIGURES[1:]) + " | - | - | - | - | - |")
    for e in table:
        ci = f"± {e['AP']['ci95']:.3f}" if e["AP"]["ci95"] is not None else "-"
        lines.append(f"| {e['row']} | {e['method']} | {_fmt(e['AP'])} | {ci} | {_delta(e['delta_AP'])} | "
                     f"{_delta(e['delta_best_baseline'])} | {_fmt(e['val_AP'])} | "
                     + " | ".join(_fmt(e[f]) for f in FIGURES[1:])
                     + f" | {e['AP']['n']} | {_ratio(e['loss_ratio_step0']['mean'])} | "
                     f"{_tuning_cell(tuning.get(e['row']))} | {_params(e['params'])} | {e['failed']} |")
    failures = [f"- {e['row']}, {msg}" for e in table for msg in e["failures"]]
    if failures:
        lines += ["", "Failed trials:", *failures]
    return lines + tuning_markdown(tuning)


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
                     f"{compute.get('trial_epochs', '-')} | {_count(compute.get('cpu_s'))} | {_count(compute.get('gpu_s'))} | "
                     f"{_params(found['first_point'])} | {found.get('first_point_source', '-')} | {_ratio(first_ratio)} | "
                     f"{_ratio(lowest)} | {_params(found['chosen'])} | {_num(found['val_AP'])} |")
        if isinstance(first_ratio, (int, float)) and first_ratio >= FAR_FROM_CALIBRATED:
            notes.append(f"- {row}: its published setting starts with a distillation loss {first_ratio:.3g}x the "
                         f"detector's on this pair, far from a calibrated setting (about 1x)"
                         + (f"; the search reached {lowest:.3g}x" if isinstance(lowest, (int, float)) else "") + ".")
        if isinstance(lowest, (int, float)) and lowest > 1.0:
            notes.append(f"- {row}: no tuning trial brought the step-0 loss ratio to 1x or below (lowest {lowest:.3g}x): "
                         f"its search range may not reach a calibrated setting on this pair.")
    return lines + (["", *notes] if notes else [])


def _count(value) -> str:
    return f"{value:.0f}" if isinstance(value, (int, float)) and value else "-"


def _num(value) -> str:
    if isinstance(value, (int, float)) and value < 0:  # COCOeval's -1: no ground truth of that size
        return "n/a"
    return f"{value:.3f}" if isinstance(value, (int, float)) else "-"


def _write_csv(path: Path, report: dict) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    if report["kind"] == "ablation":
        writer.writerow(["row", "method", "split", "n", *[f"{f}_mean" for f in FIGURES], *[f"{f}_std" for f in FIGURES],
                         "AP_ci95", "val_AP_mean",
                         *[f"{name}{k}" for name in ("delta_AP", "delta_best_baseline")
                           for k in ("", "_ci95", "_n", "_p", "_p_holm")], "failed"])
        for e in report["table"]:
            deltas = [(d or {}).get(k) for d in (e["delta_AP"], e["delta_best_baseline"])
                      for k in ("mean", "ci95", "n", "p", "p_holm")]
            writer.writerow([e["row"], e["method"], e["split"], e["AP"]["n"], *[e[f]["mean"] for f in FIGURES],
                             *[e[f]["std"] for f in FIGURES], e["AP"]["ci95"], e["val_AP"]["mean"], *deltas, e["failed"]])
    else:
        rows = report["leaderboard"]
        if rows:
            writer.writerow(list(rows[0]))
            for r in rows:
                writer.writerow(list(r.values()))
    atomic_write(path, lambda handle: handle.write(buffer.getvalue()))


def _log_to_wandb(record: dict, report: dict, out: Path, plots: list[str]) -> None:
    mode = os.environ.get("WANDB_MODE") or record.get("plan", {}).get("wandb", "off")
    if mode in ("off", "disabled"):
        return
    import wandb

    space = record["space"]
    run = wandb.init(project=space["wandb"]["project"], entity=space["wandb"].get("entity"), group=space["pair_name"],
                     job_type="report", name=f"{Path(report['experiment']).name}-report", mode=mode,
                     dir=str(out), tags=[report["kind"], "report"], reinit="finish_previous",
                     settings=wandb.Settings(silent=True))
    try:
        if report["kind"] == "ablation":
            columns = ["row", "method", "split", "n", "AP", "AP_std", "AP_ci95", "delta_AP", "delta_AP_p", "delta_AP_p_holm"]
            data = [[e["row"], e["method"], e["split"], e["AP"]["n"], e["AP"]["mean"], e["AP"]["std"], e["AP"]["ci95"],
                     *[(e["delta_AP"] or {}).get(k) for k in ("mean", "p", "p_holm")]] for e in report["table"]]
        else:
            columns = list(report["leaderboard"][0]) if report["leaderboard"] else ["trial_id"]
            data = [list(r.values()) for r in report["leaderboard"]]
        run.log({"report/table": wandb.Table(columns=columns, data=data),
                 **{f"report/{Path(p).stem}": wandb.Image(str(out / p)) for p in plots}})
    finally:
        run.finish()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", help="an experiment folder written by a sweep or an ablation")
    parser.add_argument("--out", help="where to write the report (default: the experiment folder)")
    args = parser.parse_args(argv)
    try:
        path = write_report(args.experiment, args.out)
    except UserError as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
