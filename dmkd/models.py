"""torchvision detectors, and taps on their FPN features.

Every model is built with ``weights=None, weights_backbone=None`` and starts from random weights
unless its config names pretrained ones: ``weights`` (the whole detector) or ``backbone_weights``
(the ResNet body), each a torchvision weights name or a local file (:mod:`dmkd.weights`). A pretrained
body gets torchvision's treatment: frozen BatchNorm, conv1 and layer1 frozen.
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_conv_bn_weights
from torchvision.models import detection, resnet
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from dmkd.errors import UserError
from dmkd.heads import HeadTap, HeadView
from dmkd.weights import categories, freeze_pretrained, load_into, load_state, read_state_dict


def _slim_resnet(widths: tuple[int, int, int, int], blocks: tuple[int, int, int, int]) -> Callable[[], nn.Module]:
    """A ResNet of BasicBlocks with narrower stages, for the CPU mini-benchmark."""

    def build() -> nn.Module:
        model = resnet.ResNet(resnet.BasicBlock, list(blocks), norm_layer=nn.BatchNorm2d)
        # Rebuild the stages at the requested widths; keep torchvision's attribute names so the FPN
        # extractor and state-dict keys look like any torchvision ResNet.
        model.inplanes = widths[0]
        model.conv1 = nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
        model.bn1 = nn.BatchNorm2d(widths[0])
        model.layer1 = model._make_layer(resnet.BasicBlock, widths[0], blocks[0])
        model.layer2 = model._make_layer(resnet.BasicBlock, widths[1], blocks[1], stride=2)
        model.layer3 = model._make_layer(resnet.BasicBlock, widths[2], blocks[2], stride=2)
        model.layer4 = model._make_layer(resnet.BasicBlock, widths[3], blocks[3], stride=2)
        model.fc = nn.Linear(widths[3], 1)
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        return model

    return build


def _torchvision_resnet(name: str) -> Callable[[], nn.Module]:
    return lambda: getattr(resnet, name)(weights=None, norm_layer=nn.BatchNorm2d)


# Plain BatchNorm, not torchvision's FrozenBatchNorm2d: frozen statistics are useless on a random init.
BACKBONES: dict[str, Callable[[], nn.Module]] = {
    "resnet18": _torchvision_resnet("resnet18"),
    "resnet34": _torchvision_resnet("resnet34"),
    "resnet50": _torchvision_resnet("resnet50"),
    "resnet101": _torchvision_resnet("resnet101"),
    "resnet10": _slim_resnet((64, 128, 256, 512), (1, 1, 1, 1)),
    "resnet10_half": _slim_resnet((32, 64, 128, 256), (1, 1, 1, 1)),
    "resnet10_quarter": _slim_resnet((16, 32, 64, 128), (1, 1, 1, 1)),
}
# torchvision's own COCO detectors, built exactly as torchvision builds them (so their COCO weights load
# with no key left over); backbone, FPN width and head are torchvision's.
TORCHVISION_DETECTORS = ("retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2", "fcos_resnet50_fpn",
                         "fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2")
ARCHITECTURES = ("fcos", "retinanet", "fasterrcnn", *TORCHVISION_DETECTORS)
TORCHVISION_FIXED = (("backbone", "resnet50"), ("fpn_channels", 256), ("head_convs", 4))  # in every one of them


@dataclass(frozen=True)
class DetectorConfig:
    """What a detector is made of. ``num_classes`` counts the background (labels are 1..K)."""

    arch: str = "fcos"
    backbone: str = "resnet18"
    fpn_channels: int = 128
    num_classes: int = 4
    image_size: int = 96
    head_convs: int = 4  # FCOS / RetinaNet tower depth
    anchor_scale: float = 4.0  # RetinaNet / Faster R-CNN anchor size as a multiple of the level's stride
    score_thresh: float = 0.05
    min_size: int | None = None  # shorter image side after resizing (torchvision's min_size); None: image_size
    weights: str | None = None  # the whole detector: a torchvision weights name or a local file
    backbone_weights: str | None = None  # the ResNet body (e.g. ResNet18_Weights.IMAGENET1K_V1), or a file

    def __post_init__(self) -> None:
        # A torchvision detector fixes its backbone, FPN width and towers: left at the defaults, they
        # take torchvision's values, so configs and W&B runs say what was built.
        if self.arch in TORCHVISION_DETECTORS:
            for name, value in TORCHVISION_FIXED:
                if getattr(self, name) == getattr(DetectorConfig, name):
                    object.__setattr__(self, name, value)

    def validate(self, where: str = "detector") -> None:
        if self.arch not in ARCHITECTURES:
            raise UserError(f"{where}.arch: unknown architecture {self.arch!r}; choose one of {', '.join(ARCHITECTURES)}")
        if self.arch in TORCHVISION_DETECTORS:
            for name, value in TORCHVISION_FIXED:
                if getattr(self, name) != value:
                    raise UserError(f"{where}.{name}: {self.arch} is torchvision's model ({name} {value}); "
                                    f"leave {name} out or set {value}")
        if self.backbone not in BACKBONES:
            raise UserError(f"{where}.backbone: unknown backbone {self.backbone!r}; choose one of {', '.join(BACKBONES)}")
        if self.fpn_channels <= 0 or self.fpn_channels % 32:
            raise UserError(f"{where}.fpn_channels: must be a positive multiple of 32 (GroupNorm heads), but got {self.fpn_channels}")
        if self.num_classes < 2:
            raise UserError(f"{where}.num_classes: must be at least 2 (background + one class), but got {self.num_classes}")
        if self.image_size < 32:
            raise UserError(f"{where}.image_size: must be at least 32, but got {self.image_size}")
        if self.min_size is not None and not 32 <= self.min_size <= self.image_size:
            raise UserError(f"{where}.min_size: must lie in [32, image_size={self.image_size}], but got {self.min_size}")
        if self.head_convs < 1:
            raise UserError(f"{where}.head_convs: must be at least 1 (a head tower needs a conv), but got {self.head_convs}")
        if not (math.isfinite(self.anchor_scale) and self.anchor_scale > 0):
            raise UserError(f"{where}.anchor_scale: must be a positive number, but got {self.anchor_scale}")
        if not 0 <= self.score_thresh < 1:
            raise UserError(f"{where}.score_thresh: must lie in [0, 1), but got {self.score_thresh}")


def _backbone_with_fpn(cfg: DetectorConfig, returned_layers: list[int], extra_blocks: nn.Module | None) -> BackboneWithFPN:
    body = BACKBONES[cfg.backbone]()
    stage_channels = [_stage_out_channels(getattr(body, f"layer{i}")) for i in range(1, 5)]
    return BackboneWithFPN(
        body,
        return_layers={f"layer{k}": str(v) for v, k in enumerate(returned_layers)},
        in_channels_list=[stage_channels[i - 1] for i in returned_layers],
        out_channels=cfg.fpn_channels,
        extra_blocks=extra_blocks,
    )


def _stage_out_channels(stage: nn.Sequential) -> int:
    block = stage[-1]
    last_conv = block.conv3 if hasattr(block, "conv3") else block.conv2
    return last_conv.out_channels


def weights_classes(cfg: DetectorConfig) -> int | None:
    """The class count (background included) of a detector's torchvision weights, e.g. 91 for COCO_V1."""
    names = categories(cfg.weights)
    return len(names) if names else None


