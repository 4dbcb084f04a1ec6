"""The training loop: the data of a run, the student and its distiller set up once, the epochs with
their evaluation, checkpoints and figures. Under ``torch.distributed`` the model is wrapped in DDP, the
data sharded, metrics reduced, and only rank 0 writes files; a one-process group is not distributed.

Writes into ``cfg.out``: ``run.json`` (resolved config, seed, git commit, package versions),
``checkpoint.pt`` (every epoch, atomically; :mod:`dmkd.checkpoint`), ``metrics.json`` (per-epoch
figures, ``final`` holds the last; :mod:`dmkd.metrics`) and ``predictions.json`` (COCO results with the
data set's original category ids). The step is :mod:`dmkd.step`, evaluation :mod:`dmkd.evaluate`, the
command line :mod:`dmkd.train`.
"""
from __future__ import annotations

import dataclasses
import json
import time
import zlib
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from dmkd import distributed as dist_utils
from dmkd.checkpoint import CHECKPOINT_NAME, load_checkpoint, restore, save_checkpoint
from dmkd.config import DataPaths, TrainConfig, to_dict
from dmkd.data import CocoDetection, EpochTaggedSampler, SeededAugmentation, collate
from dmkd.errors import UserError
from dmkd.evaluate import evaluate_detector
from dmkd.io import atomic_write_json
from dmkd.metrics import split_figures, write_metrics
from dmkd.models import build_detector, weights_classes
from dmkd.pairing import build_distillation
from dmkd.provenance import provenance
from dmkd.step import StudentWithDistiller, build_optimizer, build_scheduler, train_step
from dmkd.synthetic import ensure_mini_benchmark
from dmkd.transforms import eval_transforms, train_transforms


@dataclass
class Data:
    train: CocoDetection
    val: CocoDetection
    paths: DataPaths
    test: CocoDetection | None = None


def load_data(cfg: TrainConfig) -> Data:
    """Build the data sets (generating the mini-benchmark when no paths are given)."""
    paths = cfg.data if cfg.data.given else ensure_mini_benchmark(cfg.data_dir)
    size = cfg.detector.image_size
    train = CocoDetection(*paths.files("train"), train_transforms(size))
    val = CocoDetection(*paths.files("val"), eval_transforms(size))
    test = CocoDetection(*paths.files("test"), eval_transforms(size)) if paths.test_ann else None
    for held_out in (split for split in (val, test) if split is not None):
        if train.category_ids != held_out.category_ids:
            raise UserError(f"{held_out.ann_file}: categories differ from those of {paths.train_ann}")
    if len(train) == 0:
        raise UserError(f"{paths.train_ann}: has no images")
    return Data(train, val, paths, test)


def state_fingerprint(module: nn.Module) -> int:
    """CRC-32 of a module's state: two runs that print the same number started from the same weights."""
    crc = 0
    for name, tensor in module.state_dict().items():
        crc = zlib.crc32(name.encode(), crc)
        crc = zlib.crc32(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes(), crc)
    return crc


def resolve_device(name: str) -> torch.device:
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("device: 'cuda' was asked for, but no CUDA device is available")
    return torch.device("cuda", torch.cuda.current_device())  # torchrun / Ray Train set it per rank


EpochCallback = Callable[[int, dict, Path | None], None]


@dataclass
class Run:
    """What the loop works with, set up once by :func:`prepare`."""

    cfg: TrainConfig
    data: Data
    device: torch.device
    out: Path
    model: StudentWithDistiller
    ddp_model: nn.Module
    teacher: nn.Module | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sampler: EpochTaggedSampler
    loader: torch.utils.data.DataLoader
    iters_per_epoch: int
    pairing: dict
    checkpoint_path: Path
    resume_state: dict | None  # the checkpoint to continue from, read (and checked) before anything was written
    record: dict  # run.json, written once this session's first step has succeeded
    recorded: bool = False


