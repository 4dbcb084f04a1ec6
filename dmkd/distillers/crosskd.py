"""CrossKD (Wang et al., "CrossKD: Cross-Head Knowledge Distillation for Object Detection", CVPR 2024).

The student head's tower feature at block ``reuse_from`` (pre-activation) is rescaled per channel to the
statistics of the teacher's feature at the same block (a 1x1 conv first where head widths differ),
activated, and run through the frozen teacher head's remaining blocks and predictors. These cross-head
predictions mimic the teacher's own:
- classification: the KD quality focal loss, ``BCE(sigmoid(s), sigmoid(t)) * |sigmoid(s) - sigmoid(t)|**beta``
  (beta 1), summed over locations and classes (RetinaNet: anchors between IoU thresholds left out);
- boxes: ``box_loss`` between the decoded cross-head and teacher boxes, ``giou`` (1 - GIoU) or ``iou``
  (-log IoU, mmdet's IoULoss), each location weighted by the teacher's top class probability (0 where
  the teacher's box is degenerate);
- FCOS centerness, when ``centerness_weight`` > 0: binary KL divergence to the teacher's centerness,
  weighted as the boxes. The paper's code computes the cross-head centerness but leaves it out of its
  loss; ``box_loss: giou`` with ``centerness_weight: 0.75`` is this project's earlier variant.
Every term is divided by the number of foreground locations (RetinaNet, as the paper) or the sum of their
centerness targets (FCOS, as the paper). A parameter left unset takes its detector family's published
value (``DEFAULTS``). The paper's pairs have towers of equal depth; with a shallower student tower,
``reuse_from`` counts the student's blocks and feeds its last one into the teacher's later blocks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import generalized_box_iou_loss

from dmkd.distillers.base import DistillInputs, Published, aligner, check_weight
from dmkd.heads import DENSE_FAMILIES, HeadView, decode_boxes, head_family, predict_from

# The authors' configs (jbwang1997/CrossKD, configs/crosskd/). Two-stage detectors have no dense head.
DEFAULTS = {
    "retinanet": Published("CrossKD crosskd_r50_retinanet_r101_fpn_2x_coco.py",
                           {"cls_weight": 1.0, "reg_weight": 1.0, "centerness_weight": 0.0, "reuse_from": 3,
                            "box_loss": "giou"}),
    "fcos": Published("CrossKD crosskd_r50_fcos_r101-2x-ms_caffe_fpn_gn-head_2x_ms_coco.py",
                      {"cls_weight": 0.4, "reg_weight": 0.75, "centerness_weight": 0.0, "reuse_from": 2,
                       "box_loss": "iou"}),
}
BOX_LOSSES = ("giou", "iou")
# What a tuning run searches (`orchestrator.ablate --tune`): each weight from a tenth to five times the paper's.
SEARCH = {"cls_weight": {"type": "loguniform", "low": 0.04, "high": 5.0},
          "reg_weight": {"type": "loguniform", "low": 0.075, "high": 5.0}}
EPS = 1e-6
IGNORED = -2  # torchvision's Matcher.BETWEEN_THRESHOLDS


def kd_quality_focal(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Elementwise KD quality focal loss: soft-target BCE scaled by the probability gap to the power beta."""
    target = teacher_logits.sigmoid()
    gap = (student_logits.sigmoid() - target).abs().pow(beta)
    return F.binary_cross_entropy_with_logits(student_logits, target, reduction="none") * gap


def binary_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(teacher || student) of two Bernoulli distributions given as logits: the soft-target
    BCE minus the teacher's entropy (same gradient, 0 when they agree)."""
    target = teacher_logits.sigmoid()
    return (F.binary_cross_entropy_with_logits(student_logits, target, reduction="none")
            - F.binary_cross_entropy_with_logits(teacher_logits, target, reduction="none"))


