"""cluster.yaml passes Ray's own autoscaler schema (offline) and installs this package."""

import pathlib

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_cluster_yaml_validates_against_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config = prepare_config(raw)
    validate_config(config)
    assert config["available_node_types"]["head"]["resources"] == {"CPU": 0}
    assert any("pip install" in c and "raytrain-ft" in c for c in config["setup_commands"])
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "health_check_period_ms" in head_start
