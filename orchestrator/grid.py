"""Ablation grids: a YAML file naming a base space, rows (a method and its parameters each), seeds and an
optional tuning block, validated into a frozen :class:`Grid` (no Ray here). ``python -m orchestrator.ablate``
runs one.

Every problem is a one-line ``UserError`` naming the file, the key and what is allowed.
"""
from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from dmkd.config import check_seed, from_dict
from dmkd.distillers import check_method, method_parameters, same_loss, search_space
from dmkd.errors import UserError
from dmkd.io import read_json
from orchestrator.space import DEFAULT_SPACE, SCHEDULERS, TRAIN_KEYS, Objective, Param, Searcher, SweepSpace
from orchestrator.space_file import check_pair, check_values, load_space, read_yaml


@dataclass(frozen=True)
class Row:
    """One row of an ablation grid: a method and its parameters; ``tune``: whether tuning may choose them."""

    method: str
    params: dict = field(default_factory=dict)
    tune: bool = True


REFERENCE_ROW = Row("none", {}, tune=False)  # the undistilled student every row is compared with


def rows_record(rows: dict[str, Row]) -> dict[str, dict]:
    """Rows as JSON (ablation.json, the plan)."""
    return {name: dataclasses.asdict(row) for name, row in rows.items()}


DEFAULT_GRID = DEFAULT_SPACE.parent / "ablation.yaml"
TUNING_SEED_OFFSET = 1000  # the default tuning seed is the grid's seed + this: far from the reported ones
DEFAULT_SEEDS = 5


@dataclasses.dataclass(frozen=True)
class TuneBlock:
    """The grid's ``tune:`` block: every row with searchable parameters gets its own Optuna search
    (``trials`` trials of ``epochs`` epochs, selected on the validation split) before its seeds run."""

    trials: int = 0  # 0: no tuning, the rows' parameters as written
    epochs: int | None = None  # default: the base space's budget.epochs
    scheduler: str = "none"  # none: every tuning trial runs all its epochs; asha: stops weak ones
    trials_per_param: int | None = None  # a row with k searched parameters gets max(trials, k x this)
    startup_trials: int | None = None  # TPE's random start-up per row; default a third of its trials, >= 2
    seed: int | None = None  # the training seed of every tuning trial; default the grid's seed + 1000

    def trials_for(self, searched: int) -> int:
        """The tuning budget of a row that searches ``searched`` parameters."""
        return max(self.trials, (self.trials_per_param or 0) * searched) if self.trials else 0


@dataclasses.dataclass(frozen=True)
class Grid:
    name: str
    space: SweepSpace  # the base space (pair, data, fixed, budget, resources, wandb)
    rows: dict[str, Row]  # row name -> Row; the reference row (method none) is always there
    seeds: list[int]  # the reported seeds
    tune: TuneBlock = TuneBlock()
    base: Path = DEFAULT_SPACE  # the base space's file (what its messages name)
    from_sweep: dict | None = None  # --from-sweep: the best.json read, and which rows took its settings


def _rows(data: dict, space: SweepSpace, path: Path) -> dict[str, Row]:
    rows = data.get("rows")
    if not isinstance(rows, dict) or not rows:
        raise UserError(f"{path}: rows: must map row names to {{method: ..., params: {{...}}}}")
    checked = {}
    for name, row in rows.items():
        where = f"rows.{name}"
        if not isinstance(row, dict) or "method" not in row:
            raise UserError(f"{path}: {where}: needs a 'method'")
        if set(row) - {"method", "params", "tune"}:
            raise UserError(f"{path}: {where}: unknown key {sorted(set(row) - {'method', 'params', 'tune'})[0]!r}; "
                            f"allowed: method, params, tune")
        if not isinstance(row.get("tune", True), bool):
            raise UserError(f"{path}: {where}.tune: must be true or false, but got {row['tune']!r}")
        try:
            check_method(row["method"], f"{where}.method")
        except UserError as error:
            raise UserError(f"{path}: {error}") from None
        params = row.get("params") or {}
        if not isinstance(params, dict):
            raise UserError(f"{path}: {where}.params: must map parameter names to values, but got {params!r}")
        accepted = method_parameters(row["method"])
        for key in params:
            if key in TRAIN_KEYS:
                raise UserError(f"{path}: {where}.params.{key}: a training setting, not a parameter of the method: "
                                f"set it for every row under 'set:' (fixed.{key}), so that all rows train alike")
            if key not in accepted:
                raise UserError(f"{path}: {where}.params.{key}: not a parameter of method {row['method']!r}; "
                                f"allowed: {', '.join(accepted) or 'none'}")
        check_values(space, row["method"], params, path, f"{where}.params")
        checked[str(name)] = Row(row["method"], dict(params), row.get("tune", True))
    references = [name for name, row in checked.items() if row.method == "none"]
    if len(references) > 1:
        raise UserError(f"{path}: rows.{references[1]}: only one row may use method 'none' (the reference row)")
    reference = {references[0] if references else "none": REFERENCE_ROW}
    return {**reference, **{name: row for name, row in checked.items() if row.method != "none"}}


