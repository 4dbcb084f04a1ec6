"""Ablations and reports: a small real ablation on a local Ray (2 seeds, tiny budgets), then the report
checked against the stored trial results."""
import csv
import json
import math
import re
import statistics
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from dmkd.distillers import SEARCH_SPACES
from dmkd.errors import UserError
from orchestrator import ablate
from orchestrator.experiment import data_paths
from orchestrator.grid import load_grid
from orchestrator.reference import ensure_references, reference_folder
from orchestrator.report.ablation import (
    UNFINISHED_TUNING,
    ablation_markdown,
    ablation_table,
    pairing_check,
    recorded_tuning,
)
from orchestrator.report.records import TRIAL_FOLDER, StoredTrial
from orchestrator.report.stats import holm, paired_difference, summarize
from orchestrator.space_file import load_space
from orchestrator.trial import TrialSetup
from orchestrator.trial_training import PICTURE_PNG
from tests.helpers import ROOT, TINY, command_env, run_module, tiny_teacher

PNG = b"\x89PNG\r\n\x1a\n"


def test_confidence_interval_for_known_inputs():
    # Student t quantiles from a printed table (3 decimals): t(0.975; 2) = 4.303, t(0.975; 1) = 12.706
    s = summarize([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["std"] == 1.0 and s["n"] == 3
    assert s["ci95"] == pytest.approx(4.303 / 3 ** 0.5, rel=1e-4)
    two = summarize([0.5, 0.7])
    assert two["ci95"] == pytest.approx(12.706 * statistics.stdev([0.5, 0.7]) / 2 ** 0.5, rel=1e-4)
    assert summarize([0.4])["ci95"] is None and summarize([])["mean"] is None
    big = summarize([float(i) for i in range(40)])  # t(0.975; 39) = 2.023
    assert big["ci95"] == pytest.approx(2.023 * statistics.stdev(range(40)) / 40 ** 0.5, rel=1e-3)


def test_paired_difference_against_hand_computed_values():
    # differences 0.01, 0.02, 0.03 (seed 3 only in one row: left out): mean 0.02, sd 0.01, t = 0.02 / (0.01 / sqrt 3)
    # = 2 sqrt 3; with 2 degrees of freedom the t CDF is 1/2 + t / (2 sqrt(2 + t^2)), so p = 1 - t / sqrt(2 + t^2)
    row = {0: 0.51, 1: 0.42, 2: 0.63, 3: 0.9}
    reference = {0: 0.50, 1: 0.40, 2: 0.60}
    found = paired_difference(row, reference)
    t = 2 * 3 ** 0.5
    assert found["seeds"] == [0, 1, 2] and found["n"] == 3
    assert found["mean"] == pytest.approx(0.02) and found["std"] == pytest.approx(0.01)
    assert found["ci95"] == pytest.approx(4.303 * 0.01 / 3 ** 0.5, rel=1e-4)
    assert found["p"] == pytest.approx(1 - t / (2 + t * t) ** 0.5, rel=1e-6)  # 0.0742: not significant
    assert found["significant"] is False
    # an unpaired comparison of the same numbers would differ: the rows' own spread is ~0.1, not 0.01
    assert summarize(list(row.values())[:3])["std"] > 5 * found["std"]
    clear = paired_difference({0: 0.60, 1: 0.52, 2: 0.71, 3: 0.55}, {0: 0.50, 1: 0.41, 2: 0.60, 3: 0.46})
    assert clear["significant"] is True and clear["p"] < 0.001
    assert paired_difference({0: 0.5}, {0: 0.4})["p"] is None  # one seed: no test


def test_holm_adjustment_against_hand_computed_values():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1: 0.02, 0.03, 0.06, 0.04 -> kept monotone: 0.06 for the last
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # the first README table's four comparisons against none: MGD's 0.047 does not survive the correction
    assert holm([0.012, 0.047, 0.012, 0.64]) == pytest.approx([0.048, 0.094, 0.048, 0.64])
    assert holm([0.9, 0.8]) == [1.0, 1.0] and holm([]) == []


def test_a_table_corrects_every_comparison_it_makes_and_shows_n():
    rows = {"none": {"method": "none", "params": {}}, "mgd": {"method": "mgd", "params": {}},
            "dmkd": {"method": "dmkd", "params": {}}}
    trials = [_trial(row, seed, ap) for row, aps in (("none", (0.40, 0.42, 0.45)), ("mgd", (0.47, 0.47, 0.55)),
                                                    ("dmkd", (0.50, 0.49, 0.57))) for seed, ap in enumerate(aps)]
    table = {e["row"]: e for e in ablation_table(trials, rows, budget=2)}
    comparisons = [table["mgd"]["delta_AP"], table["dmkd"]["delta_AP"], table["dmkd"]["delta_best_baseline"]]
    adjusted = holm([c["p"] for c in comparisons])
    for comparison, expected in zip(comparisons, adjusted):
        assert comparison["p_holm"] == pytest.approx(expected) and comparison["family"] == 3
        assert comparison["significant"] == (expected < 0.05)
    assert any(c["p"] < 0.05 <= c["p_holm"] for c in comparisons)  # a raw "significant" the correction removes
    cell = ablation_markdown(list(table.values()), None, "test", "", {})
    line = next(text for text in cell if text.startswith("| mgd |"))
    assert "(n=3)" in line and "Holm" in line


def test_identical_differences_get_the_exact_sign_flip_p_value_not_zero():
    # every seed moved by exactly +0.125 (exact in binary): 2 of the 2^3 sign patterns are as extreme
    found = paired_difference({0: 0.5, 1: 0.75, 2: 0.25}, {0: 0.375, 1: 0.625, 2: 0.125})
    assert found["std"] == 0 and found["p"] == pytest.approx(0.25) and found["significant"] is False
    assert found["ci95"] is None and found["test"].startswith("exact sign-flip")
    five = paired_difference({i: 0.5 for i in range(5)}, {i: 0.25 for i in range(5)})
    assert five["p"] == pytest.approx(1 / 16) and five["significant"] is False  # never "certain" from 5 seeds
    assert paired_difference({0: 0.5, 1: 0.5}, {0: 0.5, 1: 0.5})["p"] == 1.0


def test_default_grid_loads_with_every_method():
    grid = load_grid(seeds=3)
    assert grid.seeds == [0, 1, 2]
    assert load_grid().seeds == [0, 1, 2, 3, 4]  # the documented tables report 5 seeds
    assert {row.method for row in grid.rows.values()} >= {"none", "fitnet", "mgd", "fgd", "dmkd", "dmkd_spatial",
                                                          "dmkd_channel", "dmkd_fixed"}
    assert grid.space.scheduler.type == "none" and grid.space.budget.epochs == 3
    methods = load_grid("search_spaces/methods.yaml")
    assert {row.method for row in methods.rows.values()} >= {"pkd", "crosskd", "dmkd+crosskd"}


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


def test_from_sweep_gives_its_settings_to_the_rows_of_its_loss_and_training_settings_to_all(tmp_path):
    """--from-sweep put the sweep's distillation values among the base's fixed values, where each row's own
    values won (the default grid's DMKD rows set all of theirs, so the sweep's choice reached none of them)
    and a row of another loss taking a parameter of the same name got it (MGD's alpha from a DMKD sweep)."""
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "best.json").write_text(json.dumps({
        "method": "dmkd", "params": {"alpha": 2e-5, "temperature": 0.5, "lr": 0.003},  # what the sweep searched
        "train": {"batch_size": 8, "lr": 0.003}, "interrupted": False,
        "distill": {"alpha": 2e-5, "temperature": 0.5, "spatial_ratio": 0.6, "channel_ratio": 0.7}}))
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"base": str(ROOT / "search_spaces" / "default.yaml"), "rows": {
        "dmkd": {"method": "dmkd", "params": {"alpha": 4e-7, "temperature": 0.25}},
        "dmkd_spatial": {"method": "dmkd_spatial"},
        "alpha_off": {"method": "dmkd", "params": {"alpha": 0.0}, "tune": False},  # kept as written
        "mgd": {"method": "mgd"}}}))
    grid = load_grid(path, from_sweep=str(sweep))
    assert grid.space.fixed["lr"] == 0.003 and grid.space.fixed["batch_size"] == 8
    swept = {"alpha": 2e-5, "temperature": 0.5, "spatial_ratio": 0.6, "channel_ratio": 0.7}
    assert grid.rows["dmkd"].params == swept and grid.rows["dmkd_spatial"].params == swept
    assert grid.rows["alpha_off"].params == {"alpha": 0.0, "spatial_ratio": 0.6, "channel_ratio": 0.7}
    assert grid.rows["mgd"].params == {} and grid.space.train_config({}, method="mgd").distill == {}
    assert sorted(grid.from_sweep["rows"]) == ["alpha_off", "dmkd", "dmkd_spatial"]


