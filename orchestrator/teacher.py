"""The sweep's teacher: a given checkpoint, or one trained once as its own Ray task and cached."""
from __future__ import annotations

import dataclasses
import time
from functools import partial
from pathlib import Path

import ray
import torch
from ray.util.queue import Queue

from dmkd.checkpoint import CHECKPOINT_NAME
from dmkd.config import DataPaths, TrainConfig, to_dict
from dmkd.engine import fit, load_data
from dmkd.errors import UserError
from dmkd.evaluate import evaluate_detector
from dmkd.identify import mismatch
from dmkd.io import atomic_write, read_torch
from dmkd.metrics import epochs_done, split_figures
from dmkd.models import build_detector, load_weights, weights_classes
from dmkd.pairing import TEACHER_FIX
from dmkd.weights import categories, labels_by_name
from orchestrator.cache_key import data_fingerprint, training_key
from orchestrator.space import SweepSpace

PROGRESS_POLL_S = 2.0
# What distillation and the report read from a cached teacher; the optimizer state (two thirds of the
# training checkpoint) stays with the teacher's own training run, which is what resuming needs.
CACHED_KEYS = ("model", "config", "history", "data")


def teacher_config(space: SweepSpace, data_paths: DataPaths, out: Path) -> TrainConfig:
    return TrainConfig(data=data_paths, out=str(out), detector=space.pair.teacher, epochs=space.pair.teacher_epochs,
                       seed=space.seed, resume=True, **{k: v for k, v in space.fixed.items()
                                                         if k in ("batch_size", "num_workers", "device", "amp")})


def _train(cfg_dict: dict, final: str, progress: Queue) -> str:
    """Runs as a Ray task, on whichever node has the CPUs: trains (or resumes) the teacher, sends one
    progress record per epoch through ``progress``, and writes the weights-only cache file ``final``."""
    cfg = TrainConfig.from_dict(cfg_dict)
    torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
    started, first_epoch = time.monotonic(), []

    def report(epoch: int, metrics: dict, _written) -> None:
        first_epoch.append(epoch)
        elapsed = time.monotonic() - started
        per_epoch = elapsed / (epoch - first_epoch[0] + 1)  # epochs run by this task (a resume skips some)
        progress.put({"epoch": epoch, "epochs": cfg.epochs, "loss": metrics.get("loss/total"),
                      "val_AP": metrics.get("val/AP"), "elapsed_s": elapsed, "eta_s": per_epoch * (cfg.epochs - epoch)})

    fit(cfg, progress=False, on_epoch_end=report)
    state = read_torch(Path(cfg.out) / CHECKPOINT_NAME)
    atomic_write(final, lambda handle: torch.save({k: state[k] for k in CACHED_KEYS}, handle), mode="wb")
    return final


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def progress_line(record: dict) -> str:
    """``teacher: epoch 3/8  loss 1.234  val AP 0.412  2m10s elapsed, ETA 3m15s``"""
    parts = [f"teacher: epoch {record['epoch']}/{record['epochs']}"]
    if record.get("loss") is not None:
        parts.append(f"loss {record['loss']:.3f}")
    if record.get("val_AP") is not None:
        parts.append(f"val AP {record['val_AP']:.3f}")
    parts.append(f"{_duration(record['elapsed_s'])} elapsed, ETA {_duration(record['eta_s'])}")
    return "  ".join(parts)


def teacher_folder(space: SweepSpace, data_paths: DataPaths, cache_root: Path) -> Path:
    """The cache folder of this teacher: one per (detector, training settings, seed, data content)."""
    key = training_key(teacher_config(space, data_paths, Path(".")))
    return cache_root / f"{space.pair.teacher.arch}-{space.pair.teacher.backbone}-{key}"


def training_plan(space: SweepSpace, training: Path) -> str:
    """What the teacher's task will do: train from the start, or continue the run an earlier sweep
    stopped (its epochs are in ``training``, which ``dmkd.engine.fit`` resumes from)."""
    what = f"{space.pair.teacher.arch}/{space.pair.teacher.backbone}"
    done = epochs_done(training) if (training / CHECKPOINT_NAME).is_file() else 0
    if done:
        return f"continuing {what} after epoch {done} of {space.pair.teacher_epochs} (an earlier run stopped there)"
    return f"training {what} for {space.pair.teacher_epochs} epochs"