def log_iou_loss(boxes: torch.Tensor, targets: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Elementwise ``-log IoU`` of aligned boxes (x0, y0, x1, y1), IoU clamped at ``eps`` (mmdet's IoULoss)."""
    top_left = torch.maximum(boxes[:, :2], targets[:, :2])
    bottom_right = torch.minimum(boxes[:, 2:], targets[:, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=1)
    area = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0).prod(dim=1)
    target_area = (targets[:, 2:] - targets[:, :2]).clamp(min=0).prod(dim=1)
    iou = inter / (area + target_area - inter).clamp(min=eps)
    return -iou.clamp(min=eps).log()


def rescale_like(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The student feature standardised per channel, then given the teacher feature's per-channel mean and std."""
    def stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = x.transpose(0, 1).flatten(1)
        return flat.mean(1).view(1, -1, 1, 1), flat.std(1).view(1, -1, 1, 1)

    s_mean, s_std = stats(student)
    t_mean, t_std = stats(teacher.detach())
    return (student - s_mean) / (s_std + EPS) * t_std + t_mean


def fcos_centerness_targets(view: HeadView, targets_boxes: list[torch.Tensor], detector: nn.Module) -> torch.Tensor:
    """FCOS's centerness target of every foreground location (torchvision's formula)."""
    values = []
    for anchors, matched, boxes in zip(view.anchors, view.matched_idxs, targets_boxes):
        foreground = matched >= 0
        if not foreground.any():
            continue
        ltrb = detector.box_coder.encode(anchors[foreground], boxes[matched[foreground]])
        lr, tb = ltrb[:, [0, 2]], ltrb[:, [1, 3]]
        values.append(torch.sqrt((lr.min(-1)[0] / lr.max(-1)[0]) * (tb.min(-1)[0] / tb.max(-1)[0])))
    return torch.cat(values) if values else torch.zeros(0)


class CrossKDLoss(nn.Module):
    needs = frozenset({"student_head", "teacher_head", "targets"})

    def __init__(self, student_channels: int, teacher_channels: int, family: str = "fcos", *,
                 cls_weight: float | None = None, reg_weight: float | None = None,
                 centerness_weight: float | None = None, reuse_from: int | None = None, box_loss: str | None = None,
                 beta: float = 1.0):
        super().__init__()
        if family not in DENSE_FAMILIES:
            raise ValueError(f"crosskd needs a dense head ({', '.join(DENSE_FAMILIES)}), not {family!r}")
        published = DEFAULTS[family].values
        given = {"cls_weight": cls_weight, "reg_weight": reg_weight, "centerness_weight": centerness_weight}
        for name, value in given.items():
            setattr(self, name, published[name] if value is None else value)
            check_weight(name, getattr(self, name))
        self.reuse_from = published["reuse_from"] if reuse_from is None else reuse_from
        if not (isinstance(self.reuse_from, int) and self.reuse_from >= 1):
            raise ValueError(f"reuse_from must be a tower block number >= 1, but got {reuse_from!r}")
        self.box_loss = published["box_loss"] if box_loss is None else box_loss
        if self.box_loss not in BOX_LOSSES:
            raise ValueError(f"box_loss must be one of {', '.join(BOX_LOSSES)}, but got {box_loss!r}")
        check_weight("beta", beta)
        self.family, self.beta = family, beta
        self.align_cls = aligner(student_channels, teacher_channels)
        self.align_reg = aligner(student_channels, teacher_channels)

    @property
    def tower_layer(self) -> int:
        return self.reuse_from

    def _enter_teacher(self, student: list[torch.Tensor], teacher: list[torch.Tensor], align: nn.Module | None) -> list[torch.Tensor]:
        aligned = [align(s) if align is not None else s for s in student]
        return [F.relu(rescale_like(s.float(), t.float())) for s, t in zip(aligned, teacher)]

    def cross_predictions(self, inputs: DistillInputs) -> dict[str, torch.Tensor]:
        student, teacher = inputs.student_head, inputs.teacher_head
        cls_in = self._enter_teacher(student.cls_tower, teacher.cls_tower, self.align_cls)
        reg_in = self._enter_teacher(student.reg_tower, teacher.reg_tower, self.align_reg)
        head = inputs.teacher_head.detector.head
        dtype = next(head.parameters()).dtype
        return predict_from(head, self.reuse_from, [x.to(dtype) for x in cls_in], [x.to(dtype) for x in reg_in])

    def forward(self, inputs: DistillInputs) -> dict[str, torch.Tensor]:
        student, teacher = inputs.student_head, inputs.teacher_head
        cross = self.cross_predictions(inputs)
        matched = torch.stack(student.matched_idxs)
        valid = (matched != IGNORED).unsqueeze(-1).float()  # N x HWA x 1
        if self.family == "fcos":
            normaliser = fcos_centerness_targets(student, inputs.context.boxes, inputs.teacher_head.detector).sum()
        else:
            normaliser = (matched >= 0).sum().float()
        normaliser = normaliser.clamp(min=1.0)
        t_cls = teacher.outputs["cls_logits"].float()
        terms = {"crosskd_cls": self.cls_weight * (kd_quality_focal(cross["cls_logits"].float(), t_cls, self.beta)
                                                   * valid).sum() / normaliser}
        box_weight = t_cls.max(-1)[0].sigmoid() * valid.squeeze(-1)
        anchors = torch.stack(student.anchors)
        cross_boxes = decode_boxes(inputs.teacher_head.detector, cross["bbox_regression"].float(), anchors)
        teacher_boxes = decode_boxes(inputs.teacher_head.detector, teacher.outputs["bbox_regression"].float(), anchors)
        sizes = teacher_boxes[..., 2:] - teacher_boxes[..., :2]
        box_weight = box_weight * (sizes > 0).all(-1)  # a degenerate teacher box (FCOS ReLU at 0) has no shape to mimic
        if self.box_loss == "giou":
            box = generalized_box_iou_loss(cross_boxes.reshape(-1, 4), teacher_boxes.reshape(-1, 4), reduction="none")
        else:
            box = log_iou_loss(cross_boxes.reshape(-1, 4), teacher_boxes.reshape(-1, 4))
        terms["crosskd_reg"] = self.reg_weight * (box * box_weight.reshape(-1)).sum() / normaliser
        if self.family == "fcos" and self.centerness_weight > 0:
            centerness = binary_kl(cross["bbox_ctrness"].float(), teacher.outputs["bbox_ctrness"].float())
            terms["crosskd_centerness"] = self.centerness_weight * (centerness.squeeze(-1) * box_weight).sum() / normaliser
        return terms


def check_detectors(student_arch: str, teacher_arch: str, teacher_tower: int, reuse_from: int | None) -> None:
    """CrossKD's requirements on the pair, checked from their configs (``ValueError`` names the problem)."""
    family = head_family(student_arch)
    if family is None:
        raise ValueError(f"crosskd needs a dense head (FCOS or RetinaNet), not {student_arch}: its RoI head predicts "
                         f"from proposals that teacher and student choose differently, so there is no location where "
                         f"the student's head features could enter the teacher's head; use a feature method")
    if head_family(teacher_arch) != family:
        raise ValueError(f"crosskd feeds the student's head features into the teacher's head: the teacher must be "
                         f"{family} too, not {teacher_arch}")
    block = DEFAULTS[family].values["reuse_from"] if reuse_from is None else reuse_from
    if isinstance(block, int) and block > teacher_tower:
        raise ValueError(f"reuse_from {block} is past the teacher's {teacher_tower} tower blocks")
