"""Job submission helpers, human-facing output, metric names and device choice: pure, no Ray."""

import io
import json
import math
import os
import shlex
import sys
import time

import pytest

from raytrain_ft import jobs
from raytrain_ft.actors.metrics import CATALOGUE, prometheus_name
from raytrain_ft.cli import ProgressBar
from raytrain_ft.config import ChaosConfig, ClusterConfig, TrainConfig, from_dict
from raytrain_ft.device import choose_device
from raytrain_ft.errors import ClusterError, ConfigError, DataError
from raytrain_ft.report import check_summary, load_summary, markers, progress_line, recovery_line
from raytrain_ft.trainer import Progress
from tests.unit.fake_servers import fake_gcs, http_server, silent_port


def test_token_precedence_is_rays(tmp_path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-default\n")
    path = tmp_path / "tok"
    path.write_text("from-path")
    assert jobs.find_token(
        {"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(path)}, home
    ) == jobs.Token("from-env", "RAY_AUTH_TOKEN")
    assert jobs.find_token({"RAY_AUTH_TOKEN_PATH": str(path)}, home) == jobs.Token(
        "from-path", str(path)
    )
    assert jobs.find_token({}, home) == jobs.Token(
        "from-default", str(home / ".ray" / "auth_token")
    )
    assert jobs.find_token({}, tmp_path / "nobody") is None


@pytest.mark.parametrize("content, needle", [(None, "cannot be read"), ("", "is empty")])
def test_unusable_token_path_is_an_error_not_a_fallback(tmp_path, content, needle):
    path = tmp_path / "tok"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ClusterError, match=f"RAY_AUTH_TOKEN_PATH=.*{needle}"):
        jobs.find_token({"RAY_AUTH_TOKEN_PATH": str(path)}, tmp_path)


@pytest.mark.parametrize(
    "address, environ, expected",
    [
        (None, {}, "http://127.0.0.1:8265"),
        (
            None,
            {"RAY_ADDRESS": "10.0.0.5:6379"},
            "http://127.0.0.1:8265",
        ),  # a GCS address, not the job API
        (None, {"RAY_ADDRESS": "http://10.0.0.5:8265/"}, "http://10.0.0.5:8265"),
        (None, {"RAY_API_SERVER_ADDRESS": "http://a:1", "RAY_ADDRESS": "http://b:2"}, "http://a:1"),
        ("10.0.0.7:8265", {}, "http://10.0.0.7:8265"),
    ],
)
def test_dashboard_address(address, environ, expected):
    assert jobs.resolve_address(address, environ) == expected


@pytest.mark.parametrize(
    "address, environ, field",
    [
        ("http://", {}, "--address"),
        ("http://:8265", {}, "--address"),
        (None, {"RAY_ADDRESS": "http://"}, "RAY_ADDRESS"),
        (None, {"RAY_API_SERVER_ADDRESS": "https://:1"}, "RAY_API_SERVER_ADDRESS"),
    ],
)
def test_an_address_without_a_host_is_refused_naming_where_it_came_from(address, environ, field):
    with pytest.raises(ConfigError, match="names no host; give http://HEAD:8265") as e:
        jobs.resolve_address(address, environ)
    assert e.value.field == field


def test_the_job_client_talks_to_the_address_given_not_ray_address(monkeypatch):
    """Ray's job client would take RAY_ADDRESS over the address it is handed."""
    import ray.job_submission

    seen = {}

    class Client:
        def __init__(self, address, headers=None):
            seen["address"] = address
            seen["env"] = {v: os.environ.get(v) for v in jobs.ADDRESS_ENV_VARS}

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", Client)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://elsewhere:8265")
    jobs._client("http://head:8265")
    assert seen == {
        "address": "http://head:8265",
        "env": {"RAY_API_SERVER_ADDRESS": None, "RAY_ADDRESS": None},
    }
    assert os.environ["RAY_ADDRESS"] == "10.0.0.5:6379"  # put back


def test_a_ray_client_address_is_refused():
    with pytest.raises(
        ConfigError, match="cluster.address: 'ray://h:10001' is not the dashboard's HTTP address"
    ):
        jobs.resolve_address("ray://h:10001", {})


def test_entrypoint_carries_the_config_and_joins_the_cluster():
    cfg = TrainConfig(
        cluster=ClusterConfig(num_workers=3, address="10.1.1.1:6379"),
        epochs=7,
        chaos=ChaosConfig(kill="server:0@step=5"),
    )
    argv = shlex.split(jobs.entrypoint(cfg))
    # exec: the driver replaces Ray's shell, so a job's stop signals the driver itself
    assert argv[:6] == ["exec", "python", "-m", "raytrain_ft.cli", "train", "--emit-summary"]
    raw = json.loads(argv[argv.index("--config-json") + 1])
    back = from_dict(raw)
    assert back.cluster.num_workers == 3 and back.epochs == 7 and back.cluster.address is None
    assert back.chaos.kill == "server:0@step=5"


def test_simulated_nodes_cannot_be_submitted():
    with pytest.raises(ConfigError, match="cluster.local_nodes"):
        jobs.entrypoint(TrainConfig(cluster=ClusterConfig(local_nodes=3)))


