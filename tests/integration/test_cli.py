"""The CLI as a user runs it: the main job, the JSON summary, and bad input."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "raytrain_ft.cli"]


@pytest.fixture
def cli_env():
    # short path: Ray's socket paths must stay under the OS limit of 107 bytes
    d = tempfile.mkdtemp(prefix="rtft-cli-", dir="/tmp")
    try:
        yield {**os.environ, "RAY_TMPDIR": d, "RAY_AUTH_MODE": "disabled"}, d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_main_job_reaches_accuracy_and_writes_summary(tmp_path, cli_env):
    env, _ = cli_env
    out = tmp_path / "run.json"
    t0 = time.time()
    proc = subprocess.run(
        [*CLI, "train", "--model", "cnn", "--dataset", "digits", "--num-workers", "2", "--num-servers", "2", "--mode", "sync", "--output-json", str(out)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    print(f"main job: {time.time() - t0:.1f}s wall, {summary['train_time_s']:.1f}s training, accuracy {summary['eval_accuracy']:.4f}")
    assert summary["eval_accuracy"] >= 0.93
    for key in ("steps_completed", "samples_per_sec", "final_loss", "eval_accuracy", "params_sha256", "updates_applied", "updates_acknowledged", "recoveries", "config"):
        assert key in summary
    assert summary["updates_applied"] == summary["updates_acknowledged"] == summary["steps_completed"] * 2
    assert summary["recoveries"] == []
    assert summary["config"]["cluster"]["num_servers"] == 2
    assert "step " in proc.stderr and "samples/s" in proc.stderr  # progress lines
    assert "eval accuracy" in proc.stdout


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--model", "vgg"], "model.name: unknown value 'vgg'"),
        (["--optimizer", "lamb"], "optim.name: unknown value 'lamb'"),
        (["--batch-size", "0"], "data.batch_size: must be > 0"),
        (["--num-servers", "-2"], "cluster.num_servers: must be > 0"),
        (["--model", "mlp", "--num-servers", "100000000"], "cluster.num_servers: 100000000 shards"),
        (["--dataset", "parquet", "--data-path", "/nonexistent/x.parquet"], "/nonexistent/x.parquet: Parquet file or directory does not exist"),
        (["--config", "/nonexistent.yaml"], "--config: file '/nonexistent.yaml' does not exist"),
        (["--lr", "fast"], "optim.lr: expected a number"),
        (["--kill", "server:0"], "recovery.kill: 'server:0': expected ROLE"),
        (["--kill", "server:5@step=3"], "server:5@step=3: the run has 2 server(s)"),
        (["--kill", "node:1@step=3"], "--local-nodes"),
        (["--recovery", "raid"], "recovery.recovery: unknown value 'raid'"),
        (["--resume-from", "/nonexistent/ckpt"], "/nonexistent/ckpt: no step has a checkpoint file"),
    ],
)
def test_bad_input_exits_2_with_one_message_and_starts_no_ray(args, needle, cli_env):
    env, ray_dir = cli_env
    proc = subprocess.run([*CLI, "train", *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not any(p.startswith("session") for p in os.listdir(ray_dir)), "a Ray session was started"


def test_unreachable_address_exits_2_fast(cli_env):
    env, _ = cli_env
    with socket.socket() as s:  # a local port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([*CLI, "train", "--address", f"127.0.0.1:{port}"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"cluster.address '127.0.0.1:{port}' is unreachable" in proc.stderr


def test_corrupt_parquet_and_bad_yaml_exit_2(tmp_path, cli_env):
    env, ray_dir = cli_env
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 garbage")
    proc = subprocess.run([*CLI, "train", "--dataset", "parquet", "--data-path", str(bad)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "not a readable Parquet file" in proc.stderr and str(bad) in proc.stderr
    yml = tmp_path / "run.yaml"
    yml.write_text("optim:\n  lr: [1,\n")
    proc = subprocess.run([*CLI, "train", "--config", str(yml)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "not valid YAML at line" in proc.stderr
    assert not any(p.startswith("session") for p in os.listdir(ray_dir))


def test_a_survived_kill_prints_a_recovery_line_and_the_report_marks_it(tmp_path, cli_env):
    env, _ = cli_env
    out = tmp_path / "run.json"
    proc = subprocess.run([*CLI, "train", "--num-workers", "2", "--num-servers", "2", "--epochs", "3", "--kill", "server:1@step=30",
                           "--output-json", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "recovered: parameter server 1 died; rebuilt from its peer's replica" in proc.stderr
    assert "acc " in proc.stderr and "1 recoveries" in proc.stdout
    summary = json.loads(out.read_text())
    history = summary["history"]
    assert history[-1]["step"] == summary["total_steps"] and all(a["t"] <= b["t"] for a, b in zip(history, history[1:]))
    png = tmp_path / "run.png"
    proc = subprocess.run([*CLI, "report", str(out), "--output", str(png)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "args, needle",
    [
        (["report", "/nonexistent/run.json"], "/nonexistent/run.json: cannot read the run summary"),
        (["submit", "--address", "http://127.0.0.1:{port}"], "no Ray dashboard answers at http://127.0.0.1:{port}"),
        (["status", "raysubmit_x", "--address", "http://127.0.0.1:{port}"], "no Ray dashboard answers at http://127.0.0.1:{port}"),
        (["submit", "--address", "ray://10.0.0.1:10001"], "is not the dashboard's HTTP address"),
        (["submit", "--model", "vgg"], "model.name: unknown value 'vgg'"),
    ],
)
def test_job_and_report_commands_exit_2_with_one_message(args, needle, cli_env, tmp_path):
    env, _ = cli_env
    port = _closed_port()
    env = {**env, "HOME": str(tmp_path)}
    proc = subprocess.run([*CLI, *[a.format(port=port) for a in args]], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert needle.format(port=port) in proc.stderr and "Traceback" not in proc.stderr


def test_gpus_asked_of_an_embedded_ray_without_them_exit_2_at_once(cli_env):
    """No autoscaler can add GPUs to the Ray a run starts for itself: fail now instead of waiting for them."""
    env, _ = cli_env
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = subprocess.run([*CLI, "train", "--use-gpu", "true", "--num-workers", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "cluster.use_gpu=true asks for 2 GPUs, this machine has 0; set --use-gpu auto or false" in proc.stderr
