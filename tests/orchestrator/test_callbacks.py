"""The W&B callback's plumbing on a real Ray: what reaches a trial's logging actor, in which order, and
that the actor's run is written before Ray's callback kills it."""
from __future__ import annotations

import os

import numpy as np
import psutil
import pytest
import ray
from ray.air.integrations.wandb import _QueueItem
from ray.util.queue import Queue

from orchestrator.callbacks import _SendOnlyQueue
from orchestrator.wandb_logging import WandbLoggingActor
from tests.helpers import wandb_summary

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_a_trials_w_and_b_items_arrive_in_the_order_they_were_sent(local_ray):
    # Ray may run an async actor's calls (the queue's) out of order: an item too large to travel inline
    # (here 2 MB) was overtaken by the small end-of-run marker sent after it, every time
    for _ in range(3):
        queue = Queue(actor_options={"num_cpus": 0})
        queue.__class__ = _SendOnlyQueue
        queue.put(("result", np.zeros(2_000_000, dtype=np.uint8)))
        queue.put(("result", 2))
        queue.put(("end", None))
        assert [queue.get(timeout=60)[0] for _ in range(3)] == ["result", "result", "end"]


def test_a_w_and_b_run_is_written_before_its_actor_reports_done(local_ray, tmp_path):
    class Logger(WandbLoggingActor):  # the actor under test, and a way to find its process
        def pid(self) -> int:
            return os.getpid()

    queue = Queue(actor_options={"num_cpus": 0})
    actor = ray.remote(num_cpus=0)(Logger).remote(logdir=str(tmp_path), queue=queue, exclude=[], to_config=[],
                                                  project="p", id="last", dir=str(tmp_path))
    done = actor.run.remote()
    queue.put((_QueueItem.RESULT, {"loss": 0.25, "training_iteration": 1}))
    queue.put((_QueueItem.END, None))
    ray.get(done, timeout=120)
    # W&B's service process, which writes the run, is gone: killing the actor now loses nothing
    assert psutil.Process(ray.get(actor.pid.remote())).children(recursive=True) == []
    ray.kill(actor)  # what Ray's W&B callback does once run() returns (and Ray kills the actor's children)
    (run_dir,) = tmp_path.glob("wandb/offline-run-*-last")
    assert wandb_summary(run_dir, tmp_path)["summary"]["loss"] == 0.25
