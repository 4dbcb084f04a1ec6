"""What travels from the driver to every trial, typed: an ablation row and a trial's setup."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Row:
    """One row of an ablation grid: a method and its parameters; ``tune``: whether tuning may choose them."""

    method: str
    params: dict = field(default_factory=dict)
    tune: bool = True


REFERENCE_ROW = Row("none", {}, tune=False)  # the undistilled student every row is compared with


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of one experiment receives beside its own values."""

    teacher_checkpoint: str | None
    data_paths: dict
    train_storage: str  # where Ray Train keeps the trial's checkpoints
    env_vars: dict = field(default_factory=dict)

    def stored_in(self, train_storage: str) -> "TrialSetup":
        return dataclasses.replace(self, train_storage=train_storage)


def rows_record(rows: dict[str, Row]) -> dict[str, dict]:
    """Rows as JSON (ablation.json, the plan)."""
    return {name: dataclasses.asdict(row) for name, row in rows.items()}
