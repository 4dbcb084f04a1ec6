"""Reading a sweep whose trials ran for different numbers of epochs (ASHA stopped some) without mixing
budgets: the largest epoch enough trials reached, parameter importances at that one epoch, and whether
the epochs at which trials were stopped rank trials the way the last epoch does."""
from __future__ import annotations

import math

import optuna

from orchestrator.report.records import StoredTrial

MIN_TRIALS_FOR_IMPORTANCES = 8  # fANOVA over fewer points describes the sampler, not the parameters
MIN_TRIALS_FOR_RUNG_CHECK = 5  # a rank correlation over fewer completed trials says little
RUNG_WARNING_BELOW = 0.5


def value_at(history: list[dict], metric: str, epoch: int | None):
    """``metric`` as reported after ``epoch``; None if the trial did not report it then."""
    for entry in history:
        if entry.get("epoch") == epoch and isinstance(entry.get(metric), (int, float)):
            return entry[metric]
    return None


def common_epoch(trials: list[StoredTrial], metric: str, enough: int = MIN_TRIALS_FOR_IMPORTANCES) -> tuple[int | None, int]:
    """The largest epoch at which at least ``enough`` trials (or all of them, when fewer ran) reported
    ``metric``, and how many did; (None, 0) when none reported it."""
    reached: dict[int, int] = {}
    for trial in trials:
        for entry in trial.history:
            if isinstance(entry.get(metric), (int, float)) and isinstance(entry.get("epoch"), int):
                reached[entry["epoch"]] = reached.get(entry["epoch"], 0) + 1
    if not reached:
        return None, 0
    wanted = min(enough, max(reached.values()))
    epoch = max(e for e, count in reached.items() if count >= wanted)
    return epoch, reached[epoch]


def _spearman(pairs: list[tuple[float, float]]) -> float | None:
    from scipy import stats  # here: 0.6 s to import, for a check that needs five completed trials

    rho = stats.spearmanr([p[0] for p in pairs], [p[1] for p in pairs]).statistic
    return None if rho is None or math.isnan(rho) else float(rho)


def rung_validity(trials: list[StoredTrial], budget: int, metric: str) -> list[dict]:
    """For every epoch at which the scheduler stopped trials (a rung): the Spearman correlation between
    ``metric`` at that epoch and at the full budget, over the trials that completed the budget, with a
    one-line warning when it is below 0.5 or rests on too few trials."""
    finished = [t for t in trials if not t.failed(budget) and t.history]
    stopped: dict[int, int] = {}
    for trial in finished:
        last = trial.last.get("epoch")
        if isinstance(last, int) and last < budget:
            stopped[last] = stopped.get(last, 0) + 1
    completed = [t for t in finished if t.last.get("epoch") == budget]
    found = []
    for rung in sorted(stopped):
        pairs = [(value_at(t.history, metric, rung), value_at(t.history, metric, budget)) for t in completed]
        pairs = [p for p in pairs if p[0] is not None and p[1] is not None]
        rho = _spearman(pairs) if len(pairs) >= MIN_TRIALS_FOR_RUNG_CHECK else None
        warning = None
        if len(pairs) < MIN_TRIALS_FOR_RUNG_CHECK:
            warning = (f"too few trials completed the budget ({len(pairs)} < {MIN_TRIALS_FOR_RUNG_CHECK}) to say whether "
                       f"epoch {rung} ranks trials like epoch {budget}")
        elif rho is None:
            warning = f"{metric} did not vary at epoch {rung} or {budget}: no ranking to compare"
        elif rho < RUNG_WARNING_BELOW:
            warning = (f"{metric} at epoch {rung} ranks trials unlike epoch {budget} (Spearman {rho:.2f} < "
                       f"{RUNG_WARNING_BELOW}): stopping there cuts trials on noise; raise scheduler.grace_period")
        found.append({"epoch": rung, "stopped": stopped[rung], "completed": len(pairs), "spearman": rho,
                      "warning": warning})
    return found


def _distribution(spec: dict):
    kind = spec["type"]
    if kind in ("uniform", "loguniform"):
        return optuna.distributions.FloatDistribution(spec["low"], spec["high"], log=kind == "loguniform")
    if kind == "int":
        return optuna.distributions.IntDistribution(int(spec["low"]), int(spec["high"]))
    return optuna.distributions.CategoricalDistribution(list(spec["choices"]))


def importances_at(trials: list[StoredTrial], search: dict, metric: str, epoch: int | None) -> tuple[dict, str | None]:
    """fANOVA importances (Optuna's, seeded) of the searched parameters for ``metric`` at one ``epoch``, over
    every trial that reported it then (stopped trials included); ({}, reason) when they cannot be told."""
    if epoch is None:
        return {}, "no trial reported a result"
    distributions = {name: _distribution(spec) for name, spec in search.items()}
    points = []
    for trial in trials:
        value = value_at(trial.history, metric, epoch)
        params = {k: v for k, v in trial.config.items() if k in distributions}
        if value is not None and params:
            points.append(optuna.trial.create_trial(params=params, value=float(value),
                                                    distributions={k: distributions[k] for k in params}))
    if len(points) < MIN_TRIALS_FOR_IMPORTANCES:
        return {}, (f"importances skipped: {len(points)} trials reached epoch {epoch}, fewer than "
                    f"{MIN_TRIALS_FOR_IMPORTANCES}")
    if len(distributions) < 2:
        return {}, "importances skipped: one parameter searched"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study()
    study.add_trials(points)
    try:  # fANOVA, seeded: Optuna's default (PED-ANOVA) looks at the top 10 %, one trial of ten
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        return dict(optuna.importance.get_param_importances(study, evaluator=evaluator)), None
    except (RuntimeError, ValueError) as error:
        return {}, f"importances skipped: {error}"
