"""Search efficiency in the field's terms, replayed against a tabular benchmark (``bench/replay.py`` says
how a trial is answered without training).

    python bench/search_efficiency.py                                          # the default space's table
    python bench/search_efficiency.py --table bench/tables/joint_space.csv --joint search_spaces/methods.yaml

For each searcher (random search; TPE; ASHA with random or TPE proposals, asynchronous as in Ray; and the
one-epoch top-K baseline: N random configurations trained one epoch, the best quarter finished) at each
``--concurrency``, over ``--repeats`` repeats (repeat i of every searcher shares its noise draws):
- normalised regret, (best - incumbent) / (best - worst) over the table's configurations' mean final AP,
  against trial-epochs and against simulated wall-clock, which charges every trial start ``--startup-s``
  and every epoch ``--epoch-s`` (median and quartiles, ``curves.png`` / ``curves.csv``);
- time to target (the regret random search ends at, at concurrency 1, plus 0.005 AP): each repeat's
  speed-up over random search's repeat of the same index, median and interquartile range, in compute and
  in wall-clock (a repeat that never reaches the target counts its whole budget: a lower bound);
- rank tests on final regret: Friedman over all searchers, and Wilcoxon signed-rank of each against random
  search (Holm-adjusted over the searchers).
Writes ``summary.json``, ``curves.csv`` and ``curves.png`` to ``--out``.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import multiprocessing
import sys
import time
from pathlib import Path

import numpy as np
from scipy import stats

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from replay import Clock, Lookup, OptunaProposer, Table, load_table, normalised_regret, one_epoch_top_k, replay, rung_correlations  # noqa: E402

from orchestrator.report.stats import holm  # noqa: E402
from orchestrator.space import DEFAULT_SPACE, SweepSpace  # noqa: E402
from orchestrator.space_file import load_space  # noqa: E402

DEFAULT_TABLE = ROOT / "bench" / "tables" / "default_space.csv"
DEFAULT_SEEDS_TABLE = ROOT / "bench" / "tables" / "default_space_seeds.csv"
TOLERANCE = 0.005  # AP: "as good as" random search's end point
SEARCHERS = {"random": ("random", None), "tpe": ("tpe", None), "asha+random": ("random", "asha"),
             "asha+tpe": ("tpe", "asha"), "one-epoch top-K": ("topk", None)}


@dataclasses.dataclass
class Setting:
    """What every replay of a call shares."""

    space: SweepSpace
    lookup: Lookup
    budget: int
    asha: tuple[int, int]
    clock: Clock
    startup: int | None


def _runs(job: tuple[Setting, str, int, int]) -> tuple[str, int, list]:
    setting, name, concurrency, repeats = job
    sampler, scheduler = SEARCHERS[name]
    found = []
    for seed in range(repeats):
        if sampler == "topk":
            run = one_epoch_top_k(setting.lookup, setting.space, budget=setting.budget, seed=seed,
                                  concurrency=concurrency, clock=setting.clock)
        else:
            proposer = OptunaProposer(setting.space, sampler, seed, setting.startup)
            run = replay(setting.lookup, proposer, budget=setting.budget, concurrency=concurrency,
                         asha=setting.asha if scheduler else None, seed=seed, clock=setting.clock)
        found.append(run)
    return name, concurrency, found


def _time_to(values: np.ndarray, axis: np.ndarray, target: float) -> float:
    """The first ``axis`` value at which ``values`` (regret) is at most ``target``; the last one if never."""
    reached = np.nonzero(values <= target + 1e-12)[0]
    return float(axis[reached[0]]) if reached.size else float(axis[-1])


def summarise(table: Table, runs: dict, budget: int, concurrencies: list[int], clock: Clock) -> dict:
    means = table.final_means()
    span = max(float(means.max() - means.min()), 1e-12)
    compute = np.arange(1, budget + 1, dtype=float)
    horizon = max(max((e[0] for r in found for e in r.events), default=0.0) for found in runs.values())
    wall = np.linspace(0.0, max(horizon, clock.epoch_s), 200)
    regret = {key: np.stack([normalised_regret(r.by_compute, table) for r in found]) for key, found in runs.items()}
    by_wall = {key: np.stack([normalised_regret(r.at_times(wall, 0.0), table) for r in found]) for key, found in runs.items()}
    target = float(np.median(regret[("random", concurrencies[0])][:, -1])) + TOLERANCE / span
    summary: dict = {"target_regret": target, "wall_clock_s": wall.tolist(), "searchers": {}}
    for concurrency in concurrencies:
        names = [name for name in SEARCHERS if (name, concurrency) in runs]
        finals = np.stack([regret[(name, concurrency)][:, -1] for name in names], axis=1)
        friedman = stats.friedmanchisquare(*finals.T).pvalue if len(names) > 2 else None
        base = regret[("random", concurrency)]
        base_times = [[_time_to(r, compute, target) for r in base],
                      [_time_to(r, wall, target) for r in by_wall[("random", concurrency)]]]
        tested = [n for n in names if n != "random"]
        wilcoxon = [float(stats.wilcoxon(regret[(n, concurrency)][:, -1], base[:, -1]).pvalue)
                    if np.any(regret[(n, concurrency)][:, -1] != base[:, -1]) else 1.0 for n in tested]
        adjusted = dict(zip(tested, holm(wilcoxon)))
        summary[f"friedman_p_concurrency_{concurrency}"] = friedman
        for name in names:
            r, w = regret[(name, concurrency)], by_wall[(name, concurrency)]
            times = [[_time_to(x, compute, target) for x in r], [_time_to(x, wall, target) for x in w]]
            speed = [np.array(b) / np.maximum(np.array(t), 1e-9) for b, t in zip(base_times, times)]
            summary["searchers"][f"{name} @{concurrency}"] = {
                "final_regret_median": float(np.median(r[:, -1])), "final_regret_iqr": np.percentile(r[:, -1], [25, 75]).tolist(),
                "reached_target": float(np.mean(r.min(axis=1) <= target + 1e-12)),
                "speedup_compute_median": float(np.median(speed[0])), "speedup_compute_iqr": np.percentile(speed[0], [25, 75]).tolist(),
                "speedup_wall_median": float(np.median(speed[1])), "speedup_wall_iqr": np.percentile(speed[1], [25, 75]).tolist(),
                "wilcoxon_vs_random_p": adjusted.get(name), "trials_started_median": float(np.median([x.trials_started for x in runs[(name, concurrency)]]))}
    return {**summary, "_regret": regret, "_wall": by_wall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/search_efficiency.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", type=Path, default=DEFAULT_TABLE)
    parser.add_argument("--space", type=Path, default=DEFAULT_SPACE, help="the space the table measured")
    parser.add_argument("--joint", type=Path, metavar="GRID", help="the table measured the joint space of this grid's methods")
    parser.add_argument("--seeds-table", type=Path, default=DEFAULT_SEEDS_TABLE,
                        help="configurations measured with two seeds: their seed noise is added to one-seed rows "
                             "('none': no noise added)")
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--trials", type=int, default=32, help="random search's trials: the budget is trials x epochs")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4], help="simulated workers")
    parser.add_argument("--startup-s", type=float, default=5.6, help="what each trial start costs (measured: BENCHMARKS.md, lean trials)")
    parser.add_argument("--epoch-s", type=float, default=19.0, help="what each epoch costs (measured there too: a 2-CPU trial)")
    parser.add_argument("--startup-trials", type=int, help="TPE's random start-up (default: the space's)")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "search_efficiency")
    args = parser.parse_args(argv)

    space = load_space(args.space)
    if args.joint:
        from joint_space import joint_methods, joint_search

        space = dataclasses.replace(space, search=joint_search(joint_methods(args.joint)), num_samples=args.trials)
    if not args.table.is_file():
        print(f"error: {args.table}: no table (make one with bench/search_table.py)", file=sys.stderr)
        return 2
    table = load_table(args.table, space.search)
    noise = table.seed_noise()
    if str(args.seeds_table) != "none" and args.seeds_table.is_file() and not args.joint:
        noise = np.concatenate([noise, load_table(args.seeds_table, space.search).seed_noise()])
    budget = args.trials * table.epochs
    clock = Clock(args.startup_s, args.epoch_s)
    setting = Setting(space, Lookup(table, space.search, noise), budget,
                      (space.scheduler.grace_period, space.scheduler.reduction_factor), clock,
                      args.startup_trials or dataclasses.replace(space, num_samples=args.trials).startup_trials)
    started = time.perf_counter()
    jobs = [(setting, name, c, args.repeats) for c in args.concurrency for name in SEARCHERS]
    with multiprocessing.Pool(args.processes) as pool:
        runs = {(name, c): found for name, c, found in pool.map(_runs, jobs)}
    summary = summarise(table, runs, budget, args.concurrency, clock)
    regret, by_wall = summary.pop("_regret"), summary.pop("_wall")
    summary.update({"table": str(args.table), "joint": str(args.joint) if args.joint else None,
                    "configurations": len(table.params), "seeds": table.curves.shape[1], "epochs": table.epochs,
                    "repeats": args.repeats, "budget_trial_epochs": budget, "startup_s": args.startup_s,
                    "epoch_s": args.epoch_s, "tpe_startup_trials": setting.startup,
                    "rung_spearman": rung_correlations(table), "seed_noise_curves": len(noise),
                    "best_configuration_AP": float(table.final_means().max()),
                    "worst_configuration_AP": float(table.final_means().min()),
                    "replay_s": time.perf_counter() - started})
    _print(summary, args.concurrency)
    _write(args.out, summary, regret, by_wall, budget)
    return 0


def _print(summary: dict, concurrencies: list[int]) -> None:
    print(f"{summary['configurations']} configurations, {summary['epochs']} epochs; {summary['repeats']} repeats; "
          f"budget {summary['budget_trial_epochs']} trial-epochs; start-up {summary['startup_s']} s, epoch {summary['epoch_s']} s; "
          f"target regret {summary['target_regret']:.3f}")
    print(f"{'searcher':<24}{'final regret':>14}{'reached':>9}{'speed-up, compute':>22}{'speed-up, wall-clock':>24}{'p vs random':>13}")
    for name, found in summary["searchers"].items():
        iqr_c, iqr_w = found["speedup_compute_iqr"], found["speedup_wall_iqr"]
        p = found["wilcoxon_vs_random_p"]
        print(f"{name:<24}{found['final_regret_median']:>14.3f}{found['reached_target']:>9.0%}"
              f"{found['speedup_compute_median']:>9.2f} [{iqr_c[0]:.2f}, {iqr_c[1]:.2f}]"
              f"{found['speedup_wall_median']:>11.2f} [{iqr_w[0]:.2f}, {iqr_w[1]:.2f}]{(f'{p:.2g}' if p is not None else '-'):>13}")
    for c in concurrencies:
        p = summary.get(f"friedman_p_concurrency_{c}")
        print(f"Friedman over the searchers at concurrency {c}: p = {p:.2g}" if p is not None else "")
    print(f"replayed in {summary['replay_s']:.1f} s")


def _write(out: Path, summary: dict, regret: dict, by_wall: dict, budget: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    compute = np.arange(1, budget + 1)
    wall = np.array(summary["wall_clock_s"])
    concurrencies = sorted({c for _, c in regret})
    with (out / "curves.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["searcher", "concurrency", "axis", "x", "q25", "median", "q75"])
        for (name, c), runs in regret.items():
            for axis, xs, values in (("trial_epochs", compute, runs), ("wall_clock_s", wall, by_wall[(name, c)])):
                q25, median, q75 = np.percentile(values, [25, 50, 75], axis=0)
                writer.writerows([name, c, axis, f"{x:g}", f"{a:.4f}", f"{b:.4f}", f"{d:.4f}"] for x, a, b, d in zip(xs, q25, median, q75))
    fig, axes = plt.subplots(len(concurrencies), 2, figsize=(11, 4 * len(concurrencies)), squeeze=False)
    for row, c in enumerate(concurrencies):
        for column, (xs, data, label) in enumerate(((compute, regret, "trial-epochs spent"),
                                                    (wall / 60, by_wall, "simulated wall-clock (minutes)"))):
            axis = axes[row][column]
            for name in SEARCHERS:
                if (name, c) in data:
                    q25, median, q75 = np.percentile(data[(name, c)], [25, 50, 75], axis=0)
                    axis.plot(xs, median, label=name)
                    axis.fill_between(xs, q25, q75, alpha=0.12)
            axis.axhline(summary["target_regret"], color="gray", linestyle="--", linewidth=1, label="target")
            axis.set_xlabel(label)
            axis.set_ylabel("normalised regret")
            axis.set_yscale("symlog", linthresh=0.05)
            axis.set_title(f"concurrency {c}: median and quartiles over {summary['repeats']} repeats", fontsize=9)
            axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=80)
    plt.close(fig)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    sys.exit(main())
