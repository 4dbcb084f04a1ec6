import warnings

import pytest
import torch

from dmkd.config import MAX_SEED, TrainConfig
from dmkd.data import CocoDetection, SeededAugmentation, collate, load_coco, to_coco_results
from dmkd.errors import UserError
from dmkd.transforms import eval_transforms, train_transforms
from tests.conftest import save_image, write_coco

CATEGORIES = [{"id": 5, "name": "cat"}, {"id": 17, "name": "dog"}, {"id": 90, "name": "bird"}]


@pytest.fixture
def quirky(tmp_path):
    """Non-contiguous category ids, crowd boxes, degenerate and outside boxes, an empty image,
    grayscale / RGBA / palette images of mixed sizes, float coordinates."""
    folder = tmp_path / "images"
    folder.mkdir()
    specs = [(1, "rgb.png", 64, 48, "RGB"), (2, "gray.png", 40, 40, "L"), (3, "rgba.png", 50, 30, "RGBA"),
             (4, "palette.png", 32, 64, "P"), (5, "empty.jpg", 20, 20, "RGB")]
    images = []
    for image_id, name, w, h, mode in specs:
        save_image(folder / name, w, h, mode, seed=image_id)
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 17, "bbox": [10.5, 5.25, 20.0, 10.5], "area": 210.0, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 5, "bbox": [0, 0, 64, 48], "area": 3072.0, "iscrowd": 1},
        {"id": 3, "image_id": 2, "category_id": 90, "bbox": [5, 5, 0, 10], "area": 0.0, "iscrowd": 0},
        {"id": 4, "image_id": 2, "category_id": 5, "bbox": [100, 100, 10, 10], "area": 100.0, "iscrowd": 0},
        {"id": 5, "image_id": 2, "category_id": 5, "bbox": [30, 30, 20, 20], "area": 400.0, "iscrowd": 0},
        {"id": 6, "image_id": 3, "category_id": 90, "bbox": [1, 2, 3, 4], "area": 12.0, "iscrowd": 0},
        {"id": 7, "image_id": 4, "category_id": 17, "bbox": [4, 8, 12, 0.0], "area": 0.0, "iscrowd": 0},
    ]
    return write_coco(tmp_path, images, annotations, CATEGORIES), folder


def test_quirks_are_handled(quirky):
    ann, folder = quirky
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = CocoDetection(ann, folder)
    messages = [str(w.message) for w in caught if "dropped" in str(w.message)]
    assert len(messages) == 1 and "dropped 3 boxes" in messages[0]
    assert dataset.dropped_boxes == 3
    assert dataset.num_classes == 4
    assert dataset.label_to_category == {1: 5, 2: 17, 3: 90}
    assert len(dataset) == 5  # the image without annotations stays

    by_id = {dataset[i][1]["image_id"]: dataset[i] for i in range(len(dataset))}
    image, target = by_id[1]
    assert image.mode == "RGB" and image.size == (64, 48)
    # the crowd box is not a training target; the float box is kept exactly
    assert target["labels"].tolist() == [2]
    assert torch.allclose(target["boxes"], torch.tensor([[10.5, 5.25, 30.5, 15.75]]))
    # partly outside: clipped to the image; wholly outside and zero width: dropped
    assert torch.allclose(by_id[2][1]["boxes"], torch.tensor([[30.0, 30.0, 40.0, 40.0]]))
    assert by_id[2][1]["labels"].tolist() == [1]
    for image_id in (2, 3, 4):
        assert by_id[image_id][0].mode == "RGB"
    assert by_id[4][1]["boxes"].shape == (0, 4)
    assert by_id[5][1]["boxes"].shape == (0, 4) and by_id[5][1]["labels"].dtype == torch.int64


def test_results_map_back_to_original_ids_and_coordinates(quirky):
    ann, folder = quirky
    dataset = CocoDetection(ann, folder, eval_transforms(32))
    images, targets = collate([dataset[0]])  # image 1: 64 x 48 resized to 32 x 24
    assert images[0].shape == (3, 24, 32)
    outputs = [{"boxes": torch.tensor([[5.0, 2.0, 15.0, 8.0], [1.0, 1.0, 2.0, 2.0]]),
                "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([2, 0])}]
    results = to_coco_results(outputs, targets, images, dataset.label_to_category)
    assert len(results) == 1  # label 0 (background) is never written
    assert results[0]["category_id"] == 17 and results[0]["image_id"] == 1
    assert results[0]["bbox"] == [10.0, 4.0, 20.0, 12.0]


@pytest.mark.parametrize("content, problem", [
    ("{not json", "not valid JSON"),
    ('{"categories": [{"id": 1, "name": "a"}]}', "'images' is missing"),
    ('{"images": []}', "'categories' is missing"),
    ('[1, 2]', "must hold a JSON object"),
    ('{"images": [{"id": 1}], "categories": [{"id": 1}]}', "images[0] has no 'file_name'"),
])
def test_bad_annotation_files_are_one_line_errors(tmp_path, content, problem):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(UserError) as error:
        load_coco(path)
    assert str(path) in str(error.value) and problem in str(error.value)
    assert "\n" not in str(error.value)


def test_missing_files_and_undecodable_images(tmp_path):
    with pytest.raises(UserError, match="annotation file not found"):
        load_coco(tmp_path / "nope.json")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "broken.png").write_bytes(b"this is not a png")
    ann = write_coco(tmp_path, [{"id": 1, "file_name": "broken.png", "width": 8, "height": 8}], [],
                     [{"id": 1, "name": "a"}])
    dataset = CocoDetection(ann, tmp_path / "images")
    with pytest.raises(UserError, match=r"broken\.png: cannot decode image"):
        dataset[0]
    with pytest.raises(UserError, match="image folder not found"):
        CocoDetection(ann, tmp_path / "missing")


def test_every_seed_in_range_seeds_the_augmentation_and_others_are_refused(quirky):
    """A seed of 20000000 made the loader's per-image seed overflow torch's range (a traceback from the
    DataLoader); every seed from 0 to MAX_SEED now gives its own reproducible flips, and a seed outside
    that range (which Optuna's sampler could not take either) is refused as a setting."""
    ann, folder = quirky
    dataset = CocoDetection(ann, folder, train_transforms(64))

    def flips(seed: int) -> list[float]:  # four epochs of the five images
        seeded = SeededAugmentation(dataset, seed)
        return [seeded[tagged][0][..., 0].sum().item() for tagged in range(4 * len(dataset))]

    assert flips(20_000_000) == flips(20_000_000) and flips(MAX_SEED) == flips(MAX_SEED)
    assert flips(MAX_SEED) != flips(0)
    for seed in (-1, MAX_SEED + 1):
        with pytest.raises(UserError, match=f"seed: must be a whole number from 0 to {MAX_SEED}, but got {seed}"):
            TrainConfig(seed=seed).validate(check_files=False)
