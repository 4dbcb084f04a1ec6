"""Ablation runs: every row of a grid (a method and its switches) times every seed, through the same
trial machinery as the sweep (Ray Tune grid search; no early stopping), beside the teacher and the
undistilled student (the reference row, trained once per seed and cached).

    python -m orchestrator.ablate                                  # search_spaces/ablation.yaml, 3 seeds
    python -m orchestrator.ablate --tune 8                         # first tune every row: 8 Optuna trials each
    python -m orchestrator.ablate --seeds 3 --from-sweep experiments/default

With ``--tune N`` (or a ``tune:`` block in the grid) every row with searchable parameters first gets
its own Optuna search over its method's own parameters (N trials, the same epochs, its detector
family's published setting first, selected on the validation split); the seeds then run at each row's
best. Tuning trains at its own seed (the grid's seed + 1000 unless ``tune.seed`` says otherwise), which
is never one of the reported seeds, and never evaluates the test split: a reported figure is never the
run that won the selection. Each row's sampler has its own seed (from the grid's seed and the row's
name), so rows do not share their random points.

Re-running with the same --name continues an interrupted ablation. The report
(``python -m orchestrator.report``) is written at the end.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import zlib
from pathlib import Path

from dmkd.config import from_dict
from dmkd.distillers import check_method, detector_family, method_parameters, published, search_space
from dmkd.errors import UserError, run_command
from dmkd.io import atomic_write_json, read_json
from dmkd.provenance import provenance
from dmkd.cli import parse_assignment
from orchestrator.rows import REFERENCE_ROW, Row, TrialSetup, rows_record
from orchestrator.space import (DEFAULT_SPACE, SCHEDULERS, TRAIN_KEYS, Objective, Param, Searcher, check_pair,
                                check_values, describe, load_space, paper_default_point, read_yaml)
from orchestrator.sweep import WANDB_MODES, check_name, resolve_storage, resolve_wandb_mode

DEFAULT_GRID = DEFAULT_SPACE.parent / "ablation.yaml"


TUNING_SEED_OFFSET = 1000  # the default tuning seed is the grid's seed + this: far from the reported ones
DEFAULT_SEEDS = 5


@dataclasses.dataclass(frozen=True)
class TuneBlock:
    """The grid's ``tune:`` block: every row with searchable parameters gets its own Optuna search
    (``trials`` trials of ``epochs`` epochs, selected on the validation split) before its seeds run."""

    trials: int = 0  # 0: no tuning, the rows' parameters as written
    epochs: int | None = None  # default: the base space's budget.epochs
    scheduler: str = "none"  # none: every tuning trial runs all its epochs; asha: stops weak ones
    trials_per_param: int | None = None  # a row with k searched parameters gets max(trials, k x this)
    startup_trials: int | None = None  # TPE's random start-up per row; default a third of its trials, >= 2
    seed: int | None = None  # the training seed of every tuning trial; default the grid's seed + 1000

    def trials_for(self, searched: int) -> int:
        """The tuning budget of a row that searches ``searched`` parameters."""
        return max(self.trials, (self.trials_per_param or 0) * searched) if self.trials else 0


@dataclasses.dataclass(frozen=True)
class Grid:
    name: str
    space: object  # the base SweepSpace (pair, data, fixed, budget, resources, wandb)
    rows: dict  # row name -> {"method": str, "params": dict}; "none" (the reference) is always there
    seeds: list
    tune: TuneBlock = TuneBlock()


def _rows(data: dict, space, path: Path) -> dict:
    rows = data.get("rows")
    if not isinstance(rows, dict) or not rows:
        raise UserError(f"{path}: rows: must map row names to {{method: ..., params: {{...}}}}")
    checked = {}
    for name, row in rows.items():
        where = f"rows.{name}"
        if not isinstance(row, dict) or "method" not in row:
            raise UserError(f"{path}: {where}: needs a 'method'")
        if set(row) - {"method", "params", "tune"}:
            raise UserError(f"{path}: {where}: unknown key {sorted(set(row) - {'method', 'params', 'tune'})[0]!r}; "
                            f"allowed: method, params, tune")
        if not isinstance(row.get("tune", True), bool):
            raise UserError(f"{path}: {where}.tune: must be true or false, but got {row['tune']!r}")
        try:
            check_method(row["method"], f"{where}.method")
        except UserError as error:
            raise UserError(f"{path}: {error}") from None
        params = row.get("params") or {}
        if not isinstance(params, dict):
            raise UserError(f"{path}: {where}.params: must map parameter names to values, but got {params!r}")
        accepted = method_parameters(row["method"])
        for key in params:
            if key in TRAIN_KEYS:
                raise UserError(f"{path}: {where}.params.{key}: a training setting, not a parameter of the method: "
                                f"set it for every row under 'set:' (fixed.{key}), so that all rows train alike")
            if key not in accepted:
                raise UserError(f"{path}: {where}.params.{key}: not a parameter of method {row['method']!r}; "
                                f"allowed: {', '.join(accepted) or 'none'}")
        check_values(space, row["method"], params, path, f"{where}.params")
        checked[str(name)] = Row(row["method"], dict(params), row.get("tune", True))
    references = [name for name, row in checked.items() if row.method == "none"]
    if len(references) > 1:
        raise UserError(f"{path}: rows.{references[1]}: only one row may use method 'none' (the reference row)")
    reference = {references[0] if references else "none": REFERENCE_ROW}
    return {**reference, **{name: row for name, row in checked.items() if row.method != "none"}}


def _tune_block(data, path: Path, trials: int | None, space) -> TuneBlock:
    try:
        block = from_dict(TuneBlock, data or {}, where="tune")
    except UserError as error:
        raise UserError(f"{path}: {error}") from None
    if trials is not None:
        block = dataclasses.replace(block, trials=trials)
    if block.trials < 0:
        raise UserError(f"{path}: tune.trials: must be 0 (no tuning) or more, but got {block.trials}")
    for key in ("trials_per_param", "startup_trials"):
        if getattr(block, key) is not None and getattr(block, key) < 1:
            raise UserError(f"{path}: tune.{key}: must be at least 1, but got {getattr(block, key)}")
    if block.epochs is not None and block.epochs < 1:
        raise UserError(f"{path}: tune.epochs: must be at least 1, but got {block.epochs}")
    if block.scheduler not in SCHEDULERS:
        raise UserError(f"{path}: tune.scheduler: must be one of {', '.join(SCHEDULERS)}, but got {block.scheduler!r}")
    epochs = block.epochs or space.budget.epochs
    if block.scheduler == "asha" and epochs <= space.scheduler.grace_period:
        raise UserError(f"{path}: tune.scheduler: asha needs more than {space.scheduler.grace_period} epochs, but tune.epochs is {epochs}")
    seed = block.seed if block.seed is not None else space.seed + TUNING_SEED_OFFSET
    return dataclasses.replace(block, epochs=epochs, seed=seed)


def load_grid(path: str | Path | None = None, *, seeds: int | None = None, from_sweep: str | None = None,
              overrides: list = (), tune_trials: int | None = None) -> Grid:
    path = Path(path) if path else DEFAULT_GRID
    data = read_yaml(path, "ablation grid")
    allowed = {"name", "base", "set", "seeds", "rows", "tune"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise UserError(f"{path}: unknown key {unknown[0]!r}; allowed keys: {', '.join(sorted(allowed))}")
    base = path.parent / str(data.get("base", "default.yaml"))
    sets = data.get("set") or {}
    if not isinstance(sets, dict):
        raise UserError(f"{path}: set: must map dotted keys to values")
    # rows run every epoch (no early stopping): a table compares finished trials only
    space_overrides = [*sets.items(), *overrides, ("scheduler.type", "none"), ("search", {})]
    space = load_space(base, space_overrides)
    if from_sweep:
        best_file = Path(from_sweep) / "best.json"
        if not best_file.is_file():
            raise UserError(f"--from-sweep: {best_file}: not found (has that sweep finished?)")
        best = read_json(best_file, "best.json")
        if not (isinstance(best, dict) and all(isinstance(best.get(k, {}), dict) for k in ("train", "distill"))):
            raise UserError(f"{Path(from_sweep) / 'best.json'}: not a sweep's best.json (no 'train' and 'distill' mappings)")
        fixed = {**space.fixed, **best.get("train", {}), **best.get("distill", {})}
        space = dataclasses.replace(space, fixed=fixed)
    rows = _rows(data, space, path)
    tune = _tune_block(data.get("tune"), path, tune_trials, space)
    count = seeds if seeds is not None else data.get("seeds", DEFAULT_SEEDS)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise UserError(f"{path}: seeds: must be a positive integer, but got {count!r}")
    reported = [space.seed + i for i in range(count)]
    if tune.trials and tune.seed in reported:
        raise UserError(f"{path}: tune.seed: {tune.seed} is one of the reported seeds {reported[0]}..{reported[-1]}; "
                        f"a tuning run must not be reported (its selection would bias the table): choose another")
    needs_teacher = any(row.method != "none" for row in rows.values())
    if needs_teacher and not (space.pair.teacher_checkpoint or space.pair.train_teacher):
        raise UserError(f"{base}: pair.teacher_checkpoint: set a checkpoint path, or train_teacher: true")
    if needs_teacher and space.method == "none":  # load_space checked the pair already for a distilling base
        check_pair(space, base)
    return Grid(name=str(data.get("name", "ablation")), space=space, rows=rows, seeds=reported, tune=tune)


def sampler_seed(grid_seed: int, row_name: str) -> int:
    """A row's own sampler seed: rows of one grid draw different random points, reproducibly."""
    return zlib.crc32(f"{grid_seed}:{row_name}".encode())