def _tune_block(data: dict | None, path: Path, trials: int | None, space: SweepSpace) -> TuneBlock:
    try:
        block = from_dict(TuneBlock, data or {}, where="tune")
    except UserError as error:
        raise UserError(f"{path}: {error}") from None
    if trials is not None:
        block = dataclasses.replace(block, trials=trials)
    if block.trials < 0:
        raise UserError(f"{path}: tune.trials: must be 0 (no tuning) or more, but got {block.trials}")
    for key in ("trials_per_param", "startup_trials"):
        if getattr(block, key) is not None and getattr(block, key) < 1:
            raise UserError(f"{path}: tune.{key}: must be at least 1, but got {getattr(block, key)}")
    if block.epochs is not None and block.epochs < 1:
        raise UserError(f"{path}: tune.epochs: must be at least 1, but got {block.epochs}")
    if block.scheduler not in SCHEDULERS:
        raise UserError(f"{path}: tune.scheduler: must be one of {', '.join(SCHEDULERS)}, but got {block.scheduler!r}")
    epochs = block.epochs or space.budget.epochs
    if block.scheduler == "asha" and epochs <= space.scheduler.grace_period:
        raise UserError(f"{path}: tune.scheduler: asha needs more than {space.scheduler.grace_period} epochs, but tune.epochs is {epochs}")
    seed = block.seed if block.seed is not None else space.seed + TUNING_SEED_OFFSET
    check_seed(seed, f"{path}: tune.seed" + ("" if block.seed is not None else f" (by default the seed + {TUNING_SEED_OFFSET})"))
    return dataclasses.replace(block, epochs=epochs, seed=seed)


def _sweep_best(folder: Path) -> dict:
    """A finished sweep's best.json (``--from-sweep``)."""
    best_file = folder / "best.json"
    if not best_file.is_file():
        raise UserError(f"--from-sweep: {best_file}: not found (has that sweep finished?)")
    best = read_json(best_file, "best.json")
    if not (isinstance(best, dict) and all(isinstance(best.get(k, {}), dict) for k in ("train", "distill", "params"))
            and isinstance(best.get("method"), str)):
        raise UserError(f"{best_file}: not a sweep's best.json (no 'method', 'params', 'train' and 'distill')")
    if best.get("interrupted"):
        raise UserError(f"--from-sweep: {best_file}: the best so far of a sweep stopped before its trials finished; "
                        f"rerun that sweep's command to finish it first")
    try:
        check_method(best["method"], f"{best_file}: method")
    except UserError as error:
        raise UserError(f"--from-sweep: {error}") from None
    return {"file": str(best_file), **best}


def rows_from_sweep(rows: dict[str, Row], best: dict, space: SweepSpace, path: Path) -> tuple[dict[str, Row], list[str]]:
    """``--from-sweep``: the sweep's distillation settings go to the rows of its loss (its method and that
    method's variants: ``dmkd_spatial`` for a ``dmkd`` sweep), never to another loss's rows (MGD and FGD
    take an ``alpha`` too, on another scale). In such a row the values the sweep chose (the parameters it
    searched) replace the row's own, unless the row says ``tune: false`` (its values as written); the
    sweep's other settings fill in what the row does not set. Returns the rows, and the names of those
    of the sweep's loss."""
    chosen = {k: v for k, v in best["distill"].items() if k in best["params"]}
    others = {k: v for k, v in best["distill"].items() if k not in chosen}
    changed, of_its_loss = dict(rows), []
    for name, row in rows.items():
        if row.method == "none" or not same_loss(row.method, best["method"]):
            continue
        of_its_loss.append(name)
        accepted = method_parameters(row.method)
        params = {**{k: v for k, v in others.items() if k in accepted}, **row.params}
        if row.tune:
            params.update({k: v for k, v in chosen.items() if k in accepted})
        check_values(space, row.method, params, path, f"rows.{name}.params (with --from-sweep {best['file']})")
        changed[name] = dataclasses.replace(row, params=params)
    return changed, of_its_loss


