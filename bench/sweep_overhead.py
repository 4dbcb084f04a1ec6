"""What orchestration costs: the same N trials (the mini-benchmark student with DMKD, a trained teacher)
run (a) as plain ``python -m dmkd.train`` processes and (b) through ``python -m orchestrator.sweep`` on a
local Ray (no early stopping, W&B off), with ``--workers`` Ray Train workers per trial (1: the trial
trains in its own Tune trial; 2 or more: a TorchTrainer worker group, DDP over gloo).

    python bench/sweep_overhead.py --teacher runs/teacher/checkpoint.pt --trials 2 --epochs 3
    python bench/sweep_overhead.py --teacher runs/teacher/checkpoint.pt --workers 2 --cpus-per-trial 2

For every trial it measures:
- start-up: from the start of the process that trains (the ``dmkd.train`` process; the Tune trial's
  process for a one-worker trial; the Tune trial's process, which then starts the worker group, for
  several workers) to the first step of the training loop (``time/loop_started_at``): imports, data,
  models, Ray's own processes; for a trial process Tune reuses from an earlier trial, from the start of the
  trial's own code (``time/trial_started_at``) instead; and, for the sweep, also from Tune starting the
  trial (Tune asking the Optuna searcher for its point: the Optuna trial's start) to that first step;
- the training loop (train + evaluation, timed by the loop) of every trial, with the CPU seconds the
  loop's process spent in it, and the CPU seconds of every process of the run, sampled from ``/proc``
  every 0.25 s (a plain run: its process; a sweep: every process under the sweep's driver, Ray's daemons
  included, divided by the trials).
With one trial at a time it also prints each side's fixed cost: the wall time less the loops.
``--cpus-per-trial`` sets both the trial's CPUs and the plain runs' OpenMP threads; ``--concurrent`` runs
that many trials at once on both sides; ``--repeats N`` runs plain and sweep N times, alternating, and
reports each pair's ratio and their median (the machine drifts between runs minutes apart). Prints a
JSON record with the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import optuna
import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
ALPHAS = [2e-6, 5e-6, 1e-5, 2e-5, 5e-7, 1e-6]

from dmkd.metrics import LOOP_STARTED_AT, TRIAL_STARTED_AT  # noqa: E402
from dmkd.provenance import cpu_name, provenance  # noqa: E402
from orchestrator.report.records import read_trials  # noqa: E402
from orchestrator.searcher import TUNE_TRIAL_ID  # noqa: E402


def created_at(pid: int) -> float:
    """When process ``pid`` started, on ``time.time()``'s clock, to 10 ms: its start in clock ticks since boot
    (``/proc/PID/stat``) against the uptime. (psutil's ``create_time`` adds those ticks to the boot time of
    ``/proc/stat``, which is whole seconds: on the VM of BENCHMARKS.md it put every start 0.7 s early.)"""
    ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")


class Sampler:
    """CPU seconds and start times of every process under ``root`` (and ``root``), sampled until stopped."""

    def __init__(self, root: int, every: float = 0.25):
        self.root, self.every, self.cpu, self.started = root, every, {}, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                family = [psutil.Process(self.root), *psutil.Process(self.root).children(recursive=True)]
            except psutil.NoSuchProcess:
                family = []
            for process in family:
                try:
                    times = process.cpu_times()
                    self.cpu[process.pid] = times.user + times.system + times.children_user + times.children_system
                    if process.pid not in self.started:  # read once: the sampler shares the cores it measures
                        self.started[process.pid] = created_at(process.pid)
                except (psutil.NoSuchProcess, psutil.AccessDenied, OSError):
                    pass
            self._stop.wait(self.every)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def loop_figures(epochs: list[dict]) -> tuple[float, float]:
    """A run's training loop from its per-epoch records, the same on both sides: seconds (train +
    evaluation, timed by the loop) and the CPU seconds its process spent in them."""
    return (sum(e["time/train_s"] + e.get("time/eval_s", 0) for e in epochs),
            sum(e.get("time/cpu_s", 0) for e in epochs))


def fixed(run: dict) -> float:
    """A run's wall time less its trials' loops, for trials run one at a time: its start-ups, its ends and,
    for a sweep, Ray's start and stop, Tune and the report. The machine's drift changes mostly the loops,
    so this part of a ratio compares across runs minutes apart better than the ratio does."""
    return run["wall_s"] - sum(run["loop_s"])


def plain(args, work: Path) -> dict:
    """The trials as ``python -m dmkd.train`` processes, ``--concurrent`` at a time."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.cpus_per_trial)}
    startup, loops, loop_cpu, cpu = [], [], [], []
    started_all = time.perf_counter()
    for first in range(0, args.trials, args.concurrent):
        running = []
        for i in range(first, min(first + args.concurrent, args.trials)):
            out = work / f"plain{i}"
            command = [sys.executable, "-m", "dmkd.train", "--method", "dmkd", "--teacher-checkpoint", args.teacher,
                       "--data-dir", args.data_dir, "--epochs", str(args.epochs), "--out", str(out),
                       "--distill", f"alpha={ALPHAS[i % len(ALPHAS)]}"]
            process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            running.append((out, process, Sampler(process.pid)))
        for out, process, sampler in running:
            if process.wait() != 0:
                raise SystemExit(f"plain run {out.name} failed with exit code {process.returncode}")
            sampler.stop()
            epochs = json.loads((out / "metrics.json").read_text())["epochs"]
            startup.append(epochs[0][LOOP_STARTED_AT] - sampler.started[process.pid])
            seconds, cpu_seconds = loop_figures(epochs)
            loops.append(seconds)
            loop_cpu.append(cpu_seconds)
            cpu.append(sum(sampler.cpu.values()))
    return {"wall_s": time.perf_counter() - started_all, "startup_s": startup, "loop_s": loops, "loop_cpu_s": loop_cpu,
            "cpu_s": cpu}


