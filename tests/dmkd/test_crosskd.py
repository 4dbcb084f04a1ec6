"""CrossKD and the head-level seam: golden values, the cross-head forward, composition, and training."""
import copy
import dataclasses
import math

import pytest
import torch

from dmkd.config import TrainConfig
from dmkd.distillers import HeadLevel, build_distiller, check_method, method_parameters, search_space
from dmkd.distillers.crosskd import kd_quality_focal, rescale_like
from dmkd.engine import fit
from dmkd.errors import UserError
from dmkd.heads import tower_blocks
from dmkd.models import DetectorConfig, TeacherFeatures, build_detector
from dmkd.step import StudentWithDistiller, teacher_outputs
from tests.helpers import STUDENT, TEACHER
from tests.helpers import tiny_batch as _batch


def test_kd_quality_focal_matches_hand_computed_values():
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    # student logit 2, teacher logit 0: BCE(2, 0.5) = softplus(2) - 2 * 0.5, times |sigmoid(2) - 0.5|
    expected = (math.log1p(math.exp(2.0)) - 1.0) * abs(sig(2.0) - 0.5)
    got = kd_quality_focal(torch.tensor([2.0, 0.7]), torch.tensor([0.0, 0.7]))
    assert got[0].item() == pytest.approx(expected, rel=1e-6) and expected == pytest.approx(0.4291, abs=1e-4)
    assert got[1].item() == pytest.approx(0.0, abs=1e-7)  # equal probabilities: nothing to learn
    assert kd_quality_focal(torch.tensor([2.0]), torch.tensor([0.0]), beta=2.0).item() == pytest.approx(
        (math.log1p(math.exp(2.0)) - 1.0) * abs(sig(2.0) - 0.5) ** 2, rel=1e-6)


def test_log_iou_loss_matches_hand_computed_values():
    from dmkd.distillers.crosskd import log_iou_loss

    boxes = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]])
    targets = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [5.0, 5.0, 6.0, 6.0]])
    # overlap 1 of union 7; identical; disjoint (IoU clamped at 1e-6)
    assert log_iou_loss(boxes, targets).tolist() == pytest.approx([math.log(7), 0.0, -math.log(1e-6)], rel=1e-5)


def test_rescale_like_gives_the_teacher_statistics_per_channel():
    torch.manual_seed(1)
    student, teacher = torch.randn(2, 3, 4, 4) * 5 + 2, torch.randn(2, 3, 4, 4) * 0.5 - 1
    out = rescale_like(student, teacher)
    flat_out, flat_t = out.transpose(0, 1).flatten(1), teacher.transpose(0, 1).flatten(1)
    assert torch.allclose(flat_out.mean(1), flat_t.mean(1), atol=1e-5)
    assert torch.allclose(flat_out.std(1), flat_t.std(1), atol=1e-4)


@pytest.mark.parametrize("family,box_loss", [("fcos", "iou"), ("fcos", "giou"), ("retinanet", "giou")])
def test_a_student_identical_to_its_teacher_reproduces_its_predictions(family, box_loss):
    """Same weights on both sides: the cross-head predictions are the teacher's own, so every term is 0.
    Fails if the tower is tapped after its ReLU, entered at the wrong block, or decoded differently."""
    torch.manual_seed(2)
    teacher_detector = build_detector(TEACHER[family])
    student = copy.deepcopy(teacher_detector).train()
    teacher = TeacherFeatures(teacher_detector, head_layer=3 if family == "retinanet" else 2)
    distiller = build_distiller("crosskd", 64, 64, ["0"], {"centerness_weight": 1.0, "box_loss": box_loss}, family=family)
    model = StudentWithDistiller(student, distiller)
    student.backbone.eval()  # the teacher's BatchNorms are frozen (folded): give the student the same statistics
    images, targets = _batch()
    features, head = teacher_outputs(teacher, distiller, images)
    model.detector(images, targets)
    view = model.head_tap.pop()
    level0 = next(iter(model.tap.pop().values()))
    # the tapped feature is block k's output before its ReLU (k = 2 of the student's 4 for FCOS, 3 for RetinaNet)
    expected = level0
    blocks = tower_blocks(student.head.classification_head.conv)
    layer = 3 if family == "retinanet" else 2
    for block in blocks[:layer]:
        for module in block[:-1] if block is blocks[layer - 1] else block:
            expected = module(expected)
    assert torch.allclose(view.cls_tower[0], expected, atol=1e-5) and (view.cls_tower[0] < 0).any()
    from dmkd.distillers import DistillContext, DistillInputs

    inputs = DistillInputs(student_head=view, teacher_head=head, context=DistillContext([t["boxes"] for t in targets]))
    cross = distiller.loss.cross_predictions(inputs)
    for name, value in head.outputs.items():
        assert torch.allclose(cross[name], value, atol=1e-3), name
    terms = distiller.distill(inputs)
    assert set(terms) == ({"crosskd_cls", "crosskd_reg", "crosskd_centerness"} if family == "fcos" else {"crosskd_cls", "crosskd_reg"})
    assert all(abs(v.item()) < 1e-5 for v in terms.values()), terms
    # a different student gives figures that differ
    other = StudentWithDistiller(build_detector(STUDENT[family]), build_distiller("crosskd", 32, 64, ["0"], family=family))
    other_terms = other(images, targets, features, head)
    assert all(v.item() > 1e-4 for k, v in other_terms.items() if k.startswith("distill/")), other_terms


