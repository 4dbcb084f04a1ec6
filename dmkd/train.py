"""Train a detector, optionally distilled from a teacher; also runs under ``torchrun`` (DDP).

    python -m dmkd.train                       # the mini-benchmark teacher, on the embedded data set
    python -m dmkd.train --role student        # the mini-benchmark student without distillation

Writes into ``--out``: ``run.json`` (resolved config, seed, git commit, package versions),
``checkpoint.pt`` (every epoch, atomically), ``metrics.json`` (per-epoch figures, ``final`` holds the
last) and ``predictions.json`` (COCO results with the data set's original category ids). Arguments
become a :class:`dmkd.config.TrainConfig`; :func:`dmkd.engine.fit` is the loop.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

import torch

from dmkd import distributed as dist_utils
from dmkd.checkpoint import CHECKPOINT_NAME
from dmkd.config import MINI_STUDENT, MINI_TEACHER, DataPaths, TrainConfig, parse_assignment, to_dict
from dmkd.distillers import HEAD_METHODS, METHODS
from dmkd.engine import fit
from dmkd.errors import UserError, exit_process, run_command
from dmkd.metrics import epochs_done
from dmkd.models import ARCHITECTURES, BACKBONES, TORCHVISION_DETECTORS, TORCHVISION_FIXED, DetectorConfig
from dmkd.step import NonFiniteLossError


def build_parser() -> argparse.ArgumentParser:
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
    parser.add_argument("--seed", type=int, help="seed of weights, data order and augmentation, 0 to 2**32-1 (default: 0)")
    parser.add_argument("--workers", type=int, dest="num_workers",
                        help="DataLoader worker processes (default: 0, load in the training process)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: auto (cuda when available)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt (it must exist)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a new run even when OUT holds one (its files are replaced as the new run writes its "
                             "own); without it, a run in OUT is never replaced")
    distill = parser.add_argument_group("distillation")
    distill.add_argument("--method", help=f"distillation method, one of: {', '.join([*METHODS, *HEAD_METHODS])}, or a feature "
                         f"and a head method joined by '+' (dmkd+crosskd) (default: none); dmkd* is this project's reading "
                         f"of DMKD, whose code is not public (docs/dmkd-method.md)")
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
    values: dict = dict(ROLE_DEFAULTS[role])
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
    values["data"] = {key: getattr(args, key) for key in (f.name for f in fields(DataPaths)) if getattr(args, key) is not None}
    for key in ("data_dir", "out", "epochs", "max_iters", "batch_size", "lr", "optimizer", "seed", "num_workers", "device"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    values["resume"] = args.resume
    return TrainConfig.from_dict({**values, "detector": detector}, where="arguments")


def _check_out(cfg: TrainConfig, *, overwrite: bool) -> None:
    """``--resume`` needs a run in ``--out``; a new run never replaces one there unless told to
    (``--overwrite``): a second command with the same (or the default) folder would lose the first."""
    checkpoint = Path(cfg.out) / CHECKPOINT_NAME
    if cfg.resume and overwrite:
        raise UserError("--resume and --overwrite: choose one (continue the run in --out, or start it over)")
    if cfg.resume and not checkpoint.is_file():
        raise UserError(f"--resume: {checkpoint}: not found (nothing to continue; leave out --resume to start a new run)")
    if not cfg.resume and not overwrite and checkpoint.is_file():
        done = epochs_done(cfg.out)  # none readable: the checkpoint alone is named
        held = f"{done} epoch{'s' if done != 1 else ''} in {checkpoint}" if done else str(checkpoint)
        raise UserError(f"--out {cfg.out}: holds a run already ({held}); --resume continues it, --overwrite starts "
                        f"over in its place, or give another --out")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> int:
        cfg = config_from_args(args)
        cfg.validate()
        _check_out(cfg, overwrite=args.overwrite)
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
    exit_process(main())
