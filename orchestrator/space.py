"""Search spaces: YAML files under ``search_spaces/``, validated into a frozen :class:`SweepSpace`.

Every problem is a one-line ``UserError`` naming the file, the key and what is allowed.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dmkd.config import from_dict, to_dict
from dmkd.distillers import check_method, check_parameters, detector_family, method_parameters
from dmkd.errors import UserError
from dmkd.evaluate import METRIC_NAMES
from dmkd.models import DetectorConfig
from dmkd.train import MINI_STUDENT, MINI_TEACHER, TrainConfig

DEFAULT_SPACE = Path(__file__).resolve().parent.parent / "search_spaces" / "default.yaml"
DISTRIBUTIONS = ("uniform", "loguniform", "int", "categorical")
SCHEDULERS = ("asha", "none")
# TrainConfig fields a space may set or search; the rest belong to the sweep itself.
TRAIN_KEYS = ("batch_size", "optimizer", "lr", "weight_decay", "warmup_iters", "grad_clip", "num_workers", "amp",
              "device", "eval_every")
# What a trial reports that an objective may name; test/* is never one (selection stays off the test split).
OBJECTIVE_METRICS = (*(f"val/{name}" for name in METRIC_NAMES), "loss/total", "loss/detector", "loss/distill")


@dataclass(frozen=True)
class Pair:
    teacher: DetectorConfig = MINI_TEACHER
    student: DetectorConfig = MINI_STUDENT
    teacher_checkpoint: str | None = None
    train_teacher: bool = True
    teacher_epochs: int = 8


@dataclass(frozen=True)
class Data:
    """COCO-format paths; all empty means the embedded mini-benchmark under ``mini_dir``."""

    train_ann: str | None = None
    train_images: str | None = None
    val_ann: str | None = None
    val_images: str | None = None
    test_ann: str | None = None  # optional held-out split: ablation tables report on it
    test_images: str | None = None
    mini_dir: str = "data/mini"


@dataclass(frozen=True)
class Param:
    type: str
    low: float | None = None
    high: float | None = None
    choices: list | None = None
    when: dict | None = None  # {other_param: [values]}: searched only then


@dataclass(frozen=True)
class Objective:
    metric: str = "val/AP"
    mode: str = "max"
    second_metric: str | None = None
    second_mode: str = "min"


@dataclass(frozen=True)
class Budget:
    epochs: int = 3
    max_iters: int | None = None


@dataclass(frozen=True)
class Scheduler:
    type: str = "asha"
    grace_period: int = 1
    reduction_factor: int = 2


def default_startup_trials(num_samples: int) -> int:
    """TPE's random start-up when a space does not set it: a third of the budget, at least 2 (Optuna's
    own default of 10 would make every sweep shorter than 11 trials random search)."""
    return max(2, num_samples // 3)


@dataclass(frozen=True)
class Searcher:
    """TPE's random start-up (``startup_trials``): its first trials are random points; None: a third of
    the trials, at least 2 (``orchestrator.searcher.default_startup_trials``)."""

    startup_trials: int | None = None


@dataclass(frozen=True)
class Resources:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0


@dataclass(frozen=True)
class WandbSettings:
    project: str = "dmkd-sweeps"
    entity: str | None = None


@dataclass(frozen=True)
class SweepSpace:
    name: str = "dmkd"
    method: str = "dmkd"
    pair: Pair = Pair()
    data: Data = Data()
    fixed: dict = field(default_factory=dict)
    search: dict = field(default_factory=dict)  # name -> Param
    objective: Objective = Objective()
    budget: Budget = Budget()
    scheduler: Scheduler = Scheduler()
    searcher: Searcher = Searcher()
    num_samples: int = 4
    max_concurrent: int = 1
    seed: int = 0
    max_failures: int = 1
    reference: bool = True  # train the undistilled student (once per seed, cached) as the report's reference row
    resources: Resources = Resources()
    wandb: WandbSettings = WandbSettings()

    @property
    def pair_name(self) -> str:
        """The W&B group: TEACHER->STUDENT."""
        def short(d: DetectorConfig) -> str:
            return f"{d.arch}-{d.backbone}-fpn{d.fpn_channels}"
        return f"{short(self.pair.teacher)}->{short(self.pair.student)}"

    @property
    def startup_trials(self) -> int:
        """How many trials TPE samples at random before its model proposes (the given first point counts)."""
        given = self.searcher.startup_trials
        return given if given is not None else default_startup_trials(self.num_samples)

    def routed(self, values: dict) -> tuple[dict, dict]:
        """Split parameter values into (TrainConfig fields, distiller parameters). Values for other
        methods' parameters are left out (an ablation's shared ``fixed`` may hold them)."""
        train, distill = {}, {}
        accepted = method_parameters(self.method)
        for name, value in values.items():
            if name in accepted:
                distill[name] = value
            elif name in TRAIN_KEYS:
                train[name] = value
        if isinstance(distill.get("branches"), str):
            distill["branches"] = distill["branches"].split("+")
        return train, distill

    def train_config(self, values: dict, *, method: str | None = None, seed: int | None = None, out: str = "out",
                     teacher_checkpoint: str | None = None, data_paths: dict | None = None) -> TrainConfig:
        """The TrainConfig of one trial: fixed values, then ``values``; ``method`` and ``seed`` default
        to the space's (an ablation row sets its own)."""
        method = method or self.method
        space = self if method == self.method else dataclasses.replace(self, method=method)
        train, distill = space.routed({**self.fixed, **values})
        return TrainConfig(**(data_paths or {}), out=out, detector=self.pair.student, epochs=self.budget.epochs,
                           max_iters=self.budget.max_iters, seed=self.seed if seed is None else seed,
                           method=method, teacher=self.pair.teacher,
                           teacher_checkpoint=(teacher_checkpoint or self.pair.teacher_checkpoint) if method != "none" else None,
                           distill=distill, **train)


