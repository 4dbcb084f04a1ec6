"""The driver of a sweep: owns the local Ray (or joins a cluster), the teacher, and the Tuner."""
from __future__ import annotations

import json
import os
from pathlib import Path

import optuna
import ray
from ray import tune
from ray.air.integrations.wandb import WandbLoggerCallback
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.util.queue import Queue

from dmkd.errors import UserError
from dmkd.io import atomic_write_json, read_json
from dmkd.provenance import provenance
from dmkd.synthetic import ensure_mini_benchmark
from orchestrator.results import leaderboard, trial_rows, write_results
from orchestrator.rows import TrialSetup
from orchestrator.searcher import PruningAwareOptunaSearch
from orchestrator.space import define_by_run, describe, paper_default_point
from orchestrator.trial import ATTENTION_PNG, flat_run_config, run_name, run_trial, trial_dirname, trial_train_config

WANDB_UPLOAD_TIMEOUT_S = 30  # Ray's default of 1800 s kept an interrupted sweep waiting for minutes


class _SendOnlyQueue(Queue):
    """A trial's W&B queue whose ``put`` sends and does not wait. Ray's waits for the queue actor's reply,
    and the first reply waits for that actor's process to start: 1.5-7 s of a stalled driver per trial
    (measured with py-spy). The queue is unbounded and one caller's actor calls run in order, so nothing
    is lost or reordered by not waiting."""

    def put(self, item, block: bool = True, timeout: float | None = None) -> None:
        self.actor.put_nowait.remote(item)


class DMKDWandbCallback(WandbLoggerCallback):
    """One W&B run per trial: the trial's full resolved config as flat keys (``flat_run_config``), a
    readable name, tags per method, row and seed; at the full budget, Δ AP against the undistilled
    student of the same seed (when the reference is known); the attention/mask PNG that the trial's
    last checkpoint holds (local storage only)."""

    def __init__(self, *args, space, setup, reference_file: Path | None, rows: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._space, self._setup, self._rows = space, setup, rows or {}
        self._reference_file, self._reference = reference_file, None
        self._versions = provenance()
        self._seeds: dict = {}

    def log_trial_start(self, trial):
        config = dict(trial.config or {})
        row = config.get("row")
        cfg = trial_train_config(config, space=self._space, setup=self._setup, rows=self._rows)
        self._seeds[trial] = cfg.seed
        # resume "allow": a trial continued by a resumed sweep continues its W&B run (Ray's callback asks for
        # resume=False, which starts the run with that id over)
        self.kwargs.update(tags=[cfg.method, f"variant:{row or cfg.method}", f"seed:{cfg.seed}"], name=run_name(cfg, row),
                           config=flat_run_config(cfg, space=self._space, row=row, versions=self._versions),
                           resume="allow")
        super().log_trial_start(trial)
        self._trial_queues[trial].__class__ = _SendOnlyQueue  # same object and actor, a put that does not wait

    def _reference_final(self, seed) -> dict | None:
        if self._reference is None and self._reference_file is not None and self._reference_file.is_file():
            self._reference = json.loads(self._reference_file.read_text())
        return ((self._reference or {}).get(str(seed)) or {}).get("final")

    def log_trial_result(self, iteration, trial, result):
        extra = {}
        value = result.get("val/AP")
        if isinstance(value, (int, float)):
            reference = self._reference_final(self._seeds.get(trial))
            if reference and result.get("epoch") == self._space.budget.epochs == reference.get("epoch"):
                extra["val/delta_AP"] = value - reference["val/AP"]
        path = result.get("checkpoint_path")
        if path and os.path.isfile(os.path.join(path, ATTENTION_PNG)):
            import wandb

            extra["attention"] = wandb.Image(os.path.join(path, ATTENTION_PNG))
        super().log_trial_result(iteration, trial, {**result, **extra})

    def on_experiment_end(self, trials, **info):
        """Ray's callback waits up to ``upload_timeout`` for the W&B actors of all trials, but only the
        trials that ended were told to finish: after Ctrl-C the running trials' actors waited the timeout
        out (30 s more before the sweep stopped) and were killed with their records unwritten. Every open
        run is told to finish first."""
        for trial in list(self._trial_logging_actors):
            self._signal_logging_actor_stop(trial=trial)
        super().on_experiment_end(trials, **info)

    def __del__(self):
        try:
            super().__del__()
        except AttributeError:  # interpreter exit: Ray's module globals are gone; on_experiment_end cleaned up
            pass


class StatusTable(tune.CLIReporter):
    """Tune's status table with the columns a user of a sweep looks at: the searched parameters (or an
    ablation's row and seed), the epoch, val AP now and at the trial's best epoch, the objective, and
    the best trial so far; ``header`` names what runs (method and pair)."""

    def __init__(self, header: str, objective, parameters: list[str]):
        metrics = {"epoch": "epoch", "val/AP": "val AP", "val/AP_best": "best val AP"}
        for metric in (objective.metric, objective.second_metric):
            if metric and metric not in metrics:
                metrics[metric] = metric
        super().__init__(metric_columns=metrics, parameter_columns=parameters, metric=objective.metric,
                         mode=objective.mode, max_report_frequency=30, max_column_length=12)
        self._header = header

    def report(self, trials, done, *sys_info):
        super().report(trials, done, self._header, *sys_info)


def tune_callbacks(*extra) -> list:
    """Tune's JSON and CSV loggers (result.json and progress.csv, which the results read) and
    ``extra``; start_ray turns off the automatic loggers, whose TensorBoard files nothing here reads."""
    return [JsonLoggerCallback(), CSVLoggerCallback(), *extra]


def data_paths(space) -> dict:
    d = space.data
    if d.train_ann:
        paths = {"train_ann": d.train_ann, "train_images": d.train_images, "val_ann": d.val_ann, "val_images": d.val_images}
        if d.test_ann:
            paths.update(test_ann=d.test_ann, test_images=d.test_images)
        for key, value in paths.items():
            if not Path(value).exists():
                raise UserError(f"data.{key}: {value}: not found")
        return {k: str(Path(v).resolve()) for k, v in paths.items()}
    return ensure_mini_benchmark(Path(d.mini_dir).resolve())


def was_interrupted(result_grid) -> bool:
    """Tune returns normally when Ctrl-C stops an experiment: trials that neither finished nor failed
    mean it was interrupted."""
    return result_grid.num_terminated + result_grid.num_errors < len(result_grid)


def check_finished(result_grid, what: str) -> None:
    """Nothing may be taken as final from an interrupted Tune run."""
    if was_interrupted(result_grid):
        raise KeyboardInterrupt(f"{what} was interrupted")


def write_reference(experiment: Path, references: dict) -> None:
    """The experiment's copy of its reference rows (the report reads only the experiment folder)."""
    if references:
        atomic_write_json(experiment / "reference.json", {str(seed): found for seed, found in references.items()})


def wandb_callback(space, experiment: Path, mode: str, *, setup: TrialSetup, reference_file: Path | None,
                   job_type: str = "sweep", rows: dict | None = None):
    if mode == "off":
        return []
    return [DMKDWandbCallback(project=space.wandb.project, entity=space.wandb.entity, group=space.pair_name,
                              job_type=job_type, upload_timeout=WANDB_UPLOAD_TIMEOUT_S, log_config=False,
                              dir=str(experiment), space=space, setup=setup, reference_file=reference_file, rows=rows)]


def wandb_env(mode: str, experiment: Path, storage: str) -> dict:
    """W&B settings for the driver and, through Ray's runtime environment, every worker."""
    env = {"WANDB_MODE": "disabled" if mode == "off" else mode, "WANDB_SILENT": "true",
           # a trial may wait for the CPUs of a trial that the scheduler just stopped
           "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")}
    if mode != "off" and "://" not in storage:
        env["WANDB_DIR"] = str(experiment)
    return env


