"""Typed configuration: frozen dataclasses built once at the edge, from dicts that came from YAML,
the command line or Ray Tune. Unknown keys and wrong types are rejected with a one-line message."""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

from dmkd.errors import UserError

T = TypeVar("T")


def _type_name(kind: Any) -> str:
    return getattr(kind, "__name__", str(kind).replace("typing.", ""))


def _coerce(value: Any, kind: Any, where: str) -> Any:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except UserError as error:
                errors.append(error)
        raise errors[0]
    if dataclasses.is_dataclass(kind):
        if isinstance(value, kind):
            return value
        return from_dict(kind, value, where)
    if origin in (tuple, list) or kind in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: must be a list, but got {value!r}")
        (item,) = typing.get_args(kind)[:1] or (Any,)
        items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if tuple in (origin, kind) else items
    if origin is dict or kind is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: must be a mapping, but got {value!r}")
        return dict(value)
    if kind is Any:
        return value
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{where}: must be true or false, but got {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise UserError(f"{where}: must be an integer, but got {value!r}")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise UserError(f"{where}: must be a number, but got {value!r}")
    if kind is str:
        if isinstance(value, str):
            return value
        raise UserError(f"{where}: must be a string, but got {value!r}")
    return value


def from_dict(cls: type[T], data: Any, where: str = "config") -> T:
    """Build dataclass ``cls`` from a mapping; ``where`` names the place for error messages."""
    if not isinstance(data, dict):
        raise UserError(f"{where}: must be a mapping, but got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r}; allowed keys: {', '.join(fields)}")
    values = {name: _coerce(value, hints[name], f"{where}.{name}") for name, value in data.items()}
    return cls(**values)


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)
