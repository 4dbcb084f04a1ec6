"""Search efficiency: how much compute each searcher needs on the default space, replayed against a
tabular benchmark instead of training (the HPOBench / YAHPO idea).

    python bench/search_efficiency.py                                 # the committed table, 100 repeats
    python bench/search_efficiency.py --table T.csv --repeats 50 --out DIR --grace-periods 1 2

The table (``bench/tables/default_space.csv``, long format: one row per configuration, seed and
epoch with the searched parameters and ``val_AP``) holds configurations of
``search_spaces/default.yaml`` measured at the full budget through the real trial machinery
(``bench/search_table.py``; its provenance is in the ``.json`` beside the table).

Replay: a searcher proposes a point; the point is answered by its **nearest measured configuration**
(distance in the unit cube, log scale for loguniform parameters) and by **one of that configuration's
measured seeds drawn at random**, so a trial sees real per-epoch curves with real seed noise and no
fitted model can invent structure between the measured points. Where the table holds one seed of a
configuration, a **measured seed-noise curve** is added to it: ``(seed 0 - seed 1) / sqrt(2)`` of one
configuration of the seed table (``--seeds-table``, default ``default_space_seeds.csv``: configurations
trained with two seeds), with a random sign; a whole curve, so the noise keeps its correlation across
epochs, and its variance is one run's seed variance. Trials run epoch by epoch on
``--concurrency`` simulated workers (an epoch is one unit of compute); Ray's own ``ASHAScheduler``
decides on every epoch's result, and Optuna's samplers propose (the project's settings: seeded TPE,
the paper's defaults as the first point, trials stopped early told PRUNED with their epochs).

Each searcher's incumbent is the completed trial with the best *observed* final AP; it is scored by
its configuration's *mean* final AP over the measured seeds (what the user would get). Printed and
written: the curve "incumbent AP vs trial-epochs spent" (median and quartiles over repeats) as a PNG
and a CSV, and the compute each searcher needs to come within 0.005 AP of random search's final
incumbent, as a fraction of random search's whole budget and of the compute random search itself needs
to get there, and the compute to come within 0.005 AP of the table's best configuration.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from orchestrator.space import DEFAULT_SPACE, DefineByRun, paper_default_point  # noqa: E402
from orchestrator.space_file import load_space  # noqa: E402

DEFAULT_TABLE = ROOT / "bench" / "tables" / "default_space.csv"
DEFAULT_SEEDS_TABLE = ROOT / "bench" / "tables" / "default_space_seeds.csv"
TOLERANCE = 0.005


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

    def seed_noise(self) -> np.ndarray:
        """One curve per configuration measured with two seeds: ``(seed a - seed b) / sqrt(2)``, whose
        variance is one run's seed variance at each epoch."""
        pairs = [c[~np.isnan(c).any(axis=1)][:2] for c in self.curves]
        return np.array([(a - b) / math.sqrt(2) for a, b in (p for p in pairs if len(p) == 2)]).reshape(-1, self.epochs)


def load_table(path: Path, search: dict) -> Table:
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
        params[i] = {name: _parse(r[name], search[name]) for name in search}
    complete = ~np.isnan(curves).any(axis=2)
    if not complete.any(axis=1).all():
        raise SystemExit(f"error: {path}: every configuration needs one seed with all {epochs} epochs")
    curves[~complete] = np.nan  # a seed without every epoch is not a curve
    return Table(params, curves)


def _parse(text: str, param):
    return text if param.type == "categorical" else float(text)


def _unit(params: dict, search: dict) -> np.ndarray:
    """A point in the unit cube (log scale for loguniform); categorical values map to their index."""
    coords = []
    for name, param in search.items():
        value = params.get(name)
        if param.type == "categorical":
            coords.append(param.choices.index(value) / max(1, len(param.choices) - 1) if value in param.choices else 0.0)
        elif param.type == "loguniform":
            coords.append((math.log(value) - math.log(param.low)) / (math.log(param.high) - math.log(param.low)))
        else:
            coords.append((value - param.low) / (param.high - param.low))
    return np.array(coords)


class Lookup:
    def __init__(self, table: Table, search: dict, noise: np.ndarray | None = None):
        """``noise``: seed-noise curves (:meth:`Table.seed_noise`) added where a configuration has one seed."""
        self.table, self.search = table, search
        self.points = np.stack([_unit(p, search) for p in table.params])
        self.noise = noise if noise is not None and len(noise) else None

    def nearest(self, params: dict) -> int:
        return int(np.argmin(((self.points - _unit(params, self.search)) ** 2).sum(axis=1)))

    def observe(self, config: int, rng: np.random.Generator) -> np.ndarray:
        curves = self.table.curves[config]
        measured = [c for c in curves if not np.isnan(c).any()]
        seen = measured[rng.integers(len(measured))]
        if len(measured) == 1 and self.noise is not None:
            seen = seen + rng.choice([-1.0, 1.0]) * self.noise[rng.integers(len(self.noise))]
        return seen