def _fail(path: Path, key: str, message: str) -> UserError:
    return UserError(f"{path}: {key}: {message}")


def _allowed_names(method: str) -> list[str]:
    return [*method_parameters(method), *TRAIN_KEYS]


def _reason(error: UserError) -> str:
    """The message of a distiller check without its generic ``distill`` prefix."""
    text = str(error)
    for prefix in ("distill: ", "distill."):
        if text.startswith(prefix):
            return text[len(prefix):]
    return text


def check_values(space: "SweepSpace", method: str, values: dict, path: Path, key: str) -> None:
    """The values a trial of ``method`` would get (training settings and the method's parameters) must
    build: every value checked here, before Ray, a teacher or a trial starts."""
    train, distill = dataclasses.replace(space, method=method).routed({**space.fixed, **values})
    try:
        check_parameters(method, distill, where="distill")
    except UserError as error:
        raise _fail(path, key, _reason(error)) from None
    try:
        space.train_config(values, method=method).validate(check_files=False)
    except (UserError, TypeError) as error:
        raise _fail(path, key, _reason(error) if isinstance(error, UserError) else str(error)) from None


def check_pair(space: "SweepSpace", path: Path) -> None:
    """Teacher and student must give FPN levels of the same names and sizes (built once, no weights)."""
    import torch

    from dmkd.models import build_detector, feature_shapes

    with torch.random.fork_rng(devices=[]):  # a small image is enough: both use one image_size (checked above)
        shapes = {role: feature_shapes(build_detector(dataclasses.replace(getattr(space.pair, role), image_size=64, min_size=None,
                                                                          weights=None, backbone_weights=None)), 64)
                  for role in ("teacher", "student")}
    levels = {role: [(k, s[1:]) for k, s in found.items()] for role, found in shapes.items()}
    if levels["teacher"] != levels["student"]:
        raise _fail(path, "pair", f"the teacher's FPN levels {levels['teacher']} differ from the student's "
                                  f"{levels['student']}: distillation compares them level by level; use the same "
                                  f"architecture family")


