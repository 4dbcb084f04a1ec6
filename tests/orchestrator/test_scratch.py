"""A trial's scratch folder: removed when the trial ends, and by the next trial when its process was killed;
never while its process lives (real processes, real locks)."""
import os
import subprocess
import sys
import tempfile
import time

import pytest

from orchestrator.scratch import UNLOCKED_MIN_AGE_S, remove_orphans, scratch_folder
from tests.helpers import ROOT

HOLDER = """
import os, signal, sys
from orchestrator.scratch import scratch_folder
with scratch_folder(0) as folder:
    (folder / "checkpoint.pt").write_bytes(bytes(1000))
    folder.with_name(folder.name + "-resume.pt").write_bytes(bytes(10))
    print(folder, flush=True)
    if sys.argv[1] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    sys.stdin.readline()
"""


@pytest.fixture
def scratch_dir(tmp_path, monkeypatch):
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def _holder(scratch_dir, how: str) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen([sys.executable, "-c", HOLDER, how], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True, cwd=ROOT, env={**os.environ, "TMPDIR": str(scratch_dir), "PYTHONPATH": str(ROOT)})
    return process, process.stdout.readline().strip()


def _entries_of(folder: str, scratch_dir) -> set[str]:
    name = os.path.basename(folder)
    return {p.name for p in scratch_dir.iterdir() if p.name == name or p.name.startswith((f"{name}.", f"{name}-"))}


def test_a_killed_trials_folder_goes_with_the_next_one_and_a_live_ones_stays(scratch_dir):
    killed, killed_folder = _holder(scratch_dir, "kill")
    assert killed.wait(timeout=60) == -9
    name = os.path.basename(killed_folder)  # left behind: the folder, its lock and its resume checkpoint
    assert _entries_of(killed_folder, scratch_dir) == {name, f"{name}.lock", f"{name}-resume.pt"}
    live, live_folder = _holder(scratch_dir, "hold")  # the next trial: its own folder, the killed one's gone
    try:
        assert _entries_of(killed_folder, scratch_dir) == set()
        with scratch_folder(0) as mine:  # and the next: the live one's folder stays
            assert os.path.isfile(os.path.join(live_folder, "checkpoint.pt"))
            assert len(_entries_of(live_folder, scratch_dir)) == 3
            assert mine.is_dir() and mine.with_name(mine.name + ".lock").is_file()
        assert _entries_of(str(mine), scratch_dir) == set()
    finally:
        live.communicate("\n", timeout=60)  # ends normally: removes its own
    assert live.returncode == 0 and list(scratch_dir.iterdir()) == []


def test_unlocked_folders_of_earlier_versions_go_once_old(scratch_dir):
    old, new = scratch_dir / "dmkd-rank0-old123", scratch_dir / "dmkd-rank0-new456"
    for folder in (old, new):
        folder.mkdir()
        (folder / "checkpoint.pt").write_bytes(bytes(10))
        folder.with_name(folder.name + "-resume.pt").write_bytes(bytes(10))
    past = time.time() - UNLOCKED_MIN_AGE_S - 60
    for path in (old, old / "checkpoint.pt", old.with_name(old.name + "-resume.pt")):
        os.utime(path, (past, past))
    (scratch_dir / "dmkd-notes.txt").write_text("not a scratch folder")
    assert remove_orphans(scratch_dir) == [old.name]
    assert sorted(p.name for p in scratch_dir.iterdir()) == ["dmkd-notes.txt", new.name, f"{new.name}-resume.pt"]
