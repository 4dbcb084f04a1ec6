"""One experiment on Ray, shared by a sweep and an ablation: its data, the local Ray it starts (or the
cluster it joins), and its lifecycle: the teacher (trained once and cached, or given), its figures and
the undistilled reference rows, Ray shut down at the end whatever happens inside (:func:`open_experiment`;
the shutdown runs beside the driver's last work, see :func:`stop_ray`). Where it is stored is a
:class:`~orchestrator.storage.Storage`."""
from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import ray

from dmkd.config import DataPaths
from dmkd.errors import UserError, one_line
from dmkd.io import atomic_write_json
from dmkd.synthetic import ensure_mini_benchmark
from orchestrator.callbacks import wandb_env
from orchestrator.reference import ensure_references
from orchestrator.space import SweepSpace
from orchestrator.storage import Storage
from orchestrator.teacher import ensure_teacher, evaluate_teacher
from orchestrator.trial import TrialSetup


def data_paths(space: SweepSpace) -> DataPaths:
    """The space's COCO files (checked to exist, made absolute), or the mini-benchmark, generated once."""
    if space.data.given:
        for key, value in space.data.as_dict().items():
            if not Path(value).exists():
                raise UserError(f"data.{key}: {value}: not found")
        return space.data.resolved()
    return ensure_mini_benchmark(Path(space.data.mini_dir).resolve())


_stopping: threading.Thread | None = None


def stop_ray() -> None:
    """``ray.shutdown()`` in a thread beside the driver's last work (results, the report). Ray stops the
    processes it started one by one, giving each up to a second to exit, and sleeps while they do (about
    1.1 s of the 1.4 s it takes on 2 cores, 0.07 CPU-s in all): the report's own work fits in that time.
    :func:`wait_for_ray` joins it; :func:`start_ray` does first, and so does the interpreter's exit (the
    thread is not a daemon)."""
    global _stopping
    wait_for_ray()
    _stopping = threading.Thread(target=ray.shutdown, name="ray-shutdown")
    _stopping.start()


