"""FGD, Focal and Global Distillation (Yang et al., CVPR 2022).

loss = alpha * L_fg + beta * L_bg + gamma * L_attention + lambda_fgd * L_global, per FPN level:
- foreground mask: 1 / (box area in feature cells) inside each ground-truth box (max where boxes
  overlap); background mask: 1 outside all boxes, normalised by the background cell count;
- L_fg, L_bg: squared error of student and teacher features, both weighted by the teacher's spatial
  and channel attention and by the mask, summed, divided by N;
- L_attention: L1 between the teacher's and the student's spatial and channel attention;
- L_global: squared error of GcBlock-style context relations of both features.
Boxes map to feature cells through the padded input size (FGD's code uses the unpadded image size).
Published settings per detector family: ``DEFAULTS`` (the constructor's defaults are RetinaNet's). FGD's
configs also start the student's neck and head from the teacher's (``init_student``), which a pair of
different widths cannot do: its weights assume a student whose features start close to the teacher's.
"""
from __future__ import annotations

import torch
from torch import nn

from dmkd.distillers.attention import channel_attention, spatial_attention
from dmkd.distillers.base import DistillContext, Published, aligner, check_temperature, check_weight

# The authors' configs (yzd-v/FGD, configs/distillers/fgd/).
DEFAULTS = {
    "retinanet": Published("FGD fgd_retina_rx101_64x4d_distill_retina_r50_fpn_2x_coco.py",
                           {"temperature": 0.5, "alpha": 1e-3, "beta": 5e-4, "gamma": 5e-4, "lambda_fgd": 5e-6}),
    "fcos": Published("FGD fgd_fcos_r101_distill_fcos_r50_2x_coco.py",
                      {"temperature": 0.8, "alpha": 1.6e-3, "beta": 8e-4, "gamma": 8e-4, "lambda_fgd": 8e-6}),
    "two_stage": Published("FGD fgd_cascade_mask_rcnn_rx101_32x4d_distill_faster_rcnn_r50_fpn_2x_coco.py",
                           {"temperature": 0.5, "alpha": 5e-5, "beta": 2.5e-5, "gamma": 5e-5, "lambda_fgd": 5e-7}),
}

# What a tuning run searches (`orchestrator.ablate --tune`): each weight from 1/1000 of its RetinaNet
# value ("almost off") to 10x it; the temperature around FGD's 0.5 (RetinaNet) and 0.8 (FCOS).
SEARCH = {"alpha": {"type": "loguniform", "low": 1e-6, "high": 1e-2},
          "beta": {"type": "loguniform", "low": 5e-7, "high": 5e-3},
          "gamma": {"type": "loguniform", "low": 5e-7, "high": 5e-3},
          "lambda_fgd": {"type": "loguniform", "low": 5e-9, "high": 5e-5},
          "temperature": {"type": "uniform", "low": 0.2, "high": 1.0}}


def foreground_background_masks(boxes: list[torch.Tensor], input_size: tuple[int, int], height: int, width: int,
                                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """N x 1 x H x W foreground and background masks from boxes (x0, y0, x1, y1 in input pixels)."""
    n = len(boxes)
    foreground = torch.zeros(n, height, width, device=device)
    ys = torch.arange(height, device=device).view(1, height, 1)
    xs = torch.arange(width, device=device).view(1, 1, width)
    for i, image_boxes in enumerate(boxes):
        if image_boxes.numel() == 0:
            continue
        scaled = image_boxes.to(device).float() * torch.tensor(
            [width / input_size[1], height / input_size[0]] * 2, device=device)
        x0, y0 = scaled[:, 0].floor().clamp(0, width - 1), scaled[:, 1].floor().clamp(0, height - 1)
        x1, y1 = scaled[:, 2].ceil().clamp(0, width - 1), scaled[:, 3].ceil().clamp(0, height - 1)
        area = 1.0 / ((y1 - y0 + 1) * (x1 - x0 + 1))
        inside = ((ys >= y0.view(-1, 1, 1)) & (ys <= y1.view(-1, 1, 1)) &
                  (xs >= x0.view(-1, 1, 1)) & (xs <= x1.view(-1, 1, 1)))
        foreground[i] = (inside.float() * area.view(-1, 1, 1)).amax(dim=0)
    background = (foreground == 0).float()
    count = background.sum(dim=(1, 2), keepdim=True)
    background = torch.where(count > 0, background / count.clamp(min=1), background)
    return foreground.unsqueeze(1), background.unsqueeze(1)


class _ContextBlock(nn.Module):
    """GcBlock: attention pooling to one context vector, then a bottleneck transform added back."""

    def __init__(self, channels: int):
        super().__init__()
        self.mask = nn.Conv2d(channels, 1, kernel_size=1)
        self.transform = nn.Sequential(nn.Conv2d(channels, channels // 2, 1), nn.LayerNorm([channels // 2, 1, 1]),
                                       nn.ReLU(inplace=True), nn.Conv2d(channels // 2, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        weights = torch.softmax(self.mask(x).reshape(n, 1, h * w), dim=2)  # N x 1 x HW
        context = torch.bmm(x.reshape(n, c, h * w), weights.transpose(1, 2)).reshape(n, c, 1, 1)
        return x + self.transform(context)


class FGDLoss(nn.Module):
    def __init__(self, student_channels: int, teacher_channels: int, *, temperature: float = 0.5,
                 alpha: float = 1e-3, beta: float = 5e-4, gamma: float = 5e-4, lambda_fgd: float = 5e-6):
        super().__init__()
        check_temperature(temperature)
        for name, value in (("alpha", alpha), ("beta", beta), ("gamma", gamma), ("lambda_fgd", lambda_fgd)):
            check_weight(name, value)
        self.temperature, self.alpha, self.beta, self.gamma, self.lambda_fgd = temperature, alpha, beta, gamma, lambda_fgd
        self.align = aligner(student_channels, teacher_channels)
        self.student_context = _ContextBlock(teacher_channels)
        self.teacher_context = _ContextBlock(teacher_channels)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, context: DistillContext | None = None) -> dict[str, torch.Tensor]:
        if context is None or context.input_size is None:
            raise ValueError("FGDLoss needs the ground-truth boxes and the input size (a DistillContext)")
        teacher = teacher.detach().float()
        student = (self.align(student) if self.align is not None else student).float()
        n, _, h, w = teacher.shape
        spatial_t = spatial_attention(teacher, self.temperature)
        channel_t = channel_attention(teacher, self.temperature)
        spatial_s = spatial_attention(student, self.temperature)
        channel_s = channel_attention(student, self.temperature)
        foreground, background = foreground_background_masks(context.boxes, context.input_size, h, w, teacher.device)

        weight = spatial_t.sqrt() * channel_t.sqrt()
        difference = (student * weight - teacher * weight).pow(2)
        fg = (difference * foreground).sum() / n
        bg = (difference * background).sum() / n
        attention = ((channel_s - channel_t).abs().sum() + (spatial_s - spatial_t).abs().sum()) / n
        relation = (self.student_context(student) - self.teacher_context(teacher)).pow(2).sum() / n
        return {"fgd_fg": self.alpha * fg, "fgd_bg": self.beta * bg,
                "fgd_attention": self.gamma * attention, "fgd_global": self.lambda_fgd * relation}
