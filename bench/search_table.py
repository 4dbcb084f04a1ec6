"""The tabular benchmark that bench/search_efficiency.py replays: Sobol points of a search space, each
trained at the full budget for several seeds through the real trial machinery (an ablation grid: one
row per point, Ray Tune + Ray Train, per-epoch val AP kept), then exported as a small CSV.

    python bench/search_table.py --points 64 --seeds 2                 # grid, run it, export the table
    python bench/search_table.py --points 64 --seeds 2 --set max_concurrent=8 --set resources.use_gpu=true \\
        --set resources.gpus_per_worker=0.1                            # on a GPU machine
    python bench/search_table.py --export-only                         # re-export a finished (or resumed) run

Without Ray, for a short GPU lease: ``--plan-only PLAN.json --teacher CKPT`` writes each (point, seed)'s
TrainConfig (the one its trial would get), ``bench/table_runner.py`` trains them in parallel processes,
and ``--from-runs RUNS --plan PLAN.json`` exports the table from their metrics.json files.

Rerunning the same command continues an interrupted run (the ablation runner resumes). The table goes
to bench/tables/default_space.csv with its provenance (command, commit, machine, packages, dates) in
default_space.json beside it.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dmkd.metrics import VAL_AP, read_metrics  # noqa: E402
from dmkd.provenance import cpu_name, provenance  # noqa: E402
from orchestrator.report.records import read_trials  # noqa: E402
from orchestrator.space import DEFAULT_SPACE  # noqa: E402
from orchestrator.space_file import load_space  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))  # its sibling, also when loaded by file path (the tests)
from table_runner import finished  # noqa: E402


def sobol_points(search: dict, count: int, seed: int = 0) -> list[dict]:
    """``count`` scrambled Sobol points of the (continuous) search space, log scale for loguniform."""
    from scipy.stats import qmc

    names = list(search)
    if any(search[n].type in ("categorical", "int") for n in names):  # (a joint space: one method's own at a time)
        raise SystemExit("error: the table generator takes continuous parameters only (uniform, loguniform)")
    unit = qmc.Sobol(len(names), scramble=True, seed=seed).random(count)
    points = []
    for row in unit:
        point = {}
        for name, u in zip(names, row):
            p = search[name]
            if p.type == "loguniform":
                point[name] = float(math.exp(math.log(p.low) + u * (math.log(p.high) - math.log(p.low))))
            else:
                point[name] = float(p.low + u * (p.high - p.low))
        points.append(point)
    return points


def write_grid(space_path: Path, points: list[dict], seeds: int, name: str, folder: Path) -> Path:
    space = load_space(space_path)
    rows = {f"p{i:03d}": {"method": space.method, "params": point, "tune": False} for i, point in enumerate(points)}
    grid = {"name": name, "base": str(space_path.resolve()), "seeds": seeds, "tune": {"trials": 0}, "rows": rows}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def write_plan(space_path: Path, points: list[dict], seeds: int, teacher: str, path: Path) -> int:
    """Every (point, seed) as the TrainConfig its trial would get, all points of seed 0 first (a cut
    run still covers the space), for ``bench/table_runner.py``."""
    from dmkd.config import to_dict

    space = load_space(space_path)
    plan = [{"id": f"p{i:03d}_s{seed}", "config": to_dict(space.train_config(point, seed=seed, teacher_checkpoint=teacher))}
            for seed in range(seeds) for i, point in enumerate(points)]
    path.write_text(json.dumps(plan, indent=1))
    return len(plan)


def _value(value) -> str:
    return "" if value is None else f"{value:.6g}" if isinstance(value, float) else str(value)


def _csv_row(config: int, seed: int, entry: dict, params: dict, search: dict) -> list:
    return [config, seed, entry["epoch"], f"{entry['val/AP']:.6f}", *[_value(params.get(n)) for n in search]]


def joint_plan(grid: Path, points: int, seeds: int, teacher: str, path: Path) -> int:
    """The joint space's table as a plan for ``bench/table_runner.py``: ``points`` scrambled Sobol points
    of each method's own space (the undistilled student once), each trained with ``seeds`` seeds, every
    run the TrainConfig a trial of the grid's base space would get; entries keep their joint point."""
    from joint_space import joint_methods, joint_search, own_search, split

    from dmkd.config import to_dict

    space = load_space(DEFAULT_SPACE)
    methods = joint_methods(grid)
    search = joint_search(methods)
    joint = [{"method": "none"}] if "none" in methods else []
    for method in (m for m in methods if m != "none"):
        own = own_search(search, method)
        joint += [{"method": method, **point} for point in sobol_points(own, points, seed=len(joint))]
    plan = []
    for seed in range(seeds):
        for i, point in enumerate(joint):
            method, params = split(point)
            cfg = space.train_config(params, method=method, seed=seed, teacher_checkpoint=teacher if method != "none" else None)
            plan.append({"id": f"p{i:03d}_s{seed}", "joint": point, "config": to_dict(cfg)})
    path.write_text(json.dumps(plan, indent=1))
    return len(plan)