def build_detector(cfg: DetectorConfig, where: str = "detector") -> nn.Module:
    """A torchvision detector, random or with the pretrained weights its config names; images are
    resized as torchvision does: shorter side ``cfg.min_size`` (default ``image_size``), longer side
    ``cfg.image_size`` at most. ``where`` names the config in errors (``pair.teacher``)."""
    cfg.validate(where)
    detector = _build_architecture(cfg)
    if cfg.weights or cfg.backbone_weights:
        freeze_pretrained(detector.backbone.body)
    if cfg.backbone_weights:
        load_into(detector.backbone.body, load_state(cfg.backbone_weights, f"{where}.backbone_weights"),
                  f"{where}.backbone_weights", allowed_extra=("fc.",))
    if cfg.weights:
        load_into(detector, load_state(cfg.weights, f"{where}.weights"), f"{where}.weights")
    return detector


def _build_architecture(cfg: DetectorConfig) -> nn.Module:
    size_kwargs = dict(min_size=cfg.min_size or cfg.image_size, max_size=cfg.image_size)
    if cfg.arch in TORCHVISION_DETECTORS:
        threshold = {"box_score_thresh" if cfg.arch.startswith("fasterrcnn") else "score_thresh": cfg.score_thresh}
        return getattr(detection, cfg.arch)(weights=None, weights_backbone=None, num_classes=cfg.num_classes,
                                             **size_kwargs, **threshold)
    c = cfg.fpn_channels
    if cfg.arch == "fcos":
        backbone = _backbone_with_fpn(cfg, [2, 3, 4], LastLevelP6P7(c, c))
        head = FCOSHead(c, num_anchors=1, num_classes=cfg.num_classes, num_convs=cfg.head_convs)
        anchors = AnchorGenerator(sizes=tuple((8 * 2**i,) for i in range(5)), aspect_ratios=((1.0,),) * 5)
        return FCOS(backbone, cfg.num_classes, head=head, anchor_generator=anchors,
                    score_thresh=cfg.score_thresh, **size_kwargs)
    if cfg.arch == "retinanet":
        backbone = _backbone_with_fpn(cfg, [2, 3, 4], LastLevelP6P7(c, c))
        sizes = tuple(tuple(cfg.anchor_scale * 8 * 2**i * 2 ** (k / 3) for k in range(3)) for i in range(5))
        anchors = AnchorGenerator(sizes=sizes, aspect_ratios=((0.5, 1.0, 2.0),) * 5)
        head = RetinaNetHead(c, anchors.num_anchors_per_location()[0], cfg.num_classes,
                             norm_layer=partial(nn.GroupNorm, 32))
        head.classification_head.conv = head.classification_head.conv[: cfg.head_convs]
        head.regression_head.conv = head.regression_head.conv[: cfg.head_convs]
        return RetinaNet(backbone, cfg.num_classes, anchor_generator=anchors, head=head,
                         score_thresh=cfg.score_thresh, **size_kwargs)
    backbone = _backbone_with_fpn(cfg, [1, 2, 3, 4], LastLevelMaxPool())
    sizes = tuple((cfg.anchor_scale * 4 * 2**i,) for i in range(5))
    anchors = AnchorGenerator(sizes=sizes, aspect_ratios=((0.5, 1.0, 2.0),) * 5)
    return FasterRCNN(backbone, cfg.num_classes, rpn_anchor_generator=anchors,
                      box_score_thresh=cfg.score_thresh, **size_kwargs)


