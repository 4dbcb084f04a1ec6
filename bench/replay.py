"""A searcher replayed against a tabular benchmark instead of training (the HPOBench / YAHPO idea).

A proposed point is answered by its **nearest measured configuration** (in a joint method-and-settings
space: among the configurations of the same method; distance in the unit cube, log scale for loguniform
parameters) and by **one of that configuration's measured seeds drawn at random**, so a trial sees real
per-epoch curves with real seed noise and no fitted model invents structure between measured points.
Where the table holds one seed of a configuration, a measured seed-noise curve is added to it (``(seed a
- seed b) / sqrt(2)`` of a configuration measured twice, with a random sign: its variance is one run's).

Trials run epoch by epoch on ``concurrency`` simulated workers, asynchronously (ASHA decides on each
result as it comes, as Ray does). Two clocks: compute (trial-epochs) and simulated wall-clock, where each
trial's start costs ``startup_s`` and each epoch ``epoch_s`` (a searcher that starts more trials pays
more start-ups). Each searcher's incumbent is the completed trial with the best *observed* final AP; it
is scored by its configuration's *mean* final AP over the measured seeds (what the user would get).
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from scipy import stats

from orchestrator.space import DefineByRun, Param, SweepSpace, paper_default_point


@dataclass
class Table:
    """Measured per-epoch val AP: ``curves[config, seed, epoch - 1]`` (NaN where a seed is missing)."""

    params: list[dict]
    curves: np.ndarray

    @property
    def epochs(self) -> int:
        return self.curves.shape[2]

    def final_mean(self, config: int) -> float:
        return float(np.nanmean(self.curves[config, :, -1]))

    def final_means(self) -> np.ndarray:
        return np.array([self.final_mean(i) for i in range(len(self.params))])

    def seed_noise(self) -> np.ndarray:
        """One curve per configuration measured with two seeds: ``(seed a - seed b) / sqrt(2)``, whose
        variance is one run's seed variance at each epoch."""
        pairs = [c[~np.isnan(c).any(axis=1)][:2] for c in self.curves]
        return np.array([(a - b) / math.sqrt(2) for a, b in (p for p in pairs if len(p) == 2)]).reshape(-1, self.epochs)


def load_table(path: Path, search: dict[str, Param]) -> Table:
    rows = list(csv.DictReader(path.open()))
    if not rows:
        raise SystemExit(f"error: {path}: no rows")
    missing = [name for name in search if name not in rows[0]]
    if missing or not {"config", "seed", "epoch", "val_AP"} <= set(rows[0]):
        raise SystemExit(f"error: {path}: needs columns config, seed, epoch, val_AP and {', '.join(search)}")
    configs = sorted({int(r["config"]) for r in rows})
    seeds = sorted({int(r["seed"]) for r in rows})
    epochs = max(int(r["epoch"]) for r in rows)
    index = {c: i for i, c in enumerate(configs)}
    curves = np.full((len(configs), len(seeds), epochs), np.nan)
    params: list[dict] = [{} for _ in configs]
    for r in rows:
        i = index[int(r["config"])]
        curves[i, seeds.index(int(r["seed"])), int(r["epoch"]) - 1] = float(r["val_AP"])
        params[i] = {name: _parse(r[name], search[name]) for name in search if r[name] != ""}
    complete = ~np.isnan(curves).any(axis=2)
    if not complete.any(axis=1).all():
        raise SystemExit(f"error: {path}: every configuration needs one seed with all {epochs} epochs")
    curves[~complete] = np.nan  # a seed without every epoch is not a curve
    return Table(params, curves)


def _parse(text: str, param: Param):
    return text if param.type == "categorical" else float(text)


def _unit(params: dict, search: dict[str, Param], names: list[str]) -> np.ndarray:
    """The ``names`` coordinates of a point in the unit cube (log scale for loguniform; a categorical
    value maps to its index)."""
    coords = []
    for name in names:
        param, value = search[name], params.get(name)
        if param.type == "categorical":
            choices = param.choices or []
            coords.append(choices.index(value) / max(1, len(choices) - 1) if value in choices else 0.0)
        elif param.type == "loguniform":
            coords.append((math.log(value) - math.log(param.low)) / (math.log(param.high) - math.log(param.low)))
        else:
            coords.append((value - param.low) / (param.high - param.low))
    return np.array(coords)


