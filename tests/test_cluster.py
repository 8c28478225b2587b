"""cluster.yaml and cluster-local.yaml pass Ray's own cluster-config validation."""

import copy
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.aws.config import _create_default_inbound_rules
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-local.yaml"])
def test_cluster_configs_pass_rays_schema(name):
    config = yaml.safe_load((ROOT / name).read_text())
    validate_config(config)
    gpu = config["available_node_types"]["gpu_worker"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1 and gpu["resources"]["GPU"] >= 1


def test_local_head_type_is_the_one_the_fake_provider_runs():
    # Under another name the autoscaler ignores the head and keeps launching head-type nodes.
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_TYPE

    config = yaml.safe_load((ROOT / "cluster-local.yaml").read_text())
    assert config["head_node_type"] == FAKE_HEAD_NODE_TYPE
    assert config["available_node_types"][FAKE_HEAD_NODE_TYPE]["max_workers"] == 0


def test_aws_config_after_ray_fills_its_defaults():
    config = prepare_config(copy.deepcopy(yaml.safe_load((ROOT / "cluster.yaml").read_text())))
    validate_config(config)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0} and head["max_workers"] == 0
    assert config["idle_timeout_minutes"] > 0 and config["upscaling_speed"] > 0
    assert "pip install -q -e /home/ray/socarrat" in config["setup_commands"]
    assert all("SecurityGroupIds" not in t["node_config"] for t in config["available_node_types"].values())
    # So Ray creates the group, with its default rules and the config's own: only SSH from outside.
    extra = config["provider"]["security_group"].get("IpPermissions")
    rules = _create_default_inbound_rules(["sg-cluster"], extra)
    assert [(r["FromPort"], r["ToPort"]) for r in rules if r.get("IpRanges")] == [(22, 22)]
    assert [r["UserIdGroupPairs"] for r in rules if not r.get("IpRanges")] == [[{"GroupId": "sg-cluster"}]]
