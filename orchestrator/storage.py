"""Where experiments live (``--storage``) and what they may be called: a small type with the rule, so
that "is this a folder or a cloud URI" is asked in one place. No Ray here (the command lines use it
before anything starts)."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from dmkd.errors import UserError


@dataclass(frozen=True)
class Storage:
    """Where experiments live (``--storage``): a folder of this machine (or an NFS mount every node
    shares), or a cloud URI such as ``s3://bucket/experiments`` that Ray Tune writes to. Only a folder
    holds what the driver writes itself (reports, results.csv, the teacher and reference caches)."""

    root: str  # an absolute folder, or a URI without its trailing slash

    @classmethod
    def parse(cls, given: str) -> Storage:
        """A cloud URI as given; a folder as an absolute path (Ray workers do not share the driver's cwd)."""
        if "://" in given:
            return cls(given.rstrip("/"))
        if Path(given).exists() and not Path(given).is_dir():
            raise UserError(f"--storage: {given} exists and is not a folder")
        # the folder, or the one it would be made in: checked now, not when a run first writes there
        folder = existing = Path(given).resolve()
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            raise UserError(f"--storage: {given}: cannot be made, since {existing} is a file, not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise UserError(f"--storage: {given}: {existing} is not writable by this user; choose another folder")
        return cls(str(folder))

    @property
    def local(self) -> bool:
        return "://" not in self.root

    def uri(self, *parts: str) -> str:
        """What Ray Tune is given: the storage, or a path inside it."""
        return "/".join([self.root, *parts])

    def make(self, *parts: str) -> Path:
        """Create a folder inside a local storage; one that cannot be made (a read-only or special file
        system) is a one-line ``UserError`` naming ``--storage``."""
        folder = self.folder(*parts)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(f"--storage {self.root}: cannot create {folder} ({error.strerror or error})") from None
        return folder

    def folder(self, *parts: str) -> Path:
        """A folder inside a local storage (a cloud storage has none: check ``local`` first)."""
        if not self.local:
            raise ValueError(f"{self.root} is not a folder of this machine")
        return Path(self.root, *parts)


def sqlite_url(path: Path) -> str:
    """The SQLAlchemy URL of an SQLite file (an Optuna study's storage)."""
    return f"sqlite:///{path}"


def check_name(name: str) -> str:
    """An experiment name is one plain folder name inside the storage."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) or ".." in name:
        raise UserError(f"--name: {name!r} must be a plain folder name (letters, digits, '.', '_', '-'; no '/' "
                        f"or '..'), since the experiment lives in STORAGE/NAME")
    return name
