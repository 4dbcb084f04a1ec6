"""The embedded mini-benchmark: a deterministic COCO-format data set of simple shapes.

Each image is a noisy flat background with 1-4 non-overlapping filled shapes (rectangle, ellipse,
triangle) of random colour. Boxes are the tight pixel extents of each drawn shape, so they are exact.
It exists so that detection and distillation effects can be seen on a CPU in minutes.

    python -m dmkd.synthetic --out data/mini
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dmkd.config import DataPaths
from dmkd.errors import UserError, exit_process, one_line
from dmkd.io import atomic_write_json

CATEGORIES = [
    {"id": 1, "name": "rectangle", "supercategory": "shape"},
    {"id": 2, "name": "ellipse", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
]
VERSION = 1  # bump when the generator's output changes, so cached data sets are regenerated


@dataclass(frozen=True)
class SyntheticSpec:
    image_size: int = 96
    train_images: int = 800
    val_images: int = 200
    test_images: int = 200  # held out: ablation tables report on it, selection never sees it
    min_objects: int = 1
    max_objects: int = 4
    min_object_size: int = 14
    max_object_size: int = 40
    seed: int = 0


def _random_color(rng: np.random.Generator, avoid: np.ndarray, min_distance: float = 90.0) -> np.ndarray:
    while True:
        color = rng.integers(0, 256, size=3)
        if np.abs(color - avoid).sum() >= min_distance:
            return color


def _draw_image(spec: SyntheticSpec, rng: np.random.Generator) -> tuple[Image.Image, list[tuple[int, list[int]]]]:
    size = spec.image_size
    background = rng.integers(40, 216, size=3)
    pixels = background[None, None, :] + rng.normal(0.0, 8.0, size=(size, size, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)

    placed: list[list[int]] = []  # x0, y0, x1, y1 inclusive, with a gap kept between shapes
    objects: list[tuple[int, list[int]]] = []
    wanted = int(rng.integers(spec.min_objects, spec.max_objects + 1))
    for _ in range(wanted * 20):
        if len(objects) == wanted:
            break
        w = int(rng.integers(spec.min_object_size, spec.max_object_size + 1))
        h = int(np.clip(w * rng.uniform(0.6, 1.6), spec.min_object_size, spec.max_object_size))
        x0 = int(rng.integers(0, size - w + 1))
        y0 = int(rng.integers(0, size - h + 1))
        box = [x0, y0, x0 + w - 1, y0 + h - 1]
        if any(box[0] <= p[2] + 2 and p[0] <= box[2] + 2 and box[1] <= p[3] + 2 and p[1] <= box[3] + 2 for p in placed):
            continue
        category = int(rng.integers(1, len(CATEGORIES) + 1))
        color = tuple(int(c) for c in _random_color(rng, background))
        mask = Image.new("L", (size, size), 0)
        mask_draw = ImageDraw.Draw(mask)
        if category == 1:
            mask_draw.rectangle(box, fill=255)
        elif category == 2:
            mask_draw.ellipse(box, fill=255)
        else:
            apex = int(rng.integers(box[0], box[2] + 1))
            mask_draw.polygon([(apex, box[1]), (box[0], box[3]), (box[2], box[3])], fill=255)
        draw.bitmap((0, 0), mask, fill=color)
        ys, xs = np.nonzero(np.asarray(mask))
        tight = [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]
        placed.append(box)
        objects.append((category, tight))
    return image, objects


def generate_split(spec: SyntheticSpec, out: Path, split: str, count: int, seed_offset: int) -> Path:
    """Write ``out/split/*.png`` and ``out/split.json``; returns the JSON path. Images numbered beyond
    ``count`` that an earlier generation left in the folder are removed: the folder holds the split alone
    (the caches' data key counts its files)."""
    image_dir = out / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images: list[dict] = []
    annotations: list[dict] = []
    for index in range(count):
        rng = np.random.default_rng([spec.seed, seed_offset, index])
        image, objects = _draw_image(spec, rng)
        file_name = f"{index:06d}.png"
        image.save(image_dir / file_name)
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name, "width": spec.image_size, "height": spec.image_size})
        for category, (x0, y0, x1, y1) in objects:
            w, h = x1 - x0 + 1, y1 - y0 + 1
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                "bbox": [x0, y0, w, h], "area": float(w * h), "iscrowd": 0,
            })
    for stale in image_dir.glob("*.png"):  # images of an earlier, larger generation into the same folder
        if stale.stem.isdigit() and len(stale.stem) == 6 and int(stale.stem) >= count:
            stale.unlink()
    ann_path = out / f"{split}.json"
    atomic_write_json(ann_path, {
        "info": {"description": "dmkd mini-benchmark", "generator_version": VERSION, "spec": asdict(spec)},
        "images": images, "annotations": annotations, "categories": CATEGORIES,
    })
    return ann_path


def ensure_mini_benchmark(out: str | os.PathLike, spec: SyntheticSpec = SyntheticSpec()) -> DataPaths:
    """Generate the mini-benchmark into ``out`` unless an identical one is already there, and return its
    paths (all three splits). The three splits come from one generator with different seeds."""
    out = Path(out)
    paths = {"train_ann": out / "train.json", "train_images": out / "train",
             "val_ann": out / "val.json", "val_images": out / "val",
             "test_ann": out / "test.json", "test_images": out / "test"}
    marker = out / "spec.json"
    wanted = {"version": VERSION, **asdict(spec)}
    if not (marker.exists() and json.loads(marker.read_text()) == wanted and paths["test_ann"].exists()):
        out.mkdir(parents=True, exist_ok=True)
        marker.unlink(missing_ok=True)
        generate_split(spec, out, "train", spec.train_images, seed_offset=0)
        generate_split(spec, out, "val", spec.val_images, seed_offset=1)
        generate_split(spec, out, "test", spec.test_images, seed_offset=2)
        atomic_write_json(marker, wanted)  # written last: its presence means the set is complete
    return DataPaths(**{key: str(value) for key, value in paths.items()})


def main(argv: list[str] | None = None) -> int:
    defaults = SyntheticSpec()
    parser = argparse.ArgumentParser(prog="python -m dmkd.synthetic", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    parser.add_argument("--train-images", type=int, default=defaults.train_images)
    parser.add_argument("--val-images", type=int, default=defaults.val_images)
    parser.add_argument("--test-images", type=int, default=defaults.test_images)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    args = parser.parse_args(argv)
    try:
        spec = SyntheticSpec(image_size=args.image_size, train_images=args.train_images,
                             val_images=args.val_images, test_images=args.test_images, seed=args.seed)
        if spec.image_size < 2 * spec.max_object_size:
            raise UserError(f"--image-size: must be at least {2 * spec.max_object_size}, but got {spec.image_size}")
        for split in ("train", "val", "test"):  # an empty split would be written, and fail only when read
            count = getattr(spec, f"{split}_images")
            if count < 1:
                raise UserError(f"--{split}-images: must be at least 1, but got {count}")
        paths = ensure_mini_benchmark(args.out, spec)
    except (UserError, OSError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    print(json.dumps(paths.as_dict(), indent=2))
    return 0


if __name__ == "__main__":
    exit_process(main())
