"""Run a DMKD hyperparameter sweep: Ray Tune trials (one worker trains in its trial, several as a Ray Train
DDP run), Optuna search, ASHA, W&B.

    python -m orchestrator.sweep                       # search_spaces/default.yaml on a local Ray
    python -m orchestrator.sweep --space search_spaces/retinanet_r50_r18_coco.yaml \\
        --storage /shared/experiments --address auto --wandb online

Re-running the same command (or adding --resume) continues an interrupted sweep; the same --name with
other settings stops before anything starts. The experiment folder
(STORAGE/NAME) holds Tune's state, the Optuna study (optuna.db), the W&B offline runs (wandb/),
results.csv, best.json and the resolved space.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import netrc
import os
import sys
from pathlib import Path

from dmkd.config import parse_assignment
from dmkd.errors import UserError, exit_process, run_command
from dmkd.provenance import provenance
from orchestrator.continuing import SETTINGS, check_continues, space_settings
from orchestrator.space import DEFAULT_SPACE, SweepSpace, describe, paper_default_point
from orchestrator.space_file import check_files, check_fits_here, check_searches, load_blaming_command_line, load_space
from orchestrator.storage import Storage, check_name

WANDB_MODES = ("online", "offline", "off")
TUNER_STATE = "tuner.pkl"  # what Ray Tune keeps of an experiment it can continue (Tuner.can_restore looks for it)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", help="search space YAML (default: search_spaces/default.yaml)")
    parser.add_argument("--name", help="experiment name (default: the space's name)")
    parser.add_argument("--storage", default="experiments", help="folder or URI for experiments (default: ./experiments)")
    parser.add_argument("--num-samples", type=int)
    parser.add_argument("--max-concurrent", type=int)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the space, e.g. --set budget.epochs=2 (repeatable)")
    parser.add_argument("--wandb", choices=WANDB_MODES, help="default: WANDB_MODE when set, else online with an API key, else offline")
    parser.add_argument("--resume", action="store_true", help="continue the sweep of the same name")
    parser.add_argument("--dry-run", action="store_true", help="validate the space and print the plan; no Ray")
    parser.add_argument("--address", help="Ray address to join (e.g. auto); default: RAY_ADDRESS when set, else start a local Ray")
    return parser


def has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


# W&B's own variable, as W&B users set it (in CI, on nodes without egress); --wandb wins over it
WANDB_MODE_VARIABLE = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline",
                       "disabled": "off"}


def resolve_wandb_mode(asked: str | None) -> str:
    """``--wandb``, else ``WANDB_MODE`` when set, else online with an API key and offline without; online
    without a key falls back to offline."""
    if asked is None:
        asked = WANDB_MODE_VARIABLE.get(os.environ.get("WANDB_MODE", "").strip().lower())
    if asked in (None, "online") and not has_wandb_key():
        if asked == "online":
            print("wandb: no API key found (WANDB_API_KEY or ~/.netrc); logging offline instead", file=sys.stderr)
        return "offline"
    return asked or "online"


def resolve_address(given: str | None) -> str | None:
    """``--address``, else Ray's own ``RAY_ADDRESS`` when it names a cluster (``ray job submit`` sets it for
    its command, as Ray users rely on); None starts a local Ray of this command's own, also when a Ray that
    ``ray start`` left running is on this machine (joining that one takes ``--address auto``). An
    ``http://`` value is the Jobs API's address (for the ``ray job`` command line), not one to join."""
    if given:
        return given
    found = os.environ.get("RAY_ADDRESS", "").strip()
    if not found or found.startswith(("http://", "https://")):
        return None
    print(f"ray: joining the cluster at {found} (RAY_ADDRESS); unset it for a local Ray", file=sys.stderr)
    return found


def resolve_space(args: argparse.Namespace) -> SweepSpace:
    overrides = [parse_assignment(item, "--set") for item in args.set]
    if args.num_samples is not None:
        overrides.append(("num_samples", args.num_samples))
    if args.max_concurrent is not None:
        overrides.append(("max_concurrent", args.max_concurrent))
    def checked(space: SweepSpace) -> SweepSpace:  # a sweep's own checks; on a local Ray, this machine's CPUs and GPUs
        path = Path(args.space) if args.space else DEFAULT_SPACE
        check_searches(space, path)
        if args.address is None:
            check_fits_here(space, path)
        return space

    return load_blaming_command_line(lambda: checked(load_space(args.space, overrides)),
                                     lambda: checked(load_space(args.space)), given=bool(overrides))


def plan(space: SweepSpace, name: str, storage: str, wandb_mode: str, address: str | None) -> dict:
    r = space.resources
    per_trial = {"workers": r.num_workers, "cpus": r.num_workers * r.cpus_per_worker + 1,
                 "gpus": r.num_workers * r.gpus_per_worker if r.use_gpu else 0}
    return {"name": name, "experiment": f"{storage.rstrip('/')}/{name}", "ray": address or "local",
            "pair": space.pair_name, "method": space.method, "num_samples": space.num_samples,
            "max_concurrent": space.max_concurrent, "resources_per_trial": per_trial,
            "epochs_per_trial": space.budget.epochs, "scheduler": dataclasses.asdict(space.scheduler),
            "objective": dataclasses.asdict(space.objective), "searched": sorted(space.search),
            "first_point": paper_default_point(space), "startup_trials": space.startup_trials, "wandb": wandb_mode,
            "teacher": space.pair.teacher_checkpoint or ("trained and cached" if space.pair.train_teacher else None)}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> int:
        args.address = resolve_address(args.address)
        space = resolve_space(args)
        name = check_name(args.name or space.name)
        storage = Storage.parse(args.storage)
        check_files(space, Path(args.space) if args.space else DEFAULT_SPACE)
        if args.resume and storage.local and not (storage.folder(name) / TUNER_STATE).is_file():
            raise UserError(f"--resume: no sweep to continue at {storage.uri(name)}")
        settings = space_settings(space)
        if storage.local:
            check_continues(storage.folder(name) / "sweep.json", settings, command="python -m orchestrator.sweep")
        wandb_mode = resolve_wandb_mode(args.wandb)
        the_plan = plan(space, name, storage.uri(), wandb_mode, args.address)
        if args.dry_run:
            print(json.dumps(the_plan, indent=2))
            return 0
        from orchestrator.drivers import run_sweep  # Ray, Tune and W&B: not needed for --dry-run

        summary = run_sweep(space, name=name, storage=storage, wandb_mode=wandb_mode, address=args.address,
                            resume=args.resume, record={"plan": the_plan, "space": describe(space), SETTINGS: settings, **provenance()})
        if summary["interrupted"]:
            return 130  # as a Ctrl-C anywhere else in a command line (dmkd.errors.run_command)
        return 0 if summary["completed"] else 1

    return run_command(run, interrupted="rerun the same command (or add --resume) to continue")


if __name__ == "__main__":
    exit_process(main())