def check_weights_spec(spec: str | None, path: Path, key: str) -> None:
    """A weights name must be one torchvision knows (its file may still need downloading); a file must exist."""
    from dmkd.weights import check_spec

    if spec:
        try:
            check_spec(spec, key)
        except UserError as error:
            raise UserError(f"{path}: {error}") from None


def validate(space: SweepSpace, path: Path) -> SweepSpace:
    """Every value of a space, before Ray, a teacher or a trial starts; the first problem is one line."""
    try:
        check_method(space.method)
    except UserError as error:
        raise UserError(f"{path}: {error}") from None
    _check_pair_and_data(space, path)
    endpoints = _check_search(space, path)
    _check_run_settings(space, path)
    check_values(space, space.method, {}, path, "fixed")
    for where, (name, value) in endpoints.items():
        check_values(space, space.method, {name: value}, path, where)
    check_values(space, space.method, {name: _example(p) for name, p in space.search.items()}, path, "search")
    if space.method != "none":
        check_pair(space, path)
    return space


def _check_pair_and_data(space: SweepSpace, path: Path) -> None:
    """The two detectors, their weights and the teacher's source; the data paths."""
    for where, detector in (("pair.teacher", space.pair.teacher), ("pair.student", space.pair.student)):
        try:
            detector.validate(where)
        except UserError as error:
            raise UserError(f"{path}: {error}") from None
    for key in ("image_size", "min_size"):
        if getattr(space.pair.teacher, key) != getattr(space.pair.student, key):
            raise _fail(path, f"pair.student.{key}", f"must equal pair.teacher.{key} (features are compared)")
    for where, detector in (("pair.teacher", space.pair.teacher), ("pair.student", space.pair.student)):
        for key in ("weights", "backbone_weights"):
            check_weights_spec(getattr(detector, key), path, f"{where}.{key}")
    if space.pair.teacher.weights and space.pair.teacher_checkpoint:
        raise _fail(path, "pair.teacher_checkpoint", "the teacher's weights are given (pair.teacher.weights): give one of the two")
    if space.pair.teacher.weights and space.pair.train_teacher and space.method != "none":
        raise _fail(path, "pair.train_teacher", "the teacher's weights are given (pair.teacher.weights), so it is "
                                                "not trained: set train_teacher: false")
    if space.method != "none" and not (space.pair.teacher_checkpoint or space.pair.train_teacher or space.pair.teacher.weights):
        raise _fail(path, "pair.teacher_checkpoint", "set a checkpoint path, pair.teacher.weights, or train_teacher: true")
    if space.pair.teacher_epochs < 1:
        raise _fail(path, "pair.teacher_epochs", f"must be at least 1, but got {space.pair.teacher_epochs}")
    data = [space.data.train_ann, space.data.train_images, space.data.val_ann, space.data.val_images]
    if any(data) and not all(data):
        raise _fail(path, "data", "give all of train_ann, train_images, val_ann and val_images, or none (mini-benchmark)")
    if bool(space.data.test_ann) != bool(space.data.test_images) or (space.data.test_ann and not all(data)):
        raise _fail(path, "data.test_ann", "give test_ann and test_images together, with the other four paths "
                                           "(the mini-benchmark has its own test split)")