class OptunaProposer:
    """Optuna ask/tell with the project's define-by-run space and its first point."""

    def __init__(self, space, sampler: str, seed: int, startup: int | None = None):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        if sampler == "tpe":
            chosen = optuna.samplers.TPESampler(seed=seed, **({"n_startup_trials": startup} if startup else {}))
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
        import optuna

        if pruned:
            self.study.tell(handle, state=optuna.trial.TrialState.PRUNED)
        else:
            self.study.tell(handle, value)


class _Trial:
    def __init__(self, trial_id: str):
        self.trial_id = trial_id


def replay(lookup: Lookup, proposer, *, budget: int, concurrency: int = 1, asha: tuple[int, int] | None = None,
           seed: int = 0) -> np.ndarray:
    """The incumbent's mean final AP after each unit of compute (0 before a trial completes)."""
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    rng = np.random.default_rng(seed)
    np.random.seed(seed)  # ASHA draws its bracket from numpy's global generator
    epochs = lookup.table.epochs
    scheduler = None
    if asha is not None:
        scheduler = ASHAScheduler(time_attr="epoch", metric="val/AP", mode="max", max_t=epochs,
                                  grace_period=asha[0], reduction_factor=asha[1])
    curve = np.zeros(budget)
    spent, started, best_observed, incumbent = 0, 0, -math.inf, 0.0
    running: list[dict] = []  # each: trial, handle, config, observed curve, epochs done, finish time
    clock = 0.0
    while spent < budget:
        # a trial starts only if its full budget fits in what is left after the running ones
        while len(running) < concurrency and spent + sum(epochs - r["done"] for r in running) + epochs <= budget:
            handle, params = proposer.ask()
            config = lookup.nearest(params)
            trial = _Trial(str(started))
            if scheduler is not None:
                scheduler.on_trial_add(None, trial)
            running.append({"trial": trial, "handle": handle, "config": config, "seen": lookup.observe(config, rng),
                            "done": 0, "next": clock + 1.0, "order": started})
            started += 1
        if not running:
            break
        current = min(running, key=lambda r: (r["next"], r["order"]))
        clock = current["next"]
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
            curve[spent - 1] = incumbent
            running.remove(current)
        elif stop:
            proposer.tell(current["handle"], None, pruned=True)
            running.remove(current)
        else:
            current["next"] = clock + 1.0
    curve[spent:] = incumbent
    return curve


def compute_to_reach(median: np.ndarray, target: float) -> int | None:
    """Trial-epochs after which the median curve first reaches ``target``; None if it never does."""
    reached = np.nonzero(median >= target - 1e-12)[0]
    return int(reached[0]) + 1 if reached.size else None


def rung_correlations(table: Table) -> dict[int, float]:
    """Spearman correlation over configurations between mean AP at each earlier epoch and at the last."""
    from scipy import stats

    means = np.nanmean(table.curves, axis=1)
    return {e + 1: float(stats.spearmanr(means[:, e], means[:, -1]).statistic) for e in range(table.epochs - 1)}


