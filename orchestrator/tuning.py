"""Ray Tune as this project uses it: one factory for every Tuner (:func:`make_tuner`: a sweep's, an
ablation's, the reference rows'), which continues a stored run of the same name or starts a new one;
the Optuna searcher and the scheduler of a sweep; the status table; the loggers whose files the reports
read; and the rule that nothing of an interrupted run is final."""
from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import optuna
from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import ConcurrencyLimiter

from dmkd.metrics import BEST_VAL_AP, VAL_AP
from orchestrator.report.records import TRIAL_FOLDER, trial_folder
from orchestrator.searcher import PruningAwareOptunaSearch, close_lost_trials
from orchestrator.space import Objective, SweepSpace, define_by_run, paper_default_point
from orchestrator.storage import sqlite_url
from orchestrator.trial import trial_resources


class StatusTable(tune.CLIReporter):
    """Tune's status table with the columns a user of a sweep looks at: the searched parameters (or an
    ablation's row and seed), the epoch, val AP now and at the trial's best epoch, the objective, and
    the best trial so far; ``header`` names what runs (method and pair)."""

    def __init__(self, header: str, objective: Objective, parameters: list[str]):
        metrics = {"epoch": "epoch", VAL_AP: "val AP", BEST_VAL_AP: "best val AP"}
        for metric in (objective.metric, objective.second_metric):
            if metric and metric not in metrics:
                metrics[metric] = metric
        super().__init__(metric_columns=metrics, parameter_columns=parameters, metric=objective.metric,
                         mode=objective.mode, max_report_frequency=30, max_column_length=12)
        self._header = header

    def report(self, trials, done, *sys_info):
        super().report(trials, done, self._header, *sys_info)


def trial_dirname(trial) -> str:
    """Tune's trial folder: ``run_trial_<id>`` (Tune's default puts every parameter value in the name)."""
    return trial_folder(trial.trial_id)


def tune_callbacks(*extra) -> list:
    """Tune's JSON and CSV loggers (result.json and progress.csv, which the reports read) and ``extra``;
    ``experiment.start_ray`` turns off the automatic loggers, whose TensorBoard files nothing here reads."""
    return [JsonLoggerCallback(), CSVLoggerCallback(), *extra]


def make_tuner(trainable: Callable, *, space: SweepSpace, storage_path: str, name: str, header: str, columns: list[str],
               callbacks: list, param_space: dict | None = None, searcher: Callable | None = None,
               scheduler: TrialScheduler | None = None, num_samples: int = 1) -> tune.Tuner:
    """The Tuner of run ``name`` under ``storage_path`` (a folder or a cloud URI): the stored one,
    continued (errored and unfinished trials included), when it exists; else a new one, whose search
    ``searcher()`` builds (only then: building an Optuna search enqueues its first point in the study,
    which a continued run must not get twice). Each trial reserves what ``trial_resources`` says for
    ``space``; a one-worker trial that fails is restarted from its last checkpoint up to
    ``space.max_failures`` times (a Train worker group restarts its own workers, so Tune does not), and
    its process, imports done, trains the next trial that Tune gives it (``reuse_actors``).
    Trials report to the status table with ``columns`` under ``header`` and write what
    ``tune_callbacks`` keeps."""
    trainable = tune.with_resources(trainable, trial_resources(space))
    path = f"{storage_path}/{name}"
    if tune.Tuner.can_restore(path):
        print(f"{header.split(':')[0]}: continuing {path}", flush=True)
        return tune.Tuner.restore(path, trainable=trainable, resume_errored=True, resume_unfinished=True)
    search_alg = ConcurrencyLimiter(searcher(), max_concurrent=space.max_concurrent) if searcher is not None else None
    max_failures = 0 if space.resources.worker_group else space.max_failures
    return tune.Tuner(
        trainable, param_space=param_space,
        tune_config=tune.TuneConfig(search_alg=search_alg, scheduler=scheduler, num_samples=num_samples,
                                    max_concurrent_trials=None if search_alg is not None else space.max_concurrent,
                                    trial_dirname_creator=trial_dirname, reuse_actors=not space.resources.worker_group),
        run_config=tune.RunConfig(name=name, storage_path=storage_path, callbacks=tune_callbacks(*callbacks),
                                  progress_reporter=StatusTable(header, space.objective, columns),
                                  failure_config=tune.FailureConfig(max_failures=max_failures),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=2), verbose=1))