def swept(args, work: Path) -> dict:
    space = yaml.safe_load((ROOT / "search_spaces" / "default.yaml").read_text())
    space.update(name="overhead", num_samples=args.trials, max_concurrent=args.concurrent, scheduler={"type": "none"},
                 budget={"epochs": args.epochs}, reference=False,
                 search={"alpha": {"type": "categorical", "choices": [ALPHAS[i % len(ALPHAS)] for i in range(args.trials)]}})
    space["pair"].update(teacher_checkpoint=args.teacher, train_teacher=False)
    space["data"] = {"mini_dir": args.data_dir}
    space["resources"] = {"num_workers": args.workers, "use_gpu": False,
                          "cpus_per_worker": max(1, args.cpus_per_trial // args.workers)}
    path = work / "overhead.yaml"
    path.write_text(yaml.safe_dump(space))
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "orchestrator.sweep", "--space", str(path), "--storage",
                                str(work / "exp"), "--wandb", "off"], cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    sampler = Sampler(process.pid)
    if process.wait() != 0:
        raise SystemExit(f"the sweep failed with exit code {process.returncode}")
    sampler.stop()
    wall = time.perf_counter() - started
    study = optuna.load_study(study_name="overhead", storage=f"sqlite:///{work / 'exp' / 'overhead' / 'optuna.db'}")
    asked = {t.user_attrs[TUNE_TRIAL_ID]: t.datetime_start.timestamp() for t in study.trials}  # local time, as Optuna
    startup, from_tune, loops, loop_cpu, seen = [], [], [], [], set()
    for trial in sorted(read_trials(work / "exp" / "overhead"), key=lambda t: t.history[0][LOOP_STARTED_AT]):
        history = trial.history
        pid = history[0]["pid"]  # the Tune trial's process (Tune adds its pid)
        # a process that trained an earlier trial (Tune reuses it) starts this one when the trial's code does
        began = history[0].get(TRIAL_STARTED_AT) if pid in seen else sampler.started.get(pid)
        seen.add(pid)
        startup.append(history[0][LOOP_STARTED_AT] - began if began else float("nan"))
        from_tune.append(history[0][LOOP_STARTED_AT] - asked[trial.trial_id])
        seconds, cpu_seconds = loop_figures(history)
        loops.append(seconds)
        loop_cpu.append(cpu_seconds)
    total_cpu = sum(sampler.cpu.values())
    return {"wall_s": wall, "startup_s": startup, "startup_from_tune_s": from_tune, "loop_s": loops, "cpu_s": [total_cpu / args.trials] * args.trials,
            "loop_cpu_s": loop_cpu, "processes": len(sampler.cpu)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="teacher checkpoint (e.g. from python -m dmkd.train)")
    parser.add_argument("--data-dir", default=str(ROOT / "data" / "mini"))
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--cpus-per-trial", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers per trial (1: no worker group)")
    parser.add_argument("--concurrent", type=int, default=1, help="trials at once, on both sides (default 1)")
    parser.add_argument("--skip-plain", action="store_true", help="only the sweep (e.g. a second --workers setting)")
    parser.add_argument("--repeats", type=int, default=1, help="plain and sweep this many times, alternating")
    args = parser.parse_args()
    args.teacher = str(Path(args.teacher).resolve())
    args.data_dir = str(Path(args.data_dir).resolve())
    runs: list[tuple[dict | None, dict]] = []
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(args.repeats):
            work = Path(folder) / str(repeat)
            work.mkdir()
            runs.append((None if args.skip_plain else plain(args, work), swept(args, work)))

    plains, sweeps = [a for a, _ in runs if a is not None], [b for _, b in runs]

    def pooled(side: list[dict], key: str) -> float:
        """The mean of ``key`` over every trial of every run of one side (``plains`` or ``sweeps``)."""
        return statistics.fmean(v for run in side for v in run[key])

    def each(side: list[dict], key: str, digits: int) -> list[list[float]]:
        """``key`` of every trial, run by run, rounded for the printout."""
        return [[round(v, digits) for v in run[key]] for run in side]

    report = {"trials": args.trials, "epochs": args.epochs, "cpus_per_trial": args.cpus_per_trial, "workers": args.workers,
              "concurrent": args.concurrent, "repeats": args.repeats, "machine": cpu_name(),
              "git_commit": provenance()["git_commit"], "date": time.strftime("%Y-%m-%d %H:%M"),
              "sweep_wall_s": statistics.fmean(b["wall_s"] for b in sweeps),
              "sweep_startup_s": pooled(sweeps, "startup_s"), "sweep_startup_from_tune_s": pooled(sweeps, "startup_from_tune_s"),
              "sweep_startup_each_s": each(sweeps, "startup_s", 2),
              "sweep_startup_from_tune_each_s": each(sweeps, "startup_from_tune_s", 2),
              "sweep_loop_s": pooled(sweeps, "loop_s"), "sweep_cpu_s_per_trial": pooled(sweeps, "cpu_s"),
              "sweep_loop_each_s": each(sweeps, "loop_s", 1),
              "sweep_loop_cpu_s": pooled(sweeps, "loop_cpu_s"), "sweep_processes": max(b["processes"] for b in sweeps)}
    if args.concurrent == 1:  # one trial at a time: what a run costs beyond its trials' loops
        report["sweep_fixed_s"] = statistics.fmean(fixed(b) for b in sweeps)
        report["sweep_fixed_each_s"] = [round(fixed(b), 1) for b in sweeps]
    if plains:
        ratios = [b["wall_s"] / a["wall_s"] for a, b in zip(plains, sweeps)]
        report.update({"plain_wall_s": statistics.fmean(a["wall_s"] for a in plains),
                       "ratio": statistics.median(ratios), "ratio_each": [round(r, 3) for r in ratios],
                       "plain_startup_s": pooled(plains, "startup_s"), "plain_loop_s": pooled(plains, "loop_s"),
                       "plain_loop_each_s": each(plains, "loop_s", 1),
                       "plain_loop_cpu_s": pooled(plains, "loop_cpu_s"),
                       "plain_cpu_s_per_trial": pooled(plains, "cpu_s"),
                       "loop_ratio": pooled(sweeps, "loop_s") / pooled(plains, "loop_s")})
        if args.concurrent == 1:
            report["plain_fixed_s"] = statistics.fmean(fixed(a) for a in plains)
            report["plain_fixed_each_s"] = [round(fixed(a), 1) for a in plains]
    for key, value in report.items():
        print(f"{key:26s} {value:.2f}" if isinstance(value, float) else f"{key:26s} {value}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
