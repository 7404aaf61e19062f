"""cluster.yaml passes Ray's own autoscaler schema (offline), installs this package, and keeps the
dashboard private."""

import json
import pathlib
import re

import tomllib
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _config():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((ROOT / "cluster.yaml").read_text()))
    validate_config(config)
    return config


def test_cluster_yaml_validates_against_rays_schema():
    config = _config()
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {
        "CPU": 0
    }  # the head runs drivers and supervisors only
    gpu = [t for name, t in types.items() if t.get("resources", {}).get("GPU", 0) >= 1]
    assert gpu and all(t["max_workers"] >= t["min_workers"] >= 1 for t in gpu)
    assert all(
        t["node_config"]["InstanceType"].startswith(("g5.", "g6.", "p3.", "p4", "p5")) for t in gpu
    )


def test_setup_commands_install_this_package_from_the_mounted_source():
    config = _config()
    mounted = {dst: src for dst, src in config["file_mounts"].items()}
    [dest] = [
        dst for dst, src in mounted.items() if (ROOT / src).resolve() == ROOT
    ]  # the repo root travels with the cluster
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["name"] == "raytrain-ft"
    installs = [
        c
        for c in config["setup_commands"]
        if re.search(rf"pip install (-e )?{re.escape(dest)}\b", c)
    ]
    assert installs, config["setup_commands"]


def test_dashboard_stays_private_token_auth_is_on_and_node_death_is_noticed_fast():
    config = _config()
    head_start = " ".join(config["head_start_ray_commands"])
    worker_start = " ".join(config["worker_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "8265" not in json.dumps(
        config["provider"]
    )  # no security-group rule opens the dashboard
    assert "RAY_AUTH_MODE=token" in head_start and "RAY_AUTH_MODE=token" in worker_start
    assert (
        "~/.ray/auth_token" in config["file_mounts"]
    )  # every node holds the token the client uses
    system_config = json.loads(re.search(r"--system-config='([^']*)'", head_start).group(1))
    detect_ms = (
        system_config["health_check_period_ms"] * system_config["health_check_failure_threshold"]
    )
    assert detect_ms <= 5000  # Ray's default is ~30 s
