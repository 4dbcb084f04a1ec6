"""MGD, Masked Generative Distillation (Yang et al., ECCV 2022): a random spatial mask with ratio
``lambda_mgd`` (shared across channels, redrawn each step), one generation block, squared error to the
teacher feature. Published settings per detector family: ``DEFAULTS``."""
from __future__ import annotations

import torch
from torch import nn

from dmkd.distillers.base import DistillContext, Published, aligner, check_weight, generation_block

# The authors' configs (yzd-v/MGD, det/configs/distillers/mgd/). MGD published no FCOS config: an FCOS
# student takes the one-stage value its RetinaNet and RepPoints configs share.
DEFAULTS = {
    "retinanet": Published("MGD retina_rx101_64x4d_distill_retina_r50_fpn_2x_coco.py",
                           {"alpha": 2e-5, "lambda_mgd": 0.65}),
    "fcos": Published("MGD's one-stage value (retina_rx101_64x4d_distill_retina_r50_fpn_2x_coco.py; no FCOS config)",
                      {"alpha": 2e-5, "lambda_mgd": 0.65}),
    "two_stage": Published("MGD cascade_mask_rcnn_rx101_32x4d_distill_faster_rcnn_r50_fpn_2x_coco.py",
                           {"alpha": 5e-7, "lambda_mgd": 0.45}),
}

# What a tuning run searches (`orchestrator.ablate --tune`): alpha from "almost off" to 5x the default.
SEARCH = {"alpha": {"type": "loguniform", "low": 1e-8, "high": 1e-4},
          "lambda_mgd": {"type": "uniform", "low": 0.3, "high": 0.9}}


class MGDLoss(nn.Module):
    def __init__(self, student_channels: int, teacher_channels: int, *, alpha: float = 2e-5, lambda_mgd: float = 0.65):
        super().__init__()
        check_weight("alpha", alpha)
        if not 0.0 <= lambda_mgd <= 1.0:
            raise ValueError(f"lambda_mgd must lie in [0, 1], but got {lambda_mgd}")
        self.alpha, self.lambda_mgd = alpha, lambda_mgd
        self.align = aligner(student_channels, teacher_channels)
        self.generator = generation_block(teacher_channels)

    def random_mask(self, feat: torch.Tensor) -> torch.Tensor:
        """N x 1 x H x W, each position zeroed with probability lambda."""
        n, _, h, w = feat.shape
        return (torch.rand(n, 1, h, w, device=feat.device) >= self.lambda_mgd).to(feat.dtype)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, context: DistillContext | None = None) -> torch.Tensor:
        teacher = teacher.detach()
        aligned = self.align(student) if self.align is not None else student
        generated = self.generator(aligned * self.random_mask(aligned))
        return self.alpha * (generated.float() - teacher.float()).pow(2).sum() / student.shape[0]
