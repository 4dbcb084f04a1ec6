"""The local Ray an experiment starts and stops (``orchestrator.experiment``), on a real Ray."""
from __future__ import annotations

import os
import signal
import threading
import time

import psutil
import pytest
import ray
from ray import tune

from orchestrator.experiment import start_ray, stop_ray, wait_for_ray
from orchestrator.space_file import load_space
from orchestrator.tuning import fit_tuner

pytestmark = pytest.mark.ray


def _ray_workers() -> list[psutil.Process]:
    """Ray's Python worker processes under this process (the raylet's children): ``default_worker.py``
    while they start, ``ray::IDLE`` once they run."""
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            command = process.cmdline()
        except psutil.Error:
            continue
        if command[1:2] and command[1].endswith("default_worker.py") or command[:1] and command[0].startswith("ray::IDLE"):
            found.append(process)
    return found


def test_ray_stops_beside_the_driver_and_the_next_start_waits_for_it(restored_environ):
    os.environ.pop("RAY_prestart_worker_first_driver", None)
    space = load_space()  # one-worker trials
    start_ray(None, space, {})
    try:
        # a sweep of one-worker trials starts no worker processes ahead (no Tune trial could take one)
        assert [p.cmdline() for p in _ray_workers()] == []
        stop_ray()  # returns while Ray's processes stop
        start_ray(None, space, {})  # waits for that, then starts a new Ray
        wait_for_ray()  # nothing left to wait for: had start_ray not waited, this would end the new Ray
        assert ray.is_initialized()
        assert ray.get(ray.remote(lambda: 2).remote()) == 2
    finally:
        stop_ray()
        wait_for_ray()
    assert not ray.is_initialized()


def test_joining_a_cluster_that_is_not_there_says_so_in_one_line(tmp_path, mini_data, restored_environ, capsys):
    """``--address auto`` with no Ray running (this suite runs its Ray tests one at a time, each stopping its
    Ray): Ray's ConnectionError becomes the user's one line, not a traceback."""
    from orchestrator import sweep
    from tests.helpers import tiny_space

    assert not ray.is_initialized()
    code = sweep.main(["--space", str(tiny_space(tmp_path, mini_data)), "--address", "auto", "--storage",
                       str(tmp_path / "exp"), "--wandb", "off"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(
        "error: --address auto: Could not find any running Ray instance; start the cluster first"), err
    assert not ray.is_initialized() and not (tmp_path / "exp" / "tiny").exists()


def test_a_ctrl_c_that_tune_takes_is_told_apart_from_a_run_that_ended(tmp_path):
    """Tune stops on Ctrl-C and returns as usual, the trial it stopped marked TERMINATED like a finished
    one; fit_tuner tells the two apart (a sweep exits 130, an ablation goes no further), and puts back the
    SIGINT handler that Tune leaves installed after a run that ended by itself."""
    started = tmp_path / "started"

    def count(config):  # local: Ray sends it by value, the worker imports no test module
        for step in range(config["steps"]):
            started.touch()
            tune.report({"step": step})
            time.sleep(0.2)

    def tuner(name: str, steps: int) -> tune.Tuner:
        return tune.Tuner(count, param_space={"steps": steps},
                          run_config=tune.RunConfig(storage_path=str(tmp_path), name=name, verbose=0))

    def ctrl_c_once_started():
        while not started.exists():
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    handler = signal.getsignal(signal.SIGINT)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        ended, interrupted = fit_tuner(tuner("ended", 2))
        assert not interrupted and ended.num_terminated == 1 and signal.getsignal(signal.SIGINT) is handler
        started.unlink()
        threading.Thread(target=ctrl_c_once_started, daemon=True).start()
        stopped, interrupted = fit_tuner(tuner("stopped", 1000))  # 200 s unless stopped
        assert interrupted and stopped.num_terminated == 1 and signal.getsignal(signal.SIGINT) is handler
        assert stopped[0].metrics["step"] < 100
    finally:
        ray.shutdown()
