"""The tabular benchmark that bench/search_efficiency.py replays: Sobol points of a search space, each
trained at the full budget for several seeds through the real trial machinery (an ablation grid: one
row per point, Ray Tune + Ray Train, per-epoch val AP kept), then exported as a small CSV.

    python bench/search_table.py --points 64 --seeds 2                 # grid, run it, export the table
    python bench/search_table.py --points 64 --seeds 2 --set max_concurrent=8 --set resources.use_gpu=true \\
        --set resources.gpus_per_worker=0.1                            # on a GPU machine
    python bench/search_table.py --export-only                         # re-export a finished (or resumed) run

Rerunning the same command continues an interrupted run (the ablation runner resumes). The table goes
to bench/tables/default_space.csv with its provenance (command, commit, machine, packages, dates) in
default_space.json beside it.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dmkd.provenance import cpu_name, provenance  # noqa: E402
from orchestrator.report import read_trials  # noqa: E402
from orchestrator.space import DEFAULT_SPACE, load_space  # noqa: E402


def sobol_points(search: dict, count: int, seed: int = 0) -> list[dict]:
    """``count`` scrambled Sobol points of the (continuous) search space, log scale for loguniform."""
    from scipy.stats import qmc

    names = list(search)
    if any(search[n].type in ("categorical", "int") for n in names):
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


def export(experiment: Path, search: dict, out: Path) -> int:
    """One CSV row per (configuration, seed, epoch) of every finished trial; returns the row count."""
    record = json.loads((experiment / "ablation.json").read_text())
    rows = []
    for trial in read_trials(experiment):
        row = trial["config"].get("row")
        if not row or not row.startswith("p") or trial["error"] is not None:
            continue
        params = record["rows"][row]["params"]
        for entry in trial["history"]:
            if "val/AP" in entry:
                rows.append([int(row[1:]), trial["config"]["seed"], entry["epoch"], f"{entry['val/AP']:.6f}",
                             *[f"{params[n]:.6g}" for n in search]])
    rows.sort()
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["config", "seed", "epoch", "val_AP", *search])
        writer.writerows(rows)
    return len(rows)


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
    args = parser.parse_args(argv)

    space = load_space(args.space)
    experiment = Path(args.storage) / args.name
    started = time.time()
    if not args.export_only:
        grid = write_grid(args.space, sobol_points(space.search, args.points), args.seeds, args.name,
                          Path(args.storage) / "grids")
        command = [sys.executable, "-m", "orchestrator.ablate", "--grid", str(grid), "--storage", args.storage,
                   "--wandb", "off", *[item for pair in args.set for item in ("--set", pair)]]
        print(" ".join(command), flush=True)
        if subprocess.run(command, cwd=ROOT).returncode != 0:
            print("error: the ablation run did not finish; rerun the same command to continue", file=sys.stderr)
            return 1
    count = export(experiment, space.search, args.out)
    record = {"command": "python bench/search_table.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "experiment": str(experiment), "points": args.points, "seeds": args.seeds, "rows": count,
              "machine": cpu_name(), "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
              "wall_s_this_call": round(time.time() - started), **provenance()}
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    print(f"{count} rows -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
