"""An ablation's table: each row's figures on the reporting split over seeds, Δ AP paired by seed against
the undistilled student and against the best baseline with Holm's correction over the table, the
pairing check, each row's distillation loss against the detector's, and its tuning."""
from __future__ import annotations

from pathlib import Path

from dmkd.distillers import is_baseline
from dmkd.metrics import COCO_FIGURES, DATA_ORDER, LOSS_RATIO, LOSS_RATIO_STEP0, STUDENT_INIT, TEST_AP, VAL_AP, split_metric
from orchestrator.report import text
from orchestrator.report.plots import plot_epochs
from orchestrator.report.records import ExperimentRecord, StoredTrial, reference_trials
from orchestrator.report.search import tuning_markdown
from orchestrator.report.stats import SIGNIFICANCE, correct_family, paired_difference, summarize
from orchestrator.report.text import Section


def reporting_split(trials: list[StoredTrial]) -> str:
    """``test`` when the trials evaluated a held-out test split, else ``val``."""
    return "test" if any(TEST_AP in t.last for t in trials) else "val"


def _row_entry(row_name: str, row: dict, members: list[StoredTrial], split: str, budget: int, tuning: dict) -> dict:
    """One row of the table: per-seed figures on ``split`` and their summaries, from its finished trials."""
    finals: dict[int, dict] = {}
    for trial in members:
        final = trial.final(budget) if not trial.failed(budget) else None
        if final is not None:
            finals[trial.config["seed"]] = final
    failed = [t for t in members if t.failed(budget)]
    firsts = [t.history[0] for t in members if not t.failed(budget) and t.history]
    entry = {"row": row_name, "method": row["method"], "params": row.get("params", {}), "split": split,
             "seeds": sorted(finals), "failed": len(failed), "tuning": tuning.get(row_name),
             "failures": [f"seed {t.config.get('seed')}: {t.error}" for t in failed],
             "per_seed": {seed: final.get(split_metric(split, "AP")) for seed, final in sorted(finals.items())},
             "val_AP": summarize([f[VAL_AP] for f in finals.values() if VAL_AP in f]),
             "loss_ratio_step0": summarize([f[LOSS_RATIO_STEP0] for f in firsts if LOSS_RATIO_STEP0 in f]),
             "loss_ratio_epoch1": summarize([f[LOSS_RATIO] for f in firsts if LOSS_RATIO in f]),
             "student_init": sorted({f[STUDENT_INIT] for f in finals.values() if STUDENT_INIT in f})}
    for name in COCO_FIGURES:
        metric = split_metric(split, name)
        entry[name] = summarize([f[metric] for f in finals.values() if metric in f])
    return entry


def ablation_table(trials: list[StoredTrial], rows: dict, budget: int, tuning: dict | None = None) -> list[dict]:
    """One entry per row: figures on the reporting split per seed and summarised, the validation AP,
    and Δ AP paired by seed against the reference (``none``) row and against the best baseline (the
    baseline distiller with the highest mean validation AP), corrected by Holm over the table."""
    split = reporting_split(trials)
    table = [_row_entry(name, row, [t for t in trials if t.config.get("row") == name], split, budget, tuning or {})
             for name, row in rows.items()]
    reference = next((e for e in table if e["method"] == "none"), None)
    baselines = [e for e in table if is_baseline(e["method"]) and e["val_AP"]["mean"] is not None]
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


