"""A trial of several workers: one Ray Train run (``TorchTrainer``, DDP: NCCL on GPUs, gloo on CPUs)
whose workers run :func:`train_worker`; Ray Train restarts the worker group from the last
checkpoint after a worker fails, up to ``max_failures`` times. Imported only by such trials: Ray Train's
Torch integration costs its own start-up."""
from __future__ import annotations

import ray.tune
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks import DatasetsCallback
from ray.tune.integration.ray_train import TuneReportCallback

from orchestrator.space import SweepSpace
from orchestrator.trial_training import train_and_report


class TrainerWithoutDatasets(TorchTrainer):
    """A TorchTrainer for a training loop that reads its own COCO files (no Ray ``datasets``). Ray Train
    2.60 starts a DatasetManager actor for every run even when it has no datasets to shard: one more
    process per trial, 3.5 s of CPU each on a 2-core VM (BENCHMARKS.md). Without ``datasets`` its
    callback has nothing to do, so it is left out (``_create_default_callbacks`` is Ray's internal
    hook; Ray is pinned to 2.60.x)."""

    def _create_default_callbacks(self):
        callbacks = super()._create_default_callbacks()
        if self.datasets:
            return callbacks
        return [callback for callback in callbacks if not isinstance(callback, DatasetsCallback)]


def train_worker(config: dict) -> None:
    """Runs on every Ray Train worker; torch.distributed is already initialised by Ray. The epochs Tune
    recorded for the trial come in ``config`` (``recorded_epochs``: a worker has no Tune context to read them)."""
    recorded = set(config["recorded_epochs"])
    train_and_report(config, ray.train.get_checkpoint(), ray.train.report, ray.train.get_context().get_world_rank(),
                     recorded_epochs=lambda: recorded)


def fit_on_worker_group(loop_config: dict, *, space: SweepSpace, train_storage: str, env_vars: dict) -> None:
    """Train ``loop_config`` (what :func:`train_and_report` takes) on ``space.resources.num_workers`` Ray
    Train workers, reporting to Tune."""
    resources = space.resources
    per_worker = {"CPU": resources.cpus_per_worker}
    if resources.use_gpu:
        per_worker["GPU"] = resources.gpus_per_worker
    trainer = TrainerWithoutDatasets(
        train_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=resources.num_workers, use_gpu=resources.use_gpu,
                                     resources_per_worker=per_worker),
        run_config=RunConfig(
            name=f"train-{ray.tune.get_context().get_trial_id()}",
            storage_path=train_storage,
            failure_config=FailureConfig(max_failures=space.max_failures, controller_failure_limit=2),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=[TuneReportCallback()],
            worker_runtime_env={"env_vars": env_vars},
        ),
    )
    trainer.fit()
