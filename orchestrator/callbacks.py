"""Weights & Biases: one run per trial (:class:`DMKDWandbCallback`, a Tune callback), named and
configured for people (:func:`run_name`, :func:`flat_run_config`), and the W&B settings of the driver
and of every worker (:func:`wandb_env`). Which mode a run logs in is the command line's
(``orchestrator.sweep.resolve_wandb_mode``)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import ray
import wandb
from ray.air.integrations.wandb import WandbLoggerCallback
from ray.util.queue import Queue

from dmkd.config import TrainConfig, to_dict
from dmkd.distillers import detector_family, method_settings, reading_notes, search_space
from dmkd.metrics import VAL_AP
from dmkd.provenance import provenance
from orchestrator.grid import Row
from orchestrator.space import SweepSpace
from orchestrator.trial import TrialSetup, trial_train_config
from orchestrator.trial_training import PICTURE_PNG
from orchestrator.wandb_logging import WandbLoggingActor

WANDB_UPLOAD_TIMEOUT_S = 30  # Ray's default of 1800 s kept an interrupted sweep waiting for minutes
PREVIOUS_ITEM_WAIT_S = 60  # the longest a W&B item waits for the one before it (see _SendOnlyQueue)


def wandb_env(mode: str, experiment: Path | None) -> dict:
    """W&B settings for the driver and, through Ray's runtime environment, every worker."""
    env = {"WANDB_MODE": "disabled" if mode == "off" else mode, "WANDB_SILENT": "true",
           # a trial may wait for the CPUs of a trial that the scheduler just stopped
           "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")}
    if mode != "off" and experiment is not None:  # offline runs beside the trials (a local storage only)
        env["WANDB_DIR"] = str(experiment)
    return env


def data_name(cfg: TrainConfig) -> str:
    return Path(cfg.data.train_ann).stem if cfg.data.train_ann else "mini-benchmark"


def flat_run_config(cfg: TrainConfig, *, space: SweepSpace, row: str | None, versions: dict) -> dict:
    """A trial as flat, stable keys: what a W&B workspace filters, groups and draws parallel
    coordinates by. ``versions`` is :func:`dmkd.provenance.provenance`'s record."""
    flat = {"method": cfg.method, "row": row or cfg.method, "seed": cfg.seed, "pair": space.pair_name,
            "data": data_name(cfg)}
    flat.update({f"distill.{k}": list(v) if isinstance(v, tuple) else v
                 for k, v in {**method_settings(cfg.method, detector_family(cfg.detector.arch)), **cfg.distill}.items()})
    for role, detector in (("teacher", cfg.teacher if cfg.method != "none" else None), ("student", cfg.detector)):
        if detector is not None:
            flat.update({f"{role}.{k}": v for k, v in to_dict(detector).items() if k != "num_classes"})
    flat.update({f"train.{k}": getattr(cfg, k) for k in ("epochs", "max_iters", "batch_size", "optimizer", "lr",
                                                         "weight_decay", "warmup_iters", "grad_clip", "amp")})
    flat["train.ddp_workers"] = space.resources.num_workers
    flat["git_commit"] = versions.get("git_commit")
    flat["python"] = versions.get("python")
    flat.update({f"version.{k}": v for k, v in versions.get("packages", {}).items()})
    return flat


def run_name(cfg: TrainConfig, row: str | None) -> str:
    """``dmkd alpha=2e-06 seed 0``: the row (or method), its first searchable parameter, the seed."""
    parts = [row or cfg.method]
    key = next(iter(search_space(cfg.method)), None)
    if key is not None:
        value = cfg.distill.get(key, method_settings(cfg.method, detector_family(cfg.detector.arch)).get(key))
        parts.append(f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}")
    parts.append(f"seed {cfg.seed}")
    return " ".join(parts)