def _check_search(space: SweepSpace, path: Path) -> dict:
    """The fixed and searched parameters; returns every endpoint the search can propose, by its key."""
    allowed = _allowed_names(space.method)
    for name in space.fixed:
        if name not in allowed:
            raise _fail(path, f"fixed.{name}", f"unknown parameter for method {space.method!r}; allowed: {', '.join(allowed)}")
    searched = set(space.search)
    endpoints = {}  # every value the search can propose lies between these: checked below
    for name, param in space.search.items():
        key = f"search.{name}"
        if name not in allowed:
            raise _fail(path, key, f"unknown parameter for method {space.method!r}; allowed: {', '.join(allowed)}")
        if param.type not in DISTRIBUTIONS:
            raise _fail(path, f"{key}.type", f"must be one of {', '.join(DISTRIBUTIONS)}, but got {param.type!r}")
        if param.type == "categorical":
            if not param.choices:
                raise _fail(path, f"{key}.choices", "a categorical parameter needs a non-empty list of choices")
            ends = {f"{key}.choices[{i}]": choice for i, choice in enumerate(param.choices)}
        else:
            if param.low is None or param.high is None or not param.low < param.high:
                raise _fail(path, key, f"a {param.type} parameter needs low < high, but got low={param.low}, high={param.high}")
            if param.type == "loguniform" and param.low <= 0:
                raise _fail(path, f"{key}.low", f"must be positive for loguniform, but got {param.low}")
            ends = {f"{key}.low": param.low, f"{key}.high": param.high}
        endpoints.update({where: (name, value) for where, value in ends.items()})
        for other, values in (param.when or {}).items():
            if other not in searched or space.search[other].type != "categorical":
                raise _fail(path, f"{key}.when.{other}", "must name another searched categorical parameter")
            if not isinstance(values, list) or not set(values) & set(space.search[other].choices):
                raise _fail(path, f"{key}.when.{other}", f"must list some of {other}'s choices "
                                                         f"{space.search[other].choices}, but got {values!r}: it could never hold")
    return endpoints


def _check_run_settings(space: SweepSpace, path: Path) -> None:
    """Objective, scheduler, budget, concurrency and resources."""
    objective = space.objective
    for key, metric in (("objective.metric", objective.metric), ("objective.second_metric", objective.second_metric)):
        if metric is not None and metric not in OBJECTIVE_METRICS:
            raise _fail(path, key, f"no trial reports {metric!r}; choose one of {', '.join(OBJECTIVE_METRICS)}")
    if objective.mode not in ("min", "max") or objective.second_mode not in ("min", "max"):
        raise _fail(path, "objective.mode", "must be 'min' or 'max'")
    if space.scheduler.type not in SCHEDULERS:
        raise _fail(path, "scheduler.type", f"must be one of {', '.join(SCHEDULERS)}, but got {space.scheduler.type!r}")
    for key, value in (("num_samples", space.num_samples), ("max_concurrent", space.max_concurrent),
                       ("budget.epochs", space.budget.epochs), ("resources.num_workers", space.resources.num_workers),
                       ("scheduler.grace_period", space.scheduler.grace_period),
                       ("budget.max_iters", 1 if space.budget.max_iters is None else space.budget.max_iters)):
        if value < 1:
            raise _fail(path, key, f"must be at least 1, but got {value}")
    if space.scheduler.type == "asha" and space.scheduler.grace_period >= space.budget.epochs:
        raise _fail(path, "scheduler.grace_period", f"must be less than budget.epochs ({space.budget.epochs}), but got "
                                                    f"{space.scheduler.grace_period}: ASHA would stop nothing")
    if space.scheduler.reduction_factor < 2:
        raise _fail(path, "scheduler.reduction_factor", f"must be at least 2, but got {space.scheduler.reduction_factor}")
    if space.max_failures < 0:
        raise _fail(path, "max_failures", f"must be 0 or more, but got {space.max_failures}")
    if space.searcher.startup_trials is not None and space.searcher.startup_trials < 1:
        raise _fail(path, "searcher.startup_trials", f"must be at least 1, but got {space.searcher.startup_trials}")
    for key, value in (("resources.cpus_per_worker", space.resources.cpus_per_worker),
                       ("resources.gpus_per_worker", space.resources.gpus_per_worker)):
        if not value > 0:
            raise _fail(path, key, f"must be positive, but got {value}")


