"""Which detector a checkpoint holds, and what differs from the one a run builds, in the run's own terms.

A ``dmkd.train`` checkpoint (and a cached teacher) keeps the config it was trained with; a plain state
dict is read from its tensors' shapes: the architecture from the heads' parameter names, the backbone
by matching the ResNet body's shapes against each backbone this project builds, the FPN width, the
head's tower depth, and the class count from the classifier's outputs.
"""
from __future__ import annotations

import re

import torch

from dmkd.io import read_torch
from dmkd.models import BACKBONES, TORCHVISION_DETECTORS, DetectorConfig

ARCH_FAMILIES = ("fcos", "retinanet", "fasterrcnn")
WORDS = {"arch": "architecture", "backbone": "backbone", "fpn_channels": "FPN width", "head_convs": "head depth",
         "classes": "class count"}


def _family(arch: str) -> str:
    return next((family for family in ARCH_FAMILIES if arch.startswith(family)), arch)


def _backbone_shapes(name: str) -> dict[str, tuple]:
    return {f"backbone.body.{k}": tuple(v.shape) for k, v in BACKBONES[name]().state_dict().items()
            if not k.startswith("fc.") and v.dim() > 0}


def _backbone(state: dict) -> str | None:
    """The backbone whose body has exactly these shapes (built once each, only when a checkpoint does not fit)."""
    found = {k: tuple(v.shape) for k, v in state.items() if k.startswith("backbone.body.") and v.dim() > 0
             and not k.endswith(("num_batches_tracked",))}
    return next((name for name in BACKBONES if _backbone_shapes(name) == found), None)


def _shape(state: dict, key: str) -> tuple | None:
    value = state.get(key)
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def infer_classes(state: dict) -> int | None:
    """The classes (without the background) a detector's classifier predicts; None where its tensors do not
    tell. Read from the head's shapes alone: no backbone is built."""
    scores = _shape(state, "roi_heads.box_predictor.cls_score.weight")
    if scores:
        return scores[0] - 1
    logits = _shape(state, "head.classification_head.cls_logits.weight")
    boxes = _shape(state, "head.regression_head.bbox_reg.weight")
    return logits[0] // (boxes[0] // 4) - 1 if logits and boxes else None


def infer_detector(state: dict) -> dict:
    """What a plain state dict's shapes say: ``arch`` (family), ``backbone``, ``fpn_channels``,
    ``head_convs`` (dense heads) and ``classes`` (without the background); a key is left out where the
    tensors do not tell."""
    found: dict = {}
    scores = _shape(state, "roi_heads.box_predictor.cls_score.weight")
    logits = _shape(state, "head.classification_head.cls_logits.weight")
    boxes = _shape(state, "head.regression_head.bbox_reg.weight")
    if scores:
        found["arch"] = "fasterrcnn"
        found["classes"] = infer_classes(state)
    elif logits and boxes:
        fcos = _shape(state, "head.regression_head.bbox_ctrness.weight") is not None
        found["arch"] = "fcos" if fcos else "retinanet"
        found["classes"] = infer_classes(state)
        tower = [k for k, v in state.items() if re.match(r"head\.classification_head\.conv\.\d+\.", k) and v.dim() == 4]
        found["head_convs"] = len(tower)
    lateral = next((v for k, v in state.items() if k.startswith("backbone.fpn.layer_blocks.0") and v.dim() == 4), None)
    if lateral is not None:
        found["fpn_channels"] = lateral.shape[0]
    backbone = _backbone(state)
    if backbone:
        found["backbone"] = backbone
    return found


def saved_detector(config: dict) -> dict:
    """The same description from a checkpoint's saved TrainConfig (``config["detector"]``)."""
    detector = config["detector"]
    return {"arch": _family(detector["arch"]), "backbone": detector["backbone"], "fpn_channels": detector["fpn_channels"],
            "head_convs": detector["head_convs"], "classes": detector["num_classes"] - 1}


def wanted_detector(cfg: DetectorConfig) -> dict:
    return {"arch": _family(cfg.arch), "backbone": cfg.backbone, "fpn_channels": cfg.fpn_channels,
            "head_convs": cfg.head_convs, "classes": cfg.num_classes - 1}


def describe(detector: dict) -> str:
    """``fcos/resnet50 with FPN 256, 4 head convs and 3 classes`` (what is known of it)."""
    text = f"{detector.get('arch', 'detector')}/{detector.get('backbone', 'an unknown backbone')}"
    parts = [f"FPN {detector['fpn_channels']}" if "fpn_channels" in detector else "",
             f"{detector['head_convs']} head convs" if detector.get("arch") in ("fcos", "retinanet") and "head_convs" in detector else "",
             f"{detector['classes']} classes" if "classes" in detector else ""]
    parts = [p for p in parts if p]
    if parts:
        text += " with " + (", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0])
    return text


def saved_config(path) -> dict | None:
    """The TrainConfig a ``dmkd.train`` checkpoint (or a cached teacher) was written with, if it has one."""
    try:
        whole = read_torch(path)
    except Exception:  # unreadable files were reported before a mismatch could be
        return None
    config = whole.get("config") if isinstance(whole, dict) else None
    return config if isinstance(config, dict) and isinstance(config.get("detector"), dict) else None


def mismatch(path, state: dict, wanted: DetectorConfig, role: str, fix: str) -> str:
    """The one-line reason the checkpoint at ``path`` (weights ``state``) does not fit: what it holds
    (its saved config, else its shapes) against what this run's ``role`` builds, and ``fix``."""
    config = saved_config(path)
    found = saved_detector(config) if config else infer_detector(state)
    expected = wanted_detector(wanted)
    if wanted.arch in TORCHVISION_DETECTORS:
        expected["arch"] = _family(wanted.arch)
    if not found:
        keys = ", ".join(list(state)[:3])
        return (f"{path}: the weights are not those of a detector this project builds (keys {keys}...); this run's "
                f"{role} is {describe(expected)} ({fix})")
    differ = [WORDS[key] for key in expected if key in found and found[key] != expected[key]]
    what = f"another {' and '.join(differ)}" if differ else "tensors of other shapes"
    return f"{path}: the checkpoint is {describe(found)}; this run's {role} is {describe(expected)} ({what}: {fix})"
