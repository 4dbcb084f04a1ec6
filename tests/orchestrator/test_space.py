import json

import optuna
import pytest
import yaml

from dmkd.errors import UserError
from orchestrator.searcher import PruningAwareOptunaSearch
from orchestrator.space import DEFAULT_SPACE, define_by_run, paper_default_point
from orchestrator.space_file import load_space
from tests.helpers import run_module

FCOS_COCO = "FCOS_ResNet50_FPN_Weights.COCO_V1"


def test_default_space_loads():
    space = load_space(DEFAULT_SPACE)
    assert space.method == "dmkd" and space.pair_name == "fcos-resnet18-fpn128->fcos-resnet10_quarter-fpn64"
    assert {"alpha", "temperature", "spatial_ratio", "channel_ratio"} <= set(space.search)
    assert paper_default_point(space) == {"alpha": 2e-5, "temperature": 0.5, "spatial_ratio": 0.65, "channel_ratio": 0.65}
    cfg = space.train_config({"alpha": 1e-5, "lr": 0.01}, teacher_checkpoint="t.pt")
    assert cfg.distill == {"alpha": 1e-5} and cfg.lr == 0.01 and cfg.batch_size == 8 and cfg.method == "dmkd"


def test_a_trial_config_for_wandb_is_flat_complete_and_named_for_people():
    from dmkd.config import DataPaths
    from dmkd.provenance import provenance
    from orchestrator.callbacks import flat_run_config, run_name
    from orchestrator.grid import Row
    from orchestrator.trial import TrialSetup, trial_train_config

    space = load_space(DEFAULT_SPACE)
    setup = TrialSetup("t.pt", DataPaths(), "unused")
    cfg = trial_train_config({"alpha": 3.1e-6, "temperature": 0.77215}, space=space, setup=setup)
    flat = flat_run_config(cfg, space=space, row=None, versions=provenance())
    assert flat["method"] == "dmkd" and flat["seed"] == 0 and flat["data"] == "mini-benchmark"
    assert flat["distill.alpha"] == 3.1e-6 and flat["distill.temperature"] == 0.77215
    assert flat["distill.spatial_ratio"] == 0.65 and flat["distill.fusion"] == "learned"  # defaults, not only the searched
    assert flat["teacher.backbone"] == "resnet18" and flat["student.backbone"] == "resnet10_quarter"
    assert flat["student.fpn_channels"] == 64 and flat["train.epochs"] == space.budget.epochs
    assert flat["version.torch"] and "git_commit" in flat
    assert all(not isinstance(v, (dict, tuple)) for v in flat.values())
    assert run_name(cfg, None) == "dmkd alpha=3.1e-06 seed 0"

    rows = {"channel": Row("dmkd_channel", {"alpha": 2e-6})}
    cfg = trial_train_config({"row": "channel", "seed": 2}, space=space, setup=setup, rows=rows)
    flat = flat_run_config(cfg, space=space, row="channel", versions={})
    assert flat["distill.branches"] == ["channel"] and flat["row"] == "channel" and flat["seed"] == 2
    assert run_name(cfg, "channel") == "channel alpha=2e-06 seed 2"
    plain = trial_train_config({"row": "none", "seed": 1}, space=space, setup=setup, rows={"none": Row("none")})
    assert run_name(plain, "none") == "none seed 1" and "teacher.backbone" not in flat_run_config(
        plain, space=space, row="none", versions={})


@pytest.mark.parametrize("name", ["retinanet_r50_r18_coco.yaml", "fasterrcnn_r50_r18_coco.yaml"])
def test_shipped_paper_scale_spaces_are_valid(name):
    space = load_space(DEFAULT_SPACE.parent / name)
    assert space.resources.use_gpu and space.pair.teacher.backbone != space.pair.student.backbone
    assert space.train_config({}).detector.image_size == 1333 and space.pair.student.min_size == 800
    # a torchvision COCO teacher and an ImageNet student backbone, as the papers start
    assert space.pair.teacher.weights.endswith("_Weights.COCO_V1") and not space.pair.train_teacher
    assert space.pair.student.backbone_weights == "ResNet18_Weights.IMAGENET1K_V1"


