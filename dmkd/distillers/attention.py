"""Teacher attention maps and the masks they guide (DMKD steps 2 and 3)."""
from __future__ import annotations

import torch

MASK_MODES = ("topk", "threshold", "bernoulli")
MASKED_SIDES = ("important", "unimportant")


def spatial_attention(feat: torch.Tensor, temperature: float) -> torch.Tensor:
    """``H*W * softmax`` over the H*W positions of ``mean_c |feat| / t``: N x 1 x H x W, mean 1 per sample."""
    n, _, h, w = feat.shape
    logits = feat.abs().mean(dim=1).reshape(n, h * w) / temperature
    return (h * w * torch.softmax(logits.float(), dim=1)).reshape(n, 1, h, w)


def channel_attention(feat: torch.Tensor, temperature: float) -> torch.Tensor:
    """``C * softmax`` over the C channels of ``mean_hw |feat| / t``: N x C x 1 x 1, mean 1 per sample."""
    n, c = feat.shape[:2]
    logits = feat.abs().mean(dim=(2, 3)) / temperature
    return (c * torch.softmax(logits.float(), dim=1)).reshape(n, c, 1, 1)


def _inverted_ranking(flat: torch.Tensor) -> torch.Tensor:
    """Give the entry of rank r (ascending) the value of rank K-1-r: the least attended entry gets the
    largest attention value, so the masking probabilities keep their distribution but flip sides."""
    values, order = flat.sort(dim=1)
    return torch.empty_like(flat).scatter_(1, order, values.flip(1))


def attention_mask(attention: torch.Tensor, ratio: float, mode: str = "topk", masked: str = "important") -> torch.Tensor:
    """A float 0/1 mask of ``attention``'s shape (1 = kept, 0 = masked), decided per sample.

    - ``topk``: masks exactly ``round(ratio * K)`` entries of each sample (K entries per sample), the
      most attended ones (``masked="important"``) or the least attended ones (``"unimportant"``).
    - ``threshold``: masks the entries whose (mean-1) attention is above ``ratio`` (important) or
      below ``ratio`` (unimportant).
    - ``bernoulli``: masks each entry with probability ``clamp(ratio * attention, 0, 1)``, a fresh
      draw each call; for ``unimportant`` the attention values are first given in inverted rank order
      (see :func:`_inverted_ranking`), so the least attended entries are the most likely to be masked.
    """
    if mode not in MASK_MODES:
        raise ValueError(f"mask_mode must be one of {', '.join(MASK_MODES)}, but got {mode!r}")
    if masked not in MASKED_SIDES:
        raise ValueError(f"masked must be one of {', '.join(MASKED_SIDES)}, but got {masked!r}")
    n = attention.shape[0]
    flat = attention.detach().reshape(n, -1)
    if mode == "topk":
        k = int(round(ratio * flat.shape[1]))
        mask = torch.ones_like(flat)
        if k > 0:
            index = flat.topk(k, dim=1, largest=masked == "important").indices
            mask.scatter_(1, index, 0.0)
    elif mode == "threshold":
        mask = (flat <= ratio if masked == "important" else flat >= ratio).to(flat.dtype)
    else:
        source = flat if masked == "important" else _inverted_ranking(flat)
        probability = (ratio * source).clamp(0.0, 1.0)
        mask = (torch.rand_like(probability) >= probability).to(flat.dtype)
    return mask.reshape(attention.shape)
