"""Pretrained weights by torchvision name (read from torch's cache, never downloaded here) or by file,
torchvision's own detectors, and the frozen BatchNorm of a pretrained backbone."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torchvision
from torchvision.ops.misc import FrozenBatchNorm2d

from dmkd.config import TrainConfig
from dmkd.engine import fit
from dmkd.errors import UserError
from dmkd.models import DetectorConfig, TeacherFeatures, build_detector, feature_shapes
from dmkd.weights import cached_file, torchvision_weights

FCOS_COCO = "FCOS_ResNet50_FPN_Weights.COCO_V1"
RESNET18 = "ResNet18_Weights.IMAGENET1K_V1"


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch"


def _without_bn_counters(model: torch.nn.Module) -> dict:
    """A state dict as torchvision publishes it: models saved with frozen BatchNorm, no batch counters."""
    return {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


def _cache(name: str, state: dict) -> torch.Tensor:
    """Save ``state`` under the file name torchvision's registry gives ``name``, in torch's hub cache."""
    file = cached_file(torchvision_weights(name, "test"))
    assert file.name == {FCOS_COCO: "fcos_resnet50_fpn_coco-99b0c9b7.pth", RESNET18: "resnet18-f37072fd.pth"}[name]
    file.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, file)
    return file


def test_a_torchvision_detector_loads_its_coco_weights_by_name(torch_home):
    torch.manual_seed(1)
    published = _without_bn_counters(torchvision.models.detection.fcos_resnet50_fpn(weights=None, weights_backbone=None,
                                                                                  num_classes=91))
    _cache(FCOS_COCO, published)
    cfg = DetectorConfig(arch="fcos_resnet50_fpn", weights=FCOS_COCO, num_classes=91, image_size=64)
    assert (cfg.backbone, cfg.fpn_channels) == ("resnet50", 256)  # torchvision's, not the defaults'
    detector = build_detector(cfg)  # strict: a key missing or left over would raise
    assert set(detector.state_dict()) == set(published)
    for key in ("backbone.body.layer3.0.conv1.weight", "backbone.fpn.layer_blocks.0.0.weight",
                "head.classification_head.cls_logits.bias", "backbone.body.bn1.running_var"):
        assert torch.equal(detector.state_dict()[key], published[key]), key
    assert isinstance(detector.backbone.body.bn1, FrozenBatchNorm2d)


def test_a_backbone_loads_imagenet_weights_by_name_or_file_frozen_as_torchvision_does(torch_home, tmp_path):
    torch.manual_seed(2)
    published = _without_bn_counters(torchvision.models.resnet18())
    file = _cache(RESNET18, published)
    by_file = tmp_path / "mine.pth"
    torch.save(published, by_file)
    for spec in (RESNET18, str(by_file)):
        detector = build_detector(DetectorConfig(arch="fcos", backbone="resnet18", fpn_channels=64, backbone_weights=spec))
        body = detector.backbone.body
        assert torch.equal(body.layer4[1].conv2.weight, published["layer4.1.conv2.weight"])
        assert torch.equal(body.layer2[0].bn1.running_mean, published["layer2.0.bn1.running_mean"])
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in body.modules())
        assert sum(isinstance(m, FrozenBatchNorm2d) for m in body.modules()) == 20
        frozen = {n.split(".")[0] for n, p in body.named_parameters() if not p.requires_grad}
        trained = {n.split(".")[0] for n, p in body.named_parameters() if p.requires_grad}
        assert frozen == {"conv1", "layer1"} and trained == {"layer2", "layer3", "layer4"}
    random = build_detector(DetectorConfig(arch="fcos", backbone="resnet18", fpn_channels=64))
    assert isinstance(random.backbone.body.bn1, torch.nn.BatchNorm2d)  # no weights: trainable BatchNorm
    assert all(p.requires_grad for p in random.parameters())
    file.unlink()  # the name was read from torch's cache: without the file it stops (offline), it does not go on
    with pytest.raises(UserError, match="resnet18"):
        build_detector(DetectorConfig(arch="fcos", backbone="resnet18", fpn_channels=64, backbone_weights=RESNET18))


def test_missing_or_foreign_weights_stop_with_one_line(torch_home, tmp_path):
    with pytest.raises(UserError) as error:
        build_detector(DetectorConfig(arch="fcos", backbone="resnet34", backbone_weights="ResNet34_Weights.IMAGENET1K_V1"),
                       where="pair.student")
    message = str(error.value)
    assert message.startswith("pair.student.backbone_weights: ResNet34_Weights.IMAGENET1K_V1 is not in torch's cache")
    assert f"put resnet34-b627a593.pth (from https://download.pytorch.org/models/resnet34-b627a593.pth) into {torch_home}/hub/checkpoints" in message
    assert "\n" not in message
    with pytest.raises(UserError, match=r"^detector.weights: 'Nope_Weights.X' is not a torchvision weights name"):
        build_detector(DetectorConfig(weights="Nope_Weights.X"))
    with pytest.raises(UserError, match=r"^detector.weights: .*missing\.pt: neither a file nor a torchvision weights name"):
        build_detector(DetectorConfig(weights=str(tmp_path / "missing.pt")))
    resnet34 = tmp_path / "r34.pth"
    torch.save(_without_bn_counters(torchvision.models.resnet34()), resnet34)
    with pytest.raises(UserError, match=r"^detector.backbone_weights: the weights do not fit this model \(unexpected layer1.2"):
        build_detector(DetectorConfig(backbone="resnet18", backbone_weights=str(resnet34)))
    with pytest.raises(UserError, match=r"^detector.backbone_weights: the weights do not fit this model \(size mismatch for conv1"):
        build_detector(DetectorConfig(backbone="resnet10_half", backbone_weights=str(resnet34)))
    with pytest.raises(UserError, match="fcos_resnet50_fpn is torchvision's model"):
        DetectorConfig(arch="fcos_resnet50_fpn", backbone="resnet34").validate()


def test_a_frozen_backbone_folds_exactly_into_the_teacher(torch_home):
    torch.manual_seed(3)
    _cache(RESNET18, _without_bn_counters(torchvision.models.resnet18()))
    detector = build_detector(DetectorConfig(arch="fcos", backbone="resnet18", fpn_channels=64, backbone_weights=RESNET18))
    with torch.no_grad():  # non-trivial frozen statistics, so that folding them is checked
        for module in detector.backbone.body.modules():
            if isinstance(module, FrozenBatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    images = [torch.rand(3, 64, 64)]
    detector.eval()
    with torch.no_grad():
        expected = detector.backbone(detector.transform(images)[0].tensors)
    folded = TeacherFeatures(detector)(images)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in detector.backbone.body.modules())
    for key in expected:
        torch.testing.assert_close(folded[key], expected[key], rtol=1e-4, atol=1e-4)


def test_a_torchvision_coco_teacher_feeds_dmkd(torch_home, mini_data, tmp_path):
    """A torchvision FCOS R50 with its (cached) COCO weights as the frozen teacher of a ResNet-18 FCOS
    student that starts from ImageNet weights: FPN shapes match level by level (256 -> 64 channels),
    one short distillation run trains, and the student's frozen layers do not move."""
    torch.manual_seed(4)
    _cache(FCOS_COCO, _without_bn_counters(torchvision.models.detection.fcos_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=91)))
    _cache(RESNET18, _without_bn_counters(torchvision.models.resnet18()))
    teacher = DetectorConfig(arch="fcos_resnet50_fpn", weights=FCOS_COCO, image_size=64)
    student = DetectorConfig(arch="fcos", backbone="resnet18", fpn_channels=64, head_convs=1, image_size=64,
                             backbone_weights=RESNET18)
    shapes = {role: feature_shapes(build_detector(dataclasses.replace(c, weights=None, backbone_weights=None)), 64)
              for role, c in (("teacher", teacher), ("student", student))}
    assert [s[0] for s in shapes["teacher"].values()] == [256] * 5 and [s[0] for s in shapes["student"].values()] == [64] * 5
    assert [s[1:] for s in shapes["teacher"].values()] == [s[1:] for s in shapes["student"].values()]
    out = tmp_path / "run"
    final = fit(TrainConfig(data=mini_data, out=str(out), detector=student, teacher=teacher, method="dmkd", epochs=1,
                            max_iters=2, batch_size=2, warmup_iters=1, device="cpu"), progress=False)
    assert final["epoch"] == 1 and final["loss/distill"] > 0
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["teacher"]["weights"] == FCOS_COCO and run["config"]["detector"]["backbone_weights"] == RESNET18
    trained = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    published = torch.load(cached_file(torchvision_weights(RESNET18, "test")), weights_only=True)
    assert torch.equal(trained["backbone.body.layer1.0.conv1.weight"], published["layer1.0.conv1.weight"])
    assert not torch.equal(trained["backbone.body.layer4.0.conv1.weight"], published["layer4.0.conv1.weight"])


