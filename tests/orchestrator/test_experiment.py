"""The local Ray an experiment starts and stops (``orchestrator.experiment``), on a real Ray."""
from __future__ import annotations

import os

import psutil
import pytest
import ray

from orchestrator.experiment import start_ray, stop_ray, wait_for_ray
from orchestrator.space_file import load_space

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
    assert not ray.is_initialized()