def wait_for_ray() -> None:
    """Return once a shutdown started by :func:`stop_ray` is over."""
    global _stopping
    if _stopping is not None:
        _stopping.join()
        _stopping = None


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Stop at once when nothing answers at ``address`` (``HOST:PORT`` or ``ray://HOST:PORT``; ``auto`` and
    other forms are Ray's to check): Ray retries such an address for about a quarter of an hour, printing a
    warning every few seconds, before it gives up (a mistyped port or host is the usual cause)."""
    host, colon, port = address.removeprefix("ray://").rpartition(":")
    if not colon or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as error:
        why = error.strerror or str(error) or type(error).__name__
        raise UserError(f"--address {address}: nothing answers there ({why}); give the head node's address and "
                        f"port as `ray start --head` printed it (6379 unless chosen), or --address auto on a node "
                        f"of the cluster") from None


def start_ray(address: str | None, space: SweepSpace, env_vars: dict) -> None:
    # The legacy output engine: the only one whose status table takes chosen columns (tuning.StatusTable).
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"  # tuning.tune_callbacks adds the two loggers we read
    # Tune saves its experiment state (which trials exist, which finished) every 10 s or more by default. A
    # driver killed in between loses what happened since: a trial that finished is run again from its last
    # checkpoint, and a trial created since is forgotten (its point and its first epochs lost, a new trial
    # made in its place). Every 2 s keeps that window shorter than any trial's start-up. A user's own wins.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    wait_for_ray()  # an earlier experiment's Ray, still stopping, reads as initialized until it is gone
    if ray.is_initialized():
        return
    runtime_env = {"env_vars": env_vars}
    if address:
        try:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
        except ConnectionError as error:  # Ray's first sentence says what failed; its advice is Ray's CLI's
            reason = one_line(error).split(". ")[0].rstrip(".")
            raise UserError(f"--address {address}: {reason}; start the cluster first (ray up cluster.yaml, or ray "
                            f"start --head here), or leave out --address for a local Ray") from None
        return
    # A multi-worker trial's driver function holds one CPU while its Train workers hold theirs: count them
    # on top, and keep the dashboard, whose state API Ray Train's placement-group cleaner asks whether a
    # stopped trial's controller is gone (without it, the CPUs of every trial ASHA stops stay reserved).
    # One-worker trials hold their own CPUs and start no Train run: neither is needed.
    ray_train = space.resources.worker_group
    num_cpus = (os.cpu_count() or 1) + (space.max_concurrent if ray_train else 0)
    # Ray Train watches for node preemption (spot instances) with one more actor process per trial; on
    # the one machine this Ray runs on there is nothing to preempt. Measured on 2 cores: the tuned-ablation
    # test 258 s against 284 s with it (BENCHMARKS.md). A user's own setting wins.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    if not ray_train:
        # Ray starts a process per CPU for the job's first tasks, with Python and Ray loaded. A Tune trial
        # never takes one (Tune gives its actors a runtime environment of their own), so on a sweep of
        # one-worker trials they only share the cores with Ray's start and the first trial's, and are
        # stopped once it runs: about 1 CPU-s for nothing (a teacher to train starts its own process, once).
        os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
    # "local": a Ray of this command's own, also when one that `ray start` left running is on this machine
    # (Ray would join that one, and refuse the CPU count given here with a traceback)
    ray.init(address="local", num_cpus=num_cpus, runtime_env=runtime_env, log_to_driver=False, include_dashboard=ray_train)


@dataclass(frozen=True)
class Experiment:
    """``setup`` is what every trial receives (teacher checkpoint, data paths, Train storage, env vars)."""

    storage: Storage
    name: str
    teacher: str | None
    paths: DataPaths
    setup: TrialSetup

    @property
    def local(self) -> bool:
        return self.storage.local

    @property
    def folder(self) -> Path:
        """STORAGE/NAME (a local storage only)."""
        return self.storage.folder(self.name)


def write_reference(folder: Path, references: dict) -> None:
    """The experiment's copy of its reference rows (the report reads only the experiment folder)."""
    if references:
        atomic_write_json(folder / "reference.json", {str(seed): found for seed, found in references.items()})


@contextlib.contextmanager
def open_experiment(space: SweepSpace, *, name: str, storage: Storage, wandb_mode: str, address: str | None,
                    distills: bool, reference_seeds: list[int]) -> Iterator[Experiment]:
    """Yield the :class:`Experiment`; ``distills``: some trial needs the teacher; ``reference_seeds``: the
    seeds whose undistilled reference student the report compares against (trained when missing)."""
    # before Ray starts: an address where nothing answers, or a storage that cannot hold the experiment, is
    # one line; a folder made for an experiment that then cannot start (no cluster, bad data) is removed
    if address:
        check_reachable(address)
    made = storage.local and not storage.folder(name).exists()
    if storage.local:
        storage.make(name)
    try:
        env_vars = wandb_env(wandb_mode, storage.folder(name) if storage.local else None)
        os.environ.update(env_vars)
        paths = data_paths(space)
        start_ray(address, space, env_vars)
    except UserError:
        if made:
            with contextlib.suppress(OSError):  # only while still empty
                storage.folder(name).rmdir()
        raise
    try:
        cache = storage.folder() if storage.local else None  # the teacher and reference caches need a filesystem
        teacher = ensure_teacher(space, paths, cache / "teachers" if cache else None) if distills else None
        # the picture's only reader is the trial's W&B run: with W&B off it would cost each trial ~1 s for nothing
        setup = TrialSetup(teacher, paths, storage.uri(name, "train"), env_vars, picture=wandb_mode != "off")
        experiment = Experiment(storage, name, teacher, paths, setup)
        if storage.local:
            if distills and not (experiment.folder / "teacher.json").is_file():
                atomic_write_json(experiment.folder / "teacher.json", evaluate_teacher(space, paths, teacher))
        if reference_seeds:
            references = ensure_references(space, reference_seeds, setup, cache / "references" if cache else None)
            if storage.local:
                write_reference(experiment.folder, references)
        yield experiment
    finally:
        if address is None:
            stop_ray()
