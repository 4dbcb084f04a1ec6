"""Ablations and reports: a small real ablation on a local Ray (2 seeds, tiny budgets), then the report
checked against the stored trial results."""
import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dmkd.errors import UserError
from dmkd.models import DetectorConfig, build_detector
from orchestrator.ablate import load_grid
from orchestrator.report import summarize

ROOT = Path(__file__).resolve().parent.parent
TINY = {"arch": "fcos", "backbone": "resnet10_quarter", "fpn_channels": 64, "head_convs": 1, "image_size": 96}
PNG = b"\x89PNG\r\n\x1a\n"


def test_confidence_interval_for_known_inputs():
    s = summarize([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["std"] == 1.0 and s["n"] == 3
    assert s["ci95"] == pytest.approx(4.303 / 3 ** 0.5)
    two = summarize([0.5, 0.7])
    assert two["ci95"] == pytest.approx(12.706 * statistics.stdev([0.5, 0.7]) / 2 ** 0.5)
    assert summarize([0.4])["ci95"] is None and summarize([])["mean"] is None
    big = summarize([float(i) for i in range(40)])
    assert big["ci95"] == pytest.approx(1.96 * statistics.stdev(range(40)) / 40 ** 0.5)


def test_default_grid_loads_with_every_method():
    grid = load_grid(seeds=3)
    assert grid.seeds == [0, 1, 2]
    assert {row["method"] for row in grid.rows.values()} >= {"none", "fitnet", "mgd", "fgd", "dmkd", "dmkd_spatial",
                                                              "dmkd_channel", "dmkd_fixed"}
    assert grid.space.scheduler.type == "none" and grid.space.budget.epochs == 3


def test_bad_grids_name_file_and_key(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"base": str(ROOT / "search_spaces" / "default.yaml"),
                                    "rows": {"x": {"method": "mgd", "params": {"spatial_ratio": 0.5}}}}))
    with pytest.raises(UserError, match=r"rows\.x\.params\.spatial_ratio: not a parameter of method 'mgd'"):
        load_grid(path)
    path.write_text(yaml.safe_dump({"base": str(ROOT / "search_spaces" / "default.yaml"), "rows": {"x": {"method": "kd"}}}))
    with pytest.raises(UserError, match=r"rows\.x\.method: unknown method 'kd'"):
        load_grid(path)
    with pytest.raises(UserError, match="--from-sweep: .*best.json: not found"):
        load_grid(from_sweep=str(tmp_path))


@pytest.mark.slow
def test_small_ablation_and_its_report(tmp_path, mini_data):
    torch.manual_seed(0)
    teacher = tmp_path / "teacher.pt"
    torch.save({"model": build_detector(DetectorConfig(**TINY, num_classes=4)).state_dict()}, teacher)
    base = yaml.safe_load((ROOT / "search_spaces" / "default.yaml").read_text())
    base.update(name="base", max_concurrent=2, max_failures=0,
                pair={"teacher": TINY, "student": TINY, "teacher_checkpoint": str(teacher), "train_teacher": False},
                data={k: mini_data[k] for k in ("train_ann", "train_images", "val_ann", "val_images")},
                fixed={"batch_size": 4, "warmup_iters": 1}, budget={"epochs": 2, "max_iters": 2},
                resources={"num_workers": 1, "use_gpu": False, "cpus_per_worker": 1})
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(sort_keys=False, data={
        "name": "abl", "base": "base.yaml", "seeds": 2,
        "rows": {"none": {"method": "none"}, "dmkd": {"method": "dmkd", "params": {"alpha": 1e-4}},
                 "broken": {"method": "dmkd", "params": {"alpha": 1e300}}}}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", "WANDB_MODE": "offline",
           "WANDB_CONFIG_DIR": str(tmp_path / "wc"), "WANDB_CACHE_DIR": str(tmp_path / "wcache")}
    run = subprocess.run([sys.executable, "-m", "orchestrator.ablate", "--grid", str(tmp_path / "grid.yaml"),
                          "--storage", str(tmp_path / "exp"), "--wandb", "offline"],
                         capture_output=True, text=True, env=env, timeout=900)
    experiment = tmp_path / "exp" / "abl"
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-3000:]  # the broken row's trials failed
    assert (experiment / "report.md").is_file()

    # recompute from Tune's stored records
    stored = {}
    for folder in experiment.glob("run_trial_*"):
        config = json.loads((folder / "params.json").read_text())
        results = folder / "result.json"
        lines = [json.loads(l) for l in results.read_text().splitlines() if l.strip()] if results.is_file() else []
        stored[(config["row"], config["seed"])] = lines
    assert set(stored) == {(row, seed) for row in ("none", "dmkd", "broken") for seed in (0, 1)}
    report = json.loads((experiment / "report.json").read_text())
    table = {e["row"]: e for e in report["table"]}
    for row in ("none", "dmkd"):
        finals = [stored[(row, seed)][-1]["val/AP"] for seed in (0, 1)]
        assert all(stored[(row, seed)][-1]["epoch"] == 2 for seed in (0, 1))
        assert table[row]["AP"]["mean"] == pytest.approx(statistics.fmean(finals))
        assert table[row]["AP"]["std"] == pytest.approx(statistics.stdev(finals))
        assert table[row]["seeds"] == [0, 1] and table[row]["failed"] == 0
    assert table["dmkd"]["delta_AP"] == pytest.approx(table["dmkd"]["AP"]["mean"] - table["none"]["AP"]["mean"])
    assert table["broken"]["failed"] == 2 and table["broken"]["AP"]["n"] == 0
    assert any("loss became" in message for message in table["broken"]["failures"])
    assert report["pair"]["teacher"]["AP"] == json.loads((experiment / "teacher.json").read_text())["val/AP"]

    markdown = (experiment / "report.md").read_text()
    assert "| teacher |" in markdown and "| broken | dmkd |" in markdown and "Failed trials:" in markdown
    rows = list(csv.DictReader((experiment / "report.csv").open()))
    assert [r["row"] for r in rows] == ["none", "dmkd", "broken"]
    assert float(rows[1]["AP_mean"]) == pytest.approx(table["dmkd"]["AP"]["mean"])
    assert (experiment / "ap_per_epoch.png").read_bytes()[:8] == PNG

    # the report command reads the stored results again, into another folder
    again = subprocess.run([sys.executable, "-m", "orchestrator.report", str(experiment), "--out", str(tmp_path / "r2")],
                           capture_output=True, text=True, env={**env, "WANDB_MODE": "disabled"}, timeout=300)
    assert again.returncode == 0, again.stderr
    assert json.loads((tmp_path / "r2" / "report.json").read_text())["table"] == report["table"]
