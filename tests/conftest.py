"""Shared test fixtures: tiny COCO files on disk, built per test in a temp folder."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ["DMKD_OFFLINE"] = "1"  # a torchvision weights name never downloads in a test (dmkd.weights)


def write_coco(folder: Path, images: list[dict], annotations: list[dict], categories: list[dict],
               name: str = "instances.json") -> Path:
    path = folder / name
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def save_image(path: Path, width: int, height: int, mode: str = "RGB", seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    if mode == "RGB":
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB").save(path)
    elif mode == "L":
        Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8), "L").save(path)
    elif mode == "RGBA":
        Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA").save(path)
    elif mode == "P":
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB").convert("P").save(path)
    else:
        raise ValueError(mode)


@pytest.fixture(scope="session")
def mini_data(tmp_path_factory) -> dict[str, str]:
    """A small mini-benchmark (the real generator, fewer images) shared by the training tests."""
    from dmkd.synthetic import SyntheticSpec, ensure_mini_benchmark

    folder = tmp_path_factory.mktemp("mini")
    return ensure_mini_benchmark(folder, SyntheticSpec(train_images=32, val_images=16, test_images=8))


@pytest.fixture
def restored_environ():
    """A sweep or ablation called in-process sets W&B's, Ray's and Tune's variables in this process's
    environment, which later tests pass on to the commands they start (tests.helpers.command_env): put it
    back as it was."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def small_coco(tmp_path):
    """One 32x32 image with one box: the smallest data set a training run accepts."""
    folder = tmp_path / "img"
    folder.mkdir()
    save_image(folder / "a.png", 32, 32)
    ann = write_coco(tmp_path, [{"id": 1, "file_name": "a.png", "width": 32, "height": 32}],
                     [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10], "iscrowd": 0}],
                     [{"id": 1, "name": "a"}])
    return ann, folder
