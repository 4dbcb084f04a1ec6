"""COCO-format detection data read through pycocotools, with the quirks of real COCO files handled.

- category ids need not be contiguous: they map to labels 1..K for training (0 is background) and
  back to the original ids in every result file;
- ``iscrowd=1`` boxes are not trained on (COCOeval still uses them to ignore matches);
- boxes with zero width or height, or wholly outside their image, are dropped (counted, one warning);
  boxes partly outside are clipped;
- images without annotations stay in the set; grayscale, RGBA and palette images become RGB.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pycocotools.coco import COCO

from dmkd.errors import UserError
from dmkd.io import read_json


def is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_box(value) -> bool:
    return isinstance(value, list) and len(value) == 4 and all(is_number(v) for v in value)


def check_box_sizes(path: Path, field: str, records: list[dict]) -> None:
    """A COCO box is [x, y, width, height]: a negative width or height is an error (a zero one is an empty
    box, dropped and counted where a data set is read)."""
    for index, record in enumerate(records):
        width, height = record["bbox"][2], record["bbox"][3]
        if width < 0 or height < 0:
            side, value = ("width", width) if width < 0 else ("height", height)
            raise UserError(f"{path}: {field}[{index}].bbox has a negative {side} ({value}): COCO boxes are "
                            f"[x, y, width, height], not corner coordinates")


def check_records(path: Path, field: str, records, required: dict) -> None:
    """``records`` must be a list of objects, each holding ``required`` keys whose values pass their
    checks (``{key: (check, what it must be)}``); the first problem is a one-line ``UserError``."""
    if not isinstance(records, list):
        raise UserError(f"{path}: field '{field}' must be a list, but got {type(records).__name__}")
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise UserError(f"{path}: {field}[{index}] must be an object, but got {record!r}")
        for key, (check, what) in required.items():
            if key not in record:
                raise UserError(f"{path}: {field}[{index}] has no '{key}'")
            if not check(record[key]):
                raise UserError(f"{path}: {field}[{index}].{key} must be {what}, but got {record[key]!r}")


def _check_unique(path: Path, field: str, records: list[dict]) -> None:
    seen = set()
    for index, record in enumerate(records):
        if "id" in record:
            if record["id"] in seen:
                raise UserError(f"{path}: {field}[{index}].id {record['id']} appears twice (ids must be unique)")
            seen.add(record["id"])


def load_coco(ann_file: str | os.PathLike) -> COCO:
    """Read and check a COCO instances file; every problem is a one-line ``UserError``."""
    path = Path(ann_file)
    data = read_json(path, "annotation file")
    if not isinstance(data, dict):
        raise UserError(f"{path}: must hold a JSON object with 'images', 'annotations' and 'categories'")
    for key in ("images", "categories"):
        if key not in data:
            raise UserError(f"{path}: field '{key}' is missing or not a list")
    if isinstance(data["categories"], list) and not data["categories"]:
        raise UserError(f"{path}: field 'categories' is empty")
    data.setdefault("annotations", [])
    check_records(path, "images", data["images"], {"id": (is_id, "an integer"),
                                                    "file_name": (lambda v: isinstance(v, str), "a string")})
    check_records(path, "categories", data["categories"], {"id": (is_id, "an integer")})
    check_records(path, "annotations", data["annotations"], {
        "image_id": (is_id, "an integer"), "category_id": (is_id, "an integer"),
        "bbox": (is_box, "[x, y, width, height] of numbers")})
    check_box_sizes(path, "annotations", data["annotations"])
    for field in ("images", "categories", "annotations"):
        _check_unique(path, field, data[field])
    image_ids = {image["id"] for image in data["images"]}
    for index, ann in enumerate(data["annotations"]):
        if ann["image_id"] not in image_ids:
            raise UserError(f"{path}: annotations[{index}].image_id {ann['image_id']} is not in 'images'")
        ann.setdefault("id", index + 1)
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", float(ann["bbox"][2] * ann["bbox"][3]))
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class CocoDetection(torch.utils.data.Dataset):
    """Images and targets (``boxes`` x0y0x1y1 float, ``labels`` 1..K, ``image_id``, ``orig_size``)."""

    def __init__(self, ann_file: str | os.PathLike, image_dir: str | os.PathLike, transforms=None,
                 coco: COCO | None = None):
        self.ann_file = str(ann_file)
        self.image_dir = Path(image_dir)
        if not self.image_dir.is_dir():
            raise UserError(f"{self.image_dir}: image folder not found")
        self.coco = coco if coco is not None else load_coco(ann_file)
        self.transforms = transforms
        self.category_ids = sorted(self.coco.getCatIds())
        self.label_to_category = {label: cid for label, cid in enumerate(self.category_ids, start=1)}
        category_to_label = {cid: label for label, cid in self.label_to_category.items()}
        self.image_ids = sorted(self.coco.getImgIds())
        self.targets = {}
        dropped = 0
        for image_id in self.image_ids:
            info = self.coco.imgs[image_id]
            width, height = info.get("width"), info.get("height")
            boxes, labels = [], []
            for ann in self.coco.imgToAnns.get(image_id, []):
                if ann.get("iscrowd", 0):
                    continue
                if ann["category_id"] not in category_to_label:
                    raise UserError(f"{self.ann_file}: annotation {ann['id']} has category_id "
                                    f"{ann['category_id']}, which is not in 'categories'")
                x, y, w, h = (float(v) for v in ann["bbox"])
                x0, y0, x1, y1 = x, y, x + w, y + h
                if width and height:
                    x0, x1 = min(max(x0, 0.0), width), min(max(x1, 0.0), width)
                    y0, y1 = min(max(y0, 0.0), height), min(max(y1, 0.0), height)
                if x1 - x0 < 1e-3 or y1 - y0 < 1e-3:
                    dropped += 1
                    continue
                boxes.append([x0, y0, x1, y1])
                labels.append(category_to_label[ann["category_id"]])
            self.targets[image_id] = (np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(labels, dtype=np.int64))
        self.dropped_boxes = dropped
        kept = sum(len(boxes) for boxes, _ in self.targets.values())
        if dropped and not kept:
            raise UserError(f"{self.ann_file}: every one of its {dropped} boxes has zero width or height or lies "
                            f"outside its image: nothing to train or evaluate on")
        missing = [self.coco.imgs[i]["file_name"] for i in self.image_ids
                   if not (self.image_dir / self.coco.imgs[i]["file_name"]).is_file()]
        if missing:  # found now, not after an epoch of training
            raise UserError(f"{self.image_dir / missing[0]}: image file not found ({len(missing)} of the "
                            f"{len(self.image_ids)} images of {self.ann_file} are missing)")
        if dropped:
            warnings.warn(f"{self.ann_file}: dropped {dropped} boxes with zero width/height or outside their image",
                          stacklevel=2)

    @property
    def num_classes(self) -> int:
        """Detector classes, background included."""
        return len(self.category_ids) + 1

    def __len__(self) -> int:
        return len(self.image_ids)

    def load_image(self, image_id: int) -> Image.Image:
        path = self.image_dir / self.coco.imgs[image_id]["file_name"]
        try:
            with Image.open(path) as image:
                if image.mode in ("P", "PA") and "transparency" in image.info:
                    image = image.convert("RGBA")
                return image.convert("RGB")
        except FileNotFoundError as error:
            raise UserError(f"{path}: image file not found") from error
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            raise UserError(f"{path}: cannot decode image ({type(error).__name__})") from error

    def __getitem__(self, index: int):
        image_id = self.image_ids[index]
        image = self.load_image(image_id)
        boxes, labels = self.targets[image_id]
        target = {
            "boxes": torch.from_numpy(boxes.copy()),
            "labels": torch.from_numpy(labels.copy()),
            "image_id": image_id,
            "orig_size": (image.height, image.width),
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def collate(batch):
    return tuple(zip(*batch))


def to_coco_results(outputs: list[dict], targets: list[dict], images: list[torch.Tensor],
                    label_to_category: dict[int, int]) -> list[dict]:
    """Detector outputs on resized images -> COCO result dicts in original image coordinates."""
    results = []
    for output, target, image in zip(outputs, targets, images):
        orig_h, orig_w = target["orig_size"]
        scale = torch.tensor([orig_w / image.shape[-1], orig_h / image.shape[-2]] * 2)
        boxes = output["boxes"].detach().float().cpu() * scale
        boxes[:, 2:] -= boxes[:, :2]
        for box, score, label in zip(boxes.tolist(), output["scores"].tolist(), output["labels"].tolist()):
            if label not in label_to_category:  # label 0 is background; one-stage heads can still emit it
                continue
            results.append({
                "image_id": int(target["image_id"]),
                "category_id": int(label_to_category[int(label)]),
                "bbox": [round(v, 2) for v in box],
                "score": round(float(score), 5),
            })
    return results


class EpochTaggedSampler(torch.utils.data.Sampler):
    """Yields ``epoch * dataset_size + index`` for each index of ``sampler`` (a DistributedSampler), so
    that :class:`SeededAugmentation` knows the epoch even inside DataLoader worker processes."""

    def __init__(self, sampler: torch.utils.data.DistributedSampler, dataset_size: int):
        self.sampler, self.dataset_size, self.epoch = sampler, dataset_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        return (self.epoch * self.dataset_size + index for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class SeededAugmentation(torch.utils.data.Dataset):
    """Random augmentation drawn from (seed, epoch, image) instead of torch's global generator.

    With the global generator, anything else that draws from it (MGD's random masks, bernoulli masks)
    would change which images are flipped in later steps, so two methods trained with the same seed
    would not see the same data. Here they do: a seed fixes the order and every augmented image.
    Indices come tagged with the epoch by :class:`EpochTaggedSampler`.
    """

    def __init__(self, dataset: CocoDetection, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, tagged: int):
        epoch, index = divmod(int(tagged), len(self.dataset))
        with torch.random.fork_rng(devices=[]):
            # modulo torch's seed range: the same seeds as before for every seed that fitted it, and no
            # overflow for the rest (a seed of 20000000 raised in the DataLoader)
            torch.manual_seed(((self.seed * 1_000_003 + epoch) * 10_000_019 + index) % 2**64)
            return self.dataset[index]