def build_searcher(space: SweepSpace, *, study_folder: Path | None, study_name: str,
                   sampler_seed: int | None = None) -> PruningAwareOptunaSearch:
    """Optuna's TPE over the space's search (seeded, its random start-up set by the space), the
    published setting first; the study in ``study_folder/optuna.db`` (in memory without a folder)."""
    objective = space.objective
    metrics = [objective.metric] + ([objective.second_metric] if objective.second_metric else [])
    modes = [objective.mode] + ([objective.second_mode] if objective.second_metric else [])
    storage = None
    if study_folder is not None:
        study_folder.mkdir(parents=True, exist_ok=True)
        storage = optuna.storages.RDBStorage(sqlite_url(study_folder / "optuna.db"))
    point = paper_default_point(space)
    sampler = PruningAwareOptunaSearch.tpe(space.seed if sampler_seed is None else sampler_seed, space.startup_trials)
    return PruningAwareOptunaSearch(
        space=define_by_run(space), metric=metrics if len(metrics) > 1 else metrics[0],
        mode=modes if len(modes) > 1 else modes[0], points_to_evaluate=[point] if point else None, sampler=sampler,
        storage=storage, study_name=study_name, full_epochs=space.budget.epochs, startup_trials=space.startup_trials)


def build_scheduler(space: SweepSpace) -> TrialScheduler:
    """ASHA on the objective by epoch, or none (every trial runs its whole budget)."""
    if space.scheduler.type != "asha":
        return FIFOScheduler()
    return ASHAScheduler(time_attr="epoch", metric=space.objective.metric, mode=space.objective.mode,
                         max_t=space.budget.epochs, grace_period=space.scheduler.grace_period,
                         reduction_factor=space.scheduler.reduction_factor)


def fit_tuner(tuner: tune.Tuner) -> tuple[tune.ResultGrid, bool]:
    """``tuner.fit()``, and whether Ctrl-C (SIGINT, or Tune's SIGUSR1) stopped it before its trials ended.
    Tune then saves its state and returns normally, with the trials it stopped marked TERMINATED like
    finished ones, so the result alone cannot tell. Tune's own SIGINT handler can: on a stop signal it
    puts back the handler it replaced; otherwise it stays installed after the run (Ray 2.60). Either way
    the handler from before is put back here, since a Tune handler left behind swallows the next Ctrl-C
    (during a report, or between an ablation's Tuners)."""
    main_thread = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGINT)
    try:
        result_grid = tuner.fit()
    finally:
        after = signal.getsignal(signal.SIGINT)
        if main_thread:
            signal.signal(signal.SIGINT, before)
    tune_catches = main_thread and not int(os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0"))
    stopped = tune_catches and after is before
    unended = result_grid.num_terminated + result_grid.num_errors < len(result_grid)  # trials never stopped
    return result_grid, stopped or unended


def set_aside_lost_trials(result_grid, folder: Path | None, study_name: str | None = None) -> None:
    """Trials Tune never recorded: a driver killed after Tune created a trial but before it saved its
    experiment state (every ``TUNE_GLOBAL_CHECKPOINT_S`` seconds) forgets the trial, and the continued run
    makes a new one in its place. Their folders in ``folder`` (a local storage) move to ``lost_trial_<id>``,
    kept but out of every table, and their trials in the study ``study_name`` (``folder/optuna.db``) are
    marked FAIL, ``lost``."""
    if folder is None:
        return
    known = {Path(result.path).name.removeprefix(TRIAL_FOLDER) for result in result_grid if result.path}
    lost = [f for f in sorted(folder.glob(f"{TRIAL_FOLDER}*")) if f.name.removeprefix(TRIAL_FOLDER) not in known]
    for stored in lost:
        stored.rename(folder / f"lost_trial_{stored.name.removeprefix(TRIAL_FOLDER)}")
    numbers = []
    if study_name is not None and (folder / "optuna.db").is_file():
        numbers = close_lost_trials(optuna.load_study(study_name=study_name, storage=sqlite_url(folder / "optuna.db")),
                                    known)
    if lost or numbers:
        print(f"{folder.name}: {len(lost)} trial folder(s) and {len(numbers)} study trial(s) of trials the stopped "
              f"driver created but Tune never recorded: folders moved to lost_trial_*, study trials marked lost",
              flush=True)


def check_finished(interrupted: bool, what: str) -> None:
    """Nothing may be taken as final from an interrupted Tune run (``interrupted``, from :func:`fit_tuner`)."""
    if interrupted:
        raise KeyboardInterrupt(f"{what} was interrupted")