def test_summary_is_the_last_marked_line():
    logs = (
        "noise\n"
        + jobs.SUMMARY_MARKER
        + '{"a": 1}\n(Worker) stuff '
        + jobs.SUMMARY_MARKER
        + '{"a": 2}\ntrailing\n'
    )
    assert jobs.parse_summary(logs) == {"a": 2}
    assert jobs.parse_summary("no summary here") is None


def test_recovery_lines_say_what_died_and_how_it_came_back():
    replica = {
        "role": "server",
        "index": 1,
        "source": "replica",
        "replayed": 3,
        "steps_lost": 0,
        "duration_s": 0.071,
    }
    assert recovery_line(replica) == (
        "recovered: parameter server 1 died; rebuilt from its peer's replica, 3 commands replayed, "
        "0 steps lost; "
        "serving again after 0.071s"
    )
    relaxed = {**replica, "updates_lost": 2}  # --durability relaxed:K
    assert "0 steps lost, 2 acknowledged updates lost; serving" in recovery_line(relaxed)
    # a dedicated holder's slot (one shard): a spare takes it and the primary sends its replica
    holder = {**replica, "role": "replica", "index": 1, "rereplicated": [0], "detected_at": 10.0}
    assert recovery_line({**holder, "replicated_at": 10.282}) == (
        "recovered: replica holder (server slot 1) died; a spare took its place, and shard 0's "
        "replica was sent to it again after 0.282s"
    )
    assert recovery_line({**holder, "replicated_at": None}).endswith(
        "a spare took its place, and the replicas it held are being sent to it again"
    )
    supervisor = {"role": "supervisor", "index": 0, "source": "rebuilt", "duration_s": 0.0}
    assert recovery_line(supervisor) == (
        "recovered: the supervisor died; Ray restarted it and it read its registry back"
    )
    ckpt = {
        "role": "server",
        "index": 0,
        "source": "checkpoint",
        "step": 20,
        "steps_lost": 7,
        "duration_s": 3.2,
    }
    assert "rolled back to the checkpoint of step 20 (7 steps lost)" in recovery_line(ckpt)
    worker = {"role": "worker", "index": 3, "source": "restart", "step": 41, "duration_s": 1.5}
    assert recovery_line(worker) == "recovered: worker 3 died; restarted at step 41 after 1.500s"
    # suspected, not found dead: the line says so (a loaded machine, a too-short suspect_after_s)
    silent = {**worker, "cause": "silent", "silent_s": 2.34}
    assert recovery_line(silent) == (
        "recovered: worker 3 stopped answering for 2.3s (suspected: its process was killed); "
        "restarted at step 41 after 1.500s"
    )
    assert recovery_line({**replica, "cause": "silent", "silent_s": 10.2}).startswith(
        "recovered: parameter server 1 stopped answering for 10.2s (suspected: killed and fenced); "
        "rebuilt from its peer's replica"
    )
    assert recovery_line({**replica, "cause": "deposed"}).startswith(
        "recovered: parameter server 1 was deposed (a newer copy of its shard serves); rebuilt"
    )
    assert recovery_line({**worker, "cause": "rollback"}).startswith(
        "recovered: worker 3 was stopped for the rollback to a checkpoint; restarted at step 41"
    )


def test_progress_line_and_bar_print_each_recovery_once():
    assert (
        progress_line(5, 10, 0.5, 0.75, 1234.0, 3.2, width=10)
        == "[#####.....] step 5/10 loss 0.5000 acc 0.750 1,234 samples/s 3s"
    )
    assert "loss - acc -" in progress_line(0, 10, math.nan, math.nan, 0.0, 0.0)
    out = io.StringIO()
    bar = ProgressBar(out)
    event = {"role": "worker", "index": 0, "source": "restart", "step": 4, "duration_s": 1.0}
    for step, events in [(1, ()), (5, (event,)), (6, (event,)), (10, (event,)), (10, (event,))]:
        bar(Progress(step, 10, 0.1, 0.9, 100.0, 1.0, recoveries=events))
    text = out.getvalue()
    assert text.count("recovered: worker 0 died") == 1
    assert text.count("step 10/10") == 1  # the final line once, even when the end is reported twice
    # a worker's recovery that started before a server's and ended after it comes first in the
    # list once it is over: each still gets its line, once
    out = io.StringIO()
    bar = ProgressBar(out)
    server = {"role": "server", "index": 0, "source": "replica", "detected_at": 2.0}
    worker = {**event, "index": 1, "detected_at": 1.0}
    for events in [(server,), (worker, server), (worker, server)]:
        bar(Progress(5, 10, 0.1, 0.9, 100.0, 1.0, recoveries=events))
    lines = [line for line in out.getvalue().splitlines() if line.startswith("recovered")]
    assert [line.split(";")[0] for line in lines] == [
        "recovered: parameter server 0 died",
        "recovered: worker 1 died",
    ]


