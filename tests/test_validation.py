"""Bad input, class by class: each ends in one line naming what is wrong, exit code 2, and no file
written or overwritten (the command lines are called in-process, as their ``main`` functions)."""
import json
import os
import stat

import pytest
import torch

from dmkd import evaluate, split
from dmkd import train as cli
from dmkd.config import TrainConfig
from dmkd.train import ROLE_DEFAULTS
from orchestrator import ablate, sweep
from orchestrator.report import __main__ as report


def _train_args(coco, out, *extra):
    ann, folder = coco
    return ["--train-ann", str(ann), "--train-images", str(folder), "--val-ann", str(ann), "--val-images", str(folder),
            "--out", str(out), "--epochs", "1", "--max-iters", "1", "--batch-size", "1", "--image-size", "64",
            "--backbone", "resnet10_quarter", "--fpn-channels", "64", "--head-convs", "1", *extra]


def _one_line(capsys, expected: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err


def _coco_with(tmp_path, coco, change) -> str:
    data = json.loads(coco[0].read_text())
    change(data)
    path = tmp_path / "changed.json"
    path.write_text(json.dumps(data))
    return str(path)


# class 2: wrong JSON value types, bad numbers and files give one line, not a traceback
@pytest.mark.parametrize("change, expected", [
    (lambda d: d.update(images=[1, 2]), "images[0] must be an object, but got 1"),
    (lambda d: d["annotations"][0].update(bbox=["2", "2", "10", "10"]), "annotations[0].bbox must be [x, y, width, height] of numbers"),
    (lambda d: d.update(annotations="none"), "field 'annotations' must be a list, but got str"),  # class 5: said so
])
def test_wrong_json_types_in_annotations(tmp_path, small_coco, capsys, change, expected):
    ann = _coco_with(tmp_path, small_coco, change)
    assert cli.main(_train_args((ann, small_coco[1]), tmp_path / "out")) == 2
    _one_line(capsys, expected)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("results, expected", [
    ([{"image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4], "score": None}], "[0].score must be a number, but got None"),
    ([{"image_id": 1, "category_id": 1, "bbox": "1 2 3 4", "score": 1}], "[0].bbox must be [x, y, width, height]"),
    ([{"image_id": "1", "category_id": 1, "bbox": [1, 2, 3, 4], "score": 1}], "[0].image_id must be an integer, but got '1'"),
])
def test_wrong_json_types_in_results(tmp_path, small_coco, capsys, results, expected):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    assert evaluate.main(["--ann", str(small_coco[0]), "--results", str(path)]) == 2
    _one_line(capsys, expected)


def test_bad_numbers_and_checkpoints(tmp_path, small_coco, capsys):
    assert cli.main(_train_args(small_coco, tmp_path / "a", "--workers", "-1")) == 2
    _one_line(capsys, "num_workers: must be 0")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    assert cli.main(_train_args(small_coco, tmp_path / "b", "--method", "dmkd", "--teacher-checkpoint", str(garbage))) == 2
    _one_line(capsys, "garbage.pt: not a readable torch checkpoint")
    (tmp_path / "c").mkdir()
    torch.save({"model": {"w": torch.zeros(1)}}, tmp_path / "c" / "checkpoint.pt")  # a state dict, not a training run
    assert cli.main(_train_args(small_coco, tmp_path / "c", "--resume")) == 2
    _one_line(capsys, "not a dmkd.train checkpoint to resume from")
    assert cli.main(_train_args(small_coco, tmp_path / "d", "--method", "dmkd", "--teacher-checkpoint", str(tmp_path / "c" / "checkpoint.pt"))) == 2
    _one_line(capsys, "weights do not fit this detector")
    assert not any((tmp_path / name).exists() for name in ("a", "b", "d"))


def test_existing_files_where_folders_belong(tmp_path, small_coco, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert cli.main(_train_args(small_coco, a_file)) == 2
    _one_line(capsys, "out: ")
    assert cli.main(["--data-dir", str(a_file), "--out", str(tmp_path / "o")]) == 2
    _one_line(capsys, "data_dir: ")
    assert sweep.main(["--storage", str(a_file), "--dry-run"]) == 2
    _one_line(capsys, "--storage: ")
    assert a_file.read_text() == "x"


def test_a_non_finite_loss_from_the_command_line(tmp_path, small_coco, capsys):
    teacher = tmp_path / "teacher.pt"
    from dmkd.models import DetectorConfig, build_detector

    torch.save({"model": build_detector(DetectorConfig(num_classes=2, image_size=64)).state_dict()}, teacher)
    assert cli.main(_train_args(small_coco, tmp_path / "o", "--method", "dmkd", "--teacher-checkpoint", str(teacher),
                                  "--teacher-backbone", "resnet18", "--distill", "alpha=1e300")) == 2
    _one_line(capsys, "loss became inf at step 0")


def test_corrupt_experiment_records(tmp_path, capsys):
    experiment = tmp_path / "exp"
    experiment.mkdir()
    (experiment / "sweep.json").write_text("{broken")
    assert report.main([str(experiment)]) == 2
    _one_line(capsys, "sweep.json: not valid JSON")
    (tmp_path / "best.json").write_text("[1, 2")
    assert ablate.main(["--from-sweep", str(tmp_path), "--dry-run"]) == 2
    _one_line(capsys, "best.json: not valid JSON")


# class 3: what used to be accepted silently
def test_silent_acceptance_is_an_error(tmp_path, small_coco, capsys):
    invalid = _coco_with(tmp_path, small_coco, lambda d: d["annotations"][0].update(bbox=[40, 40, 5, 5]))
    assert cli.main(_train_args((invalid, small_coco[1]), tmp_path / "a")) == 2
    _one_line(capsys, "every one of its 1 boxes has zero width or height or lies outside its image")
    duplicate = _coco_with(tmp_path, small_coco, lambda d: d["images"].append(dict(d["images"][0])))
    assert cli.main(_train_args((duplicate, small_coco[1]), tmp_path / "b")) == 2
    _one_line(capsys, "images[1].id 1 appears twice")
    assert cli.main(_train_args(small_coco, tmp_path / "c", "--distill", "alpha=1")) == 2
    _one_line(capsys, "--distill: only means something with --method")
    assert cli.main(_train_args(small_coco, tmp_path / "d", "--resume")) == 2
    _one_line(capsys, "--resume: ")
    teacher = tmp_path / "t.pt"
    teacher.write_bytes(b"")
    assert cli.main(_train_args(small_coco, tmp_path / "e", "--method", "mgd", "--teacher-checkpoint", str(teacher),
                                  "--distill", "alpha=-2e-5")) == 2
    _one_line(capsys, "alpha must be a finite number >= 0")
    assert not any((tmp_path / name).exists() for name in "abcde")


# class 4: nothing of a finished run is overwritten by a run that then fails validation
def test_a_failing_rerun_leaves_the_finished_run_alone(tmp_path, small_coco, capsys):
    out = tmp_path / "run"
    assert cli.main(_train_args(small_coco, out)) == 0
    capsys.readouterr()
    before = {name: (out / name).read_bytes() for name in ("run.json", "checkpoint.pt", "metrics.json")}
    from dmkd.models import DetectorConfig, build_detector

    teacher = tmp_path / "teacher.pt"
    torch.save({"model": build_detector(DetectorConfig(num_classes=2, image_size=64)).state_dict()}, teacher)
    assert cli.main(_train_args(small_coco, out, "--method", "dmkd", "--teacher-checkpoint", str(teacher),
                                  "--teacher-backbone", "resnet18", "--distill", "alpah=1e-5")) == 2
    _one_line(capsys, "distill.alpah: not a parameter of method 'dmkd'")
    missing = _coco_with(tmp_path, small_coco, lambda d: d["images"].append({"id": 2, "file_name": "gone.png"}))
    assert cli.main(_train_args(small_coco, out, "--val-ann", missing)) == 2
    _one_line(capsys, "gone.png: image file not found (1 of the 2 images")
    assert {name: (out / name).read_bytes() for name in before} == before


# class 6: files teammates can read, names that stay inside --storage
def test_written_files_respect_the_umask(tmp_path):
    from dmkd.io import atomic_write_json

    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "shared.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "shared.json").stat().st_mode) == 0o644


def test_a_name_is_a_plain_folder_name(tmp_path, capsys):
    for command in (sweep.main, ablate.main):
        assert command(["--name", "../../x", "--storage", str(tmp_path), "--dry-run"]) == 2
        _one_line(capsys, "--name: '../../x' must be a plain folder name")


# class 7: help that lists the choices, under the names users type
def test_help_texts(capsys):
    for command, prog in ((cli.main, "python -m dmkd.train"), (evaluate.main, "python -m dmkd.evaluate"),
                          (split.main, "python -m dmkd.split")):
        with pytest.raises(SystemExit):
            command(["--help"])
        text = capsys.readouterr().out
        assert text.startswith(f"usage: {prog}")
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "fcos, retinanet, fasterrcnn" in text and "dmkd_spatial" in text and "resnet10_quarter" in text
    # the defaults the help states are the ones a run takes (a changed default must change its help)
    defaults = TrainConfig()
    assert f"peak learning rate (default: {defaults.lr})" in text
    assert f"images per step and process (default: {defaults.batch_size})" in text
    assert (f"epochs to train (default: {ROLE_DEFAULTS['teacher']['epochs']} teacher, "
            f"{ROLE_DEFAULTS['student']['epochs']} student)") in text
    assert f"default: {defaults.optimizer}" in text and f"(default: {defaults.seed})" in text
