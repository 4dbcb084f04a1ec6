"""Distillers, one file per method. A feature distiller is a single-level loss module
``loss(student_feature, teacher_feature, context)`` wrapped per FPN level by :class:`MultiLevel`; a head
distiller (``HEAD_METHODS``: CrossKD) is one module over the dense head (:mod:`dmkd.heads`). A method
name may join one of each with ``+`` (``dmkd+crosskd``): both run in one step, each with its own
parameters (their names must differ).

``METHODS`` maps each feature method a config may use to its loss class and fixed switches; ``none``
means no distillation. ``SEARCH_SPACES`` holds what a tuning run searches for each method. Both the
ranges and the published settings live next to each loss: its module's ``SEARCH``, and ``DEFAULTS``,
one :class:`~dmkd.distillers.base.Published` setting per detector family (``FAMILIES``) naming the
config it comes from. A parameter a run leaves unset takes its family's published value.
"""
from __future__ import annotations

import inspect
from collections.abc import Iterable
from functools import partial

from torch import nn

from dmkd.distillers import dmkd
from dmkd.distillers.base import (
    FAMILIES,
    Composite,
    DistillContext,
    DistillInputs,
    HeadLevel,
    MultiLevel,
    Published,
    detector_family,
)
from dmkd.distillers.crosskd import CrossKDLoss, check_detectors
from dmkd.distillers.dmkd import DMKDLoss
from dmkd.distillers.fgd import FGDLoss
from dmkd.distillers.fitnet import FitNetLoss
from dmkd.distillers.mgd import MGDLoss
from dmkd.distillers.pkd import PKDLoss
from dmkd.errors import UserError

METHODS: dict[str, partial | None] = {
    "none": None,
    "fitnet": partial(FitNetLoss),
    "pkd": partial(PKDLoss),
    "mgd": partial(MGDLoss),
    "fgd": partial(FGDLoss),
    "dmkd": partial(DMKDLoss),
    "dmkd_spatial": partial(DMKDLoss, branches=("spatial",)),
    "dmkd_channel": partial(DMKDLoss, branches=("channel",)),
    "dmkd_fixed": partial(DMKDLoss, fusion="fixed"),
}
HEAD_METHODS: dict[str, partial] = {
    "crosskd": partial(CrossKDLoss),
}

# Each method's tuning ranges are its module's SEARCH; the single-branch variants drop the other ratio.
SEARCH_SPACES: dict[str, dict[str, dict]] = {
    name: getattr(inspect.getmodule(factory.func), "SEARCH", {}) if factory else {}
    for name, factory in {**METHODS, **HEAD_METHODS}.items()}
SEARCH_SPACES["dmkd_spatial"] = {k: v for k, v in dmkd.SEARCH.items() if k != "channel_ratio"}
SEARCH_SPACES["dmkd_channel"] = {k: v for k, v in dmkd.SEARCH.items() if k != "spatial_ratio"}


def parts(method: str) -> list[str]:
    """The methods a name joins with ``+`` (one for a plain name)."""
    return method.split("+")


def search_space(method: str) -> dict[str, dict]:
    """What tuning searches for ``method``: its parts' spaces together."""
    check_method(method)
    return {name: spec for part in parts(method) for name, spec in SEARCH_SPACES[part].items()}


def same_loss(method: str, other: str) -> bool:
    """Whether two methods build the same loss, part by part (``dmkd`` and its variants ``dmkd_spatial``,
    ``dmkd_channel``, ``dmkd_fixed`` do; ``mgd`` and ``fgd``, which both take an ``alpha``, do not)."""
    check_method(method)
    check_method(other)
    return _losses(method) == _losses(other)


def _losses(method: str) -> list:
    return [factory.func if factory else None for factory in (_factories()[part] for part in parts(method))]


def needs_head(method: str) -> bool:
    return any(part in HEAD_METHODS for part in parts(method))


def _parameters(factory: partial | None) -> dict[str, object]:
    if factory is None:
        return {}
    signature = inspect.signature(factory.func)
    return {name: p.default for name, p in signature.parameters.items()
            if p.kind is p.KEYWORD_ONLY and name not in factory.keywords}


def published(method: str, family: str) -> dict[str, Published]:
    """Each part of ``method`` with a published setting for ``family``: part name -> its setting."""
    check_method(method)
    found = {}
    for part in parts(method):
        factory = _factories()[part]
        setting = getattr(inspect.getmodule(factory.func), "DEFAULTS", {}).get(family) if factory else None
        if setting is not None:
            found[part] = setting
    return found


def _module_attribute(part: str, name: str, default=None):
    factory = _factories()[part]
    return getattr(inspect.getmodule(factory.func), name, default) if factory else default


def is_baseline(method: str) -> bool:
    """Whether a table counts ``method`` among the baselines (a module declares ``BASELINE = False`` for
    the method under study; a joined method is a baseline only if all its parts are)."""
    check_method(method)
    return method != "none" and all(_module_attribute(part, "BASELINE", True) for part in parts(method))


def reading_notes(methods: Iterable[str]) -> list[str]:
    """The notes (a module's ``READING``) of every method among ``methods`` that is a reading of a paper
    rather than its published code, each once: a report prints them wherever such a method is named."""
    notes: list[str] = []
    for method in methods:
        check_method(method)
        for part in parts(method):
            note = _module_attribute(part, "READING")
            if note and note not in notes:
                notes.append(note)
    return notes


def picture_of(method: str):
    """The function that draws a method's picture of a run (``attention_picture(image, teacher_features,
    params, path)`` in its module), or None for a method without one."""
    check_method(method)
    return next((_module_attribute(part, "attention_picture") for part in parts(method)
                 if _module_attribute(part, "attention_picture")), None)


