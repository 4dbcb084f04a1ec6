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


REFERENCE_ROW = Row("none", {}, tune=False)
HELD_OUT_KEYS = ("test_ann", "test_images")  # the split only the reported runs evaluate  # the undistilled student every row is compared with


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of one experiment receives beside its own values."""

    teacher_checkpoint: str | None
    data_paths: dict
    train_storage: str  # where Ray Train keeps the trial's checkpoints
    env_vars: dict = field(default_factory=dict)

    def stored_in(self, train_storage: str) -> "TrialSetup":
        return dataclasses.replace(self, train_storage=train_storage)

    def without_test(self) -> "TrialSetup":
        """The setup of a trial that selects (a sweep's, a tuning run's): it never sees the test split."""
        paths = {k: v for k, v in self.data_paths.items() if k not in HELD_OUT_KEYS}
        return dataclasses.replace(self, data_paths=paths)


def rows_record(rows: dict[str, Row]) -> dict[str, dict]:
    """Rows as JSON (ablation.json, the plan)."""
    return {name: dataclasses.asdict(row) for name, row in rows.items()}
