import contextlib
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dmkd.config import TrainConfig, to_dict
from dmkd.engine import fit
from dmkd.models import DetectorConfig
from tests.helpers import TINY_DETECTOR as TINY
from tests.helpers import run_module


def _config(mini_data, out, **overrides) -> TrainConfig:
    values = dict(data=mini_data, out=str(out), detector=TINY, epochs=2, max_iters=3, batch_size=4,
                  warmup_iters=2, seed=3)
    values.update(overrides)
    return TrainConfig(**values)


class _Interrupt(Exception):
    pass


def _stop_after_first_epoch(epoch, metrics, path):
    if epoch == 1:
        raise _Interrupt


def test_resume_gives_the_same_state_as_an_uninterrupted_run(mini_data, tmp_path):
    straight = fit(_config(mini_data, tmp_path / "straight"), progress=False)
    with pytest.raises(_Interrupt):
        fit(_config(mini_data, tmp_path / "resumed"), progress=False, on_epoch_end=_stop_after_first_epoch)
    first = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert first["epoch"] == 1 and first["step"] == 3
    resumed = fit(_config(mini_data, tmp_path / "resumed", resume=True), progress=False)
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 6 and a["epoch"] == b["epoch"] == 2
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for group_a, group_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(group_a["exp_avg"], group_b["exp_avg"])
    assert straight["val/AP"] == resumed["val/AP"]
    assert straight["loss/total"] == resumed["loss/total"]
    history = json.loads((tmp_path / "resumed" / "metrics.json").read_text())["epochs"]
    assert [e["epoch"] for e in history] == [1, 2]


def test_outputs_are_written_and_reproducible(mini_data, tmp_path):
    first = fit(_config(mini_data, tmp_path / "a", epochs=1), progress=False)
    second = fit(_config(mini_data, tmp_path / "b", epochs=1), progress=False)
    assert first["loss/total"] == second["loss/total"] and first["val/AP"] == second["val/AP"]
    run = json.loads((tmp_path / "a" / "run.json").read_text())
    assert run["config"]["seed"] == 3 and run["config"]["detector"]["num_classes"] == 4
    assert run["packages"]["torch"] == torch.__version__.split("+")[0]
    assert "git_commit" in run
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["final"]["epoch"] == 1 and "val/AP" in metrics["final"] and len(metrics["epochs"]) == 1
    predictions = json.loads((tmp_path / "a" / "predictions.json").read_text())
    assert {p["category_id"] for p in predictions} <= {1, 2, 3}
    assert not list((tmp_path / "a").glob(".*.tmp"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Oracle(torch.nn.Module):
    """A "detector" that answers each validation image with its ground truth (found by the image's
    bytes): AP 1.0 on the whole set, about 0.5 if a rank scored only its own half of the images."""

    def __init__(self, dataset):
        super().__init__()
        self.truth = {}
        for index in range(len(dataset)):
            image, target = dataset[index]
            self.truth[image.numpy().tobytes()] = target

    def forward(self, images):
        answers = []
        for image in images:
            target = self.truth[image.numpy().tobytes()]
            answers.append({"boxes": target["boxes"], "labels": target["labels"],
                            "scores": torch.ones(len(target["labels"]))})
        return answers


def _ddp_worker(rank, world, port, config_dict, results):
    from dmkd.engine import load_data
    from dmkd.evaluate import evaluate_detector

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        seen = []
        cfg = TrainConfig.from_dict(config_dict)
        final = fit(cfg, progress=False, on_epoch_end=lambda epoch, metrics, path: seen.append((epoch, path is not None)))
        val = load_data(cfg).val
        oracle, _ = evaluate_detector(_Oracle(val), val, torch.device("cpu"), batch_size=4)
        results[rank] = {"final": final, "seen": seen, "oracle_AP": oracle["AP"]}
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_ddp(mini_data, tmp_path):
    cfg = _config(mini_data, tmp_path / "ddp", epochs=1, max_iters=2, batch_size=2)
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_ddp_worker, args=(2, _free_port(), to_dict(cfg), results), nprocs=2, join=True)
    r0, r1 = results[0], results[1]
    assert r0["final"]["val/AP"] == r1["final"]["val/AP"]  # evaluated once, shared with every rank
    assert r0["oracle_AP"] == r1["oracle_AP"] == pytest.approx(1.0)  # every rank's predictions scored together
    assert r0["final"]["loss/total"] == pytest.approx(r1["final"]["loss/total"])  # reduced over ranks
    assert r0["seen"] == [(1, True)] and r1["seen"] == [(1, False)]  # only rank 0 writes
    run = json.loads((tmp_path / "ddp" / "run.json").read_text())
    assert run["world_size"] == 2
    predictions = json.loads((tmp_path / "ddp" / "predictions.json").read_text())
    assert {p["image_id"] for p in predictions} <= set(range(1, 17))


def test_torchrun_trains_one_run_over_two_processes(mini_data, tmp_path):
    out = tmp_path / "torchrun"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(_free_port()), "-m", "dmkd.train", "--role", "student", "--epochs", "1", "--max-iters", "2",
                          "--batch-size", "2", "--image-size", "64", "--out", str(out),
                          *[f"--{k.replace('_', '-')}={v}" for k, v in mini_data.as_dict().items()]],
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert run.returncode == 0, run.stderr[-3000:]
    results = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 1 and results[0]["epochs"] == 1 and "test/AP" in results[0]  # rank 0 alone reports
    assert json.loads((out / "run.json").read_text())["world_size"] == 2
    assert len(json.loads((out / "metrics.json").read_text())["epochs"]) == 1