class Lookup:
    """Answers a proposed point with a measured configuration's curve (see the module's description)."""

    def __init__(self, table: Table, search: dict[str, Param], noise: np.ndarray | None = None):
        self.table, self.search = table, search
        self.noise = noise if noise is not None and len(noise) else None
        self.joint = "method" in search  # a joint space: a point's method decides which configurations qualify

    def _names(self, params: dict) -> list[str]:
        if not self.joint:
            return list(self.search)
        method = params["method"]
        return [n for n in self.search if n.startswith(f"{method}.")]

    def nearest(self, params: dict) -> int:
        names = self._names(params)
        candidates = [i for i, p in enumerate(self.table.params) if not self.joint or p.get("method") == params["method"]]
        if not candidates:
            raise SystemExit(f"error: the table has no configuration of method {params.get('method')!r}")
        target = _unit(params, self.search, names)
        distances = [float(((_unit(self.table.params[i], self.search, names) - target) ** 2).sum()) for i in candidates]
        return candidates[int(np.argmin(distances))]

    def observe(self, config: int, rng: np.random.Generator) -> np.ndarray:
        curves = self.table.curves[config]
        measured = [c for c in curves if not np.isnan(c).any()]
        seen = measured[rng.integers(len(measured))]
        if len(measured) == 1 and self.noise is not None:
            seen = seen + rng.choice([-1.0, 1.0]) * self.noise[rng.integers(len(self.noise))]
        return seen


class OptunaProposer:
    """Optuna ask/tell with the project's define-by-run space and first point (the published setting;
    a joint space has none: no method is favoured)."""

    def __init__(self, space: SweepSpace, sampler: str, seed: int, startup: int | None = None):
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        if sampler == "tpe":
            chosen: optuna.samplers.BaseSampler = optuna.samplers.TPESampler(
                seed=seed, **({"n_startup_trials": startup} if startup else {}))
        else:
            chosen = optuna.samplers.RandomSampler(seed=seed)
        self.study = optuna.create_study(direction="maximize", sampler=chosen)
        point = paper_default_point(space)
        if point:
            self.study.enqueue_trial(point)
        self.define = DefineByRun(space.search)

    def ask(self):
        trial = self.study.ask()
        self.define(trial)
        return trial, trial.params

    def report(self, handle, value: float, epoch: int) -> None:
        handle.report(value, epoch)

    def tell(self, handle, value: float | None, pruned: bool) -> None:
        if pruned:
            self.study.tell(handle, state=optuna.trial.TrialState.PRUNED)
        else:
            self.study.tell(handle, value)


@dataclass
class Clock:
    """What a simulated trial costs in seconds: its start (``startup_s``) and each epoch (``epoch_s``)."""

    startup_s: float = 0.0
    epoch_s: float = 1.0


@dataclass
class Run:
    """One replay: the incumbent's mean final AP after each trial-epoch (``by_compute``), and the
    (wall-clock second, incumbent) steps at which the incumbent changed (``events``)."""

    by_compute: np.ndarray
    events: list[tuple[float, float]]
    trials_started: int

    def at_times(self, times: np.ndarray, before: float) -> np.ndarray:
        """The incumbent at each wall-clock time (``before`` until the first trial completes)."""
        values = np.full(len(times), before)
        for moment, incumbent in self.events:
            values[times >= moment] = incumbent
        return values


class _Trial:
    def __init__(self, trial_id: str):
        self.trial_id = trial_id


