"""The CLI as a user runs it: the main job, the JSON summary, and bad input."""

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import types

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


def test_main_job_survives_a_kill_reaches_accuracy_and_writes_summary_and_report(tmp_path, cli_env):
    """The README's main job, with a parameter server killed mid-run: the run still reaches the
    accuracy, prints the recovery line, and its summary and report are complete."""
    env, _ = cli_env
    out = tmp_path / "run.json"
    t0 = time.time()
    proc = subprocess.run(
        [
            *CLI,
            "train",
            "--model",
            "cnn",
            "--dataset",
            "digits",
            "--num-workers",
            "2",
            "--num-servers",
            "2",
            "--mode",
            "sync",
            "--kill",
            "server:1@step=30",
            # a second recovery never comes: the kill waiting for it is reported, not dropped
            "--kill",
            "worker:0@recovery=2",
            "--output-json",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    print(
        f"main job: {time.time() - t0:.1f}s wall, {summary['train_time_s']:.1f}s training, "
        f"accuracy {summary['eval_accuracy']:.4f}"
    )
    assert summary["eval_accuracy"] >= 0.93
    for key in (
        "steps_completed",
        "samples_per_sec",
        "final_loss",
        "eval_accuracy",
        "params_sha256",
        "updates_applied",
        "updates_acknowledged",
        "recoveries",
        "config",
    ):
        assert key in summary
    assert (
        summary["updates_applied"]
        == summary["updates_acknowledged"]
        == summary["steps_completed"] * 2
    )
    assert [e["role"] for e in summary["recoveries"]] == ["server"], summary["recoveries"]
    assert summary["config"]["cluster"]["num_servers"] == 2
    assert "step " in proc.stderr and "samples/s" in proc.stderr  # progress lines
    assert "recovered: parameter server 1 died; rebuilt from its peer's replica" in proc.stderr
    assert "eval accuracy" in proc.stdout and ", 1 recovery\n" in proc.stdout
    # Ray's own line for the killed process (it names an OOM kill as a likely cause) is not shown:
    # the recovery line above reports the death
    assert "unexpected system error" not in proc.stdout + proc.stderr
    assert [k["kill"] for k in summary["kills"]] == ["server:1@step=30"]
    assert "warning: 1 kill(s) never fired" in proc.stderr and "worker:0@recovery=2" in proc.stderr
    history = summary["history"]
    assert history[-1]["step"] == summary["total_steps"] and all(
        a["t"] <= b["t"] for a, b in zip(history, history[1:])
    )
    png = tmp_path / "run.png"
    proc = subprocess.run(
        [*CLI, "report", str(out), "--output", str(png)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


BAD_INPUTS = [
    (["--model", "vgg"], "model.name: unknown value 'vgg'"),
    (["--y-column", "label"], "data.y_column: 'label' names a Ray Dataset's column"),
    (["--x-columns", ","], "data.x_columns: names no column"),
    (["--optimizer", "lamb"], "optim.name: unknown value 'lamb'"),
    (["--batch-size", "0"], "data.batch_size: must be > 0"),
    (["--num-servers", "-2"], "cluster.num_servers: must be > 0"),
    (
        ["--model", "tests.integration.test_user_models:OneWeight", "--num-servers", "2"],
        "cluster.num_servers: 2 shards for a model with 1 value; use at most 1 server",
    ),
    (
        ["--dataset", "parquet", "--data-path", "/nonexistent/x.parquet"],
        "/nonexistent/x.parquet: Parquet file or directory does not exist",
    ),
    (["--config", "/nonexistent.yaml"], "--config: file '/nonexistent.yaml' does not exist"),
    (["--lr", "fast"], "optim.lr: expected a number"),
    (["--kill", "server:0"], "chaos.kill: 'server:0': expected ROLE"),
    (["--kill", "server:5@step=3"], "server:5@step=3: the run has 2 server(s)"),
    (["--kill", "node:1@step=3"], "--local-nodes"),
    (["--recovery", "raid"], "recovery.mode: unknown value 'raid'"),
    (
        ["--resume-from", "/nonexistent/ckpt"],
        "/nonexistent/ckpt: does not exist; --resume-from takes the --checkpoint-dir",
    ),
    # config sources
    (["--config", "/tmp"], "--config: '/tmp' is a directory; give the YAML file in it"),
    (
        ["--config-json", "[]"],
        "--config-json: must be a JSON object of config sections {...}, got list",
    ),
    (
        ["--config-json", "null"],
        "--config-json: must be a JSON object of config sections {...}, got null",
    ),
    # every float finite and in range
    (["--lr", "nan"], "optim.lr: must be a finite number, got nan"),
    (["--lr", "inf"], "optim.lr: must be a finite number, got inf"),
    (["--momentum", "nan"], "optim.momentum: must be a finite number, got nan"),
    (["--momentum", "5"], "optim.momentum: must be in [0, 1), got 5.0"),
    (["--weight-decay", "nan"], "optim.weight_decay: must be a finite number, got nan"),
    (["--log-every-s", "nan"], "log_every_s: must be a finite number, got nan"),
    (
        ["--health-check-interval-s", "inf"],
        "recovery.health_check_interval_s: must be a finite number, got inf",
    ),
    (
        ["--simulate-compute", "inf"],
        "cluster.simulate_compute_ms: must be a finite number, got inf",
    ),
    (["--simulate-compute", "1e12"], "cluster.simulate_compute_ms: must be at most 3,600,000"),
    (["--seed", "-1"], "seed: must be in [0, 2**64), got -1"),
    # kills and stragglers
    (
        ["--kill", "server:0@step=nan"],
        "chaos.kill: 'server:0@step=nan': 'nan' is not a finite number",
    ),
    (
        ["--kill", "server:0@step=inf"],
        "chaos.kill: 'server:0@step=inf': 'inf' is not a finite number",
    ),
    (
        ["--kill", "server:0@step=100000"],
        "chaos.kill: server:0@step=100000: the run ends after step 110, so this kill would "
        "never fire",
    ),
    (
        ["--kill", "server:0@step=3", "--kill", "server:0@step=3"],
        "chaos.kill: 'server:0@step=3': the same kill is given twice",
    ),
    (["--slow-workers", "0:nan"], "chaos.slow_workers: '0:nan': expected RANK:MS"),
    (["--slow-workers", "0:inf"], "chaos.slow_workers: '0:inf': expected RANK:MS"),
    (["--slow-workers", "0:100,0:200"], "chaos.slow_workers: '0:200': rank 0 is given twice"),
    # settings that would be ignored or make a lopsided run
    (
        ["--data-path", "/tmp"],
        "data.data_path: dataset 'digits' reads no files, so '/tmp' would be ignored",
    ),
    (
        ["--num-spares", "1000"],
        "recovery.num_spares: must be at most 16, got 1000: each spare is a server process",
    ),
    (["--epochs", "3", "--steps", "10"], "--epochs: not used with --steps"),
    (
        ["--mode", "mixed", "--num-workers", "4", "--group-size", "3"],
        "consistency.group_size: 4 workers in groups of 3 would make groups of 3, 1",
    ),
    (
        ["--num-workers", "99999999"],
        "cluster.num_workers: 1438 training samples cannot fill one batch on each of "
        "99,999,999 workers; use at most 44",
    ),
    # outputs that could not be written, checked before training
    (
        ["--output-json", "/dev/null/run.json"],
        "--output-json: cannot write '/dev/null/run.json': '/dev/null' is a file, not a directory",
    ),
    (["--output-json", "/tmp"], "--output-json: '/tmp' is a directory; give a file path"),
    (
        ["--recovery", "checkpoint", "--checkpoint-dir", "/dev/null/ckpt"],
        "recovery.checkpoint_dir: cannot write to '/dev/null/ckpt' (Not a directory); give a "
        "writable directory as --checkpoint-dir",
    ),
    # sizes past the machine's memory: one line naming what to shrink, not a traceback
    (["--image-size", "100000"], "data: the data or the model does not fit in this machine's"),
    (
        ["--dataset", "synthetic", "--synthetic-samples", "1000000000000"],
        "use a smaller --image-size, --synthetic-samples",
    ),
    (["--model", "torch.nn:Flatten"], "model.name: the model has no parameters or buffers"),
    (["--image-size", "3"], "data.image_size: model cnn needs images of at least 4x4, got 3x3"),
    (
        ["--eval-fraction", "0.999999"],
        "data.eval_fraction: --eval-fraction 0.999999 holds out 1,797 of the 1,797 samples",
    ),
    (["--eval-fraction", "0.999"], "give an --eval-fraction of at most 0.964, or a smaller"),
    # more processes than this machine's memory holds (checked before a Ray is started for them)
    (
        ["--num-servers", "100000"],
        "GB (2 workers, 100000 servers, 1 spare, 1 supervisor of about 0.3 GB each",
    ),
    (
        [
            *("--simulate-compute", "50", "--num-workers", "100000", "--batch-size", "1"),
            *("--dataset", "synthetic", "--synthetic-samples", "200000", "--image-size", "8"),
        ],
        "cluster.num_workers: a Ray started on this machine for this run needs about",
    ),
    (["--local-nodes", "100000"], "cluster.local_nodes: a Ray started on this machine"),
    # kills of what the recovery mode does not have
    (
        ["--recovery", "none", "--kill", "replica:0@step=2"],
        "replica:0@step=2: --recovery none keeps no replicas (so no replica holder)",
    ),
    (
        ["--recovery", "checkpoint", "--kill", "server:0@snapshot=1"],
        "--recovery checkpoint keeps no replicas (so no snapshots)",
    ),
    (["--recovery", "none", "--kill", "spare:0@step=2"], "the run has 0 spare(s)"),
    # an unset shell variable, one path for two files, a name the file system refuses
    (["--steps", ""], "--steps: got an empty value"),
    (["--resume-from", " "], "--resume-from: got an empty value"),
    (
        ["--output-json", "/tmp/rtft-same.json", "--save-model", "/tmp/rtft-same.json"],
        "--save-model: is the --output-json path",
    ),
    (["--output-json", "/tmp/" + "a" * 300 + ".json"], "File name too long"),
    # found by a second review as a new user would (each was a traceback, a hang or ignored)
    (["--lr", "1e308"], "optim.lr: must be at most 3.4e38 in size"),
    (["--lr", "0.1", "--lr", "-1"], "--lr: given twice; give it once"),
    (["--config-json", '{"optim": {"lr": 0.1}, "optim": {"lr": 0.2}}'], "'optim' is given twice"),
    (["--config-json", '{"optim":' * 3000 + "1" + "}" * 3000], "--config-json: is nested too"),
    (["--mode", "local_sgd", "--n-fetch", "2"], "consistency.n_fetch: n_push / n_fetch"),
    (["--simulate-compute", "10", "--precision", "bf16"], "model.precision: a simulated step"),
    (["--dataset", "os:sep"], "data.dataset: 'os:sep' is not callable"),
    # with your own dataset factory (it runs in the run's Ray session): what the model and loss
    # settings name is still checked before Ray starts (found by a new user's trial)
    *(
        (["--dataset", "examples.sequence:data", *args], needle)
        for args, needle in (
            (["--model", "nomod:model"], "model.name: cannot import module 'nomod'"),
            (["--model", "examples.sequence:"], "model.name: 'examples.sequence:' is not MODULE"),
            (
                ["--model", "examples.sequence:model", "--model-kwargs", "notjson"],
                "model.kwargs: is not JSON",
            ),
            (
                ["--model", "examples.sequence:model", "--model-kwargs", '{"hiden": 3}'],
                'model.kwargs: examples.sequence:model cannot be called with {"hiden": 3}',
            ),
            (
                ["--model", "examples.sequence:model", "--loss", "torch.nn:NoSuchLoss"],
                "model.loss: module 'torch.nn' has no attribute 'NoSuchLoss'",
            ),
            (["--model", "cnn"], "model.name: the built-in 'cnn' is sized for the built-in"),
        )
    ),
]


def _run_batch(cases: list[list[str]]) -> list:
    """Every case through the real CLI entry point, in one fresh process (``tests/cli_batch.py``)
    with its own Ray temp dir: one interpreter and torch import for all of them."""
    d = tempfile.mkdtemp(prefix="rtft-cli-", dir="/tmp")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "tests.cli_batch"],
            input=json.dumps(cases),
            env={**os.environ, "RAY_TMPDIR": d, "RAY_AUTH_MODE": "disabled"},
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        shutil.rmtree(d, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [types.SimpleNamespace(**r) for r in json.loads(proc.stdout)]


@pytest.fixture(scope="module")
def bad_input_results():
    return _run_batch([["train", *args] for args, _ in BAD_INPUTS])


@pytest.mark.parametrize("case", range(len(BAD_INPUTS)), ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_exits_2_with_one_message_and_starts_no_ray(case, bad_input_results):
    proc, (_, needle) = bad_input_results[case], BAD_INPUTS[case]
    assert_one_error_line(proc, needle)
    assert not proc.ray_sessions, "a Ray session was started"


def test_one_bad_input_through_its_own_process(cli_env):
    """The batch runs the CLI's main() in-process; one case goes through `python -m` end to end."""
    env, ray_dir = cli_env
    proc = subprocess.run(
        [*CLI, "train", "--lr", "nan"], env=env, capture_output=True, text=True, timeout=300
    )
    assert_one_error_line(proc, "optim.lr: must be a finite number, got nan")
    assert not any(p.startswith("session") for p in os.listdir(ray_dir))


def assert_one_error_line(proc, needle: str) -> None:
    """Exit 2 and exactly one line on stderr, ``raytrain-ft: error: ...``, holding ``needle`` (the
    field, flag or file)."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("raytrain-ft: error: ") and needle in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


def _non_utf8_config(d):
    path = d / "latin1.yaml"
    path.write_bytes("optim: {name: sgd}  # caf\xe9\n".encode("latin-1"))
    return ["train", "--config", str(path)], f"--config: {path} is not UTF-8 text (byte 0xe9"


def _parquet(kind):
    def build(d):
        from tests.unit.test_data import _bad_parquet

        path = _bad_parquet(kind, d)
        return ["train", "--dataset", "parquet", "--data-path", path], f"{path}: "

    return build


def _report(history):
    def build(d):
        path = d / "run.json"
        path.write_text(json.dumps({"history": history}))
        return ["report", str(path)], f"{path}: "

    return build


def _report_into_a_missing_directory(d):
    path = d / "run.json"
    path.write_text(json.dumps({"history": [{"t": 0, "loss": 1.0, "accuracy": None}]}))
    return [
        "report",
        str(path),
        "--output",
        str(d / "missing" / "run.png"),
    ], f"--output: directory '{d / 'missing'}' does not exist"


def _resume_past_the_end(d):
    """Checkpoints of step 20 (of this run's shards) for a run of 6 steps: nothing left to train."""
    import numpy as np

    from raytrain_ft.config import load
    from raytrain_ft.recovery.checkpoint import save_shard_checkpoint
    from raytrain_ft.task import Task
    from raytrain_ft.trainer import Trainer

    cfg = load(None, {"steps": "6", "image_size": "8"})
    task, _, _ = Task.build(cfg)
    for r in Trainer._shards(task.build_model(cfg.seed), 2):
        save_shard_checkpoint(str(d), r.index, 20, np.zeros(r.size, np.float32), {})
    return [
        "train",
        "--steps",
        "6",
        "--image-size",
        "8",
        "--resume-from",
        str(d),
    ], "recovery.resume_from: the checkpoints there are at step 20 and this run has 6 steps"


BAD_FILES = [
    (_non_utf8_config, ""),
    (_parquet("zero rows"), "holds no rows"),
    (_parquet("string labels"), "label column 'label' has type string"),
    (_parquet("huge label"), "label column 'label' holds 100000 in row 3"),
    (_parquet("ragged rows"), "image row 0 holds 3 values"),
    (
        _parquet("bad shape metadata"),
        "the file's metadata 'raytrain_ft.image_shape' is '1,x,2'",
    ),
    (_report([1, 2]), "history[0] is 1"),
    (_report("abc"), "'history' is \"abc\""),
    (
        _report([{"t": 1}]),
        'history[0] is {"t": 1}: each point needs t (a finite number), loss and accuracy',
    ),
    (_report_into_a_missing_directory, ""),
    (_resume_past_the_end, ""),
]
BAD_FILE_IDS = [
    "non-utf8-config",
    "parquet-zero-rows",
    "parquet-string-labels",
    "parquet-huge-label",
    "parquet-ragged",
    "parquet-bad-metadata",
    "report-history-list",
    "report-history-string",
    "report-history-missing-keys",
    "report-output-missing-dir",
    "resume-past-the-end",
]


@pytest.fixture(scope="module")
def bad_file_results(tmp_path_factory):
    built = [
        build(tmp_path_factory.mktemp(name)) for (build, _), name in zip(BAD_FILES, BAD_FILE_IDS)
    ]
    return [(proc, needle) for proc, (_, needle) in zip(_run_batch([a for a, _ in built]), built)]


@pytest.mark.parametrize("case", range(len(BAD_FILES)), ids=BAD_FILE_IDS)
def test_bad_files_exit_2_with_one_line_naming_the_file(case, bad_file_results):
    proc, needle = bad_file_results[case]
    assert_one_error_line(proc, needle + BAD_FILES[case][1])
    assert "data.image_shape" not in proc.stderr
    assert not proc.ray_sessions, "a Ray session was started"


def test_unreachable_address_exits_2_fast(cli_env):
    env, _ = cli_env
    with socket.socket() as s:  # a local port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run(
        [*CLI, "train", "--address", f"127.0.0.1:{port}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert f"cluster.address '127.0.0.1:{port}' is unreachable" in proc.stderr


def test_corrupt_parquet_and_bad_yaml_exit_2(tmp_path, cli_env):
    env, ray_dir = cli_env
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 garbage")
    proc = subprocess.run(
        [*CLI, "train", "--dataset", "parquet", "--data-path", str(bad)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (
        proc.returncode == 2
        and "not a readable Parquet file" in proc.stderr
        and str(bad) in proc.stderr
    )
    yml = tmp_path / "run.yaml"
    yml.write_text("optim:\n  lr: [1,\n")
    proc = subprocess.run(
        [*CLI, "train", "--config", str(yml)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2 and "not valid YAML at line" in proc.stderr
    assert not any(p.startswith("session") for p in os.listdir(ray_dir))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "args, needle",
    [
        (["report", "/nonexistent/run.json"], "/nonexistent/run.json: cannot read the run summary"),
        (
            ["submit", "--address", "http://127.0.0.1:{port}"],
            "no Ray dashboard answers at http://127.0.0.1:{port}",
        ),
        (
            ["status", "raysubmit_x", "--address", "http://127.0.0.1:{port}"],
            "no Ray dashboard answers at http://127.0.0.1:{port}",
        ),
        (["submit", "--address", "ray://10.0.0.1:10001"], "is not the dashboard's HTTP address"),
        (["submit", "--model", "vgg"], "model.name: unknown value 'vgg'"),
        (["status", "raysubmit_x", "--address", "127.0.0.1:99999"], "Port out of range"),
        (["chaos", "--address", "127.0.0.1:99999", "--kill", "worker:0@step=1"], "out of range"),
        # refused before connecting (nothing listens on port 1: that error would come instead)
        (
            ["chaos", "--address", "127.0.0.1:1", "--kill", "node:1@step=1"],
            "--kill: node:1@step=1: against a running run only",
        ),
        (
            ["chaos", "--address", "127.0.0.1:1", "--kill", "worker:0@step=1", "--roles", "server"],
            "--roles: applies to --random schedules only",
        ),
        (["report", "/nonexistent/run.json", "-o", "r.jpg"], "--output: the report is a PNG image"),
    ],
)
def test_job_and_report_commands_exit_2_with_one_message(args, needle, cli_env, tmp_path):
    env, _ = cli_env
    port = _closed_port()
    env = {**env, "HOME": str(tmp_path)}
    proc = subprocess.run(
        [*CLI, *[a.format(port=port) for a in args]],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert needle.format(port=port) in proc.stderr and "Traceback" not in proc.stderr


def test_gpus_asked_of_an_embedded_ray_without_them_exit_2_at_once(cli_env):
    """No autoscaler can add GPUs to the Ray a run starts for itself: fail now instead of waiting
    for them -- before a Ray is started."""
    env, ray_dir = cli_env
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = subprocess.run(
        [*CLI, "train", "--use-gpu", "true", "--num-workers", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (
        "cluster.use_gpu=true asks for 2 GPUs, this machine has 0; set --use-gpu auto or false"
        in proc.stderr
    )
    assert not any(p.startswith("session") for p in os.listdir(ray_dir))


# --- --address of train and chaos: not Ray, a token problem, several local instances -- one line,
# in seconds ---


@pytest.fixture
def client_env(cli_env, tmp_path):
    """The CLI's environment with no token anywhere and RAY_AUTH_MODE unset (cases set what they
    need)."""
    env, ray_dir = cli_env
    env = {
        k: v
        for k, v in env.items()
        if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")
    }
    env["HOME"] = str(tmp_path)
    return env, ray_dir


ADDRESS_CASES = [
    (
        "http",
        {},
        "{field} '{address}' is not Ray: it answers like an HTTP server (the dashboard?), not gRPC",
    ),
    (
        "token-head",
        {},
        "the Ray cluster at {address} requires token authentication and no token was found: set "
        "RAY_AUTH_TOKEN",
    ),
    (
        "token-head",
        {"RAY_AUTH_MODE": "disabled"},
        "requires token authentication and no token was found: set RAY_AUTH_TOKEN",
    ),
    (
        "token-head",
        {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "wrong"},
        "the Ray cluster at {address} rejected the token from RAY_AUTH_TOKEN; use the cluster's "
        "token",
    ),
    (
        "token-head",
        {"RAY_AUTH_TOKEN": "right"},
        "Ray sends the token from RAY_AUTH_TOKEN only with RAY_AUTH_MODE=token",
    ),
    (
        "token-head",
        {"RAY_AUTH_MODE": "token"},
        "RAY_AUTH_MODE=token and no token was found: set RAY_AUTH_TOKEN",
    ),
    ("closed", {}, "{field} 'ray://{address}' is unreachable"),
]


@pytest.mark.parametrize(
    "command, field",
    [
        (["train"], "cluster.address"),
        (["chaos", "--kill", "server:0@step=1", "--wait-s", "0"], "--address"),
    ],
    ids=["train", "chaos"],
)
@pytest.mark.parametrize(
    "server, extra_env, needle",
    ADDRESS_CASES,
    ids=[f"{c[0]}-{'-'.join(c[1]) or 'none'}" for c in ADDRESS_CASES],
)
def test_an_address_that_is_no_usable_ray_exits_2_with_one_line(
    command, field, server, extra_env, needle, client_env
):
    from tests.unit.fake_servers import fake_gcs, http_server

    env, ray_dir = client_env
    if server == "closed":
        context = contextlib.nullcontext(f"127.0.0.1:{_closed_port()}")
    else:
        context = http_server() if server == "http" else fake_gcs(token="right")
    with context as address:
        target = f"ray://{address}" if server == "closed" else address
        t0 = time.monotonic()
        proc = subprocess.run(
            [*CLI, *command, "--address", target],
            env={**env, **extra_env},
            capture_output=True,
            text=True,
            timeout=120,
        )
        took = time.monotonic() - t0
    assert_one_error_line(proc, needle.format(field=field, address=address))
    assert took < 30, f"took {took:.0f}s"
    assert not any(p.startswith("session") for p in os.listdir(ray_dir)), (
        "a Ray session was started"
    )


def test_a_silent_ray_client_address_fails_in_seconds_with_the_useful_line_only(client_env):
    from tests.unit.fake_servers import silent_port

    env, _ = client_env
    with silent_port() as address:
        t0 = time.monotonic()
        proc = subprocess.run(
            [*CLI, "train", "--address", f"ray://{address}"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        took = time.monotonic() - t0
    assert_one_error_line(
        proc,
        f"cluster.address 'ray://{address}' accepts connections but nothing answered like Ray "
        "within 5s",
    )
    assert took < 20, f"took {took:.0f}s (Ray's own client gives up after 30 s)"


@contextlib.contextmanager
def _fake_raylets(*gcs_addresses: str):
    """Processes that look like raylets of local Ray instances to Ray's own scan (``--address
    auto``): the name ``raylet`` and a ``--gcs-address=`` argument."""
    procs = [
        subprocess.Popen(
            ["fake-raylet", "-c", "import time; time.sleep(120)", f"--gcs-address={a}"],
            executable=sys.executable,
        )
        for a in gcs_addresses
    ]
    try:
        time.sleep(0.3)
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_address_auto_with_several_local_instances_is_refused_listing_them(client_env):
    env, ray_dir = client_env
    fakes = ("127.0.0.1:1", "127.0.0.1:2")
    with _fake_raylets(*fakes):
        # (the kill beyond the run stops the run before Ray, should auto ever pick an instance of
        # this machine)
        proc = subprocess.run(
            [*CLI, "train", "--address", "auto", "--kill", "server:0@step=999999"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert_one_error_line(proc, "cluster.address auto: ")
    assert "Ray instances run on this machine (" in proc.stderr and all(
        a in proc.stderr for a in fakes
    )
    assert "give the one to use as --address HOST:PORT" in proc.stderr
    assert not any(p.startswith("session") for p in os.listdir(ray_dir))


def _processes_under(path: str) -> list[str]:
    """Command lines of the processes that name ``path`` (a Ray temp dir) in their arguments."""
    found = []
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # ended meanwhile
            continue
        if path in cmd and int(pid) != os.getpid():
            found.append(cmd[:200])
    return found


def test_sigterm_stops_a_training_run_with_one_line_and_leaves_no_process(cli_env):
    """SIGTERM (a stopped Ray job, `timeout`, `kill`) ends `train` once it trains: exit 143, one
    line, neither a traceback nor Ray's stack dump ("*** SIGTERM received"), and none of the
    run's or its embedded Ray's processes left."""
    import re
    import signal
    import threading

    env, d = cli_env
    args = ["--steps", "100000", "--num-workers", "1", "--num-servers", "1", "--recovery", "none"]
    proc = subprocess.Popen(
        [*CLI, "train", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)
    reader.start()
    deadline = time.monotonic() + 180
    while not any(re.search(r"step [1-9]\d*/", line) for line in err):  # it trains
        assert proc.poll() is None and time.monotonic() < deadline, "".join(err)[-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 143
    reader.join(30)
    text = "".join(err)
    assert text.splitlines()[-1] == (
        "raytrain-ft: stopped by SIGTERM (the run's actors are stopped with it)"
    ), text[-3000:]
    assert "SIGTERM received" not in text and "Traceback" not in text, text[-3000:]
    while _processes_under(d) and time.monotonic() < deadline + 60:
        time.sleep(0.2)
    assert not _processes_under(d)
