"""Pictures of what DMKD sees: per FPN level, the teacher's spatial attention, the spatial mask it
guides, and the channel attention, for one image."""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import torch  # noqa: E402

from dmkd.distillers.attention import attention_mask, channel_attention, spatial_attention  # noqa: E402


def render_attention(image: torch.Tensor, teacher_features: dict[str, torch.Tensor], path: str | os.PathLike, *,
                     temperature: float = 0.5, spatial_ratio: float = 0.65, mask_mode: str = "topk",
                     masked: str = "important") -> Path:
    """Write a PNG with one row per level; ``image`` is 3 x H x W in [0, 1], features are 1 x C x h x w."""
    levels = list(teacher_features)
    fig, axes = plt.subplots(len(levels), 4, figsize=(10, 2.4 * len(levels)), squeeze=False)
    picture = image.detach().float().cpu().permute(1, 2, 0).clamp(0, 1).numpy()
    for row, level in zip(axes, levels):
        feat = teacher_features[level][:1].detach().float().cpu()
        spatial = spatial_attention(feat, temperature)
        mask = attention_mask(spatial, spatial_ratio, mask_mode, masked)
        channel = channel_attention(feat, temperature).flatten()
        row[0].imshow(picture)
        row[0].set_title(f"level {level}: image", fontsize=8)
        row[1].imshow(spatial[0, 0].numpy(), cmap="viridis")
        row[1].set_title(f"spatial attention (t={temperature})", fontsize=8)
        row[2].imshow(mask[0, 0].numpy(), cmap="gray", vmin=0, vmax=1)
        row[2].set_title(f"spatial mask ({mask_mode}, {masked}, {spatial_ratio:.2f}); black = masked", fontsize=8)
        row[3].bar(range(channel.numel()), channel.numpy(), width=1.0)
        row[3].set_title("channel attention", fontsize=8)
        for axis in row[:3]:
            axis.set_xticks([])
            axis.set_yticks([])
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
