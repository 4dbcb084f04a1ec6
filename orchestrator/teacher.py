"""The sweep's teacher: a given checkpoint, or one trained once as its own Ray task and cached."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import ray

from dmkd.config import to_dict
from dmkd.errors import UserError
from dmkd.train import CHECKPOINT_NAME, TrainConfig, fit


def teacher_config(space, data_paths: dict, out: Path) -> TrainConfig:
    return TrainConfig(**data_paths, out=str(out), detector=space.pair.teacher, epochs=space.pair.teacher_epochs,
                       seed=space.seed, resume=True, **{k: v for k, v in space.fixed.items()
                                                         if k in ("batch_size", "num_workers", "device", "amp")})


def _train(cfg_dict: dict) -> str:
    cfg = TrainConfig.from_dict(cfg_dict)
    fit(cfg, progress=False)
    return str(Path(cfg.out) / CHECKPOINT_NAME)


def ensure_teacher(space, data_paths: dict, cache_root: Path, log=print) -> str:
    """The teacher checkpoint path: ``pair.teacher_checkpoint``, or the cached one for this teacher,
    data and seed, trained first (resumably) as a Ray task when missing."""
    if space.pair.teacher_checkpoint:
        if not Path(space.pair.teacher_checkpoint).is_file():
            raise UserError(f"pair.teacher_checkpoint: {space.pair.teacher_checkpoint}: file not found")
        return str(Path(space.pair.teacher_checkpoint).resolve())
    if "://" in str(cache_root):
        raise UserError("pair.train_teacher: caching a trained teacher needs a filesystem --storage (local or "
                        "NFS); with a cloud URI, train the teacher first and set pair.teacher_checkpoint")
    probe = teacher_config(space, data_paths, Path("."))
    key_source = json.dumps({**to_dict(probe), "out": None}, sort_keys=True)
    key = hashlib.sha256(key_source.encode()).hexdigest()[:12]
    folder = cache_root / f"{space.pair.teacher.arch}-{space.pair.teacher.backbone}-{key}"
    final = folder / "teacher.pt"
    if final.is_file():
        log(f"teacher: cached at {final}")
        return str(final)
    log(f"teacher: training {space.pair.teacher.arch}/{space.pair.teacher.backbone} for "
        f"{space.pair.teacher_epochs} epochs as a Ray task, cached at {final}")
    cfg = teacher_config(space, data_paths, folder / "training")
    resources = {"num_cpus": max(1, int(ray.available_resources().get("CPU", 1)) - 1)}
    if space.resources.use_gpu:
        resources["num_gpus"] = 1
    checkpoint = ray.get(ray.remote(**resources)(_train).remote(to_dict(cfg)))
    os.replace(checkpoint, final)  # its presence means the teacher finished
    return str(final)


def _evaluate(cfg_dict: dict, checkpoint: str) -> dict:
    import dataclasses

    import torch

    from dmkd.models import build_detector, load_weights
    from dmkd.train import evaluate_detector, load_data

    cfg = TrainConfig.from_dict(cfg_dict)
    data = load_data(cfg)
    detector = build_detector(dataclasses.replace(cfg.detector, num_classes=data.train.num_classes))
    load_weights(detector, checkpoint)
    figures = {}
    for split, dataset in (("val", data.val), ("test", data.test)):
        if dataset is not None:
            found, _ = evaluate_detector(detector, dataset, torch.device("cpu"), cfg.batch_size)
            figures.update({f"{split}/{k}": v for k, v in found.items()})
    return figures


def recorded_figures(checkpoint: str, data_paths: dict) -> dict | None:
    """The validation (and test) figures a ``dmkd.train`` checkpoint recorded after its last epoch, when
    that evaluation used these held-out images and annotations; None otherwise (a plain state dict, an
    older checkpoint, other held-out sets, or no evaluation in the last epoch)."""
    import torch

    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception:  # load_weights reports unreadable files; here they just mean "evaluate"
        return None
    if not isinstance(state, dict) or not state.get("history") or not isinstance(state.get("data"), dict):
        return None
    keys = ("val_ann", "val_images", "test_ann", "test_images")
    wanted = {k: str(Path(data_paths[k]).resolve()) if k in data_paths else None for k in keys}
    if any(state["data"].get(k) != v for k, v in wanted.items()):
        return None
    last = state["history"][-1]
    figures = {k: v for k, v in last.items() if k.startswith(("val/", "test/"))}
    complete = "val/AP" in figures and ("test/AP" in figures or wanted["test_ann"] is None)
    return figures if complete else None


def evaluate_teacher(space, data_paths: dict, checkpoint: str) -> dict:
    """The teacher's COCO figures on the validation set (the report's teacher row): those its
    checkpoint recorded on the same validation set, else a fresh evaluation as a Ray task."""
    figures = recorded_figures(checkpoint, data_paths)
    source = "checkpoint"
    if figures is None:
        cfg = teacher_config(space, data_paths, Path("."))
        figures = ray.get(ray.remote(num_cpus=1)(_evaluate).remote(to_dict(cfg), checkpoint))
        source = "evaluated"
    return {"checkpoint": checkpoint, "detector": to_dict(space.pair.teacher), "figures_from": source, **figures}
