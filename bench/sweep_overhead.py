"""What orchestration costs: the same N trials run (a) as plain `python -m dmkd.train` processes and
(b) through `python -m orchestrator.sweep` on a local Ray (no early stopping, W&B off), on the
mini-benchmark student with DMKD distillation.

    python bench/sweep_overhead.py --teacher runs/teacher/checkpoint.pt --trials 2 --epochs 9
    python bench/sweep_overhead.py --teacher runs/teacher/checkpoint.pt --cpus-per-trial 1

Prints the wall times, their ratio, and where the sweep's extra time goes: before the first trial (Ray
start, data and teacher checks), per trial outside the training loop (worker-group start, checkpoint
upload, loading data and teacher in the worker), and inside the loop (the same epochs, timed by the loop).
``--cpus-per-trial`` sets both the trial's Ray Train worker CPUs and the plain runs' OpenMP threads, so
both sides compute with the same number of threads; ``--concurrent`` runs that many trials at once on
both sides (the sweep's ``max_concurrent``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
ALPHAS = [2e-6, 5e-6, 1e-5, 2e-5, 5e-7, 1e-6]


def plain(args, work: Path) -> dict:
    """The trials as ``python -m dmkd.train`` processes, ``--concurrent`` at a time."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.cpus_per_trial)}
    times, epoch_s = [], []
    started_all = time.perf_counter()
    for first in range(0, args.trials, args.concurrent):
        running = []
        for i in range(first, min(first + args.concurrent, args.trials)):
            out = work / f"plain{i}"
            command = [sys.executable, "-m", "dmkd.train", "--method", "dmkd", "--teacher-checkpoint", args.teacher,
                       "--data-dir", args.data_dir, "--epochs", str(args.epochs), "--out", str(out),
                       "--distill", f"alpha={ALPHAS[i % len(ALPHAS)]}"]
            running.append((out, time.perf_counter(), subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
        for out, started, process in running:
            if process.wait() != 0:
                raise SystemExit(f"plain run {out.name} failed with exit code {process.returncode}")
            times.append(time.perf_counter() - started)
            epochs = json.loads((out / "metrics.json").read_text())["epochs"]
            epoch_s.append(sum(e["time/train_s"] + e.get("time/eval_s", 0) for e in epochs))
    return {"wall_s": time.perf_counter() - started_all, "per_trial_s": times, "loop_s": epoch_s}


def swept(args, work: Path) -> dict:
    space = yaml.safe_load((ROOT / "search_spaces" / "default.yaml").read_text())
    space.update(name="overhead", num_samples=args.trials, max_concurrent=args.concurrent, scheduler={"type": "none"},
                 budget={"epochs": args.epochs},
                 search={"alpha": {"type": "categorical", "choices": [ALPHAS[i % len(ALPHAS)] for i in range(args.trials)]}})
    space["pair"].update(teacher_checkpoint=args.teacher, train_teacher=False)
    space["data"] = {"mini_dir": args.data_dir}
    space["resources"] = {"num_workers": 1, "use_gpu": False, "cpus_per_worker": args.cpus_per_trial}
    path = work / "overhead.yaml"
    path.write_text(yaml.safe_dump(space))
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "orchestrator.sweep", "--space", str(path), "--storage", str(work / "exp"),
                    "--wandb", "off"], check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    wall = time.perf_counter() - started
    trials, loops = [], []
    for result in (work / "exp" / "overhead").glob("run_trial_*/result.json"):
        history = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        trials.append(history[-1]["time_total_s"])
        loops.append(sum(e["time/train_s"] + e.get("time/eval_s", 0) for e in history))
    teacher = json.loads((work / "exp" / "overhead" / "teacher.json").read_text())
    return {"wall_s": wall, "per_trial_s": trials, "loop_s": loops, "teacher_figures_from": teacher.get("figures_from")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="teacher checkpoint (e.g. from python -m dmkd.train)")
    parser.add_argument("--data-dir", default=str(ROOT / "data" / "mini"))
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=9, help="9 epochs: 2.5-4 minutes a trial on 2 CPU cores")
    parser.add_argument("--cpus-per-trial", type=int, default=2)
    parser.add_argument("--concurrent", type=int, default=1, help="trials at once, on both sides (default 1)")
    args = parser.parse_args()
    args.teacher = str(Path(args.teacher).resolve())
    args.data_dir = str(Path(args.data_dir).resolve())
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        a = plain(args, work)
        b = swept(args, work)
    n = args.trials
    report = {
        "trials": n, "epochs": args.epochs, "cpus_per_trial": args.cpus_per_trial, "concurrent": args.concurrent,
        "cores": os.cpu_count(),
        "plain_wall_s": a["wall_s"], "sweep_wall_s": b["wall_s"], "ratio": b["wall_s"] / a["wall_s"],
        "plain_trial_s": statistics.fmean(a["per_trial_s"]), "sweep_trial_s": statistics.fmean(b["per_trial_s"]),
        "plain_loop_s": statistics.fmean(a["loop_s"]), "sweep_loop_s": statistics.fmean(b["loop_s"]),
        "sweep_outside_trials_s": b["wall_s"] - sum(b["per_trial_s"]) / args.concurrent,  # trials overlap
        "sweep_per_trial_startup_s": statistics.fmean(t - loop for t, loop in zip(b["per_trial_s"], b["loop_s"])),
        "plain_per_trial_startup_s": statistics.fmean(t - loop for t, loop in zip(a["per_trial_s"], a["loop_s"])),
        "loop_ratio": statistics.fmean(b["loop_s"]) / statistics.fmean(a["loop_s"]),
        "teacher_figures_from": b["teacher_figures_from"],
    }
    for key, value in report.items():
        print(f"{key:28s} {value:.2f}" if isinstance(value, float) else f"{key:28s} {value}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