def test_markers_put_kills_and_recoveries_on_the_history_clock():
    summary = {
        "started_at": 100.0,
        "kills": [{"kill": "server:0@step=20", "at": 103.0}],
        "recoveries": [
            {
                "role": "server",
                "index": 0,
                "source": "replica",
                "detected_at": 103.5,
                "serving_at": 103.6,
                "duration_s": 0.1,
            }
        ],
    }
    kill, rec = markers(summary)
    assert (kill.kind, kill.t_s) == ("kill", 3.0)
    assert (
        rec.kind == "recovery" and rec.t_s == pytest.approx(3.5) and rec.end_s == pytest.approx(3.6)
    )


def test_metric_names_as_prometheus_shows_them():
    assert prometheus_name("steps") == "ray_raytrain_ft_steps_total"
    assert prometheus_name("exchange_latency_seconds") == "ray_raytrain_ft_exchange_latency_seconds"
    for spec in CATALOGUE:
        assert "rank" not in spec.tag_keys and "step" not in spec.tag_keys  # low cardinality
        assert spec.tag_keys[0] == "run_id"
        if spec.kind == "histogram":
            assert list(spec.boundaries) == sorted(spec.boundaries) and spec.boundaries[0] > 0


def test_device_choice_on_a_gpu_torch_cannot_use():
    assert choose_device("cpu", "auto", False, ()) == ("cpu", None)
    assert choose_device("cuda", "true", True, (0,), noset_visible=False) == ("cuda:0", None)
    assert choose_device("cuda", "true", True, (3,), noset_visible=True) == (
        "cuda:3",
        None,
    )  # every GPU visible: the id
    device, warning = choose_device(
        "cuda", "auto", True, ()
    )  # a process hosting simulated ranks asks for no GPU
    assert device == "cpu" and "no GPU was assigned" in warning
    device, warning = choose_device("cuda", "auto", False, (0,))
    assert device == "cpu" and "Ray assigned GPU [0]" in warning
    with pytest.raises(ClusterError, match="set cluster.use_gpu='auto'"):
        choose_device("cuda", "true", False, (0,))


def test_ranks_sharing_a_process_take_its_gpus_in_turn():
    """A process hosting 2 ranks asks Ray for 2 GPUs: its second rank trains on the second."""
    assert choose_device("cuda", "true", True, (4, 6), noset_visible=False, index=1) == (
        "cuda:1",
        None,
    )  # Ray narrowed CUDA_VISIBLE_DEVICES to the two: torch numbers them 0 and 1
    assert choose_device("cuda", "true", True, (4, 6), noset_visible=True, index=1) == (
        "cuda:6",
        None,
    )
    assert choose_device("cuda", "true", True, (4, 6), noset_visible=True, index=0)[0] == "cuda:4"


# --- a Ray address for ray.init (train --address, chaos): checked in seconds, with the job
# commands' token code ---


@pytest.fixture
def auth_env(monkeypatch, tmp_path):
    """A clean client environment: no token, RAY_AUTH_MODE unset; tests set what they need."""
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in (
        "RAY_AUTH_TOKEN",
        "RAY_AUTH_TOKEN_PATH",
        "RAY_AUTH_MODE",
        "RAY_ADDRESS",
        "RAY_USE_TLS",
    ):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_what_ray_init_sends_is_decided_as_ray_decides(tmp_path):
    tok = {"RAY_AUTH_TOKEN": "t"}
    assert jobs.ray_auth("h:1", {"HOME": str(tmp_path)}, tmp_path).sent is None
    assert (
        jobs.ray_auth("h:1", tok, tmp_path).sent is None
    )  # an explicit address: only RAY_AUTH_MODE=token sends it
    assert jobs.ray_auth("auto", tok, tmp_path).sent == jobs.Token(
        "t", "RAY_AUTH_TOKEN"
    )  # a found local cluster: sent
    assert jobs.ray_auth("h:1", {**tok, "RAY_AUTH_MODE": "token"}, tmp_path).sent.value == "t"
    assert jobs.ray_auth("auto", {**tok, "RAY_AUTH_MODE": "disabled"}, tmp_path).sent is None
    with pytest.raises(
        ClusterError, match="RAY_AUTH_MODE=token and no token was found: set RAY_AUTH_TOKEN"
    ):
        jobs.ray_auth("h:1", {"RAY_AUTH_MODE": "token"}, tmp_path)


@pytest.mark.parametrize("mode", ["token", "disabled", "TOKEN", " disabled "])
def test_the_auth_modes_ray_knows_pass(mode):
    jobs.check_auth_mode({"RAY_AUTH_MODE": mode})
    jobs.check_auth_mode({})  # unset: Ray's default


@pytest.mark.parametrize("mode", ["tokn", "bogus", "", "none", "true"])
def test_an_auth_mode_ray_would_read_as_none_is_refused(mode):
    """Ray 2.60 runs without authentication for any value but token: a typo must not do that."""
    with pytest.raises(ConfigError, match=rf"RAY_AUTH_MODE: '{mode}' is not a mode Ray knows"):
        jobs.check_auth_mode({"RAY_AUTH_MODE": mode})


