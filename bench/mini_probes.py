"""Small, named experiments on the mini-benchmark student, for questions a method table cannot answer.

Each variant is the TrainConfig a sweep trial of ``search_spaces/default.yaml`` would get (the space's own
``train_config``) with a trained teacher, run for each seed through ``dmkd.engine.fit`` without Ray, one
core per run, ``--parallel`` runs at a time (``bench/table_runner.py``'s pool). Finished runs are kept in
``--runs`` and skipped on a rerun.

    python bench/mini_probes.py fgd_clipping --teacher runs/teacher/checkpoint.pt --seeds 0 1 2
    python bench/mini_probes.py channel_mask --teacher runs/teacher/checkpoint.pt --seeds 0 1 2

- ``fgd_clipping``: FGD at its published FCOS setting with the gradient clipped at norm 10 (the default)
  and not clipped, beside the undistilled student: is the clipping what makes FGD train worse than no
  distillation on this pair?
- ``channel_mask``: ``dmkd_channel`` at its published setting (65 % of the channels masked after the align
  conv), with nothing masked (ratio 0), and with the mask before the align conv: does the channel mask
  change what the student learns?

Prints a markdown table (mean ± std over seeds of val and test AP, the distillation loss against the
detector's at step 0 and over epoch 1, the gradient clipping, and the channel masks' mean overlap) and
writes it with its provenance (command, commit, machine, date) to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from table_runner import _train_entry, finished  # noqa: E402

from dmkd.config import to_dict  # noqa: E402
from dmkd.metrics import read_metrics  # noqa: E402
from dmkd.provenance import cpu_name, provenance  # noqa: E402
from dmkd.synthetic import ensure_mini_benchmark  # noqa: E402
from orchestrator.space import DEFAULT_SPACE  # noqa: E402
from orchestrator.space_file import load_space  # noqa: E402

# probe -> variant name -> (method, values: the method's parameters and training settings)
PROBES = {
    "fgd_clipping": {
        "none": ("none", {}),
        "fgd, published FCOS setting, clip 10": ("fgd", {}),
        "fgd, published FCOS setting, no clipping": ("fgd", {"grad_clip": 0.0}),
    },
    "channel_mask": {
        "none": ("none", {}),
        "dmkd_channel, ratio 0.65, after the align conv": ("dmkd_channel", {}),
        "dmkd_channel, ratio 0 (nothing masked)": ("dmkd_channel", {"channel_ratio": 0.0}),
        "dmkd_channel, ratio 0.65, before the align conv": ("dmkd_channel", {"channel_mask": "before_align"}),
    },
}


def plan(probe: str, teacher: Path, seeds: list[int], data_dir: Path) -> list[dict]:
    space = load_space(DEFAULT_SPACE)
    paths = ensure_mini_benchmark(data_dir.resolve())
    entries = []
    for index, (name, (method, values)) in enumerate(PROBES[probe].items()):
        for seed in seeds:
            cfg = space.train_config(values, method=method, seed=seed, out="unused", data_paths=paths,
                                     teacher_checkpoint=str(teacher.resolve()) if method != "none" else None)
            entries.append({"id": f"{probe}-v{index}-s{seed}", "variant": name, "seed": seed, "config": to_dict(cfg)})
    return entries


def _summary(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{statistics.fmean(values):.3g} ± {statistics.stdev(values):.2g}"


def table(entries: list[dict], runs: Path) -> list[str]:
    lines = ["| variant | seeds | val AP | test AP | distill/detector loss, step 0 | same, epoch 1 | grad clip | "
             "channel-mask overlap (last epoch, mean over levels) |", "|---|---|---|---|---|---|---|---|"]
    for variant in dict.fromkeys(e["variant"] for e in entries):
        members = [e for e in entries if e["variant"] == variant]
        found = [read_metrics(runs / e["id"]) for e in members]
        first = [m["epochs"][0] for m in found]
        last = [m["final"] for m in found]
        overlaps = [statistics.fmean(v for k, v in f.items() if k.endswith("/channel_jaccard")) for f in last
                    if any(k.endswith("/channel_jaccard") for k in f)]
        lines.append(f"| {variant} | {len(members)} | {_summary([f.get('val/AP') for f in last])} | "
                     f"{_summary([f.get('test/AP') for f in last])} | {_summary([f.get('loss_ratio/step0') for f in first])} | "
                     f"{_summary([f.get('loss_ratio') for f in first])} | {members[0]['config']['grad_clip']} | "
                     f"{_summary(overlaps)} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("probe", choices=sorted(PROBES))
    parser.add_argument("--teacher", type=Path, required=True, help="a trained mini-benchmark teacher checkpoint")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data" / "mini")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "probes")
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "probes")
    args = parser.parse_args(argv)

    entries = plan(args.probe, args.teacher, args.seeds, args.data_dir)
    todo = [e for e in entries if not finished(args.runs / e["id"], e["config"]["epochs"])]
    print(f"{args.probe}: {len(entries)} runs, {len(todo)} to train, {args.parallel} at a time", flush=True)
    started = time.monotonic()
    with multiprocessing.Pool(args.parallel) as pool:
        for done, (run_id, seconds, ap) in enumerate(pool.imap_unordered(
                _train_entry, [(e, str(args.runs), "cpu") for e in todo]), 1):
            print(f"{done}/{len(todo)} {run_id}: val AP {ap:.3f} in {seconds:.0f} s", flush=True)
    lines = table(entries, args.runs)
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.probe}.md").write_text("\n".join(lines) + "\n")
    (args.out / f"{args.probe}.json").write_text(json.dumps(
        {"command": " ".join(["python", "bench/mini_probes.py", *(argv or sys.argv[1:])]), "machine": cpu_name(),
         "parallel": args.parallel, "seconds": time.monotonic() - started, "date": time.strftime("%Y-%m-%d"),
         "runs": [{k: e[k] for k in ("id", "variant", "seed")} for e in entries], **provenance()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
