"""DMKD: Dual Masked Knowledge Distillation (arXiv 2309.02719), the reading described in
``shared/design/dmkd-method.md``; every uncertain choice is a constructor switch.

Per FPN level, with teacher feature T (N x C x H x W) and student feature S:
1. a 1x1 conv aligns S to C channels when widths differ;
2. teacher spatial and channel attention with temperature t (no gradient);
3. masks zero the ``round(ratio * K)`` most attended positions / channels per sample;
4. each masked copy of S goes through its own generation block;
5. the two outputs are fused with ``softmax(fusion_logits)`` (learned, initialised to 0.5 / 0.5);
6. loss = alpha * sum((F - T)^2) / N.
"""
from __future__ import annotations

import torch
from torch import nn

from dmkd.distillers.attention import MASK_MODES, MASKED_SIDES, attention_mask, channel_attention, spatial_attention
from dmkd.distillers.base import DistillContext, aligner, check_temperature, check_weight, generation_block

BRANCHES = ("spatial", "channel")
FUSIONS = ("learned", "fixed")
# What a tuning run searches (`orchestrator.ablate --tune`): alpha from "almost off" to 5x the paper's
# one-stage value; the single-branch variants drop the other branch's ratio.
SEARCH = {"alpha": {"type": "loguniform", "low": 1e-8, "high": 1e-4},
          "temperature": {"type": "uniform", "low": 0.2, "high": 1.0},
          "spatial_ratio": {"type": "uniform", "low": 0.3, "high": 0.9},
          "channel_ratio": {"type": "uniform", "low": 0.3, "high": 0.9}}


class DMKDLoss(nn.Module):
    def __init__(self, student_channels: int, teacher_channels: int, *, alpha: float = 2e-5,
                 temperature: float = 0.5, spatial_ratio: float = 0.65, channel_ratio: float = 0.65,
                 mask_mode: str = "topk", masked: str = "important",
                 branches: tuple[str, ...] = BRANCHES, fusion: str = "learned"):
        super().__init__()
        branches = tuple(branches)
        if not branches or any(b not in BRANCHES for b in branches) or len(set(branches)) != len(branches):
            raise ValueError(f"branches must be a non-empty subset of {BRANCHES}, but got {branches!r}")
        if mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode must be one of {', '.join(MASK_MODES)}, but got {mask_mode!r}")
        if masked not in MASKED_SIDES:
            raise ValueError(f"masked must be one of {', '.join(MASKED_SIDES)}, but got {masked!r}")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}, but got {fusion!r}")
        check_weight("alpha", alpha)
        check_temperature(temperature)
        for name, ratio in (("spatial_ratio", spatial_ratio), ("channel_ratio", channel_ratio)):
            if mask_mode == "topk" and not 0.0 <= ratio <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1] for mask_mode 'topk', but got {ratio}")
            if not ratio >= 0.0:
                raise ValueError(f"{name} must be >= 0, but got {ratio}")
        self.alpha, self.temperature = alpha, temperature
        self.spatial_ratio, self.channel_ratio = spatial_ratio, channel_ratio
        self.mask_mode, self.masked, self.branches, self.fusion = mask_mode, masked, branches, fusion
        self.align = aligner(student_channels, teacher_channels)
        self.spatial_generator = generation_block(teacher_channels) if "spatial" in branches else None
        self.channel_generator = generation_block(teacher_channels) if "channel" in branches else None
        two = len(branches) == 2
        self.fusion_logits = nn.Parameter(torch.zeros(2)) if (two and fusion == "learned") else None

    def masks(self, teacher: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Spatial (N x 1 x H x W) and channel (N x C x 1 x 1) masks from the teacher's attention."""
        with torch.no_grad():
            spatial = channel = None
            if self.spatial_generator is not None:
                spatial = attention_mask(spatial_attention(teacher, self.temperature), self.spatial_ratio,
                                         self.mask_mode, self.masked)
            if self.channel_generator is not None:
                channel = attention_mask(channel_attention(teacher, self.temperature), self.channel_ratio,
                                         self.mask_mode, self.masked)
        return spatial, channel

    def fusion_weights(self) -> torch.Tensor | None:
        """(w_spatial, w_channel) when both branches are on; None with one branch."""
        if len(self.branches) < 2:
            return None
        if self.fusion_logits is None:
            return torch.full((2,), 0.5)
        return torch.softmax(self.fusion_logits.detach().float(), dim=0)

    def reconstruct(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """F, the fused reconstruction of the teacher feature from the two masked student copies."""
        aligned = self.align(student) if self.align is not None else student
        spatial_mask, channel_mask = self.masks(teacher.detach())
        outputs = []
        if self.spatial_generator is not None:
            outputs.append(self.spatial_generator(aligned * spatial_mask.to(aligned.dtype)))
        if self.channel_generator is not None:
            outputs.append(self.channel_generator(aligned * channel_mask.to(aligned.dtype)))
        if len(outputs) == 1:
            return outputs[0]
        if self.fusion_logits is None:
            return 0.5 * outputs[0] + 0.5 * outputs[1]
        weights = torch.softmax(self.fusion_logits, dim=0).to(outputs[0].dtype)
        return weights[0] * outputs[0] + weights[1] * outputs[1]

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, context: DistillContext | None = None) -> torch.Tensor:
        teacher = teacher.detach()
        fused = self.reconstruct(student, teacher)
        return self.alpha * (fused.float() - teacher.float()).pow(2).sum() / student.shape[0]
