"""Train a detector, optionally distilled from a teacher; also runs under DDP.

    python -m dmkd.train                       # the mini-benchmark teacher, on the embedded data set
    python -m dmkd.train --role student        # the mini-benchmark student without distillation

Writes into ``--out``: ``run.json`` (resolved config, seed, git commit, package versions),
``checkpoint.pt`` (every epoch, atomically), ``metrics.json`` (per-epoch figures, ``final`` holds the
last) and ``predictions.json`` (COCO results with the data set's original category ids).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import yaml
from torch import nn
from tqdm import tqdm

from dmkd import distributed as dist_utils
from dmkd.config import from_dict, to_dict
from dmkd.data import CocoDetection, EpochTaggedSampler, SeededAugmentation, collate, to_coco_results
from dmkd.errors import UserError, one_line, run_command
from dmkd.evaluate import coco_evaluate
from dmkd.io import atomic_write, atomic_write_json
from dmkd.distillers import DistillContext, METHODS, build_distiller, check_method, check_parameters
from dmkd.models import (TORCHVISION_DETECTORS, TORCHVISION_FIXED, DetectorConfig, FeatureTap, TeacherFeatures, build_detector,
                         feature_shapes, load_weights, weights_classes)
from dmkd.provenance import provenance
from dmkd.synthetic import ensure_mini_benchmark
from dmkd.transforms import eval_transforms, train_transforms

CHECKPOINT_NAME = "checkpoint.pt"

# The embedded mini-benchmark pair: measured numbers are in the README.
MINI_TEACHER = DetectorConfig(arch="fcos", backbone="resnet18", fpn_channels=128, image_size=96, head_convs=4)
MINI_STUDENT = DetectorConfig(arch="fcos", backbone="resnet10_quarter", fpn_channels=64, image_size=96, head_convs=2)


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Data paths left empty mean the embedded mini-benchmark under ``data_dir``."""

    train_ann: str | None = None
    train_images: str | None = None
    val_ann: str | None = None
    val_images: str | None = None
    test_ann: str | None = None  # optional held-out split, evaluated after the last epoch only
    test_images: str | None = None
    data_dir: str = "data/mini"
    out: str = "runs/teacher"
    detector: DetectorConfig = MINI_TEACHER
    epochs: int = 8
    max_iters: int | None = None  # cap on iterations per epoch, for smoke runs
    batch_size: int = 8
    optimizer: str = "adamw"
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_iters: int = 100
    grad_clip: float = 10.0
    seed: int = 0
    num_workers: int = 0
    device: str = "auto"
    amp: bool = True  # bf16 autocast, on CUDA only
    eval_every: int = 1
    resume: bool = False
    # Distillation: ``method`` names a distiller; ``distill`` holds its parameters.
    method: str = "none"
    teacher: DetectorConfig | None = None
    teacher_checkpoint: str | None = None
    distill: dict = field(default_factory=dict)

    def validate(self, check_files: bool = True) -> None:
        """Every value, before anything is written or trained; ``check_files=False`` skips the checks
        of files that exist only on the machine that trains (a sweep's ``--dry-run``)."""
        self.detector.validate("detector")
        data = [self.train_ann, self.train_images, self.val_ann, self.val_images]
        if any(data) and not all(data):
            raise UserError("data: give all of train_ann, train_images, val_ann and val_images, or none "
                            "(none means the embedded mini-benchmark)")
        if bool(self.test_ann) != bool(self.test_images):
            raise UserError("data: give both test_ann and test_images, or neither")
        if (self.test_ann or self.test_images) and not self.train_ann:
            raise UserError("data: test_ann and test_images need the other four paths too (the mini-benchmark "
                            "has its own test split)")
        for name in ("epochs", "batch_size", "eval_every"):
            if getattr(self, name) < 1:
                raise UserError(f"{name}: must be at least 1, but got {getattr(self, name)}")
        if self.max_iters is not None and self.max_iters < 1:
            raise UserError(f"max_iters: must be at least 1, but got {self.max_iters}")
        if self.num_workers < 0:
            raise UserError(f"num_workers: must be 0 (load in the training process) or more, but got {self.num_workers}")
        for name in ("weight_decay", "warmup_iters", "grad_clip"):
            if not getattr(self, name) >= 0:
                raise UserError(f"{name}: must be 0 or more, but got {getattr(self, name)}")
        for name in ("out", "data_dir"):
            if check_files and Path(getattr(self, name)).exists() and not Path(getattr(self, name)).is_dir():
                raise UserError(f"{name}: {getattr(self, name)} exists and is not a folder")
        if self.optimizer not in ("adamw", "sgd"):
            raise UserError(f"optimizer: must be 'adamw' or 'sgd', but got {self.optimizer!r}")
        if not self.lr > 0:
            raise UserError(f"lr: must be positive, but got {self.lr}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise UserError(f"device: must be 'auto', 'cpu' or 'cuda', but got {self.device!r}")
        check_method(self.method)
        if self.method != "none":
            teacher_weights = (self.teacher or MINI_TEACHER).weights
            if not (self.teacher_checkpoint or teacher_weights) and check_files:
                raise UserError(f"teacher_checkpoint: required for method {self.method!r} "
                                f"(or the teacher's weights: a torchvision name or a file)")
            if check_files and self.teacher_checkpoint and not Path(self.teacher_checkpoint).is_file():
                raise UserError(f"{self.teacher_checkpoint}: teacher checkpoint file not found")
            (self.teacher or MINI_TEACHER).validate("teacher")
        check_parameters(self.method, self.distill)

    @classmethod
    def from_dict(cls, data: dict, where: str = "config") -> "TrainConfig":
        return from_dict(cls, data, where)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run cannot go on."""


class StudentWithDistiller(nn.Module):
    """The student detector and its distiller in one module, so that DDP syncs both in one forward."""

    def __init__(self, detector: nn.Module, distiller: nn.Module | None):
        super().__init__()
        self.detector = detector
        self.distiller = distiller
        self.tap = FeatureTap(detector) if distiller is not None else None

    def forward(self, images, targets, teacher_features=None) -> dict[str, torch.Tensor]:
        losses = self.detector(images, targets)
        if self.distiller is not None:
            student_features = self.tap.pop()
            context = DistillContext([t["boxes"] for t in self.tap.targets], self.tap.input_size)
            for name, value in self.distiller(student_features, teacher_features, context).items():
                losses[f"distill/{name}"] = value
        return losses


def build_distillation(cfg: "TrainConfig", num_classes: int) -> tuple[TeacherFeatures, nn.Module]:
    """The frozen teacher (backbone + FPN only) and the distiller that ``cfg.method`` names.

    Teacher and student must give FPN levels of the same names and sizes; checked here, once.
    """
    teacher_cfg = cfg.teacher or MINI_TEACHER
    # Only the teacher's FPN is used: a COCO teacher keeps its own head (91 classes) whatever the data's.
    teacher_cfg = dataclasses.replace(teacher_cfg, num_classes=weights_classes(teacher_cfg) or num_classes)
    teacher_detector = build_detector(teacher_cfg, "teacher")
    if cfg.teacher_checkpoint:
        load_weights(teacher_detector, cfg.teacher_checkpoint)
    teacher_shapes = feature_shapes(teacher_detector, cfg.detector.image_size)
    student_shapes = feature_shapes(build_detector(cfg.detector), cfg.detector.image_size)
    if [(k, s[1:]) for k, s in teacher_shapes.items()] != [(k, s[1:]) for k, s in student_shapes.items()]:
        raise UserError(f"teacher: its FPN levels {dict(teacher_shapes)} do not match the student's "
                        f"{dict(student_shapes)}; use the same architecture family and image size")
    student_channels = next(iter(student_shapes.values()))[0]
    teacher_channels = next(iter(teacher_shapes.values()))[0]
    torch.manual_seed(cfg.seed)  # the distiller's initial weights depend on the seed only
    distiller = build_distiller(cfg.method, student_channels, teacher_channels, list(student_shapes), cfg.distill)
    return TeacherFeatures(teacher_detector), distiller


@dataclass
class Data:
    train: CocoDetection
    val: CocoDetection
    paths: dict
    test: CocoDetection | None = None


def load_data(cfg: TrainConfig) -> Data:
    """Build both data sets (generating the mini-benchmark when no paths are given)."""
    if cfg.train_ann:
        paths = {"train_ann": cfg.train_ann, "train_images": cfg.train_images,
                 "val_ann": cfg.val_ann, "val_images": cfg.val_images}
        if cfg.test_ann:
            paths.update(test_ann=cfg.test_ann, test_images=cfg.test_images)
    else:
        paths = ensure_mini_benchmark(cfg.data_dir)
    size = cfg.detector.image_size
    train = CocoDetection(paths["train_ann"], paths["train_images"], train_transforms(size))
    val = CocoDetection(paths["val_ann"], paths["val_images"], eval_transforms(size))
    test = CocoDetection(paths["test_ann"], paths["test_images"], eval_transforms(size)) if "test_ann" in paths else None
    for held_out in (split for split in (val, test) if split is not None):
        if train.category_ids != held_out.category_ids:
            raise UserError(f"{held_out.ann_file}: categories differ from those of {paths['train_ann']}")
    if len(train) == 0:
        raise UserError(f"{paths['train_ann']}: has no images")
    return Data(train, val, paths, test)


def state_fingerprint(module: nn.Module) -> int:
    """CRC-32 of a module's state: two runs that print the same number started from the same weights."""
    crc = 0
    for name, tensor in module.state_dict().items():
        crc = zlib.crc32(name.encode(), crc)
        crc = zlib.crc32(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes(), crc)
    return crc


RESUME_KEYS = ("model", "optimizer", "scheduler", "epoch", "step", "history", "rng")


def load_checkpoint(path: Path) -> dict:
    """A ``dmkd.train`` checkpoint to resume from; anything else is a one-line ``UserError``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a corrupt or foreign file
        raise UserError(f"{path}: not a readable torch checkpoint ({type(error).__name__})") from None
    missing = [key for key in RESUME_KEYS if not (isinstance(state, dict) and key in state)]
    if missing:
        raise UserError(f"{path}: not a dmkd.train checkpoint to resume from (no {missing[0]!r}); "
                        f"a plain state dict can be a --teacher-checkpoint, not a --resume point")
    return state


def resolve_device(name: str) -> torch.device:
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("device: 'cuda' was asked for, but no CUDA device is available")
    return torch.device("cuda", torch.cuda.current_device())  # torchrun / Ray Train set it per rank


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up from 0.1 %, then cosine decay to 0 at ``total`` steps."""
    if step < warmup:
        return 0.001 + (1 - 0.001) * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(cfg: TrainConfig, module: nn.Module) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9)
    return torch.optim.AdamW(groups, lr=cfg.lr)