def searchers(args) -> dict[str, dict]:
    found = {"random": {"sampler": "random", "asha": None}, "tpe": {"sampler": "tpe", "asha": None}}
    for grace in args.grace_periods:
        for factor in args.reduction_factors:
            suffix = "" if (grace, factor) == (args.grace_periods[0], args.reduction_factors[0]) else f" g{grace} rf{factor}"
            found[f"asha+random{suffix}"] = {"sampler": "random", "asha": (grace, factor)}
            found[f"asha+tpe{suffix}"] = {"sampler": "tpe", "asha": (grace, factor)}
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/search_efficiency.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", type=Path, default=DEFAULT_TABLE)
    parser.add_argument("--space", type=Path, default=DEFAULT_SPACE, help="the space the table measured")
    parser.add_argument("--seeds-table", type=Path, default=DEFAULT_SEEDS_TABLE,
                        help="configurations measured with two seeds: their seed noise is added to one-seed rows "
                             "('none': no noise added)")
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--trials", type=int, default=32, help="random search's trials: its compute is trials x epochs")
    parser.add_argument("--concurrency", type=int, default=None, help="simulated workers (default: the space's max_concurrent)")
    parser.add_argument("--grace-periods", type=int, nargs="+", default=None, help="ASHA grace periods (default: the space's)")
    parser.add_argument("--reduction-factors", type=int, nargs="+", default=None, help="ASHA reduction factors (default: the space's)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "search_efficiency")
    args = parser.parse_args(argv)

    space = load_space(args.space)
    args.grace_periods = args.grace_periods or [space.scheduler.grace_period]
    args.reduction_factors = args.reduction_factors or [space.scheduler.reduction_factor]
    concurrency = args.concurrency or space.max_concurrent
    if not args.table.is_file():
        print(f"error: {args.table}: no table (make one with bench/search_table.py)", file=sys.stderr)
        return 2
    table = load_table(args.table, space.search)
    noise = table.seed_noise()
    if str(args.seeds_table) != "none" and args.seeds_table.is_file():
        noise = np.concatenate([noise, load_table(args.seeds_table, space.search).seed_noise()])
    lookup = Lookup(table, space.search, noise)
    budget = args.trials * table.epochs
    started = time.perf_counter()
    curves = {}
    for name, spec in searchers(args).items():
        runs = [replay(lookup, OptunaProposer(space, spec["sampler"], seed), budget=budget, concurrency=concurrency,
                       asha=spec["asha"], seed=seed) for seed in range(args.repeats)]
        curves[name] = np.stack(runs)
    target = float(np.median(curves["random"][:, -1])) - TOLERANCE
    summary = {"table": str(args.table), "configurations": len(table.params), "seeds": table.curves.shape[1],
               "epochs": table.epochs, "repeats": args.repeats, "budget_trial_epochs": budget,
               "concurrency": concurrency, "target_AP": target, "rung_spearman": rung_correlations(table),
               "seed_noise_sd": [float(x) for x in np.sqrt((noise ** 2).mean(axis=0))] if len(noise) else None,
               "seed_noise_curves": len(noise),
               "best_configuration_AP": max(table.final_mean(i) for i in range(len(table.params))), "searchers": {}}
    sd = ", ".join(f"{x:.4f}" for x in summary["seed_noise_sd"]) if summary["seed_noise_sd"] else "none measured"
    print(f"seed noise added to one-seed rows: sd per epoch {sd} ({len(noise)} measured seed pairs)")
    print(f"{len(table.params)} configurations x {table.curves.shape[1]} seeds x {table.epochs} epochs; "
          f"{args.repeats} repeats; budget {budget} trial-epochs ({args.trials} full trials); "
          f"target: random search's final median incumbent - {TOLERANCE} = {target:.4f}")
    best_target = summary["best_configuration_AP"] - TOLERANCE
    random_needed = compute_to_reach(np.median(curves["random"], axis=0), target)
    print(f"{'searcher':<22} {'final AP (median)':>18} {'compute to target':>18} {'of random budget':>17} "
          f"{'of random to target':>20} {'to best - 0.005':>16}")
    for name, runs in curves.items():
        median = np.median(runs, axis=0)
        needed = compute_to_reach(median, target)
        ratio = needed / budget if needed is not None else None
        versus = needed / random_needed if needed is not None and random_needed else None
        to_best = compute_to_reach(median, best_target)
        summary["searchers"][name] = {"final_median": float(median[-1]), "compute_to_target": needed,
                                      "fraction_of_random": ratio, "fraction_of_random_to_target": versus,
                                      "compute_to_best": to_best}
        print(f"{name:<22} {median[-1]:>18.4f} {needed if needed is not None else 'never':>18} "
              f"{f'{ratio:.2f}' if ratio is not None else '-':>17} {f'{versus:.2f}' if versus is not None else '-':>20} "
              f"{to_best if to_best is not None else 'never':>16}")
    print("rung Spearman (mean AP at epoch e vs last, over configurations): "
          + ", ".join(f"epoch {e}: {rho:.2f}" for e, rho in summary["rung_spearman"].items()))
    print(f"replayed in {time.perf_counter() - started:.1f} s")
    _write(args.out, curves, summary, budget)
    return 0


def _write(out: Path, curves: dict, summary: dict, budget: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    compute = np.arange(1, budget + 1)
    with (out / "curves.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["searcher", "trial_epochs", "q25", "median", "q75"])
        for name, runs in curves.items():
            q25, median, q75 = np.percentile(runs, [25, 50, 75], axis=0)
            writer.writerows([name, int(c), f"{a:.5f}", f"{b:.5f}", f"{d:.5f}"] for c, a, b, d in zip(compute, q25, median, q75))
    fig, axis = plt.subplots(figsize=(7, 4.5))
    for name, runs in curves.items():
        q25, median, q75 = np.percentile(runs, [25, 50, 75], axis=0)
        axis.plot(compute, median, label=name)
        axis.fill_between(compute, q25, q75, alpha=0.15)
    axis.axhline(summary["target_AP"], color="gray", linestyle="--", linewidth=1, label="random's final - 0.005")
    axis.set_xlabel("trial-epochs spent")
    axis.set_ylabel("incumbent's mean final val AP")
    axis.set_ylim(bottom=max(0.0, summary["target_AP"] - 0.15))
    axis.set_title(f"median and quartiles over {summary['repeats']} repeats", fontsize=10)
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=90)
    plt.close(fig)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    sys.exit(main())
