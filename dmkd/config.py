"""Typed configuration: frozen dataclasses built once at the edge, from dicts that came from YAML,
the command line or Ray Tune (unknown keys and wrong types are rejected with a one-line message); the
configuration of one training run (:class:`TrainConfig`, its data paths :class:`DataPaths`) and the
mini-benchmark's teacher and student."""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml

from dmkd.distillers import check_method, check_pair, check_parameters, detector_family
from dmkd.errors import UserError
from dmkd.models import DetectorConfig

T = TypeVar("T")


def _type_name(kind: Any) -> str:
    return getattr(kind, "__name__", str(kind).replace("typing.", ""))


def _coerce(value: Any, kind: Any, where: str) -> Any:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except UserError as error:
                errors.append(error)
        raise errors[0]
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        if isinstance(value, kind):
            return value
        return from_dict(kind, value, where)
    if origin in (tuple, list) or kind in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: must be a list, but got {value!r}")
        (item,) = typing.get_args(kind)[:1] or (Any,)
        items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if tuple in (origin, kind) else items
    if origin is dict or kind is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: must be a mapping, but got {value!r}")
        return dict(value)
    if kind is Any:
        return value
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{where}: must be true or false, but got {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise UserError(f"{where}: must be an integer, but got {value!r}")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise UserError(f"{where}: must be a number, but got {value!r}")
    if kind is str:
        if isinstance(value, str):
            return value
        raise UserError(f"{where}: must be a string, but got {value!r}")
    return value


def from_dict(cls: type[T], data: Any, where: str = "config") -> T:
    """Build dataclass ``cls`` from a mapping; ``where`` names the place for error messages."""
    if not isinstance(data, dict):
        raise UserError(f"{where}: must be a mapping, but got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]  # T is a dataclass type
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r}; allowed keys: {', '.join(fields)}")
    values = {name: _coerce(value, hints[name], f"{where}.{name}") for name, value in data.items()}
    return cls(**values)


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def parse_assignment(text: str, option: str) -> tuple[str, object]:
    """``key=value`` with the value read as YAML (numbers, booleans, lists)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise UserError(f"{option}: expected KEY=VALUE, but got {text!r}")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as error:
        raise UserError(f"{option}: cannot read the value of {key!r} ({getattr(error, 'problem', error)})") from None
    if isinstance(value, str):  # YAML 1.1 reads 2e-5 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    return key.strip(), value


@dataclass(frozen=True)
class DataPaths:
    """The COCO-format files of a run: all four training and validation paths, optionally the held-out
    test pair (evaluated after the last epoch only); none at all means the embedded mini-benchmark."""

    train_ann: str | None = None
    train_images: str | None = None
    val_ann: str | None = None
    val_images: str | None = None
    test_ann: str | None = None
    test_images: str | None = None

    REQUIRED: ClassVar[tuple[str, ...]] = ("train_ann", "train_images", "val_ann", "val_images")
    HELD_OUT: ClassVar[tuple[str, ...]] = ("test_ann", "test_images")

    def check(self, where: str = "data") -> None:
        """All four of train and val or none; the test pair together, and only with the other four."""
        given = [getattr(self, key) for key in self.REQUIRED]
        if any(given) and not all(given):
            raise UserError(f"{where}: give all of train_ann, train_images, val_ann and val_images, or none "
                            f"(none means the embedded mini-benchmark)")
        if bool(self.test_ann) != bool(self.test_images):
            raise UserError(f"{where}: give both test_ann and test_images, or neither")
        if self.test_ann and not self.train_ann:
            raise UserError(f"{where}: test_ann and test_images need the other four paths too (the mini-benchmark "
                            f"has its own test split)")

    def files(self, split: str) -> tuple[str, str]:
        """The annotation file and image folder of ``split`` (train, val or test), which must be set."""
        ann, images = getattr(self, f"{split}_ann"), getattr(self, f"{split}_images")
        if not (ann and images):
            raise UserError(f"data: no {split} split given")
        return ann, images

    @property
    def given(self) -> bool:
        """Paths of the user's data (else the mini-benchmark)."""
        return bool(self.train_ann)

    def as_dict(self) -> dict[str, str]:
        """The paths that are set, by field name."""
        return {key: getattr(self, key) for key in self.REQUIRED + self.HELD_OUT if getattr(self, key)}

    def without_test(self) -> DataPaths:
        """The same data without its held-out split: what a run that selects (a tuning trial) may see."""
        return dataclasses.replace(self, test_ann=None, test_images=None)

    def resolved(self) -> DataPaths:
        """Absolute paths (processes on other nodes or in other folders read the same files)."""
        return DataPaths(**{key: str(Path(value).resolve()) for key, value in self.as_dict().items()})


# A seed seeds torch, and a sweep's seed also Optuna's sampler, which numpy seeds: numpy's range.
MAX_SEED = 2**32 - 1


def check_seed(seed: int, where: str) -> None:
    """A seed is a whole number from 0 to :data:`MAX_SEED` (a larger or negative one fails deep in numpy)."""
    if not 0 <= seed <= MAX_SEED:
        raise UserError(f"{where}: must be a whole number from 0 to {MAX_SEED}, but got {seed}")


# The embedded mini-benchmark pair: measured numbers are in the README.
MINI_TEACHER = DetectorConfig(arch="fcos", backbone="resnet18", fpn_channels=128, image_size=96, head_convs=4)
MINI_STUDENT = DetectorConfig(arch="fcos", backbone="resnet10_quarter", fpn_channels=64, image_size=96, head_convs=2)


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Data paths left empty mean the embedded mini-benchmark under ``data_dir``."""

    data: DataPaths = DataPaths()
    data_dir: str = "data/mini"
    out: str = "runs/teacher"
    detector: DetectorConfig = MINI_TEACHER
    epochs: int = 8
    max_iters: int | None = None  # cap on iterations per epoch, for smoke runs
    batch_size: int = 8
    optimizer: str = "adamw"
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_iters: int = 100
    grad_clip: float = 10.0
    seed: int = 0
    num_workers: int = 0
    device: str = "auto"
    amp: bool = True  # bf16 autocast, on CUDA only
    eval_every: int = 1
    resume: bool = False
    # Distillation: ``method`` names a distiller; ``distill`` holds its parameters.
    method: str = "none"
    teacher: DetectorConfig | None = None
    teacher_checkpoint: str | None = None
    distill: dict = field(default_factory=dict)

    def validate(self, check_files: bool = True) -> None:
        """Every value, before anything is written or trained; ``check_files=False`` skips the checks
        of files that exist only on the machine that trains (a sweep's ``--dry-run``)."""
        self.detector.validate("detector")
        self.data.check("data")
        for name in ("epochs", "batch_size", "eval_every"):
            if getattr(self, name) < 1:
                raise UserError(f"{name}: must be at least 1, but got {getattr(self, name)}")
        if self.max_iters is not None and self.max_iters < 1:
            raise UserError(f"max_iters: must be at least 1, but got {self.max_iters}")
        check_seed(self.seed, "seed")
        if self.num_workers < 0:
            raise UserError(f"num_workers: must be 0 (load in the training process) or more, but got {self.num_workers}")
        for name in ("weight_decay", "warmup_iters", "grad_clip"):
            if not getattr(self, name) >= 0:
                raise UserError(f"{name}: must be 0 or more, but got {getattr(self, name)}")
        for name in ("out", "data_dir"):
            if check_files and Path(getattr(self, name)).exists() and not Path(getattr(self, name)).is_dir():
                raise UserError(f"{name}: {getattr(self, name)} exists and is not a folder")
        if self.optimizer not in ("adamw", "sgd"):
            raise UserError(f"optimizer: must be 'adamw' or 'sgd', but got {self.optimizer!r}")
        if not self.lr > 0:
            raise UserError(f"lr: must be positive, but got {self.lr}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise UserError(f"device: must be 'auto', 'cpu' or 'cuda', but got {self.device!r}")
        check_method(self.method)
        if self.method != "none":
            teacher_weights = (self.teacher or MINI_TEACHER).weights
            if not (self.teacher_checkpoint or teacher_weights) and check_files:
                raise UserError(f"teacher_checkpoint: required for method {self.method!r} "
                                f"(or the teacher's weights: a torchvision name or a file)")
            if check_files and self.teacher_checkpoint and not Path(self.teacher_checkpoint).is_file():
                raise UserError(f"{self.teacher_checkpoint}: teacher checkpoint file not found")
            (self.teacher or MINI_TEACHER).validate("teacher")
            check_pair(self.method, self.detector, self.teacher or MINI_TEACHER, self.distill)
        check_parameters(self.method, self.distill, family=detector_family(self.detector.arch))

    @classmethod
    def from_dict(cls, data: dict, where: str = "config") -> TrainConfig:
        return from_dict(cls, data, where)
