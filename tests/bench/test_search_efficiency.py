"""The search-efficiency replay against a hand-made 3-configuration table."""
import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from bench.replay import Clock, Lookup, OptunaProposer, load_table, normalised_regret, one_epoch_top_k, replay, rung_correlations
from bench.search_efficiency import _time_to
from orchestrator.space import DEFAULT_SPACE
from orchestrator.space_file import load_space
from tests.helpers import ROOT

# val AP per epoch, two seeds each: B is best at the end; C leads after epoch 1, then collapses
CURVES = {0: {"alpha": 1e-6, "seeds": [[0.10, 0.20, 0.30], [0.12, 0.22, 0.32]]},
          1: {"alpha": 1e-5, "seeds": [[0.20, 0.40, 0.60], [0.18, 0.38, 0.58]]},
          2: {"alpha": 1e-4, "seeds": [[0.30, 0.10, 0.05], [0.28, 0.12, 0.07]]}}


@pytest.fixture
def table_path(tmp_path):
    path = tmp_path / "table.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["config", "seed", "epoch", "val_AP", "alpha", "temperature", "spatial_ratio", "channel_ratio"])
        for config, entry in CURVES.items():
            for seed, curve in enumerate(entry["seeds"]):
                for epoch, value in enumerate(curve, start=1):
                    writer.writerow([config, seed, epoch, value, entry["alpha"], 0.5, 0.65, 0.65])
    return path


class Scripted:
    """Proposes the given points in order (the replay's searcher interface), recording what it is told."""

    def __init__(self, points):
        self.points, self.told = list(points), []

    def ask(self):
        params = self.points.pop(0)
        return params["alpha"], params

    def report(self, handle, value, epoch):
        pass

    def tell(self, handle, value, pruned):
        self.told.append((handle, value, pruned))


def _point(alpha):
    return {"alpha": alpha, "temperature": 0.5, "spatial_ratio": 0.65, "channel_ratio": 0.65}


def test_lookup_answers_the_nearest_configuration_in_log_scale(table_path):
    space = load_space(DEFAULT_SPACE)
    lookup = Lookup(load_table(table_path, space.search), space.search)
    assert lookup.nearest(_point(2e-6)) == 0 and lookup.nearest(_point(4e-6)) == 1  # 4e-6 is nearer 1e-5 in log
    assert lookup.nearest(_point(9e-5)) == 2
    seen = {tuple(lookup.observe(1, np.random.default_rng(s))) for s in range(20)}
    assert seen == {tuple(c) for c in CURVES[1]["seeds"]}  # real seed curves, both drawn


def test_asha_replay_stops_the_collapsing_trial_and_scores_by_the_mean(table_path):
    space = load_space(DEFAULT_SPACE)
    lookup = Lookup(load_table(table_path, space.search), space.search)
    # sequential ASHA, grace 1, factor 2 (rungs at epochs 1 and 2): A and B complete; C passes epoch 1
    # (0.3 above the median of 0.1/0.2 recorded there) and is stopped at epoch 2 (0.1 below 0.2/0.4's)
    proposer = Scripted([_point(1e-6), _point(1e-5), _point(1e-4)])
    curve = replay(lookup, proposer, budget=9, concurrency=1, asha=(1, 2), seed=0).by_compute
    assert [pruned for _, _, pruned in proposer.told] == [False, False, True]
    assert proposer.told[2][0] == 1e-4
    # compute 3 after A; 6 after B; C stopped after 2 epochs (8), then no full trial fits in the last unit
    assert curve[2] == pytest.approx(0.31) and curve[5] == pytest.approx(0.59) and curve[-1] == pytest.approx(0.59)
    assert curve[:2].tolist() == [0.0, 0.0]

    without = replay(lookup, Scripted([_point(1e-6), _point(1e-5), _point(1e-4)]), budget=9, asha=None, seed=0).by_compute
    assert without[-1] == pytest.approx(0.59) and _time_to(-without, np.arange(1, 10), -0.59) == 6  # reached after 6 trial-epochs


def test_rung_correlation_of_the_table(table_path):
    space = load_space(DEFAULT_SPACE)
    rho = rung_correlations(load_table(table_path, space.search))
    assert rho[1] == pytest.approx(-0.5) and rho[2] == pytest.approx(1.0)


def test_tpe_proposer_starts_from_the_paper_default():
    space = load_space(DEFAULT_SPACE)
    proposer = OptunaProposer(space, "tpe", seed=0)
    _, first = proposer.ask()
    assert first == {"alpha": 2e-5, "temperature": 0.5, "spatial_ratio": 0.65, "channel_ratio": 0.65}


def test_regret_is_normalised_over_the_tables_range(table_path):
    table = load_table(table_path, load_space(DEFAULT_SPACE).search)
    # mean final AP: A 0.31, B 0.59 (best), C 0.06 (worst)
    regret = normalised_regret(np.array([0.0, 0.31, 0.59, 0.06]), table)
    assert regret.tolist() == pytest.approx([1.0, (0.59 - 0.31) / (0.59 - 0.06), 0.0, 1.0])