def _example(param: Param) -> Any:
    return param.choices[0] if param.type == "categorical" else param.low


def set_value(data: dict, dotted: str, value: Any) -> None:
    """``--set budget.epochs=2`` and friends: assign into the nested YAML mapping."""
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise UserError(f"--set {dotted}: {key!r} is not a mapping")
    node[keys[-1]] = value


def read_yaml(path: Path, what: str) -> dict:
    """Parse a YAML mapping; a missing or broken file is a one-line ``UserError`` naming it."""
    if not path.is_file():
        raise UserError(f"{path}: {what} file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise UserError(f"{path}: not valid YAML{where}: {getattr(error, 'problem', error)}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: must hold a mapping of keys")
    return data


def load_space(path: str | Path | None = None, overrides: list[tuple[str, Any]] = ()) -> SweepSpace:
    path = Path(path) if path else DEFAULT_SPACE
    data = read_yaml(path, "search space")
    for dotted, value in overrides:
        set_value(data, dotted, value)
    search = data.pop("search", {}) or {}
    if not isinstance(search, dict):
        raise UserError(f"{path}: search: must map parameter names to distributions")
    try:
        space = from_dict(SweepSpace, data, where="")
        params = {name: from_dict(Param, spec, where=f".search.{name}") for name, spec in search.items()}
    except UserError as error:
        raise UserError(f"{path}: {str(error).lstrip('.')}") from None
    return validate(dataclasses.replace(space, search=params), path)


class DefineByRun:
    """The Optuna define-by-run function for OptunaSearch (a class, so the searcher state pickles):
    conditional parameters are suggested only when their ``when`` holds."""

    def __init__(self, search: dict):
        # a conditional parameter comes after the parameters its condition reads
        ordered: dict = {}
        while len(ordered) < len(search):
            ready = {n: p for n, p in search.items() if n not in ordered and all(o in ordered for o in (p.when or {}))}
            if not ready:
                raise UserError(f"search: the 'when' conditions of {sorted(set(search) - set(ordered))} form a cycle")
            ordered.update(ready)
        self.search = ordered

    def __call__(self, trial) -> None:
        chosen = {}
        for name, param in self.search.items():
            if param.when and not all(chosen.get(other) in values for other, values in param.when.items()):
                continue
            if param.type == "uniform":
                chosen[name] = trial.suggest_float(name, param.low, param.high)
            elif param.type == "loguniform":
                chosen[name] = trial.suggest_float(name, param.low, param.high, log=True)
            elif param.type == "int":
                chosen[name] = trial.suggest_int(name, int(param.low), int(param.high))
            else:
                chosen[name] = trial.suggest_categorical(name, list(param.choices))


def define_by_run(space: SweepSpace) -> DefineByRun:
    return DefineByRun(space.search)


def paper_default_point(space: SweepSpace) -> dict:
    """The method's published defaults (its loss's constructor defaults), overridden by the space's
    ``fixed`` values, restricted to the searched parameters and clipped to their ranges."""
    defaults = {**method_parameters(space.method, detector_family(space.pair.student.arch)), **space.fixed}
    point = {}
    for name, param in space.search.items():
        if name not in defaults:
            continue
        value = defaults[name]
        if isinstance(value, tuple):  # branches: ("spatial", "channel") is the choice "spatial+channel"
            value = "+".join(value)
        if param.type == "categorical":
            if value in param.choices:
                point[name] = value
        else:
            point[name] = min(max(value, param.low), param.high)
    for name, param in space.search.items():  # conditions must hold for the point, else drop the child
        if name in point and param.when and not all(point.get(o) in v for o, v in param.when.items()):
            del point[name]
    return point


def describe(space: SweepSpace) -> dict:
    return {**to_dict(space), "search": {k: to_dict(v) for k, v in space.search.items()}, "pair_name": space.pair_name}


