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
from dmkd.io import atomic_write, atomic_write_json  # noqa: E402

FIGURES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
# two-sided 95 % Student-t quantiles for 1..30 degrees of freedom; 1.96 beyond
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def summarize(values: list[float]) -> dict:
    """Mean, sample standard deviation and the 95 % confidence half-width (Student t) of ``values``."""
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "ci95": None}
    mean = statistics.fmean(values)
    if n == 1:
        return {"n": 1, "mean": mean, "std": None, "ci95": None}
    std = statistics.stdev(values)
    t = T_975[n - 2] if n - 1 <= len(T_975) else 1.96
    return {"n": n, "mean": mean, "std": std, "ci95": t * std / math.sqrt(n)}


def read_trials(experiment: Path) -> list[dict]:
    """Every trial Tune stored: its config, per-epoch results, and status."""
    trials = []
    for folder in sorted(experiment.glob("run_trial_*")):
        params_file, result_file = folder / "params.json", folder / "result.json"
        config = json.loads(params_file.read_text()) if params_file.is_file() else {}
        history = []
        if result_file.is_file():
            history = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
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


def ablation_table(trials: list[dict], rows: dict, budget: int) -> list[dict]:
    table = []
    baseline = None
    for row_name, row in rows.items():
        members = [t for t in trials if t["config"].get("row") == row_name]
        done = [t for t in members if t["error"] is None and t["history"] and t["history"][-1].get("epoch") == budget]
        failed = [t for t in members if t["error"] is not None]
        entry = {"row": row_name, "method": row["method"], "params": row.get("params", {}),
                 "seeds": sorted(t["config"].get("seed") for t in done), "failed": len(failed),
                 "failures": [f"seed {t['config'].get('seed')}: {t['error']}" for t in failed]}
        for name in FIGURES:
            entry[name] = summarize([_figure(t["history"], name) for t in done if _figure(t["history"], name) is not None])
        table.append(entry)
        if row["method"] == "none":
            baseline = entry["AP"]["mean"]
    for entry in table:
        mean = entry["AP"]["mean"]
        entry["delta_AP"] = None if (baseline is None or mean is None) else mean - baseline
    return table


def _fmt(summary: dict) -> str:
    if summary["mean"] is None:
        return "-"
    text = f"{summary['mean']:.3f}"
    if summary["std"] is not None:
        text += f" ± {summary['std']:.3f}"
    return text