def test_a_space_and_a_grid_given_to_the_wrong_command_say_which_command_runs_them():
    space, grid = ROOT / "search_spaces" / "default.yaml", ROOT / "search_spaces" / "methods.yaml"
    with pytest.raises(UserError, match=rf"^{re.escape(str(space))}: a search space .*orchestrator\.sweep --space "):
        load_grid(space)
    with pytest.raises(UserError, match=rf"^{re.escape(str(grid))}: an ablation grid .*orchestrator\.ablate --grid "):
        load_space(grid)


def _trial(row, seed, ap=None, error=None, init=7):
    history = [] if ap is None else [{"epoch": 1, "val/AP": ap / 2, "pairing/student_init": init},
                                     {"epoch": 2, "val/AP": ap, "test/AP": ap - 0.01, "test/APl": -1.0}]
    return StoredTrial(f"{row}{seed}", {"row": row, "seed": seed}, history, error)


def test_table_marks_failures_untuned_rows_and_broken_pairing():
    rows = {"none": {"method": "none", "params": {}}, "fitnet": {"method": "fitnet", "params": {"weight": 0.1}},
            "dmkd": {"method": "dmkd", "params": {"alpha": 1e300}}}
    trials = [_trial("none", 0, 0.40), _trial("none", 1, 0.42), _trial("fitnet", 0, 0.45), _trial("fitnet", 1, 0.50, init=8),
              _trial("dmkd", 0, error="NonFiniteLossError: loss became inf at step 0"), _trial("dmkd", 1, error="boom")]
    tuning = {"fitnet": {"trials": 0, "epochs": 0, "searched": {}, "chosen": {}, "note": "not tuned (tune: false)"}}
    table = {e["row"]: e for e in ablation_table(trials, rows, budget=2, tuning=tuning)}
    assert table["dmkd"]["failed"] == 2 and table["dmkd"]["AP"]["n"] == 0 and table["dmkd"]["delta_AP"]["n"] == 0
    assert table["fitnet"]["delta_AP"]["mean"] == pytest.approx(((0.45 - 0.40) + (0.50 - 0.42)) / 2)
    assert table["fitnet"]["best_baseline"] == "fitnet" and table["fitnet"]["delta_best_baseline"] is None
    lines = "\n".join(ablation_markdown(list(table.values()), None, "test", pairing_check(trials), tuning))
    assert "- dmkd, seed 0: NonFiniteLossError: loss became inf at step 0" in lines and "not tuned (tune: false)" in lines
    assert "| n/a |" in lines  # COCO's -1 for a size without objects
    assert "Pairing: **broken** for seed(s) [1]" in pairing_check(trials)


