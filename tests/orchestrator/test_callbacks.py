"""The W&B callback's plumbing on a real Ray: what reaches a trial's logging actor, and in which order."""
from __future__ import annotations

import numpy as np
import pytest
import ray
from ray.util.queue import Queue

from orchestrator.callbacks import _SendOnlyQueue

pytestmark = pytest.mark.ray


def test_a_trials_w_and_b_items_arrive_in_the_order_they_were_sent():
    # Ray may run an async actor's calls (the queue's) out of order: an item too large to travel inline
    # (here 2 MB) was overtaken by the small end-of-run marker sent after it, every time
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        for _ in range(3):
            queue = Queue(actor_options={"num_cpus": 0})
            queue.__class__ = _SendOnlyQueue
            queue.put(("result", np.zeros(2_000_000, dtype=np.uint8)))
            queue.put(("result", 2))
            queue.put(("end", None))
            assert [queue.get(timeout=60)[0] for _ in range(3)] == ["result", "result", "end"]
    finally:
        ray.shutdown()
