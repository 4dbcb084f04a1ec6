"""A report written from an experiment's stored results: ``report.md``, ``report.json``, ``report.csv``
and the plots, in the experiment folder (or ``out``), and a W&B summary run in the pair's group
(offline unless a key is set; not with ``--wandb off``). Nothing is trained again; the pair table's
latency is measured once per experiment (``pair.py``)."""
from __future__ import annotations

import os
from pathlib import Path

import wandb

from dmkd.distillers import reading_notes
from dmkd.io import atomic_write, atomic_write_json, read_json
from dmkd.metrics import COCO_FIGURES
from orchestrator.report.ablation import ablation_section
from orchestrator.report.pair import pair_comparison, pair_lines
from orchestrator.report.records import read_record, read_trials
from orchestrator.report.sweep import sweep_section, write_csv


def write_report(experiment: str | Path, out: str | Path | None = None) -> Path:
    """Write the report of the experiment folder ``experiment`` into ``out`` (default: the same folder)."""
    folder = Path(experiment)
    out = Path(out) if out else folder
    found = read_record(folder)
    trials = read_trials(folder)
    teacher = read_json(folder / "teacher.json", "teacher figures") if (folder / "teacher.json").is_file() else None
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"kind": found.kind, "experiment": str(folder), "pair": found.space["pair_name"], "trials": len(trials)}
    lines = [f"# {found.kind.title()} report: {folder.name}", "",
             f"Pair: `{found.space['pair_name']}`; {len(trials)} trials; {found.budget} epochs per trial; "
             f"git {found.record.get('git_commit')}.", ""]
    if found.kind == "sweep":
        lines += [f"Method: `{found.space['method']}`.", ""]
    lines += [note for reading in reading_notes(found.methods) for note in (reading, "")]
    section = (ablation_section if found.kind == "ablation" else sweep_section)(found, trials, teacher, report, out)
    pair = pair_comparison(folder, found.space, teacher, section.baseline_AP, section.best_distilled_AP, section.split)
    report["pair"] = pair
    lines += section.lines + pair_lines(pair, section.split, section.baseline_AP, section.best_distilled_AP)
    lines += ["", *[f"![{p}]({p})" for p in section.plots]]
    atomic_write(out / "report.md", lambda handle: handle.write("\n".join(lines) + "\n"))
    atomic_write_json(out / "report.json", report)
    write_csv(out / "report.csv", _table_records(report))
    _log_to_wandb(found.record, report, out, section.plots)
    return out / "report.md"


def _table_records(report: dict) -> list[dict]:
    """The report's table as flat records: an ablation's rows, or a sweep's leaderboard."""
    if report["kind"] != "ablation":
        return report["leaderboard"]
    records = []
    for e in report["table"]:
        record = {"row": e["row"], "method": e["method"], "split": e["split"], "n": e["AP"]["n"],
                  **{f"{f}_mean": e[f]["mean"] for f in COCO_FIGURES}, **{f"{f}_std": e[f]["std"] for f in COCO_FIGURES},
                  "AP_ci95": e["AP"]["ci95"], "val_AP_mean": e["val_AP"]["mean"]}
        for name in ("delta_AP", "delta_best_baseline"):
            for key, suffix in (("mean", ""), ("ci95", "_ci95"), ("n", "_n"), ("p", "_p"), ("p_holm", "_p_holm")):
                record[f"{name}{suffix}"] = (e[name] or {}).get(key)
        records.append({**record, "failed": e["failed"]})
    return records


def _log_to_wandb(record: dict, report: dict, out: Path, plots: list[str]) -> None:
    mode = os.environ.get("WANDB_MODE") or record.get("plan", {}).get("wandb", "off")
    if mode in ("off", "disabled"):
        return
    space = record["space"]
    run = wandb.init(project=space["wandb"]["project"], entity=space["wandb"].get("entity"), group=space["pair_name"],
                     job_type="report", name=f"{Path(report['experiment']).name}-report", mode=mode,
                     dir=str(out), tags=[report["kind"], "report"], reinit="finish_previous",
                     settings=wandb.Settings(silent=True))
    try:
        records = _table_records(report)
        columns = list(records[0]) if records else ["trial_id"]
        run.log({"report/table": wandb.Table(columns=columns, data=[list(r.values()) for r in records]),
                 **{f"report/{Path(p).stem}": wandb.Image(str(out / p)) for p in plots}})
    finally:
        run.finish()