def row_space(grid: Grid, row: Row):
    """The sweep that tunes one row: the method's declared search space (``SEARCH_SPACES``), the row's
    own parameters as fixed values and first point, the grid's tuning budget and tuning seed, selected
    on val/AP."""
    space = grid.space
    search = {name: from_dict(Param, spec, where=f"search.{name}") for name, spec in search_space(row.method).items()}
    return dataclasses.replace(
        space, method=row.method, fixed={**space.fixed, **row.params}, search=search, seed=grid.tune.seed,
        num_samples=grid.tune.trials_for(len(search)), budget=dataclasses.replace(space.budget, epochs=grid.tune.epochs),
        scheduler=dataclasses.replace(space.scheduler, type=grid.tune.scheduler), objective=Objective(),
        searcher=Searcher(grid.tune.startup_trials))


def tune_rows(grid: Grid, setup: TrialSetup, *, storage: str, name: str, wandb_mode: str) -> tuple[dict, dict]:
    """Tune every row with searchable parameters, one Optuna study each; returns the rows with their
    chosen parameters, and what each tuning run searched, ran, cost and chose."""
    from orchestrator.results import trial_rows, write_results
    from orchestrator.runner import build_tuner, check_finished

    if grid.tune.trials == 0:
        return grid.rows, {}
    rows, tuning = {}, {}
    folder = f"{storage.rstrip('/')}/{name}/tune"
    for row_name, row in grid.rows.items():
        if not (search_space(row.method) and row.tune):
            note = "nothing to tune" if not search_space(row.method) else "not tuned (tune: false)"
            rows[row_name], tuning[row_name] = row, {"trials": 0, "epochs": 0, "searched": {}, "chosen": {}, "note": note}
            continue
        space = row_space(grid, row)
        seed = sampler_seed(grid.space.seed, row_name)
        print(f"tune: {row_name} ({row.method}): {space.num_samples} trials x {space.budget.epochs} epochs at seed "
              f"{space.seed}, searching {', '.join(space.search)} (TPE, {space.startup_trials} random start-up)", flush=True)
        row_setup = setup.stored_in(f"{folder}/{row_name}/train")
        result_grid = build_tuner(space, row_name, folder, row_setup, wandb_mode, job_type="tune",
                                  reference_file=Path(storage) / name / "reference.json", sampler_seed=seed).fit()
        check_finished(result_grid, f"tuning of row {row_name}")
        results = trial_rows(result_grid, space)
        best = write_results(results, Path(folder) / row_name, space)
        chosen = {k.split("/", 1)[1]: v for k, v in (best or {}).items() if k.startswith("param/") and v is not None}
        rows[row_name] = dataclasses.replace(row, params={**row.params, **chosen})
        tuning[row_name] = {"trials": len(results), "epochs": space.budget.epochs, "scheduler": space.scheduler.type,
                            "searched": {k: dataclasses.asdict(v) for k, v in space.search.items()},
                            "first_point": paper_default_point(space), "first_point_source": first_point_source(space, row),
                            "chosen": chosen, "val_AP": best[space.objective.metric] if best else None,
                            "finished": sum(r["status"] != "failed" for r in results), "seed": space.seed,
                            "sampler_seed": seed, "startup_trials": space.startup_trials,
                            **tuning_record(Path(folder) / row_name, row_name, space)}
    return rows, tuning


