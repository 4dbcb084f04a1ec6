"""The dense heads of torchvision's FCOS and RetinaNet, opened at a tower layer for head-level distillers.

A head has two towers (classification, regression), each a run of ``conv -> [norm] -> ReLU`` blocks,
then its predictors. :class:`HeadTap` keeps, from the detector's own forward (no second pass), each
level's pre-activation output of tower block ``layer`` and the head's outputs, anchors and ground-truth
matches; :func:`predict_from` runs a head from block ``layer`` on, as CrossKD feeds the student's
features into the teacher's head. Faster R-CNN's RoI head has no such per-location tower.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

DENSE_FAMILIES = ("fcos", "retinanet")


def head_family(arch: str) -> str | None:
    """``fcos`` or ``retinanet`` for a dense-head architecture (torchvision's named ones included), else None."""
    return next((family for family in DENSE_FAMILIES if arch.startswith(family)), None)


@dataclass
class HeadView:
    """One batch through a dense head. ``outputs`` are torchvision's (``cls_logits`` N x HWA x K,
    ``bbox_regression`` N x HWA x 4, FCOS also ``bbox_ctrness`` N x HWA x 1); ``cls_tower`` and
    ``reg_tower`` hold per level the pre-activation output of the tapped tower block; ``anchors`` and
    ``matched_idxs`` (per image, from the detector's loss) are kept for the student only; ``detector``
    (the frozen teacher, for its remaining head layers and box coder) for the teacher only."""

    outputs: dict[str, torch.Tensor]
    cls_tower: list[torch.Tensor]
    reg_tower: list[torch.Tensor]
    anchors: list[torch.Tensor] | None = None
    matched_idxs: list[torch.Tensor] | None = None
    detector: nn.Module | None = None


def tower_blocks(tower: nn.Module) -> list[list[nn.Module]]:
    """A tower's layers split into blocks, each ending with its ReLU (FCOS's flat Sequential and
    RetinaNet's Conv2dNormActivation blocks alike)."""
    blocks, current = [], []
    for layer in tower.modules():
        if list(layer.children()):
            continue
        current.append(layer)
        if isinstance(layer, nn.ReLU):
            blocks.append(current)
            current = []
    return blocks


def towers(head: nn.Module) -> tuple[list[list[nn.Module]], list[list[nn.Module]]]:
    return tower_blocks(head.classification_head.conv), tower_blocks(head.regression_head.conv)


class HeadTap:
    """Keeps a detector's head view from its own forward: hooks on the last pre-activation layer of
    tower block ``layer`` (1-based; a shallower tower gives its last block) and on the head's loss."""

    def __init__(self, detector: nn.Module, layer: int, keep_loss_inputs: bool = True):
        self.head = detector.head
        self._cls, self._reg, self._outputs, self._loss_inputs = [], [], None, None
        cls_blocks, reg_blocks = towers(self.head)
        self._handles = [cls_blocks[min(layer, len(cls_blocks)) - 1][-2].register_forward_hook(self._keep(self._cls)),
                         reg_blocks[min(layer, len(reg_blocks)) - 1][-2].register_forward_hook(self._keep(self._reg)),
                         self.head.register_forward_hook(self._keep_outputs)]
        if keep_loss_inputs:  # anchors and matches exist only inside the detector's loss: wrap it
            compute_loss = self.head.compute_loss

            def keep_and_compute(targets, head_outputs, anchors, matched_idxs, *rest):
                self._loss_inputs = (anchors, matched_idxs)
                return compute_loss(targets, head_outputs, anchors, matched_idxs, *rest)

            self.head.compute_loss = keep_and_compute

    @staticmethod
    def _keep(store: list):
        # A clone: RetinaNet's in-place ReLU would overwrite the pre-activation tensor otherwise.
        return lambda module, inputs, output: store.append(output.clone())

    def _keep_outputs(self, module, inputs, output) -> None:
        self._outputs = output

    def pop(self) -> HeadView:
        if self._outputs is None:
            raise RuntimeError("HeadTap.pop: the head has not run since the last pop")
        anchors, matched = self._loss_inputs or (None, None)
        view = HeadView(self._outputs, list(self._cls), list(self._reg), anchors, matched)
        self._cls.clear(), self._reg.clear()
        self._outputs, self._loss_inputs = None, None
        return view

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self.head.__dict__.pop("compute_loss", None)


def _flatten(prediction: torch.Tensor, per_anchor: int) -> torch.Tensor:
    """(N, A * P, H, W) -> (N, HWA, P), torchvision's layout of head outputs."""
    n, _, h, w = prediction.shape
    return prediction.view(n, -1, per_anchor, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, per_anchor)


def predict_from(head: nn.Module, layer: int, cls_features: list[torch.Tensor],
                 reg_features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The head's outputs when, at every level, its towers continue from block ``layer`` (0-based: the
    first block still to run) on the given activated features; laid out as torchvision's head outputs."""
    cls_blocks, reg_blocks = towers(head)
    cls_head, reg_head = head.classification_head, head.regression_head
    outputs: dict[str, list[torch.Tensor]] = {"cls_logits": [], "bbox_regression": []}
    for cls_x, reg_x in zip(cls_features, reg_features):
        for block in cls_blocks[layer:]:
            for module in block:
                cls_x = module(cls_x)
        for block in reg_blocks[layer:]:
            for module in block:
                reg_x = module(reg_x)
        outputs["cls_logits"].append(_flatten(cls_head.cls_logits(cls_x), cls_head.num_classes))
        if hasattr(reg_head, "bbox_ctrness"):  # FCOS
            outputs["bbox_regression"].append(_flatten(nn.functional.relu(reg_head.bbox_reg(reg_x)), 4))
            outputs.setdefault("bbox_ctrness", []).append(_flatten(reg_head.bbox_ctrness(reg_x), 1))
        else:
            outputs["bbox_regression"].append(_flatten(reg_head.bbox_reg(reg_x), 4))
    return {name: torch.cat(parts, dim=1) for name, parts in outputs.items()}


def decode_boxes(detector: nn.Module, regression: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """(N, HWA, 4) regression outputs and (N, HWA, 4) anchors -> boxes in input pixels, with the detector's
    own box coder."""
    anchors = anchors.to(regression.dtype)
    if hasattr(detector.box_coder, "decode_single"):  # RetinaNet's BoxCoder
        return detector.box_coder.decode_single(regression.reshape(-1, 4), anchors.reshape(-1, 4)).view_as(regression)
    return detector.box_coder.decode(regression, anchors)  # FCOS's BoxLinearCoder