def _write(tmp_path, change):
    data = yaml.safe_load(DEFAULT_SPACE.read_text())
    change(data)
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


BAD = {
    "unknown top key": (lambda d: d.update(epochs=3), "unknown key 'epochs'"),
    "wrong type": (lambda d: d.update(num_samples="many"), "num_samples: must be an integer, but got 'many'"),
    "unknown method": (lambda d: d.update(method="kd"), "method: unknown method 'kd'"),
    "unknown parameter": (lambda d: d["search"].update(beta={"type": "uniform", "low": 0, "high": 1}),
                          "search.beta: unknown parameter for method 'dmkd'; allowed: alpha"),
    "bad distribution": (lambda d: d["search"]["alpha"].update(type="normal"), "search.alpha.type: must be one of uniform"),
    "low above high": (lambda d: d["search"]["alpha"].update(low=1.0, high=0.1), "search.alpha: a loguniform parameter needs low < high"),
    "when on unknown": (lambda d: d["search"]["alpha"].update(when={"fusion": ["learned"]}),
                        "search.alpha.when.fusion: must name another searched categorical parameter"),
    "bad scheduler": (lambda d: d["scheduler"].update(type="pbt"), "scheduler.type: must be one of asha, none"),
    "bad backbone": (lambda d: d["pair"]["student"].update(backbone="vgg"), "pair.student.backbone: unknown backbone 'vgg'"),
    "no teacher": (lambda d: d["pair"].update(train_teacher=False), "pair.teacher_checkpoint: set a checkpoint path"),
    "fixed unknown": (lambda d: d["fixed"].update(momentum=0.9), "fixed.momentum: unknown parameter"),
    # values, not only structure: each would have failed inside a trial, some after the teacher trained
    "batch size 0": (lambda d: d["fixed"].update(batch_size=0), "fixed: batch_size: must be at least 1, but got 0"),
    "negative lr": (lambda d: d["fixed"].update(lr=-0.01), "fixed: lr: must be positive, but got -0.01"),
    "ratio 1.5": (lambda d: d["fixed"].update(spatial_ratio=1.5) or d["search"].pop("spatial_ratio"),
                  "fixed: spatial_ratio must lie in [0, 1] for mask_mode 'topk', but got 1.5"),
    "alpha abc": (lambda d: d["fixed"].update(alpha="abc") or d["search"].pop("alpha"), "alpha: must be a number, but got 'abc'"),
    "negative weight": (lambda d: d["fixed"].update(alpha=-1e-5) or d["search"].pop("alpha"),
                        "alpha must be a finite number >= 0"),
    "range above domain": (lambda d: d["search"]["spatial_ratio"].update(high=1.5),
                           "search.spatial_ratio.high: spatial_ratio must lie in [0, 1]"),
    "temperature below 0": (lambda d: d["search"]["temperature"].update(low=-1.0),
                            "search.temperature.low: temperature must be a finite number > 0, but got -1.0"),
    "unknown choice": (lambda d: d["search"].update(mask_mode={"type": "categorical", "choices": ["topk", "random"]}),
                       "search.mask_mode.choices[1]: mask_mode must be one of topk, threshold, bernoulli, but got 'random'"),
    "choices as a string": (lambda d: d["search"].update(mask_mode={"type": "categorical", "choices": "topk"}),
                            "search.mask_mode.choices: must be a list, but got 'topk'"),
    "when never holds": (lambda d: d["search"].update(mask_mode={"type": "categorical", "choices": ["topk"]},
                                                      alpha={"type": "loguniform", "low": 1e-6, "high": 1e-4,
                                                             "when": {"mask_mode": ["bernoulli"]}}),
                         "search.alpha.when.mask_mode: must list some of mask_mode's choices"),
    "unreported metric": (lambda d: d["objective"].update(metric="val/mAP"), "objective.metric: no trial reports 'val/mAP'"),
    "test split as objective": (lambda d: d["objective"].update(metric="test/AP"), "objective.metric: no trial reports 'test/AP'"),
    "max_iters 0": (lambda d: d["budget"].update(max_iters=0), "budget.max_iters: must be at least 1, but got 0"),
    "grace period too long": (lambda d: d["scheduler"].update(grace_period=3), "scheduler.grace_period: must be less than budget.epochs (3)"),
    "pair cannot be distilled": (lambda d: d["pair"]["student"].update(arch="fasterrcnn"),
                                 "pair: the teacher's FPN levels"),
    "test without val": (lambda d: d["data"].update(test_ann="t.json", test_images="t"), "data: test_ann and test_images need the other four paths"),
    "unknown weights name": (lambda d: d["pair"]["student"].update(backbone_weights="ResNet18_Weights.IMAGENET9K"),
                             "pair.student.backbone_weights: 'ResNet18_Weights.IMAGENET9K' is not a torchvision weights name"),
    "weights file missing": (lambda d: d["pair"]["teacher"].update(weights="nowhere/teacher.pth"),
                             "pair.teacher.weights: nowhere/teacher.pth: neither a file nor a torchvision weights name"),
    "teacher weights and training": (lambda d: d["pair"]["teacher"].update(arch="fcos_resnet50_fpn", weights=FCOS_COCO,
                                                                           backbone="resnet50", fpn_channels=256),
                                     "pair.train_teacher: the teacher's weights are given"),
}