def first_point_source(space, row: Row) -> str:
    """Where a tuning run's first point comes from: the row's own values, the published configs it cites,
    or this project's defaults."""
    family = detector_family(space.pair.student.arch)
    sources = [setting.source for setting in published(space.method, family).values()]
    source = "; ".join(sources) if sources else f"this project's default (no published setting for {family})"
    own = [name for name in space.search if name in row.params]
    return f"the row's own {', '.join(own)}; the rest: {source}" if own else source


def tuning_record(folder: Path, study_name: str, space) -> dict:
    """What a row's tuning study says of itself: where its points came from, the compute it cost, and the
    distillation loss against the detector's at step 0 (its first point, and the lowest of its trials)."""
    import optuna

    from orchestrator.report import origin_counts, read_trials, tuning_compute

    study = optuna.load_study(study_name=study_name, storage=f"sqlite:///{folder / 'optuna.db'}")
    trials = read_trials(folder)
    first = paper_default_point(space)
    ratios = {json.dumps(t["config"], sort_keys=True): t["history"][0].get("loss_ratio/step0")
              for t in trials if t["history"]}
    known = [r for r in ratios.values() if r is not None]
    return {"origins": origin_counts(study.trials), "compute": tuning_compute(trials, space.resources),
            "first_point_ratio_step0": ratios.get(json.dumps(first, sort_keys=True)),
            "lowest_ratio_step0": min(known) if known else None}


