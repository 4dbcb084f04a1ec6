"""Ablation runs: every row of a grid (a method and its switches) times every seed, through the same
trial machinery as the sweep (Ray Tune grid search; no Optuna, no early stopping).

    python -m orchestrator.ablate                                  # search_spaces/ablation.yaml
    python -m orchestrator.ablate --seeds 3 --from-sweep experiments/default

Re-running with the same --name continues an interrupted ablation. The report
(``python -m orchestrator.report``) is written at the end.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from dmkd.distillers import METHODS, method_parameters
from dmkd.errors import UserError, run_command
from dmkd.io import atomic_write_json
from dmkd.provenance import provenance
from dmkd.train import parse_assignment
from orchestrator.space import DEFAULT_SPACE, TRAIN_KEYS, describe, load_space, read_yaml
from orchestrator.sweep import WANDB_MODES, resolve_storage, resolve_wandb_mode

DEFAULT_GRID = DEFAULT_SPACE.parent / "ablation.yaml"


@dataclasses.dataclass(frozen=True)
class Grid:
    name: str
    space: object  # the base SweepSpace (pair, data, fixed, budget, resources, wandb)
    rows: dict  # row name -> {"method": str, "params": dict}
    seeds: list


def load_grid(path: str | Path | None = None, *, seeds: int | None = None, from_sweep: str | None = None,
              overrides: list = ()) -> Grid:
    path = Path(path) if path else DEFAULT_GRID
    data = read_yaml(path, "ablation grid")
    allowed = {"name", "base", "set", "seeds", "rows"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise UserError(f"{path}: unknown key {unknown[0]!r}; allowed keys: {', '.join(sorted(allowed))}")
    base = path.parent / str(data.get("base", "default.yaml"))
    sets = data.get("set") or {}
    if not isinstance(sets, dict):
        raise UserError(f"{path}: set: must map dotted keys to values")
    space_overrides = [*sets.items(), *overrides, ("scheduler.type", "none"), ("search", {})]
    space = load_space(base, space_overrides)
    if from_sweep:
        best_file = Path(from_sweep) / "best.json"
        if not best_file.is_file():
            raise UserError(f"--from-sweep: {best_file}: not found (has that sweep finished?)")
        best = json.loads(best_file.read_text())
        fixed = {**space.fixed, **best.get("train", {}), **best.get("distill", {})}
        space = dataclasses.replace(space, fixed=fixed)
    rows = data.get("rows")
    if not isinstance(rows, dict) or not rows:
        raise UserError(f"{path}: rows: must map row names to {{method: ..., params: {{...}}}}")
    checked = {}
    for name, row in rows.items():
        where = f"{path}: rows.{name}"
        if not isinstance(row, dict) or "method" not in row:
            raise UserError(f"{where}: needs a 'method'")
        if set(row) - {"method", "params"}:
            raise UserError(f"{where}: unknown key {sorted(set(row) - {'method', 'params'})[0]!r}; allowed: method, params")
        if row["method"] not in METHODS:
            raise UserError(f"{where}.method: unknown method {row['method']!r}; allowed: {', '.join(METHODS)}")
        params = row.get("params") or {}
        accepted = [*method_parameters(row["method"]), *TRAIN_KEYS]
        for key in params:
            if key not in accepted:
                raise UserError(f"{where}.params.{key}: not a parameter of method {row['method']!r}; "
                                f"allowed: {', '.join(accepted)}")
        checked[str(name)] = {"method": row["method"], "params": dict(params)}
    count = seeds if seeds is not None else data.get("seeds", 3)
    if not isinstance(count, int) or count < 1:
        raise UserError(f"{path}: seeds: must be a positive integer, but got {count!r}")
    needs_teacher = any(row["method"] != "none" for row in checked.values())
    if needs_teacher and not (space.pair.teacher_checkpoint or space.pair.train_teacher):
        raise UserError(f"{base}: pair.teacher_checkpoint: set a checkpoint path, or train_teacher: true")
    return Grid(name=str(data.get("name", "ablation")), space=space, rows=checked,
                seeds=[space.seed + i for i in range(count)])


def run_ablation(grid: Grid, *, name: str, storage: str, wandb_mode: str, address: str | None, record: dict) -> dict:
    from ray import tune

    from orchestrator import runner
    from orchestrator.report import write_report
    from orchestrator.teacher import ensure_teacher, evaluate_teacher
    from orchestrator.trial import run_trial

    space = grid.space
    experiment = Path(storage) / name
    env_vars = runner.wandb_env(wandb_mode, experiment, storage)
    os.environ.update(env_vars)
    paths = runner.data_paths(space)
    runner.start_ray(address, space, env_vars)
    try:
        teacher = None
        if any(row["method"] != "none" for row in grid.rows.values()):
            teacher = ensure_teacher(space, paths, runner.teacher_cache(storage))
            experiment.mkdir(parents=True, exist_ok=True)
            if not (experiment / "teacher.json").is_file():
                atomic_write_json(experiment / "teacher.json", evaluate_teacher(space, paths, teacher))
        setup = {"teacher_checkpoint": teacher, "data_paths": paths,
                 "train_storage": f"{storage.rstrip('/')}/{name}/train", "env_vars": env_vars}
        trainable = tune.with_parameters(run_trial, space=space, setup=setup, rows=grid.rows)
        path = f"{storage.rstrip('/')}/{name}"
        if tune.Tuner.can_restore(path):
            print(f"ablation: continuing {path}", flush=True)
            tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True, resume_unfinished=True)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space={"row": tune.grid_search(list(grid.rows)), "seed": tune.grid_search(grid.seeds)},
                tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=space.max_concurrent,
                                            trial_dirname_creator=runner.trial_dirname),
                run_config=tune.RunConfig(name=name, storage_path=storage,
                                          callbacks=runner.wandb_callback(space, experiment, wandb_mode,
                                                                          job_type="ablation", rows=grid.rows),
                                          failure_config=tune.FailureConfig(max_failures=0), verbose=1))
        atomic_write_json(experiment / "ablation.json", {**record, "teacher_checkpoint": teacher, "data": paths})
        result_grid = tuner.fit()
    finally:
        if address is None:
            import ray

            ray.shutdown()
    failed = sum(1 for result in result_grid if result.error is not None)
    report = write_report(experiment)
    print(f"report: {report}")
    return {"trials": len(result_grid), "failed": failed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.ablate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", help="ablation grid YAML (default: search_spaces/ablation.yaml)")
    parser.add_argument("--seeds", type=int, help="seeds per row (default: the grid's)")
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
        grid = load_grid(args.grid, seeds=args.seeds, from_sweep=args.from_sweep, overrides=overrides)
        name = args.name or grid.name
        storage = resolve_storage(args.storage)
        wandb_mode = resolve_wandb_mode(args.wandb)
        plan = {"name": name, "experiment": f"{storage.rstrip('/')}/{name}", "pair": grid.space.pair_name,
                "rows": grid.rows, "seeds": grid.seeds, "trials": len(grid.rows) * len(grid.seeds),
                "epochs_per_trial": grid.space.budget.epochs, "wandb": wandb_mode}
        if args.dry_run:
            print(json.dumps(plan, indent=2))
            return 0
        summary = run_ablation(grid, name=name, storage=storage, wandb_mode=wandb_mode, address=args.address,
                               record={"plan": plan, "space": describe(grid.space), "rows": grid.rows,
                                       "seeds": grid.seeds, **provenance()})
        return 0 if summary["failed"] == 0 else 1

    return run_command(run, interrupted="rerun the same command to continue")


if __name__ == "__main__":
    sys.exit(main())
