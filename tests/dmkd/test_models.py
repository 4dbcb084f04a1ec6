import pytest
import torch

from dmkd.errors import UserError
from dmkd.models import DetectorConfig, FeatureTap, TeacherFeatures, build_detector, feature_shapes, load_weights

SMALL = dict(backbone="resnet10_quarter", fpn_channels=64, image_size=64, head_convs=1)


@pytest.mark.parametrize("arch, levels", [("fcos", ["0", "1", "2", "p6", "p7"]),
                                          ("retinanet", ["0", "1", "2", "p6", "p7"]),
                                          ("fasterrcnn", ["0", "1", "2", "3", "pool"])])
def test_each_architecture_trains_and_predicts(arch, levels):
    torch.manual_seed(0)
    detector = build_detector(DetectorConfig(arch=arch, **SMALL))
    shapes = feature_shapes(detector, 64)
    assert list(shapes) == levels and all(c == 64 for c, _, _ in shapes.values())
    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 64)]
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 40.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    detector.train()
    losses = detector(images, targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    detector.eval()
    with torch.no_grad():
        outputs = detector(images)
    assert len(outputs) == 2 and set(outputs[0]) == {"boxes", "scores", "labels"}


def test_backbones_have_the_expected_widths():
    """What the features really are, from a forward pass: the FPN's width on every level, fed by the body's
    last stage at its own width (512 for a ResNet-18, 2048 for a ResNet-50, 256 for the half-width ResNet-10)."""
    from dmkd.models import feature_shapes

    for name, last_stage in (("resnet18", 512), ("resnet50", 2048), ("resnet10_half", 256), ("resnet10_quarter", 128)):
        detector = build_detector(DetectorConfig(backbone=name, fpn_channels=64, image_size=64))
        shapes = feature_shapes(detector, 64)
        assert {shape[0] for shape in shapes.values()} == {64} and len(shapes) == 5
        with torch.no_grad():
            body = detector.backbone.body(torch.rand(1, 3, 64, 64))
        assert list(body.values())[-1].shape[1] == last_stage
    resnet50 = build_detector(DetectorConfig(backbone="resnet50", image_size=64))
    assert not any("Frozen" in type(m).__name__ for m in resnet50.modules())


def test_feature_tap_takes_the_features_of_the_same_forward():
    torch.manual_seed(0)
    detector = build_detector(DetectorConfig(**SMALL)).eval()
    calls = []
    detector.backbone.register_forward_hook(lambda *_: calls.append(1))
    tap = FeatureTap(detector)
    images = [torch.rand(3, 64, 64)]
    with torch.no_grad():
        detector(images)
        features = tap.pop()
        with pytest.raises(RuntimeError):
            tap.pop()
        image_list, _ = detector.transform(images)
        direct = detector.backbone(image_list.tensors)
    assert len(calls) == 2  # one forward of the detector, one direct call in this test: no hidden second pass
    assert list(features) == list(direct)
    for name in features:
        assert torch.equal(features[name], direct[name])
    tap.close()


def test_teacher_features_never_run_the_head_and_take_no_gradient():
    detector = build_detector(DetectorConfig(**SMALL))
    head_calls = []
    detector.head.register_forward_hook(lambda *_: head_calls.append(1))
    teacher = TeacherFeatures(detector)
    teacher.train()
    assert not teacher.detector.training
    features = teacher([torch.rand(3, 64, 64)])
    assert head_calls == []
    assert all(not f.requires_grad for f in features.values())
    assert all(not p.requires_grad for p in teacher.parameters())


@pytest.mark.parametrize("backbone", ["resnet10_quarter", "resnet50"])
def test_the_teacher_folds_its_batch_norms_without_changing_its_features(backbone):
    torch.manual_seed(0)
    detector = build_detector(DetectorConfig(backbone=backbone, fpn_channels=64, image_size=64))
    for module in detector.modules():  # statistics far from the identity, so a wrong fold shows
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2.0)
            torch.nn.init.uniform_(module.weight, 0.5, 1.5)
            torch.nn.init.uniform_(module.bias, -0.5, 0.5)
    norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in detector.backbone.modules())
    images = [torch.rand(3, 64, 64)]
    with torch.no_grad():
        unfolded = detector.eval().backbone(detector.transform(images)[0].tensors)
    teacher = TeacherFeatures(detector)
    assert norms > 0 and not any(isinstance(m, torch.nn.BatchNorm2d) for m in teacher.modules())
    folded = teacher(images)
    for name in unfolded:
        scale = unfolded[name].abs().max().item()  # float rounding grows through 50 layers; a wrong fold is O(scale)
        torch.testing.assert_close(folded[name], unfolded[name], rtol=0, atol=1e-4 * scale)
    assert all(not p.requires_grad for p in teacher.parameters())


def test_load_weights_round_trip_and_errors(tmp_path):
    source = build_detector(DetectorConfig(**SMALL))
    target = build_detector(DetectorConfig(**SMALL))
    path = tmp_path / "weights.pt"
    torch.save({"model": source.state_dict(), "epoch": 3}, path)
    load_weights(target, path)
    for key, value in source.state_dict().items():
        assert torch.equal(value, target.state_dict()[key])
    with pytest.raises(UserError, match="checkpoint file not found"):
        load_weights(target, tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(UserError, match="not a readable torch checkpoint"):
        load_weights(target, tmp_path / "junk.pt")
    other = build_detector(DetectorConfig(backbone="resnet10_half", fpn_channels=64, image_size=64))
    with pytest.raises(UserError, match="do not fit"):
        load_weights(other, path)


def test_bad_detector_configs():
    with pytest.raises(UserError, match="unknown architecture 'yolo'"):
        build_detector(DetectorConfig(arch="yolo"))
    with pytest.raises(UserError, match="unknown backbone"):
        build_detector(DetectorConfig(backbone="vgg"))
    with pytest.raises(UserError, match="multiple of 32"):
        build_detector(DetectorConfig(fpn_channels=48))