def load_grid(path: str | Path | None = None, *, seeds: int | None = None, from_sweep: str | None = None,
              overrides: Sequence[tuple[str, Any]] = (), tune_trials: int | None = None) -> Grid:
    path = Path(path) if path else DEFAULT_GRID
    data = read_yaml(path, "ablation grid")
    allowed = {"name", "base", "set", "seeds", "rows", "tune"}
    unknown = sorted(set(data) - allowed)
    if unknown and "rows" not in data and set(unknown) <= {f.name for f in dataclasses.fields(SweepSpace)}:
        raise UserError(f"{path}: a search space (it has no rows), not an ablation grid: run it with "
                        f"python -m orchestrator.sweep --space {path}, or name it as a grid's base")
    if unknown:
        raise UserError(f"{path}: unknown key {unknown[0]!r}; allowed keys: {', '.join(sorted(allowed))}")
    base = path.parent / str(data.get("base", "default.yaml"))
    sets = data.get("set") or {}
    if not isinstance(sets, dict):
        raise UserError(f"{path}: set: must map dotted keys to values")
    # rows run every epoch (no early stopping): a table compares finished trials only
    space_overrides = [*sets.items(), *overrides, ("scheduler.type", "none"), ("search", {})]
    space = load_space(base, space_overrides)
    best = _sweep_best(Path(from_sweep)) if from_sweep else None
    if best:  # training settings for every row, so that all rows train alike
        space = dataclasses.replace(space, fixed={**space.fixed, **best["train"]})
    rows = _rows(data, space, path)
    taken = None
    if best:
        rows, of_its_loss = rows_from_sweep(rows, best, space, path)
        taken = {"best": best["file"], "method": best["method"], "train": best["train"], "rows": of_its_loss}
    count = seeds if seeds is not None else data.get("seeds", DEFAULT_SEEDS)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise UserError(f"{path}: seeds: must be a positive integer, but got {count!r}")
    reported = [space.seed + i for i in range(count)]
    check_seed(reported[-1], f"{path}: seeds (the last seed, {space.seed} + {count - 1})")
    tune = _tune_block(data.get("tune"), path, tune_trials, space)
    if tune.trials and tune.seed in reported:
        raise UserError(f"{path}: tune.seed: {tune.seed} is one of the reported seeds {reported[0]}..{reported[-1]}; "
                        f"a tuning run must not be reported (its selection would bias the table): choose another")
    needs_teacher = any(row.method != "none" for row in rows.values())
    if needs_teacher and not (space.pair.teacher_checkpoint or space.pair.train_teacher):
        raise UserError(f"{base}: pair.teacher_checkpoint: set a checkpoint path, or train_teacher: true")
    if needs_teacher and space.method == "none":  # load_space checked the pair already for a distilling base
        check_pair(space, base)
    return Grid(name=str(data.get("name", "ablation")), space=space, rows=rows, seeds=reported, tune=tune, base=base,
                from_sweep=taken)


def sampler_seed(grid_seed: int, row_name: str) -> int:
    """A row's own sampler seed: rows of one grid draw different random points, reproducibly."""
    return zlib.crc32(f"{grid_seed}:{row_name}".encode())


def row_space(grid: Grid, row: Row) -> SweepSpace:
    """The sweep that tunes one row: the method's declared search space (``SEARCH_SPACES``), the row's
    own parameters as fixed values and first point, the grid's tuning budget and tuning seed, selected
    on val/AP."""
    space = grid.space
    search = {name: from_dict(Param, spec, where=f"search.{name}") for name, spec in search_space(row.method).items()}
    return dataclasses.replace(
        space, method=row.method, fixed={**space.fixed, **row.params}, search=search,
        seed=cast(int, grid.tune.seed), num_samples=grid.tune.trials_for(len(search)),  # load_grid resolved both
        budget=dataclasses.replace(space.budget, epochs=cast(int, grid.tune.epochs)),
        scheduler=dataclasses.replace(space.scheduler, type=grid.tune.scheduler), objective=Objective(),
        searcher=Searcher(grid.tune.startup_trials))
