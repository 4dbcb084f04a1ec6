"""The default job (``python -m orchestrator.sweep`` on ``search_spaces/default.yaml``: generate the data,
train and cache the teacher, train the undistilled reference student, four trials with ASHA) against its
parts trained plainly, on one machine in one go.

    python bench/default_run.py [--work DIR]

First the sweep runs from nothing (its own storage, W&B off); then the same parts run as plain
``python -m dmkd.train`` processes: the teacher (its epochs; it generates its own copy of the data, as
the sweep did), the reference (the student without distillation, the trials' budget) and each trial's
configuration for the epochs the sweep ran it (ASHA's stopped trials included). Each phase's wall time
is printed with its ratio, sweep over plain: the teacher and the reference from the sweep's start to
their cache files, the trials from there to the sweep's end.
Prints a JSON record with the machine and the commit.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dmkd.provenance import cpu_name, provenance  # noqa: E402
from orchestrator.report.records import read_trials  # noqa: E402


def _train(args: list[str], env: dict) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dmkd.train", *args], cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def sweep(work: Path, env: dict) -> dict:
    storage = work / "exp"
    started = time.time()
    subprocess.run([sys.executable, "-m", "orchestrator.sweep", "--storage", str(storage), "--wandb", "off"],
                   cwd=work, env={**env, "RAY_AUTH_MODE": "disabled"}, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ended = time.time()
    (teacher,) = storage.glob("teachers/*/teacher.pt")
    (reference,) = storage.glob("references/*/seed0.json")
    trials = [t for t in read_trials(storage / "default") if t.history]
    return {"total_s": ended - started, "teacher_s": teacher.stat().st_mtime - started,
            "reference_s": reference.stat().st_mtime - teacher.stat().st_mtime,
            "trials_s": ended - reference.stat().st_mtime, "teacher": str(teacher),
            "trials": [{"params": t.config, "epochs": t.epochs} for t in trials]}


def plain(work: Path, env: dict, trials: list[dict]) -> dict:
    # a folder of its own: the plain teacher generates the data as the sweep did (both phases pay for it)
    data = str(work / "plain-data" / "mini")
    teacher = _train(["--role", "teacher", "--data-dir", data, "--out", str(work / "plain-teacher")], env)
    checkpoint = str(work / "plain-teacher" / "checkpoint.pt")
    reference = _train(["--role", "student", "--data-dir", data, "--out", str(work / "plain-reference")], env)
    runs = 0.0
    for i, trial in enumerate(trials):
        distill = [f"--distill={k}={v}" for k, v in trial["params"].items()]
        runs += _train(["--method", "dmkd", "--teacher-checkpoint", checkpoint, "--data-dir", data, "--epochs",
                        str(trial["epochs"]), "--out", str(work / f"plain-trial{i}"), *distill], env)
    return {"teacher_s": teacher, "reference_s": reference, "trials_s": runs, "total_s": teacher + reference + runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as temporary:
        work = args.work or Path(temporary)
        work.mkdir(parents=True, exist_ok=True)
        (work / "data").mkdir(exist_ok=True)
        a = sweep(work, env)
        b = plain(work, env, a["trials"])
    report = {"machine": cpu_name(), "cores": os.cpu_count(), "git_commit": provenance()["git_commit"],
              "date": time.strftime("%Y-%m-%d %H:%M"), "trials": a["trials"]}
    for phase in ("teacher_s", "reference_s", "trials_s", "total_s"):
        report[f"sweep_{phase}"], report[f"plain_{phase}"] = a[phase], b[phase]
        report[f"ratio_{phase[:-2]}"] = a[phase] / b[phase]
        print(f"{phase[:-2]:10s} sweep {a[phase]:7.1f} s   plain {b[phase]:7.1f} s   ratio {a[phase] / b[phase]:.2f}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
