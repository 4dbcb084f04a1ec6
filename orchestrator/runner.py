"""The driver of a sweep: owns the local Ray (or joins a cluster), the teacher, and the Tuner."""
from __future__ import annotations

import os
from pathlib import Path

import optuna
import ray
from ray import tune
from ray.air.integrations.wandb import WandbLoggerCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import ConcurrencyLimiter

from dmkd.errors import UserError
from dmkd.io import atomic_write_json
from dmkd.synthetic import ensure_mini_benchmark
from orchestrator.reference import ensure_references, reference_cache
from orchestrator.results import leaderboard, trial_rows, write_results
from orchestrator.searcher import PruningAwareOptunaSearch
from orchestrator.space import define_by_run, paper_default_point
from orchestrator.teacher import ensure_teacher, evaluate_teacher
from orchestrator.trial import ATTENTION_PNG, run_trial, trial_dirname

WANDB_UPLOAD_TIMEOUT_S = 30  # Ray's default of 1800 s kept an interrupted sweep waiting for minutes


class DMKDWandbCallback(WandbLoggerCallback):
    """One W&B run per trial, tagged per trial (an ablation's row and seed), with the attention/mask PNG
    that the trial's last checkpoint holds (local storage only)."""

    def __init__(self, *args, rows: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._rows = rows or {}
        self._base_tags = list(kwargs.get("tags", []))

    def log_trial_start(self, trial):
        config = trial.config or {}
        if "row" in config and config["row"] in self._rows:
            method = self._rows[config["row"]]["method"]
            self.kwargs["tags"] = [method, f"variant:{config['row']}", f"seed:{config.get('seed')}"]
        else:
            self.kwargs["tags"] = self._base_tags
        super().log_trial_start(trial)

    def log_trial_result(self, iteration, trial, result):
        path = result.get("checkpoint_path")
        if path and os.path.isfile(os.path.join(path, ATTENTION_PNG)):
            import wandb

            result = {**result, "attention": wandb.Image(os.path.join(path, ATTENTION_PNG))}
        super().log_trial_result(iteration, trial, result)


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


def check_finished(result_grid, what: str) -> None:
    """Tune returns normally when Ctrl-C stops an experiment; trials that neither finished nor failed
    mean it was interrupted, and nothing may be taken from it as final."""
    if result_grid.num_terminated + result_grid.num_errors < len(result_grid):
        raise KeyboardInterrupt(f"{what} was interrupted")


def write_reference(experiment: Path, references: dict) -> None:
    """The experiment's copy of its reference rows (the report reads only the experiment folder)."""
    if references:
        atomic_write_json(experiment / "reference.json", {str(seed): found for seed, found in references.items()})


def wandb_callback(space, experiment: Path, mode: str, job_type: str = "sweep", rows: dict | None = None):
    if mode == "off":
        return []
    return [DMKDWandbCallback(project=space.wandb.project, entity=space.wandb.entity, group=space.pair_name,
                              tags=[space.method, f"variant:{space.method}", f"seed:{space.seed}"], job_type=job_type,
                              upload_timeout=WANDB_UPLOAD_TIMEOUT_S, log_config=False, dir=str(experiment), rows=rows)]


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
    ray.init(num_cpus=num_cpus, runtime_env=runtime_env, log_to_driver=False)


def build_tuner(space, name: str, storage: str, setup: dict, wandb_mode: str, resume: bool, job_type: str = "sweep"):
    experiment = Path(storage) / name if "://" not in storage else None
    trainable = tune.with_parameters(run_trial, space=space, setup=setup)
    path = f"{storage.rstrip('/')}/{name}"
    if tune.Tuner.can_restore(path):
        print(f"sweep: continuing {path}", flush=True)
        return tune.Tuner.restore(path, trainable=trainable, resume_errored=True, resume_unfinished=True)
    if resume:
        raise UserError(f"--resume: no sweep to continue at {path}")
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
        sampler=optuna.samplers.TPESampler(seed=space.seed), storage=study_storage, study_name=name,
        full_epochs=space.budget.epochs)
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
                                  callbacks=wandb_callback(space, experiment or Path("."), wandb_mode, job_type=job_type),
                                  failure_config=tune.FailureConfig(max_failures=0), verbose=1),
    )


def run_sweep(space, *, name: str, storage: str, wandb_mode: str, address: str | None, resume: bool, record: dict) -> dict:
    experiment = Path(storage) / name
    env_vars = wandb_env(wandb_mode, experiment, storage)
    os.environ.update(env_vars)
    paths = data_paths(space)
    start_ray(address, space, env_vars)
    try:
        teacher = ensure_teacher(space, paths, teacher_cache(storage)) if space.method != "none" else None
        setup = {"teacher_checkpoint": teacher, "data_paths": paths, "train_storage": f"{storage.rstrip('/')}/{name}/train",
                 "env_vars": env_vars}
        tuner = build_tuner(space, name, storage, setup, wandb_mode, resume)
        if "://" not in storage:
            atomic_write_json(experiment / "sweep.json", {**record, "teacher_checkpoint": teacher, "data": paths})
            if teacher and not (experiment / "teacher.json").is_file():
                atomic_write_json(experiment / "teacher.json", evaluate_teacher(space, paths, teacher))
            if space.method != "none" and space.reference:
                write_reference(experiment, ensure_references(space, [space.seed], setup, reference_cache(storage)))
        result_grid = tuner.fit()
    finally:
        if address is None:
            ray.shutdown()
    rows = trial_rows(result_grid, space)
    best = write_results(rows, experiment, space) if "://" not in storage else None
    print("\n" + leaderboard(rows, space))
    if best is not None:
        params = ", ".join(f"{k.split('/', 1)[1]}={v:.4g}" if isinstance(v, float) else f"{k.split('/', 1)[1]}={v}"
                           for k, v in best.items() if k.startswith("param/") and v is not None)
        print(f"\nbest: {best['trial']}  {space.objective.metric}={best[space.objective.metric]:.4f}  {params}")
        print(f"results: {experiment / 'results.csv'}, {experiment / 'best.json'}")
    if "://" not in storage:
        from orchestrator.report import write_report

        print(f"report: {write_report(experiment)}")
    if wandb_mode == "offline":
        print(f"wandb: offline runs under {experiment / 'wandb'}; upload them with `wandb sync {experiment / 'wandb'}/offline-run-*`")
    # Ctrl-C makes Tune return normally: a trial that neither finished nor failed means the sweep is unfinished
    interrupted = result_grid.num_terminated + result_grid.num_errors < len(result_grid)
    if interrupted:
        print("sweep: interrupted before every trial finished; rerun the same command to continue", flush=True)
    finished = [r for r in rows if r["status"] in ("completed", "stopped early")]
    completed = not interrupted and len(finished) == len(rows) and len(rows) == space.num_samples
    return {"rows": rows, "best": best, "completed": completed}


