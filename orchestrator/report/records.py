"""What an experiment stored, typed: the one reader of Tune's per-trial files (``params.json``,
``result.json``, ``error.txt``), of an experiment's record (``sweep.json`` / ``ablation.json``) and of its
reference rows (``reference.json``). Every other part of the report asks this module."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dmkd.errors import UserError, one_line
from dmkd.io import read_json
from dmkd.metrics import VAL_AP

TRIAL_FOLDER = "run_trial_"  # + Tune's trial id: each trial's folder (tuning.trial_dirname names them so)


def trial_folder(trial_id: str) -> str:
    """The folder name of Tune's trial ``trial_id`` in its experiment."""
    return f"{TRIAL_FOLDER}{trial_id}"


@dataclass(frozen=True)
class StoredTrial:
    """One trial as stored: its values from Tune (``config``), every result it reported (``history``,
    one entry per epoch) and, when it failed (maybe only before a retry that then finished: Tune keeps
    the error file), the last line of its error and how many times it failed."""

    trial_id: str
    config: dict
    history: list[dict]
    error: str | None = None
    failures: int = 0

    def failed(self, budget: int) -> bool:
        """Failed for good: an error, and the budget was not reached (Tune restarts a failed one-worker
        trial from its checkpoint; one that then finished has an error file but completed)."""
        return self.error is not None and self.epochs < budget

    @property
    def last(self) -> dict:
        return self.history[-1] if self.history else {}

    @property
    def epochs(self) -> int:
        """The last epoch it reported (0: none)."""
        return int(self.last.get("epoch", 0) or 0)

    def final(self, budget: int) -> dict | None:
        """Its figures after the last epoch of ``budget``; None if it did not get there."""
        return self.last if self.history and self.epochs == budget else None

    def latest(self, metric: str):
        """``metric`` as last reported (a trial stopped early reported it at an earlier epoch)."""
        return next((entry[metric] for entry in reversed(self.history) if metric in entry), None)


def trial_status(failed: bool, epochs: int, budget: int, scheduler: str) -> str:
    """failed, completed, stopped early (by the scheduler) or unfinished (interrupted: rerun to continue)."""
    if failed:
        return "failed"
    if epochs >= budget:
        return "completed"
    if epochs == 0 or scheduler == "none":  # no scheduler stop: Ctrl-C ended it
        return "unfinished"
    return "stopped early"


def _history(result_file: Path) -> list[dict]:
    history = []
    for number, line in enumerate(result_file.read_text().splitlines(), start=1):
        if line.strip():
            try:
                history.append(json.loads(line))
            except json.JSONDecodeError:
                raise UserError(f"{result_file}: line {number} is not valid JSON (a trial's results file was "
                                f"damaged)") from None
    return history


def read_trials(folder: Path) -> list[StoredTrial]:
    """Every trial Tune stored in ``folder`` (an experiment, or one row's tuning study)."""
    trials = []
    for stored in sorted(Path(folder).glob(f"{TRIAL_FOLDER}*")):
        params_file, result_file, error_file = (stored / name for name in ("params.json", "result.json", "error.txt"))
        config = read_json(params_file, "trial parameters") if params_file.is_file() else {}
        history = _history(result_file) if result_file.is_file() else []
        error, failures = None, 0
        if error_file.is_file():
            text = error_file.read_text()
            lines = [line for line in text.strip().splitlines() if line.strip()]
            error, failures = (lines[-1] if lines else "failed"), max(1, text.count("Failure # "))
        trials.append(StoredTrial(stored.name.removeprefix(TRIAL_FOLDER), config, history, error, failures))
    return trials


def from_result(result) -> StoredTrial:
    """A trial of Tune's ``ResultGrid`` (what a cloud storage leaves the driver): its last result only."""
    metrics = result.metrics or {}
    trial_id = metrics.get("trial_id")
    if not trial_id:  # from Tune's folder name, for a trial without metrics
        trial_id = Path(result.path).name.removeprefix(TRIAL_FOLDER) if result.path else "?"
    error = one_line(result.error) if result.error is not None else None
    return StoredTrial(trial_id, dict(result.config or {}), [metrics] if metrics else [], error, int(error is not None))


def reference_trials(experiment: Path, row_name: str) -> list[StoredTrial]:
    """The reference row (the undistilled student, one per seed) in the shape of Tune's trials."""
    path = experiment / "reference.json"
    if not path.is_file():
        return []
    stored = read_json(path, "reference results")
    return [StoredTrial(f"reference-seed{seed}", {"row": row_name, "seed": int(seed)}, found["history"])
            for seed, found in stored.items()]


def reference_ap(experiment: Path) -> float | None:
    """The sweep's reference row: the undistilled student's final val AP (its one seed)."""
    references = reference_trials(experiment, "none")
    return references[0].latest(VAL_AP) if references else None


@dataclass(frozen=True)
class ExperimentRecord:
    """An experiment folder's record: ``kind`` (sweep or ablation) and what its run wrote (the plan, the
    resolved space, the rows and tuning of an ablation, provenance)."""

    folder: Path
    kind: str
    record: dict

    @property
    def space(self) -> dict:
        return self.record["space"]

    @property
    def budget(self) -> int:
        return self.space["budget"]["epochs"]

    @property
    def methods(self) -> list[str]:
        """The methods the experiment trained: a sweep's, or each row's of an ablation."""
        if self.kind == "ablation":
            return sorted({row["method"] for row in self.record.get("rows", {}).values()})
        return [self.space["method"]]


def read_record(experiment: Path) -> ExperimentRecord:
    """The experiment's kind and record, checked; a folder that is not an experiment is a one-line error."""
    if not experiment.is_dir():
        raise UserError(f"{experiment}: experiment folder not found")
    kind = "ablation" if (experiment / "ablation.json").is_file() else "sweep" if (experiment / "sweep.json").is_file() else None
    if kind is None:
        raise UserError(f"{experiment}: holds neither ablation.json nor sweep.json (not an experiment folder?)")
    record = read_json(experiment / f"{kind}.json", f"{kind} record")
    if not (isinstance(record, dict) and isinstance(record.get("space"), dict) and "budget" in record["space"]):
        raise UserError(f"{experiment / f'{kind}.json'}: not a {kind} record (no 'space' with a 'budget')")
    return ExperimentRecord(experiment, kind, record)