class FeatureTap:
    """Keeps the FPN feature dict of the detector's last forward pass, taken by a hook on its backbone.

    The detector's own forward computes the features once; the tap only holds on to them, so the
    distillation loss needs no second forward of the student. A hook on the detector's transform also
    keeps the targets as the backbone saw them (boxes in input pixels) and the padded input size.
    """

    def __init__(self, detector: nn.Module):
        self.features: OrderedDict[str, torch.Tensor] | None = None
        self.targets: list[dict] | None = None
        self.input_size: tuple[int, int] | None = None
        self._handles = [detector.backbone.register_forward_hook(self._keep_features),
                         detector.transform.register_forward_hook(self._keep_inputs)]

    def _keep_features(self, module: nn.Module, inputs, output) -> None:
        self.features = output

    def _keep_inputs(self, module: nn.Module, inputs, output) -> None:
        image_list, targets = output
        self.input_size = tuple(image_list.tensors.shape[-2:])
        self.targets = targets

    def pop(self) -> OrderedDict[str, torch.Tensor]:
        if self.features is None:
            raise RuntimeError("FeatureTap.pop: the detector has not run a forward pass since the last pop")
        features, self.features = self.features, None
        return features

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def fold_batch_norms(module: nn.Module) -> None:
    """Fold each BatchNorm2d (or a pretrained body's FrozenBatchNorm2d) that follows a conv in a torchvision
    ResNet (``convN``/``bnN`` attribute pairs and ``downsample = Sequential(conv, bn)``) into that conv, in place.

    Exact up to float rounding for frozen statistics, and it removes one full pass over every activation
    of the backbone: the frozen teacher's forward is ~19 % faster on the COCO-sized pair (BENCHMARKS.md).
    """
    for child in module.children():
        fold_batch_norms(child)
    pairs = [(f"conv{i}", f"bn{i}") for i in (1, 2, 3)]
    if isinstance(module, nn.Sequential) and len(module) == 2:
        pairs.append(("0", "1"))
    for conv_name, norm_name in pairs:
        conv, norm = getattr(module, conv_name, None), getattr(module, norm_name, None)
        if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
            setattr(module, conv_name, fuse_conv_bn_eval(conv.eval(), norm.eval()))
            setattr(module, norm_name, nn.Identity())
        elif isinstance(conv, nn.Conv2d) and isinstance(norm, FrozenBatchNorm2d):  # a pretrained body
            fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                              conv.dilation, conv.groups, bias=True).to(conv.weight.device)
            fused.weight, fused.bias = fuse_conv_bn_weights(conv.weight, conv.bias, norm.running_mean, norm.running_var,
                                                            norm.eps, norm.weight, norm.bias)
            setattr(module, conv_name, fused)
            setattr(module, norm_name, nn.Identity())