def test_a_pair_of_a_torchvision_coco_teacher_and_an_imagenet_student(tmp_path):
    """Names are checked against torchvision's registry when the space loads; no file is read then."""
    def pair(d):
        d["pair"] = {"teacher": {"arch": "fcos_resnet50_fpn", "weights": FCOS_COCO, "image_size": 96},
                     "student": {"arch": "fcos", "backbone": "resnet18", "fpn_channels": 64, "image_size": 96,
                                 "backbone_weights": "ResNet18_Weights.IMAGENET1K_V1"},
                     "train_teacher": False}
    space = load_space(_write(tmp_path, pair))
    assert (space.pair.teacher.backbone, space.pair.teacher.fpn_channels) == ("resnet50", 256)
    cfg = space.train_config({"alpha": 2e-5}, teacher_checkpoint=None)
    assert cfg.teacher.weights == FCOS_COCO and cfg.teacher_checkpoint is None
    assert cfg.detector.backbone_weights == "ResNet18_Weights.IMAGENET1K_V1"
    cfg.validate(check_files=True)  # the teacher's weights stand in for a checkpoint


@pytest.mark.parametrize("case", list(BAD))
def test_bad_spaces_are_one_line_errors_naming_file_and_key(tmp_path, case):
    change, expected = BAD[case]
    path = _write(tmp_path, change)
    with pytest.raises(UserError) as error:
        load_space(path)
    message = str(error.value)
    assert message.startswith(f"{path}: ") and expected in message and "\n" not in message
    assert not message.startswith(f"{path}: :")  # a top-level key has no field path before it


def test_yaml_syntax_error_and_missing_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("search: [unclosed\n")
    with pytest.raises(UserError, match=r"broken\.yaml: not valid YAML \(line"):
        load_space(path)
    with pytest.raises(UserError, match="search space file not found"):
        load_space(tmp_path / "none.yaml")


def test_conditional_parameters_follow_their_condition():
    path_data = {"method": "dmkd", "search": {
        "mask_mode": {"type": "categorical", "choices": ["topk", "bernoulli"]},
        "channel_ratio": {"type": "uniform", "low": 0.1, "high": 0.9, "when": {"mask_mode": ["topk"]}}}}
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "s.yaml"
        path.write_text(yaml.safe_dump(path_data))
        space = load_space(path)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda trial: (define_by_run(space)(trial), 0.0)[1], n_trials=20)
    for trial in study.trials:
        assert ("channel_ratio" in trial.params) == (trial.params["mask_mode"] == "topk")
    assert {t.params["mask_mode"] for t in study.trials} == {"topk", "bernoulli"}