def ensure_teacher(space: SweepSpace, data_paths: DataPaths, cache_root: Path | None,
                   log=partial(print, flush=True)) -> str | None:
    """The teacher checkpoint path: ``pair.teacher_checkpoint``, or the cached one for this teacher,
    data and seed under ``cache_root``, trained first (resumably) as a Ray task when missing; None when
    the teacher comes from its pretrained weights (``pair.teacher.weights``). A cloud storage has no
    cache (``cache_root`` None)."""
    if space.pair.teacher.weights:
        log(f"teacher: {space.pair.teacher.arch} with pretrained weights {space.pair.teacher.weights}")
        return None
    if space.pair.teacher_checkpoint:
        if not Path(space.pair.teacher_checkpoint).is_file():
            raise UserError(f"pair.teacher_checkpoint: {space.pair.teacher_checkpoint}: file not found")
        return str(Path(space.pair.teacher_checkpoint).resolve())
    if cache_root is None:
        raise UserError("pair.train_teacher: caching a trained teacher needs a filesystem --storage (local or "
                        "NFS); with a cloud URI, train the teacher first and set pair.teacher_checkpoint")
    folder = teacher_folder(space, data_paths, cache_root)
    final = folder / "teacher.pt"
    if final.is_file():
        log(f"teacher: cached at {final}")
        return str(final)
    cfg = teacher_config(space, data_paths, folder / "training")
    log(f"teacher: {training_plan(space, Path(cfg.out))} as a Ray task, cached at {final}")
    # The CPUs of one node (a task runs on one node, so a cluster's total would never be placed): the
    # teacher trains before any trial, so it may use all of them.
    largest_node = max((node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"]), default=1)
    resources = {"num_cpus": max(1, int(min(largest_node, ray.available_resources().get("CPU", 1))))}
    if space.resources.use_gpu:
        resources["num_gpus"] = 1
    # Ray's log forwarding is off (trials would flood the terminal): the task's epochs come back
    # through a queue actor instead, from any node.
    progress = Queue(actor_options={"num_cpus": 0})
    try:
        task = ray.remote(**resources)(_train).remote(to_dict(cfg), str(final), progress)
        done: list = []
        while not done:
            done, _ = ray.wait([task], timeout=PROGRESS_POLL_S)
            while not progress.empty():
                log(progress_line(progress.get_nowait()))
        ray.get(task)  # the task's own error, if it failed
    finally:
        progress.shutdown()
    return str(final)  # its presence means the teacher finished


def _evaluate(cfg_dict: dict, checkpoint: str | None, device: str = "cpu") -> dict:
    cfg = TrainConfig.from_dict(cfg_dict)
    data = load_data(cfg)
    classes = weights_classes(cfg.detector) or data.train.num_classes
    detector = build_detector(dataclasses.replace(cfg.detector, num_classes=classes), "pair.teacher")
    if checkpoint:
        load_weights(detector, checkpoint, explain=lambda state: mismatch(checkpoint, state, cfg.detector, "teacher", TEACHER_FIX))
    names = categories(cfg.detector.weights)
    figures = {}
    for split, dataset in (("val", data.val), ("test", data.test)):
        if dataset is not None:
            # torchvision's COCO labels are COCO category ids; the data's are 1..K: matched by class name
            mapping = labels_by_name(names, dataset.coco, f"pair.teacher.weights ({cfg.detector.weights})") if names else None
            found, _ = evaluate_detector(detector.to(device), dataset, torch.device(device), cfg.batch_size,
                                         label_to_category=mapping)
            figures.update(split_figures(split, found))
    return figures


def recorded_figures(checkpoint: str | None, data_paths: DataPaths) -> dict | None:
    """The validation (and test) figures a ``dmkd.train`` checkpoint recorded after its last epoch, when
    that evaluation used the same held-out data (by content: a copy in another folder counts); None
    otherwise (a plain state dict, an older checkpoint, other held-out sets or files no longer there, or
    no evaluation in the last epoch)."""
    if checkpoint is None:
        return None
    try:
        state = read_torch(checkpoint)
    except Exception:  # load_weights reports unreadable files; here they just mean "evaluate"
        return None
    if not isinstance(state, dict) or not state.get("history") or not isinstance(state.get("data"), dict):
        return None
    keys = ("val_ann", "val_images", "test_ann", "test_images")
    stored = {k: v for k, v in state["data"].items() if k in keys}
    if not all(Path(v).exists() for v in stored.values()):
        return None
    held_out = {k: v for k, v in data_paths.as_dict().items() if k in keys}
    if data_fingerprint(DataPaths(**held_out)) != data_fingerprint(DataPaths(**stored)):
        return None
    last = state["history"][-1]
    figures = {k: v for k, v in last.items() if k.startswith(("val/", "test/"))}
    complete = "val/AP" in figures and ("test/AP" in figures or "test_ann" not in held_out)
    return figures if complete else None


def evaluate_teacher(space: SweepSpace, data_paths: DataPaths, checkpoint: str | None) -> dict:
    """The teacher's COCO figures on the validation set (the report's teacher row): those its
    checkpoint recorded on the same validation set, else a fresh evaluation as a Ray task."""
    figures = recorded_figures(checkpoint, data_paths)
    source = "checkpoint"
    if figures is None:
        cfg = teacher_config(space, data_paths, Path("."))
        gpu = space.resources.use_gpu  # a COCO-sized teacher on a CPU would hold the sweep back for an hour
        figures = ray.get(ray.remote(num_cpus=1, num_gpus=1 if gpu else 0)(_evaluate).remote(
            to_dict(cfg), checkpoint, "cuda" if gpu else "cpu"))
        source = "evaluated"
    return {"checkpoint": checkpoint, "detector": to_dict(space.pair.teacher), "figures_from": source, **figures}
