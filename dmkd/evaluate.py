"""COCO bbox evaluation with pycocotools ``COCOeval``, and a detector's evaluation on a data set
(under DDP each rank predicts its share).

    python -m dmkd.evaluate --ann instances_val.json --results results.json
prints one JSON object: AP, AP50, AP75, APs, APm, APl and AR1, AR10, AR100, ARs, ARm, ARl.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn
from tqdm import tqdm

from dmkd import distributed as dist_utils
from dmkd.data import CocoDetection, check_box_sizes, check_records, collate, is_box, is_id, is_number, load_coco, to_coco_results
from dmkd.errors import UserError, exit_process, one_line
from dmkd.io import read_json

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def coco_evaluate(coco_gt: COCO, results: list[dict]) -> dict[str, float]:
    """COCO bbox metrics of ``results`` (COCO result dicts) against ``coco_gt``.

    A figure COCOeval cannot compute (no ground truth of that size) is reported as -1, as COCOeval
    does; no predictions at all give 0 for every figure.
    """
    if not results:
        return {name: 0.0 for name in METRIC_NAMES}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(list(results))
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(np.round(value, 6)) for name, value in zip(METRIC_NAMES, evaluator.stats)}


@torch.no_grad()
def evaluate_detector(detector: nn.Module, dataset: CocoDetection, device: torch.device, batch_size: int,
                      progress: bool = False, label_to_category: dict[int, int] | None = None) -> tuple[dict[str, float], list[dict]]:
    """COCO metrics of ``detector`` on ``dataset``; under DDP each rank predicts its share. Predicted labels
    map to the data's category ids through ``label_to_category`` (default: the data's own labels 1..K)."""
    label_to_category = label_to_category or dataset.label_to_category
    was_training = detector.training
    detector.eval()
    indices = list(range(dist_utils.rank(), len(dataset), dist_utils.world_size()))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size,
                                         shuffle=False, collate_fn=collate)
    results = []
    for images, targets in tqdm(loader, desc="eval", leave=False, disable=not progress):
        outputs = detector([image.to(device) for image in images])
        results.extend(to_coco_results(outputs, targets, images, label_to_category))
    detector.train(was_training)
    everything = dist_utils.gather_to_main(results)
    metrics = coco_evaluate(dataset.coco, everything) if everything is not None else None  # rank 0 holds them all
    return dist_utils.broadcast_from_main(metrics), (everything or [])


def load_results(path: str | Path, coco_gt: COCO) -> list[dict]:
    path = Path(path)
    results = read_json(path, "results file")
    if not isinstance(results, list):
        raise UserError(f"{path}: must hold a JSON list of COCO results")
    known_images, known_categories = set(coco_gt.getImgIds()), set(coco_gt.getCatIds())
    check_records(path, "results", results, {
        "image_id": (is_id, "an integer"), "category_id": (is_id, "an integer"),
        "bbox": (is_box, "[x, y, width, height] of numbers"), "score": (is_number, "a number")})
    check_box_sizes(path, "", results)
    for index, result in enumerate(results):
        if result["image_id"] not in known_images:
            raise UserError(f"{path}: [{index}].image_id {result['image_id']} is not in the annotation file")
        if result["category_id"] not in known_categories:
            raise UserError(f"{path}: [{index}].category_id {result['category_id']} is not in the annotation file")
        if not (isinstance(result["bbox"], list) and len(result["bbox"]) == 4):
            raise UserError(f"{path}: [{index}].bbox must be [x, y, width, height]")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dmkd.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ann", required=True, help="COCO instances JSON (ground truth)")
    parser.add_argument("--results", required=True, help="COCO results JSON (detections)")
    args = parser.parse_args(argv)
    try:
        coco_gt = load_coco(args.ann)
        metrics = coco_evaluate(coco_gt, load_results(args.results, coco_gt))
    except UserError as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    exit_process(main())