def fit(cfg: TrainConfig, *, distiller: nn.Module | None = None, teacher: nn.Module | None = None,
        data: Data | None = None, on_epoch_end: EpochCallback | None = None, progress: bool = True,
        resume_from: str | Path | None = None) -> dict:
    """Train ``cfg.detector`` and return the final epoch's metrics.

    ``teacher`` (a :class:`~dmkd.models.TeacherFeatures`) and ``distiller`` (see
    :mod:`dmkd.distillers`) turn on distillation; by default ``cfg.method`` builds both. Under
    ``torch.distributed`` the model is wrapped in DDP, the data sharded, metrics reduced, and only rank 0
    writes files. ``on_epoch_end(epoch, metrics, checkpoint_path)`` is called on every rank after each
    epoch; the path is None where rank 0 wrote none.
    """
    run = prepare(cfg, distiller=distiller, teacher=teacher, data=data, resume_from=resume_from)
    start_epoch, step, history = 0, 0, list[dict]()
    if run.resume_state is not None:
        start_epoch, step, history = restore(run.resume_state, run.checkpoint_path, run.model, run.optimizer,
                                             run.scheduler, run.cfg.detector)
    metrics: dict = history[-1] if history else {}
    for epoch in range(start_epoch, run.cfg.epochs):
        cpu_started = time.process_time()
        metrics, step = train_epoch(run, epoch, step, progress)
        evaluate_epoch(run, epoch, metrics)
        # the CPU time of every rank's process (all its threads), for the compute a report charges a run
        cpu = dist_utils.mean_over_ranks({"cpu": time.process_time() - cpu_started}, run.device)["cpu"]
        metrics["time/cpu_s"] = cpu * dist_utils.world_size()
        history.append(metrics)
        written = None
        if dist_utils.is_main():
            written = run.out / CHECKPOINT_NAME
            save_checkpoint(written, run.model, run.optimizer, run.scheduler, epoch=epoch + 1, step=step,
                            history=history, config=to_dict(run.cfg), data=run.data.paths.as_dict())
            write_metrics(run.out, history)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, metrics, written)
        dist_utils.barrier()
    return metrics


def prepare(cfg: TrainConfig, *, distiller: nn.Module | None, teacher: nn.Module | None, data: Data | None,
            resume_from: str | Path | None) -> Run:
    """Check everything, then build the student, distiller, teacher, optimiser and data order (nothing is
    written here: ``run.json`` waits for the first step, :func:`record_run`)."""
    cfg.validate()
    data = data or load_data(cfg)
    pretrained_classes = weights_classes(cfg.detector)
    if pretrained_classes and pretrained_classes != data.train.num_classes:
        raise UserError(f"detector.weights: {cfg.detector.weights} predicts {pretrained_classes - 1} classes, the data has "
                        f"{data.train.num_classes - 1}; start from backbone_weights instead")
    cfg = dataclasses.replace(cfg, detector=dataclasses.replace(cfg.detector, num_classes=data.train.num_classes))
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    if distiller is None and cfg.method != "none":
        teacher, distiller = build_distillation(cfg, data.train.num_classes)
    checkpoint_path = Path(resume_from) if resume_from else out / CHECKPOINT_NAME
    resume_state = load_checkpoint(checkpoint_path) if (cfg.resume or resume_from) and checkpoint_path.is_file() else None
    record = {"config": to_dict(cfg), "data": data.paths.as_dict(), "world_size": dist_utils.world_size(),
              "device": str(device), "torch_threads": torch.get_num_threads(), **provenance()}
    torch.manual_seed(cfg.seed)
    detector = build_detector(cfg.detector)
    pairing = {"pairing/student_init": state_fingerprint(detector)}
    model = StudentWithDistiller(detector, distiller).to(device)
    optimizer = build_optimizer(cfg.optimizer, cfg.lr, cfg.weight_decay, model)
    sampler, loader = data_order(cfg, data)
    pairing["pairing/data_order"] = zlib.crc32(json.dumps(list(sampler)).encode())
    iters_per_epoch = min(len(loader), cfg.max_iters or len(loader))
    if iters_per_epoch == 0:
        raise UserError(f"batch_size: {cfg.batch_size} per rank x {dist_utils.world_size()} ranks is more than the "
                        f"{len(data.train)} training images")
    scheduler = build_scheduler(optimizer, cfg.warmup_iters, cfg.epochs * iters_per_epoch)
    ddp_model: nn.Module = model
    if dist_utils.is_distributed():
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return Run(cfg, data, device, out, model, ddp_model, teacher.to(device) if teacher is not None else None,
               optimizer, scheduler, sampler, loader, iters_per_epoch, pairing, checkpoint_path, resume_state, record)


def record_run(run: Run) -> None:
    """``run.json`` in the output folder, once, after this session's first step succeeded: a run that stops
    on bad input (an image that cannot be decoded, a loss that is not finite at step 0) writes nothing,
    and leaves an earlier run's files in its folder as they were."""
    if run.recorded:
        return
    if dist_utils.is_main():
        run.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run.out / "run.json", run.record)
    run.recorded = True


