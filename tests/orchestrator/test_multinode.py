"""A real multi-node run on one machine: a Ray head and a second node as separate processes, then a
sweep that joins them with --address: its teacher trained as a Ray task (progress on the driver's
terminal, a weights-only cache), its trials placed on both nodes. The same run (one Ray start serves all)
checks the multi-objective search (two objectives) and the reference row: each trial's Δ AP against the
undistilled student of the same budget and seed, everywhere the sweep writes it. (The reference comes from
its cache, written here with a known AP: tiny trials score 0.0, against which every Δ would be 0.0. Its
training through the trial machinery, and its pairing with the rows, are tests/orchestrator/test_report.py's.)"""
import csv
import json
import os
import subprocess

import pytest
import torch
from ray.cluster_utils import Cluster

from orchestrator.experiment import data_paths
from orchestrator.reference import reference_folder
from orchestrator.space_file import load_space
from tests.helpers import TINY, command_env, study, sweep_command, tiny_space, tune_results, wandb_summary

pytestmark = pytest.mark.ray


def test_sweep_on_a_two_node_cluster(tmp_path, mini_data):
    os.environ["RAY_AUTH_MODE"] = "disabled"
    # 3 CPUs a node: one trial (2 CPUs) fills a node, so two trials at once must land on different nodes.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3})
    try:
        second = cluster.add_node(num_cpus=3)
        cluster.wait_for_nodes()
        nodes = {cluster.head_node.node_id, second.node_id}
        space = tiny_space(tmp_path, mini_data, num_samples=2, max_concurrent=2, scheduler={"type": "none"},
                           budget={"epochs": 1, "max_iters": 2},
                           resources={"num_workers": 1, "use_gpu": False, "cpus_per_worker": 2},
                           pair={"teacher": TINY, "student": TINY, "train_teacher": True, "teacher_epochs": 2},
                           objective={"metric": "val/AP", "mode": "max", "second_metric": "loss/distill",
                                      "second_mode": "min"}, reference=True)
        storage = tmp_path / "exp"
        swept = load_space(space)
        reference_cache = reference_folder(swept, data_paths(swept), storage / "references")
        reference_cache.mkdir(parents=True)
        figures = {"epoch": 1, "val/AP": 0.111}
        (reference_cache / "seed0.json").write_text(json.dumps({"seed": 0, "history": [figures], "final": figures}))
        run = subprocess.run(sweep_command(space, storage, "--address", cluster.address), capture_output=True,
                             text=True, env=command_env(tmp_path), timeout=900)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        experiment = storage / "tiny"

        # the teacher: one progress line per epoch on the driver, a cache file of about the weights' size
        # beside the full checkpoint (optimizer state included) that resuming its training would read
        progress = [line for line in run.stdout.splitlines() if line.startswith("teacher: epoch")]
        assert [line.split()[2] for line in progress] == ["1/2", "2/2"] and "val AP" in progress[-1], run.stdout[-3000:]
        (cached,) = (storage / "teachers").glob("*/teacher.pt")
        state = torch.load(cached, map_location="cpu", weights_only=True)
        weights = sum(t.numel() * t.element_size() for t in state["model"].values())
        assert cached.stat().st_size <= 1.2 * weights and len(state["history"]) == 2
        full = cached.parent / "training" / "checkpoint.pt"
        assert full.stat().st_size > 1.5 * weights and "optimizer" in torch.load(full, map_location="cpu", weights_only=True)
        records = tune_results(experiment)
        placed = {history[-1]["node_id"] for history in records.values()}
        assert placed == nodes

        # two objectives: a multi-objective Optuna study told both values, and the report's Pareto front
        found = study(experiment)
        assert [d.name for d in found.directions] == ["MAXIMIZE", "MINIMIZE"]
        assert [t.state.name for t in found.trials] == ["COMPLETE", "COMPLETE"]
        for trial in found.trials:
            matching = [h[-1] for h in records.values() if h[-1]["val/AP"] == trial.values[0]]
            assert any(r["loss/distill"] == trial.values[1] for r in matching)
        report = json.loads((experiment / "report.json").read_text())

        # the reference row: its AP in the report, each trial's Δ AP in every record the sweep writes
        assert f"reference: cached in {reference_cache}" in run.stdout
        reference_ap = json.loads((experiment / "reference.json").read_text())["0"]["final"]["val/AP"]
        assert report["reference_AP"] == reference_ap == report["pair"]["student"]["AP_without_distillation"] == 0.111
        with (experiment / "results.csv").open() as handle:
            stored = {row["trial_id"]: row["delta_AP"] for row in csv.DictReader(handle)}
        assert len(report["leaderboard"]) == len(stored) == 2
        for entry in report["leaderboard"]:
            history = records[entry["trial_id"]]
            expected = history[-1]["val/AP"] - reference_ap
            assert expected != 0
            assert entry["delta_AP"] == pytest.approx(expected) and stored[entry["trial_id"]] == str(entry["delta_AP"])
            (line,) = [line for line in run.stdout.splitlines() if line.startswith(f"run_trial_{entry['trial_id']} ")]
            assert f"{expected:+.4f}" in line  # the terminal's leaderboard
            (run_dir,) = (experiment / "wandb").glob(f"offline-run-*-{entry['trial_id']}")
            assert wandb_summary(run_dir, tmp_path)["summary"]["val/delta_AP"] == pytest.approx(expected)
        assert {p["trial_id"] for p in report["pareto_front"]} <= set(records) and report["pareto_front"]
        assert (experiment / "pareto.png").read_bytes()[:4] == b"\x89PNG"

        # with a cluster running on this machine (its address where `ray start` leaves it), no --address
        # starts a Ray of the command's own: Ray's own default joined the cluster and refused the CPU count
        # given with a traceback; Ray's RAY_ADDRESS (what `ray job submit` gives its command) is joined
        import ray

        from orchestrator.experiment import start_ray, stop_ray, wait_for_ray

        start_ray(None, swept, {})
        try:
            assert ray.get_runtime_context().gcs_address != cluster.address and len(ray.nodes()) == 1
        finally:
            stop_ray()
            wait_for_ray()
        planned = subprocess.run(sweep_command(space, storage, "--dry-run", "--name", "joined"), capture_output=True,
                                 text=True, env={**command_env(tmp_path), "RAY_ADDRESS": cluster.address}, timeout=300)
        assert planned.returncode == 0 and json.loads(planned.stdout)["ray"] == cluster.address, planned.stderr
        assert f"ray: joining the cluster at {cluster.address} (RAY_ADDRESS)" in planned.stderr
    finally:
        cluster.shutdown()