@pytest.mark.parametrize(
    "env, needle",
    [
        (
            {},
            "requires token authentication and no token was found: set RAY_AUTH_TOKEN, .*, and set "
            "RAY_AUTH_MODE=token",
        ),
        (
            {"RAY_AUTH_MODE": "disabled"},
            "requires token authentication and no token was found: .*and set RAY_AUTH_MODE=token",
        ),
        (
            {"RAY_AUTH_TOKEN": "right"},
            "Ray sends the token from RAY_AUTH_TOKEN only with RAY_AUTH_MODE=token "
            "\\(RAY_AUTH_MODE is unset\\)",
        ),
        (
            {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "wrong"},
            "rejected the token from RAY_AUTH_TOKEN; use the cluster's token",
        ),
        ({"RAY_AUTH_MODE": "token"}, "RAY_AUTH_MODE=token and no token was found"),
    ],
)
def test_a_head_that_wants_a_token_is_one_line_like_submit(auth_env, env, needle):
    for k, v in env.items():
        auth_env.setenv(k, v)
    with fake_gcs(token="right") as address, pytest.raises(ClusterError, match=needle):
        jobs.check_ray_address(address, "cluster.address", timeout_s=2)


def test_the_right_token_passes_and_a_head_without_auth_takes_anyone(auth_env):
    with fake_gcs(token=None) as address:
        assert jobs.check_ray_address(address, "cluster.address", timeout_s=2) == address
    auth_env.setenv("RAY_AUTH_MODE", "token")
    auth_env.setenv("RAY_AUTH_TOKEN", "right")
    with fake_gcs(token="right") as address:
        assert jobs.check_ray_address(address, "cluster.address", timeout_s=2) == address


def test_an_open_port_that_is_not_ray_is_named(auth_env):
    with http_server() as address:
        with pytest.raises(
            ClusterError,
            match=rf"cluster.address '{address}' is not Ray: it answers like an HTTP server \(the "
            r"dashboard\?\)",
        ):
            jobs.check_ray_address(address, "cluster.address", timeout_s=2)
        with pytest.raises(
            ClusterError,
            match=r"cluster.address 'ray://.*' is not Ray: .*the Ray Client server, ray://HEAD:10001",
        ):
            jobs.check_ray_address("ray://" + address, "--address", timeout_s=2)
    with silent_port() as address:
        t0 = time.monotonic()
        with pytest.raises(
            ClusterError,
            match=r"cluster.address 'ray://.*' accepts connections but nothing answered like Ray "
            r"within 0.5s",
        ):
            jobs.check_ray_address("ray://" + address, "--address", timeout_s=0.5)
        assert time.monotonic() - t0 < 5


def test_address_auto_refuses_to_pick_one_of_several_instances():
    with pytest.raises(
        ClusterError,
        match=r"cluster.address='auto': 2 Ray instances run on this machine \(10.0.0.1:6379, "
        r"10.0.0.2:6380\); "
        r"give the one to use as cluster.address=HOST:PORT",
    ):
        jobs.resolve_ray_address(
            "auto", "--address", {}, candidates={"10.0.0.2:6380", "10.0.0.1:6379"}
        )
    assert (
        jobs.resolve_ray_address("auto", "--address", {}, candidates={"10.0.0.1:6379"})
        == "10.0.0.1:6379"
    )
    assert (
        jobs.resolve_ray_address(
            "auto", "--address", {"RAY_ADDRESS": "h:1"}, candidates={"a:1", "b:2"}
        )
        == "h:1"
    )  # as ray.init reads it
    with pytest.raises(
        ClusterError, match="cluster.address=.auto.: no Ray instance runs on this machine"
    ):
        jobs.resolve_ray_address("auto", "--address", {}, candidates=set())
    assert jobs.resolve_ray_address("h:1", "--address", {}, candidates={"a:1", "b:2"}) == "h:1"


@pytest.mark.parametrize(
    "history, needle",
    [
        ([1, 2], r"history\[0\] is 1: each point needs t"),
        ("abc", r"'history' is \"abc\", not a list of points"),
        (
            [{"t": 1}],
            r"history\[0\] is \{\"t\": 1\}: each point needs t \(a finite number\), loss and "
            "accuracy",
        ),
        (
            [{"t": 0, "loss": 1, "accuracy": 0.5}, {"t": "x", "loss": 1, "accuracy": 0.5}],
            r"history\[1\]",
        ),
        ([{"t": 0, "loss": "low", "accuracy": None}], r"history\[0\]"),
    ],
)
def test_a_malformed_history_is_one_data_error_naming_the_file(tmp_path, history, needle):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"history": history}))
    with pytest.raises(DataError, match=needle) as e:
        load_summary(str(path))
    assert e.value.path == str(path) and "raytrain-ft train --output-json" in str(e.value)


@pytest.mark.parametrize(
    "extra, needle",
    [
        ({"kills": [5]}, r"kills\[0\] is 5"),
        ({"kills": "server"}, r"'kills' is \"server\", not a list"),
        ({"recoveries": [{"detected_at": 1.0}]}, r"recoveries\[0\]"),
        ({"started_at": "noon"}, r"'started_at' is \"noon\""),
        ({"config": []}, r"'config' is \[\]"),
        ({"eval_history": [{"t": "x", "eval_accuracy": 0.5}]}, r"eval_history\[0\]"),
        ({"eval_history": 3}, r"'eval_history' is 3, not a list of evaluations"),
    ],
)
def test_the_other_parts_the_report_reads_are_checked_too(extra, needle):
    summary = {"history": [{"t": 0, "loss": 1.0, "accuracy": None}], **extra}
    with pytest.raises(DataError, match=needle):
        check_summary("run.json", summary)
    assert check_summary("run.json", {"history": summary["history"]})


