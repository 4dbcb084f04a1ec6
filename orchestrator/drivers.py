"""The two jobs, side by side: a sweep (:func:`run_sweep`: Optuna proposes, ASHA stops, one study) and an
ablation (:func:`run_ablation`: each row tuned alike on its own study at a tuning seed, then every row x
every reported seed). Both open an :class:`~orchestrator.experiment.Experiment` (Ray, the teacher, the
reference rows), run Tuners from :func:`~orchestrator.tuning.make_tuner`, and end with the report (on a
local storage; a cloud storage keeps only what Tune wrote, so rerun ``python -m orchestrator.report`` on a
synced copy)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ray import tune

from dmkd.distillers import detector_family, published, search_space
from dmkd.errors import UserError
from dmkd.io import atomic_write_json, read_json
from dmkd.metrics import LOSS_RATIO_STEP0
from orchestrator.callbacks import wandb_callbacks
from orchestrator.experiment import Experiment, Storage, open_experiment, wait_for_ray
from orchestrator.grid import Grid, Row, row_space, rows_record, sampler_seed
from orchestrator.report.publish import write_report
from orchestrator.report.records import StoredTrial, from_result, read_trials, reference_ap, trial_folder
from orchestrator.report.search import study_origins, sweep_search, tuning_compute
from orchestrator.report.sweep import LeaderboardRow, leaderboard, leaderboard_text, write_results
from orchestrator.space import SweepSpace, describe, paper_default_point
from orchestrator.trial import TrialSetup, run_trial
from orchestrator.tuning import (
    build_scheduler,
    build_searcher,
    check_finished,
    fit_tuner,
    make_tuner,
    set_aside_lost_trials,
)


def search_tuner(space: SweepSpace, *, name: str, storage: Storage, setup: TrialSetup, wandb_mode: str,
                 job_type: str, reference_file: Path | None, sampler_seed: int | None = None) -> tune.Tuner:
    """The Tuner of one study (a sweep, or an ablation row's tuning): TPE proposes, the space's scheduler
    stops. Its trials select, so they never evaluate the test split."""
    setup = setup.without_test()
    folder = storage.folder(name) if storage.local else None
    return make_tuner(tune.with_parameters(run_trial, space=space, setup=setup), space=space, storage_path=storage.uri(),
                      name=name, header=f"{job_type}: {space.method}, {space.pair_name}", columns=list(space.search),
                      searcher=lambda: build_searcher(space, study_folder=folder, study_name=name, sampler_seed=sampler_seed),
                      scheduler=build_scheduler(space), num_samples=space.num_samples,
                      callbacks=wandb_callbacks(space, folder, wandb_mode, setup=setup, job_type=job_type,
                                                reference_file=reference_file))


def _stored(result_grid, storage: Storage, name: str) -> list[StoredTrial]:
    """The trials of a finished Tuner: from their files (every epoch) on a local storage, else its results."""
    return read_trials(storage.folder(name)) if storage.local else [from_result(result) for result in result_grid]


def run_sweep(space: SweepSpace, *, name: str, storage: Storage, wandb_mode: str, address: str | None, resume: bool,
              record: dict) -> dict:
    """The sweep; its result says whether every trial finished (``completed``) or Ctrl-C stopped it first
    (``interrupted``: Tune returns normally then, after saving what it has)."""
    if resume and not tune.Tuner.can_restore(storage.uri(name)):
        raise UserError(f"--resume: no sweep to continue at {storage.uri(name)}")
    distills = space.method != "none"
    with open_experiment(space, name=name, storage=storage, wandb_mode=wandb_mode, address=address, distills=distills,
                         reference_seeds=[space.seed] if distills and space.reference else []) as opened:
        folder = opened.folder if opened.local else None
        tuner = search_tuner(space, name=name, storage=storage, setup=opened.setup, wandb_mode=wandb_mode,
                             job_type="sweep", reference_file=folder / "reference.json" if folder else None)
        if folder:
            atomic_write_json(folder / "sweep.json", {**record, "teacher_checkpoint": opened.teacher,
                                                      "data": opened.paths.as_dict()})
        result_grid, interrupted = fit_tuner(tuner)
    set_aside_lost_trials(result_grid, folder, name)
    rows = leaderboard(_stored(result_grid, storage, name), describe(space), reference_ap(folder) if folder else None)
    print("\n" + leaderboard_text(rows))
    if folder:
        _finish_sweep(rows, folder, space, wandb_mode, interrupted)
    if interrupted:
        print("sweep: interrupted before every trial finished; rerun the same command to continue", flush=True)
    finished = [r for r in rows if r.status in ("completed", "stopped early")]
    wait_for_ray()  # stopping beside the report (experiment.stop_ray)
    return {"rows": rows, "interrupted": interrupted,
            "completed": not interrupted and len(finished) == len(rows) == space.num_samples}


def _finish_sweep(rows: list[LeaderboardRow], folder: Path, space: SweepSpace, wandb_mode: str, interrupted: bool) -> None:
    """results.csv, best.json, how the search went (into sweep.json), the report, and where W&B's runs are."""
    best = write_results(rows, folder, space, interrupted=interrupted)
    if best is not None:
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.params.items() if v is not None)
        print(f"\n{'best so far' if interrupted else 'best'}: {trial_folder(best.trial_id)}  {space.objective.metric}={best.figures[space.objective.metric]:.4f}  {params}")
        print(f"results: {folder / 'results.csv'}, {folder / 'best.json'}")
    search = sweep_search(folder, describe(space))
    atomic_write_json(folder / "sweep.json", {**read_json(folder / "sweep.json", "sweep record"), "search": search})
    print(f"search: {search['label']}")
    print(f"report: {write_report(folder)}")
    if wandb_mode == "offline":
        print(f"wandb: offline runs under {folder / 'wandb'}; upload them with `wandb sync {folder / 'wandb'}/offline-run-*`")