def teacher_cache(storage: str):
    """Where trained teachers are cached: STORAGE/teachers (a string for a cloud URI, refused there)."""
    return f"{storage.rstrip('/')}/teachers" if "://" in storage else Path(storage) / "teachers"


def start_ray(address: str | None, space, env_vars: dict) -> None:
    # The legacy output engine: the only one whose status table takes chosen columns (StatusTable).
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"  # tune_callbacks adds the two loggers we read
    if ray.is_initialized():
        return
    runtime_env = {"env_vars": env_vars}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
        return
    # Each trial's driver function holds one CPU while its Train workers hold theirs: count them on top.
    # The dashboard stays on: Ray Train's placement-group cleaner asks the state API whether a stopped
    # trial's controller is gone; without it, the CPUs of every trial ASHA stops stay reserved.
    num_cpus = (os.cpu_count() or 1) + space.max_concurrent
    # Ray Train watches for node preemption (spot instances) with one more actor process per trial; on
    # the one machine this Ray runs on there is nothing to preempt. Measured on 2 cores: the tuned-ablation
    # test 258 s against 284 s with it (BENCHMARKS.md). A user's own setting wins.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    ray.init(num_cpus=num_cpus, runtime_env=runtime_env, log_to_driver=False)


def build_tuner(space, name: str, storage: str, setup: TrialSetup, wandb_mode: str, job_type: str = "sweep",
                reference_file: Path | None = None, sampler_seed: int | None = None):
    """The Tuner of a sweep (``reference_file``, default the experiment's reference.json, gives the
    W&B runs their Δ AP; ``sampler_seed``, default the space's seed, seeds TPE). Its trials select, so
    they never evaluate the test split."""
    setup = setup.without_test()
    experiment = Path(storage) / name if "://" not in storage else None
    trainable = tune.with_parameters(run_trial, space=space, setup=setup)
    path = f"{storage.rstrip('/')}/{name}"
    if tune.Tuner.can_restore(path):
        print(f"sweep: continuing {path}", flush=True)
        return tune.Tuner.restore(path, trainable=trainable, resume_errored=True, resume_unfinished=True)
    objective = space.objective
    metrics = [objective.metric] + ([objective.second_metric] if objective.second_metric else [])
    modes = [objective.mode] + ([objective.second_mode] if objective.second_metric else [])
    study_storage = None
    if experiment is not None:
        experiment.mkdir(parents=True, exist_ok=True)
        study_storage = optuna.storages.RDBStorage(f"sqlite:///{experiment / 'optuna.db'}")
    point = paper_default_point(space)
    searcher = PruningAwareOptunaSearch(
        space=define_by_run(space), metric=metrics if len(metrics) > 1 else metrics[0],
        mode=modes if len(modes) > 1 else modes[0], points_to_evaluate=[point] if point else None,
        sampler=PruningAwareOptunaSearch.tpe(space.seed if sampler_seed is None else sampler_seed, space.startup_trials),
        storage=study_storage, study_name=name, full_epochs=space.budget.epochs, startup_trials=space.startup_trials)
    if space.scheduler.type == "asha":
        scheduler = ASHAScheduler(time_attr="epoch", metric=objective.metric, mode=objective.mode,
                                  max_t=space.budget.epochs, grace_period=space.scheduler.grace_period,
                                  reduction_factor=space.scheduler.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=ConcurrencyLimiter(searcher, max_concurrent=space.max_concurrent),
                                    scheduler=scheduler, num_samples=space.num_samples,
                                    trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(name=name, storage_path=storage,
                                  callbacks=tune_callbacks(*wandb_callback(
                                      space, experiment or Path("."), wandb_mode, setup=setup, job_type=job_type,
                                      reference_file=reference_file or (experiment and experiment / "reference.json"))),
                                  progress_reporter=StatusTable(f"{job_type}: {space.method}, {space.pair_name}",
                                                                objective, list(space.search)),
                                  failure_config=tune.FailureConfig(max_failures=0), verbose=1),
    )


