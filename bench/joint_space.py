"""The joint method-and-settings space of a method comparison: which method (``method``, categorical over
the grid's rows) and that method's own parameters, each conditional on the method and named
``METHOD.PARAMETER`` (methods share parameter names with other ranges: MGD's and FGD's ``alpha``), with
the ranges next to each loss (``SEARCH`` in ``dmkd/distillers/``). The question a researcher brings:
which method, and which settings for it, for my pair.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dmkd.config import from_dict  # noqa: E402
from dmkd.distillers import search_space  # noqa: E402
from orchestrator.grid import load_grid  # noqa: E402
from orchestrator.space import Param  # noqa: E402

METHODS_GRID = ROOT / "search_spaces" / "methods.yaml"


def joint_methods(grid_path: Path = METHODS_GRID) -> list[str]:
    """The methods of a grid's rows, the undistilled student (``none``) first."""
    return list(dict.fromkeys(row.method for row in load_grid(grid_path).rows.values()))


def joint_search(methods: list[str]) -> dict[str, Param]:
    """``method`` and every method's own parameters, each searched only when its method is chosen."""
    search = {"method": Param("categorical", choices=list(methods))}
    for method in methods:
        for name, spec in search_space(method).items():
            param = from_dict(Param, spec, where=f"{method}.{name}")
            search[f"{method}.{name}"] = Param(param.type, param.low, param.high, param.choices, {"method": [method]})
    return search


def own_search(search: dict[str, Param], method: str) -> dict[str, Param]:
    """A method's parameters in the joint space, under their joint names."""
    return {name: param for name, param in search.items() if name.startswith(f"{method}.")}


def split(point: dict) -> tuple[str, dict]:
    """(method, its parameters under their own names) from a joint point."""
    method = point["method"]
    return method, {name.split(".", 1)[1]: value for name, value in point.items() if name.startswith(f"{method}.")}