def pairing_check(trials: list[StoredTrial]) -> str:
    """One line: whether every row of a seed started from the same student weights and data order."""
    by_seed: dict = {}
    for t in trials:
        if t.history and STUDENT_INIT in t.history[0]:
            first = t.history[0]
            by_seed.setdefault(t.config.get("seed"), set()).add((first[STUDENT_INIT], first.get(DATA_ORDER)))
    if not by_seed:
        return "Pairing: not recorded by these trials."
    broken = sorted(seed for seed, found in by_seed.items() if len(found) > 1)
    if broken:
        return (f"Pairing: **broken** for seed(s) {broken}: rows of one seed started from different student weights "
                f"or data orders, so the paired differences below are not paired.")
    return (f"Pairing: every row of a seed started from the same student weights and saw the same data order "
            f"(checked for seeds {sorted(by_seed)}).")


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
    lines += [f"Reported seeds: {text.seed_range(seeds)}." + (f" Tuning trained at seed {tuning_seed}, which is never "
              f"reported (a reported run is never the one its selection picked), and never evaluated the test split."
              if tuning_seed is not None else ""), "",
              f"Δ AP is the difference to the row named, paired by seed over the n seeds both rows have: mean ± 95 % "
              f"CI half-width (Student t), the two-sided p-value of a paired t-test, and that p-value adjusted by "
              f"Holm's method over all {family} comparisons this table makes (against `none` and against the best "
              f"baseline); n.s. marks an adjusted p >= {SIGNIFICANCE}. Not significant means no evidence of a "
              f"difference at this number of seeds, not evidence of none. "
              f"Best baseline (highest val AP among the baselines, every distiller but our reading of DMKD): "
              f"{best or '-'}.", "", pairing, "",
              f"| row | method | {split} AP | 95 % CI | Δ AP vs none | Δ AP vs best baseline | val AP | AP50 | AP75 | "
              f"APs | APm | APl | seeds | distill/detector loss, step 0 | tuning | parameters | failed |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    if teacher:
        prefix = split if f"{split}/AP" in teacher else "val"
        lines.append(f"| teacher | - | {text.num(teacher.get(f'{prefix}/AP'))} | - | - | - | {text.num(teacher.get('val/AP'))} | "
                     + " | ".join(text.num(teacher.get(f"{prefix}/{f}")) for f in COCO_FIGURES[1:]) + " | - | - | - | - | - |")
    for e in table:
        ci = f"± {e['AP']['ci95']:.3f}" if e["AP"]["ci95"] is not None else "-"
        lines.append(f"| {e['row']} | {e['method']} | {text.fmt(e['AP'])} | {ci} | {text.delta(e['delta_AP'])} | "
                     f"{text.delta(e['delta_best_baseline'])} | {text.fmt(e['val_AP'])} | "
                     + " | ".join(text.fmt(e[f]) for f in COCO_FIGURES[1:])
                     + f" | {e['AP']['n']} | {text.ratio(e['loss_ratio_step0']['mean'])} | "
                     f"{text.tuning_cell(tuning.get(e['row']))} | {text.params(e['params'])} | {e['failed']} |")
    failures = [f"- {e['row']}, {msg}" for e in table for msg in e["failures"]]
    if failures:
        lines += ["", "Failed trials:", *failures]
    return lines + tuning_markdown(tuning)


UNFINISHED_TUNING = "tuning unfinished: rerun the ablation to continue"


def recorded_tuning(record: dict) -> dict:
    """Each row's tuning record (``ablation.json``'s ``tuning``, written once every row is tuned); for an
    ablation stopped before that, the rows its plan tunes, marked unfinished (not "not tuned")."""
    if "tuning" in record:
        return record["tuning"] or {}
    planned = (record.get("plan") or {}).get("tuning_trials") or {}
    return {row: {"trials": 0, "epochs": 0, "searched": {}, "chosen": {}, "note": UNFINISHED_TUNING} for row in planned}


def ablation_section(experiment: ExperimentRecord, trials: list[StoredTrial], teacher: dict | None, report: dict,
                     out: Path) -> Section:
    """The method table with paired statistics and the per-epoch plot."""
    record = experiment.record
    rows = record["rows"]
    reference_row = next((name for name, row in rows.items() if row["method"] == "none"), None)
    trials = trials + (reference_trials(experiment.folder, reference_row) if reference_row else [])
    tuning = recorded_tuning(record)
    table = ablation_table(trials, rows, experiment.budget, tuning)
    report["table"] = table
    report["pairing"] = pairing_check(trials)
    split = reporting_split(trials)
    reference = next((e for e in table if e["method"] == "none"), None)
    chosen = best_distilled(table)
    report["best_distilled"] = chosen["row"] if chosen else None
    report["seeds"] = record.get("seeds")
    report["tuning_seed"] = (record.get("plan") or {}).get("tuning_seed")
    lines = ablation_markdown(table, teacher, split, report["pairing"], tuning,
                              seeds=report["seeds"], tuning_seed=report["tuning_seed"])
    groups = {e["row"]: [t.history for t in trials if t.config.get("row") == e["row"] and not t.failed(experiment.budget)]
              for e in table}
    plot_epochs(groups, out / "ap_per_epoch.png")
    return Section(lines, ["ap_per_epoch.png"], reference["AP"]["mean"] if reference else None,
                   chosen["AP"]["mean"] if chosen else None, split)
