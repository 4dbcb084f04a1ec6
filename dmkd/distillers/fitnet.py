"""FitNet-style hint loss: a 1x1 regressor from student to teacher width, then plain MSE.

FitNets (Romero et al., 2015) published no setting for detectors: the weight 1.0 is this project's
choice, not a published default (``DEFAULTS`` is empty, and reports say so)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dmkd.distillers.base import DistillContext, check_weight

DEFAULTS: dict = {}

# What a tuning run searches (`orchestrator.ablate --tune`), from "almost off" to 10x the default.
SEARCH = {"weight": {"type": "loguniform", "low": 1e-3, "high": 10.0}}


class FitNetLoss(nn.Module):
    def __init__(self, student_channels: int, teacher_channels: int, *, weight: float = 1.0):
        super().__init__()
        check_weight("weight", weight)
        self.weight = weight
        self.align = nn.Conv2d(student_channels, teacher_channels, kernel_size=1)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, context: DistillContext | None = None) -> torch.Tensor:
        return self.weight * F.mse_loss(self.align(student).float(), teacher.detach().float())