def test_rows_of_an_ablation_stopped_while_tuning_read_unfinished_not_untuned():
    rows = {"none": {"method": "none", "params": {}}, "fitnet": {"method": "fitnet", "params": {"weight": 0.1}},
            "mgd": {"method": "mgd", "params": {"alpha": 1e-6, "lambda_mgd": 0.5}}}
    planned = {"plan": {"tuning_trials": {"fitnet": 4}}}  # ablation.json as written before tuning: no "tuning"
    tuning = recorded_tuning(planned)
    table = ablation_table([_trial("none", 0, 0.40)], rows, budget=2, tuning=tuning)
    cells = {line.split(" | ")[0].strip("| "): line for line in ablation_markdown(table, None, "val", "", tuning)
             if line.startswith("| ") and " | " in line}
    assert UNFINISHED_TUNING in cells["fitnet"] and "not tuned" in cells["mgd"] and UNFINISHED_TUNING not in cells["mgd"]
    finished = {"fitnet": {"trials": 4, "epochs": 2, "searched": {}, "chosen": {}}}
    assert recorded_tuning({**planned, "tuning": finished}) == finished


def _grid(tmp_path, mini_data, grid: dict, name: str) -> Path:
    """An ablation grid on a tiny pair (a saved random teacher) and its base space, written to ``tmp_path``."""
    teacher = tiny_teacher(mini_data)
    base = yaml.safe_load((ROOT / "search_spaces" / "default.yaml").read_text())
    base.update(name="base", max_concurrent=2, max_failures=0,
                pair={"teacher": TINY, "student": TINY, "teacher_checkpoint": str(teacher), "train_teacher": False},
                data=mini_data.as_dict(),
                fixed={"batch_size": 4, "warmup_iters": 1}, budget={"epochs": 2, "max_iters": 2},
                resources={"num_workers": 1, "use_gpu": False, "cpus_per_worker": 1})
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(sort_keys=False, data={"name": name, "base": "base.yaml", **grid}))
    return path