def first_point_source(space: SweepSpace, row: Row) -> str:
    """Where a tuning run's first point comes from: the row's own values, the published configs it cites,
    or this project's defaults."""
    family = detector_family(space.pair.student.arch)
    sources = [setting.source for setting in published(space.method, family).values()]
    source = "; ".join(sources) if sources else f"this project's default (no published setting for {family})"
    own = [name for name in space.search if name in row.params]
    return f"the row's own {', '.join(own)}; the rest: {source}" if own else source


def tuning_record(trials: list[StoredTrial], origins: dict, space: SweepSpace) -> dict:
    """What a row's tuning study says of itself: where its points came from, the compute it cost, and the
    distillation loss against the detector's at step 0 (its first point, and the lowest of its trials)."""
    first = json.dumps(paper_default_point(space), sort_keys=True)
    ratios = {json.dumps(t.config, sort_keys=True): t.history[0].get(LOSS_RATIO_STEP0) for t in trials if t.history}
    known = [r for r in ratios.values() if r is not None]
    return {"origins": origins, "compute": tuning_compute(trials, space.resources),
            "first_point_ratio_step0": ratios.get(first), "lowest_ratio_step0": min(known) if known else None}


def tune_row(grid: Grid, row_name: str, row: Row, setup: TrialSetup, *, storage: Storage, wandb_mode: str,
             reference_file: Path | None) -> tuple[Row, dict]:
    """One row's own study (``STORAGE/NAME/tune/ROW``); returns the row at its chosen parameters and the
    record of what the tuning searched, ran, cost and chose."""
    space, seed = row_space(grid, row), sampler_seed(grid.space.seed, row_name)
    print(f"tune: {row_name} ({row.method}): {space.num_samples} trials x {space.budget.epochs} epochs at seed "
          f"{space.seed}, searching {', '.join(space.search)} (TPE, {space.startup_trials} random start-up)", flush=True)
    tuner = search_tuner(space, name=row_name, storage=storage, setup=setup.stored_in(storage.uri(row_name, "train")),
                         wandb_mode=wandb_mode, job_type="tune", reference_file=reference_file, sampler_seed=seed)
    result_grid, interrupted = fit_tuner(tuner)
    set_aside_lost_trials(result_grid, storage.folder(row_name) if storage.local else None, row_name)
    check_finished(interrupted, f"tuning of row {row_name}")
    trials = _stored(result_grid, storage, row_name)
    rows = leaderboard(trials, describe(space))
    best = write_results(rows, storage.folder(row_name), space) if storage.local else \
        next((r for r in rows if r.figures.get(space.objective.metric) is not None and r.status != "failed"), None)
    chosen = {k: v for k, v in (best.params if best else {}).items() if v is not None}
    origins = study_origins(storage.folder(row_name), row_name) if storage.local else {}
    record = {"trials": len(rows), "epochs": space.budget.epochs, "scheduler": space.scheduler.type,
              "searched": {k: dataclasses.asdict(v) for k, v in space.search.items()},
              "first_point": paper_default_point(space), "first_point_source": first_point_source(space, row),
              "chosen": chosen, "val_AP": best.figures.get(space.objective.metric) if best else None,
              "finished": sum(r.status != "failed" for r in rows), "seed": space.seed, "sampler_seed": seed,
              "startup_trials": space.startup_trials, **tuning_record(trials, origins, space)}
    return dataclasses.replace(row, params={**row.params, **chosen}), record