def ablation_tuner(grid: Grid, distilled: dict[str, Row], setup: TrialSetup, *, name: str, storage: str, wandb_mode: str):
    """The Tuner of the grid's runs: every distilled row x every seed, at the row's (tuned) parameters."""
    from ray import tune

    from orchestrator import runner
    from orchestrator.trial import run_trial, trial_dirname

    space, experiment = grid.space, Path(storage) / name
    trainable = tune.with_parameters(run_trial, space=space, setup=setup, rows=distilled)
    path = f"{storage.rstrip('/')}/{name}"
    if tune.Tuner.can_restore(path):
        print(f"ablation: continuing {path}", flush=True)
        return tune.Tuner.restore(path, trainable=trainable, resume_errored=True, resume_unfinished=True)
    return tune.Tuner(
        trainable,
        param_space={"row": tune.grid_search(list(distilled)), "seed": tune.grid_search(grid.seeds)},
        tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=space.max_concurrent,
                                    trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(name=name, storage_path=storage,
                                  callbacks=runner.tune_callbacks(*runner.wandb_callback(
                                      space, experiment, wandb_mode, setup=setup, job_type="ablation",
                                      reference_file=experiment / "reference.json", rows=distilled)),
                                  progress_reporter=runner.StatusTable(
                                      f"ablation: {name}, {space.pair_name}", space.objective, ["row", "seed"]),
                                  failure_config=tune.FailureConfig(max_failures=0), verbose=1))


