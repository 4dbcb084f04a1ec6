import contextlib
import io
import json
import subprocess

import pytest

from dmkd.data import load_coco
from dmkd.evaluate import METRIC_NAMES, coco_evaluate
from tests.conftest import write_coco
from tests.helpers import run_module


@pytest.fixture
def ground_truth(tmp_path):
    images = [{"id": i, "file_name": f"{i}.png", "width": 100, "height": 100} for i in (1, 2)]
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 30, 20], "area": 600, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 7, "bbox": [50, 50, 40, 40], "area": 1600, "iscrowd": 0},
        {"id": 3, "image_id": 2, "category_id": 3, "bbox": [0, 0, 60, 70], "area": 4200, "iscrowd": 0},
    ]
    return write_coco(tmp_path, images, annotations, [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}])


def _as_results(path, shift=0.0):
    data = json.loads(path.read_text())
    return [{"image_id": a["image_id"], "category_id": a["category_id"],
             "bbox": [a["bbox"][0] + shift, a["bbox"][1], a["bbox"][2], a["bbox"][3]], "score": 0.9}
            for a in data["annotations"]]


def test_ground_truth_as_results_gives_ap_one(ground_truth):
    metrics = coco_evaluate(load_coco(ground_truth), _as_results(ground_truth))
    assert set(METRIC_NAMES) <= set(metrics)
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AP50"] == pytest.approx(1.0)


def test_a_shifted_box_lowers_ap(ground_truth):
    exact = coco_evaluate(load_coco(ground_truth), _as_results(ground_truth))
    shifted = coco_evaluate(load_coco(ground_truth), _as_results(ground_truth, shift=6.0))
    assert shifted["AP"] < exact["AP"]
    assert shifted["AP75"] < 1.0


def test_no_predictions_give_zero(ground_truth):
    assert coco_evaluate(load_coco(ground_truth), [])["AP"] == 0.0


def _cli(*args):
    return run_module("dmkd.evaluate", *args)


def _main(*args):
    """The command line in this process (no interpreter start-up per case): exit code and output."""
    from dmkd.evaluate import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def test_cli_prints_one_json_object(ground_truth, tmp_path):
    results = tmp_path / "results.json"
    results.write_text(json.dumps(_as_results(ground_truth)))
    run = _cli("--ann", str(ground_truth), "--results", str(results))
    assert run.returncode == 0, run.stderr
    metrics = json.loads(run.stdout)
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl"} <= set(metrics) and metrics["AP"] == pytest.approx(1.0)


@pytest.mark.parametrize("content, problem", [
    (None, "results file not found"),
    ("{", "not valid JSON"),
    ('{"a": 1}', "must hold a JSON list"),
    ('[{"image_id": 1, "category_id": 3, "bbox": [1, 2, 3, 4]}]', "has no 'score'"),
    ('[{"image_id": 99, "category_id": 3, "bbox": [1, 2, 3, 4], "score": 1}]', "image_id 99 is not in"),
])
def test_cli_errors_are_one_line(ground_truth, tmp_path, content, problem):
    results = tmp_path / "results.json"
    if content is not None:
        results.write_text(content)
    run = _main("--ann", str(ground_truth), "--results", str(results))
    assert run.returncode == 2
    assert run.stdout == ""
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and str(results) in lines[0] and problem in lines[0]


def test_metric_names_against_known_per_size_answers(tmp_path):
    """A small box found exactly, a medium box missed, no large box: APs 1, APm 0, APl -1 and AP in
    between pin every figure to its name (swapping two names fails here)."""
    images = [{"id": 1, "file_name": "1.png", "width": 200, "height": 200}]
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 10, 10], "area": 100, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [100, 100, 40, 40], "area": 1600, "iscrowd": 0},
    ]
    path = write_coco(tmp_path, images, annotations, [{"id": 1, "name": "a"}])
    found = coco_evaluate(load_coco(path), [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 10, 10], "score": 0.9}])
    # one of two objects found at precision 1: COCO's 101 recall points 0.00..0.50 have precision 1
    half = 51 / 101
    expected = {"AP": half, "AP50": half, "AP75": half, "APs": 1.0, "APm": 0.0, "APl": -1.0,
                "AR1": 0.5, "AR10": 0.5, "AR100": 0.5, "ARs": 1.0, "ARm": 0.0, "ARl": -1.0}
    assert found == pytest.approx(expected, abs=1e-5)