def _ablation(tmp_path, mini_data, grid: dict, *extra: str, name: str = "abl"):
    """Run ``python -m orchestrator.ablate`` on the grid in its own process."""
    path = _grid(tmp_path, mini_data, grid, name)
    env = command_env(tmp_path)
    run = run_module("orchestrator.ablate", "--grid", str(path), "--storage", str(tmp_path / "exp"), "--wandb", "offline",
                     *extra, env=env)
    return run, tmp_path / "exp" / name, env


def _stored(experiment: Path) -> dict:
    """Tune's own records of every trial: (row, seed) -> reported results."""
    stored = {}
    for folder in experiment.glob("run_trial_*"):
        config = json.loads((folder / "params.json").read_text())
        results = folder / "result.json"
        lines = [json.loads(line) for line in results.read_text().splitlines() if line.strip()] if results.is_file() else []
        stored[(config["row"], config["seed"])] = lines
    return stored


@pytest.mark.ray
def test_tuned_ablation_with_reference_row_and_paired_statistics(tmp_path, mini_data, capsys):
    run, experiment, env = _ablation(tmp_path, mini_data, {
        "seeds": 2, "tune": {"trials": 2, "epochs": 1},
        "rows": {"mgd": {"method": "mgd"}, "dmkd": {"method": "dmkd", "params": {"alpha": 3e-6}}}})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    # equal tuning budget: every row's study ran the same trials for the same epochs, default first
    for row, first in (("mgd", {"alpha": 2e-5, "lambda_mgd": 0.65}),
                       ("dmkd", {"alpha": 3e-6, "temperature": 0.5, "spatial_ratio": 0.65, "channel_ratio": 0.65})):
        folder = experiment / "tune" / row
        results = list(csv.DictReader((folder / "results.csv").open()))
        assert len(results) == 2 and {r["epochs"] for r in results} == {"1"}
        trials = optuna.load_study(study_name=row, storage=f"sqlite:///{folder / 'optuna.db'}").trials
        assert len(trials) == 2 and trials[0].params == first
        assert set(trials[0].params) == set(SEARCH_SPACES[row])
    record = json.loads((experiment / "ablation.json").read_text())
    for row in ("mgd", "dmkd"):
        best = json.loads((experiment / "tune" / row / "best.json").read_text())
        assert record["rows"][row]["params"] == {**({"alpha": 3e-6} if row == "dmkd" else {}), **best["params"]}
        tuning = record["tuning"][row]
        assert tuning["trials"] == 2 and tuning["epochs"] == 1 and tuning["seed"] == 1000
        # 2 trials: the given first point and one of TPE's random start-up, so it was random search
        assert tuning["origins"] == {"given": 1, "random": 1, "tpe": 0} and tuning["startup_trials"] == 2
        assert tuning["compute"]["trial_epochs"] == 2 and tuning["compute"]["cpu_s"] > 0
        assert tuning["first_point_ratio_step0"] > 0 and tuning["lowest_ratio_step0"] <= tuning["first_point_ratio_step0"]
    assert record["tuning"]["mgd"]["sampler_seed"] != record["tuning"]["dmkd"]["sampler_seed"]
    assert record["plan"]["tuning_seed"] == 1000 and record["seeds"] == [0, 1]
    # tuning never touched the test split, and its runs are not the reported ones: other weights, other data order
    tuned = [json.loads(line) for f in (experiment / "tune").glob("*/run_trial_*/result.json")
             for line in f.read_text().splitlines() if line.strip()]
    assert len(tuned) == 4 and not any(k.startswith("test/") for line in tuned for k in line)
    tuning_prints = {(line["pairing/student_init"], line["pairing/data_order"]) for line in tuned}
    assert len(tuning_prints) == 1

    # the seeds ran at each row's chosen parameters, full budget, and evaluated the held-out test split
    stored = _stored(experiment)
    assert set(stored) == {(row, seed) for row in ("mgd", "dmkd") for seed in (0, 1)}
    for lines in stored.values():
        assert lines[-1]["epoch"] == 2 and "test/AP" in lines[-1] and "test/AP" not in lines[0]
    # DMKD's picture (MGD has none), drawn after the last epoch: in that epoch's checkpoint and the trial's W&B run
    for folder in experiment.glob(f"{TRIAL_FOLDER}*"):
        dmkd = json.loads((folder / "params.json").read_text())["row"] == "dmkd"
        drawn = [p.parent.name for p in folder.glob(f"checkpoint_*/{PICTURE_PNG}")]
        assert drawn == (["checkpoint_000001"] if dmkd else []), (folder.name, drawn)
        logged = (experiment / "wandb").glob(f"offline-run-*-{folder.name.removeprefix(TRIAL_FOLDER)}/files/media/images/*")
        assert [p.name.startswith("attention_1_") and p.suffix == ".png" for p in logged] == ([True] if dmkd else [])

    # the reference row: trained once per seed through the trial machinery, cached outside the experiment
    reference = json.loads((experiment / "reference.json").read_text())
    assert set(reference) == {"0", "1"}
    (cache,) = (tmp_path / "exp" / "references").iterdir()
    assert sorted(p.name for p in cache.glob("seed*.json")) == ["seed0.json", "seed1.json"]

    # pairing: one seed, one initial student and one data order in every row (the reference included)
    for seed in (0, 1):
        inits = {stored[(row, seed)][0]["pairing/student_init"] for row in ("mgd", "dmkd")}
        inits.add(reference[str(seed)]["history"][0]["pairing/student_init"])
        orders = {stored[(row, seed)][0]["pairing/data_order"] for row in ("mgd", "dmkd")}
        assert len(inits) == 1 and len(orders) == 1
    assert stored[("mgd", 0)][0]["pairing/student_init"] != stored[("mgd", 1)][0]["pairing/student_init"]
    reported_prints = {(lines[0]["pairing/student_init"], lines[0]["pairing/data_order"]) for lines in stored.values()}
    assert not reported_prints & tuning_prints  # no reported trial is a tuning trial
    assert all(not lines[0]["pairing/data_order"] == next(iter(tuning_prints))[1] for lines in stored.values())

    # the report: test split, paired differences recomputed by hand from the stored records
    report = json.loads((experiment / "report.json").read_text())
    table = {e["row"]: e for e in report["table"]}
    assert list(table) == ["none", "mgd", "dmkd"] and {e["split"] for e in table.values()} == {"test"}
    test_ap = {row: {seed: stored[(row, seed)][-1]["test/AP"] for seed in (0, 1)} for row in ("mgd", "dmkd")}
    test_ap["none"] = {seed: reference[str(seed)]["final"]["test/AP"] for seed in (0, 1)}
    val_mean = {row: statistics.fmean(stored[(row, s)][-1]["val/AP"] for s in (0, 1)) for row in ("mgd", "dmkd")}
    assert table["mgd"]["best_baseline"] == "mgd" and val_mean["mgd"] == pytest.approx(table["mgd"]["val_AP"]["mean"])
    for row, against in (("mgd", "none"), ("dmkd", "none")):
        d = [test_ap[row][s] - test_ap[against][s] for s in (0, 1)]
        found = table[row]["delta_AP"]
        assert found["mean"] == pytest.approx(statistics.fmean(d))
        if d[0] != d[1]:  # 1 degree of freedom: t CDF = 1/2 + atan(t)/pi, so p = 1 - 2 atan(|t|)/pi
            t = statistics.fmean(d) / (statistics.stdev(d) / 2 ** 0.5)
            assert found["p"] == pytest.approx(1 - 2 * math.atan(abs(t)) / math.pi, rel=1e-6)
            assert found["ci95"] == pytest.approx(12.706 * statistics.stdev(d) / 2 ** 0.5, rel=1e-4)
    d = [test_ap["dmkd"][s] - test_ap["mgd"][s] for s in (0, 1)]
    assert table["dmkd"]["delta_best_baseline"]["mean"] == pytest.approx(statistics.fmean(d))
    assert table["none"]["AP"]["mean"] == pytest.approx(statistics.fmean(test_ap["none"].values()))
    markdown = (experiment / "report.md").read_text()
    assert "Results on the test split" in markdown and "Pairing: every row of a seed started from the same" in markdown
    assert "| teacher |" in markdown and "| none | none |" in markdown and "2 trials x 1 ep" in markdown
    assert "Reported seeds: 0, 1. Tuning trained at seed 1000" in markdown and "random search (TPE start-up of 2)" in markdown
    assert "Holm" in markdown and "(n=2)" in markdown
    assert markdown.count("this project's reading of Dual Masked") == 1  # a row is DMKD: the report says what it is
    for row in ("mgd", "dmkd"):  # the distillation loss against the detector's at step 0, from the reported seeds
        ratios = [stored[(row, seed)][0]["loss_ratio/step0"] for seed in (0, 1)]
        assert table[row]["loss_ratio_step0"]["mean"] == pytest.approx(statistics.fmean(ratios)) and min(ratios) > 0
        assert ratios[0] == pytest.approx(stored[(row, 0)][0]["loss/distill_step0"] / stored[(row, 0)][0]["loss/detector_step0"])
    assert (experiment / "ap_per_epoch.png").read_bytes()[:8] == PNG

    # another ablation of the same pair and budget (other rows, seed 0 of the two) finds seed 0's reference in
    # the cache: its key is the student, data, budget and training settings, not the experiment. (The lookup
    # runs in this process, without Ray: a second `orchestrator.ablate` would cost a minute of the suite to
    # show the same thing.)
    other = load_grid(_grid(tmp_path, mini_data, {"seeds": 1, "rows": {"plain": {"method": "none"}}}, name="again"))
    paths, cache_root = data_paths(other.space), tmp_path / "exp" / "references"
    assert reference_folder(other.space, paths, cache_root) == cache
    said = []
    cached = ensure_references(other.space, other.seeds, TrialSetup(None, paths, "unused"), cache_root, log=said.append)
    assert said == [f"reference: cached in {cache}"] and cached == {0: reference["0"]}

    # the report command reads the stored results again, into another folder; the teacher's stored
    # figures are replaced by known, distinct ones (a random tiny teacher scores 0.0 on both splits):
    # the pair table gives the teacher's AP on the split the rows are reported on
    teacher_file = experiment / "teacher.json"
    teacher_file.write_text(json.dumps({**json.loads(teacher_file.read_text()), "val/AP": 0.111, "test/AP": 0.222}))
    again = run_module("orchestrator.report", str(experiment), "--out", str(tmp_path / "r2"),
                       env={**env, "WANDB_MODE": "disabled"}, timeout=300)
    assert again.returncode == 0, again.stderr
    reread = json.loads((tmp_path / "r2" / "report.json").read_text())
    assert reread["table"] == report["table"] and reread["pair"]["teacher"]["AP"] == 0.222
    rows = list(csv.DictReader((tmp_path / "r2" / "report.csv").open()))
    assert [r["row"] for r in rows] == ["none", "mgd", "dmkd"] and {r["split"] for r in rows} == {"test"}
    # the CSV's Δ is the one computed by hand from Tune's stored results, not only the JSON's copy
    by_hand = statistics.fmean(test_ap["dmkd"][s] - test_ap["none"][s] for s in (0, 1))
    assert float(rows[2]["delta_AP"]) == pytest.approx(by_hand, abs=1e-12)
    assert float(rows[2]["delta_AP_n"]) == 2 and float(rows[2]["delta_AP_p_holm"]) >= float(rows[2]["delta_AP_p"])

    # continuing the ablation under its name needs the settings it started with (in this process, and
    # --dry-run: the check comes before anything starts): the same command passes, another seed count stops
    same = ["--grid", str(tmp_path / "abl.yaml"), "--storage", str(tmp_path / "exp"), "--dry-run"]
    assert ablate.main(same) == 0
    capsys.readouterr()
    assert ablate.main([*same, "--seeds", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{experiment / 'ablation.json'}: this experiment started with other settings: seeds [0, 1] " \
        "(now [0, 1, 2]);" in err[0], err


def test_sweep_report_reads_stopped_trials_at_one_epoch(tmp_path, monkeypatch):
    """A sweep's stored results (the files Tune and the sweep write), made by hand: five trials ran the
    3-epoch budget, five were stopped after epoch 1 and one never reported."""
    from orchestrator.report.publish import write_report
    from orchestrator.space import DEFAULT_SPACE, describe
    from orchestrator.space_file import load_space

    monkeypatch.setenv("WANDB_MODE", "disabled")
    experiment = tmp_path / "default"
    experiment.mkdir()
    (experiment / "sweep.json").write_text(json.dumps({"space": describe(load_space(DEFAULT_SPACE)), "git_commit": "x"}))
    (experiment / "reference.json").write_text(json.dumps(
        {"0": {"history": [{"epoch": 3, "val/AP": 0.30}], "final": {"epoch": 3, "val/AP": 0.30}}}))
    for i in range(11):
        folder = experiment / f"run_trial_t{i:02d}"
        folder.mkdir()
        alpha = 10 ** (-6 + 0.2 * i)
        (folder / "params.json").write_text(json.dumps({"alpha": alpha, "temperature": 0.2 + 0.07 * ((3 * i) % 11),
                                                        "spatial_ratio": 0.65, "channel_ratio": 0.65}))
        epochs = 3 if i < 5 else 1 if i < 10 else 0  # AP grows with alpha in every epoch
        lines = [json.dumps({"epoch": e, "val/AP": 0.1 * e + 0.02 * i, "config": {}}) for e in range(1, epochs + 1)]
        (folder / "result.json").write_text("\n".join(lines))
    write_report(experiment)
    report = json.loads((experiment / "report.json").read_text())

    (rung,) = report["rungs"]
    assert rung["epoch"] == 1 and rung["stopped"] == 5 and rung["completed"] == 5
    assert rung["spearman"] == pytest.approx(1.0) and rung["warning"] is None
    assert report["compared_at_epoch"] == 1  # ten trials reached epoch 1; only five reached epoch 3
    importances = report["importances"]  # AP follows alpha; the ratios never varied
    assert importances["alpha"] > 2 * importances["temperature"] and importances["spatial_ratio"] == pytest.approx(0)
    status = {r["trial_id"]: r["status"] for r in report["leaderboard"]}
    assert status["t00"] == "completed" and status["t07"] == "stopped early" and status["t10"] == "unfinished"
    delta = {r["trial_id"]: r["delta_AP"] for r in report["leaderboard"]}
    assert delta["t04"] == pytest.approx(0.3 + 0.08 - 0.30) and delta["t07"] is None  # Δ only at the full budget
    markdown = (experiment / "report.md").read_text()
    assert "epoch 1 (stopped 5 trials): Spearman 1.00 over 5 completed trials" in markdown
    assert "| at epoch |" in markdown and (experiment / "param_scatter.png").read_bytes()[:4] == b"\x89PNG"
    assert "Method: `dmkd`." in markdown and "this project's reading of Dual Masked" in markdown


@pytest.mark.ray
def test_an_ablation_on_a_uri_storage_writes_nothing_beside_it(tmp_path, mini_data):
    """A cloud storage (here a file:// URI: Tune writes through pyarrow as it would to s3://) gets Tune's
    results and nothing else: no folder named after the URI in the working directory, no driver files
    (ablation.json, the report) that would need a local folder, no reference cache. With W&B off, no
    trial draws DMKD's picture (its only reader is the W&B run)."""
    path = _grid(tmp_path, mini_data, {"seeds": 1, "tune": {"trials": 1, "epochs": 1},
                                       "rows": {"dmkd": {"method": "dmkd"}}}, "abl")
    work = tmp_path / "cwd"
    work.mkdir()
    run = subprocess.run([sys.executable, "-m", "orchestrator.ablate", "--grid", str(path), "--storage",
                          f"file://{tmp_path / 'bucket'}", "--wandb", "off"], capture_output=True, text=True,
                         cwd=work, env=command_env(tmp_path), timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert list(work.iterdir()) == []  # nothing written where the command ran (no "file:" or "s3:" folder)
    stored = tmp_path / "bucket" / "abl"
    assert [p.name for p in (stored / "tune").iterdir()] == ["dmkd"] and list(stored.glob("run_trial_*/result.json"))
    checkpoints = list(stored.glob(f"**/{TRIAL_FOLDER}*/checkpoint_*"))
    assert len(checkpoints) == 3 and not list(stored.glob(f"**/{PICTURE_PNG}"))  # the tuning trial's one, the seed's two
    assert not (stored / "ablation.json").exists() and not (stored / "report.md").exists()
    assert not (tmp_path / "bucket" / "references").exists()
    assert "sync it and run `python -m orchestrator.report`" in run.stdout


def test_trial_ids_are_read_whole_from_trial_folders(tmp_path):
    """Tune names a grid's trials (an ablation's) <5 hex>_<index>: the id is everything after run_trial_,
    or every trial of an ablation would share one id."""
    from orchestrator.report.records import read_trials

    for trial_id in ("1a2b3_00000", "1a2b3_00001", "8a9a0fb9"):
        folder = tmp_path / f"run_trial_{trial_id}"
        folder.mkdir()
        (folder / "result.json").write_text(json.dumps({"epoch": 1, "val/AP": 0.1}))
    assert [t.trial_id for t in read_trials(tmp_path)] == ["1a2b3_00000", "1a2b3_00001", "8a9a0fb9"]


def test_a_trial_that_failed_and_then_finished_on_a_retry_counts_as_finished(tmp_path):
    """Tune keeps a trial's error file after a retry that finished (a one-worker trial restarted from its
    checkpoint): what decides is whether the budget was reached."""
    from orchestrator.report.records import read_trials

    for name, epochs in (("run_trial_aaa", 2), ("run_trial_bbb", 1)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "params.json").write_text(json.dumps({"row": "mgd", "seed": 0}))
        (folder / "result.json").write_text("\n".join(json.dumps({"epoch": e, "val/AP": 0.1 * e}) for e in range(1, epochs + 1)))
        (folder / "error.txt").write_text("Failure # 1 (occurred at ...)\nActorDiedError: killed\n")
    recovered, stopped = read_trials(tmp_path)
    assert recovered.failures == 1 and not recovered.failed(2) and stopped.failed(2)
    rows = {"none": {"method": "none", "params": {}}, "mgd": {"method": "mgd", "params": {}}}
    (entry,) = [e for e in ablation_table([recovered], rows, budget=2) if e["row"] == "mgd"]
    assert entry["failed"] == 0 and entry["seeds"] == [0]
