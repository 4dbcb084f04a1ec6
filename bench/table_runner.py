"""Train a plan of search-table runs in parallel processes, without Ray: for a short GPU lease.

Each plan entry is the TrainConfig a trial of the sweep would get (``bench/search_table.py --plan-only``
writes them with the space's own ``train_config``); each runs through ``dmkd.engine.fit``, the loop every
trial runs, in its own process, and leaves ``RUNS/<id>/metrics.json`` (per-epoch val AP). Only ``out``
and ``device`` are changed. Entries already finished are skipped, so a rerun continues (a run cut
mid-way starts again).

    python bench/table_runner.py PLAN.json --runs RUNS --parallel 12 --device cuda [--copy-to DIR]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _train(entry: dict, runs: str, device: str) -> tuple[str, float, float | None]:
    import torch

    torch.set_num_threads(1)  # one core per run: the runs, not the threads, use the machine
    from dmkd.config import TrainConfig, from_dict
    from dmkd.engine import fit

    out = Path(runs) / entry["id"]
    cfg = from_dict(TrainConfig, {**entry["config"], "out": str(out), "device": device})
    started = time.monotonic()
    metrics = fit(cfg, progress=False)
    return entry["id"], time.monotonic() - started, metrics.get("val/AP")


def _train_entry(job: tuple[dict, str, str]) -> tuple[str, float, float | None]:
    return _train(*job)


def finished(run: Path, epochs: int) -> bool:
    """metrics.json is rewritten after every epoch: a run is finished when it holds all of them."""
    metrics = run / "metrics.json"
    return metrics.is_file() and len(json.loads(metrics.read_text())["epochs"]) >= epochs


def _gpu_name() -> str | None:
    import subprocess

    try:
        found = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return found.stdout.strip() or None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("plan", type=Path)
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--parallel", type=int, default=os.cpu_count())
    parser.add_argument("--device", default="auto")
    parser.add_argument("--copy-to", type=Path, help="copy each finished run's metrics.json and run.json here")
    args = parser.parse_args(argv)

    plan = json.loads(args.plan.read_text())
    if args.copy_to:  # the machine that trained, for the table's provenance (export reads it)
        from dmkd.provenance import cpu_name, provenance

        args.copy_to.mkdir(parents=True, exist_ok=True)
        (args.copy_to / "machine.json").write_text(json.dumps(
            {"cpu": cpu_name(), "gpu": _gpu_name(), "parallel": args.parallel, "device": args.device,
             **provenance()}, indent=1))
    todo = [e for e in plan if not finished(args.runs / e["id"], e["config"]["epochs"])]
    print(f"{len(plan)} runs in the plan, {len(todo)} to train, {args.parallel} at a time", flush=True)
    started = time.monotonic()
    # A stop (Ctrl-C, or `timeout`'s SIGTERM on a lent machine) ends the runs too: a pool's workers would
    # otherwise go on training after their parent is gone.
    pool = multiprocessing.Pool(args.parallel)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # set after the fork: the workers keep the default
    try:
        runs = pool.imap_unordered(_train_entry, [(entry, str(args.runs), args.device) for entry in todo])
        for done, (run_id, seconds, ap) in enumerate(runs, 1):
            if args.copy_to:
                target = args.copy_to / run_id
                target.mkdir(parents=True, exist_ok=True)
                for name in ("metrics.json", "run.json"):
                    shutil.copy(args.runs / run_id / name, target / name)
            print(f"{done}/{len(todo)} {run_id}: val AP {ap:.3f} in {seconds:.0f} s "
                  f"({time.monotonic() - started:.0f} s elapsed)", flush=True)
        pool.close()
    finally:
        pool.terminate()
        pool.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
