"""Pretrained weights by torchvision name or by local file, and the frozen BatchNorm that goes with them.

A weights spec is either a torchvision weights name (``ResNet18_Weights.IMAGENET1K_V1``,
``RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1``), resolved through torchvision's registry and torch's
own cache (``$TORCH_HOME/hub/checkpoints``: the first use downloads there, later uses read it), or the
path of a local state-dict file (a bare state dict or a training checkpoint holding one under
``model``). With ``DMKD_OFFLINE=1`` nothing is downloaded: a name whose file is not cached stops with a
line that says where to put it. The tests run offline.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from dmkd.errors import UserError
from dmkd.io import read_torch

OFFLINE_ENV = "DMKD_OFFLINE"
_NAME = re.compile(r"^[A-Za-z0-9]+(?:_[A-Za-z0-9]+)*_Weights\.[A-Za-z0-9_]+$")
# torchvision's default for a pretrained backbone: layer2-4 train; conv1, bn1 and layer1 stay frozen.
TRAINABLE_LAYERS = 3


def is_weights_name(spec: str) -> bool:
    return bool(_NAME.match(spec))


def torchvision_weights(spec: str, where: str):
    """The torchvision ``WeightsEnum`` member a name gives (no file is read)."""
    from torchvision.models import get_weight

    try:
        return get_weight(spec)
    except (ValueError, KeyError) as error:
        raise UserError(f"{where}: {spec!r} is not a torchvision weights name (e.g. ResNet18_Weights.IMAGENET1K_V1, "
                        f"RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1) ({type(error).__name__}: {error})") from None


def cached_file(weights) -> Path:
    """Where torch's hub cache keeps (or will keep) a torchvision weights file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name


def categories(spec: str | None) -> list[str] | None:
    """The class names a torchvision detector's weights were trained on (index = label), else None."""
    if not spec or not is_weights_name(spec):
        return None
    return torchvision_weights(spec, "weights").meta.get("categories")


def check_spec(spec: str, where: str):
    """Without reading any file: the torchvision ``WeightsEnum`` member a name gives (its file may still
    need downloading), or None for a local file, which must exist."""
    if is_weights_name(spec):
        return torchvision_weights(spec, where)
    if not Path(spec).is_file():
        raise UserError(f"{where}: {spec}: neither a file nor a torchvision weights name (Name_Weights.MEMBER)")
    return None


def load_state(spec: str, where: str) -> dict:
    """The state dict a weights spec names; ``where`` (e.g. ``pair.teacher.weights``) heads every error."""
    weights = check_spec(spec, where)
    if weights is not None:
        file = cached_file(weights)
        if not file.is_file():
            hint = f"put {file.name} (from {weights.url}) into {file.parent}"
            if os.environ.get(OFFLINE_ENV, "") not in ("", "0"):
                raise UserError(f"{where}: {spec} is not in torch's cache and downloads are off ({OFFLINE_ENV}); {hint}")
            try:
                return weights.get_state_dict(progress=True, check_hash=True)
            except Exception as error:  # no network, a proxy, a bad hash: all end the same way
                raise UserError(f"{where}: {spec} is not in torch's cache and could not be downloaded "
                                f"({type(error).__name__}); {hint}") from None
        return read_state_dict(file, f"{where}: {file}")
    return read_state_dict(Path(spec), f"{where}: {spec}")


def read_state_dict(path: Path, where: str) -> dict:
    """A local file's state dict: a bare one, or a training checkpoint's ``model``; ``where`` heads errors."""
    try:
        state = read_torch(path)
    except Exception as error:  # torch raises many types for a corrupt or foreign file
        raise UserError(f"{where}: not a readable torch checkpoint ({type(error).__name__})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise UserError(f"{where}: holds no state dict")
    return state


def load_into(module: nn.Module, state: dict, where: str, allowed_extra: tuple[str, ...] = ()) -> None:
    """Load ``state`` with no key missing and none left over, except keys starting with ``allowed_extra``
    (a classification backbone's ``fc.``, which a detector's body does not have)."""
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as error:  # tensors of other shapes: a different width or depth
        detail = next((line.strip() for line in str(error).splitlines() if "size mismatch" in line), str(error).splitlines()[0])
        raise UserError(f"{where}: the weights do not fit this model ({detail})") from None
    unexpected = [k for k in unexpected if not k.startswith(allowed_extra)]
    if missing or unexpected:
        shown = [f"missing {', '.join(missing[:3])}" if missing else "", f"unexpected {', '.join(unexpected[:3])}" if unexpected else ""]
        raise UserError(f"{where}: the weights do not fit this model ({'; '.join(s for s in shown if s)}"
                        f"{' ...' if len(missing) > 3 or len(unexpected) > 3 else ''})")


def freeze_pretrained(body: nn.Module, trainable_layers: int = TRAINABLE_LAYERS) -> None:
    """What torchvision does to a pretrained ResNet body: every BatchNorm becomes a FrozenBatchNorm2d
    (fixed statistics and affine), and only the last ``trainable_layers`` stages train."""
    _freeze_batch_norms(body)
    train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        train.append("bn1")
    for name, parameter in body.named_parameters():
        if not any(name.startswith(layer) for layer in train):
            parameter.requires_grad_(False)


def _freeze_batch_norms(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            for buffer in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, buffer).copy_(getattr(child, buffer).detach())
            setattr(module, name, frozen)
        else:
            _freeze_batch_norms(child)


def labels_by_name(names: list[str], coco, where: str) -> dict[int, int]:
    """Label -> the data's category id, for a detector whose label ``i`` means ``names[i]`` (torchvision's
    COCO detectors: ``weights.meta["categories"]``), matched by class name."""
    by_name = {c["name"]: c["id"] for c in coco.loadCats(coco.getCatIds())}
    mapping = {label: by_name[name] for label, name in enumerate(names) if name in by_name}
    if not mapping:
        raise UserError(f"{where}: none of its {len(names)} class names is a category of the data, so it cannot be "
                        f"evaluated on it")
    return mapping
