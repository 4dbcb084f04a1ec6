"""A teacher->student pair for distillation: the frozen teacher, the checks that the two fit each other,
and the distiller the run's method names."""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from dmkd.config import TrainConfig
from dmkd.distillers import build_distiller, detector_family, needs_head
from dmkd.errors import UserError
from dmkd.identify import mismatch
from dmkd.models import DetectorConfig, TeacherFeatures, build_detector, feature_shapes, load_weights, weights_classes

# How a user makes a teacher checkpoint and the teacher a run builds agree (command line, or a space).
TEACHER_FIX = ("set the teacher's arch, backbone, FPN width and head convs to the checkpoint's "
               "(--teacher-arch/--teacher-backbone/--teacher-fpn-channels/--teacher-head-convs, or pair.teacher "
               "in a space), or use the checkpoint's own config")


def check_heads(student: nn.Module, teacher: nn.Module, student_classes: int, teacher_classes: int) -> None:
    """A head-level method feeds the student's head features into the teacher's head and decodes both
    heads' boxes at the student's anchors: same classes and the same anchors are required."""
    if teacher_classes != student_classes:
        raise UserError(f"teacher: its head predicts {teacher_classes - 1} classes, the student's {student_classes - 1}; "
                        f"a head-level method (crosskd) compares their predictions class by class: fine-tune the "
                        f"teacher on this data first, or use a feature method")
    anchors = [(d.anchor_generator.sizes, d.anchor_generator.aspect_ratios) for d in (teacher, student)]
    if anchors[0] != anchors[1]:
        raise UserError("teacher: its anchors differ from the student's; a head-level method (crosskd) compares "
                        "predictions at the same anchors: use the same architecture and anchor_scale")


def build_distillation(cfg: TrainConfig, num_classes: int) -> tuple[TeacherFeatures, nn.Module]:
    """The frozen teacher and the distiller that ``cfg.method`` names (``cfg``: a TrainConfig).

    Teacher and student must give FPN levels of the same names and sizes; checked here, once. The
    teacher keeps its head only for a head-level method.
    """
    teacher_cfg: DetectorConfig = cfg.teacher
    # A feature method uses only the teacher's FPN: a COCO teacher keeps its own head (91 classes).
    teacher_cfg = dataclasses.replace(teacher_cfg, num_classes=weights_classes(teacher_cfg) or num_classes)
    teacher_detector = build_detector(teacher_cfg, "teacher")
    if cfg.teacher_checkpoint:
        path = cfg.teacher_checkpoint
        load_weights(teacher_detector, path, explain=lambda state: mismatch(
            path, state, teacher_cfg, "teacher", TEACHER_FIX))
    student_detector = build_detector(dataclasses.replace(cfg.detector, num_classes=num_classes))
    teacher_shapes = feature_shapes(teacher_detector, cfg.detector.image_size)
    student_shapes = feature_shapes(student_detector, cfg.detector.image_size)
    if [(k, s[1:]) for k, s in teacher_shapes.items()] != [(k, s[1:]) for k, s in student_shapes.items()]:
        raise UserError(f"teacher: its FPN levels {dict(teacher_shapes)} do not match the student's "
                        f"{dict(student_shapes)}; use the same architecture family and image size")
    if needs_head(cfg.method):
        check_heads(student_detector, teacher_detector, num_classes, teacher_cfg.num_classes)
    student_channels = next(iter(student_shapes.values()))[0]
    teacher_channels = next(iter(teacher_shapes.values()))[0]
    torch.manual_seed(cfg.seed)  # the distiller's initial weights depend on the seed only
    distiller = build_distiller(cfg.method, student_channels, teacher_channels, list(student_shapes), cfg.distill,
                                family=detector_family(cfg.detector.arch))
    if distiller is None:
        raise UserError(f"method: {cfg.method!r} distils nothing; a run without a method has no teacher")
    return TeacherFeatures(teacher_detector, head_layer=getattr(distiller, "tower_layer", None)), distiller
