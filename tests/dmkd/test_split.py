"""python -m dmkd.split: a held-out split carved from a training file, by image, seeded."""
import json

import pytest

from dmkd import split
from dmkd.data import load_coco


def _source(tmp_path):
    images = [{"id": i, "file_name": f"{i}.png", "width": 50, "height": 50} for i in range(1, 21)]
    annotations = [{"id": 100 * i + k, "image_id": i, "category_id": 1 + k % 2, "bbox": [k, k, 5, 5], "iscrowd": 0}
                   for i in range(1, 21) for k in range(i % 4)]  # 0-3 annotations an image
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"info": {"v": 1}, "images": images, "annotations": annotations,
                                "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}))
    return path, images, annotations


def test_split_keeps_images_whole_and_is_deterministic(tmp_path, capsys):
    path, images, annotations = _source(tmp_path)
    assert split.main(["--ann", str(path), "--holdout", "6", "--out", str(tmp_path / "a"), "--seed", "3"]) == 0
    rest, held = (json.loads((tmp_path / "a" / name).read_text()) for name in ("train.json", "holdout.json"))
    held_ids, rest_ids = {i["id"] for i in held["images"]}, {i["id"] for i in rest["images"]}
    assert len(held_ids) == 6 and held_ids | rest_ids == {i["id"] for i in images} and not held_ids & rest_ids
    for part, ids in ((rest, rest_ids), (held, held_ids)):  # every annotation goes with its image, none lost
        assert {a["id"] for a in part["annotations"]} == {a["id"] for a in annotations if a["image_id"] in ids}
        assert part["categories"] == json.loads(path.read_text())["categories"] and part["info"] == {"v": 1}
        load_coco(tmp_path / "a" / ("train.json" if part is rest else "holdout.json"))  # valid COCO files
    assert split.main(["--ann", str(path), "--holdout", "6", "--out", str(tmp_path / "b"), "--seed", "3"]) == 0
    assert (tmp_path / "b" / "holdout.json").read_text() == (tmp_path / "a" / "holdout.json").read_text()
    assert split.main(["--ann", str(path), "--holdout", "6", "--out", str(tmp_path / "c"), "--seed", "4"]) == 0
    other = {i["id"] for i in json.loads((tmp_path / "c" / "holdout.json").read_text())["images"]}
    assert other != held_ids


@pytest.mark.parametrize("holdout", ["0", "20"])
def test_split_needs_images_on_both_sides(tmp_path, capsys, holdout):
    path, _, _ = _source(tmp_path)
    assert split.main(["--ann", str(path), "--holdout", holdout, "--out", str(tmp_path / "o")]) == 2
    assert "--holdout: must be between 1 and 19" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
