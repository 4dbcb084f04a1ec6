"""Our reading of DMKD, Dual Masked Knowledge Distillation (arXiv 2309.02719). The paper's code is not
public and only its abstract could be read: the masking rule, the fusion and the weights below are this
project's choices, each uncertain one a constructor switch (``docs/dmkd-method.md`` explains them).

Per FPN level, with teacher feature T (N x C x H x W) and student feature S:
1. a 1x1 conv aligns S to C channels when widths differ;
2. teacher spatial and channel attention with temperature t (no gradient);
3. masks zero the ``round(ratio * K)`` most attended positions / channels per sample;
4. each masked copy of S goes through its own generation block;
5. the two outputs are fused with ``softmax(fusion_logits)`` (learned, initialised to 0.5 / 0.5);
6. loss = alpha * sum((F - T)^2) / N.

``channel_mask="before_align"`` masks the student's own channels before the align conv instead (step 3
before step 1): after it, a learned align conv can leave the masked channels empty and carry the
student's information in the kept ones, so the channel mask may hide nothing. The teacher's attention
cannot index the student's channels when the widths differ; the student's own channel attention then
picks them. ``channel_overlap()`` reports how alike the channel masks of one batch are.
"""
from __future__ import annotations

import torch
from torch import nn

from dmkd.distillers.attention import MASK_MODES, MASKED_SIDES, attention_mask, channel_attention, spatial_attention
from dmkd.distillers.base import DistillContext, Published, aligner, check_temperature, check_weight, generation_block

BASELINE = False  # the method this project studies: the other distillers are its baselines in a table
# what a report says wherever this method is named (a method reconstructed from less than its paper says so)
READING = ("DMKD here is this project's reading of Dual Masked Knowledge Distillation (arXiv 2309.02719): its code "
           "is not public and only its abstract could be read, so the masking rule, the fusion and the weights are "
           "this project's choices (docs/dmkd-method.md in the repository says which).")
BRANCHES = ("spatial", "channel")
FUSIONS = ("learned", "fixed")
CHANNEL_MASKS = ("after_align", "before_align")
# No DMKD config is public: our reading takes MGD's per-family weight and mask ratio (DMKD builds on MGD's
# generation block and reports against it) and FGD's attention temperature.
DEFAULTS = {
    "retinanet": Published("our reading: MGD's RetinaNet alpha and ratio, FGD's RetinaNet temperature",
                           {"alpha": 2e-5, "temperature": 0.5, "spatial_ratio": 0.65, "channel_ratio": 0.65}),
    "fcos": Published("our reading: MGD's one-stage alpha and ratio, FGD's RetinaNet temperature",
                      {"alpha": 2e-5, "temperature": 0.5, "spatial_ratio": 0.65, "channel_ratio": 0.65}),
    "two_stage": Published("our reading: MGD's two-stage alpha and ratio, FGD's two-stage temperature",
                           {"alpha": 5e-7, "temperature": 0.5, "spatial_ratio": 0.45, "channel_ratio": 0.45}),
}
# What a tuning run searches (`orchestrator.ablate --tune`): alpha from "almost off" to 5x the paper's
# one-stage value; the single-branch variants drop the other branch's ratio.
SEARCH = {"alpha": {"type": "loguniform", "low": 1e-8, "high": 1e-4},
          "temperature": {"type": "uniform", "low": 0.2, "high": 1.0},
          "spatial_ratio": {"type": "uniform", "low": 0.3, "high": 0.9},
          "channel_ratio": {"type": "uniform", "low": 0.3, "high": 0.9}}


def attention_picture(image: torch.Tensor, teacher_features: dict, params: dict, path) -> None:
    """The teacher's attention and the masks it guides on one image (a trial's W&B run shows it);
    ``params`` are the run's loss settings, defaults included."""
    from dmkd.visualize import render_attention  # matplotlib, only when a picture is drawn

    render_attention(image, teacher_features, path, temperature=params["temperature"],
                     spatial_ratio=params["spatial_ratio"], mask_mode=params["mask_mode"], masked=params["masked"])