def test_each_trial_records_whether_tpe_or_its_random_start_up_proposed_it(tmp_path):
    """The given first point, then TPE's random start-up until 2 trials finished, then TPE's model, whose
    relative sampling Optuna itself records on the trial (the constant liar shares it)."""
    from orchestrator.report.search import origin_counts, search_label

    space = load_space(DEFAULT_SPACE)
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")
    searcher = PruningAwareOptunaSearch(space=define_by_run(space), metric="val/AP", mode="max",
                                        sampler=PruningAwareOptunaSearch.tpe(0, 2), storage=storage, study_name="s",
                                        full_epochs=3, startup_trials=2, points_to_evaluate=[paper_default_point(space)])
    for number, trial_id in enumerate("abcd"):
        searcher.suggest(trial_id)
        searcher.on_trial_complete(trial_id, {"val/AP": 0.1 * number, "epoch": 3})
    trials = optuna.load_study(study_name="s", storage=storage).trials
    assert [t.user_attrs["origin"] for t in trials] == ["given", "random", "tpe", "tpe"]
    assert trials[0].params == paper_default_point(space)
    relative = [any(k.startswith("tpe:relative_params") for k in t.system_attrs) for t in trials]
    assert relative == [False, False, True, True]
    assert origin_counts(trials) == {"given": 1, "random": 1, "tpe": 2}
    assert search_label(origin_counts(trials), 2).startswith("TPE: 2 from its model")
    assert search_label(origin_counts(trials[:2]), 2).startswith("random search (TPE start-up of 2)")
    # a one-trial sweep ran the given point alone: neither TPE nor random search
    assert search_label(origin_counts(trials[:1]), 2) == "no search: the given point only (1 trial)"


def test_a_trial_stopped_early_is_pruned_in_the_study(tmp_path):
    space = load_space(DEFAULT_SPACE)
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")
    searcher = PruningAwareOptunaSearch(space=define_by_run(space), metric="val/AP", mode="max",
                                        sampler=optuna.samplers.TPESampler(seed=0), storage=storage,
                                        study_name="s", full_epochs=3, startup_trials=10)
    for trial_id in ("a", "b", "c"):
        assert searcher.suggest(trial_id) is not None
    searcher.on_trial_result("a", {"val/AP": 0.1, "epoch": 1})
    searcher.on_trial_complete("a", {"val/AP": 0.3, "epoch": 3})
    searcher.on_trial_complete("b", {"val/AP": 0.05, "epoch": 1})  # ASHA's stop: no earlier on_trial_result
    searcher.on_trial_complete("c", None, error=True)
    trials = optuna.load_study(study_name="s", storage=storage).trials
    states = [t.state for t in trials]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL]
    assert trials[0].value == 0.3 and trials[1].value == 0.05
    assert trials[1].user_attrs["epochs"] == 1 and trials[1].intermediate_values == {1: 0.05}


def test_a_trial_whose_end_the_study_already_holds_ends_again_quietly(tmp_path):
    """A sweep killed after a trial's end reached the study but before Tune saved its state restores a
    searcher that thinks the trial still runs; the trial then ends a second time."""
    space = load_space(DEFAULT_SPACE)
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")

    def searcher():
        return PruningAwareOptunaSearch(space=define_by_run(space), metric="val/AP", mode="max",
                                        sampler=optuna.samplers.TPESampler(seed=0), storage=storage,
                                        study_name="s", full_epochs=3, startup_trials=10)

    before = searcher()
    before.suggest("a")
    before.suggest("b")
    before.on_trial_result("a", {"val/AP": 0.1, "epoch": 1})
    before.save(str(tmp_path / "searcher.pkl"))  # Tune's last saved state
    before.on_trial_complete("a", {"val/AP": 0.3, "epoch": 3})
    before.on_trial_complete("b", {"val/AP": 0.05, "epoch": 1})

    restored = searcher()
    restored.restore(str(tmp_path / "searcher.pkl"))
    restored.on_trial_result("a", {"val/AP": 0.2, "epoch": 2})
    restored.on_trial_complete("a", {"val/AP": 0.3, "epoch": 3})
    restored.on_trial_complete("b", {"val/AP": 0.05, "epoch": 1})
    trials = optuna.load_study(study_name="s", storage=storage).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED]
    assert trials[0].intermediate_values == {1: 0.1} and trials[0].value == 0.3



