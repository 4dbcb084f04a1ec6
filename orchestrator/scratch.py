"""A trial's scratch folder in the system's temporary directory, where it trains before Tune copies each
checkpoint to storage, removed when the trial ends. A trial whose process is killed (an out-of-memory
kill, a lost node, a second Ctrl-C) cannot remove its own, and a checkpoint with its optimizer state can
be large (and ``/tmp`` is often memory), so each new scratch folder first removes those of processes that
are gone. A folder's owner holds an advisory lock (``flock``) on ``<folder>.lock`` for as long as it
runs: the kernel releases it when the process dies, however it dies, and unlike a PID it means the same
in every process namespace that shares the directory."""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

PREFIX = "dmkd-rank"
# a scratch folder and what sits beside it: its lock, and the checkpoint a resumed trial starts from
_ENTRY = re.compile(rf"^({PREFIX}\d+-[^.-]+)(\.lock|-.*)?$")
UNLOCKED_MIN_AGE_S = 3600  # a folder without a lock (written before locks were) is left alone this long


def _entries(stem: Path) -> list[Path]:
    return [stem, *stem.parent.glob(f"{stem.name}-*"), stem.with_name(stem.name + ".lock")]


def _remove(stem: Path) -> None:
    for path in _entries(stem):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()


def _owner_is_gone(lock: Path) -> bool:
    """Whether no process holds ``lock`` (its owner is gone); False where it cannot be opened (another user's)."""
    try:
        handle = lock.open("rb")
    except OSError:
        return False
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        return True  # closing the handle releases it


def remove_orphans(directory: Path) -> list[str]:
    """Remove the scratch folders in ``directory`` whose owner is gone; returns their names."""
    stems = {match.group(1) for path in directory.glob(f"{PREFIX}*") if (match := _ENTRY.match(path.name))}
    removed = []
    for name in sorted(stems):
        stem = directory / name
        lock = stem.with_name(name + ".lock")
        if lock.exists():
            orphan = _owner_is_gone(lock)
        else:  # no lock: left by a version before locks, or by a process killed before it took its lock
            try:
                ages = [time.time() - path.lstat().st_mtime for path in _entries(stem) if path.exists()]
            except OSError:
                continue
            orphan = bool(ages) and min(ages) > UNLOCKED_MIN_AGE_S
        if orphan:
            _remove(stem)
            removed.append(name)
    return removed


@contextlib.contextmanager
def scratch_folder(rank: int) -> Iterator[Path]:
    """A new, empty folder for the trial's rank ``rank`` (``dmkd-rank<rank>-*`` in the temporary directory),
    locked while the caller runs and removed afterwards with whatever was written beside it
    (``<folder>-*``); the folders of processes that are gone are removed first."""
    directory = Path(tempfile.gettempdir())
    remove_orphans(directory)
    folder = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{rank}-", dir=directory))
    # the lock is taken under a name no sweep looks at, then renamed into place: a lock file that a
    # sweep can see is always held
    handle, taking = tempfile.mkstemp(prefix=".dmkd-lock-", dir=directory)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        os.rename(taking, folder.with_name(folder.name + ".lock"))
        yield folder
    finally:
        _remove(folder)
        with contextlib.suppress(OSError):
            os.unlink(taking)
        os.close(handle)