def data_order(cfg: TrainConfig, data: Data) -> tuple[EpochTaggedSampler, torch.utils.data.DataLoader]:
    """The seeded, sharded sampler (set to epoch 0) and the loader with seeded augmentation."""
    sampler = EpochTaggedSampler(torch.utils.data.DistributedSampler(
        data.train, num_replicas=dist_utils.world_size(), rank=dist_utils.rank(), shuffle=True, seed=cfg.seed,
        drop_last=True), len(data.train))
    sampler.set_epoch(0)
    loader = torch.utils.data.DataLoader(SeededAugmentation(data.train, cfg.seed), batch_size=cfg.batch_size, sampler=sampler,
                                         collate_fn=collate, num_workers=cfg.num_workers, drop_last=True,
                                         persistent_workers=cfg.num_workers > 0)
    return sampler, loader


def train_epoch(run: Run, epoch: int, step: int, progress: bool) -> tuple[dict, int]:
    """One epoch of steps; returns its metrics (mean loss terms over ranks) and the step count."""
    cfg, device = run.cfg, run.device
    run.model.train()
    run.sampler.set_epoch(epoch)
    sums: dict[str, float] = defaultdict(float)
    started = time.perf_counter()
    loop_started_at = time.time()  # wall-clock: what start-up measurements subtract from
    bar = tqdm(total=run.iters_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
               disable=not (progress and dist_utils.is_main()))
    seen = 0
    first_step = {}
    for images, targets in run.loader:
        if seen == run.iters_per_epoch:
            break
        images = [image.to(device, non_blocking=True) for image in images]
        targets = [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for t in targets]
        figures = train_step(run.ddp_model, run.teacher, images, targets, run.optimizer, run.scheduler,
                             grad_clip=cfg.grad_clip, use_amp=cfg.amp and device.type == "cuda",
                             where=f"step {step} (epoch {epoch + 1})")
        if step == 0 and run.model.distiller is not None:
            first_step = {"loss/distill_step0": figures["loss/distill"], "loss/detector_step0": figures["loss/detector"]}
        record_run(run)
        step += 1
        seen += 1
        for name, value in figures.items():
            sums[name] += value
        bar.update(1)
        bar.set_postfix(loss=f"{figures['loss/total']:.3f}")
    bar.close()
    metrics = {"epoch": epoch + 1, "step": step, "lr": run.scheduler.get_last_lr()[0],
               "time/train_s": time.perf_counter() - started, "time/loop_started_at": loop_started_at, **run.pairing}
    metrics.update(dist_utils.mean_over_ranks({**{k: v / seen for k, v in sums.items()}, **first_step}, device))
    distiller = run.model.distiller
    if distiller is not None:
        metrics.update(distiller.extra_metrics())  # type: ignore[operator]  # every distiller defines it
        metrics.update(loss_ratios(metrics))
    return metrics, step


def loss_ratios(metrics: dict) -> dict:
    """How large the distillation loss is against the detector's own: over the epoch (means of the two),
    and at the run's first step. A ratio far above 1 means the distillation gradient dwarfs the detector's."""
    ratios = {}
    for name, distill, detector in (("loss_ratio", "loss/distill", "loss/detector"),
                                    ("loss_ratio/step0", "loss/distill_step0", "loss/detector_step0")):
        if distill in metrics and metrics.get(detector):
            ratios[name] = metrics[distill] / metrics[detector]
    return ratios


def evaluate_epoch(run: Run, epoch: int, metrics: dict) -> None:
    """Validation when due (and always after the last epoch); the held-out test split after the last only."""
    cfg = run.cfg
    last_epoch = epoch + 1 == cfg.epochs
    if (epoch + 1) % cfg.eval_every == 0 or last_epoch:
        started = time.perf_counter()
        figures, predictions = evaluate_detector(run.model.detector, run.data.val, run.device, cfg.batch_size)
        metrics.update(split_figures("val", figures))
        metrics["time/eval_s"] = time.perf_counter() - started
        if dist_utils.is_main():
            atomic_write_json(run.out / "predictions.json", predictions, indent=None)
    if last_epoch and run.data.test is not None:  # held out: never seen by selection or early stopping
        figures, _ = evaluate_detector(run.model.detector, run.data.test, run.device, cfg.batch_size)
        metrics.update(split_figures("test", figures))