def test_deterministic_flags_are_set_for_a_gpu_process(monkeypatch):
    import os

    import torch

    from raytrain_ft.device import CUBLAS_WORKSPACE_ENV_VAR, deterministic

    monkeypatch.delenv(CUBLAS_WORKSPACE_ENV_VAR, raising=False)
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
    )
    try:
        got = deterministic(tf32=False)
        assert os.environ[CUBLAS_WORKSPACE_ENV_VAR] == ":4096:8" and got["tf32"] is False
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert (
            not torch.backends.cudnn.benchmark
            and not torch.backends.cuda.matmul.allow_tf32
            and not torch.backends.cudnn.allow_tf32
        )
        assert deterministic(tf32=True)["tf32"] and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.use_deterministic_algorithms(before[0])
        (
            torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark,
            torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32,
        ) = before[1:]


def test_the_report_draws_the_evaluations_made_while_training(tmp_path):
    from raytrain_ft.report import render_png

    summary = {
        "history": [{"t": t, "loss": 2.0 - t, "accuracy": t / 2} for t in (0.0, 0.5, 1.0)],
        "eval_history": [
            {"t": 0.4, "step": 3, "eval_loss": 1.5, "eval_accuracy": 0.4},
            {"t": 0.9, "step": 7, "eval_loss": 0.5, "eval_accuracy": 0.9},
        ],
    }
    check_summary("run.json", summary)
    png = tmp_path / "run.png"
    render_png(summary, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_null_kills_and_recoveries_draw_as_none(tmp_path):
    """The check accepts null for the lists; the drawing reads it as none."""
    from raytrain_ft.report import markers, render_png

    summary = {
        "history": [{"t": t, "loss": 2.0 - t, "accuracy": t / 2} for t in (0.0, 0.5, 1.0)],
        "kills": None,
        "recoveries": None,
    }
    check_summary("run.json", summary)
    assert markers(summary) == []
    render_png(summary, str(tmp_path / "run.png"))


def test_a_summary_nested_too_deeply_or_no_regular_file_is_one_data_error(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text('{"history": ' + "[" * 100000 + "]" * 100000 + "}")
    with pytest.raises(DataError, match="is nested too deeply for a run summary"):
        load_summary(str(deep))
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)  # nothing writes it: reading would wait for ever
    with pytest.raises(DataError, match="is not a regular file"):
        load_summary(str(fifo))


@pytest.mark.parametrize(
    "summary, needle",
    [
        ({"history": [{"t": float("inf"), "loss": 1, "accuracy": 0.5}]}, r"history\[0\]"),
        (
            {"history": [{"t": 0, "loss": float("nan"), "accuracy": None}], "started_at": 1e400},
            "started_at",
        ),
        (
            {"history": [{"t": 0, "loss": 1, "accuracy": 0.5}], "kills": [{"at": float("nan")}]},
            r"kills\[0\]",
        ),
    ],
)
def test_times_the_report_places_must_be_finite(tmp_path, summary, needle):
    """A NaN loss is a diverged run and is drawn; a time that is not finite has no place."""
    with pytest.raises(DataError, match=needle):
        check_summary(str(tmp_path / "run.json"), summary)


def test_the_python_api_refuses_an_unknown_auth_mode_before_ray_starts(monkeypatch):
    """``Trainer.fit`` starts its own Ray through ``ray_session``: the same check as the CLI's."""
    import ray

    from raytrain_ft.trainer import ray_session

    # as in a process with no Ray yet (the suite's own session Ray may be running in this one)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setenv("RAY_AUTH_MODE", "tokn")
    with pytest.raises(ConfigError, match="RAY_AUTH_MODE: 'tokn' is not a mode Ray knows"):
        with ray_session(TrainConfig()):
            pass


def test_a_retired_incarnation_leaves_its_gauges_at_zero_not_at_their_last_value():
    """A process kept warm after its run lives on: the gauges its incarnation set (a worker's
    samples/s, a shard's replica lag) read 0 from then on; counters and histograms keep their
    totals."""
    from raytrain_ft.actors.metrics import Recorder

    class Fake:
        def __init__(self):
            self.values = {}

        def set(self, value, tags=None):
            self.values[tuple(sorted((tags or {}).items()))] = value

        def inc(self, value, tags=None):
            key = tuple(sorted((tags or {}).items()))
            self.values[key] = self.values.get(key, 0) + value

    rec = Recorder("run-a", ())  # outside Ray: records nothing by itself
    gauge, lag, counter = Fake(), Fake(), Fake()
    rec._metrics = {"samples_per_second": gauge, "replica_lag_seq": lag, "steps": counter}
    rec.set("samples_per_second", 812.5)
    rec.set("replica_lag_seq", 3, {"shard": "0"})
    rec.set("replica_lag_seq", 1, {"shard": "1"})
    rec.inc("steps", 60)
    rec.retire()
    assert gauge.values == {(): 0.0}
    assert lag.values == {(("shard", "0"),): 0.0, (("shard", "1"),): 0.0}
    assert counter.values == {(): 60}
    rec.retire()  # nothing set since: nothing to do
    assert gauge.values == {(): 0.0}


def test_the_report_of_a_regression_draws_its_eval_loss_and_no_empty_accuracy_panel(
    tmp_path, monkeypatch
):
    """A run with no accuracy (mse, your own loss) had an empty accuracy panel and its evaluations
    undrawn; a one-step run drew nothing (a line of one point)."""
    import matplotlib.figure

    from raytrain_ft.report import render_png

    drawn = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: drawn.append(fig))
    summary = {
        "history": [{"t": 0.5, "loss": 2.0, "accuracy": None}],
        "eval_history": [{"t": 0.4, "step": 3, "eval_loss": 1.5, "eval_accuracy": None}],
        "eval_loss": 1.25,
        "eval_accuracy": None,
    }
    check_summary("run.json", summary)
    render_png(summary, str(tmp_path / "run.png"))
    [fig] = drawn
    [loss_axes] = fig.axes  # no accuracy panel
    lines = {line.get_label(): line for line in loss_axes.get_lines()}
    assert set(lines) == {"training loss", "eval loss"}
    assert lines["training loss"].get_marker() == "."  # one point, drawn
    assert "eval loss 1.2500" in fig._suptitle.get_text()