class _SendOnlyQueue(Queue):
    """A trial's W&B queue whose ``put`` does not wait for its own item to arrive. Ray's waits for the
    queue actor's reply, and the first reply waits for that actor's process to start: 1.5-7 s of a stalled
    driver per trial (measured with py-spy). It does wait for the item before: the queue actor is an async
    actor, whose calls Ray may run out of order, and an end-of-run marker that overtook a trial's last
    results would close its W&B run without them. Items come an epoch apart, so that wait is almost
    always over before it starts; it is bounded, so a queue actor that never answers cannot hang a sweep."""

    _in_flight = None  # the ObjectRef of the last put (the class is swapped in: no __init__ of its own)

    def put(self, item, block: bool = True, timeout: float | None = None) -> None:
        if self._in_flight is not None:
            ray.wait([self._in_flight], timeout=PREVIOUS_ITEM_WAIT_S)  # ready, failed or timed out: never raises
        self._in_flight = self.actor.put_nowait.remote(item)


class DMKDWandbCallback(WandbLoggerCallback):
    """One W&B run per trial: the trial's full resolved config as flat keys (``flat_run_config``), a
    readable name, tags per method, row and seed, the method's note in the run's notes when it is a
    reading of its paper (DMKD's); at the full budget, Δ AP against the undistilled student of the same
    seed (when the reference is known); the attention/mask PNG that the trial's last checkpoint holds
    (local storage only)."""

    _logger_actor_cls = WandbLoggingActor  # Ray's actor, made to wait until W&B has written the run

    def __init__(self, *args, space: SweepSpace, setup: TrialSetup, reference_file: Path | None,
                 rows: dict[str, Row] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._space, self._setup, self._rows = space, setup, rows or {}
        self._reference_file = reference_file
        self._reference: dict | None = None
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
                           notes=" ".join(reading_notes([cfg.method])) or None, resume="allow")
        super().log_trial_start(trial)
        self._trial_queues[trial].__class__ = _SendOnlyQueue  # same object and actor, a put that does not wait

    def _reference_final(self, seed) -> dict | None:
        if self._reference is None and self._reference_file is not None and self._reference_file.is_file():
            self._reference = json.loads(self._reference_file.read_text())
        return ((self._reference or {}).get(str(seed)) or {}).get("final")

    def log_trial_result(self, iteration, trial, result):
        extra = {}
        value = result.get(VAL_AP)
        if isinstance(value, (int, float)):
            reference = self._reference_final(self._seeds.get(trial))
            if reference and result.get("epoch") == self._space.budget.epochs == reference.get("epoch"):
                extra["val/delta_AP"] = value - reference[VAL_AP]
        # the epoch's checkpoint folder: Ray Train's TuneReportCallback names it; a one-worker trial's own
        # report gives its folder's name inside the trial's folder
        path = result.get("checkpoint_path")
        if not path and result.get("checkpoint_dir_name") and trial.path:
            path = os.path.join(trial.path, result["checkpoint_dir_name"])
        if path and os.path.isfile(os.path.join(path, PICTURE_PNG)):
            extra["attention"] = wandb.Image(os.path.join(path, PICTURE_PNG))
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


def wandb_callbacks(space: SweepSpace, experiment: Path | None, mode: str, *, setup: TrialSetup,
                    reference_file: Path | None, job_type: str = "sweep", rows: dict[str, Row] | None = None) -> list:
    """The W&B callback of a Tuner (none with ``--wandb off``); ``experiment`` is where offline runs go
    (None for a cloud storage: W&B's own folder), ``reference_file`` gives the runs their Δ AP."""
    if mode == "off":
        return []
    return [DMKDWandbCallback(project=space.wandb.project, entity=space.wandb.entity, group=space.pair_name,
                              job_type=job_type, upload_timeout=WANDB_UPLOAD_TIMEOUT_S, log_config=False,
                              dir=str(experiment or "."), space=space, setup=setup, reference_file=reference_file,
                              rows=rows)]
