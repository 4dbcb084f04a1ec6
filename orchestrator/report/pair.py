"""The teacher/student pair table: parameters, forward FLOPs and CPU latency of both detectors, measured
once per experiment and kept in its ``pair.json``, beside the AP of the teacher and of the students."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from dmkd.config import from_dict
from dmkd.io import atomic_write_json, read_json
from dmkd.metrics import split_metric
from dmkd.models import DetectorConfig, build_detector
from dmkd.provenance import cpu_name
from orchestrator.report import text

PAIR_FILE = "pair.json"
LATENCY_RUNS = 15
LATENCY_BUDGET_S = 10.0


def cpu_latency(model, image) -> dict:
    """Forward latency of ``model`` on ``image`` on this CPU: 2 warm-up runs, then up to LATENCY_RUNS
    runs (fewer if they pass LATENCY_BUDGET_S). The minimum is the figure to compare: other work on the
    machine only ever adds time, so the fastest run is the least disturbed one."""
    with torch.no_grad():
        for _ in range(2):
            model(image)
        times: list[float] = []
        started = time.perf_counter()
        while len(times) < LATENCY_RUNS and (len(times) < 3 or time.perf_counter() - started < LATENCY_BUDGET_S):
            begin = time.perf_counter()
            model(image)
            times.append(1000 * (time.perf_counter() - begin))
    return {"min_ms": min(times), "median_ms": statistics.median(times), "runs": len(times),
            "threads": torch.get_num_threads()}


def measure_pair(space: dict) -> dict:
    """Parameters, forward FLOPs and CPU latency (batch 1, see :func:`cpu_latency`) of teacher and
    student, with the machine and date they were measured on."""
    result: dict = {"machine": cpu_name(), "measured": time.strftime("%Y-%m-%d %H:%M")}
    for role in ("teacher", "student"):
        cfg = from_dict(DetectorConfig, space["pair"][role], where=f"pair.{role}")
        model = build_detector(cfg).eval()
        image = [torch.rand(3, cfg.image_size, cfg.image_size)]
        with torch.no_grad():
            counter = FlopCounterMode(display=False)
            with counter:
                model(image)
        latency = cpu_latency(model, image)
        result[role] = {"detector": space["pair"][role], "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
                        "gflops": counter.get_total_flops() / 1e9, "latency_ms_cpu": latency["min_ms"],
                        "latency": latency}
    return result


def pair_comparison(experiment: Path, space: dict, teacher: dict | None, student_baseline, best_distilled,
                    split: str = "val") -> dict:
    """The pair table: :func:`measure_pair`'s figures, measured once for an experiment (when its first
    report is written, kept in ``pair.json`` and reused by later reports of the same pair), with AP on
    ``split`` (the split the students' figures are on)."""
    stored = experiment / PAIR_FILE
    found = read_json(stored, "pair figures") if stored.is_file() else None
    if not (isinstance(found, dict) and found.get("pair") == space["pair"]):
        found = {"pair": space["pair"], **measure_pair(space)}
        atomic_write_json(stored, found)
    result = {k: v for k, v in found.items() if k != "pair"}
    result["teacher"]["AP"] = teacher.get(split_metric(split, "AP")) if teacher else None
    result["student"]["AP_without_distillation"] = student_baseline
    result["student"]["AP_best_distilled"] = best_distilled
    return result


def pair_lines(pair: dict, split: str, baseline, best_distilled) -> list[str]:
    latency = pair["teacher"]["latency"]
    return ["", "## Teacher and student", "",
            f"| | params (M) | GFLOPs (1 image) | CPU latency (ms, batch 1, fastest of {latency['runs']}) | {split} AP |",
            "|---|---|---|---|---|",
            f"| teacher | {pair['teacher']['params_M']:.2f} | {pair['teacher']['gflops']:.2f} | "
            f"{pair['teacher']['latency_ms_cpu']:.1f} | {text.num(pair['teacher']['AP'])} |",
            f"| student, no distillation | {pair['student']['params_M']:.2f} | {pair['student']['gflops']:.2f} | "
            f"{pair['student']['latency_ms_cpu']:.1f} | {text.num(baseline)} |",
            f"| student, best distilled (chosen on val) | | | | {text.num(best_distilled)} |", "",
            f"Latency measured on {pair['machine']}, {latency['threads']} torch threads, on {pair['measured']}, "
            f"when this experiment's first report was written (the fastest run is the least disturbed by other "
            f"work on the machine); the AP figures are the stored results'."]