def test_a_coco_teacher_is_evaluated_by_class_name(tmp_path):
    from dmkd.data import load_coco
    from dmkd.weights import labels_by_name

    ann = tmp_path / "a.json"
    ann.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 5, "name": "person"},
                                                                               {"id": 9, "name": "car"}]}))
    coco = load_coco(ann)
    names = torchvision_weights(FCOS_COCO, "test").meta["categories"]
    assert labels_by_name(names, coco, "w") == {names.index("person"): 5, names.index("car"): 9} == {1: 5, 3: 9}
    with pytest.raises(UserError, match="none of its 3 class names is a category of the data"):
        labels_by_name(["__background__", "cat", "dog"], coco, "w")


def test_a_checkpoints_weights_are_read_in_either_torch_format_memory_mapped_when_zip(tmp_path):
    """A teacher's weights from a training checkpoint: the zip format (torch's default) is mapped from the
    file, not copied with the optimizer state beside it; the legacy format is still read, copied."""
    from dmkd.weights import read_state_dict

    detector = build_detector(DetectorConfig(arch="fcos", backbone="resnet10_quarter", fpn_channels=64))
    checkpoint = {"model": detector.state_dict(), "optimizer": {"state": {0: {"exp_avg": torch.rand(1000)}}}}
    for name, zipped in (("zip.pt", True), ("legacy.pt", False)):
        path = tmp_path / name
        torch.save(checkpoint, path, _use_new_zipfile_serialization=zipped)
        state = read_state_dict(path, name)
        assert state.keys() == checkpoint["model"].keys()
        for key, tensor in state.items():
            assert torch.equal(tensor, checkpoint["model"][key]), key
        with open("/proc/self/maps") as maps:
            assert (str(path) in maps.read()) == zipped
        del state
