"""Image + target transforms for detection that keep the boxes right (boxes are x0, y0, x1, y1)."""
from __future__ import annotations

import torch
import torchvision.transforms.functional as F
from PIL import Image


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, image, target):
        for transform in self.transforms:
            image, target = transform(image, target)
        return image, target


class Resize:
    """Scale the image so its longer side is ``max_size``, keeping the aspect ratio; boxes follow."""

    def __init__(self, max_size: int):
        self.max_size = max_size

    def __call__(self, image: Image.Image, target: dict):
        width, height = image.size
        scale = self.max_size / max(width, height)
        if scale != 1.0:
            new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
            image = image.resize(new_size, Image.Resampling.BILINEAR)
            target = dict(target)
            target["boxes"] = target["boxes"] * torch.tensor(
                [new_size[0] / width, new_size[1] / height] * 2, dtype=target["boxes"].dtype)
        return image, target


class RandomHorizontalFlip:
    """Flip with probability ``p``, drawn from torch's global generator (seeded, saved in checkpoints)."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image, target: dict):
        if torch.rand(()) < self.p:
            width = image.size[0] if isinstance(image, Image.Image) else image.shape[-1]
            image = F.hflip(image)
            boxes = target["boxes"].clone()
            boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
            target = {**target, "boxes": boxes}
        return image, target


class ToTensor:
    def __call__(self, image: Image.Image, target: dict):
        return F.pil_to_tensor(image).float().div_(255.0), target


def train_transforms(image_size: int) -> Compose:
    return Compose([Resize(image_size), RandomHorizontalFlip(0.5), ToTensor()])


def eval_transforms(image_size: int) -> Compose:
    return Compose([Resize(image_size), ToTensor()])
