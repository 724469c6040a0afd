"""cluster.yaml loads and validates with Ray's own cluster-config schema, and has what the
cluster jobs rely on."""

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text(encoding="utf-8"))


def test_cluster_yaml_passes_rays_validation(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config

    # What `ray up` runs before launching anything: it fills Ray's defaults in, then raises
    # jsonschema.ValidationError for a config Ray would refuse (the next test shows it can).
    prepared = prepare_config(yaml.safe_load(yaml.safe_dump(cluster)))
    assert validate_config(prepared) is None
    assert prepared["provider"]["type"] == "aws" and prepared["head_node_type"] == "head"
    assert set(prepared["available_node_types"]) == set(cluster["available_node_types"])
    assert prepared["available_node_types"]["head"]["max_workers"] == 0  # Ray's default for the head type
    assert prepared["max_workers"] == cluster["max_workers"]


def test_rays_validation_catches_a_bad_key(cluster):
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = yaml.safe_load(yaml.safe_dump(cluster))
    broken["available_node_types"]["head"]["min_workerz"] = 1
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_cpu_head_gpu_workers_s3_access_and_raybm_installed(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert not head["node_config"]["InstanceType"].startswith(("g", "p"))  # a CPU head
    gpu = {name: t for name, t in types.items() if t["node_config"]["InstanceType"].startswith(("g5.", "p"))}
    assert {t["node_config"]["InstanceType"] for t in gpu.values()} >= {"g5.xlarge", "g5.12xlarge"}
    for t in gpu.values():
        assert t["min_workers"] == 0 and t["max_workers"] >= 1
    for t in types.values():  # S3 through the instance profile, no keys in jobs
        assert t["node_config"]["IamInstanceProfile"]["Name"]
    assert any("pip install" in c and "raybm" in c for c in cluster["setup_commands"])
    assert cluster["file_mounts"]  # the checkout `ray up` ran from is what gets installed


def test_sixteen_gpu_sweep_config_fits_the_cluster(cluster):
    from raybm.config import load_config

    cfg = load_config(ROOT / "jobs" / "configs" / "cluster-sweep.yaml")
    types = cluster["available_node_types"]
    gpus_per_type = {"g5.xlarge": 1, "g5.12xlarge": 4}
    most = sum(gpus_per_type.get(t["node_config"]["InstanceType"], 0) * t.get("max_workers", 0) for t in types.values())
    per_trial = cfg.train.num_workers * cfg.train.gpus_per_worker
    assert cfg.tune.cluster_gpus <= most
    assert cfg.tune.cluster_gpus // per_trial == 8  # 8 trials at once
    assert cfg.storage.root.startswith("s3://")


def test_the_cluster_lets_no_one_in(cluster):
    """Token auth on every node, the same token everywhere, the dashboard and job API on the
    head's loopback, only SSH open to the world, S3 through the instance profile."""
    starts = cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"]
    for command in (c for c in starts if "ray start" in c):
        assert "RAY_AUTH_MODE=token" in command, command
    head = next(c for c in cluster["head_start_ray_commands"] if "ray start" in c)
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    assert cluster["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"
    rules = cluster["provider"]["security_group"]["IpPermissions"]
    assert [(r["FromPort"], r["ToPort"], r["IpProtocol"]) for r in rules] == [(22, 22, "tcp")]
    text = (ROOT / "cluster.yaml").read_text(encoding="utf-8").lower()
    assert "aws_secret_access_key" not in text and "aws_access_key_id" not in text  # no copied keys
    assert "--dashboard-host=0.0.0.0" not in text