def _train_cli(*args):
    """``python -m dmkd.train ARGS`` as its own process (what a user runs)."""
    return run_module("dmkd.train", *args)


def _train_main(*args):
    """The same command line in this process (no interpreter start-up per case): exit code and output."""
    from dmkd.train import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exit_:  # argparse
            code = exit_.code
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def _bad_inputs(tmp_path, small_coco):
    ann, folder = small_coco
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{oops")
    no_images = tmp_path / "noimages.json"
    no_images.write_text(json.dumps({"categories": [{"id": 1, "name": "a"}]}))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"\x89PNG not really")
    return {
        "missing": (["--train-ann", str(tmp_path / "nope.json")], "nope.json: annotation file not found"),
        "json": (["--train-ann", str(bad_json)], "bad.json: not valid JSON"),
        "images": (["--train-ann", str(no_images)], "noimages.json: field 'images' is missing"),
        "arch": (["--train-ann", str(ann), "--arch", "yolo"], "unknown architecture 'yolo'"),
        "decode": (["--train-ann", str(ann), "--train-images", str(broken)], "a.png: cannot decode image"),
    }


@pytest.mark.parametrize("case", ["missing", "json", "images", "arch", "decode"])
def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, small_coco, case):
    ann, folder = small_coco
    args, expected = _bad_inputs(tmp_path, small_coco)[case]
    base = {"--train-ann": str(ann), "--train-images": str(folder), "--val-ann": str(ann), "--val-images": str(folder)}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    out = tmp_path / "out"
    argv = [item for pair in base.items() for item in pair] + [
        "--out", str(out), "--epochs", "1", "--max-iters", "1", "--batch-size", "1", "--image-size", "64",
        "--backbone", "resnet10_quarter", "--fpn-channels", "64"]
    run = _train_main(*argv)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], run.stderr
    assert not (out / "checkpoint.pt").exists() and not (out / "metrics.json").exists()


def test_cli_needs_all_four_data_paths(tmp_path, small_coco):
    ann, _ = small_coco
    run = _train_cli("--train-ann", str(ann), "--out", str(tmp_path / "o"))
    assert run.returncode == 2 and "give all of train_ann" in run.stderr


def test_dmkd_training_lowers_the_distill_loss(mini_data, tmp_path):
    from dmkd.models import build_detector

    teacher_cfg = DetectorConfig(backbone="resnet10_half", fpn_channels=96, image_size=96, head_convs=1, num_classes=4)
    torch.manual_seed(0)
    teacher_path = tmp_path / "teacher.pt"
    torch.save({"model": build_detector(teacher_cfg).state_dict()}, teacher_path)
    cfg = _config(mini_data, tmp_path / "kd", method="dmkd", teacher=teacher_cfg, teacher_checkpoint=str(teacher_path),
                  distill={"alpha": 1e-3}, epochs=3, max_iters=4, lr=3e-3)
    fit(cfg, progress=False)
    history = json.loads((tmp_path / "kd" / "metrics.json").read_text())["epochs"]
    distill = [e["loss/distill"] for e in history]
    assert distill[-1] < 0.8 * distill[0], distill
    assert all(e["loss/total"] == pytest.approx(e["loss/detector"] + e["loss/distill"], rel=1e-5) for e in history)
    assert {"fusion/0/spatial", "fusion/0/channel", "distill/dmkd"} <= set(history[-1])
    state = torch.load(tmp_path / "kd" / "checkpoint.pt", weights_only=True)
    assert any(key.startswith("levels.0.spatial_generator") for key in state["distiller"])