def test_the_wall_clock_charges_every_trial_start(table_path):
    """Start-up 10 s, epochs 2 s: one worker finishes A at 10 + 3 x 2 = 16 s and B at 16 + 16 = 32 s; two
    workers start both at once and finish both at 16 s. Compute is the same on both clocks."""
    lookup = Lookup(load_table(table_path, load_space(DEFAULT_SPACE).search), load_space(DEFAULT_SPACE).search)
    clock = Clock(startup_s=10.0, epoch_s=2.0)
    one = replay(lookup, Scripted([_point(1e-6), _point(1e-5)]), budget=6, concurrency=1, seed=0, clock=clock)
    assert one.events == [(16.0, pytest.approx(0.31)), (32.0, pytest.approx(0.59))] and one.trials_started == 2
    assert one.at_times(np.array([15.0, 16.0, 31.0, 40.0]), 0.0).tolist() == pytest.approx([0.0, 0.31, 0.31, 0.59])
    two = replay(lookup, Scripted([_point(1e-6), _point(1e-5)]), budget=6, concurrency=2, seed=0, clock=clock)
    assert [moment for moment, _ in two.events] == [16.0, 16.0] and two.by_compute[-1] == pytest.approx(0.59)
    no_startup = replay(lookup, Scripted([_point(1e-6), _point(1e-5)]), budget=6, concurrency=1, seed=0, clock=Clock(0.0, 2.0))
    assert [moment for moment, _ in no_startup.events] == [6.0, 12.0]


def test_the_one_epoch_baseline_finishes_the_best_first_epochs(table_path):
    """Budget 9 of 3 epochs: 7 configurations for one epoch, the best one finished. C leads after one epoch
    (0.30) and collapses, so the baseline ends with C's mean final AP: the failure mode it risks."""
    space = load_space(DEFAULT_SPACE)
    lookup = Lookup(load_table(table_path, space.search), space.search)
    run = one_epoch_top_k(lookup, space, budget=9, seed=0)
    assert run.trials_started == 8 and run.by_compute[-1] == pytest.approx(0.06)
    assert run.by_compute[:7].tolist() == [0.0] * 7


