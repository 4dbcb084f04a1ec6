"""Real sweeps on a local Ray: 2 gloo workers per trial, tiny budgets, real Optuna SQLite, W&B offline.
One Ray instance at a time: each sweep runs as its own `python -m orchestrator.sweep` process."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from tests.sweep_helpers import study as _study
from tests.sweep_helpers import sweep_command as _command
from tests.sweep_helpers import sweep_env as _env
from tests.sweep_helpers import tiny_space as _space
from tests.sweep_helpers import tune_results as _tune_results

pytestmark = pytest.mark.slow


def test_small_sweep_records_every_trial_everywhere(tmp_path, mini_data):
    storage = tmp_path / "exp"
    # The objective is the distill loss, which grows with alpha: the first trial has the paper's alpha
    # (2e-5, near the bottom of the range), so ASHA stops the seeded sampler's larger-alpha trials.
    space = _space(tmp_path, mini_data, reference=True, objective={"metric": "loss/distill", "mode": "min"},
                   search={"alpha": {"type": "loguniform", "low": 1e-5, "high": 1e-2},
                           "temperature": {"type": "uniform", "low": 0.2, "high": 1.0}})
    run = subprocess.run(_command(space, storage), capture_output=True, text=True, env=_env(tmp_path), timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    experiment = storage / "tiny"
    assert "best: run_trial_" in run.stdout

    # Optuna: every trial once; full-budget trials COMPLETE, trials ASHA stopped PRUNED with the value
    # of the epoch they stopped at
    tune_results = _tune_results(experiment)
    trials = _study(experiment).trials
    assert len(trials) == 3
    assert trials[0].params == {"alpha": 2e-5, "temperature": 0.5}
    pruned = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned and trials[0].state == optuna.trial.TrialState.COMPLETE
    for trial in trials:
        epochs = trial.user_attrs["epochs"]
        expected = optuna.trial.TrialState.COMPLETE if epochs == 2 else optuna.trial.TrialState.PRUNED
        assert trial.state == expected
    for trial in pruned:
        assert trial.user_attrs["epochs"] == 1
        assert trial.intermediate_values == {1: pytest.approx(trial.user_attrs["last_values"]["loss/distill"])}
        stopped = [h for h in tune_results.values() if len(h) == 1 and h[0]["loss/distill"] == trial.intermediate_values[1]]
        assert len(stopped) == 1

    # results.csv matches what Tune recorded for each trial
    import csv

    rows = list(csv.DictReader((experiment / "results.csv").open()))
    assert {row["trial_id"] for row in rows} == set(tune_results)
    for row in rows:
        last = tune_results[row["trial_id"]][-1]
        assert float(row["val/AP"]) == pytest.approx(last["val/AP"])
        assert int(row["epochs"]) == last["epoch"]
        assert row["status"] == ("completed" if last["epoch"] == 2 else "stopped early")
    best = json.loads((experiment / "best.json").read_text())
    assert best["value"] == min(float(row["loss/distill"]) for row in rows)

    # W&B: one offline run per trial, in the pair's group, tagged with method and seed
    for trial_id in tune_results:
        (run_dir,) = (experiment / "wandb").glob(f"offline-run-*-{trial_id}")
        record = (run_dir / f"run-{trial_id}.wandb").read_bytes()
        assert b"fcos-resnet10_quarter-fpn64->fcos-resnet10_quarter-fpn64" in record
        inspect = subprocess.run([str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--summary", "--json",
                                  str(run_dir)], capture_output=True, text=True, env=_env(tmp_path), timeout=120)
        summary = json.loads(inspect.stdout)
        assert summary["tags"] == ["dmkd", "variant:dmkd", "seed:0"]
        assert summary["summary"]["epoch"] == tune_results[trial_id][-1]["epoch"]

    # the reference row: the undistilled student with the same budget and seed, and each trial's Δ AP to it
    reference = json.loads((experiment / "reference.json").read_text())["0"]
    assert reference["final"]["epoch"] == 2 and reference["history"][0]["pairing/student_init"] == \
        tune_results[rows[0]["trial_id"]][0]["pairing/student_init"]
    report = json.loads((experiment / "report.json").read_text())
    assert report["reference_AP"] == reference["final"]["val/AP"]
    assert report["pair"]["student"]["AP_without_distillation"] == reference["final"]["val/AP"]
    for entry in report["leaderboard"]:
        assert entry["delta_AP"] == pytest.approx(entry["AP"] - reference["final"]["val/AP"])

    # reproducibility: the sweep wrote its plan, resolved space and provenance
    record = json.loads((experiment / "sweep.json").read_text())
    assert record["space"]["num_samples"] == 3 and "git_commit" in record and record["packages"]["ray"]


def test_an_interrupted_sweep_resumes_without_rerunning_finished_trials(tmp_path, mini_data):
    # two trials, no early stopping: the second is still running when Ctrl-C comes
    space, storage = _space(tmp_path, mini_data, num_samples=2, scheduler={"type": "none"}), tmp_path / "exp"
    experiment = storage / "tiny"
    process = subprocess.Popen(_command(space, storage), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=_env(tmp_path))
    deadline = time.time() + 600
    while time.time() < deadline:
        done = [t for t, lines in _tune_results(experiment).items() if lines and lines[-1].get("epoch") == 2]
        if done and len(_tune_results(experiment)) >= 2:
            break
        time.sleep(1)
    assert done, "no trial finished in time"
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=180)
    assert process.returncode != 0
    finished_before = {t: len(lines) for t, lines in _tune_results(experiment).items() if lines and lines[-1]["epoch"] == 2}

    run = subprocess.run(_command(space, storage), capture_output=True, text=True, env=_env(tmp_path), timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "continuing" in run.stdout
    after = _tune_results(experiment)
    assert len(after) == 2
    for trial_id, count in finished_before.items():
        assert len(after[trial_id]) == count  # not re-run
    trials = _study(experiment).trials
    assert len(trials) == 2 and all(t.state.is_finished() for t in trials)


def test_a_second_objective_makes_the_search_multi_objective(tmp_path, mini_data):
    space = _space(tmp_path, mini_data, num_samples=2, scheduler={"type": "none"}, budget={"epochs": 1, "max_iters": 2},
                   objective={"metric": "val/AP", "mode": "max", "second_metric": "loss/distill", "second_mode": "min"},
                   resources={"num_workers": 1, "use_gpu": False, "cpus_per_worker": 1})
    storage = tmp_path / "exp"
    run = subprocess.run(_command(space, storage), capture_output=True, text=True, env=_env(tmp_path), timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    experiment = storage / "tiny"
    found = _study(experiment)
    assert [d.name for d in found.directions] == ["MAXIMIZE", "MINIMIZE"]
    records = _tune_results(experiment)
    for trial in found.trials:
        assert trial.state == optuna.trial.TrialState.COMPLETE
        matching = [h[-1] for h in records.values() if h[-1]["val/AP"] == trial.values[0]]
        assert any(r["loss/distill"] == trial.values[1] for r in matching)
    report = json.loads((experiment / "report.json").read_text())
    front = {p["trial_id"] for p in report["pareto_front"]}
    assert front and front <= set(records)
    assert (experiment / "pareto.png").read_bytes()[:4] == b"\x89PNG"
