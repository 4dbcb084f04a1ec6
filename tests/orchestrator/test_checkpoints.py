"""A stored checkpoint counts only when whole: what a restored trial resumes from."""
import shutil

import pyarrow.fs
import torch

from dmkd.checkpoint import CHECKPOINT_NAME
from dmkd.metrics import METRICS_FILE, write_metrics
from orchestrator.trial import stored_epoch


def test_a_checkpoint_cut_short_while_being_copied_is_not_resumed_from(tmp_path):
    whole, cut, untold = tmp_path / "checkpoint_000001", tmp_path / "checkpoint_000002", tmp_path / "checkpoint_000003"
    whole.mkdir()
    torch.save({"model": torch.nn.Linear(64, 64).state_dict(), "epoch": 2}, whole / CHECKPOINT_NAME)
    write_metrics(whole, [{"epoch": 1}, {"epoch": 2}])
    shutil.copytree(whole, cut)
    write_metrics(cut, [{"epoch": 1}, {"epoch": 2}, {"epoch": 3}])
    data = (whole / CHECKPOINT_NAME).read_bytes()
    (cut / CHECKPOINT_NAME).write_bytes(data[: len(data) * 3 // 4])  # a copy killed three quarters in
    shutil.copytree(whole, untold)
    (untold / METRICS_FILE).write_text('{"epochs": [{"epoch": 1}], "fin')

    fs = pyarrow.fs.LocalFileSystem()
    assert stored_epoch(fs, str(whole)) == 2
    assert stored_epoch(fs, str(cut)) is None
    assert stored_epoch(fs, str(untold)) is None
    assert stored_epoch(fs, str(tmp_path / "checkpoint_000009")) is None


def test_a_teacher_run_an_earlier_sweep_stopped_is_announced_as_continued(tmp_path):
    from orchestrator.space_file import load_space
    from orchestrator.teacher import training_plan

    space = load_space(None)
    training = tmp_path / "training"
    assert training_plan(space, training) == "training fcos/resnet18 for 8 epochs"
    training.mkdir()
    write_metrics(training, [{"epoch": 1}, {"epoch": 2}])  # what dmkd.engine.fit writes beside its checkpoint
    assert training_plan(space, training) == "training fcos/resnet18 for 8 epochs"  # no checkpoint: from the start
    torch.save({"epoch": 2}, training / CHECKPOINT_NAME)
    assert training_plan(space, training) == "continuing fcos/resnet18 after epoch 2 of 8 (an earlier run stopped there)"