def replay(lookup: Lookup, proposer, *, budget: int, concurrency: int = 1, asha: tuple[int, int] | None = None,
           seed: int = 0, clock: Clock = Clock()) -> Run:
    """Trials proposed by ``proposer`` until ``budget`` trial-epochs are spent, ``concurrency`` at a time."""
    rng = np.random.default_rng(seed)
    np.random.seed(seed)  # ASHA draws its bracket from numpy's global generator
    epochs = lookup.table.epochs
    scheduler = None
    if asha is not None:
        scheduler = ASHAScheduler(time_attr="epoch", metric="val/AP", mode="max", max_t=epochs,
                                  grace_period=asha[0], reduction_factor=asha[1])
    curve = np.zeros(budget)
    events: list[tuple[float, float]] = []
    spent, started, best_observed, incumbent = 0, 0, -math.inf, 0.0
    running: list[dict] = []  # each: trial, handle, config, observed curve, epochs done, when its next epoch ends
    free = [0.0] * concurrency  # when each simulated worker is free again
    while spent < budget:
        # a trial starts only if its full budget fits in what is left after the running ones
        while len(running) < concurrency and spent + sum(epochs - r["done"] for r in running) + epochs <= budget:
            handle, params = proposer.ask()
            config = lookup.nearest(params)
            trial = _Trial(str(started))
            if scheduler is not None:
                scheduler.on_trial_add(None, trial)
            worker = int(np.argmin(free))
            begin = free[worker]
            free[worker] = math.inf  # held until the trial ends
            running.append({"trial": trial, "handle": handle, "config": config, "seen": lookup.observe(config, rng),
                            "done": 0, "next": begin + clock.startup_s + clock.epoch_s, "order": started, "worker": worker})
            started += 1
        if not running:
            break
        current = min(running, key=lambda r: (r["next"], r["order"]))
        now = current["next"]
        current["done"] += 1
        epoch, value = current["done"], float(current["seen"][current["done"] - 1])
        curve[spent] = incumbent
        spent += 1
        proposer.report(current["handle"], value, epoch)
        stop = False
        if scheduler is not None and epoch < epochs:
            stop = scheduler.on_trial_result(None, current["trial"], {"epoch": epoch, "val/AP": value}) == TrialScheduler.STOP
        if epoch == epochs:
            if scheduler is not None:
                scheduler.on_trial_complete(None, current["trial"], {"epoch": epoch, "val/AP": value})
            proposer.tell(current["handle"], value, pruned=False)
            if value > best_observed:
                best_observed, incumbent = value, lookup.table.final_mean(current["config"])
                events.append((now, incumbent))
            curve[spent - 1] = incumbent
        elif stop:
            proposer.tell(current["handle"], None, pruned=True)
        else:
            current["next"] = now + clock.epoch_s
            continue
        free[current["worker"]] = now
        running.remove(current)
    curve[spent:] = incumbent
    return Run(curve, events, started)


def one_epoch_top_k(lookup: Lookup, space: SweepSpace, *, budget: int, seed: int = 0, concurrency: int = 1,
                    clock: Clock = Clock()) -> Run:
    """The simple baseline (arXiv 2307.15422): train N random configurations for one epoch, keep the K
    best by their first-epoch AP, finish those; N + K x (epochs - 1) = budget with K = N / 4. A finished
    configuration continues from its one-epoch checkpoint, paying another start-up."""
    rng = np.random.default_rng(seed)
    epochs = lookup.table.epochs
    keep = max(1, budget // (4 + epochs - 1)) if epochs > 1 else budget
    first = budget - keep * (epochs - 1)
    proposer = OptunaProposer(space, "random", seed)
    tried = []
    for _ in range(first):
        handle, params = proposer.ask()
        config = lookup.nearest(params)
        tried.append((config, lookup.observe(config, rng)))
    per_worker = math.ceil(first / concurrency)
    wall_first = per_worker * (clock.startup_s + clock.epoch_s)
    curve = np.zeros(budget)
    events: list[tuple[float, float]] = []
    best, incumbent, spent = -math.inf, 0.0, first
    survivors = sorted(tried, key=lambda t: -t[1][0])[:keep]
    for index, (config, seen) in enumerate(survivors):
        spent += epochs - 1
        if seen[-1] > best:
            best, incumbent = float(seen[-1]), lookup.table.final_mean(config)
            finished = wall_first + (index // concurrency + 1) * (clock.startup_s + (epochs - 1) * clock.epoch_s)
            events.append((finished, incumbent))
        curve[spent - 1:] = incumbent
    return Run(curve, events, first + keep)


def rung_correlations(table: Table) -> dict[int, float]:
    """Spearman correlation over configurations between mean AP at each earlier epoch and at the last."""
    means = np.nanmean(table.curves, axis=1)
    return {e + 1: float(stats.spearmanr(means[:, e], means[:, -1]).statistic) for e in range(table.epochs - 1)}


def normalised_regret(incumbent: np.ndarray, table: Table) -> np.ndarray:
    """(best - incumbent) / (best - worst) over the table's configurations' mean final AP: 0 at the best
    configuration, 1 at the worst (and before any trial completed)."""
    means = table.final_means()
    best, worst = float(means.max()), float(means.min())
    regret = (best - incumbent) / max(best - worst, 1e-12)
    return np.where(incumbent <= 0, 1.0, np.clip(regret, 0.0, 1.0))
