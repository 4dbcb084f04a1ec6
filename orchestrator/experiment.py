"""One experiment's lifecycle on Ray, shared by a sweep and an ablation: W&B's environment, Ray started
(or a cluster joined), the data paths, the teacher (trained once and cached, or given), its figures and
the undistilled reference rows; Ray shut down at the end, whatever happens inside."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import ray

from dmkd.io import atomic_write_json
from orchestrator.reference import ensure_references, reference_cache
from orchestrator.rows import TrialSetup
from orchestrator.runner import data_paths, start_ray, teacher_cache, wandb_env, write_reference
from orchestrator.teacher import ensure_teacher, evaluate_teacher


@dataclass(frozen=True)
class Experiment:
    """``setup`` is what every trial receives (teacher checkpoint, data paths, Train storage, env vars)."""

    folder: Path  # STORAGE/NAME (meaningful for a local storage only)
    local: bool  # False for a cloud --storage: nothing is written on this machine
    teacher: str | None
    paths: dict
    setup: TrialSetup


@contextlib.contextmanager
def open_experiment(space, *, name: str, storage: str, wandb_mode: str, address: str | None, distills: bool,
                    reference_seeds: list[int]):
    """Yield the :class:`Experiment`; ``distills``: some trial needs the teacher; ``reference_seeds``: the
    seeds whose undistilled reference student the report compares against (trained when missing)."""
    folder = Path(storage) / name
    local = "://" not in storage
    env_vars = wandb_env(wandb_mode, folder, storage)
    os.environ.update(env_vars)
    paths = data_paths(space)
    start_ray(address, space, env_vars)
    try:
        teacher = ensure_teacher(space, paths, teacher_cache(storage)) if distills else None
        setup = TrialSetup(teacher, paths, f"{storage.rstrip('/')}/{name}/train", env_vars)
        if local:
            folder.mkdir(parents=True, exist_ok=True)
            if distills and not (folder / "teacher.json").is_file():
                atomic_write_json(folder / "teacher.json", evaluate_teacher(space, paths, teacher))
        if reference_seeds:
            references = ensure_references(space, reference_seeds, setup, reference_cache(storage))
            if local:
                write_reference(folder, references)
        yield Experiment(folder, local, teacher, paths, setup)
    finally:
        if address is None:
            ray.shutdown()
