"""cluster.yaml checked offline against the cluster-launcher schema and config validation that ship in
the ray package (no cloud access)."""
import copy
import json
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.helpers import ROOT

SCHEMA = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


def _validate(config: dict) -> dict:
    jsonschema.validate(config, SCHEMA)
    full = prepare_config(copy.deepcopy(config))
    validate_config(full)
    return full


def _cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_is_valid():
    full = _validate(_cluster())
    assert full["provider"]["type"] == "aws" and full["head_node_type"] == "head"
    types = full["available_node_types"]
    assert types["head"]["resources"] == {"CPU": 0}
    assert {"gpu_4x", "gpu_8x"} <= set(types) and all(types[t]["min_workers"] == 0 for t in ("gpu_4x", "gpu_8x"))
    assert any("pip install -e ~/dmkd-sweeps" in c for c in full["setup_commands"])
    head_start = " ".join(full["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head_start and "--dashboard-host=127.0.0.1" in head_start
    assert "RAY_AUTH_MODE=token" in " ".join(full["worker_start_ray_commands"])


@pytest.mark.parametrize("typo", ["top-level key", "node type key", "head node type", "min above max"])
def test_a_typo_fails_validation(typo):
    config = _cluster()
    if typo == "top-level key":
        config["max_worker"] = config.pop("max_workers")
    elif typo == "node type key":
        config["available_node_types"]["gpu_4x"]["max_worker"] = 8
    elif typo == "head node type":
        config["head_node_type"] = "haed"
    else:
        config["available_node_types"]["gpu_4x"]["min_workers"] = 20
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        _validate(config)
