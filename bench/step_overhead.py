"""Median time of one training step per distillation method, in one process, as ratios to ``none``,
beside each step's FLOPs and the time of the teacher's forward within it.

    python bench/step_overhead.py                   # both configurations on the CPU
    python bench/step_overhead.py --config coco --device cuda --bf16 --channels-last

A step is what dmkd.train does per iteration: the teacher's backbone + FPN (no grad; not for
``none``; its head too for crosskd), the student's forward with its detector loss, the distill loss,
backward, optimizer step.
Configurations:
- mini: the mini-benchmark pair, FCOS ResNet-18 FPN-128 -> FCOS slim ResNet-10 FPN-64, 96 px, batch 8;
- coco: RetinaNet ResNet-50 FPN-256 -> RetinaNet ResNet-18 FPN-256, 800 x 1216 input, batch 1 (CPU) or 2.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from dmkd.distillers import build_distiller, detector_family
from dmkd.models import DetectorConfig, TeacherFeatures, build_detector, feature_shapes
from dmkd.step import StudentWithDistiller, teacher_outputs

METHODS = ("none", "fitnet", "pkd", "mgd", "fgd", "dmkd", "crosskd", "dmkd+crosskd")
CONFIGS = {
    "mini": dict(teacher=DetectorConfig(arch="fcos", backbone="resnet18", fpn_channels=128, image_size=96),
                 student=DetectorConfig(arch="fcos", backbone="resnet10_quarter", fpn_channels=64, image_size=96,
                                        head_convs=2),
                 height=96, width=96, batch=8),
    "coco": dict(teacher=DetectorConfig(arch="retinanet", backbone="resnet50", fpn_channels=256, image_size=1216,
                                        num_classes=81, anchor_scale=4.0),
                 student=DetectorConfig(arch="retinanet", backbone="resnet18", fpn_channels=256, image_size=1216,
                                        num_classes=81, anchor_scale=4.0),
                 height=800, width=1216, batch=1),
}


def make_batch(height: int, width: int, batch: int, num_classes: int, device: torch.device):
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, height, width, generator=generator).to(device) for _ in range(batch)]
    targets = []
    for _ in range(batch):
        xy = torch.rand(5, 2, generator=generator) * torch.tensor([width * 0.7, height * 0.7])
        wh = 16 + torch.rand(5, 2, generator=generator) * torch.tensor([width * 0.25, height * 0.25])
        boxes = torch.cat([xy, xy + wh], dim=1)
        labels = torch.randint(1, num_classes, (5,), generator=generator)
        targets.append({"boxes": boxes.to(device), "labels": labels.to(device)})
    return images, targets


def build_step(method: str, spec: dict, device: torch.device, bf16: bool, channels_last: bool):
    """One method's student, teacher, distiller, optimizer and batch; returns a function that runs one
    step and gives its seconds, in all and in the teacher's forward."""
    torch.manual_seed(0)
    student = build_detector(spec["student"])
    teacher_detector = build_detector(spec["teacher"])
    shapes = feature_shapes(student, spec["student"].image_size)
    distiller = build_distiller(method, spec["student"].fpn_channels, spec["teacher"].fpn_channels, list(shapes),
                                family=detector_family(spec["student"].arch))
    model = StudentWithDistiller(student, distiller).to(device).train()
    head_layer = getattr(distiller, "tower_layer", None)
    teacher = TeacherFeatures(teacher_detector, head_layer=head_layer).to(device) if distiller is not None else None
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        teacher = teacher.to(memory_format=torch.channels_last) if teacher is not None else None
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    images, targets = make_batch(spec["height"], spec["width"], spec["batch"], spec["student"].num_classes, device)

    def sync() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def step() -> tuple[float, float]:
        started = sync()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            teacher_features, teacher_head = teacher_outputs(teacher, distiller, images)
            teacher_done = sync()
            losses = model(images, targets, teacher_features, teacher_head)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return sync() - started, teacher_done - started

    return step


def time_methods(methods: list[str], spec: dict, device: torch.device, steps: int, bf16: bool,
                 channels_last: bool) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Median seconds per step of each method and of the teacher's forward within it, and the step's
    FLOPs (convolutions and matrix products, forward and backward, as torch's FlopCounterMode counts
    them). The methods take turns, one step each per round, so that a machine whose speed drifts (a
    shared VM) slows every method alike; round 0 warms up, counts the FLOPs and is not timed."""
    step_of = {method: build_step(method, spec, device, bf16, channels_last) for method in methods}
    times: dict[str, list[tuple[float, float]]] = {method: [] for method in methods}
    flops = {}
    for method, step in step_of.items():
        with FlopCounterMode(display=False) as counter:
            step()
        flops[method] = float(counter.get_total_flops())
    for _ in range(steps):
        for method, step in step_of.items():
            times[method].append(step())
    median = {method: statistics.median(t for t, _ in values) for method, values in times.items()}
    teacher = {method: statistics.median(t for _, t in values) for method, values in times.items()}
    return median, teacher, flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=("mini", "coco", "both"), default="both")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, help="timed steps per method (default: 10 mini, 8 coco)")
    parser.add_argument("--batch", type=int, help="override the batch size")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA, or a CPU with bf16 units)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--methods", default=",".join(METHODS))
    args = parser.parse_args()
    device = torch.device(args.device)
    names = ("mini", "coco") if args.config == "both" else (args.config,)
    report = {"machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                          "threads": torch.get_num_threads(), "torch": torch.__version__,
                          "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"},
              "bf16": args.bf16, "channels_last": args.channels_last, "results": {}}
    for name in names:
        spec = dict(CONFIGS[name])
        if args.batch:
            spec["batch"] = args.batch
        elif name == "coco" and device.type == "cuda":
            spec["batch"] = 2
        steps = args.steps or (10 if name == "mini" else 8)
        seconds, teacher, flops = time_methods(args.methods.split(","), spec, device, steps, args.bf16, args.channels_last)
        base = seconds.get("none")
        report["results"][name] = {"batch": spec["batch"], "steps": steps, "seconds": seconds,
                                   "teacher_forward_seconds": {m: t for m, t in teacher.items() if m != "none"},
                                   "flops": flops,
                                   "ratio_to_none": {m: s / base for m, s in seconds.items()} if base else None}
        print(f"{name} (batch {spec['batch']}, median of {steps} steps):", flush=True)
        for method, value in seconds.items():
            ratio = f"{value / base:.2f}x" if base else "-"
            work = f"{flops[method] / 1e9:8.0f} GFLOP  {flops[method] / flops['none']:.2f}x" if base else ""
            within = f"  (teacher forward {teacher[method] * 1000:.0f} ms)" if method != "none" else ""
            print(f"  {method:8s} {value * 1000:9.1f} ms  {ratio}  {work}{within}", flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
