"""A real multi-node run on one machine: a Ray head and a second node as separate processes, then a
sweep that joins them with --address, its trials placed on both nodes."""
import os
import subprocess

import pytest
from ray.cluster_utils import Cluster

from tests.sweep_helpers import study, sweep_command, sweep_env, tiny_space, tune_results

pytestmark = pytest.mark.slow


def test_sweep_on_a_two_node_cluster(tmp_path, mini_data):
    os.environ["RAY_AUTH_MODE"] = "disabled"
    # 3 CPUs a node: one trial (1 for its driver + 2 for its Train worker) fills a node, so two trials
    # at once must land on different nodes.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3})
    try:
        second = cluster.add_node(num_cpus=3)
        cluster.wait_for_nodes()
        nodes = {cluster.head_node.node_id, second.node_id}
        space = tiny_space(tmp_path, mini_data, num_samples=2, max_concurrent=2, scheduler={"type": "none"},
                           budget={"epochs": 1, "max_iters": 2},
                           resources={"num_workers": 1, "use_gpu": False, "cpus_per_worker": 2})
        storage = tmp_path / "exp"
        run = subprocess.run(sweep_command(space, storage, "--address", cluster.address), capture_output=True,
                             text=True, env=sweep_env(tmp_path), timeout=900)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        experiment = storage / "tiny"
        placed = {history[-1]["node_id"] for history in tune_results(experiment).values()}
        assert placed == nodes
        assert [t.state.name for t in study(experiment).trials] == ["COMPLETE", "COMPLETE"]
    finally:
        cluster.shutdown()
