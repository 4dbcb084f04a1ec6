"""Reading sweeps whose trials ran for different numbers of epochs, on hand-made trial records."""
import pytest

from orchestrator.report.fidelity import common_epoch, importances_at, rung_validity, value_at
from orchestrator.report.records import StoredTrial


def _trial(values: list[float], error=None, **config) -> StoredTrial:
    """A trial that reported val/AP ``values`` after epochs 1, 2, ..."""
    return StoredTrial("t", config, [{"epoch": i + 1, "val/AP": v} for i, v in enumerate(values)], error)


def test_value_at_reads_one_epoch_only():
    trial = _trial([0.1, 0.3])
    assert value_at(trial.history, "val/AP", 2) == 0.3 and value_at(trial.history, "val/AP", 3) is None


def test_common_epoch_is_the_largest_that_enough_trials_reached():
    trials = [_trial([0.1, 0.2, 0.3])] * 3 + [_trial([0.1])] * 6
    assert common_epoch(trials, "val/AP", enough=8) == (1, 9)
    assert common_epoch(trials, "val/AP", enough=3) == (3, 3)
    assert common_epoch(trials[:2], "val/AP", enough=8) == (3, 2)  # fewer trials than 'enough': all of them
    assert common_epoch([_trial([])], "val/AP") == (None, 0)


def test_rung_validity_tells_a_faithful_rung_from_a_noisy_one():
    # five trials completed 3 epochs; two were stopped at epoch 1
    faithful = [_trial([0.1 * i, 0.15 * i, 0.2 * i]) for i in range(1, 6)] + [_trial([0.05]), _trial([0.02])]
    (rung,) = rung_validity(faithful, 3, "val/AP")
    assert rung == {"epoch": 1, "stopped": 2, "completed": 5, "spearman": pytest.approx(1.0), "warning": None}

    reversed_ = [_trial([0.1 * (6 - i), 0.15 * i, 0.2 * i]) for i in range(1, 6)] + [_trial([0.05])]
    (rung,) = rung_validity(reversed_, 3, "val/AP")
    assert rung["spearman"] == pytest.approx(-1.0) and "raise scheduler.grace_period" in rung["warning"]

    few = [_trial([0.1, 0.2, 0.3]), _trial([0.2, 0.1, 0.4]), _trial([0.05]), _trial([0.3, 0.3], error="boom")]
    (rung,) = rung_validity(few, 3, "val/AP")
    assert rung["spearman"] is None and rung["completed"] == 2 and "too few" in rung["warning"]
    assert rung_validity([_trial([0.1, 0.2, 0.3])] * 4, 3, "val/AP") == []  # nothing stopped: no rung


SEARCH = {"alpha": {"type": "loguniform", "low": 1e-8, "high": 1e-4},
          "temperature": {"type": "uniform", "low": 0.2, "high": 1.0}}


def test_importances_use_one_epoch_and_need_enough_trials():
    # AP at epoch 1 follows alpha only; the (stopped) trials' temperature is noise
    trials = []
    for i in range(10):
        alpha, temperature = 10 ** (-8 + 0.4 * i), 0.2 + 0.8 * ((i * 7) % 10) / 10
        trials.append(_trial([0.05 * i] + ([0.9 - 0.05 * i] if i < 3 else []), alpha=alpha, temperature=temperature))
    found, reason = importances_at(trials, SEARCH, "val/AP", 1)
    assert reason is None and found["alpha"] > 2 * found["temperature"]

    found, reason = importances_at(trials, SEARCH, "val/AP", 2)  # only 3 trials reached epoch 2
    assert found == {} and reason == "importances skipped: 3 trials reached epoch 2, fewer than 8"
