"""The undistilled student: the reference row of every sweep and ablation.

It is trained through the same trial machinery as the distilled trials (a Tune trial running a Ray
Train run of ``dmkd.engine.fit`` with method ``none``), with the same student, data, budget, training
settings, workers and seed, so every distilled figure has a Δ AP against it. It is trained once per
seed and cached beside the teachers (``STORAGE/references/``): a sweep and an ablation of the same
pair and budget share it.
"""
from __future__ import annotations

import dataclasses
import json
from functools import partial
from pathlib import Path

from ray import tune

from dmkd.config import DataPaths
from dmkd.errors import UserError
from dmkd.io import atomic_write_json, read_json
from orchestrator.cache_key import training_key
from orchestrator.grid import REFERENCE_ROW
from orchestrator.space import SweepSpace
from orchestrator.trial import TrialSetup, run_trial
from orchestrator.tuning import check_finished, fit_tuner, make_tuner, set_aside_lost_trials

KEPT = ("epoch", "val/", "test/", "loss/", "pairing/")


def reference_folder(space: SweepSpace, data_paths: DataPaths, cache_root: Path) -> Path:
    """One folder per (student, data content, budget, training settings, workers); one file per seed inside."""
    cfg = space.train_config({}, method="none", seed=0, data_paths=data_paths)
    key = training_key(cfg, seed=None, num_workers_per_trial=space.resources.num_workers)
    student = space.pair.student
    return cache_root / f"{student.arch}-{student.backbone}-fpn{student.fpn_channels}-{key}"


def _kept(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if k.startswith(KEPT) and isinstance(v, (int, float))}


def ensure_references(space: SweepSpace, seeds: list[int], setup: TrialSetup, cache_root: Path | None,
                      log=partial(print, flush=True)) -> dict[int, dict]:
    """``{seed: {"history": [per-epoch figures], "final": {...}}}`` for each seed, trained when missing
    (the missing seeds together, as one small Tune run that a rerun continues); ``cache_root`` None
    (a cloud storage) trains nothing."""
    if cache_root is None:
        log("reference: not trained (a cloud --storage has no cache for it); the report leaves its row empty")
        return {}
    folder = reference_folder(space, setup.data_paths, cache_root)
    missing = [seed for seed in seeds if not (folder / f"seed{seed}.json").is_file()]
    if missing:
        log(f"reference: training the undistilled student for seed(s) {missing}, {space.budget.epochs} epochs each, "
            f"cached in {folder}")
        name = "seeds-" + "-".join(str(seed) for seed in missing)
        plain = dataclasses.replace(space, method="none", search={})
        trainable = tune.with_parameters(run_trial, space=plain, setup=setup.stored_in(str(folder / "train")),
                                         rows={"none": REFERENCE_ROW})
        result_grid, interrupted = fit_tuner(make_tuner(trainable, space=plain, storage_path=str(folder), name=name,
                                                  header=f"reference: none, {space.pair_name}", columns=["seed"],
                                                  callbacks=[], param_space={"row": "none", "seed": tune.grid_search(missing)}))
        set_aside_lost_trials(result_grid, folder / name)
        check_finished(interrupted, "the reference training")
        for result in result_grid:
            seed = result.config["seed"]
            if result.error is not None:
                raise UserError(f"reference: the undistilled student failed for seed {seed}: "
                                f"{str(result.error).strip().splitlines()[-1]}")
            lines = (Path(result.path) / "result.json").read_text().splitlines()
            history = [_kept(json.loads(line)) for line in lines if line.strip()]
            atomic_write_json(folder / f"seed{seed}.json", {"seed": seed, "history": history, "final": history[-1]})
    else:
        log(f"reference: cached in {folder}")
    return {seed: read_json(folder / f"seed{seed}.json", "reference result") for seed in seeds}