def pair_comparison(space: dict, teacher: dict | None, student_baseline, best_distilled) -> dict:
    """Parameters, forward FLOPs and median CPU latency (batch 1) of teacher and student, with AP."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from dmkd.config import from_dict
    from dmkd.models import DetectorConfig, build_detector

    result = {}
    for role in ("teacher", "student"):
        cfg = from_dict(DetectorConfig, space["pair"][role], where=f"pair.{role}")
        model = build_detector(cfg).eval()
        image = [torch.rand(3, cfg.image_size, cfg.image_size)]
        with torch.no_grad():
            counter = FlopCounterMode(display=False)
            with counter:
                model(image)
            times = []
            for _ in range(5):
                started = time.perf_counter()
                model(image)
                times.append(time.perf_counter() - started)
        result[role] = {"detector": space["pair"][role], "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
                        "gflops": counter.get_total_flops() / 1e9, "latency_ms_cpu": 1000 * statistics.median(times[1:])}
    result["teacher"]["AP"] = teacher.get("val/AP") if teacher else None
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


def _plot_scatter(trials: list[dict], params: list[str], path: Path) -> None:
    fig, axes = plt.subplots(1, max(1, len(params)), figsize=(3.5 * max(1, len(params)), 3.2), squeeze=False)
    for axis, name in zip(axes[0], params):
        points = [(t["config"].get(name), _figure(t["history"], "AP")) for t in trials]
        points = [(x, y) for x, y in points if isinstance(x, (int, float)) and y is not None]
        axis.scatter([p[0] for p in points], [p[1] for p in points])
        axis.set_xlabel(name)
        axis.set_ylabel("val AP")
        if name == "alpha":
            axis.set_xscale("log")
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
    if not experiment.is_dir():
        raise UserError(f"{experiment}: experiment folder not found")
    kind = "ablation" if (experiment / "ablation.json").is_file() else "sweep" if (experiment / "sweep.json").is_file() else None
    if kind is None:
        raise UserError(f"{experiment}: holds neither ablation.json nor sweep.json (not an experiment folder?)")
    record = json.loads((experiment / f"{kind}.json").read_text())
    space = record["space"]
    budget = space["budget"]["epochs"]
    trials = read_trials(experiment)
    teacher = json.loads((experiment / "teacher.json").read_text()) if (experiment / "teacher.json").is_file() else None
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"kind": kind, "experiment": str(experiment), "pair": space["pair_name"], "trials": len(trials)}
    lines = [f"# {kind.title()} report: {experiment.name}", "", f"Pair: `{space['pair_name']}`; {len(trials)} trials; "
             f"{budget} epochs per trial; git {record.get('git_commit')}.", ""]
    plots = []

    if kind == "ablation":
        table = ablation_table(trials, record["rows"], budget)
        report["table"] = table
        baseline = next((e["AP"]["mean"] for e in table if e["method"] == "none"), None)
        distilled = [e["AP"]["mean"] for e in table if e["method"] != "none" and e["AP"]["mean"] is not None]
        best_distilled = max(distilled) if distilled else None
        lines += ["## Results (mean ± std over seeds; 95 % CI of AP)", "",
                  "| row | method | AP | 95 % CI | Δ AP | AP50 | AP75 | APs | APm | APl | seeds | failed |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        if teacher:
            lines.append(f"| teacher | - | {teacher['val/AP']:.3f} | - | - | {teacher['val/AP50']:.3f} | "
                         f"{teacher['val/AP75']:.3f} | {teacher['val/APs']:.3f} | {teacher['val/APm']:.3f} | "
                         f"{teacher['val/APl']:.3f} | - | - |")
        for e in table:
            ci = f"± {e['AP']['ci95']:.3f}" if e["AP"]["ci95"] is not None else "-"
            delta = f"{e['delta_AP']:+.3f}" if e["delta_AP"] is not None else "-"
            lines.append(f"| {e['row']} | {e['method']} | {_fmt(e['AP'])} | {ci} | {delta} | "
                         + " | ".join(_fmt(e[f]) for f in FIGURES[1:]) + f" | {e['AP']['n']} | {e['failed']} |")
        failures = [f"- {e['row']}, {msg}" for e in table for msg in e["failures"]]
        if failures:
            lines += ["", "Failed trials:", *failures]
        groups = {e["row"]: [t["history"] for t in trials if t["config"].get("row") == e["row"] and t["error"] is None]
                  for e in table}
        _plot_epochs(groups, out / "ap_per_epoch.png")
        plots.append("ap_per_epoch.png")
    else:
        params = sorted(space.get("search", {}))
        rows = []
        for t in trials:
            last = t["history"][-1] if t["history"] else {}
            status = "failed" if t["error"] else "completed" if last.get("epoch") == budget else "stopped early"
            rows.append({"trial_id": t["trial_id"], **{p: t["config"].get(p) for p in params},
                         **{f: _figure(t["history"], f) for f in FIGURES}, "epochs": last.get("epoch", 0),
                         "status": status, "error": t["error"] or ""})
        rows.sort(key=lambda r: (r["AP"] is None, -(r["AP"] or 0)))
        report["leaderboard"] = rows
        lines += ["## Leaderboard", "", "| trial | " + " | ".join(params) + " | AP | AP50 | AP75 | epochs | status |",
                  "|---|" + "---|" * (len(params) + 5)]
        for r in rows:
            cells = [f"{r[p]:.4g}" if isinstance(r[p], float) else str(r[p]) for p in params]
            figures = [f"{r[f]:.3f}" if r[f] is not None else "-" for f in ("AP", "AP50", "AP75")]
            lines.append(f"| {r['trial_id']} | " + " | ".join(cells + figures) + f" | {r['epochs']} | {r['status']} |")
        importances = _importances(experiment, space)
        report["importances"] = importances
        if importances:
            lines += ["", "## Parameter importances (Optuna, fANOVA)", "", "| parameter | importance |", "|---|---|",
                      *[f"| {k} | {v:.3f} |" for k, v in importances.items()]]
        baseline, best_distilled = None, rows[0]["AP"] if rows else None
        _plot_epochs({t["trial_id"]: [t["history"]] for t in trials if t["history"]}, out / "ap_per_epoch.png")
        _plot_scatter(trials, params, out / "param_scatter.png")
        plots += ["ap_per_epoch.png", "param_scatter.png"]
        objective = space["objective"]
        if objective.get("second_metric"):
            front = _plot_pareto(trials, objective["metric"], objective["second_metric"],
                                 (objective["mode"], objective["second_mode"]), out / "pareto.png")
            report["pareto_front"] = front
            plots.append("pareto.png")

    pair = pair_comparison(space, teacher, baseline, best_distilled)
    report["pair"] = pair
    lines += ["", "## Teacher and student", "", "| | params (M) | GFLOPs (1 image) | CPU latency (ms, batch 1) | AP |",
              "|---|---|---|---|---|",
              f"| teacher | {pair['teacher']['params_M']:.2f} | {pair['teacher']['gflops']:.2f} | "
              f"{pair['teacher']['latency_ms_cpu']:.1f} | {_num(pair['teacher']['AP'])} |",
              f"| student, no distillation | {pair['student']['params_M']:.2f} | {pair['student']['gflops']:.2f} | "
              f"{pair['student']['latency_ms_cpu']:.1f} | {_num(baseline)} |",
              f"| student, best distilled | | | | {_num(best_distilled)} |", "",
              *[f"![{p}]({p})" for p in plots]]
    atomic_write(out / "report.md", lambda handle: handle.write("\n".join(lines) + "\n"))
    atomic_write_json(out / "report.json", report)
    _write_csv(out / "report.csv", report)
    _log_to_wandb(record, report, out, plots)
    return out / "report.md"


def _num(value) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "-"


def _importances(experiment: Path, space: dict) -> dict:
    db = experiment / "optuna.db"
    if not db.is_file():
        return {}
    import optuna

    try:
        study = optuna.load_study(study_name=experiment.name, storage=f"sqlite:///{db}")  # the sweep's --name
        return dict(optuna.importance.get_param_importances(study))
    except (RuntimeError, ValueError, KeyError):  # too few finished trials, or one parameter only
        return {}


def _write_csv(path: Path, report: dict) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    if report["kind"] == "ablation":
        writer.writerow(["row", "method", "n", *[f"{f}_mean" for f in FIGURES], *[f"{f}_std" for f in FIGURES],
                         "AP_ci95", "delta_AP", "failed"])
        for e in report["table"]:
            writer.writerow([e["row"], e["method"], e["AP"]["n"], *[e[f]["mean"] for f in FIGURES],
                             *[e[f]["std"] for f in FIGURES], e["AP"]["ci95"], e["delta_AP"], e["failed"]])
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
            columns = ["row", "method", "n", "AP", "AP_std", "AP_ci95", "delta_AP"]
            data = [[e["row"], e["method"], e["AP"]["n"], e["AP"]["mean"], e["AP"]["std"], e["AP"]["ci95"], e["delta_AP"]]
                    for e in report["table"]]
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
