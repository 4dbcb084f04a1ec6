"""OptunaSearch that records a trial stopped early by the scheduler as PRUNED, not COMPLETE, and where
each trial's point came from.

Ray's integration tells Optuna COMPLETE with the short-budget value for a trial that ASHA stopped;
TPE then treats a 1-epoch AP as a finished result and the Optuna dashboard shows it as one. Here such a
trial is told PRUNED (Optuna keeps its last intermediate value), with the epoch it reached as a user
attribute.

TPE samples at random until ``n_startup_trials`` trials have finished (COMPLETE or PRUNED): a study that
never gets past them is random search, whatever the sampler's name. Each trial's user attribute
``origin`` says which it was: ``given`` (a point to evaluate first, e.g. the published default),
``random`` (TPE's start-up) or ``tpe`` (proposed by TPE's model); ``tune_trial_id`` names its Tune trial.
"""
from __future__ import annotations

import optuna
from optuna.samplers import TPESampler
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from orchestrator.report.search import LOST

TUNE_TRIAL_ID = "tune_trial_id"


class PruningAwareOptunaSearch(OptunaSearch):
    def __init__(self, *args, full_epochs: int, startup_trials: int, **kwargs):
        super().__init__(*args, **kwargs)
        self._full_epochs = full_epochs
        self._startup_trials = startup_trials  # the TPE sampler's n_startup_trials
        self._reported_epochs: dict[str, set[int]] = {}

    def suggest(self, trial_id: str):
        new = trial_id not in self._ot_trials
        if new:
            origin = self._next_origin()
        params = super().suggest(trial_id)
        if new and trial_id in self._ot_trials:
            self._ot_trials[trial_id].set_user_attr("origin", origin)
            self._ot_trials[trial_id].set_user_attr(TUNE_TRIAL_ID, trial_id)
        return params

    def _next_origin(self) -> str:
        """The origin of the point ``ask`` gives next: an enqueued point first; then TPE's own rule."""
        study = self._ot_study
        if study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            return "given"
        finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        return "tpe" if len(finished) >= self._startup_trials else "random"

    @staticmethod
    def tpe(seed: int, startup_trials: int) -> TPESampler:
        """The sampler every study here uses: seeded, with its random start-up set explicitly."""
        return TPESampler(seed=seed, n_startup_trials=startup_trials)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        """Intermediate values by epoch (not by Tune's iteration count, which grows on restarts)."""
        self._report(trial_id, result)

    def _finished_in_study(self, trial_id: str) -> bool:
        """Whether the study already holds this trial as finished: a sweep restored from an experiment
        state saved before the trial's end was recorded runs the trial's end again, and Optuna refuses
        to update a finished trial."""
        ot_trial = self._ot_trials[trial_id]
        stored = self._ot_study.get_trials(deepcopy=False)[ot_trial.number]
        if stored.state.is_finished():
            self._completed_trials.add(trial_id)
            return True
        return False

    def _report(self, trial_id: str, result: dict) -> None:
        if isinstance(self.metric, list) or trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        if self._finished_in_study(trial_id):
            return
        value, epoch = result.get(self.metric), result.get("epoch")
        reported = self._reported_epochs.setdefault(trial_id, set())
        if value is not None and epoch is not None and int(epoch) not in reported:
            self._ot_trials[trial_id].report(float(value), int(epoch))
            reported.add(int(epoch))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None and trial_id not in self._completed_trials and self._finished_in_study(trial_id):
            return
        if ot_trial is not None and trial_id not in self._completed_trials and result:
            epoch = int(result.get("epoch", 0) or 0)
            ot_trial.set_user_attr("epochs", epoch)
            if not error and epoch < self._full_epochs:
                self._report(trial_id, result)  # the scheduler's last result may not have come as a result
                metrics = self.metric if isinstance(self.metric, list) else [self.metric]
                ot_trial.set_user_attr("last_values", {m: result.get(m) for m in metrics})
                self._ot_study.tell(ot_trial, state=TrialState.PRUNED)
                self._completed_trials.add(trial_id)
                return
        super().on_trial_complete(trial_id, result=result, error=error)


def close_lost_trials(study: optuna.Study, known: set[str]) -> list[int]:
    """Mark FAIL, with user attribute ``lost``, the study's RUNNING trials whose Tune trial is not among
    ``known`` (the trials of the finished Tuner): Optuna holds a trial from the moment it is asked, Tune only
    from its next saved experiment state, so a driver killed in between leaves a study trial that nothing
    will ever end. Returns their numbers."""
    lost = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        tune_id = trial.user_attrs.get(TUNE_TRIAL_ID)
        if tune_id is not None and tune_id not in known:  # (no id: a study of an earlier version; left as is)
            optuna.trial.Trial(study, trial._trial_id).set_user_attr(LOST, True)
            study.tell(trial.number, state=TrialState.FAIL)
            lost.append(trial.number)
    return lost
