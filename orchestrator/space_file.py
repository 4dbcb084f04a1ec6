"""A search-space YAML file (``search_spaces/*.yaml``): read, overridden with ``--set``, and checked,
every value, into a frozen :class:`~orchestrator.space.SweepSpace` before Ray, a teacher or a trial
starts. Every problem is a one-line ``UserError`` naming the file, the key and what is allowed.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
import yaml

from dmkd.config import check_seed, from_dict
from dmkd.distillers import check_method, check_parameters, method_parameters
from dmkd.errors import UserError
from dmkd.identify import infer_classes, mismatch
from dmkd.models import build_detector, feature_shapes
from dmkd.pairing import TEACHER_FIX
from dmkd.weights import check_spec, read_state_dict
from orchestrator.space import DEFAULT_SPACE, DISTRIBUTIONS, OBJECTIVE_METRICS, SCHEDULERS, TRAIN_KEYS, Param, SweepSpace


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


def check_values(space: SweepSpace, method: str, values: dict, path: Path, key: str) -> None:
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


def check_pair(space: SweepSpace, path: Path) -> None:
    """Teacher and student must give FPN levels of the same names and sizes (built once, no weights)."""
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
    try:
        space.data.check("data")
    except UserError as error:
        raise UserError(f"{path}: {error}") from None


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
            for end in ("low", "high"):
                value = getattr(param, end)
                if param.type == "int" and not float(value).is_integer():
                    raise _fail(path, f"{key}.{end}", f"must be a whole number for an int parameter, but got {value}")
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
    check_seed(space.seed, f"{path}: seed")
    if space.max_failures < 0:
        raise _fail(path, "max_failures", f"must be 0 or more, but got {space.max_failures}")
    if space.searcher.startup_trials is not None and space.searcher.startup_trials < 1:
        raise _fail(path, "searcher.startup_trials", f"must be at least 1, but got {space.searcher.startup_trials}")
    for key, amount in (("resources.cpus_per_worker", space.resources.cpus_per_worker),
                        ("resources.gpus_per_worker", space.resources.gpus_per_worker)):
        if not amount > 0:
            raise _fail(path, key, f"must be positive, but got {amount}")


def _example(param: Param) -> Any:
    return param.choices[0] if param.type == "categorical" and param.choices else param.low


def set_value(data: dict, dotted: str, value: Any) -> None:
    """``--set budget.epochs=2`` and friends: assign into the nested YAML mapping."""
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise UserError(f"--set {dotted}: {key!r} is not a mapping")
    node[keys[-1]] = value


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error: plain YAML keeps the
    last one silently (two grid rows of one name would become one)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path, what: str) -> dict:
    """Parse a YAML mapping; a missing, empty or broken file (a key given twice included) is a one-line
    ``UserError`` naming it."""
    if not path.is_file():
        raise UserError(f"{path}: {what} file not found")
    try:
        data = yaml.load(path.read_text(), Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise UserError(f"{path}: not valid YAML{where}: {getattr(error, 'problem', error)}") from None
    if data is None:
        raise UserError(f"{path}: the {what} file is empty")
    if not isinstance(data, dict):
        raise UserError(f"{path}: must hold a mapping of keys")
    return data


def check_files(space: SweepSpace, path: Path) -> None:
    """Every file a space names must exist here: the teacher checkpoint and the COCO files (a dry run
    checks them too, not only the run that would read them)."""
    checkpoint = space.pair.teacher_checkpoint
    if checkpoint and not Path(checkpoint).is_file():
        raise _fail(path, "pair.teacher_checkpoint", f"{checkpoint}: file not found")
    if checkpoint:
        check_teacher_checkpoint(space, path)
    for key, value in space.data.as_dict().items():
        if not Path(value).exists():
            raise _fail(path, f"data.{key}", f"{value}: not found")


def check_teacher_checkpoint(space: SweepSpace, path: Path) -> None:
    """``pair.teacher_checkpoint`` must hold the weights of the teacher ``pair.teacher`` describes. A file
    that is no checkpoint, or one of another detector (the student's own, say), would otherwise show only
    once Ray runs: every trial failing in turn, and the report's teacher row taken from that checkpoint's
    recorded figures meanwhile. The class count is the checkpoint's own here (the data's is checked when
    the teacher's figures are read, before any trial)."""
    checkpoint = cast(str, space.pair.teacher_checkpoint)
    state = read_state_dict(Path(checkpoint), f"{path}: pair.teacher_checkpoint: {checkpoint}")
    classes = infer_classes(state)
    teacher = dataclasses.replace(space.pair.teacher, image_size=64, min_size=None, weights=None, backbone_weights=None,
                                  num_classes=classes + 1 if classes else space.pair.teacher.num_classes)
    with torch.random.fork_rng(devices=[]):
        detector = build_detector(teacher)
    try:
        detector.load_state_dict(state)
    except RuntimeError:
        raise _fail(path, "pair.teacher_checkpoint", mismatch(checkpoint, state, teacher, "teacher", TEACHER_FIX)) from None


def check_searches(space: SweepSpace, path: Path) -> None:
    """A sweep of several trials must search something: with nothing searched, every trial trains the
    same settings at the same seed, the same run N times. (An ablation's base space searches nothing on
    purpose: its rows and seeds are the runs.)"""
    if not space.search and space.num_samples > 1:
        raise _fail(path, "search", f"nothing is searched, so each of the {space.num_samples} trials would train the "
                    f"same settings at the same seed; set num_samples: 1, or compare seeds with python -m orchestrator.ablate")


def check_fits_here(space: SweepSpace, path: Path) -> None:
    """A local Ray has this machine's CPUs and GPUs, and Tune waits without end for a trial that asks
    for more (it stays PENDING, silently): refuse such a space before anything starts. (A cluster
    joined with ``--address`` may add nodes as trials ask for them, so it is not checked.)"""
    r = space.resources
    cpus, gpus = os.cpu_count() or 1, torch.cuda.device_count()
    workers = f"{r.num_workers} workers x " if r.worker_group else ""
    # a worker group's driver holds one CPU more, and a local Ray counts one more per concurrent trial for
    # it (orchestrator.experiment.start_ray): the workers themselves may take every core
    if r.num_workers * r.cpus_per_worker > cpus + (space.max_concurrent - 1 if r.worker_group else 0):
        raise _fail(path, "resources.cpus_per_worker", f"a trial asks for {workers}{r.cpus_per_worker:g} CPUs, more "
                    f"than this machine's {cpus}, and would wait for them for ever; ask for at most {cpus} in all, or "
                    f"join a cluster with --address")
    if r.use_gpu and gpus == 0:
        raise _fail(path, "resources.use_gpu", "true, but torch sees no GPU on this machine, and a trial would wait "
                    "for one for ever; set it to false, or join a cluster with GPUs with --address")
    if r.use_gpu and r.num_workers * r.gpus_per_worker > gpus:
        raise _fail(path, "resources.gpus_per_worker", f"a trial asks for {workers}{r.gpus_per_worker:g} GPUs, more "
                    f"than this machine's {gpus}, and would wait for them for ever; ask for at most {gpus}, or join a "
                    f"cluster with --address")


def load_space(path: str | Path | None = None, overrides: Sequence[tuple[str, Any]] = ()) -> SweepSpace:
    path = Path(path) if path else DEFAULT_SPACE
    data = read_yaml(path, "search space")
    if "rows" in data:
        raise UserError(f"{path}: an ablation grid (it has rows), not a search space: "
                        f"run it with python -m orchestrator.ablate --grid {path}")
    for dotted, value in overrides:
        set_value(data, dotted, value)
    search = data.pop("search", {}) or {}
    if not isinstance(search, dict):
        raise UserError(f"{path}: search: must map parameter names to distributions")
    try:
        space = from_dict(SweepSpace, data, where="")
        params = {name: from_dict(Param, spec, where=f".search.{name}") for name, spec in search.items()}
    except UserError as error:
        raise UserError(f"{path}: {str(error).lstrip('.').removeprefix(': ')}") from None
    return validate(dataclasses.replace(space, search=params), path)


T = TypeVar("T")


def load_blaming_command_line(load: Callable[[], T], load_file_alone: Callable[[], object], *, given: bool) -> T:
    """``load()`` reads a file with values given on the command line (``given``: some were; ``--set`` and
    the like). When it fails and the file alone loads, those values are what is wrong, and the message
    says so instead of leaving the user to look for them in the file (a message that names its option
    already says so)."""
    try:
        return load()
    except UserError as error:
        if not given or str(error).startswith("--"):
            raise
        try:
            load_file_alone()
        except UserError:
            raise error from None
        raise UserError(f"{error} (a value given on the command line, not in the file)") from None
