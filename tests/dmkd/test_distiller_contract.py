"""One contract for every distiller, exercised as the training loop calls it: the student's own forward
collects what the distiller ``needs`` and calls its ``distill`` (``dmkd.step.StudentWithDistiller``).

Every method, alone and joined with CrossKD: named, scalar, finite terms; gradients reach the student
and the distiller's own weights, never the teacher. A student identical to its teacher must give 0 for
every term that compares the two directly: PKD's, FGD's foreground, background and attention terms, and
CrossKD's (its cross-head predictions are then the teacher's own). MGD, DMKD and FitNet pass the student's
feature through a module of their own first (a generator or an align conv, randomly initialised), and
FGD's global term through a context block per side, so for them an identical pair is not 0 and the
check does not apply.
"""
import copy

import pytest
import torch

from dmkd.distillers import HEAD_METHODS, METHODS, build_distiller, needs_head
from dmkd.models import TeacherFeatures, build_detector, feature_shapes
from dmkd.step import StudentWithDistiller, teacher_outputs
from tests.helpers import STUDENT, TEACHER, tiny_batch

EVERY_METHOD = [m for m in (*METHODS, *HEAD_METHODS) if m != "none"] + [f"{m}+crosskd" for m in ("dmkd", "pkd", "mgd")]
# the terms that are 0 for a student identical to its teacher
ZERO_FOR_AN_IDENTICAL_PAIR = {"pkd": {"pkd"}, "fgd": {"fgd_fg", "fgd_bg", "fgd_attention"},
                              "crosskd": {"crosskd_cls", "crosskd_reg"}}


def _distilled(method: str, student_cfg, teacher_cfg, identical: bool = False):
    """(student with its distiller, teacher) for ``method``, built as ``dmkd.pairing`` builds them."""
    torch.manual_seed(3)
    teacher_detector = build_detector(teacher_cfg)
    student = copy.deepcopy(teacher_detector) if identical else build_detector(student_cfg)
    shapes = feature_shapes(student, 64)
    channels = next(iter(shapes.values()))[0]
    distiller = build_distiller(method, channels, teacher_cfg.fpn_channels, list(shapes))
    teacher = TeacherFeatures(teacher_detector, head_layer=getattr(distiller, "tower_layer", None))
    model = StudentWithDistiller(student.train(), distiller)
    if identical:  # the teacher's BatchNorms are frozen (folded): give the student the same statistics
        student.backbone.eval()
    return model, teacher


def _terms(model: StudentWithDistiller, teacher: TeacherFeatures) -> dict[str, torch.Tensor]:
    images, targets = tiny_batch()
    features, head = teacher_outputs(teacher, model.distiller, images)
    losses = model(images, targets, features, head)  # the loop's call: the forward calls distiller.distill
    return {k.split("/", 1)[1]: v for k, v in losses.items() if k.startswith("distill/")}


@pytest.mark.parametrize("method", EVERY_METHOD)
def test_every_distiller_keeps_the_contract(method):
    model, teacher = _distilled(method, STUDENT["fcos"], TEACHER["fcos"])
    terms = _terms(model, teacher)
    assert terms and all(v.dim() == 0 and torch.isfinite(v) for v in terms.values()), terms
    assert any(v.item() != 0 for v in terms.values())  # a student unlike its teacher is distilled
    sum(terms.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    student_grads = [p.grad for p in model.detector.backbone.parameters() if p.grad is not None]
    assert student_grads and any(g.abs().sum() > 0 for g in student_grads)
    if needs_head(method):  # the head-level part reaches the student's head tower too
        assert model.detector.head.classification_head.conv[0].weight.grad.abs().sum() > 0
    own = [p for p in model.distiller.parameters() if p.requires_grad and p.ndim > 1]
    assert own and all(p.grad is not None for p in own)


@pytest.mark.parametrize("method", sorted(ZERO_FOR_AN_IDENTICAL_PAIR))
def test_a_student_identical_to_its_teacher_gives_zero_where_the_terms_compare_them(method):
    model, teacher = _distilled(method, TEACHER["fcos"], TEACHER["fcos"], identical=True)
    terms = _terms(model, teacher)
    zero = ZERO_FOR_AN_IDENTICAL_PAIR[method]
    assert zero <= set(terms)
    assert all(abs(terms[name].item()) < 1e-4 for name in zero), terms
    different, teacher = _distilled(method, STUDENT["fcos"], TEACHER["fcos"])
    assert all(abs(_terms(different, teacher)[name].item()) > 1e-4 for name in zero)  # and not 0 otherwise