def method_parameters(method: str, family: str | None = None) -> dict[str, object]:
    """The parameters a method takes, with their defaults (fixed switches of a variant excluded); a
    joined method takes its parts'. With ``family`` (one of ``FAMILIES``), the defaults are that
    family's published values where the method has them; without, the constructors' own (None for a
    head method's per-family values)."""
    check_method(method)
    found = {}
    settings = published(method, family) if family is not None else {}
    for part in parts(method):
        defaults = _parameters(_factories()[part])
        values = settings[part].values if part in settings else {}
        found.update({k: values.get(k, v) for k, v in defaults.items()})
    return found


def method_settings(method: str, family: str | None = None) -> dict[str, object]:
    """Everything a method's loss is built with by default: its variant's fixed switches and the
    defaults of its parameters (what a run record shows beside the values that were set)."""
    check_method(method)
    fixed = {k: v for part in parts(method) if _factories()[part] is not None for k, v in _factories()[part].keywords.items()}
    return {**fixed, **method_parameters(method, family)}


def _factories() -> dict[str, partial | None]:
    return {**METHODS, **HEAD_METHODS}


def check_method(method: str, where: str = "method") -> None:
    """The one check of a method's name, for every place that reads one (``where`` names the key)."""
    allowed = f"allowed: {', '.join(_factories())}, or a feature and a head method joined by '+' (dmkd+crosskd)"
    names = parts(method) if isinstance(method, str) else [method]
    unknown = [name for name in names if name not in _factories()]
    if unknown:
        raise UserError(f"{where}: unknown method {unknown[0]!r}; {allowed}")
    if len(names) > 1:
        features, heads = [n for n in names if n in METHODS and n != "none"], [n for n in names if n in HEAD_METHODS]
        if len(features) > 1 or len(heads) > 1 or "none" in names:
            raise UserError(f"{where}: {method!r} joins {' and '.join(names)}; join at most one feature method and one "
                            f"head method ({', '.join(HEAD_METHODS)})")
        shared = set(_parameters(METHODS[features[0]])) & set(_parameters(HEAD_METHODS[heads[0]])) if features and heads else set()
        if shared:
            raise UserError(f"{where}: {method!r}: both parts take {sorted(shared)[0]!r}; they cannot be joined")


def _typed(value, default, where: str):
    """``value`` as the type of the parameter's default (YAML and Tune hand over ints, lists, ...); a
    default of None (set per detector) takes a number."""
    if default is None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where}: must be a number, but got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise UserError(f"{where}: must be a number, but got {value!r}")
    if isinstance(default, str):
        if isinstance(value, str):
            return value
        raise UserError(f"{where}: must be a string, but got {value!r}")
    if isinstance(default, tuple):
        if isinstance(value, str):
            value = [value]
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise UserError(f"{where}: must be a list of names, but got {value!r}")
    return value


def check_parameters(method: str, params: dict, where: str = "distill", family: str = "fcos") -> None:
    """Raise a one-line ``UserError`` unless ``method`` accepts ``params``: names, types and values,
    checked by building the loss on one small level (milliseconds, no data, no teacher)."""
    build_distiller(method, 32, 32, ["0"], params, where, family)


def check_pair(method: str, student, teacher, params: dict) -> None:
    """A head-level method's requirements on the two detector configs (one-line ``UserError``)."""
    if not needs_head(method):
        return
    try:
        check_detectors(student.arch, teacher.arch, teacher.head_convs, params.get("reuse_from"))
    except ValueError as error:
        raise UserError(f"method: {error}") from None


def build_distiller(method: str, student_channels: int, teacher_channels: int, levels: list[str],
                    params: dict | None = None, where: str = "distill", family: str = "fcos") -> nn.Module | None:
    """The distiller of ``method`` with ``params`` for a student of detector ``family``: a feature method
    gets one loss per level, a head method one loss for the head; unset parameters take the family's
    published values; None for ``none``."""
    check_method(method)
    params = dict(params or {})
    allowed = method_parameters(method, family)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        choices = ", ".join(allowed) or "none"
        raise UserError(f"{where}.{unknown[0]}: not a parameter of method {method!r}; allowed: {choices}")
    if method == "none":
        return None
    params = {name: _typed(value, allowed[name], f"{where}.{name}") for name, value in params.items()}
    settings = published(method, family)
    built = []
    try:
        for part in parts(method):
            accepted = _parameters(_factories()[part])
            own = {k: v for k, v in {**(settings[part].values if part in settings else {}), **params}.items()
                   if k in accepted}
            if part in HEAD_METHODS:
                built.append(HeadLevel(part, HEAD_METHODS[part](student_channels, teacher_channels, family, **own)))
            else:
                built.append(MultiLevel(part, {level: METHODS[part](student_channels, teacher_channels, **own)
                                               for level in levels}))
    except (ValueError, TypeError) as error:
        raise UserError(f"{where}: {error}") from error
    return built[0] if len(built) == 1 else Composite(built)


__all__ = ["FAMILIES", "HEAD_METHODS", "METHODS", "SEARCH_SPACES", "Composite", "CrossKDLoss", "DistillContext", "DistillInputs",
           "DMKDLoss", "FGDLoss", "FitNetLoss", "HeadLevel", "MGDLoss", "MultiLevel", "PKDLoss", "build_distiller",
           "Published", "check_method", "check_pair", "check_parameters", "detector_family", "is_baseline", "method_parameters", "reading_notes",
           "method_settings", "needs_head", "parts", "picture_of", "published", "search_space"]
