"""What the tests share: the repository's paths, the environment and runner of a command-line process,
tiny detectors, and the helpers of the tests that run real sweeps (each as its own `python -m
orchestrator.sweep` process, one Ray at a time)."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import torch
import yaml

from dmkd.config import DataPaths, TrainConfig
from dmkd.engine import load_data
from dmkd.evaluate import evaluate_detector
from dmkd.models import DetectorConfig, build_detector
from orchestrator.report.records import TRIAL_FOLDER
from orchestrator.space import DEFAULT_SPACE

ROOT = Path(__file__).resolve().parent.parent
# The smallest FCOS that trains on the test mini-benchmark, as a space's YAML gives it and as a config.
TINY = {"arch": "fcos", "backbone": "resnet10_quarter", "fpn_channels": 64, "head_convs": 1, "image_size": 96}
TINY_DETECTOR = DetectorConfig(**TINY)
# A narrower student and a wider teacher of each dense family at 64 px (widths differ: align convs are built).
STUDENT = {"fcos": DetectorConfig(arch="fcos", backbone="resnet10_quarter", fpn_channels=32, image_size=64, head_convs=2),
           "retinanet": DetectorConfig(arch="retinanet", backbone="resnet10_quarter", fpn_channels=32, image_size=64,
                                       head_convs=2)}
TEACHER = {family: dataclasses.replace(cfg, backbone="resnet10_half", fpn_channels=64, head_convs=4)
           for family, cfg in STUDENT.items()}


def tiny_batch() -> tuple[list[torch.Tensor], list[dict]]:
    """Two 64 px images with 1 and 2 boxes (labels 1..3), always the same."""
    torch.manual_seed(0)
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 30.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[20.0, 10.0, 60.0, 60.0], [2.0, 2.0, 14.0, 20.0]]), "labels": torch.tensor([2, 3])}]
    return images, targets


def command_env(tmp_path: Path, **extra: str) -> dict:
    """The environment of a command-line process: this checkout importable, Ray without a token, W&B
    offline with its folders in ``tmp_path``."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", "WANDB_MODE": "offline",
            "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"), "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"), **extra}


def run_module(module: str, *args: str, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS`` in its own process, from the repository root; output captured."""
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=timeout)


def tiny_teacher(mini_data: DataPaths) -> Path:
    """A random tiny teacher, saved once per test session beside the mini-benchmark, with the figures
    of one real evaluation on its validation and test splits recorded the way ``dmkd.train`` records
    them, so that a sweep takes its teacher row from the file instead of starting a Ray task for it."""
    path = Path(mini_data.train_ann).parent / "tiny_teacher.pt"
    if path.is_file():
        return path
    torch.manual_seed(0)
    detector = build_detector(DetectorConfig(**TINY, num_classes=4))
    data = load_data(TrainConfig(data=mini_data, detector=dataclasses.replace(DetectorConfig(**TINY), num_classes=4)))
    figures = {"epoch": 0}
    for split, dataset in (("val", data.val), ("test", data.test)):
        found, _ = evaluate_detector(detector, dataset, torch.device("cpu"), batch_size=4)
        figures.update({f"{split}/{k}": v for k, v in found.items()})
    torch.save({"model": detector.state_dict(), "history": [figures],
                "data": mini_data.resolved().as_dict()}, path)
    return path


def tiny_space(tmp_path: Path, mini_data: DataPaths, **changes) -> Path:
    """A sweep space on the test mini-benchmark with the session's tiny teacher; ``changes`` replace keys."""
    teacher = tiny_teacher(mini_data)
    data = yaml.safe_load(DEFAULT_SPACE.read_text())
    data.update(name="tiny", num_samples=3, max_concurrent=1,
                pair={"teacher": TINY, "student": TINY, "teacher_checkpoint": str(teacher), "train_teacher": False},
                data=mini_data.as_dict(),
                fixed={"batch_size": 2, "warmup_iters": 1},
                budget={"epochs": 2, "max_iters": 2},
                scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2},
                resources={"num_workers": 1, "use_gpu": False, "cpus_per_worker": 1},  # DDP: the small sweep's 2
                reference=False)  # the reference row has tests of its own; here it would only cost time
    data.update(changes)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def sweep_command(space: Path, storage: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator.sweep", "--space", str(space), "--storage", str(storage),
            "--wandb", "offline", *extra]


def tune_results(experiment: Path) -> dict[str, list[dict]]:
    """Tune's own per-trial records: trial id -> reported results."""
    records = {}
    for file in experiment.glob(f"{TRIAL_FOLDER}*/result.json"):
        lines = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
        records[file.parent.name.removeprefix(TRIAL_FOLDER)] = lines
    return records


def study(experiment: Path, name: str = "tiny"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{experiment / 'optuna.db'}")


def _inspect(run_dir: Path, tmp_path: Path, *options: str) -> str:
    inspect = subprocess.run([str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--json", *options,
                              str(run_dir)], capture_output=True, text=True, env=command_env(tmp_path), timeout=120)
    return inspect.stdout


def wandb_summary(run_dir: Path, tmp_path: Path) -> dict:
    """An offline W&B run as W&B's own reader sees it: state, tags, name, config, latest metrics."""
    return json.loads(_inspect(run_dir, tmp_path, "--summary"))


def wandb_run_record(run_dir: Path, tmp_path: Path) -> dict:
    """The run record of an offline W&B run (what ``wandb.init`` was asked for: id, group, resume...)."""
    records = (json.loads(line) for line in _inspect(run_dir, tmp_path).splitlines() if line.strip())
    return next(record["run"] for record in records if record.get("type") == "run")