def test_cli_log_lines_read_as_the_cli_speaks():
    """A chaos kill and a warning logged in the CLI's process read ``raytrain-ft: ...``, not
    ``2026-11-28 19:15:51,123 WARNING raytrain_ft.recovery.chaos: ...``; another library is
    named; on a terminal the progress bar's line is cleared first."""
    import logging

    from raytrain_ft.cli import _CliLogLine

    def line(name, level, tty=False):
        record = logging.LogRecord(name, level, __file__, 1, "[chaos] killed %s", ("x",), None)
        return _CliLogLine(tty).format(record)

    assert line("raytrain_ft.recovery.chaos", logging.INFO) == "raytrain-ft: [chaos] killed x"
    assert line("raytrain_ft.trainer", logging.WARNING) == "raytrain-ft: warning: [chaos] killed x"
    assert line("filelock", logging.ERROR) == "raytrain-ft: error: (filelock) [chaos] killed x"
    assert line("raytrain_ft", logging.INFO, tty=True) == "\r\033[Kraytrain-ft: [chaos] killed x"


def test_ray_lines_of_a_run_drop_its_deaths_and_colour_only_on_a_terminal(monkeypatch):
    """Ray's line for a killed process is dropped (the run's ``recovered:`` line reports it); a
    process's line keeps its ``(Supervisor pid=7)`` prefix, without colour codes where stderr is a
    file; ``RAY_COLOR_PREFIX`` set by the user is obeyed."""
    import ray._private.worker as ray_worker

    from raytrain_ft.trainer import RAY_DEATH_LINE, ray_lines_as_the_run_reports

    monkeypatch.delenv("RAY_COLOR_PREFIX", raising=False)
    base = {"ip": "10.0.0.1", "localhost": "10.0.0.1", "is_err": True, "task_name": ""}

    def printed(data) -> str:
        err = io.StringIO()
        monkeypatch.setattr(sys, "stderr", err)
        with ray_lines_as_the_run_reports():
            ray_worker.print_to_stdstream(data, False)
        return err.getvalue()

    actor = {**base, "pid": 7, "actor_name": "Supervisor", "lines": ["[supervisor] hello"]}
    assert printed(actor) == "(Supervisor pid=7) [supervisor] hello\n"
    death = {**base, "pid": "raylet", "lines": [RAY_DEATH_LINE + ". Some Actor ID"]}
    assert printed(death) == ""
    retried = (
        "Task Supervisor.deliver failed. There are infinite retries remaining, so the task will be "
        "retried. Error: The actor is temporarily unavailable: RpcError: RPC error: Socket closed"
    )
    assert printed({**death, "lines": [retried]}) == ""
    other = "Task Trainer.fit failed. There are 0 retries remaining. Error: boom"
    assert printed({**death, "lines": [other]}) == f"(raylet) {other}\n"
    # abseil's mutex tracing, which a Ray worker process sometimes prints at its start, is dropped
    trace = "[mutex.cc : 452] RAW: Lock blocking 0x55f441f03670   @ 0x7f645942b1a2 0x7f64584fb23c"
    idle = {**base, "pid": 951, "actor_name": "", "lines": [trace, "[worker] a real line"]}
    assert printed(idle) == "(pid=951) [worker] a real line\n"
    assert printed({**idle, "lines": [trace]}) == ""
    # a node's raylet ended (--kill node:I): its message and the log lines it quotes are dropped
    quoted = "    [2026-11-29 01:40:20,466 I 8020 8020] (raylet) accessor.cc:475: Received"
    ended = {**base, "pid": "raylet", "lines": ["Raylet is terminated. Termination is", quoted]}
    assert printed(ended) == ""
    # a node Ray stopped hearing from: one line of the run's, without Ray's list of causes
    lost = {
        **base,
        "pid": "raylet",
        "lines": [
            "The node with node id: 9763aa5a4c27ca22b44fd373a481a6bf883459790ab95a4183966d22 and "
            "address: 192.0.2.2 and node name: 192.0.2.2 has been marked dead because the detector "
            "has missed too many heartbeats from it. This can happen when a \t(1) raylet crashes "
            "unexpectedly (OOM, etc.) ",
            "\t(2) raylet has lagging heartbeats due to slow network or busy workload.",
        ],
    }
    assert printed(lost) == (
        "(raylet) node 192.0.2.2 (9763aa5a4c27) is lost: Ray stopped hearing from it; the run "
        "replaces the servers and workers it hosted\n"
    )
    # the processes' own lines come through the handler ray.init registered with the dispatcher
    import functools

    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    def logged(data) -> str:
        err = io.StringIO()
        monkeypatch.setattr(sys, "stderr", err)
        dispatcher.add_handler(
            "ray_print_logs", functools.partial(ray_worker.print_to_stdstream, ignore_prefix=False)
        )
        try:
            with ray_lines_as_the_run_reports():
                dispatcher.emit(data)
        finally:
            dispatcher.remove_handler("ray_print_logs")
        return err.getvalue()

    assert logged(actor) == "(Supervisor pid=7) [supervisor] hello\n"
    assert logged(idle) == "(pid=951) [worker] a real line\n"
    # a Ray the run started keeps the changed handler for late lines until ray.shutdown removes it
    dispatcher.add_handler(
        "ray_print_logs", functools.partial(ray_worker.print_to_stdstream, ignore_prefix=False)
    )
    try:
        with ray_lines_as_the_run_reports(until_shutdown=True):
            pass
        err = io.StringIO()
        monkeypatch.setattr(sys, "stderr", err)
        dispatcher.emit(actor)  # a late line
        assert err.getvalue() == "(Supervisor pid=7) [supervisor] hello\n"
    finally:
        dispatcher.remove_handler("ray_print_logs")  # as ray.shutdown does
    assert not dispatcher.handlers
    # a line Ray's deduplicator held back is printed by ray.shutdown, through print_worker_logs
    import ray

    from raytrain_ft.trainer import shutdown_ray

    def flushed() -> str:
        err = io.StringIO()
        monkeypatch.setattr(sys, "stderr", err)
        monkeypatch.setattr(
            ray, "shutdown", lambda: ray_worker.print_worker_logs(actor, sys.stderr)
        )
        shutdown_ray()
        return err.getvalue()

    assert flushed() == "(Supervisor pid=7) [supervisor] hello\n"
    assert "RAY_COLOR_PREFIX" not in os.environ
    monkeypatch.setenv("RAY_COLOR_PREFIX", "1")
    assert "\033[" in flushed()
    assert "\033[" in printed(actor)  # the user's choice
    assert "\033[" in logged(actor)
    assert "RAY_COLOR_PREFIX" in os.environ