def run_sweep(space, *, name: str, storage: str, wandb_mode: str, address: str | None, resume: bool, record: dict) -> dict:
    from orchestrator.experiment import open_experiment

    experiment = Path(storage) / name
    if resume and not tune.Tuner.can_restore(f"{storage.rstrip('/')}/{name}"):
        raise UserError(f"--resume: no sweep to continue at {storage.rstrip('/')}/{name}")
    distills = space.method != "none"
    with open_experiment(space, name=name, storage=storage, wandb_mode=wandb_mode, address=address, distills=distills,
                         reference_seeds=[space.seed] if distills and space.reference else []) as opened:
        tuner = build_tuner(space, name, storage, opened.setup, wandb_mode)
        if opened.local:
            atomic_write_json(experiment / "sweep.json", {**record, "teacher_checkpoint": opened.teacher, "data": opened.paths})
        result_grid = tuner.fit()
    rows = trial_rows(result_grid, space)
    best = write_results(rows, experiment, space) if "://" not in storage else None
    print("\n" + leaderboard(rows, space))
    if best is not None:
        params = ", ".join(f"{k.split('/', 1)[1]}={v:.4g}" if isinstance(v, float) else f"{k.split('/', 1)[1]}={v}"
                           for k, v in best.items() if k.startswith("param/") and v is not None)
        print(f"\nbest: {best['trial']}  {space.objective.metric}={best[space.objective.metric]:.4f}  {params}")
        print(f"results: {experiment / 'results.csv'}, {experiment / 'best.json'}")
    if "://" not in storage:
        from orchestrator.report import sweep_search, write_report

        search = sweep_search(experiment, describe(space))
        atomic_write_json(experiment / "sweep.json", {**read_json(experiment / "sweep.json", "sweep record"), "search": search})
        print(f"search: {search['label']}")
        print(f"report: {write_report(experiment)}")
    if wandb_mode == "offline":
        print(f"wandb: offline runs under {experiment / 'wandb'}; upload them with `wandb sync {experiment / 'wandb'}/offline-run-*`")
    interrupted = was_interrupted(result_grid)
    if interrupted:
        print("sweep: interrupted before every trial finished; rerun the same command to continue", flush=True)
    finished = [r for r in rows if r["status"] in ("completed", "stopped early")]
    completed = not interrupted and len(finished) == len(rows) and len(rows) == space.num_samples
    return {"rows": rows, "best": best, "completed": completed}


