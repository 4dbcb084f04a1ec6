"""One optimisation step of a (distilled) student: forward, loss terms, backward, clipping, update;
and the optimiser and learning-rate schedule those steps follow."""
from __future__ import annotations

import math

import torch
from torch import nn

from dmkd.distillers import DistillContext, DistillInputs
from dmkd.heads import HeadTap, HeadView
from dmkd.models import FeatureTap


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run cannot go on."""


class StudentWithDistiller(nn.Module):
    """The student detector and its distiller in one module, so that DDP syncs both in one forward.

    Taps on the student's own forward collect what the distiller ``needs`` (FPN features, head view,
    ground truth), with no second pass of the student.
    """

    def __init__(self, detector: nn.Module, distiller: nn.Module | None):
        super().__init__()
        self.detector = detector
        self.distiller = distiller
        needs = distiller.needs if distiller is not None else frozenset()
        self.tap = FeatureTap(detector) if needs else None
        self.head_tap = HeadTap(detector, distiller.tower_layer) if "student_head" in needs else None

    def forward(self, images, targets, teacher_features=None, teacher_head: HeadView | None = None) -> dict[str, torch.Tensor]:
        losses = self.detector(images, targets)
        if self.distiller is not None:
            needs = self.distiller.needs
            student_features = self.tap.pop()
            inputs = DistillInputs(
                student_features=student_features if "features" in needs else None,
                teacher_features=teacher_features if "features" in needs else None,
                context=DistillContext([t["boxes"] for t in self.tap.targets], self.tap.input_size) if "targets" in needs else None,
                student_head=self.head_tap.pop() if self.head_tap is not None else None,
                teacher_head=teacher_head if "teacher_head" in needs else None)
            for name, value in self.distiller.distill(inputs).items():
                losses[f"distill/{name}"] = value
        return losses


def teacher_outputs(teacher: nn.Module | None, distiller: nn.Module | None, images) -> tuple:
    """The frozen teacher's FPN features and, for a head-level distiller, its head view."""
    if teacher is None:
        return None, None
    features = teacher(images)
    head = teacher.head_view(features) if "teacher_head" in distiller.needs else None
    return features, head


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up from 0.1 %, then cosine decay to 0 at ``total`` steps."""
    if step < warmup:
        return 0.001 + (1 - 0.001) * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(optimizer: str, lr: float, weight_decay: float, module: nn.Module) -> torch.optim.Optimizer:
    """AdamW or SGD over the trainable parameters; no weight decay on biases and norms."""
    decay, no_decay = [], []
    for param in module.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    return torch.optim.AdamW(groups, lr=lr)


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_iters: int, total_iters: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, min(warmup_iters, total_iters // 2), total_iters))


def train_step(model: nn.Module, teacher: nn.Module | None, images, targets, optimizer, scheduler, *,
               grad_clip: float, use_amp: bool, where: str) -> dict[str, float]:
    """One step on one batch; returns its loss terms as floats (``loss/*`` and ``distill/*``).

    ``model`` may be DDP-wrapped (its ``module`` is then the :class:`StudentWithDistiller`); ``where``
    names the step in the error raised when the loss is not finite.
    """
    plain = getattr(model, "module", model)
    device = images[0].device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
        teacher_features, teacher_head = teacher_outputs(teacher, plain.distiller, images)
        losses = model(images, targets, teacher_features, teacher_head)
    detector_loss = sum(v for k, v in losses.items() if not k.startswith("distill/"))
    distill_loss = sum((v for k, v in losses.items() if k.startswith("distill/")), torch.zeros((), device=device))
    total = detector_loss + distill_loss
    if not torch.isfinite(total):
        parts = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
        raise NonFiniteLossError(f"loss became {total.item()} at {where}: {parts}")
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(plain.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
    figures = {"loss/total": total.item(), "loss/detector": detector_loss.item(), "loss/distill": distill_loss.item()}
    figures.update({name if name.startswith("distill/") else f"loss/{name}": value.item() for name, value in losses.items()})
    return figures
