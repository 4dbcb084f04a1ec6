"""Fault tolerance on a local Ray: a killed Train worker, a killed sweep driver. Each sweep runs as its
own process; a test kills only processes that its own sweep started."""
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from tests.sweep_helpers import study, sweep_command, sweep_env, tiny_space, tune_results

pytestmark = pytest.mark.slow


def _wait_for(condition, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _train_workers(pid: int) -> list[psutil.Process]:
    workers = []
    for process in _descendants(pid):
        try:
            if "RayTrainWorker" in " ".join(process.cmdline()):
                workers.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return workers


def test_a_killed_train_worker_resumes_from_the_last_checkpoint(tmp_path, mini_data):
    space = tiny_space(tmp_path, mini_data, num_samples=1, max_failures=2, scheduler={"type": "none"},
                       budget={"epochs": 20, "max_iters": 8})  # ~1 s epochs: the kill lands mid-trial
    storage = tmp_path / "exp"
    experiment = storage / "tiny"
    process = subprocess.Popen(sweep_command(space, storage), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=sweep_env(tmp_path))
    try:
        # once Tune has the first epoch's result, its checkpoint is committed
        _wait_for(lambda: any(tune_results(experiment).values()), 600, "the first epoch's result")
        victim = _wait_for(lambda: _train_workers(process.pid), 60, "a Train worker")[0]
        victim.send_signal(signal.SIGKILL)
        output, _ = process.communicate(timeout=900)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output[-3000:]
    (history,) = tune_results(experiment).values()
    assert history[-1]["epoch"] == 20
    first_resumed = next(i for i, r in enumerate(history) if r["resumed_from_epoch"] > 0)
    before = max(r["epoch"] for r in history[:first_resumed]) if first_resumed else 0
    resumed = history[first_resumed]["resumed_from_epoch"]
    assert resumed >= before >= 1  # every reported epoch had its checkpoint: at most the running epoch is lost
    assert history[first_resumed]["epoch"] == resumed + 1
    (trial,) = study(experiment).trials
    assert trial.state.name == "COMPLETE"


def test_a_killed_driver_is_resumed_without_rerunning_finished_trials(tmp_path, mini_data):
    space = tiny_space(tmp_path, mini_data, num_samples=2, scheduler={"type": "none"}, budget={"epochs": 5, "max_iters": 3})
    storage = tmp_path / "exp"
    experiment = storage / "tiny"
    process = subprocess.Popen(sweep_command(space, storage), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=sweep_env(tmp_path))
    try:
        def one_done_one_checkpointed():
            results = tune_results(experiment)
            done = [t for t, h in results.items() if h and h[-1]["epoch"] == 5]
            running = [t for t, h in results.items() if h and h[-1]["epoch"] < 5]
            return done if done and running else None

        _wait_for(one_done_one_checkpointed, 600, "a finished trial and a second one past its first epoch")
        family = _descendants(process.pid)
        process.kill()  # the driver dies, and with it the local Ray it started
        for child in family:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    before = tune_results(experiment)
    finished = {t: len(h) for t, h in before.items() if h and h[-1]["epoch"] == 5}
    interrupted = {t: h[-1]["epoch"] for t, h in before.items() if h and h[-1]["epoch"] < 5}
    assert interrupted

    run = subprocess.run(sweep_command(space, storage, "--resume"), capture_output=True, text=True,
                         env=sweep_env(tmp_path), timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    after = tune_results(experiment)
    assert len(after) == 2 and all(h[-1]["epoch"] == 5 for h in after.values())
    for trial_id, count in finished.items():
        assert len(after[trial_id]) == count  # not re-run
    for trial_id, last_epoch in interrupted.items():  # continued from its checkpoint, not from scratch
        first_resumed = next(r for r in after[trial_id] if r["resumed_from_epoch"] > 0)
        assert first_resumed["resumed_from_epoch"] >= last_epoch
        assert first_resumed["epoch"] == first_resumed["resumed_from_epoch"] + 1
    trials = study(experiment).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 2
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 2


def test_a_nan_trial_fails_with_its_reason_after_the_configured_retries(tmp_path, mini_data):
    import csv

    space = tiny_space(tmp_path, mini_data, num_samples=1, max_failures=1, scheduler={"type": "none"},
                       search={"alpha": {"type": "loguniform", "low": 1e299, "high": 1e300}},
                       resources={"num_workers": 1, "use_gpu": False, "cpus_per_worker": 1})
    storage = tmp_path / "exp"
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # this sweep's own Ray logs (short: socket paths)
    try:
        run = subprocess.run(sweep_command(space, storage), capture_output=True, text=True,
                             env={**sweep_env(tmp_path), "RAY_TMPDIR": str(ray_tmp)}, timeout=900)
        attempts = [log.read_text().count("Attempting to start training worker group")
                    for log in ray_tmp.glob("**/logs/train/ray-train-app-controller-*.log")]
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-3000:]  # it ends: no retrying forever
    experiment = storage / "tiny"
    rows = list(csv.DictReader((experiment / "results.csv").open()))
    assert len(rows) == 1 and {r["status"] for r in rows} == {"failed"}
    assert all("loss became inf" in r["error"] for r in rows), [r["error"] for r in rows]
    assert [t.state.name for t in study(experiment).trials] == ["FAIL"]
    assert attempts == [2]  # one try and max_failures=1 retry, then given up
