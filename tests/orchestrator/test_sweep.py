"""Real sweeps on a local Ray (the first with 2 gloo workers per trial), tiny budgets, real Optuna SQLite, W&B offline.
One Ray instance at a time: each sweep runs as its own `python -m orchestrator.sweep` process."""
import csv
import json
import subprocess

import optuna
import pytest

from tests.helpers import command_env as _env
from tests.helpers import study as _study
from tests.helpers import sweep_command as _command
from tests.helpers import tiny_space as _space
from tests.helpers import tune_results as _tune_results
from tests.helpers import wandb_run_record, wandb_summary

pytestmark = pytest.mark.ray


def test_small_sweep_records_every_trial_everywhere(tmp_path, mini_data):
    storage = tmp_path / "exp"
    # The objective is the distill loss, which grows with alpha: the first trial has the paper's alpha
    # (2e-5, near the bottom of the range), so ASHA stops the seeded sampler's larger-alpha trial. (Two
    # trials: each costs ~40 s of Ray process start-up here, and two show a completed and a stopped one.)
    space = _space(tmp_path, mini_data, num_samples=2, objective={"metric": "loss/distill", "mode": "min"},
                   resources={"num_workers": 2, "use_gpu": False, "cpus_per_worker": 1},  # each trial DDP over 2
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
    assert len(trials) == 2
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
        summary = wandb_summary(run_dir, tmp_path)
        history = tune_results[trial_id]
        assert summary["tags"] == ["dmkd", "variant:dmkd", "seed:0"]
        assert summary["summary"]["epoch"] == history[-1]["epoch"]
        assert summary["summary"]["val/AP"] == pytest.approx(history[-1]["val/AP"])
        assert summary["summary"]["val/AP_best"] == pytest.approx(max(h["val/AP"] for h in history))
        config = summary["config"]  # the whole resolved trial as flat keys, not only the searched values
        assert config["method"] == "dmkd" and config["seed"] == 0 and config["distill.spatial_ratio"] == 0.65
        assert config["distill.alpha"] == pytest.approx(history[0]["config"]["alpha"])
        assert config["teacher.backbone"] == config["student.backbone"] == "resnet10_quarter"
        assert config["train.epochs"] == 2 and config["git_commit"] and config["version.ray"]
        assert summary["name"] == f"dmkd alpha={history[0]['config']['alpha']:.3g} seed 0"
        assert "val/delta_AP" not in summary["summary"]  # no reference row in this space (test_multinode has one)
        assert "this project's reading of Dual Masked" in wandb_run_record(run_dir, tmp_path)["notes"]
        # DMKD's picture, drawn by rank 0 after the last epoch (not by a trial ASHA stopped before it)
        logged = [p.name for p in (run_dir / "files" / "media" / "images").glob("*.png")]
        assert [n.startswith("attention_") for n in logged] == ([True] if history[-1]["epoch"] == 2 else [])

    report = json.loads((experiment / "report.json").read_text())
    assert report["reference_AP"] is None and all(e["delta_AP"] is None for e in report["leaderboard"])
    for entry in report["leaderboard"]:  # the terminal's leaderboard: a line per trial, no Δ without a reference
        (line,) = [line for line in run.stdout.splitlines() if line.startswith(f"run_trial_{entry['trial_id']} ")]
        assert " - " in line

    # trials ASHA stopped: the rung's rank check (too few completed trials here to say), one budget in plots
    (rung,) = report["rungs"]
    assert rung["epoch"] == 1 and rung["stopped"] == len(pruned) and "too few trials" in rung["warning"]
    assert report["compared_at_epoch"] == 1 and "importances skipped: 2 trials reached epoch 1" in \
        (experiment / "report.md").read_text()

    # reproducibility: the sweep wrote its plan, resolved space and provenance
    record = json.loads((experiment / "sweep.json").read_text())
    assert record["space"]["num_samples"] == 2 and "git_commit" in record and record["packages"]["ray"]