def test_progress_keeps_a_restarting_ranks_last_step_until_the_new_one_is_started():
    """A restarted rank reports step 0 until the supervisor tells it where to resume; the run's
    progress (bar, summary history) keeps the rank's last started status meanwhile, so it does not
    fall to step 0. Once started, the new incarnation's status counts (a checkpoint rollback's
    lower step included)."""
    import types

    from raytrain_ft.actors.worker_entry import WorkerStatus
    from raytrain_ft.trainer import _Run

    def status(rank, step, started=True):
        return WorkerStatus(rank, step, 110, 0.5, 32 * step, 0.0, 0.0, 0.0, None, False, None,
                            "cpu", (), "ip:1", 0, started=started)  # fmt: skip

    run = types.SimpleNamespace(_latest={})
    merge = lambda statuses: [s.step for s in _Run._merge(run, statuses)]  # noqa: E731
    assert merge([status(0, 0, started=False), status(1, 0, started=False)]) == [0, 0]
    assert merge([status(0, 59), status(1, 59)]) == [59, 59]
    assert merge([status(0, 60), status(1, 0, started=False)]) == [60, 59]  # rank 1 restarting
    assert merge([status(0, 60), None]) == [60, 59]  # rank 1 not answering
    assert merge([status(0, 61), status(1, 40)]) == [61, 40]  # resumed (here: rolled back)


class _Ended(BaseException):
    pass


