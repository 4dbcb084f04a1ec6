"""What a training run reports, by name, and the file it keeps them in.

Every figure a run reports is a flat ``group/name`` key: COCO figures per split (``val/AP``, ``test/AP50``,
...), loss terms (``loss/detector``, ``distill/mgd``), the distillation loss against the detector's
(``loss_ratio``, ``loss_ratio/step0``), timings (``time/train_s``, ``time/cpu_s``) and the pairing
fingerprints (``pairing/student_init``, ``pairing/data_order``). ``metrics.json`` holds them per epoch
(``epochs``) and the last epoch's again (``final``); this module is its one writer and reader.
"""
from __future__ import annotations

from pathlib import Path

from dmkd.errors import UserError
from dmkd.io import atomic_write_json, read_json

METRICS_FILE = "metrics.json"
COCO_FIGURES = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # the figures a table shows, per split
VAL_AP = "val/AP"
TEST_AP = "test/AP"
BEST_VAL_AP = "val/AP_best"  # the best epoch so far (a trial reports it)
LOSS_RATIO = "loss_ratio"  # distillation loss / detector loss, means over the epoch
LOSS_RATIO_STEP0 = "loss_ratio/step0"  # the same at the run's first step
CPU_S = "time/cpu_s"
LOOP_STARTED_AT = "time/loop_started_at"  # when an epoch's first step began (seconds since the epoch, for start-up)
TRIAL_STARTED_AT = "time/trial_started_at"  # when a sweep trial's own code began (a reused trial process's start)
STUDENT_INIT = "pairing/student_init"
DATA_ORDER = "pairing/data_order"


def split_metric(split: str, name: str) -> str:
    """``val/AP`` from ``("val", "AP")``."""
    return f"{split}/{name}"


def split_figures(split: str, figures: dict) -> dict:
    """COCO figures of one split under their reported names."""
    return {split_metric(split, name): value for name, value in figures.items()}


def write_metrics(folder: Path, history: list[dict]) -> None:
    atomic_write_json(Path(folder) / METRICS_FILE, {"epochs": history, "final": history[-1] if history else {}})


def read_metrics(folder: str | Path) -> dict:
    """``{"epochs": [...], "final": {...}}`` of the run whose files are in ``folder``."""
    return read_json(Path(folder) / METRICS_FILE, "run metrics")


def epochs_done(folder: str | Path) -> int:
    """How many epochs the run in ``folder`` recorded; 0 when it recorded none or its metrics cannot be read."""
    try:
        return len(read_metrics(folder)["epochs"])
    except (UserError, KeyError, TypeError):
        return 0