def run_ablation(grid: Grid, *, name: str, storage: str, wandb_mode: str, address: str | None, record: dict) -> dict:
    from orchestrator import runner
    from orchestrator.experiment import open_experiment
    from orchestrator.report import write_report

    space = grid.space
    experiment = Path(storage) / name
    distills = any(row.method != "none" for row in grid.rows.values())
    with open_experiment(space, name=name, storage=storage, wandb_mode=wandb_mode, address=address, distills=distills,
                         reference_seeds=grid.seeds) as opened:
        rows, tuning = tune_rows(grid, opened.setup, storage=storage, name=name, wandb_mode=wandb_mode)
        distilled = {row_name: row for row_name, row in rows.items() if row.method != "none"}
        atomic_write_json(experiment / "ablation.json", {**record, "rows": rows_record(rows), "tuning": tuning,
                                                         "teacher_checkpoint": opened.teacher, "data": opened.paths})
        failed, trials = 0, 0
        if distilled:
            result_grid = ablation_tuner(grid, distilled, opened.setup, name=name, storage=storage,
                                         wandb_mode=wandb_mode).fit()
            runner.check_finished(result_grid, "the ablation")
            failed, trials = sum(1 for result in result_grid if result.error is not None), len(result_grid)
    report = write_report(experiment)
    print(f"report: {report}")
    return {"trials": trials, "failed": failed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.ablate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", help="ablation grid YAML (default: search_spaces/ablation.yaml)")
    parser.add_argument("--seeds", type=int, help="seeds per row (default: the grid's)")
    parser.add_argument("--tune", type=int, metavar="N", help="tune every row first with N Optuna trials (default: "
                                                              "the grid's tune.trials; 0: no tuning)")
    parser.add_argument("--name", help="experiment name (default: the grid's name)")
    parser.add_argument("--storage", default="experiments")
    parser.add_argument("--from-sweep", help="a finished sweep's folder: its best parameters become the base")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key of the base space")
    parser.add_argument("--wandb", choices=WANDB_MODES)
    parser.add_argument("--address", help="Ray address to join (e.g. auto); default: start a local Ray")
    parser.add_argument("--dry-run", action="store_true", help="validate the grid and print the plan; no Ray")
    args = parser.parse_args(argv)

    def run() -> int:
        overrides = [parse_assignment(item, "--set") for item in args.set]
        grid = load_grid(args.grid, seeds=args.seeds, from_sweep=args.from_sweep, overrides=overrides,
                         tune_trials=args.tune)
        name = check_name(args.name or grid.name)
        storage = resolve_storage(args.storage)
        wandb_mode = resolve_wandb_mode(args.wandb)
        tuned = {row_name: grid.tune.trials_for(len(search_space(row.method))) for row_name, row in grid.rows.items()
                 if grid.tune.trials and search_space(row.method) and row.tune}
        plan = {"name": name, "experiment": f"{storage.rstrip('/')}/{name}", "pair": grid.space.pair_name,
                "rows": rows_record(grid.rows), "seeds": grid.seeds, "trials": len(grid.rows) * len(grid.seeds),
                "epochs_per_trial": grid.space.budget.epochs, "tune": dataclasses.asdict(grid.tune),
                "tuning_trials": tuned, "tuning_seed": grid.tune.seed if tuned else None, "wandb": wandb_mode}
        if args.dry_run:
            print(json.dumps(plan, indent=2))
            return 0
        summary = run_ablation(grid, name=name, storage=storage, wandb_mode=wandb_mode, address=args.address,
                               record={"plan": plan, "space": describe(grid.space), "rows": rows_record(grid.rows),
                                       "seeds": grid.seeds, **provenance()})
        return 0 if summary["failed"] == 0 else 1

    return run_command(run, interrupted="rerun the same command to continue")


if __name__ == "__main__":
    sys.exit(main())