def mask_overlap(mask: torch.Tensor) -> float | None:
    """Mean pairwise Jaccard overlap of the masked (0) entries of an N x ... mask over its N samples."""
    masked = (mask.reshape(mask.shape[0], -1) == 0).float()
    n = masked.shape[0]
    if n < 2 or not masked.any():
        return None
    inter = masked @ masked.T
    sizes = masked.sum(dim=1)
    union = sizes[:, None] + sizes[None, :] - inter
    pairs = torch.triu(torch.ones(n, n, dtype=torch.bool, device=mask.device), diagonal=1)
    return float((inter[pairs] / union[pairs].clamp(min=1)).mean())


class DMKDLoss(nn.Module):
    def __init__(self, student_channels: int, teacher_channels: int, *, alpha: float = 2e-5,
                 temperature: float = 0.5, spatial_ratio: float = 0.65, channel_ratio: float = 0.65,
                 mask_mode: str = "topk", masked: str = "important",
                 branches: tuple[str, ...] = BRANCHES, fusion: str = "learned", channel_mask: str = "after_align"):
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
        if channel_mask not in CHANNEL_MASKS:
            raise ValueError(f"channel_mask must be one of {', '.join(CHANNEL_MASKS)}, but got {channel_mask!r}")
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
        self.channel_mask = channel_mask
        self.align = aligner(student_channels, teacher_channels)
        self._overlap: float | None = None
        self.spatial_generator = generation_block(teacher_channels) if "spatial" in branches else None
        self.channel_generator = generation_block(teacher_channels) if "channel" in branches else None
        two = len(branches) == 2
        self.fusion_logits = nn.Parameter(torch.zeros(2)) if (two and fusion == "learned") else None

    def masks(self, teacher: torch.Tensor, student: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Spatial (N x 1 x H x W) and channel (N x C x 1 x 1) masks from the teacher's attention; with
        ``channel_mask="before_align"`` and different widths, the channel mask covers the ``student``'s
        own channels, chosen by its own channel attention."""
        with torch.no_grad():
            spatial = channel = None
            if self.spatial_generator is not None:
                spatial = attention_mask(spatial_attention(teacher, self.temperature), self.spatial_ratio,
                                         self.mask_mode, self.masked)
            if self.channel_generator is not None:
                guide = teacher
                if self.channel_mask == "before_align" and self.align is not None and student is not None:
                    guide = student
                channel = attention_mask(channel_attention(guide, self.temperature), self.channel_ratio,
                                         self.mask_mode, self.masked)
                self._overlap = mask_overlap(channel)
        return spatial, channel

    def channel_overlap(self) -> float | None:
        """The mean Jaccard overlap of the masked channel sets of the last batch's samples (1: every sample
        masked the same channels); None before the first batch or without a channel branch."""
        return self._overlap

    def extra_metrics(self) -> dict[str, float]:
        """What a run logs per level besides the loss (``MultiLevel`` puts the level into each name)."""
        metrics = {}
        weights = self.fusion_weights()
        if weights is not None:
            metrics.update({"fusion/spatial": float(weights[0]), "fusion/channel": float(weights[1])})
        if self._overlap is not None:
            metrics["mask/channel_jaccard"] = self._overlap
        return metrics

    def fusion_weights(self) -> torch.Tensor | None:
        """(w_spatial, w_channel) when both branches are on; None with one branch."""
        if len(self.branches) < 2:
            return None
        if self.fusion_logits is None:
            return torch.full((2,), 0.5)
        return torch.softmax(self.fusion_logits.detach().float(), dim=0)

    def reconstruct(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """F, the fused reconstruction of the teacher feature from the two masked student copies."""
        align = self.align if self.align is not None else nn.Identity()
        spatial_mask, channel_mask = self.masks(teacher.detach(), student.detach())
        aligned = align(student)
        outputs = []
        if self.spatial_generator is not None:
            outputs.append(self.spatial_generator(aligned * spatial_mask.to(aligned.dtype)))
        if self.channel_generator is not None:
            if self.channel_mask == "before_align":
                masked = align(student * channel_mask.to(student.dtype))
            else:
                masked = aligned * channel_mask.to(aligned.dtype)
            outputs.append(self.channel_generator(masked))
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
