"""GPU scheduling without a GPU: Ray's fake autoscaler adds nodes offering a logical GPU, and the
workers land on them."""

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.local_head import LocalHead, free_port

pytestmark = pytest.mark.integration

FAKE_CONFIG = Path(__file__).resolve().parents[1] / "fake_multinode.yaml"


@pytest.fixture(scope="module")
def fake_cluster(tmp_path_factory):
    port = free_port()
    config = yaml.safe_load(FAKE_CONFIG.read_text())
    config["provider"]["gcs_address"] = f"127.0.0.1:{port}"
    path = tmp_path_factory.mktemp("fake") / "fake_multinode.yaml"
    path.write_text(yaml.safe_dump(config))
    head = LocalHead(
        num_cpus=0,
        gcs_port=port,
        autoscaling_config=str(path),
        env={
            "RAY_FAKE_CLUSTER": "1",
            "AUTOSCALER_UPDATE_INTERVAL_S": "1",
            "RAY_AUTH_MODE": "disabled",
        },
    )
    try:
        yield head
    finally:
        head.shutdown()


def _train(head, tmp_path, use_gpu: str) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / f"run-{use_gpu}.json"
    cmd = [
        sys.executable,
        "-m",
        "raytrain_ft.cli",
        "train",
        "--quiet",
        "--address",
        head.gcs_address,
        "--use-gpu",
        use_gpu,
        "--num-workers",
        "2",
        "--num-servers",
        "2",
        "--epochs",
        "1",
        "--output-json",
        str(out),
    ]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAYTRAIN_FT_ACTOR_START_TIMEOUT_S": "240"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=500), out


def _gpu_nodes(head) -> dict[str, float]:
    with urllib.request.urlopen(head.dashboard_url + "/api/v0/nodes?limit=100", timeout=10) as r:
        nodes = json.loads(r.read())["data"]["result"]["result"]
    return {
        n["node_id"]: n["resources_total"].get("GPU", 0)
        for n in nodes
        if n["state"] == "ALIVE" and n["resources_total"].get("GPU", 0)
    }


@pytest.mark.extended
def test_workers_ask_for_gpus_the_autoscaler_adds_gpu_nodes_and_they_land_there(
    fake_cluster, tmp_path
):
    assert _gpu_nodes(fake_cluster) == {}  # nothing but a 0-CPU head yet
    # use_gpu=true: the workers ask for a GPU each; the autoscaler launches two GPU nodes for them;
    # they land, and since torch sees no CUDA device behind the logical GPU, the run stops with one
    # message saying so
    proc, _ = _train(fake_cluster, tmp_path, "true")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-4000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("raytrain-ft: error: worker ")
        and "failed to start: Ray assigned GPU [0] to this worker but torch" in last
    ), last
    assert last.endswith("set --use-gpu auto to train on their CPUs"), last
    gpu_nodes = _gpu_nodes(fake_cluster)
    assert len(gpu_nodes) == 2 and set(gpu_nodes.values()) == {1.0}
    # use_gpu=auto on the cluster that now has the GPUs: the workers take them again and train on
    # the CPU behind them
    proc, out = _train(fake_cluster, tmp_path, "auto")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    summary = json.loads(out.read_text())
    workers = summary["workers"]
    assert [w["gpu_ids"] for w in workers] == [[0], [0]]
    assert {w["node_id"] for w in workers} == set(gpu_nodes)  # one worker per GPU node
    assert [w["device"] for w in workers] == ["cpu", "cpu"]
    assert summary["steps_completed"] == summary["total_steps"] and summary["eval_accuracy"] > 0.5
