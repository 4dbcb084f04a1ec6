"""The trainable: one Tune trial = one Ray Train run of ``dmkd.engine.fit`` over ``num_workers`` DDP
workers, and what a trial receives (its values from Tune, and the experiment's :class:`TrialSetup`).

``run_trial`` is the small driver function Tune calls; it builds a ``TorchTrainer`` whose workers run
``train_worker``. Every rank calls ``ray.train.report`` once per epoch (it is a barrier); only rank 0
attaches the checkpoint folder, which holds ``checkpoint.pt``, ``metrics.json`` and, after the last
epoch, the method's picture (``attention.png``, DMKD's).
"""
from __future__ import annotations

import dataclasses
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import ray.train
import ray.tune
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks import DatasetsCallback
from ray.tune.integration.ray_train import TuneReportCallback

from dmkd.checkpoint import CHECKPOINT_NAME
from dmkd.config import DataPaths, TrainConfig, to_dict
from dmkd.distillers import detector_family, method_parameters, picture_of
from dmkd.engine import Data, fit, load_data
from dmkd.metrics import BEST_VAL_AP, VAL_AP, read_metrics
from dmkd.pairing import build_distillation
from orchestrator.grid import Row
from orchestrator.space import SweepSpace

PICTURE_PNG = "attention.png"


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of one experiment receives beside its own values."""

    teacher_checkpoint: str | None
    data_paths: DataPaths
    train_storage: str  # where Ray Train keeps the trial's checkpoints
    env_vars: dict = field(default_factory=dict)

    def stored_in(self, train_storage: str) -> TrialSetup:
        return dataclasses.replace(self, train_storage=train_storage)

    def without_test(self) -> TrialSetup:
        """The setup of a trial that selects (a sweep's, a tuning run's): it never sees the test split."""
        return dataclasses.replace(self, data_paths=self.data_paths.without_test())


def _draw_picture(cfg: TrainConfig, data: Data, teacher, folder: Path) -> None:
    """The method's own picture of the run (DMKD: the teacher's attention and masks) on the first
    validation image, from the data and teacher the trial already holds; nothing for other methods."""
    picture = picture_of(cfg.method)
    if picture is None or teacher is None:
        return
    image, _ = data.val[0]
    device = next(teacher.parameters()).device
    features = {k: v.cpu() for k, v in teacher([image.to(device)]).items()}  # TeacherFeatures runs under no_grad
    params = {**method_parameters(cfg.method, detector_family(cfg.detector.arch)), **cfg.distill}
    picture(image, features, params, folder / PICTURE_PNG)


def train_worker(config: dict) -> None:
    """Runs on every Ray Train worker; torch.distributed is already initialised by Ray."""
    rank = ray.train.get_context().get_world_rank()
    local = Path(tempfile.mkdtemp(prefix=f"dmkd-rank{rank}-"))
    cfg = TrainConfig.from_dict({**config["train"], "out": str(local)})
    resume_from, resumed_epoch, best = None, 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # a restarted worker group, or a restored sweep: continue from the last epoch
        with checkpoint.as_directory() as folder:
            if (Path(folder) / CHECKPOINT_NAME).is_file():
                resume_from = local.with_name(local.name + "-resume.pt")  # beside, not inside, the checkpoint folder
                shutil.copy(Path(folder) / CHECKPOINT_NAME, resume_from)
                recorded = read_metrics(folder)
                resumed_epoch = recorded["final"]["epoch"]
                best = [e[VAL_AP] for e in recorded["epochs"] if VAL_AP in e]
    node = ray.get_runtime_context().get_node_id()
    data = load_data(cfg)  # loaded once: the loop and the attention picture share data and teacher
    teacher, distiller = build_distillation(cfg, data.train.num_classes) if cfg.method != "none" else (None, None)

    def report(epoch: int, metrics: dict, written: Path | None) -> None:
        metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if VAL_AP in metrics:
            best.append(metrics[VAL_AP])
        if best:
            metrics[BEST_VAL_AP] = max(best)  # the best epoch so far (its checkpoint may not be kept)
        metrics.update(resumed_from_epoch=resumed_epoch, node_id=node)
        if written is None:
            ray.train.report(metrics, checkpoint=None)
            return
        if epoch == cfg.epochs:
            _draw_picture(cfg, data, teacher, local)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(local)))

    try:
        fit(cfg, distiller=distiller, teacher=teacher, data=data, on_epoch_end=report, progress=False,
            resume_from=resume_from)
    finally:
        shutil.rmtree(local, ignore_errors=True)
        if resume_from is not None:
            resume_from.unlink(missing_ok=True)


def trial_train_config(config: dict, *, space: SweepSpace, setup: TrialSetup,
                       rows: dict[str, Row] | None = None) -> TrainConfig:
    """The TrainConfig of a trial. ``config`` holds the searched values (a sweep) or a grid ``row`` and
    ``seed`` (an ablation, whose rows map names to a method and its parameters)."""
    values = dict(config)
    seed = values.pop("seed", None)
    method = None
    if "row" in values:
        if rows is None:
            raise ValueError("a trial of a grid row needs the grid's rows")
        row = rows[values.pop("row")]
        method, values = row.method, {**row.params, **values}
    return space.train_config(values, method=method, seed=seed, out="unused",
                              teacher_checkpoint=setup.teacher_checkpoint, data_paths=setup.data_paths)


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


def run_trial(config: dict, *, space: SweepSpace, setup: TrialSetup, rows: dict[str, Row] | None = None) -> None:
    """The Tune trainable (see :func:`trial_train_config` for ``config``); ``space`` (a SweepSpace),
    ``setup`` (teacher checkpoint, data paths, Train storage) and ``rows`` arrive through
    ``tune.with_parameters``. A deterministic Train run name per trial lets a restored sweep find the
    run and its checkpoints."""
    train_cfg = trial_train_config(config, space=space, setup=setup, rows=rows)
    resources = space.resources
    per_worker = {"CPU": resources.cpus_per_worker}
    if resources.use_gpu:
        per_worker["GPU"] = resources.gpus_per_worker
    trainer = TrainerWithoutDatasets(
        train_worker,
        train_loop_config={"train": to_dict(train_cfg)},
        scaling_config=ScalingConfig(num_workers=resources.num_workers, use_gpu=resources.use_gpu,
                                     resources_per_worker=per_worker),
        run_config=RunConfig(
            name=f"train-{ray.tune.get_context().get_trial_id()}",
            storage_path=setup.train_storage,
            failure_config=FailureConfig(max_failures=space.max_failures, controller_failure_limit=2),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=[TuneReportCallback()],
            worker_runtime_env={"env_vars": setup.env_vars},
        ),
    )
    trainer.fit()
