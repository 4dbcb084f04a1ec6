"""The teacher and reference caches are keyed by what was trained (config and data content), not where
the data lies: a second clone with its own copy of the data, pointed at the first clone's --storage,
finds both caches. No Ray: the lookups are plain file reads."""
import dataclasses
import json
import shutil

import torch

from dmkd.config import DataPaths
from orchestrator.reference import ensure_references, reference_folder
from orchestrator.space import DEFAULT_SPACE
from orchestrator.space_file import load_space
from orchestrator.teacher import ensure_teacher, recorded_figures, teacher_folder
from orchestrator.trial import TrialSetup


def _copy(paths: DataPaths, folder) -> DataPaths:
    """The same data in another folder (as a second clone would generate or sync it)."""
    folder.mkdir()
    copied = {}
    for key, value in paths.as_dict().items():
        target = folder / value.split("/")[-1]
        if key.endswith("_ann"):
            shutil.copy(value, target)
        elif not target.exists():
            shutil.copytree(value, target)
        copied[key] = str(target)
    return DataPaths(**copied)


def test_a_copy_of_the_data_elsewhere_finds_the_same_teacher_and_reference(tmp_path, mini_data):
    space = load_space(DEFAULT_SPACE)
    copy = _copy(mini_data, tmp_path / "clone-b")
    assert copy.train_ann != mini_data.train_ann
    root = tmp_path / "shared-storage"
    assert teacher_folder(space, copy, root / "teachers") == teacher_folder(space, mini_data, root / "teachers")
    assert reference_folder(space, copy, root / "references") == reference_folder(space, mini_data, root / "references")

    # what the first clone cached, the second finds (the caches' own lookups, nothing trained)
    cached_teacher = teacher_folder(space, mini_data, root / "teachers") / "teacher.pt"
    cached_teacher.parent.mkdir(parents=True)
    cached_teacher.write_bytes(b"weights")
    said: list[str] = []
    assert ensure_teacher(space, copy, root / "teachers", log=said.append) == str(cached_teacher)
    assert said == [f"teacher: cached at {cached_teacher}"]
    folder = reference_folder(space, mini_data, root / "references")
    folder.mkdir(parents=True)
    (folder / "seed0.json").write_text(json.dumps({"seed": 0, "history": [], "final": {"val/AP": 0.5}}))
    said.clear()
    found = ensure_references(space, [0], TrialSetup(None, copy, "unused"), root / "references", log=said.append)
    assert found[0]["final"] == {"val/AP": 0.5} and said == [f"reference: cached in {folder}"]

    # other data is another key
    changed = json.loads(open(copy.train_ann).read())
    changed["annotations"] = changed["annotations"][:-1]
    with open(copy.train_ann, "w") as handle:
        json.dump(changed, handle)
    assert teacher_folder(space, copy, root / "teachers") != teacher_folder(space, mini_data, root / "teachers")
    assert reference_folder(space, copy, root / "references") != reference_folder(space, mini_data, root / "references")


def test_a_teachers_recorded_figures_count_for_a_copy_of_its_held_out_data(tmp_path, mini_data):
    checkpoint = tmp_path / "teacher.pt"
    torch.save({"model": {}, "history": [{"epoch": 1, "val/AP": 0.4, "test/AP": 0.3}],
                "data": {k: str(v) for k, v in mini_data.as_dict().items()}}, checkpoint)
    copy = _copy(mini_data, tmp_path / "elsewhere")
    assert recorded_figures(str(checkpoint), copy) == {"val/AP": 0.4, "test/AP": 0.3}
    assert recorded_figures(str(checkpoint), dataclasses.replace(copy, val_ann=copy.train_ann)) is None


def test_the_mini_benchmark_regenerated_smaller_is_the_same_data_as_a_fresh_one(tmp_path):
    from dmkd.synthetic import SyntheticSpec, ensure_mini_benchmark
    from orchestrator.cache_key import data_fingerprint

    smaller = SyntheticSpec(train_images=4, val_images=2, test_images=2)
    ensure_mini_benchmark(tmp_path / "a", SyntheticSpec(train_images=6, val_images=3, test_images=2))
    regenerated = ensure_mini_benchmark(tmp_path / "a", smaller)
    fresh = ensure_mini_benchmark(tmp_path / "b", smaller)
    for split in ("train", "val", "test"):
        assert sorted(p.name for p in (tmp_path / "a" / split).iterdir()) == \
            sorted(p.name for p in (tmp_path / "b" / split).iterdir())
    assert data_fingerprint(regenerated) == data_fingerprint(fresh) and regenerated.train_ann != fresh.train_ann
