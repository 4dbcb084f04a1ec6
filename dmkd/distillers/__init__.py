"""Feature distillers, one file per method, all with one shape: a single-level loss module
``loss(student_feature, teacher_feature, context)`` wrapped per FPN level by :class:`MultiLevel`.

``METHODS`` maps each name a config may use to its loss class and fixed switches; ``none`` means
no distillation. ``SEARCH_SPACES`` holds what a tuning run searches for each method; the ranges live
next to each loss (its module's ``SEARCH``), and the published defaults are the constructors' defaults.
"""
from __future__ import annotations

import inspect
from functools import partial


from dmkd.distillers import dmkd, fgd, fitnet, mgd, pkd
from dmkd.distillers.base import DistillContext, MultiLevel
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

SEARCH_SPACES: dict[str, dict[str, dict]] = {
    "none": {},
    "fitnet": fitnet.SEARCH,
    "pkd": pkd.SEARCH,
    "mgd": mgd.SEARCH,
    "fgd": fgd.SEARCH,
    "dmkd": dmkd.SEARCH,
    "dmkd_spatial": {k: v for k, v in dmkd.SEARCH.items() if k != "channel_ratio"},
    "dmkd_channel": {k: v for k, v in dmkd.SEARCH.items() if k != "spatial_ratio"},
    "dmkd_fixed": dmkd.SEARCH,
}


def method_parameters(method: str) -> dict[str, object]:
    """The parameters a method takes, with their defaults (fixed switches of a variant excluded)."""
    factory = _factory(method)
    if factory is None:
        return {}
    signature = inspect.signature(factory.func)
    return {name: p.default for name, p in signature.parameters.items()
            if p.kind is p.KEYWORD_ONLY and name not in factory.keywords}


def method_settings(method: str) -> dict[str, object]:
    """Everything a method's loss is built with by default: its variant's fixed switches and the
    defaults of its parameters (what a run record shows beside the values that were set)."""
    factory = _factory(method)
    return {} if factory is None else {**factory.keywords, **method_parameters(method)}


def check_method(method: str, where: str = "method") -> None:
    """The one check of a method's name, for every place that reads one (``where`` names the key)."""
    if method not in METHODS:
        raise UserError(f"{where}: unknown method {method!r}; allowed: {', '.join(METHODS)}")


def _factory(method: str) -> partial | None:
    check_method(method)
    return METHODS[method]


def _typed(value, default, where: str):
    """``value`` as the type of the parameter's default (YAML and Tune hand over ints, lists, ...)."""
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


def check_parameters(method: str, params: dict, where: str = "distill") -> None:
    """Raise a one-line ``UserError`` unless ``method`` accepts ``params``: names, types and values,
    checked by building the loss on one small level (milliseconds, no data, no teacher)."""
    build_distiller(method, 32, 32, ["0"], params, where)


def build_distiller(method: str, student_channels: int, teacher_channels: int, levels: list[str],
                    params: dict | None = None, where: str = "distill") -> MultiLevel | None:
    """One loss per level for ``method`` with ``params``; None for ``none``."""
    factory = _factory(method)
    params = dict(params or {})
    allowed = method_parameters(method)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        choices = ", ".join(allowed) or "none"
        raise UserError(f"{where}.{unknown[0]}: not a parameter of method {method!r}; allowed: {choices}")
    if factory is None:
        return None
    params = {name: _typed(value, allowed[name], f"{where}.{name}") for name, value in params.items()}
    try:
        losses = {level: factory(student_channels, teacher_channels, **params) for level in levels}
    except (ValueError, TypeError) as error:
        raise UserError(f"{where}: {error}") from error
    return MultiLevel(method, losses)


__all__ = ["METHODS", "SEARCH_SPACES", "DistillContext", "check_parameters", "DMKDLoss", "FGDLoss", "FitNetLoss", "MGDLoss", "MultiLevel", "PKDLoss",
           "build_distiller", "check_method", "method_parameters", "method_settings"]
