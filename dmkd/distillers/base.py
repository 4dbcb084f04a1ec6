"""What every distiller shares: the generation block, the channel aligner, what a distiller receives
(:class:`DistillInputs`), the per-level wrapper of feature losses and the composition of methods.

A distiller is a module with ``needs`` (a subset of :data:`NEEDS`) and ``distill(inputs)`` returning
named, already weighted loss terms; the training step fills in exactly what it needs."""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn

from dmkd.heads import head_family

# The detector families whose published settings differ: one-stage anchor-based (RetinaNet), one-stage
# anchor-free (FCOS), and two-stage (Faster R-CNN, the student of every two-stage config in these papers).
FAMILIES = ("retinanet", "fcos", "two_stage")


def detector_family(arch: str) -> str:
    """The family whose published defaults a method takes on a student of architecture ``arch``."""
    return head_family(arch) or "two_stage"


@dataclass(frozen=True)
class Published:
    """A method's setting for one detector family, and where it comes from (the authors' config by name,
    or what this project chose where no config was published)."""

    source: str
    values: dict


def check_weight(name: str, value: float) -> None:
    """A loss weight: finite and not negative (0 turns its term off)."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0 (0 turns the term off), but got {value!r}")


def check_temperature(value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"temperature must be a finite number > 0, but got {value!r}")


def generation_block(channels: int) -> nn.Sequential:
    """MGD's generation block: Conv3x3 -> ReLU -> Conv3x3, channels kept."""
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True),
                         nn.Conv2d(channels, channels, 3, padding=1))


def aligner(student_channels: int, teacher_channels: int) -> nn.Conv2d | None:
    """A 1x1 conv from the student's to the teacher's width; None when they are equal."""
    if student_channels == teacher_channels:
        return None
    return nn.Conv2d(student_channels, teacher_channels, kernel_size=1)


# What a distiller may ask for: FPN features (student's and teacher's, per level), the student's and the
# teacher's head views (tower features and outputs, :class:`dmkd.heads.HeadView`; the teacher then keeps
# its head) and the ground truth.
NEEDS = ("features", "student_head", "teacher_head", "targets")


@dataclass
class DistillContext:
    """What some losses need beside the two features: ground-truth boxes in input pixels, per image,
    and the (padded) input size the features were computed from."""

    boxes: list[torch.Tensor] = field(default_factory=list)
    input_size: tuple[int, int] | None = None


@dataclass
class DistillInputs:
    """One step's inputs of a distiller; what it does not need stays None."""

    student_features: OrderedDict | None = None
    teacher_features: OrderedDict | None = None
    context: DistillContext | None = None
    student_head: object | None = None  # dmkd.heads.HeadView
    teacher_head: object | None = None  # the same, with the frozen teacher detector


class MultiLevel(nn.Module):
    """One single-level loss per FPN level; takes the student's and teacher's feature dicts.

    Returns named, already weighted loss terms summed over levels: a loss returning a tensor gives one
    term named ``name``; a loss returning a dict gives its own names.
    """

    needs = frozenset({"features", "targets"})

    def __init__(self, name: str, levels: dict[str, nn.Module]):
        super().__init__()
        self.name = name
        self.levels = nn.ModuleDict(levels)

    def distill(self, inputs: DistillInputs) -> dict[str, torch.Tensor]:
        return self(inputs.student_features, inputs.teacher_features, inputs.context)

    def forward(self, student: OrderedDict, teacher: OrderedDict, context: DistillContext | None = None) -> dict[str, torch.Tensor]:
        terms: dict[str, torch.Tensor] = {}
        for level, loss in self.levels.items():
            value = loss(student[level], teacher[level], context)
            for key, term in (value.items() if isinstance(value, dict) else [(self.name, value)]):
                terms[key] = terms[key] + term if key in terms else term
        return terms

    def extra_metrics(self) -> dict[str, float]:
        """Per-level figures a loss declares worth logging (its ``extra_metrics()``, e.g. DMKD's fusion
        weights): ``group/name`` of level L is logged as ``group/L/name``."""
        metrics = {}
        for level, loss in self.levels.items():
            for key, value in getattr(loss, "extra_metrics", dict)().items():
                group, _, name = key.partition("/")
                metrics[f"{group}/{level}/{name}"] = value
        return metrics


class HeadLevel(nn.Module):
    """A head-level loss (one module over all levels, e.g. CrossKD) as a distiller."""

    def __init__(self, name: str, loss: nn.Module):
        super().__init__()
        self.name, self.loss = name, loss

    @property
    def needs(self) -> frozenset[str]:
        return self.loss.needs

    @property
    def tower_layer(self) -> int:
        return self.loss.tower_layer

    def distill(self, inputs: DistillInputs) -> dict[str, torch.Tensor]:
        return self.loss(inputs)

    def extra_metrics(self) -> dict[str, float]:
        return {}


class Composite(nn.Module):
    """Several methods in one step (``dmkd+crosskd``): their terms side by side, their needs united."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.name = "+".join(part.name for part in parts)

    @property
    def needs(self) -> frozenset[str]:
        return frozenset().union(*(part.needs for part in self.parts))

    @property
    def tower_layer(self) -> int | None:
        return next((part.tower_layer for part in self.parts if hasattr(part, "tower_layer")), None)

    def distill(self, inputs: DistillInputs) -> dict[str, torch.Tensor]:
        terms: dict[str, torch.Tensor] = {}
        for part in self.parts:
            terms.update(part.distill(inputs))
        return terms

    def extra_metrics(self) -> dict[str, float]:
        return {k: v for part in self.parts for k, v in part.extra_metrics().items()}
