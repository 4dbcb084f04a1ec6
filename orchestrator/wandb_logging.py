"""The actor that writes one trial's W&B run: Ray's own (``ray.air.integrations.wandb``), made to report
done only once W&B has written the run. It lives apart from :mod:`orchestrator.callbacks` so that its
process imports W&B and Ray Tune only, not torch."""
from __future__ import annotations

import wandb
from ray.air.integrations.wandb import _WandbLoggingActor


class WandbLoggingActor(_WandbLoggingActor):
    """``run.finish()`` returns before W&B's service process, a child of this actor's process, has
    written the run to its ``.wandb`` file: it does so when told to shut down, which Python's exit
    would do. But Ray's W&B callback kills this actor as soon as ``run`` returns, and Ray kills the
    actor's child processes with it: a trial that ended last, with nothing else keeping the driver
    busy, lost every record of its run (its file held W&B's 7-byte header only). ``wandb.teardown()``
    waits for the service to write everything and exit."""

    def run(self):
        try:
            super().run()
        finally:
            wandb.teardown()
