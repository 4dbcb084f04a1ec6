"""The checkpoint a training run writes after every epoch (atomically) and resumes from.

Keys: ``model`` (the student detector's state dict; also what a teacher checkpoint is loaded from),
``distiller``, ``optimizer``, ``scheduler``, ``epoch``, ``step``, ``history`` (per-epoch metrics),
``rng`` (torch's CPU generator), ``config`` (the resolved TrainConfig) and ``data`` (absolute paths).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dmkd.errors import UserError, one_line
from dmkd.identify import mismatch
from dmkd.io import atomic_write
from dmkd.models import DetectorConfig

CHECKPOINT_NAME = "checkpoint.pt"
RESUME_KEYS = ("model", "optimizer", "scheduler", "epoch", "step", "history", "rng")
RESUME_FIX = ("resume with the settings it was written with (--arch/--backbone/--fpn-channels/--head-convs), "
              "or leave out --resume to start a new run in another --out")


def load_checkpoint(path: Path) -> dict:
    """A ``dmkd.train`` checkpoint to resume from; anything else is a one-line ``UserError``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a corrupt or foreign file
        raise UserError(f"{path}: not a readable torch checkpoint ({type(error).__name__})") from None
    missing = [key for key in RESUME_KEYS if not (isinstance(state, dict) and key in state)]
    if missing:
        raise UserError(f"{path}: not a dmkd.train checkpoint to resume from (no {missing[0]!r}); "
                        f"a plain state dict can be a --teacher-checkpoint, not a --resume point")
    return state


def save_checkpoint(path: Path, model: nn.Module, optimizer, scheduler, *, epoch: int, step: int, history: list,
                    config: dict, data: dict) -> None:
    """``model`` is the :class:`~dmkd.step.StudentWithDistiller` (detector and distiller)."""
    state = {"model": model.detector.state_dict(),
             "distiller": model.distiller.state_dict() if model.distiller is not None else None,
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "epoch": epoch, "step": step, "history": history, "rng": torch.get_rng_state(),
             "config": config, "data": {k: str(Path(v).resolve()) for k, v in data.items()}}
    atomic_write(path, lambda handle: torch.save(state, handle), mode="wb")


def restore(state: dict, path: Path, model: nn.Module, optimizer, scheduler, wanted: DetectorConfig) -> tuple[int, int, list]:
    """Load a checkpoint's weights, optimiser, schedule and generator; returns (epoch, step, history).
    ``wanted`` is the detector this run builds (to say what differs when the weights do not fit)."""
    try:
        model.detector.load_state_dict(state["model"])
    except RuntimeError:
        raise UserError(mismatch(path, state["model"], wanted, "detector", RESUME_FIX)) from None
    try:
        if model.distiller is not None and state.get("distiller") is not None:
            model.distiller.load_state_dict(state["distiller"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as error:
        raise UserError(f"{path}: does not fit this run's detector, distiller or optimizer "
                        f"({one_line(error)[:200]}); resume with the settings it was written with") from None
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    return state["epoch"], state["step"], list(state["history"])
