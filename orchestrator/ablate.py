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

Re-running the same command continues an interrupted ablation; the same --name with other rows, seeds,
tuning or base stops before anything starts. The report
(``python -m orchestrator.report``) is written at the end.
"""
from __future__ import annotations

import argparse
import dataclasses
import json

from dmkd.config import parse_assignment
from dmkd.distillers import search_space
from dmkd.errors import exit_process, run_command
from dmkd.provenance import provenance
from orchestrator.continuing import SETTINGS, check_continues, space_settings
from orchestrator.grid import Grid, load_grid, rows_record
from orchestrator.space import describe
from orchestrator.space_file import check_files, check_fits_here, load_blaming_command_line
from orchestrator.storage import Storage, check_name
from orchestrator.sweep import WANDB_MODES, resolve_address, resolve_wandb_mode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.ablate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", help="ablation grid YAML (default: search_spaces/ablation.yaml)")
    parser.add_argument("--seeds", type=int, help="seeds per row (default: the grid's)")
    parser.add_argument("--tune", type=int, metavar="N", help="tune every row first with N Optuna trials (default: "
                                                              "the grid's tune.trials; 0: no tuning)")
    parser.add_argument("--name", help="experiment name (default: the grid's name)")
    parser.add_argument("--storage", default="experiments")
    parser.add_argument("--from-sweep", help="a finished sweep's folder: its best training settings for every row, "
                        "its distillation settings for the rows of its loss")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key of the base space")
    parser.add_argument("--wandb", choices=WANDB_MODES)
    parser.add_argument("--address", help="Ray address to join (e.g. auto); default: RAY_ADDRESS when set, else start a local Ray")
    parser.add_argument("--dry-run", action="store_true", help="validate the grid and print the plan; no Ray")
    args = parser.parse_args(argv)

    def run() -> int:
        args.address = resolve_address(args.address)
        overrides = [parse_assignment(item, "--set") for item in args.set]

        def fits(grid: Grid) -> Grid:  # on a local Ray: this machine's CPUs and GPUs
            if args.address is None:
                check_fits_here(grid.space, grid.base)
            return grid

        grid = load_blaming_command_line(
            lambda: fits(load_grid(args.grid, seeds=args.seeds, from_sweep=args.from_sweep, overrides=overrides,
                                   tune_trials=args.tune)),
            lambda: fits(load_grid(args.grid)),
            given=bool(overrides or args.seeds is not None or args.tune is not None or args.from_sweep))
        name = check_name(args.name or grid.name)
        storage = Storage.parse(args.storage)
        check_files(grid.space, grid.base)
        wandb_mode = resolve_wandb_mode(args.wandb)
        tuned = {row_name: grid.tune.trials_for(len(search_space(row.method))) for row_name, row in grid.rows.items()
                 if grid.tune.trials and search_space(row.method) and row.tune}
        plan = {"name": name, "experiment": storage.uri(name), "pair": grid.space.pair_name,
                "rows": rows_record(grid.rows), "seeds": grid.seeds, "trials": len(grid.rows) * len(grid.seeds),
                "epochs_per_trial": grid.space.budget.epochs, "tune": dataclasses.asdict(grid.tune),
                "tuning_trials": tuned, "tuning_seed": grid.tune.seed if tuned else None, "wandb": wandb_mode,
                "from_sweep": grid.from_sweep}
        settings = {"space": space_settings(grid.space), "rows": plan["rows"], "seeds": grid.seeds, "tune": plan["tune"]}
        if storage.local:
            check_continues(storage.folder(name) / "ablation.json", settings, command="python -m orchestrator.ablate")
        if args.dry_run:
            print(json.dumps(plan, indent=2))
            return 0
        if grid.from_sweep:
            taken = grid.from_sweep
            print(f"from the sweep ({taken['best']}): its training settings for every row; its {taken['method']} "
                  f"settings for rows {', '.join(taken['rows']) or '(none of its loss)'}", flush=True)
        from orchestrator.drivers import run_ablation  # Ray, Tune and W&B: not needed for --dry-run

        summary = run_ablation(grid, name=name, storage=storage, wandb_mode=wandb_mode, address=args.address,
                               record={"plan": plan, "space": describe(grid.space), "rows": rows_record(grid.rows),
                                       "seeds": grid.seeds, SETTINGS: settings, **provenance()})
        return 0 if summary["failed"] == 0 else 1

    return run_command(run, interrupted="rerun the same command to continue")


if __name__ == "__main__":
    exit_process(main())