def test_the_process_sigterm_handler_stays_in_front_of_rays_across_ray_init():
    """``ray.init`` sets its own SIGTERM handler (``sys.exit(15)``); around it the process's
    handler is put back, and a SIGTERM while ``ray.init`` runs goes to that handler too."""
    import signal

    from raytrain_ft.jobs import signal_handlers_kept

    def mine(signum, frame):
        raise _Ended(signum)

    def rays(signum, frame):  # what ray.init installs
        sys.exit(signum)

    before = signal.signal(signal.SIGTERM, mine)
    try:
        with signal_handlers_kept():
            signal.signal(signal.SIGTERM, rays)  # ray.init
        assert signal.getsignal(signal.SIGTERM) is mine
        with pytest.raises(_Ended):  # a SIGTERM during ray.init
            with signal_handlers_kept():
                signal.signal(signal.SIGTERM, rays)
                signal.raise_signal(signal.SIGTERM)  # delivered before it returns
        assert signal.getsignal(signal.SIGTERM) is mine
        with pytest.raises(SystemExit):  # another SystemExit is not a SIGTERM: left alone
            with signal_handlers_kept():
                sys.exit(3)
    finally:
        signal.signal(signal.SIGTERM, before)


@pytest.mark.parametrize(
    "command, raised, code, line",
    [
        (["train"], KeyboardInterrupt(), 130, "stopped by SIGINT (the run's actors are stopped"),
        (["train"], "Stopped", 143, "stopped by SIGTERM (the run's actors are stopped with it)"),
        (["chaos", "--kill", "server:0@step=3"], KeyboardInterrupt(), 130, "attacked goes on"),
        (["logs", "raysubmit_1", "--follow"], KeyboardInterrupt(), 130, "stop raysubmit_1 ends"),
    ],
)  # fmt: skip
def test_a_signal_ends_a_command_with_one_line_saying_what_goes_on(
    monkeypatch, capsys, command, raised, code, line
):
    import signal

    from raytrain_ft import cli

    if raised == "Stopped":
        raised = cli.Stopped(signal.SIGTERM)

    def interrupted(args):
        raise raised

    for name in ("_train", "_chaos", "_job_command"):
        monkeypatch.setattr(cli, name, interrupted)
    monkeypatch.setattr(cli, "check_auth_mode", lambda: None)
    assert cli.main(command) == code
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("raytrain-ft: stopped by SIG") and line in err[0]


def test_the_final_loss_leaves_out_a_rank_restarted_at_the_end_with_no_step_trained():
    """A rank killed at the last step is restarted there and trains nothing: it has no loss, and
    the run's final loss (and its 'diverged' warning) is the others'; a NaN of a rank that trained
    still makes it NaN."""
    import types

    from raytrain_ft.trainer import final_loss

    def rank(loss, samples):
        return types.SimpleNamespace(last_loss=loss, samples=samples)

    assert final_loss([rank(0.25, 640), rank(math.nan, 0)]) == 0.25
    assert final_loss([rank(0.25, 640), rank(0.75, 32)]) == 0.5
    assert math.isnan(final_loss([rank(0.25, 640), rank(math.nan, 32)]))  # it diverged
    assert math.isnan(final_loss([rank(math.nan, 0)]))


def test_tailing_an_unknown_job_is_one_line_and_an_interrupted_tail_closes_quietly():
    """tail() went straight to the log stream: a 404 handshake traceback. Ctrl-C while the stream
    waited then raised "aclose(): asynchronous generator is already running"."""
    import asyncio

    from raytrain_ft.errors import JobError

    def interrupt():
        raise KeyboardInterrupt

    class Client:
        def __init__(self, known, interrupted=False):
            self.known, self.interrupted = known, interrupted

        def get_job_status(self, job_id):
            if not self.known:
                raise RuntimeError(f"Job {job_id} does not exist")
            return type("Status", (), {"value": "RUNNING"})()

        async def tail_job_logs(self, job_id):
            yield "a"
            if self.interrupted:  # Ctrl-C lands while the stream waits for the next chunk
                asyncio.get_running_loop().call_soon(interrupt)
                await asyncio.sleep(5)
            yield "b"

    with pytest.raises(JobError, match="no job 'raysubmit_x' on the cluster"):
        next(jobs.JobHandle("raysubmit_x", "http://h:8265", Client(False)).tail())
    assert list(jobs.JobHandle("raysubmit_x", "http://h:8265", Client(True)).tail()) == ["a", "b"]
    with pytest.raises(KeyboardInterrupt):
        list(jobs.JobHandle("raysubmit_x", "http://h:8265", Client(True, True)).tail())


def test_submit_checks_kills_before_the_cluster_and_names_a_job_id_taken(monkeypatch):
    """jobs.submit let a kill past the run's end through (the job failed 7 s later), and a
    --job-id taken came back as the job server's 17-line traceback."""
    from raytrain_ft.errors import JobError

    class Client:
        def submit_job(self, **kw):
            raise RuntimeError(
                "Request failed with status code 500: Traceback ...\nValueError: Job with "
                f"submission_id {kw['submission_id']} already exists."
            )

    def no_cluster(address):
        raise AssertionError("contacted the cluster")

    monkeypatch.setattr(jobs, "_client", no_cluster)
    with pytest.raises(ConfigError, match="the run ends after step 20"):
        jobs.submit(
            TrainConfig(steps=20, chaos=ChaosConfig(kill="server:0@step=50")), "http://h:8265"
        )
    monkeypatch.setattr(jobs, "_client", lambda address: Client())
    with pytest.raises(JobError, match="a job with id 'myjob1' already exists on the cluster"):
        jobs.submit(TrainConfig(steps=20), "http://h:8265", job_id="myjob1")