def test_names_parameters_and_errors():
    assert {"alpha", "cls_weight", "reuse_from"} <= set(method_parameters("dmkd+crosskd"))
    assert set(search_space("dmkd+crosskd")) == {"alpha", "temperature", "spatial_ratio", "channel_ratio",
                                                 "cls_weight", "reg_weight"}
    assert isinstance(build_distiller("crosskd", 8, 8, ["0"]), HeadLevel)
    assert build_distiller("crosskd", 8, 8, ["0"], family="retinanet").loss.cls_weight == 1.0
    fcos = build_distiller("crosskd", 8, 8, ["0"]).loss  # the paper's FCOS config: -log IoU, no centerness term
    assert (fcos.cls_weight, fcos.reg_weight, fcos.centerness_weight, fcos.box_loss) == (0.4, 0.75, 0.0, "iou")
    assert build_distiller("crosskd", 8, 8, ["0"], family="retinanet").loss.box_loss == "giou"
    variant = build_distiller("crosskd", 8, 8, ["0"], {"box_loss": "giou", "centerness_weight": 0.75}).loss
    assert (variant.box_loss, variant.centerness_weight) == ("giou", 0.75)
    # a tuning run starts from the paper's values for the pair's head (not from "unset")
    from orchestrator.grid import load_grid, row_space
    from orchestrator.space import paper_default_point

    grid = load_grid("search_spaces/methods.yaml")
    assert paper_default_point(row_space(grid, grid.rows["dmkd+crosskd"])) == {
        "alpha": 2e-5, "temperature": 0.5, "spatial_ratio": 0.65, "channel_ratio": 0.65, "cls_weight": 0.4, "reg_weight": 0.75}
    for bad, message in (("dmkd+mgd", "at most one feature method"), ("none+crosskd", "at most one"),
                         ("dmkd+kd", "unknown method 'kd'")):
        with pytest.raises(UserError, match=message):
            check_method(bad)
    with pytest.raises(UserError, match=r"distill\.cls_weight: must be a number"):
        build_distiller("crosskd", 8, 8, ["0"], {"cls_weight": "high"})
    rcnn = DetectorConfig(arch="fasterrcnn", backbone="resnet10_quarter", fpn_channels=32, image_size=64)
    config = TrainConfig(method="crosskd", detector=rcnn, teacher=dataclasses.replace(rcnn, backbone="resnet18"))
    with pytest.raises(UserError, match="method: crosskd needs a dense head .*RoI head predicts from proposals"):
        config.validate(check_files=False)
    mixed = TrainConfig(method="crosskd", detector=STUDENT["fcos"], teacher=TEACHER["retinanet"])
    with pytest.raises(UserError, match="the teacher must be fcos too"):
        mixed.validate(check_files=False)
    deep = TrainConfig(method="crosskd", detector=STUDENT["fcos"], teacher=TEACHER["fcos"], distill={"reuse_from": 5})
    with pytest.raises(UserError, match="reuse_from 5 is past the teacher's 4 tower blocks"):
        deep.validate(check_files=False)


def test_crosskd_trains_and_leaves_the_teacher_head_untouched(mini_data, tmp_path):
    torch.manual_seed(4)
    teacher_cfg = dataclasses.replace(TEACHER["fcos"], image_size=96)
    student_cfg = dataclasses.replace(STUDENT["fcos"], image_size=96)
    teacher_detector = build_detector(teacher_cfg)
    torch.save(teacher_detector.state_dict(), tmp_path / "teacher.pt")
    cfg = TrainConfig(data=mini_data, out=str(tmp_path / "run"), detector=student_cfg, teacher=teacher_cfg,
                      teacher_checkpoint=str(tmp_path / "teacher.pt"), method="dmkd+crosskd", epochs=2, max_iters=4,
                      batch_size=4, warmup_iters=1, lr=1e-3)
    from dmkd.pairing import build_distillation

    teacher, distiller = build_distillation(cfg, 4)
    before = {k: v.clone() for k, v in teacher.detector.head.state_dict().items()}
    metrics = fit(cfg, teacher=teacher, distiller=distiller, progress=False)
    after = teacher.detector.head.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert metrics["distill/crosskd_cls"] > 0 and metrics["distill/dmkd"] > 0