def test_cli_replays_a_table_and_writes_the_curves(table_path, tmp_path):
    run = subprocess.run([sys.executable, "bench/search_efficiency.py", "--table", str(table_path), "--repeats", "3",
                          "--trials", "4", "--concurrency", "1", "2", "--processes", "1", "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    names = {"random", "tpe", "asha+random", "asha+tpe", "one-epoch top-K"}
    assert set(summary["searchers"]) == {f"{n} @{c}" for n in names for c in (1, 2)}
    assert summary["budget_trial_epochs"] == 12 and summary["best_configuration_AP"] == pytest.approx(0.59)
    assert "speed-up, wall-clock" in run.stdout and (tmp_path / "out" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    rows = list(csv.DictReader((tmp_path / "out" / "curves.csv").open()))
    assert len(rows) == 5 * 2 * (12 + 200)


def test_a_table_must_hold_the_space_parameters(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("config,seed,epoch,val_AP,alpha\n0,0,1,0.1,1e-6\n")
    with pytest.raises(SystemExit, match="needs columns"):
        load_table(bad, load_space(DEFAULT_SPACE).search)


def test_the_table_generator_writes_a_grid_the_ablation_runner_accepts(tmp_path):
    from bench.search_table import sobol_points, write_grid
    from orchestrator.grid import load_grid

    space = load_space(DEFAULT_SPACE)
    points = sobol_points(space.search, 8)
    assert len({p["alpha"] for p in points}) == 8
    for name, param in space.search.items():
        values = [p[name] for p in points]
        assert param.low <= min(values) and max(values) <= param.high
        assert max(values) - min(values) > 0.5 * (param.high - param.low)  # spread over the range, not clustered
    grid = load_grid(str(write_grid(DEFAULT_SPACE, points, 2, "table", tmp_path)))
    assert grid.seeds == [0, 1] and len(grid.rows) == 9 and grid.rows["p003"].params == points[3]  # + the none row


def test_a_plan_holds_the_trials_configs_and_the_export_skips_cut_runs(tmp_path):
    """The Ray-free path: each plan entry is the TrainConfig the trial would get (seed 0 of every point
    first), and a run whose metrics.json stops short of the budget (cut mid-way) is not in the table."""
    from bench.search_table import export, run_rows, sobol_points, write_plan

    space = load_space(DEFAULT_SPACE)
    points = sobol_points(space.search, 4)
    plan = tmp_path / "plan.json"
    assert write_plan(DEFAULT_SPACE, points, 2, "teacher.pt", plan) == 8
    entries = json.loads(plan.read_text())
    assert [e["id"] for e in entries[:5]] == ["p000_s0", "p001_s0", "p002_s0", "p003_s0", "p000_s1"]
    first = entries[1]["config"]
    assert first["method"] == "dmkd" and first["teacher_checkpoint"] == "teacher.pt" and first["epochs"] == 3
    assert first["distill"]["alpha"] == points[1]["alpha"] and first["batch_size"] == 8
    runs = tmp_path / "runs"
    curves = {"p000_s0": [0.1, 0.3, 0.5], "p001_s0": [0.2, 0.4], "p000_s1": [0.15, 0.35, 0.55]}  # p001 was cut
    for run_id, aps in curves.items():
        (runs / run_id).mkdir(parents=True)
        epochs = [{"epoch": e + 1, "val/AP": ap} for e, ap in enumerate(aps)]
        (runs / run_id / "metrics.json").write_text(json.dumps({"epochs": epochs, "final": epochs[-1]}))
    rows = run_rows(runs, plan, space.search)
    assert sorted({(r[0], r[1]) for r in rows}) == [(0, 0), (0, 1)] and len(rows) == 6
    assert export(rows, space.search, tmp_path / "t.csv") == 6
    table = load_table(tmp_path / "t.csv", space.search)
    assert table.final_mean(0) == pytest.approx(0.525)


def test_seed_noise_is_measured_from_seed_pairs_and_added_to_one_seed_rows(table_path, tmp_path):
    space = load_space(DEFAULT_SPACE)
    table = load_table(table_path, space.search)
    noise = table.seed_noise()
    # (seed 0 - seed 1) / sqrt(2) of each configuration, e.g. config 0: (-0.02, -0.02, -0.02) / sqrt(2)
    assert noise.shape == (3, 3) and np.allclose(noise[0], [-0.02 / 2 ** 0.5] * 3) and np.allclose(noise[2, 1], -0.02 / 2 ** 0.5)
    one_seed = tmp_path / "one_seed.csv"
    lines = table_path.read_text().splitlines()
    one_seed.write_text("\n".join([lines[0], *[line for line in lines[1:] if line.split(",")[1] == "0"]]) + "\n")
    single = load_table(one_seed, space.search)
    assert single.seed_noise().size == 0
    rng = np.random.default_rng(0)
    plain = Lookup(single, space.search).observe(1, rng)
    noisy = [Lookup(single, space.search, noise).observe(1, rng) for _ in range(20)]
    assert np.allclose(plain, CURVES[1]["seeds"][0])
    offsets = {round(float(n[2] - plain[2]), 6) for n in noisy}  # one measured curve, either sign
    assert offsets <= {round(s * float(c[2]), 6) for c in noise for s in (-1, 1)} and len(offsets) > 1
    # a configuration with two measured seeds draws among them, with nothing added
    two = Lookup(table, space.search, noise).observe(1, rng)
    assert any(np.allclose(two, seed) for seed in CURVES[1]["seeds"])


def test_the_joint_space_plans_each_methods_own_points_and_looks_up_within_a_method(tmp_path):
    """The joint method-and-settings space: a plan of each method's own Sobol points (its parameters
    under METHOD.NAME), the undistilled student once; a proposed point is answered by the nearest
    configuration of the same method only."""
    from bench.joint_space import joint_methods, joint_search, split
    from bench.search_table import joint_plan

    methods = joint_methods()
    assert methods[0] == "none" and {"mgd", "fgd", "pkd", "dmkd", "crosskd", "dmkd+crosskd"} <= set(methods)
    search = joint_search(methods)
    assert search["mgd.alpha"].when == {"method": ["mgd"]} and search["fgd.alpha"].high != search["mgd.alpha"].high
    plan = tmp_path / "plan.json"
    count = joint_plan(ROOT / "search_spaces" / "methods.yaml", 2, 1, "teacher.pt", plan)
    entries = json.loads(plan.read_text())
    assert count == len(entries) == 1 + 2 * (len(methods) - 1)
    for entry in entries:
        method, params = split(entry["joint"])
        assert entry["config"]["method"] == method and entry["config"]["distill"] == params
        assert (entry["config"]["teacher_checkpoint"] == "teacher.pt") == (method != "none")
    rows = [["config", "seed", "epoch", "val_AP", *search]]
    points = {0: {"method": "mgd", "mgd.alpha": 1e-6, "mgd.lambda_mgd": 0.5}, 1: {"method": "mgd", "mgd.alpha": 1e-4,
              "mgd.lambda_mgd": 0.5}, 2: {"method": "fitnet", "fitnet.weight": 0.1}, 3: {"method": "none"}}
    for config, point in points.items():
        rows += [[config, 0, epoch, 0.1 * epoch + 0.01 * config, *[point.get(n, "") for n in search]] for epoch in (1, 2)]
    table_file = tmp_path / "joint.csv"
    with table_file.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    lookup = Lookup(load_table(table_file, search), search)
    assert lookup.nearest({"method": "mgd", "mgd.alpha": 2e-6, "mgd.lambda_mgd": 0.9}) == 0
    assert lookup.nearest({"method": "mgd", "mgd.alpha": 5e-5, "mgd.lambda_mgd": 0.5}) == 1
    assert lookup.nearest({"method": "fitnet", "fitnet.weight": 9.0}) == 2 and lookup.nearest({"method": "none"}) == 3
