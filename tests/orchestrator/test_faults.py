"""Fault tolerance on a local Ray, on the one-worker path (the trial trains in its Tune trial's process):
a killed trial process, Ctrl-C and a killed sweep driver, a loss that turns infinite. Each sweep runs as
its own process; a test kills only processes that its own sweep started. (The multi-worker path, a Ray
Train worker group, has its own test in tests/orchestrator/test_sweep.py, and a driver killed between a
stored checkpoint and its record here.)"""
import json
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from orchestrator import ablate, scratch, sweep
from tests.helpers import command_env, study, sweep_command, tiny_space, tune_results, wandb_run_record, wandb_summary

pytestmark = pytest.mark.ray


def _wait_for(condition, timeout: float, what: str, every: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _trial_processes(pid: int, kind: str = "ImplicitFunc") -> list[psutil.Process]:
    """The processes of the sweep ``pid`` that run a Tune trial (a one-worker trial trains there), or with
    ``kind`` RayTrainWorker, the workers of a worker group."""
    found = []
    for process in _descendants(pid):
        try:
            if kind in " ".join(process.cmdline()):
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def test_a_killed_trial_resumes_from_the_last_checkpoint(tmp_path, mini_data):
    space = tiny_space(tmp_path, mini_data, num_samples=1, max_failures=2, scheduler={"type": "none"},
                       budget={"epochs": 5, "max_iters": 8})  # ~2 s epochs: the kill lands mid-trial
    storage = tmp_path / "exp"
    experiment = storage / "tiny"
    scratch_before = set(Path(tempfile.gettempdir()).glob(f"{scratch.PREFIX}*"))
    process = subprocess.Popen(sweep_command(space, storage), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=command_env(tmp_path))
    try:
        # once Tune has the first epoch's result, its checkpoint is committed
        _wait_for(lambda: any(tune_results(experiment).values()), 600, "the first epoch's result")
        victim = _wait_for(lambda: _trial_processes(process.pid), 60, "a trial's process")[0]
        victim.send_signal(signal.SIGKILL)
        output, _ = process.communicate(timeout=900)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output[-3000:]
    (history,) = tune_results(experiment).values()
    assert history[-1]["epoch"] == 5
    first_resumed = next(i for i, r in enumerate(history) if r["resumed_from_epoch"] > 0)
    before = max(r["epoch"] for r in history[:first_resumed]) if first_resumed else 0
    resumed = history[first_resumed]["resumed_from_epoch"]
    assert resumed >= before >= 1  # every reported epoch had its checkpoint: at most the running epoch is lost
    assert history[first_resumed]["epoch"] == resumed + 1
    (trial,) = study(experiment).trials
    assert trial.state.name == "COMPLETE"
    # the killed process's scratch folder went with the restarted trial's start
    assert set(Path(tempfile.gettempdir()).glob(f"{scratch.PREFIX}*")) - scratch_before == set()


@pytest.mark.parametrize("workers", [1, 2], ids=["one-worker", "worker-group"])
def test_a_trial_stored_to_its_end_but_never_recorded_ends_when_continued(tmp_path, mini_data, workers):
    """The driver dies after the trial stored its last epoch's checkpoint and before it recorded that
    epoch's report (here: the driver is stopped while the trial trains its last epoch, then killed). The
    continued sweep restores the trial from that checkpoint; it has nothing left to train and reports the
    epoch from the checkpoint, so Tune, the study and the results end it complete, not an epoch short.
    On both paths: a worker group (Ray Train) restores from its own run's checkpoints."""
    import csv

    epochs = 2
    space = tiny_space(tmp_path, mini_data, num_samples=1, scheduler={"type": "none"}, budget={"epochs": epochs},
                       resources={"num_workers": workers, "use_gpu": False, "cpus_per_worker": 1})
    storage = tmp_path / "exp"
    experiment = storage / "tiny"
    command = sweep_command(space, storage, "--wandb", "off")

    def training_again(trial: psutil.Process, since: float) -> bool:
        """A trial waits, idle, until the driver takes its report; then it trains the next epoch."""
        times = trial.cpu_times()
        return times.user + times.system - since > 0.3

    with (tmp_path / "first.log").open("w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=command_env(tmp_path))
        try:
            trial = _wait_for(lambda: _trial_processes(process.pid, "RayTrainWorker" if workers > 1 else "ImplicitFunc"),
                              600, "the trial's process")[0]
            _wait_for(lambda: epochs - 1 in _checkpointed_epochs(experiment).values(), 600, "the first checkpoint",
                      every=0.02)
            times = trial.cpu_times()
            _wait_for(lambda: training_again(trial, times.user + times.system), 120, "the last epoch", every=0.02)
            process.send_signal(signal.SIGSTOP)
            _wait_for(lambda: epochs in _checkpointed_epochs(experiment).values(), 120, "the last epoch's checkpoint")
            if workers > 1:  # and registered by Ray Train's controller (before it reports to Tune): restored from
                _wait_for(lambda: _registered_epoch(experiment) == epochs, 60, "Ray Train's record of the checkpoint")
            _kill_family(process)
        finally:
            if process.poll() is None:
                process.kill()
    ((trial_id, stored),) = _checkpointed_epochs(experiment).items()
    recorded = [r["epoch"] for r in tune_results(experiment).get(trial_id, [])]
    assert stored == epochs and epochs not in recorded, "the driver recorded the last epoch before it was stopped"

    run = subprocess.run(command, capture_output=True, text=True, env=command_env(tmp_path), timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    history = tune_results(experiment)[trial_id]
    assert [r["epoch"] for r in history].count(epochs) == 1 and history[-1]["epoch"] == epochs
    assert history[-1]["resumed_from_epoch"] == epochs  # reported from the checkpoint, not trained again
    (trial,) = study(experiment).trials
    assert trial.state.name == "COMPLETE" and trial.value == history[-1]["val/AP"]
    assert [r["status"] for r in csv.DictReader((experiment / "results.csv").open())] == ["completed"]


def _registered_epoch(experiment: Path) -> int:
    """The last epoch whose checkpoint a worker group's Ray Train run has registered (what it restores from)."""
    epochs = [0]
    for snapshot in experiment.glob("train/train-*/checkpoint_manager_snapshot.json"):
        try:
            epochs += [r["metrics"]["epoch"] for r in json.loads(snapshot.read_text())["checkpoint_results"]]
        except (ValueError, KeyError, TypeError):
            continue
    return max(epochs)


def _kill_family(process: subprocess.Popen) -> None:
    """SIGKILL the sweep driver and the local Ray it started (a crash: nothing gets to clean up)."""
    family = _descendants(process.pid)
    process.kill()
    for child in family:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    process.wait(timeout=60)


def _checkpointed_epochs(experiment: Path) -> dict[str, int]:
    """trial id -> the last epoch of a whole checkpoint stored for it (what a resumed trial starts from,
    ``orchestrator.trial.stored_epoch``: a folder Ray is still copying does not count)."""
    import pyarrow.fs

    from orchestrator.report.records import TRIAL_FOLDER
    from orchestrator.trial import stored_epoch

    found: dict[str, int] = {}
    fs = pyarrow.fs.LocalFileSystem()
    # a one-worker trial's in Tune's trial folder, a worker group's in its Ray Train run (train/train-<id>)
    for folder in [*experiment.glob(f"{TRIAL_FOLDER}*/checkpoint_*"), *experiment.glob("train/train-*/checkpoint_*")]:
        epoch = stored_epoch(fs, str(folder))
        if epoch is not None:
            trial_id = folder.parent.name.removeprefix(TRIAL_FOLDER).removeprefix("train-")
            found[trial_id] = max(found.get(trial_id, 0), epoch)
    return found


def test_a_sweep_survives_ctrl_c_and_a_killed_driver_without_rerunning_finished_trials(tmp_path, mini_data, capsys):
    """Two trials, one at a time: Ctrl-C during the first, rerun; the driver killed during the second,
    rerun with --resume. Nothing finished is trained again and nothing started starts from scratch."""
    epochs = 3
    space = tiny_space(tmp_path, mini_data, num_samples=2, scheduler={"type": "none"},
                       budget={"epochs": epochs, "max_iters": 3})
    storage = tmp_path / "exp"
    experiment = storage / "tiny"

    def finished_and_running(count: int, logged_again: str | None = None):
        state = _checkpointed_epochs(experiment)
        done = [t for t, e in state.items() if e == epochs]
        running = [t for t, e in state.items() if e < epochs]
        if len(done) < count or not running:
            return None
        return state if logged_again is None or _wandb_resumed(logged_again) else None

    def _wandb_resumed(trial_id: str) -> bool:
        """Whether the second W&B run of ``trial_id`` has its run record on disk. Tune's W&B callback
        writes and finishes a trial's run in an actor of its own, after the trial: a driver killed
        seconds after a trial ended can cut that trial's offline run short (Tune's and Optuna's records
        are not affected), so the kill waits for the record this test reads."""
        runs = sorted((experiment / "wandb").glob(f"offline-run-*-{trial_id}"))
        if len(runs) < 2 or not any(f.stat().st_size > 7 for f in runs[1].glob("*.wandb")):  # 7: the header
            return False
        try:
            return wandb_run_record(runs[1], tmp_path) is not None
        except StopIteration:
            return False

    def run_until(count: int, log: Path, stop, logged_again: str | None = None) -> dict:
        with log.open("w") as handle:  # a file, not a pipe: nobody reads a pipe while the sweep runs
            process = subprocess.Popen(sweep_command(space, storage), stdout=handle, stderr=subprocess.STDOUT,
                                       env=command_env(tmp_path))
            try:
                state = _wait_for(lambda: finished_and_running(count, logged_again), 600,
                                  f"{count} finished trial(s) and one running")
                stop(process)
            finally:
                if process.poll() is None:
                    process.kill()
        return state

    def ctrl_c(process):
        process.send_signal(signal.SIGINT)
        process.wait(timeout=180)
        assert process.returncode == 130  # stopped by the user, as every command line's Ctrl-C

    at_ctrl_c = run_until(0, tmp_path / "ctrl-c.log", ctrl_c)
    (cut_at_ctrl_c,) = [t for t, e in at_ctrl_c.items() if e < epochs]
    # the best so far is marked so, and an ablation does not start from it
    assert json.loads((experiment / "best.json").read_text())["interrupted"] is True
    assert ablate.main(["--from-sweep", str(experiment), "--dry-run"]) == 2
    assert "the best so far of a sweep stopped before its trials finished" in capsys.readouterr().err
    # the same command continues, then dies
    at_kill = run_until(1, tmp_path / "killed.log", _kill_family, logged_again=cut_at_ctrl_c)
    assert "continuing" in (tmp_path / "killed.log").read_text()

    run = subprocess.run(sweep_command(space, storage, "--resume"), capture_output=True, text=True,
                         env=command_env(tmp_path), timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    final = tune_results(experiment)
    assert len(final) == 2 and all(h[-1]["epoch"] == epochs for h in final.values())
    assert json.loads((experiment / "best.json").read_text())["interrupted"] is False
    for history in final.values():
        assert [r["epoch"] for r in history].count(epochs) == 1  # finished once, never trained again
    # (Tune keeps a restored trial's result.json lines from its new session only: the lines before the
    # cut are not all there afterwards, so the resumed_from_epoch records are what tells a resume.)
    for cut in (at_ctrl_c, at_kill):
        (trial_id,) = [t for t, e in cut.items() if e < epochs]
        resumed = [r for r in final[trial_id] if r["resumed_from_epoch"] > 0]
        assert resumed and resumed[0]["resumed_from_epoch"] >= cut[trial_id] >= 1  # from its checkpoint
        assert resumed[0]["epoch"] == resumed[0]["resumed_from_epoch"] + 1
    trials = study(experiment).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 2
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 2

    # W&B: the trial running at Ctrl-C had its run finished with what it had logged (not killed with its
    # records unwritten), and its resumed session continues that run
    (trial_id,) = [t for t, e in at_ctrl_c.items() if e < epochs]
    first, resumed = sorted((experiment / "wandb").glob(f"offline-run-*-{trial_id}"))[:2]
    before = wandb_summary(first, tmp_path)
    assert before["state"] == "finished" and before["summary"]["epoch"] >= at_ctrl_c[trial_id], before
    assert wandb_run_record(resumed, tmp_path)["resume"] is True  # Ray's default would start the run over

    # the same name with another setting stops before anything starts (Tune would restore the search as
    # it was while the trials still to run trained with the new setting); --dry-run checks it the same way
    assert sweep.main([*sweep_command(space, storage)[3:], "--set", f"budget.epochs={epochs + 1}", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{experiment / 'sweep.json'}: this experiment started with other settings: budget.epochs " \
        f"{epochs} (now {epochs + 1});" in err[0], err


def test_a_nan_trial_fails_with_its_reason_after_the_configured_retries(tmp_path, mini_data):
    import csv

    space = tiny_space(tmp_path, mini_data, num_samples=1, max_failures=1, scheduler={"type": "none"},
                       search={"alpha": {"type": "loguniform", "low": 1e299, "high": 1e300}},
                       resources={"num_workers": 1, "use_gpu": False, "cpus_per_worker": 1})
    storage = tmp_path / "exp"
    run = subprocess.run(sweep_command(space, storage), capture_output=True, text=True, env=command_env(tmp_path),
                         timeout=900)
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-3000:]  # it ends: no retrying forever
    experiment = storage / "tiny"
    # Tune's error file holds one "Failure # N" per attempt of the trial
    attempts = [error.read_text().count("Failure # ") for error in experiment.glob("run_trial_*/error.txt")]
    rows = list(csv.DictReader((experiment / "results.csv").open()))
    assert len(rows) == 1 and {r["status"] for r in rows} == {"failed"}
    assert all("loss became inf" in r["error"] for r in rows), [r["error"] for r in rows]
    assert [t.state.name for t in study(experiment).trials] == ["FAIL"]
    assert attempts == [2]  # one try and max_failures=1 retry, then given up
