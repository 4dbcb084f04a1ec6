"""Keys of the teacher and reference caches that name what was trained, not where: the training config
with its data paths replaced by what the data is (each annotation file's SHA-256, each image folder's
name and file count). A second clone, another user on the same shared storage, or a moved data folder
finds the same key and reuses the cached teacher and reference rows."""
from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path

from dmkd.config import DataPaths, TrainConfig, to_dict


@lru_cache(maxsize=64)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_digest(path: str) -> str:
    """SHA-256 of a file's content (read once per size and modification time in this process)."""
    stat = os.stat(path)
    return _digest(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


def folder_signature(path: str) -> str:
    """An image folder by what a copy keeps: its name and how many files it holds."""
    with os.scandir(path) as entries:
        return f"{Path(path).name}:{sum(1 for _ in entries)}"


def data_fingerprint(paths: DataPaths) -> dict[str, str]:
    """What the data of a run is, independent of where it lies."""
    return {key: file_digest(value) if key.endswith("_ann") else folder_signature(value)
            for key, value in paths.as_dict().items()}


def training_key(cfg: TrainConfig, **extra) -> str:
    """12 hex digits naming a training run by its config and its data's content (``out`` and the data's
    location left out); ``extra`` joins what else decides the result."""
    source = {**to_dict(cfg), "data": data_fingerprint(cfg.data), "out": None, "data_dir": None, **extra}
    return hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()[:12]