def test_cli_distillation_needs_a_teacher_checkpoint(tmp_path):
    run = _train_main("--method", "dmkd", "--out", str(tmp_path / "o"))
    assert run.returncode == 2 and run.stderr.strip() == ("error: teacher_checkpoint: required for method 'dmkd' "
                                                          "(or the teacher's weights: a torchvision name or a file)")
    run = _train_main("--method", "dmkd", "--teacher-checkpoint", str(tmp_path / "t.pt"), "--out", str(tmp_path / "o"))
    assert run.returncode == 2 and "t.pt: teacher checkpoint file not found" in run.stderr
    run = _train_main("--method", "kd", "--out", str(tmp_path / "o"))
    assert run.returncode == 2 and "error: method: unknown method 'kd'; allowed: none," in run.stderr


def test_atomic_writes_leave_the_previous_file_when_interrupted(tmp_path):
    from dmkd.io import atomic_write, atomic_write_json

    path = tmp_path / "metrics.json"
    atomic_write_json(path, {"epoch": 1})

    def crash(handle):
        handle.write('{"epoch": 2, "half')
        raise KeyboardInterrupt  # a kill in the middle of the write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, crash)
    assert json.loads(path.read_text()) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary file left behind
    checkpoint = tmp_path / "checkpoint.pt"
    atomic_write(checkpoint, lambda handle: torch.save({"step": 1}, handle), mode="wb")
    with pytest.raises(RuntimeError):
        atomic_write(checkpoint, lambda handle: (torch.save({"step": 2}, handle), (_ for _ in ()).throw(RuntimeError())),
                     mode="wb")
    assert torch.load(checkpoint, weights_only=True) == {"step": 1}


def test_a_checkpoint_records_the_figures_of_its_last_evaluation(mini_data, tmp_path):
    """The sweep's teacher row reuses these instead of evaluating again: they must equal a fresh evaluation,
    and count only for the validation set they were measured on."""
    import dataclasses

    from dmkd.engine import load_data
    from dmkd.evaluate import evaluate_detector
    from dmkd.models import build_detector, load_weights
    from orchestrator.teacher import recorded_figures

    cfg = _config(mini_data, tmp_path / "t", epochs=1)
    fit(cfg, progress=False)
    checkpoint = str(tmp_path / "t" / "checkpoint.pt")
    data = load_data(cfg)
    detector = build_detector(dataclasses.replace(TINY, num_classes=data.train.num_classes))
    load_weights(detector, checkpoint)
    fresh, _ = evaluate_detector(detector, data.val, torch.device("cpu"), batch_size=4)
    held_out, _ = evaluate_detector(detector, data.test, torch.device("cpu"), batch_size=4)
    assert recorded_figures(checkpoint, mini_data) == {**{f"val/{k}": v for k, v in fresh.items()},
                                                       **{f"test/{k}": v for k, v in held_out.items()}}
    assert fresh != held_out  # two splits, two sets of figures
    assert recorded_figures(checkpoint, dataclasses.replace(mini_data, val_ann=mini_data.train_ann)) is None
    assert recorded_figures(checkpoint, dataclasses.replace(mini_data, test_ann=mini_data.val_ann)) is None
    plain = tmp_path / "weights.pt"
    torch.save(detector.state_dict(), plain)
    assert recorded_figures(str(plain), mini_data) is None


def test_a_one_process_group_is_not_distributed(tmp_path):
    """A one-worker Ray Train trial has a process group of one: no DDP wrapper and no collectives for it
    (gloo's threads would otherwise start OpenMP teams that slow the loop on small machines)."""
    from dmkd import distributed

    assert not distributed.is_distributed()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert dist.is_initialized() and not distributed.is_distributed()
        assert distributed.world_size() == 1 and distributed.is_main()
        assert distributed.mean_over_ranks({"a": 2.0}, torch.device("cpu")) == {"a": 2.0}
    finally:
        dist.destroy_process_group()
