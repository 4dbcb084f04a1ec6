"""Bad input, class by class: each ends in one line naming what is wrong, exit code 2, and no file
written or overwritten (the command lines are called in-process, as their ``main`` functions)."""
import json
import os
import socket
import stat
import subprocess
import sys

import pytest
import torch

from dmkd import evaluate, split, synthetic
from dmkd import train as cli
from dmkd.config import TrainConfig
from dmkd.train import ROLE_DEFAULTS
from orchestrator import ablate, sweep
from orchestrator.report import __main__ as report
from orchestrator.space_file import load_space


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
    _one_line(capsys, "checkpoint.pt: the weights are not those of a detector this project builds (keys w...)")
    assert not any((tmp_path / name).exists() for name in ("a", "b", "d"))


def test_a_run_in_out_is_never_replaced_by_accident(tmp_path, small_coco, capsys):
    out, before = _finished_run(tmp_path, small_coco, capsys)
    assert cli.main(_train_args(small_coco, out, "--seed", "1")) == 2  # the same folder again, by mistake
    _one_line(capsys, f"--out {out}: holds a run already (1 epoch in {out / 'checkpoint.pt'}); --resume continues it")
    assert cli.main(_train_args(small_coco, out, "--resume", "--overwrite")) == 2
    _one_line(capsys, "--resume and --overwrite: choose one")
    assert {name: (out / name).read_bytes() for name in before} == before
    assert cli.main(_train_args(small_coco, out, "--seed", "1", "--overwrite")) == 0
    assert json.loads((out / "run.json").read_text())["config"]["seed"] == 1
    assert (out / "checkpoint.pt").read_bytes() != before["checkpoint.pt"]


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
    best = {"trial": "run_trial_x", "method": "dmkd", "params": {"alpha": 2e-5}, "train": {}, "distill": {"alpha": 2e-5}}
    (tmp_path / "best.json").write_text(json.dumps({**best, "interrupted": True}))  # a sweep Ctrl-C stopped
    assert ablate.main(["--from-sweep", str(tmp_path), "--dry-run"]) == 2
    _one_line(capsys, "best.json: the best so far of a sweep stopped before its trials finished")
    (tmp_path / "best.json").write_text(json.dumps({**best, "interrupted": False}))
    assert ablate.main(["--from-sweep", str(tmp_path), "--dry-run"]) == 0


