"""One Tune trial = one Ray Train run of ``dmkd.train.fit`` over ``num_workers`` DDP workers.

``run_trial`` is the small driver function Tune calls; it builds a ``TorchTrainer`` whose workers run
``train_worker``. Every rank calls ``ray.train.report`` once per epoch (it is a barrier); only rank 0
attaches the checkpoint folder, which holds ``checkpoint.pt``, ``metrics.json`` and, after the last
epoch, ``attention.png``.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import ray.train
import ray.tune
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks import DatasetsCallback
from ray.tune.integration.ray_train import TuneReportCallback

from dmkd.config import to_dict
from dmkd.distillers import detector_family
from dmkd.checkpoint import CHECKPOINT_NAME
from dmkd.pairing import build_distillation
from dmkd.train import TrainConfig, fit, load_data
from orchestrator.rows import Row, TrialSetup

ATTENTION_PNG = "attention.png"


def _render_attention_png(cfg: TrainConfig, data, teacher, folder: Path) -> None:
    """The teacher's attention and mask on the first validation image (DMKD-family methods only), from
    the data and teacher the trial already holds."""
    if not cfg.method.startswith("dmkd") or teacher is None:
        return
    from dmkd.distillers import method_parameters
    from dmkd.visualize import render_attention

    image, _ = data.val[0]
    device = next(teacher.parameters()).device
    features = {k: v.cpu() for k, v in teacher([image.to(device)]).items()}  # TeacherFeatures runs under no_grad
    params = {**method_parameters(cfg.method), **cfg.distill}  # the loss's own defaults: one source
    render_attention(image, features, folder / ATTENTION_PNG, temperature=params["temperature"],
                     spatial_ratio=params["spatial_ratio"], mask_mode=params["mask_mode"], masked=params["masked"])


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
                recorded = json.loads((Path(folder) / "metrics.json").read_text())
                resumed_epoch = recorded["final"]["epoch"]
                best = [e["val/AP"] for e in recorded["epochs"] if "val/AP" in e]
    node = ray.get_runtime_context().get_node_id()
    data = load_data(cfg)  # loaded once: the loop and the attention picture share data and teacher
    teacher, distiller = build_distillation(cfg, data.train.num_classes) if cfg.method != "none" else (None, None)

    def report(epoch: int, metrics: dict, written: Path | None) -> None:
        metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if "val/AP" in metrics:
            best.append(metrics["val/AP"])
        if best:
            metrics["val/AP_best"] = max(best)  # the best epoch so far (its checkpoint may not be kept)
        metrics.update(resumed_from_epoch=resumed_epoch, node_id=node)
        if written is None:
            ray.train.report(metrics, checkpoint=None)
            return
        if epoch == cfg.epochs:
            _render_attention_png(cfg, data, teacher, local)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(local)))

    try:
        fit(cfg, distiller=distiller, teacher=teacher, data=data, on_epoch_end=report, progress=False,
            resume_from=resume_from)
    finally:
        shutil.rmtree(local, ignore_errors=True)
        if resume_from is not None:
            resume_from.unlink(missing_ok=True)


def trial_dirname(trial) -> str:
    """Tune's trial folder: ``run_trial_<id>`` (Tune's default puts every parameter value in the name)."""
    return f"run_trial_{trial.trial_id}"


def trial_train_config(config: dict, *, space, setup: TrialSetup, rows: dict[str, Row] | None = None) -> TrainConfig:
    """The TrainConfig of a trial. ``config`` holds the searched values (a sweep) or a grid ``row`` and
    ``seed`` (an ablation, whose rows map names to a method and its parameters)."""
    values = dict(config)
    seed = values.pop("seed", None)
    method = None
    if "row" in values:
        row = rows[values.pop("row")]
        method, values = row.method, {**row.params, **values}
    return space.train_config(values, method=method, seed=seed, out="unused",
                              teacher_checkpoint=setup.teacher_checkpoint, data_paths=setup.data_paths)


def data_name(cfg: TrainConfig) -> str:
    return Path(cfg.train_ann).stem if cfg.train_ann else "mini-benchmark"


def flat_run_config(cfg: TrainConfig, *, space, row: str | None, versions: dict) -> dict:
    """A trial as flat, stable keys: what a W&B workspace filters, groups and draws parallel
    coordinates by. ``versions`` is :func:`dmkd.provenance.provenance`'s record."""
    from dmkd.distillers import method_settings

    flat = {"method": cfg.method, "row": row or cfg.method, "seed": cfg.seed, "pair": space.pair_name,
            "data": data_name(cfg)}
    flat.update({f"distill.{k}": list(v) if isinstance(v, tuple) else v
                 for k, v in {**method_settings(cfg.method, detector_family(cfg.detector.arch)), **cfg.distill}.items()})
    for role, detector in (("teacher", cfg.teacher if cfg.method != "none" else None), ("student", cfg.detector)):
        if detector is not None:
            flat.update({f"{role}.{k}": v for k, v in to_dict(detector).items() if k != "num_classes"})
    flat.update({f"train.{k}": getattr(cfg, k) for k in ("epochs", "max_iters", "batch_size", "optimizer", "lr",
                                                         "weight_decay", "warmup_iters", "grad_clip", "amp")})
    flat["train.ddp_workers"] = space.resources.num_workers
    flat["git_commit"] = versions.get("git_commit")
    flat["python"] = versions.get("python")
    flat.update({f"version.{k}": v for k, v in versions.get("packages", {}).items()})
    return flat


def run_name(cfg: TrainConfig, row: str | None) -> str:
    """``dmkd alpha=2e-06 seed 0``: the row (or method), its first searchable parameter, the seed."""
    from dmkd.distillers import method_settings, search_space

    parts = [row or cfg.method]
    key = next(iter(search_space(cfg.method)), None)
    if key is not None:
        value = cfg.distill.get(key, method_settings(cfg.method, detector_family(cfg.detector.arch)).get(key))
        parts.append(f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}")
    parts.append(f"seed {cfg.seed}")
    return " ".join(parts)


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


def run_trial(config: dict, *, space, setup: TrialSetup, rows: dict[str, Row] | None = None) -> None:
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
