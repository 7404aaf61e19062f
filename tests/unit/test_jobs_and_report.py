"""Job submission helpers, human-facing output, metric names and device choice: pure, no Ray."""

import io
import json
import math
import shlex

import pytest

from raytrain_ft import jobs
from raytrain_ft.actors.metrics import CATALOGUE, prometheus_name
from raytrain_ft.actors.worker import choose_device
from raytrain_ft.cli import ProgressBar
from raytrain_ft.config import ClusterConfig, RecoveryConfig, TrainConfig, from_dict
from raytrain_ft.errors import ClusterError, ConfigError
from raytrain_ft.report import markers, progress_line, recovery_line
from raytrain_ft.trainer import Progress


def test_token_precedence_is_rays(tmp_path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-default\n")
    path = tmp_path / "tok"
    path.write_text("from-path")
    assert jobs.find_token({"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(path)}, home) == jobs.Token("from-env", "RAY_AUTH_TOKEN")
    assert jobs.find_token({"RAY_AUTH_TOKEN_PATH": str(path)}, home) == jobs.Token("from-path", str(path))
    assert jobs.find_token({}, home) == jobs.Token("from-default", str(home / ".ray" / "auth_token"))
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
        (None, {"RAY_ADDRESS": "10.0.0.5:6379"}, "http://127.0.0.1:8265"),  # a GCS address, not the job API
        (None, {"RAY_ADDRESS": "http://10.0.0.5:8265/"}, "http://10.0.0.5:8265"),
        (None, {"RAY_API_SERVER_ADDRESS": "http://a:1", "RAY_ADDRESS": "http://b:2"}, "http://a:1"),
        ("10.0.0.7:8265", {}, "http://10.0.0.7:8265"),
    ],
)
def test_dashboard_address(address, environ, expected):
    assert jobs.resolve_address(address, environ) == expected


def test_a_ray_client_address_is_refused():
    with pytest.raises(ConfigError, match="--address: 'ray://h:10001' is not the dashboard's HTTP address"):
        jobs.resolve_address("ray://h:10001", {})


def test_entrypoint_carries_the_config_and_joins_the_cluster():
    cfg = TrainConfig(cluster=ClusterConfig(num_workers=3, address="10.1.1.1:6379"), epochs=7, recovery=RecoveryConfig(kill="server:0@step=5"))
    argv = shlex.split(jobs.entrypoint(cfg))
    assert argv[:5] == ["python", "-m", "raytrain_ft.cli", "train", "--emit-summary"]
    raw = json.loads(argv[argv.index("--config-json") + 1])
    back = from_dict(raw)
    assert back.cluster.num_workers == 3 and back.epochs == 7 and back.cluster.address is None
    assert back.recovery.kill == "server:0@step=5"


def test_simulated_nodes_cannot_be_submitted():
    with pytest.raises(ConfigError, match="cluster.local_nodes"):
        jobs.entrypoint(TrainConfig(cluster=ClusterConfig(local_nodes=3)))


def test_summary_is_the_last_marked_line():
    logs = "noise\n" + jobs.SUMMARY_MARKER + '{"a": 1}\n(Worker) stuff ' + jobs.SUMMARY_MARKER + '{"a": 2}\ntrailing\n'
    assert jobs.parse_summary(logs) == {"a": 2}
    assert jobs.parse_summary("no summary here") is None


def test_recovery_lines_say_what_died_and_how_it_came_back():
    replica = {"role": "server", "index": 1, "source": "replica", "replayed": 3, "steps_lost": 0, "duration_s": 0.071}
    assert recovery_line(replica) == ("recovered: parameter server 1 died; rebuilt from its peer's replica, 3 commands replayed, 0 steps lost; "
                                      "serving again after 0.071s")
    holder = {**replica, "role": "replica", "index": 2}
    assert recovery_line(holder).startswith("recovered: replica holder 2 died; rebuilt from its peer's replica, 3 commands replayed;")
    ckpt = {"role": "server", "index": 0, "source": "checkpoint", "step": 20, "steps_lost": 7, "duration_s": 3.2}
    assert "rolled back to the checkpoint of step 20 (7 steps lost)" in recovery_line(ckpt)
    worker = {"role": "worker", "index": 3, "source": "restart", "step": 41, "duration_s": 1.5}
    assert recovery_line(worker) == "recovered: worker 3 died; restarted at step 41 after 1.500s"


def test_progress_line_and_bar_print_each_recovery_once():
    assert progress_line(5, 10, 0.5, 0.75, 1234.0, 3.2, width=10) == "[#####.....] step 5/10 loss 0.5000 acc 0.750 1,234 samples/s 3s"
    assert "loss - acc -" in progress_line(0, 10, math.nan, math.nan, 0.0, 0.0)
    out = io.StringIO()
    bar = ProgressBar(out)
    event = {"role": "worker", "index": 0, "source": "restart", "step": 4, "duration_s": 1.0}
    for step, events in [(1, ()), (5, (event,)), (6, (event,)), (10, (event,)), (10, (event,))]:
        bar(Progress(step, 10, 0.1, 0.9, 100.0, 1.0, recoveries=events))
    text = out.getvalue()
    assert text.count("recovered: worker 0 died") == 1
    assert text.count("step 10/10") == 1  # the final line once, even when the end is reported twice


def test_markers_put_kills_and_recoveries_on_the_history_clock():
    summary = {"started_at": 100.0, "kills": [{"kill": "server:0@step=20", "at": 103.0}],
               "recoveries": [{"role": "server", "index": 0, "source": "replica", "detected_at": 103.5, "serving_at": 103.6, "duration_s": 0.1}]}
    kill, rec = markers(summary)
    assert (kill.kind, kill.t_s) == ("kill", 3.0)
    assert rec.kind == "recovery" and rec.t_s == pytest.approx(3.5) and rec.end_s == pytest.approx(3.6)


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
    assert choose_device("cuda", "true", True, (0,)) == ("cuda", None)
    device, warning = choose_device("cuda", "auto", False, (0,))
    assert device == "cpu" and "Ray assigned GPU [0]" in warning
    with pytest.raises(ClusterError, match="set --use-gpu auto"):
        choose_device("cuda", "true", False, (0,))
