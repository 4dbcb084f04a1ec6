"""A search space, typed: the teacher/student pair, the data, fixed and searched values, the objective,
budget, scheduler, searcher, resources and W&B settings of a sweep (:class:`SweepSpace`, frozen); the
Optuna define-by-run function of its search, its first point (the published setting) and its record.
``orchestrator.space_file`` reads and checks the YAML files under ``search_spaces/``."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dmkd.config import MINI_STUDENT, MINI_TEACHER, DataPaths, TrainConfig, to_dict
from dmkd.distillers import detector_family, method_parameters
from dmkd.errors import UserError
from dmkd.evaluate import METRIC_NAMES
from dmkd.models import DetectorConfig

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
class Data(DataPaths):
    """COCO-format paths (the optional test pair is the held-out split ablation tables report on); all
    empty means the embedded mini-benchmark under ``mini_dir``."""

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

    @property
    def worker_group(self) -> bool:
        """Whether a trial runs as a Ray Train worker group (several workers, DDP); a one-worker trial
        trains in its own Tune trial."""
        return self.num_workers > 1


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
                     teacher_checkpoint: str | None = None, data_paths: DataPaths | None = None) -> TrainConfig:
        """The TrainConfig of one trial: fixed values, then ``values``; ``method`` and ``seed`` default
        to the space's (an ablation row sets its own)."""
        method = method or self.method
        space = self if method == self.method else dataclasses.replace(self, method=method)
        train, distill = space.routed({**self.fixed, **values})
        return TrainConfig(data=data_paths or DataPaths(), out=out, detector=self.pair.student, epochs=self.budget.epochs,
                           max_iters=self.budget.max_iters, seed=self.seed if seed is None else seed,
                           method=method, teacher=self.pair.teacher,
                           teacher_checkpoint=(teacher_checkpoint or self.pair.teacher_checkpoint) if method != "none" else None,
                           distill=distill, **train)


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
        chosen: dict[str, Any] = {}
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


