"""Pictures of what DMKD sees: per FPN level, the teacher's spatial attention over the image, the
spatial mask it guides, and the channel attention, for one image."""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dmkd.distillers.attention import attention_mask, channel_attention, spatial_attention  # noqa: E402


def _upsampled(map_: torch.Tensor, size: tuple[int, int], mode: str):
    """A 1 x 1 x h x w map at the image's size, as a numpy array."""
    return F.interpolate(map_.float(), size=size, mode=mode, **({"align_corners": False} if mode == "bilinear" else {}))[0, 0].numpy()


def render_attention(image: torch.Tensor, teacher_features: dict[str, torch.Tensor], path: str | os.PathLike, *,
                     temperature: float, spatial_ratio: float, mask_mode: str, masked: str) -> Path:
    """Write a PNG with one row per FPN level: the teacher's spatial attention blended over the image,
    the spatial mask it guides outlined on the image (masked pixels dimmed), and the channel attention.
    ``image`` is 3 x H x W in [0, 1]; features are 1 x C x h x w."""
    levels = list(teacher_features)
    fig, axes = plt.subplots(len(levels), 3, figsize=(9, 3.0 * len(levels)), squeeze=False)
    picture = image.detach().float().cpu().permute(1, 2, 0).clamp(0, 1).numpy()
    size = picture.shape[:2]
    for row, level in zip(axes, levels):
        feat = teacher_features[level][:1].detach().float().cpu()
        spatial = spatial_attention(feat, temperature)
        kept = _upsampled(attention_mask(spatial, spatial_ratio, mask_mode, masked), size, "nearest")
        channel = channel_attention(feat, temperature).flatten()
        row[0].imshow(picture)
        heat = row[0].imshow(_upsampled(spatial, size, "bilinear"), cmap="inferno", alpha=0.55)
        fig.colorbar(heat, ax=row[0], fraction=0.046, pad=0.02).ax.tick_params(labelsize=7)
        row[0].set_title(f"level {level}: spatial attention (T={temperature:.2g})", fontsize=9)
        row[1].imshow(picture)
        shade = np.zeros((*size, 4))
        shade[..., 3] = 0.6 * (kept < 0.5)  # masked pixels dimmed
        row[1].imshow(shade)
        if 0 < kept.mean() < 1:
            row[1].contour(kept, levels=[0.5], colors="cyan", linewidths=1.0)
        row[1].set_title(f"mask ({mask_mode}, ratio {spatial_ratio:.2f}): {masked} dimmed", fontsize=9)
        # one filled outline, not a bar per channel: the same picture, drawn without hundreds of patches
        row[2].stairs(channel.numpy(), np.arange(channel.numel() + 1) - 0.5, fill=True)
        row[2].set_title(f"channel attention ({channel.numel()} channels)", fontsize=9)
        row[2].set_xlabel("channel", fontsize=8)
        row[2].tick_params(labelsize=7)
        for axis in row[:2]:
            axis.set_xticks([])
            axis.set_yticks([])
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