@torch.no_grad()
def evaluate_detector(detector: nn.Module, dataset: CocoDetection, device: torch.device, batch_size: int,
                      progress: bool = False, label_to_category: dict[int, int] | None = None) -> tuple[dict[str, float], list[dict]]:
    """COCO metrics of ``detector`` on ``dataset``; under DDP each rank predicts its share. Predicted labels
    map to the data's category ids through ``label_to_category`` (default: the data's own labels 1..K)."""
    label_to_category = label_to_category or dataset.label_to_category
    was_training = detector.training
    detector.eval()
    indices = list(range(dist_utils.rank(), len(dataset), dist_utils.world_size()))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size,
                                         shuffle=False, collate_fn=collate)
    results = []
    for images, targets in tqdm(loader, desc="eval", leave=False, disable=not progress):
        outputs = detector([image.to(device) for image in images])
        results.extend(to_coco_results(outputs, targets, images, label_to_category))
    detector.train(was_training)
    everything = dist_utils.gather_to_main(results)
    metrics = coco_evaluate(dataset.coco, everything) if dist_utils.is_main() else None
    return dist_utils.broadcast_from_main(metrics), (everything or [])


EpochCallback = Callable[[int, dict, Path | None], None]


def fit(cfg: TrainConfig, *, distiller: nn.Module | None = None, teacher: nn.Module | None = None,
        data: Data | None = None, on_epoch_end: EpochCallback | None = None, progress: bool = True,
        resume_from: str | Path | None = None) -> dict:
    """Train ``cfg.detector`` and return the final epoch's metrics.

    ``teacher`` (a :class:`~dmkd.models.TeacherFeatures`) and ``distiller`` (a module taking the
    student's and the teacher's FPN feature dicts and the targets, returning named loss terms) turn on
    feature distillation. Under ``torch.distributed`` the model is wrapped in DDP, the data sharded,
    metrics reduced, and only rank 0 writes files. ``on_epoch_end(epoch, metrics, checkpoint_path)``
    is called on every rank after each epoch; the path is None where rank 0 wrote none.
    """
    cfg.validate()
    data = data or load_data(cfg)
    pretrained_classes = weights_classes(cfg.detector)
    if pretrained_classes and pretrained_classes != data.train.num_classes:
        raise UserError(f"detector.weights: {cfg.detector.weights} predicts {pretrained_classes - 1} classes, the data has "
                        f"{data.train.num_classes - 1}; start from backbone_weights instead")
    detector_cfg = dataclasses.replace(cfg.detector, num_classes=data.train.num_classes)
    cfg = dataclasses.replace(cfg, detector=detector_cfg)
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    main_rank = dist_utils.is_main()
    if distiller is None and cfg.method != "none":
        teacher, distiller = build_distillation(cfg, data.train.num_classes)
    checkpoint_path = Path(resume_from) if resume_from else out / CHECKPOINT_NAME
    resume_state = load_checkpoint(checkpoint_path) if (cfg.resume or resume_from) and checkpoint_path.is_file() else None
    if main_rank:  # everything above checked: only now is anything written
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "run.json", {"config": to_dict(cfg), "data": data.paths,
                                            "world_size": dist_utils.world_size(), "device": str(device),
                                            "torch_threads": torch.get_num_threads(),
                                            **provenance()})
    torch.manual_seed(cfg.seed)
    detector = build_detector(detector_cfg)
    pairing = {"pairing/student_init": state_fingerprint(detector)}
    model = StudentWithDistiller(detector, distiller).to(device)
    if teacher is not None:
        teacher = teacher.to(device)
    optimizer = build_optimizer(cfg, model)

    world = dist_utils.world_size()
    sampler = EpochTaggedSampler(torch.utils.data.DistributedSampler(
        data.train, num_replicas=world, rank=dist_utils.rank(), shuffle=True, seed=cfg.seed, drop_last=True),
        len(data.train))
    sampler.set_epoch(0)
    pairing["pairing/data_order"] = zlib.crc32(json.dumps(list(sampler)).encode())
    loader = torch.utils.data.DataLoader(SeededAugmentation(data.train, cfg.seed), batch_size=cfg.batch_size, sampler=sampler,
                                         collate_fn=collate, num_workers=cfg.num_workers, drop_last=True,
                                         persistent_workers=cfg.num_workers > 0)
    iters_per_epoch = min(len(loader), cfg.max_iters or len(loader))
    if iters_per_epoch == 0:
        raise UserError(f"batch_size: {cfg.batch_size} per rank x {world} ranks is more than the "
                        f"{len(data.train)} training images")
    total_iters = cfg.epochs * iters_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, min(cfg.warmup_iters, total_iters // 2), total_iters))

    start_epoch, step, history = 0, 0, []
    if resume_state is not None:
        state = resume_state
        try:
            model.detector.load_state_dict(state["model"])
            if distiller is not None and state.get("distiller") is not None:
                model.distiller.load_state_dict(state["distiller"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as error:
            raise UserError(f"{checkpoint_path}: does not fit this run's detector, distiller or optimizer "
                            f"({one_line(error)[:200]}); resume with the settings it was written with") from None
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, step, history = state["epoch"], state["step"], list(state["history"])
        torch.set_rng_state(state["rng"])

    ddp_model = model
    if dist_utils.is_distributed():
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    use_amp = cfg.amp and device.type == "cuda"
    metrics: dict = history[-1] if history else {}

    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        sampler.set_epoch(epoch)
        sums: dict[str, float] = defaultdict(float)
        started = time.perf_counter()
        bar = tqdm(total=iters_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=not (progress and main_rank))
        seen = 0
        for images, targets in loader:
            if seen == iters_per_epoch:
                break
            images = [image.to(device, non_blocking=True) for image in images]
            targets = [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for t in targets]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                teacher_features = teacher(images) if teacher is not None else None
                losses = ddp_model(images, targets, teacher_features)
            detector_loss = sum(v for k, v in losses.items() if not k.startswith("distill/"))
            distill_loss = sum((v for k, v in losses.items() if k.startswith("distill/")), torch.zeros((), device=device))
            total = detector_loss + distill_loss
            if not torch.isfinite(total):
                parts = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
                raise NonFiniteLossError(f"loss became {total.item()} at step {step} (epoch {epoch + 1}): {parts}")
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            seen += 1
            sums["loss/total"] += total.item()
            sums["loss/detector"] += detector_loss.item()
            sums["loss/distill"] += distill_loss.item()
            for name, value in losses.items():
                sums[name if name.startswith("distill/") else f"loss/{name}"] += value.item()
            bar.update(1)
            bar.set_postfix(loss=f"{total.item():.3f}")
        bar.close()
        metrics = {"epoch": epoch + 1, "step": step, "lr": scheduler.get_last_lr()[0],
                   "time/train_s": time.perf_counter() - started, **pairing}
        metrics.update(dist_utils.mean_over_ranks({k: v / seen for k, v in sums.items()}, device))
        if distiller is not None and hasattr(distiller, "extra_metrics"):
            metrics.update(distiller.extra_metrics())
        last_epoch = epoch + 1 == cfg.epochs
        if (epoch + 1) % cfg.eval_every == 0 or last_epoch:
            started = time.perf_counter()
            figures, predictions = evaluate_detector(model.detector, data.val, device, cfg.batch_size)
            metrics.update({f"val/{k}": v for k, v in figures.items()})
            metrics["time/eval_s"] = time.perf_counter() - started
            if main_rank:
                atomic_write_json(out / "predictions.json", predictions)
        if last_epoch and data.test is not None:  # held out: never seen by selection or early stopping
            figures, _ = evaluate_detector(model.detector, data.test, device, cfg.batch_size)
            metrics.update({f"test/{k}": v for k, v in figures.items()})
        history.append(metrics)
        written = None
        if main_rank:
            state = {"model": model.detector.state_dict(),
                     "distiller": model.distiller.state_dict() if distiller is not None else None,
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "epoch": epoch + 1, "step": step, "history": history, "rng": torch.get_rng_state(),
                     "config": to_dict(cfg), "data": {k: str(Path(v).resolve()) for k, v in data.paths.items()}}
            written = out / CHECKPOINT_NAME
            atomic_write(written, lambda handle: torch.save(state, handle), mode="wb")
            atomic_write_json(out / "metrics.json", {"epochs": history, "final": metrics})
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, metrics, written)
        dist_utils.barrier()
    return metrics


def build_parser() -> argparse.ArgumentParser:
    from dmkd.models import ARCHITECTURES, BACKBONES

    parser = argparse.ArgumentParser(prog="python -m dmkd.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", choices=("teacher", "student"),
                        help="which mini-benchmark detector and schedule to start from "
                             "(default: teacher, or student when --method distills)")
    data = parser.add_argument_group("data (the four paths, or none for the embedded mini-benchmark)")
    data.add_argument("--train-ann", help="COCO instances JSON to train on")
    data.add_argument("--train-images", help="folder of the training images")
    data.add_argument("--val-ann", help="COCO instances JSON evaluated after every epoch")
    data.add_argument("--val-images", help="folder of the validation images")
    data.add_argument("--test-ann", help="optional held-out COCO JSON, evaluated after the last epoch only")
    data.add_argument("--test-images", help="folder of the test images")
    data.add_argument("--data-dir", help="where the mini-benchmark is generated (default: data/mini)")
    parser.add_argument("--out", help="output folder (default: runs/<role>, runs/student_<method>)")
    parser.add_argument("--epochs", type=int, help="epochs to train (default: 8 teacher, 3 student)")
    parser.add_argument("--max-iters", type=int, help="cap on iterations per epoch (smoke runs)")
    parser.add_argument("--batch-size", type=int, help="images per step and process (default: 8)")
    parser.add_argument("--lr", type=float, help="peak learning rate (default: 0.002)")
    parser.add_argument("--optimizer", choices=("adamw", "sgd"), help="default: adamw")
    parser.add_argument("--seed", type=int, help="seed of weights, data order and augmentation (default: 0)")
    parser.add_argument("--workers", type=int, dest="num_workers",
                        help="DataLoader worker processes (default: 0, load in the training process)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: auto (cuda when available)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt (it must exist)")
    distill = parser.add_argument_group("distillation")
    distill.add_argument("--method", help=f"distillation method, one of: {', '.join(METHODS)} (default: none)")
    distill.add_argument("--teacher-checkpoint", help="local teacher checkpoint (e.g. runs/teacher/checkpoint.pt)")
    distill.add_argument("--teacher-arch", help=f"one of: {', '.join(ARCHITECTURES)} (default: fcos)")
    distill.add_argument("--teacher-backbone", help=f"one of: {', '.join(BACKBONES)} (default: resnet18)")
    distill.add_argument("--teacher-fpn-channels", type=int, help="default: 128")
    distill.add_argument("--teacher-head-convs", type=int, help="default: 4")
    distill.add_argument("--teacher-weights", help="the teacher's weights instead of --teacher-checkpoint: a torchvision "
                         "name (RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1) or a file")
    distill.add_argument("--distill", action="append", default=[], metavar="KEY=VALUE",
                         help="a parameter of the method, e.g. --distill alpha=2e-5 (repeatable)")
    model = parser.add_argument_group("detector (default: the role's mini-benchmark detector)")
    model.add_argument("--arch", help=f"detector architecture, one of: {', '.join(ARCHITECTURES)}")
    model.add_argument("--backbone", help=f"ResNet backbone, one of: {', '.join(BACKBONES)}")
    model.add_argument("--fpn-channels", type=int, help="FPN width (a multiple of 32)")
    model.add_argument("--image-size", type=int, help="longer image side after resizing")
    model.add_argument("--head-convs", type=int, help="convs in each head tower")
    model.add_argument("--weights", help="start the whole detector from these weights: a torchvision name or a file")
    model.add_argument("--backbone-weights", help="start the backbone from these weights: a torchvision name "
                       "(ResNet18_Weights.IMAGENET1K_V1) or a file; the body's BatchNorm is frozen, as torchvision does")
    return parser


ROLE_DEFAULTS = {
    "teacher": dict(detector=MINI_TEACHER, epochs=8, out="runs/teacher"),
    "student": dict(detector=MINI_STUDENT, epochs=3, out="runs/student"),
}


def parse_assignment(text: str, option: str) -> tuple[str, object]:
    """``key=value`` with the value read as YAML (numbers, booleans, lists)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise UserError(f"{option}: expected KEY=VALUE, but got {text!r}")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as error:
        raise UserError(f"{option}: cannot read the value of {key!r} ({error.problem})") from error
    if isinstance(value, str):  # YAML 1.1 reads 2e-5 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    return key.strip(), value


def _detector_args(defaults: DetectorConfig, given: dict) -> dict:
    """A role's default detector with the options given; a torchvision detector drops the default's
    backbone, FPN width and towers (torchvision fixes them) unless they were given too."""
    detector = to_dict(defaults)
    if given.get("arch") in TORCHVISION_DETECTORS:
        for key, _ in TORCHVISION_FIXED:
            detector.pop(key)
    detector.update({k: v for k, v in given.items() if v is not None})
    return detector


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    method = args.method or "none"
    teacher_options = [f"--{k.replace('_', '-')}" for k in ("distill", "teacher_checkpoint", "teacher_arch",
                                                             "teacher_backbone", "teacher_fpn_channels",
                                                             "teacher_head_convs", "teacher_weights") if getattr(args, k)]
    if method == "none" and teacher_options:
        raise UserError(f"{teacher_options[0]}: only means something with --method (a distillation method); "
                        f"without one, nothing is distilled")
    role = args.role or ("student" if method != "none" else "teacher")
    values = dict(ROLE_DEFAULTS[role])
    if method != "none" and not args.out:
        values["out"] = f"runs/student_{method}"
    values["method"] = method
    values["teacher_checkpoint"] = args.teacher_checkpoint
    teacher = _detector_args(MINI_TEACHER, {k: getattr(args, f"teacher_{k}") for k in ("arch", "backbone", "fpn_channels",
                                                                                  "head_convs", "weights")})
    if args.image_size is not None:
        teacher["image_size"] = args.image_size
    values["teacher"] = teacher
    values["distill"] = dict(parse_assignment(item, "--distill") for item in args.distill)
    detector = _detector_args(values["detector"], {k: getattr(args, k) for k in ("arch", "backbone", "fpn_channels",
                                                                               "image_size", "head_convs", "weights",
                                                                               "backbone_weights")})
    values["detector"] = detector
    for key in ("train_ann", "train_images", "val_ann", "val_images", "test_ann", "test_images", "data_dir", "out",
                "epochs", "max_iters",
                "batch_size", "lr", "optimizer", "seed", "num_workers", "device"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    values["resume"] = args.resume
    return TrainConfig.from_dict({**values, "detector": detector}, where="arguments")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> int:
        cfg = config_from_args(args)
        cfg.validate()
        if cfg.resume and not (Path(cfg.out) / CHECKPOINT_NAME).is_file():
            raise UserError(f"--resume: {Path(cfg.out) / CHECKPOINT_NAME}: not found (nothing to continue; "
                            f"leave out --resume to start a new run)")
        joined = dist_utils.join_torchrun_group(cfg.device)  # under torchrun: one process per device
        main_rank = dist_utils.is_main()
        try:
            final = fit(cfg)
        except NonFiniteLossError as error:
            raise UserError(f"{error}; lower the loss weights (--distill) or the learning rate") from None
        finally:
            if joined:
                torch.distributed.destroy_process_group()
        if main_rank:
            summary = {k: v for k, v in final.items() if k.startswith(("val/", "test/"))}
            print(json.dumps({"out": cfg.out, "epochs": final.get("epoch"), **summary}))
        return 0

    return run_command(run, interrupted="the last finished epoch is in the checkpoint; rerun with --resume")


if __name__ == "__main__":
    sys.exit(main())