def trial_rows(experiment: Path, search: dict) -> list[list]:
    """The table's rows from a finished ablation run (the Ray path)."""
    record = json.loads((experiment / "ablation.json").read_text())
    budget = record["space"]["budget"]["epochs"]
    rows = []
    for trial in read_trials(experiment):
        row = trial.config.get("row")
        if not row or not row.startswith("p") or trial.failed(budget):
            continue
        params = record["rows"][row]["params"]
        rows += [_csv_row(int(row[1:]), trial.config["seed"], e, params, search)
                 for e in trial.history if VAL_AP in e]
    return rows


def run_rows(runs: Path, plan: Path, search: dict) -> list[list]:
    """The table's rows from ``bench/table_runner.py``'s finished runs (runs cut mid-way are left out)."""
    rows = []
    for entry in json.loads(plan.read_text()):
        config = entry["config"]
        if not finished(runs / entry["id"], config["epochs"]):
            continue
        params = entry.get("joint") or {**config["distill"], **{k: config[k] for k in search if k in config}}
        rows += [_csv_row(int(entry["id"][1:4]), config["seed"], e, params, search)
                 for e in read_metrics(runs / entry["id"])["epochs"] if VAL_AP in e]
    return rows


def export(rows: list[list], search: dict, out: Path) -> int:
    """One CSV row per (configuration, seed, epoch); returns the row count."""
    rows.sort()
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["config", "seed", "epoch", "val_AP", *search])
        writer.writerows(rows)
    return len(rows)


def _machine(runs: Path | None):
    """Where the table was trained: this machine, or the one table_runner.py recorded in ``runs``."""
    recorded = runs / "machine.json" if runs else None
    return json.loads(recorded.read_text()) if recorded and recorded.is_file() else cpu_name()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/search_table.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", type=Path, default=DEFAULT_SPACE)
    parser.add_argument("--points", type=int, default=64, help="Sobol points (a power of two keeps the balance)")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--name", default="search_table")
    parser.add_argument("--storage", default="experiments")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to the ablation runner")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "tables" / "default_space.csv")
    parser.add_argument("--export-only", action="store_true")
    parser.add_argument("--plan-only", type=Path, metavar="PLAN", help="write the runs' TrainConfigs for table_runner.py")
    parser.add_argument("--teacher", help="with --plan-only: the teacher checkpoint path the runs will read")
    parser.add_argument("--from-runs", type=Path, metavar="RUNS", help="export from table_runner.py's runs (with --plan)")
    parser.add_argument("--plan", type=Path, help="the plan the runs in --from-runs were made from")
    parser.add_argument("--joint", type=Path, metavar="GRID", help="the joint method-and-settings space of an ablation "
                        "grid's methods (e.g. search_spaces/methods.yaml): --points per method, with --plan-only or --from-runs")
    args = parser.parse_args(argv)

    space = load_space(args.space)
    if args.joint:
        from joint_space import joint_methods, joint_search

        space = dataclasses.replace(space, search=joint_search(joint_methods(args.joint)))
    experiment = Path(args.storage) / args.name
    started = time.time()
    if args.plan_only:
        if not args.teacher:
            raise SystemExit("error: --plan-only needs --teacher (the checkpoint path on the machine that trains)")
        count = (joint_plan(args.joint, args.points, args.seeds, args.teacher, args.plan_only) if args.joint else
                 write_plan(args.space, sobol_points(space.search, args.points), args.seeds, args.teacher, args.plan_only))
        print(f"{count} runs -> {args.plan_only}")
        return 0
    if args.from_runs and not args.plan:
        raise SystemExit("error: --from-runs needs --plan")
    if not (args.export_only or args.from_runs):
        grid = write_grid(args.space, sobol_points(space.search, args.points), args.seeds, args.name,
                          Path(args.storage) / "grids")
        command = [sys.executable, "-m", "orchestrator.ablate", "--grid", str(grid), "--storage", args.storage,
                   "--wandb", "off", *[item for pair in args.set for item in ("--set", pair)]]
        print(" ".join(command), flush=True)
        if subprocess.run(command, cwd=ROOT).returncode != 0:
            print("error: the ablation run did not finish; rerun the same command to continue", file=sys.stderr)
            return 1
    rows = run_rows(args.from_runs, args.plan, space.search) if args.from_runs else trial_rows(experiment, space.search)
    count = export(rows, space.search, args.out)
    record = {"command": "python bench/search_table.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "experiment": str(args.from_runs or experiment), "points": args.points, "seeds": args.seeds, "rows": count,
              "machine": _machine(args.from_runs), "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
              "wall_s_this_call": round(time.time() - started), **provenance()}
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    print(f"{count} rows -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