class TeacherFeatures(nn.Module):
    """Runs a teacher detector's transform, backbone and FPN: eval mode, no gradients; its head only for
    a head-level distiller (``head_layer``: the tower block whose features it reads), through
    :meth:`head_view`.

    Takes the detector over: its BatchNorms are folded into the convs before them (the teacher's
    statistics are frozen), so load the teacher's weights before wrapping it.
    """

    def __init__(self, detector: nn.Module, head_layer: int | None = None):
        super().__init__()
        self.detector = detector.eval().requires_grad_(False)
        fold_batch_norms(self.detector.backbone)
        self._head_tap = HeadTap(self.detector, head_layer, keep_loss_inputs=False) if head_layer else None

    def train(self, mode: bool = True) -> TeacherFeatures:
        return super().train(False)  # the teacher's BatchNorm statistics stay frozen

    @torch.no_grad()
    def forward(self, images: list[torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
        image_list, _ = self.detector.transform(images)
        return self.detector.backbone(image_list.tensors)

    @torch.no_grad()
    def head_view(self, features: OrderedDict[str, torch.Tensor]) -> HeadView:
        """The teacher head's outputs and tower features for these FPN features."""
        if self._head_tap is None:
            raise RuntimeError("TeacherFeatures.head_view: built without head_layer")
        self.detector.head(list(features.values()))
        view = self._head_tap.pop()
        view.detector = self.detector
        return view


def feature_shapes(detector: nn.Module, image_size: int) -> OrderedDict[str, tuple[int, int, int]]:
    """(channels, height, width) of each FPN level for one square image of ``image_size``."""
    was_training = detector.training
    detector.eval()
    with torch.no_grad():
        image_list, _ = detector.transform([torch.zeros(3, image_size, image_size)])
        features = detector.backbone(image_list.tensors)
    detector.train(was_training)
    return OrderedDict((name, tuple(f.shape[1:])) for name, f in features.items())


def load_weights(module: nn.Module, path: str | os.PathLike, explain: Callable[[dict], str] | None = None) -> None:
    """Load a local checkpoint: a state dict, or a training checkpoint holding one under ``model``.
    Weights that do not fit end in a one-line ``UserError``: ``explain(state)`` when given (what differs,
    in the caller's terms; ``dmkd.identify``), else torch's first line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint file not found")
    state = read_state_dict(path, str(path))
    try:
        module.load_state_dict(state)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise UserError(explain(state) if explain else f"{path}: weights do not fit this detector ({first})") from None