def tune_rows(grid: Grid, opened: Experiment, *, wandb_mode: str) -> tuple[dict[str, Row], dict]:
    """Tune every row with searchable parameters, one study each; returns the rows at their chosen
    parameters, and each row's tuning record."""
    if grid.tune.trials == 0:
        return grid.rows, {}
    storage = Storage(opened.storage.uri(opened.name, "tune"))
    reference_file = opened.folder / "reference.json" if opened.local else None
    rows, tuning = {}, {}
    for row_name, row in grid.rows.items():
        if search_space(row.method) and row.tune:
            rows[row_name], tuning[row_name] = tune_row(grid, row_name, row, opened.setup, storage=storage,
                                                        wandb_mode=wandb_mode, reference_file=reference_file)
        else:
            note = "nothing to tune" if not search_space(row.method) else "not tuned (tune: false)"
            rows[row_name], tuning[row_name] = row, {"trials": 0, "epochs": 0, "searched": {}, "chosen": {}, "note": note}
    return rows, tuning


def ablation_tuner(grid: Grid, distilled: dict[str, Row], opened: Experiment, *, wandb_mode: str) -> tune.Tuner:
    """The Tuner of the grid's runs: every distilled row x every reported seed, at the row's (tuned) parameters."""
    space = grid.space
    folder = opened.folder if opened.local else None
    return make_tuner(tune.with_parameters(run_trial, space=space, setup=opened.setup, rows=distilled), space=space,
                      storage_path=opened.storage.uri(), name=opened.name,
                      header=f"ablation: {opened.name}, {space.pair_name}", columns=["row", "seed"],
                      param_space={"row": tune.grid_search(list(distilled)), "seed": tune.grid_search(grid.seeds)},
                      callbacks=wandb_callbacks(space, folder, wandb_mode, setup=opened.setup, job_type="ablation",
                                                reference_file=folder / "reference.json" if folder else None,
                                                rows=distilled))


def run_ablation(grid: Grid, *, name: str, storage: Storage, wandb_mode: str, address: str | None, record: dict) -> dict:
    """The ablation: references, each row's tuning, then every row x seed; returns the trial and failure counts."""
    distills = any(row.method != "none" for row in grid.rows.values())
    with open_experiment(grid.space, name=name, storage=storage, wandb_mode=wandb_mode, address=address,
                         distills=distills, reference_seeds=grid.seeds) as opened:
        record = {**record, "teacher_checkpoint": opened.teacher, "data": opened.paths.as_dict()}
        if opened.local:  # before tuning too: a continued ablation is checked against its settings from here on
            atomic_write_json(opened.folder / "ablation.json", record)
        rows, tuning = tune_rows(grid, opened, wandb_mode=wandb_mode)
        distilled = {row_name: row for row_name, row in rows.items() if row.method != "none"}
        if opened.local:
            atomic_write_json(opened.folder / "ablation.json", {**record, "rows": rows_record(rows), "tuning": tuning})
        failed, trials = 0, 0
        if distilled:
            result_grid, interrupted = fit_tuner(ablation_tuner(grid, distilled, opened, wandb_mode=wandb_mode))
            set_aside_lost_trials(result_grid, opened.folder if opened.local else None)
            check_finished(interrupted, "the ablation")
            failed, trials = sum(1 for result in result_grid if result.error is not None), len(result_grid)
    if storage.local:
        print(f"report: {write_report(storage.folder(name))}")
    else:
        print(f"ablation: results in {storage.uri(name)}; sync it and run `python -m orchestrator.report` on the copy")
    wait_for_ray()  # stopping beside the report (experiment.stop_ray)
    return {"trials": trials, "failed": failed}