def test_a_bad_value_from_the_command_line_is_blamed_on_it_not_on_the_file(tmp_path, capsys):
    storage = ["--storage", str(tmp_path / "exp"), "--dry-run"]
    assert sweep.main(["--set", "budget.epochs=abc", *storage]) == 2
    _one_line(capsys, "default.yaml: budget.epochs: must be an integer, but got 'abc' (a value given on the command line")
    assert ablate.main(["--seeds", "0", *storage]) == 2
    _one_line(capsys, "seeds: must be a positive integer, but got 0 (a value given on the command line")
    bad_file = tmp_path / "space.yaml"
    bad_file.write_text("name: x\nbogus: 1\n")
    assert sweep.main(["--space", str(bad_file), "--num-samples", "2", *storage]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'bogus'" in err and "command line" not in err  # the file's own fault stays the file's
    assert not (tmp_path / "exp").exists()


def test_the_same_name_with_other_settings_stops_before_anything_starts(tmp_path, capsys):
    """The record a sweep wrote when it started (the real sweeps of tests/orchestrator continue theirs)."""
    from orchestrator.continuing import space_settings

    experiment = tmp_path / "default"
    experiment.mkdir()
    args = ["--storage", str(tmp_path), "--dry-run"]
    (experiment / "sweep.json").write_text(json.dumps({"space": {}}))  # written before settings were kept
    assert sweep.main(args) == 0
    started = load_space(None, [("budget.epochs", 5), ("fixed.lr", 0.001), ("num_samples", 8), ("seed", 3)])
    (experiment / "sweep.json").write_text(json.dumps({"space": {}, "settings": space_settings(started)}))
    capsys.readouterr()
    assert sweep.main(args) == 2
    _one_line(capsys, f"{experiment / 'sweep.json'}: this experiment started with other settings: budget.epochs 5 "
                      f"(now 3), fixed.lr 0.001 (now 0.002), num_samples 8 (now 4) and 1 more; python -m "
                      f"orchestrator.sweep with the same file and values continues it")
    assert sweep.main([*args, "--set", "budget.epochs=5", "--set", "fixed.lr=0.001", "--num-samples", "8",
                       "--set", "seed=3"]) == 0
    assert sweep.main([*args, "--name", "another"]) == 0


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
    """A rerun told to start over (``--overwrite``) that fails replaces nothing of the run before it."""
    out = tmp_path / "run"
    assert cli.main(_train_args(small_coco, out)) == 0
    capsys.readouterr()
    before = {name: (out / name).read_bytes() for name in ("run.json", "checkpoint.pt", "metrics.json")}
    from dmkd.models import DetectorConfig, build_detector

    teacher = tmp_path / "teacher.pt"
    torch.save({"model": build_detector(DetectorConfig(num_classes=2, image_size=64)).state_dict()}, teacher)
    assert cli.main(_train_args(small_coco, out, "--method", "dmkd", "--teacher-checkpoint", str(teacher),
                                  "--teacher-backbone", "resnet18", "--distill", "alpah=1e-5", "--overwrite")) == 2
    _one_line(capsys, "distill.alpah: not a parameter of method 'dmkd'")
    missing = _coco_with(tmp_path, small_coco, lambda d: d["images"].append({"id": 2, "file_name": "gone.png"}))
    assert cli.main(_train_args(small_coco, out, "--val-ann", missing, "--overwrite")) == 2
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


# The last classes (issue 27). Each: one line naming the file, field and value, exit code 2, nothing
# written; a run that stops leaves an earlier run's files in its folder as they were.
def _finished_run(tmp_path, small_coco, capsys) -> tuple:
    out = tmp_path / "run"
    assert cli.main(_train_args(small_coco, out)) == 0
    capsys.readouterr()
    return out, {name: (out / name).read_bytes() for name in ("run.json", "checkpoint.pt", "metrics.json")}


def test_values_that_used_to_pass_silently(tmp_path, small_coco, capsys):
    negative = _coco_with(tmp_path, small_coco, lambda d: d["annotations"][0].update(bbox=[20, 4, -6, 10]))
    assert cli.main(_train_args((negative, small_coco[1]), tmp_path / "a")) == 2
    _one_line(capsys, "changed.json: annotations[0].bbox has a negative width (-6)")
    assert cli.main(_train_args(small_coco, tmp_path / "b", "--head-convs", "-1")) == 2
    _one_line(capsys, "detector.head_convs: must be at least 1")
    results = tmp_path / "results.json"
    results.write_text(json.dumps([{"image_id": 1, "category_id": 1, "bbox": [2, 2, 5, -3], "score": 0.9}]))
    assert evaluate.main(["--ann", str(small_coco[0]), "--results", str(results)]) == 2
    _one_line(capsys, "results.json: [0].bbox has a negative height (-3)")
    assert synthetic.main(["--out", str(tmp_path / "c"), "--val-images", "-5"]) == 2
    _one_line(capsys, "--val-images: must be at least 1, but got -5")
    assert not any((tmp_path / name).exists() for name in "abc")


def test_space_and_grid_files_that_used_to_pass(tmp_path, capsys):
    import yaml

    from orchestrator.space import DEFAULT_SPACE

    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    assert sweep.main(["--space", str(empty), "--dry-run"]) == 2
    _one_line(capsys, "empty.yaml: the search space file is empty")
    for change, expected in (
            (lambda d: d["search"].update(warmup_iters={"type": "int", "low": 1.5, "high": 50}),
             "search.warmup_iters.low: must be a whole number for an int parameter, but got 1.5"),
            (lambda d: d["pair"].update(teacher_checkpoint=str(tmp_path / "gone.pt"), train_teacher=False),
             f"pair.teacher_checkpoint: {tmp_path / 'gone.pt'}: file not found"),
            (lambda d: d.update(data={"train_ann": str(tmp_path / "t.json"), "train_images": str(tmp_path),
                                      "val_ann": str(tmp_path / "v.json"), "val_images": str(tmp_path)}),
             f"data.train_ann: {tmp_path / 't.json'}: not found")):
        data = yaml.safe_load(DEFAULT_SPACE.read_text())
        change(data)
        space = tmp_path / "space.yaml"
        space.write_text(yaml.safe_dump(data))
        assert sweep.main(["--space", str(space), "--dry-run", "--storage", str(tmp_path / "exp")]) == 2
        _one_line(capsys, expected)
    assert sweep.main(["--dry-run", "--resume", "--storage", str(tmp_path / "exp")]) == 2
    _one_line(capsys, f"--resume: no sweep to continue at {tmp_path / 'exp' / 'default'}")
    twice = tmp_path / "grid.yaml"
    twice.write_text(f"base: {DEFAULT_SPACE}\nrows:\n  mgd: {{method: mgd}}\n  fgd: {{method: fgd}}\n  mgd: {{method: pkd}}\n")
    assert ablate.main(["--grid", str(twice), "--dry-run"]) == 2
    _one_line(capsys, "grid.yaml: not valid YAML (line 5): duplicate key 'mgd'")
    assert not (tmp_path / "exp").exists()


def test_a_run_that_stops_at_its_first_step_writes_nothing(tmp_path, small_coco, capsys):
    """A truncated image, a batch larger than the training set, a loss not finite at step 0: the
    message names the cause and the earlier run's run.json, checkpoint and metrics stay as they were."""
    out, before = _finished_run(tmp_path, small_coco, capsys)
    images = tmp_path / "broken"
    images.mkdir()
    png = small_coco[1] / "a.png"
    (images / "a.png").write_bytes(png.read_bytes()[: len(png.read_bytes()) // 2])  # cut mid-way
    assert cli.main(_train_args((small_coco[0], images), out, "--overwrite")) == 2
    _one_line(capsys, f"{images / 'a.png'}: cannot decode image")
    assert cli.main(_train_args(small_coco, out, "--batch-size", "4", "--overwrite")) == 2
    _one_line(capsys, "batch_size: 4 per rank x 1 ranks is more than the 1 training images")
    from dmkd.models import DetectorConfig, build_detector

    teacher = tmp_path / "teacher.pt"
    torch.save({"model": build_detector(DetectorConfig(num_classes=2, image_size=64)).state_dict()}, teacher)
    assert cli.main(_train_args(small_coco, out, "--method", "fitnet", "--teacher-checkpoint", str(teacher),
                                "--teacher-backbone", "resnet18", "--distill", "weight=1e308", "--overwrite")) == 2
    _one_line(capsys, "loss became inf at step 0")
    assert {name: (out / name).read_bytes() for name in before} == before
    fresh = tmp_path / "fresh"
    assert cli.main(_train_args((small_coco[0], images), fresh)) == 2 and not fresh.exists()


def test_a_checkpoint_of_another_detector_says_what_differs(tmp_path, small_coco, capsys):
    from dmkd.models import DetectorConfig, build_detector

    out, before = _finished_run(tmp_path, small_coco, capsys)  # resnet10_quarter, FPN 64, 1 head conv, 1 class
    plain = tmp_path / "plain.pt"  # a bare state dict: read from its shapes
    torch.save(build_detector(DetectorConfig(backbone="resnet18", fpn_channels=128, num_classes=4, image_size=64)).state_dict(), plain)
    assert cli.main(_train_args(small_coco, tmp_path / "a", "--method", "mgd", "--teacher-checkpoint", str(plain))) == 2
    _one_line(capsys, f"{plain}: the checkpoint is fcos/resnet18 with FPN 128, 4 head convs and 3 classes; this run's "
                      f"teacher is fcos/resnet18 with FPN 128, 4 head convs and 1 classes (another class count: set")
    assert cli.main(_train_args(small_coco, tmp_path / "b", "--method", "mgd", "--teacher-checkpoint",
                                str(out / "checkpoint.pt"))) == 2  # a dmkd.train checkpoint: its saved config
    _one_line(capsys, "the checkpoint is fcos/resnet10_quarter with FPN 64, 1 head convs and 1 classes; this run's teacher "
                      "is fcos/resnet18 with FPN 128, 4 head convs and 1 classes (another backbone and FPN width and head depth")
    assert cli.main(_train_args(small_coco, out, "--resume", "--fpn-channels", "32")) == 2
    _one_line(capsys, "this run's detector is fcos/resnet10_quarter with FPN 32, 1 head convs and 1 classes (another FPN "
                      "width: resume with the settings it was written with")
    assert {name: (out / name).read_bytes() for name in before} == before
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_command_line_ends_with_its_exit_code_and_pending_garbage_finalized():
    """Every command line ends through exit_process, which spares the interpreter's shutdown its garbage
    collections by freezing what is alive; what is garbage by then must still be finalized (gc is off
    here, so only exit_process's own collection can finalize the cycle), and the exit code must pass."""
    script = ("import atexit, gc\n"
              "gc.disable()\n"
              "from dmkd.errors import exit_process\n"
              "class Pending:\n"
              "    def __del__(self): print('finalized', flush=True)\n"
              "a, b = Pending(), Pending()\n"
              "a.other, b.other = b, a\n"
              "del a, b\n"
              "atexit.register(lambda: print('frozen', gc.get_freeze_count() > 0, flush=True))\n"
              "exit_process(3)\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 3, run.stderr
    assert run.stdout.split() == ["finalized", "finalized", "frozen", "True"]


def test_an_address_where_nothing_answers_stops_at_once(tmp_path, mini_data, restored_environ, capsys):
    """A mistyped ``--address HOST:PORT`` stops with one line before Ray starts; Ray itself retries it for
    about a quarter of an hour. A Ctrl-C sent after 60 s turns a hang into exit code 130 (a failure here)."""
    import signal

    import ray
    import yaml

    from orchestrator.space import DEFAULT_SPACE

    with socket.socket() as probe:  # a port nothing listens on once this closes
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({**yaml.safe_load(DEFAULT_SPACE.read_text()), "data": mini_data.as_dict()}))

    def interrupt(*_):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.alarm(60)
    try:
        code = sweep.main(["--space", str(space), "--address", f"127.0.0.1:{port}", "--storage", str(tmp_path / "exp"),
                           "--wandb", "off"])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert code == 2
    _one_line(capsys, f"error: --address 127.0.0.1:{port}: nothing answers there (Connection refused); give the "
                      "head node's address and port")
    assert not ray.is_initialized() and not (tmp_path / "exp").exists()


def test_a_trial_this_machine_cannot_hold_stops_before_anything_starts(tmp_path, capsys):
    """A local Ray has this machine's cores and GPUs; Tune would leave a larger trial PENDING for ever."""
    cores = os.cpu_count() or 1
    too_many = ["--set", f"resources.cpus_per_worker={cores + 1}", "--storage", str(tmp_path / "exp"), "--dry-run"]
    assert sweep.main(too_many) == 2
    _one_line(capsys, f"resources.cpus_per_worker: a trial asks for {cores + 1} CPUs, more than this machine's {cores}")
    assert ablate.main(too_many) == 2
    _one_line(capsys, f"resources.cpus_per_worker: a trial asks for {cores + 1} CPUs, more than this machine's {cores}")
    group = ["--set", "resources.num_workers=2", "--set", f"resources.cpus_per_worker={cores / 2 + 0.5:g}",
             "--storage", str(tmp_path / "exp"), "--dry-run"]
    assert sweep.main(group) == 2
    _one_line(capsys, f"a trial asks for 2 workers x {cores / 2 + 0.5:g} CPUs")
    assert sweep.main([*too_many, "--address", "auto"]) == 0  # a cluster may add nodes for it: not checked
    capsys.readouterr()
    if torch.cuda.device_count() == 0:
        assert sweep.main(["--set", "resources.use_gpu=true", "--storage", str(tmp_path / "exp"), "--dry-run"]) == 2
        _one_line(capsys, "resources.use_gpu: true, but torch sees no GPU on this machine")
    assert not (tmp_path / "exp").exists()


def test_inputs_that_failed_only_once_ray_ran_stop_before_it(tmp_path, capsys):
    """Each of these passed --dry-run and failed later: a seed outside numpy's range in Optuna's sampler
    after Ray started (a numpy traceback), a --storage that cannot be made at the experiment's first write
    (a traceback), and a teacher checkpoint that is no checkpoint, or one of another detector (every trial
    failed in turn, and the report took that checkpoint's recorded figures for the teacher's)."""
    from dmkd.config import MAX_SEED
    from dmkd.models import DetectorConfig, build_detector

    dry = ["--dry-run", "--storage", str(tmp_path / "exp")]
    assert sweep.main([*dry, "--set", "seed=-1"]) == 2
    _one_line(capsys, f"default.yaml: seed: must be a whole number from 0 to {MAX_SEED}, but got -1")
    assert ablate.main([*dry, "--seeds", "3", "--set", f"seed={MAX_SEED}"]) == 2  # its reported seeds run up to seed + 2
    _one_line(capsys, f"ablation.yaml: seeds (the last seed, {MAX_SEED} + 2): must be a whole number from 0 to {MAX_SEED}")

    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert sweep.main(["--dry-run", "--storage", str(a_file / "exp")]) == 2
    _one_line(capsys, f"--storage: {a_file / 'exp'}: cannot be made, since {a_file} is a file, not a folder")

    def as_teacher(checkpoint):
        return sweep.main([*dry, "--set", f"pair.teacher_checkpoint={checkpoint}", "--set", "pair.train_teacher=false"])

    garbage = tmp_path / "garbage.pt"
    garbage.write_text("not a checkpoint")
    assert as_teacher(garbage) == 2
    _one_line(capsys, f"default.yaml: pair.teacher_checkpoint: {garbage}: not a readable torch checkpoint")
    space = load_space()
    student, teacher = tmp_path / "student.pt", tmp_path / "teacher.pt"
    for role, file in (("student", student), ("teacher", teacher)):  # the mini-benchmark's 3 classes
        torch.save({"model": build_detector(DetectorConfig(**{**vars(getattr(space.pair, role)), "num_classes": 4})).state_dict()}, file)
    assert as_teacher(student) == 2
    _one_line(capsys, f"default.yaml: pair.teacher_checkpoint: {student}: the checkpoint is fcos/resnet10_quarter with FPN 64, "
                      "2 head convs and 3 classes; this run's teacher is fcos/resnet18 with FPN 128, 4 head convs and 3 classes")
    assert as_teacher(teacher) == 0
    assert not (tmp_path / "exp").exists()


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc, where nothing can be made")
def test_a_storage_that_cannot_be_made_stops_before_ray_starts(tmp_path, restored_environ, capsys):
    """Made as root too: /proc takes no new folder whoever asks (a permission check would pass for root)."""
    import ray

    assert sweep.main(["--storage", "/proc/dmkd-sweeps-test", "--wandb", "off", "--set", "resources.cpus_per_worker=1"]) == 2
    _one_line(capsys, "error: --storage /proc/dmkd-sweeps-test: cannot create /proc/dmkd-sweeps-test/default (")
    assert not ray.is_initialized()


def test_a_user_error_raised_in_a_ray_task_is_told_in_its_own_words():
    """Ray re-raises a task's UserError as a RayTaskError(UserError), whose message ends with the
    UserError's class name before the text; the command line printed both."""
    from ray.exceptions import RayTaskError

    from dmkd.errors import UserError, one_line

    cause = UserError("teacher.pt: the checkpoint is fcos/resnet18 with 80 classes")
    try:
        raise cause
    except UserError:
        import traceback

        raised = RayTaskError("_evaluate", traceback.format_exc(), cause).as_instanceof_cause()
    assert isinstance(raised, UserError) and "dmkd.errors.UserError: teacher.pt" in str(raised)
    assert one_line(raised) == "teacher.pt: the checkpoint is fcos/resnet18 with 80 classes"


def test_a_sweep_that_searches_nothing_is_one_trial_not_the_same_run_n_times(tmp_path, capsys):
    """With nothing searched every trial trained the same settings at the same seed (two identical rows,
    labelled "random search"); an ablation's base space searches nothing on purpose and is not refused."""
    dry = ["--dry-run", "--storage", str(tmp_path / "exp"), "--set", "search={}"]
    assert sweep.main(dry) == 2
    _one_line(capsys, "default.yaml: search: nothing is searched, so each of the 4 trials would train the same settings")
    assert sweep.main([*dry, "--num-samples", "1"]) == 0
    assert ablate.main(dry) == 0
