"""PKD (Cao et al., "PKD: General Distillation Framework for Object Detectors via Pearson Correlation
Coefficient", NeurIPS 2022): the student's and the teacher's FPN features are each standardised per
channel (zero mean, unit variance over the batch and all positions), then compared by MSE. Equal to
``weight * (n - 1) / n * mean over channels of (1 - Pearson r)``: only the pattern is imitated, not the
teacher's magnitude, which is why it needs no per-pair scale. One weight, counted with the 1/2 of the
loss; MMRazor's configs use 10 for one-stage students and 6 for two-stage ones (``DEFAULTS``), on four
FPN levels; here it applies to every level the detector has.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dmkd.distillers.base import DistillContext, Published, aligner, check_weight

# MMRazor's configs (open-mmlab/mmrazor, configs/distill/mmdet/pkd/), each on fpn0-fpn3.
DEFAULTS = {
    "retinanet": Published("MMRazor pkd_fpn_retina_x101_retina_r50_2x_coco.py (P3-P6)", {"weight": 10.0}),
    "fcos": Published("MMRazor pkd_fpn_fcos_x101_retina_r50_1x_coco.py (one-stage, P3-P6)", {"weight": 10.0}),
    "two_stage": Published("MMRazor pkd_fpn_faster-rcnn_r101_faster-rcnn_r50_2x_coco.py (P2-P5)", {"weight": 6.0}),
}

# What a tuning run searches (`orchestrator.ablate --tune`): from "almost off" to 6x the one-stage default.
SEARCH = {"weight": {"type": "loguniform", "low": 6e-3, "high": 60.0}}
EPS = 1e-6


def standardise(feature: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (C, N*H*W), each channel at zero mean and unit (sample) standard deviation."""
    flat = feature.transpose(0, 1).flatten(1)
    return (flat - flat.mean(dim=1, keepdim=True)) / (flat.std(dim=1, keepdim=True) + EPS)


class PKDLoss(nn.Module):
    def __init__(self, student_channels: int, teacher_channels: int, *, weight: float = 10.0):
        super().__init__()
        check_weight("weight", weight)
        self.weight = weight
        self.align = aligner(student_channels, teacher_channels)  # None at equal widths: nothing to learn

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, context: DistillContext | None = None) -> torch.Tensor:
        if self.align is not None:
            student = self.align(student)
        return self.weight / 2 * F.mse_loss(standardise(student.float()), standardise(teacher.detach().float()))