def test_trials_a_killed_driver_created_but_tune_never_recorded_are_set_aside(tmp_path):
    """Optuna holds a trial from the moment it is asked, Tune from its next saved state: a driver killed in
    between leaves a trial folder and a RUNNING study trial that the continued sweep never ends (it makes a
    new trial instead). After the Tuner, such folders move out of the tables and such study trials fail,
    marked lost, out of the origin counts; trials of the Tuner, running or not, are left alone."""
    from ray.tune import Result

    from orchestrator.report.records import read_trials
    from orchestrator.report.search import study_origins
    from orchestrator.tuning import set_aside_lost_trials

    space = load_space(DEFAULT_SPACE)
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")
    searcher = PruningAwareOptunaSearch(space=define_by_run(space), metric="val/AP", mode="max",
                                        sampler=optuna.samplers.TPESampler(seed=0), storage=storage,
                                        study_name="s", full_epochs=3, startup_trials=10)
    for trial_id in ("done", "lost", "new", "running"):
        searcher.suggest(trial_id)
        (tmp_path / f"run_trial_{trial_id}").mkdir()
    searcher.on_trial_complete("done", {"val/AP": 0.3, "epoch": 3})
    searcher.on_trial_complete("new", {"val/AP": 0.2, "epoch": 3})
    grid = [Result(metrics={}, checkpoint=None, error=None, path=str(tmp_path / f"run_trial_{t}"))
            for t in ("done", "new", "running")]  # "running": the Tuner's, e.g. after a Ctrl-C
    assert study_origins(tmp_path, "s") == {"given": 0, "random": 4, "tpe": 0}

    set_aside_lost_trials(grid, tmp_path, "s")
    assert sorted(t.trial_id for t in read_trials(tmp_path)) == ["done", "new", "running"]
    assert (tmp_path / "lost_trial_lost").is_dir()
    trials = optuna.load_study(study_name="s", storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE", "RUNNING"]
    assert trials[1].user_attrs["lost"] is True and "lost" not in trials[3].user_attrs
    assert study_origins(tmp_path, "s") == {"given": 0, "random": 3, "tpe": 0}

def _sweep_cli(*args):
    return run_module("orchestrator.sweep", *args)


def test_dry_run_prints_the_plan_without_ray(tmp_path):
    run = _sweep_cli("--dry-run", "--set", "budget.epochs=2", "--num-samples", "5", "--storage", str(tmp_path))
    assert run.returncode == 0, run.stderr
    plan = json.loads(run.stdout)
    assert plan["num_samples"] == 5 and plan["epochs_per_trial"] == 2 and plan["ray"] == "local"
    assert plan["experiment"] == f"{tmp_path}/default" and plan["resources_per_trial"]["workers"] == 1
    assert not (tmp_path / "default").exists()


def test_cli_bad_space_is_one_line(tmp_path):
    path = _write(tmp_path, lambda d: d.update(num_samples=0))
    run = _sweep_cli("--space", str(path), "--dry-run")
    assert run.returncode == 2
    assert run.stderr.strip() == f"error: {path}: num_samples: must be at least 1, but got 0"


def test_dry_run_catches_bad_values_before_anything_is_written(tmp_path, capsys):
    from orchestrator.sweep import main

    path = _write(tmp_path, lambda d: d["search"]["spatial_ratio"].update(high=1.5))
    assert main(["--space", str(path), "--dry-run", "--storage", str(tmp_path / "exp")]) == 2
    assert "search.spatial_ratio.high" in capsys.readouterr().err
    assert main(["--space", str(path), "--storage", str(tmp_path / "exp"), "--wandb", "off"]) == 2  # not a dry run
    assert not (tmp_path / "exp").exists()


def test_the_w_and_b_mode_follows_the_option_then_wandb_mode_then_the_key(tmp_path, monkeypatch):
    """A W&B user's WANDB_MODE (offline on nodes without egress, disabled in CI) was overruled: with an API
    key the trials logged online. ``--wandb`` still wins, and online needs a key."""
    from orchestrator.sweep import resolve_wandb_mode

    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_wandb_mode(None) == "offline" and resolve_wandb_mode("online") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode(None) == "off" and resolve_wandb_mode("offline") == "offline"
    monkeypatch.delenv("WANDB_MODE")
    assert resolve_wandb_mode(None) == "online"
    monkeypatch.delenv("WANDB_API_KEY")
    assert resolve_wandb_mode(None) == "offline" and resolve_wandb_mode("online") == "offline"
