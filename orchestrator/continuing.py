"""Continuing an experiment under its name: what a command asks for now must be what the experiment
started with. Tune restores a stored experiment's searcher, scheduler and trial count as they were, while
the trials that still run train with the settings given now, so a changed space (a forgotten ``--set``,
an edited file) would put trials of two configurations in one leaderboard. The record an experiment
writes when it starts (``sweep.json`` / ``ablation.json``) keeps those settings under ``settings``; a
record without them (written before they were kept) is not checked. No Ray here: the command lines
check before anything starts, ``--dry-run`` included."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dmkd.errors import UserError
from dmkd.io import read_json
from orchestrator.space import SweepSpace, describe

SETTINGS = "settings"  # the record's key
SHOWN = 3  # differences named in the message; the rest are counted


def space_settings(space: SweepSpace) -> dict:
    """The resolved space as a record keeps it, less its name (``--name`` decides what it is called)."""
    return {key: value for key, value in describe(space).items() if key != "name"}


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"budget": {"epochs": 3}}`` as ``{"budget.epochs": 3}``; lists stay whole."""
    if not isinstance(value, dict):
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in value.items():
        flat.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def check_continues(record_file: Path, settings: dict, *, command: str) -> None:
    """Stop, in one line naming the record and the settings that differ, when ``record_file`` is the
    record of an experiment that started with other ``settings`` (JSON values) than these."""
    if not record_file.is_file():
        return
    stored = read_json(record_file, "experiment record").get(SETTINGS)
    if stored is None:
        return
    before, now = flatten(stored), flatten(json.loads(json.dumps(settings)))  # tuples as the record has them: lists
    missing = object()
    changed = [key for key in sorted(before.keys() | now.keys()) if before.get(key, missing) != now.get(key, missing)]
    if not changed:
        return

    def shown(key: str, values: dict) -> str:
        return repr(values[key]) if key in values else "not set"

    listed = ", ".join(f"{key} {shown(key, before)} (now {shown(key, now)})" for key in changed[:SHOWN])
    more = f" and {len(changed) - SHOWN} more" if len(changed) > SHOWN else ""
    raise UserError(f"{record_file}: this experiment started with other settings: {listed}{more}; {command} with "
                    f"the same file and values continues it (the record holds them under {SETTINGS!r}), "
                    f"another --name starts a new one")
