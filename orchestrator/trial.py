"""The trainable, and what a trial receives (its values from Tune, and the experiment's :class:`TrialSetup`).

``run_trial`` is the function Tune calls. A trial of one worker trains right there, in the Tune trial's
own process (``dmkd.engine.fit``, ``ray.tune.report`` every epoch, Tune's ``FailureConfig`` restarting a
failed trial from its last checkpoint): Ray's own guide to Train and Tune recommends this for one-worker
trials, and it starts none of Ray Train's per-run processes (controller, worker group, queues,
placement-group cleaner). Fractional GPUs (``gpus_per_worker: 0.25``) pack such trials onto one GPU. A
trial of several workers builds a ``TorchTrainer`` (DDP: NCCL on GPUs, gloo on CPUs) whose workers run
``train_worker``, every rank reporting once per epoch (``ray.train.report`` is a barrier).

Both paths train with :func:`orchestrator.trial_training.train_and_report` and report the same figures and the same checkpoint
folder (``checkpoint.pt``, ``metrics.json`` and, after the last epoch, the method's picture,
``attention.png`` for DMKD, when W&B is on to show it), so resuming, ASHA, W&B and the reports see no difference.
"""
from __future__ import annotations

import dataclasses
import json
import zipfile
from dataclasses import dataclass, field

import pyarrow.fs
import ray.tune
import torch
from ray.tune.result import EXPR_RESULT_FILE

from dmkd.checkpoint import CHECKPOINT_NAME
from dmkd.config import DataPaths, TrainConfig, to_dict
from dmkd.metrics import METRICS_FILE
from orchestrator.grid import Row
from orchestrator.space import SweepSpace
from orchestrator.trial_training import train_and_report


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of one experiment receives beside its own values."""

    teacher_checkpoint: str | None
    data_paths: DataPaths
    train_storage: str  # where Ray Train keeps the trial's checkpoints
    env_vars: dict = field(default_factory=dict)
    picture: bool = True  # draw the method's picture after the last epoch (only a W&B run shows it)

    def stored_in(self, train_storage: str) -> TrialSetup:
        return dataclasses.replace(self, train_storage=train_storage)

    def without_test(self) -> TrialSetup:
        """The setup of a trial that selects (a sweep's, a tuning run's): it never sees the test split."""
        return dataclasses.replace(self, data_paths=self.data_paths.without_test())


def trial_train_config(config: dict, *, space: SweepSpace, setup: TrialSetup,
                       rows: dict[str, Row] | None = None) -> TrainConfig:
    """The TrainConfig of a trial. ``config`` holds the searched values (a sweep) or a grid ``row`` and
    ``seed`` (an ablation, whose rows map names to a method and its parameters)."""
    values = dict(config)
    seed = values.pop("seed", None)
    method = None
    if "row" in values:
        if rows is None:
            raise ValueError("a trial of a grid row needs the grid's rows")
        row = rows[values.pop("row")]
        method, values = row.method, {**row.params, **values}
    return space.train_config(values, method=method, seed=seed, out="unused",
                              teacher_checkpoint=setup.teacher_checkpoint, data_paths=setup.data_paths)


def newest_stored_checkpoint() -> ray.tune.Checkpoint | None:
    """The newest whole checkpoint this trial stored (a ``checkpoint_*`` folder of its trial folder, see
    ``stored_epoch``), or None. Tune records a trial's checkpoints in its experiment state, saved every few
    seconds: a sweep whose driver was killed may not have recorded the last ones, and would restart the
    trial from an earlier epoch."""
    storage = ray.tune.get_context().get_storage()
    fs = storage.storage_filesystem
    newest, epoch = None, 0
    for info in fs.get_file_info(pyarrow.fs.FileSelector(storage.trial_fs_path, allow_not_found=True)):
        if info.type != pyarrow.fs.FileType.Directory or not info.base_name.startswith("checkpoint_"):
            continue
        found = stored_epoch(fs, info.path)
        if found is not None and found > epoch:
            newest, epoch = info.path, found
    return ray.tune.Checkpoint(newest, filesystem=fs) if newest else None


def recorded_epochs() -> set[int]:
    """The epochs the driver recorded for this trial: those of Tune's ``result.json`` in the trial's
    folder (a line cut short by a kill is skipped; no file, none)."""
    storage = ray.tune.get_context().get_storage()
    try:
        with storage.storage_filesystem.open_input_stream(f"{storage.trial_fs_path}/{EXPR_RESULT_FILE}") as handle:
            lines = handle.read().decode(errors="replace").splitlines()
    except OSError:
        return set()
    epochs = set()
    for line in lines:
        try:
            epochs.add(int(json.loads(line)["epoch"]))
        except (ValueError, KeyError, TypeError):
            continue
    return epochs


def stored_epoch(fs: pyarrow.fs.FileSystem, folder: str) -> int | None:
    """The epoch the checkpoint folder ``folder`` holds, or None where it is not whole: ``metrics.json``
    unreadable, or ``checkpoint.pt`` cut short (Ray copies a reported folder file by file, so a process
    killed mid-copy leaves one; a torch checkpoint is a zip file, whose directory comes last)."""
    try:
        with fs.open_input_stream(f"{folder}/{METRICS_FILE}") as handle:
            epoch = json.loads(handle.read())["final"]["epoch"]
        with fs.open_input_file(f"{folder}/{CHECKPOINT_NAME}") as handle:
            zipfile.ZipFile(handle).close()
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile):
        return None
    return epoch


def trial_resources(space: SweepSpace) -> dict[str, float]:
    """What Tune reserves for one trial: a one-worker trial's own CPUs (and GPU share); a multi-worker
    trial's driver function holds one CPU while its Train workers hold theirs."""
    resources = space.resources
    if resources.worker_group:
        return {"cpu": 1}
    return {"cpu": resources.cpus_per_worker, "gpu": resources.gpus_per_worker if resources.use_gpu else 0}


def run_trial(config: dict, *, space: SweepSpace, setup: TrialSetup, rows: dict[str, Row] | None = None) -> None:
    """The Tune trainable (see :func:`trial_train_config` for ``config``); ``space`` (a SweepSpace),
    ``setup`` (teacher checkpoint, data paths, Train storage) and ``rows`` arrive through
    ``tune.with_parameters``. One worker: train here. Several: a TorchTrainer with a deterministic run name
    per trial, so that a restored sweep finds the run and its checkpoints."""
    train_cfg = trial_train_config(config, space=space, setup=setup, rows=rows)
    loop_config = {"train": to_dict(train_cfg), "picture": setup.picture}  # train_and_report's, on either path
    if not space.resources.worker_group:
        torch.set_num_threads(max(1, int(space.resources.cpus_per_worker)))  # the cores Tune reserved for it
        train_and_report(loop_config, newest_stored_checkpoint() or ray.tune.get_checkpoint(), ray.tune.report,
                         checkpoint_class=ray.tune.Checkpoint, recorded_epochs=recorded_epochs)
        return
    from orchestrator.ddp_trial import fit_on_worker_group  # Ray Train: imported only by multi-worker trials

    fit_on_worker_group({**loop_config, "recorded_epochs": sorted(recorded_epochs())}, space=space,
                        train_storage=setup.train_storage, env_vars=setup.env_vars)
