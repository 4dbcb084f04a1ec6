"""The statistics of a report: mean, spread and Student-t confidence interval over seeds; differences
paired by seed with the paired t-test; Holm's correction over the comparisons one table makes."""
from __future__ import annotations

import math
import statistics

SIGNIFICANCE = 0.05  # a paired difference whose Holm-adjusted p is >= this is marked "n.s."


def summarize(values: list[float]) -> dict:
    """Mean, sample standard deviation and the 95 % confidence half-width (Student t) of ``values``."""
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "ci95": None}
    mean = statistics.fmean(values)
    if n == 1:
        return {"n": 1, "mean": mean, "std": None, "ci95": None}
    std = statistics.stdev(values)
    from scipy import stats  # here: 0.6 s to import, and a sweep's driver loads this module without needing it

    return {"n": n, "mean": mean, "std": std, "ci95": float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)}


def paired_difference(values: dict, baseline: dict) -> dict:
    """``values - baseline`` paired by seed (the seeds both have): the mean difference, its 95 % CI
    half-width and the two-sided p-value of the paired t-test (Student t, n - 1 degrees of freedom).

    When every seed moved by exactly the same amount the t statistic is undefined: the p-value is then
    the exact sign-flip test's (each of the 2^n sign patterns equally likely under no difference; only
    the two of equal signs are as extreme), ``test`` says so, and the CI is left out."""
    seeds = sorted(set(values) & set(baseline))
    differences = [values[seed] - baseline[seed] for seed in seeds]
    found = {**summarize(differences), "seeds": seeds, "p": None, "p_holm": None, "significant": None,
             "test": "paired t"}
    n = found["n"]
    if n < 2:
        return found
    if found["std"] == 0:
        found.update(p=1.0 if found["mean"] == 0 else 2.0 ** (1 - n), ci95=None, test="exact sign-flip (identical differences)")
    else:
        from scipy import stats

        t = found["mean"] / (found["std"] / math.sqrt(n))
        found["p"] = float(2 * stats.t.sf(abs(t), n - 1))
    found["significant"] = found["p"] < SIGNIFICANCE
    return found


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment of ``p_values`` (one family of tests): the k-th smallest is multiplied
    by (m - k + 1), kept monotone, capped at 1. It controls the chance of any false claim in the family."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted = [1.0] * len(p_values)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def correct_family(comparisons: list[dict]) -> None:
    """Holm over every comparison given that has a p-value: each gets ``p_holm``, and ``significant``
    is decided by it."""
    tested = [c for c in comparisons if c is not None and c.get("p") is not None]
    for comparison, adjusted in zip(tested, holm([c["p"] for c in tested])):
        comparison["p_holm"] = adjusted
        comparison["significant"] = adjusted < SIGNIFICANCE
        comparison["family"] = len(tested)
