"""Job submission against a real head started with `ray start --head` (token auth on), and its
Prometheus metrics."""

import json
import os
import subprocess
import sys
import time
import uuid

import pytest

from raytrain_ft import jobs
from raytrain_ft.actors.metrics import prometheus_name
from raytrain_ft.config import ChaosConfig, ClusterConfig, DataConfig, TrainConfig
from raytrain_ft.errors import ClusterError
from tests.integration.test_cli import CLI, assert_one_error_line
from tests.local_head import LocalHead, parse_prometheus, wait_for

pytestmark = pytest.mark.integration

TOKEN = "rtft-test-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def head():
    h = LocalHead(
        num_cpus=4,
        env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN},
        system_config={"metrics_report_interval_ms": 1000},
    )
    try:
        yield h
    finally:
        h.shutdown()


@pytest.fixture
def token_env(monkeypatch, tmp_path):
    """The client holds the cluster's token in RAY_AUTH_TOKEN (and no ~/.ray/auth_token of the
    user's is read)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("RAY_AUTH_TOKEN", TOKEN)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)


def _config(epochs: int, kill: str | None = None) -> TrainConfig:
    return TrainConfig(
        data=DataConfig(batch_size=32),
        cluster=ClusterConfig(num_workers=2, num_servers=2),
        chaos=ChaosConfig(kill=kill),
        epochs=epochs,
        log_every_s=0.5,
    )


def _value(series, name: str, **labels) -> float:
    return sum(
        v for lab, v in series.get(name, []) if all(lab.get(k) == str(x) for k, x in labels.items())
    )


def _metrics_complete(series, run_id: str) -> bool:
    r = {"run_id": run_id}
    return (
        _value(series, prometheus_name("steps"), **r) > 0
        and _value(series, prometheus_name("samples"), **r) > 0
        and _value(series, prometheus_name("samples_per_second"), **r) > 0
        and _value(
            series, prometheus_name("exchange_latency_seconds") + "_count", op="push_pull", **r
        )
        > 0
        and all(_value(series, prometheus_name("updates"), shard=i, **r) > 0 for i in (0, 1))
        and _value(series, prometheus_name("staleness") + "_count", **r) > 0
        and prometheus_name("replica_lag_seq") in series
        and _value(series, prometheus_name("recoveries"), role="server", source="replica", **r) >= 1
        and _value(
            series, prometheus_name("recovery_duration_seconds") + "_count", role="server", **r
        )
        >= 1
    )


def test_train_and_chaos_against_a_real_token_head_say_what_submit_says(head, tmp_path):
    """What the fake GCS of tests/integration/test_cli.py stands for: this real head with token
    auth refuses a missing or wrong token, and `train` and `chaos` say so in one line, in seconds,
    as `submit` does."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = str(tmp_path)
    for extra, needle in (
        ({}, "requires token authentication and no token was found: set RAY_AUTH_TOKEN"),
        (
            {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "wrong"},
            "rejected the token from RAY_AUTH_TOKEN",
        ),
    ):
        for command in (["train"], ["chaos", "--kill", "server:0@step=1", "--wait-s", "0"]):
            t0 = time.monotonic()
            proc = subprocess.run(
                [*CLI, *command, "--address", head.gcs_address],
                env={**env, **extra},
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert_one_error_line(proc, f"the Ray cluster at {head.gcs_address} {needle}")
            assert time.monotonic() - t0 < 30
    # the cluster's own token passes the check (ray.init then connects:
    # the tests below train through it)
    auth = jobs.ray_auth(head.gcs_address, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN})
    jobs.probe_ray(head.gcs_address, "cluster.address", auth=auth, environ={})


@pytest.mark.extended
def test_stop_a_running_job_and_its_actors_go_away(head, token_env):
    handle = jobs.submit(_config(epochs=500), address=head.dashboard_url)
    wait_for(
        lambda: "samples/s" in handle.logs() or handle.status() in jobs.TERMINAL_STATES,
        180,
        "the job to report progress",
        interval_s=1.0,
    )
    assert handle.status() == "RUNNING", handle.logs()[-3000:]
    assert handle.stop()
    assert handle.wait(timeout_s=120) == "STOPPED"
    # the run's actors (detached) end with their driver
    wait_for(
        lambda: not _alive_run_actors(head), 60, "the stopped run's actors to exit", interval_s=1.0
    )


def _alive_run_actors(head) -> list[str]:
    import json
    import urllib.request

    req = urllib.request.Request(
        head.dashboard_url + "/api/v0/actors?limit=10000",
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        actors = json.loads(r.read())["data"]["result"]["result"]
    return [
        a["name"]
        for a in actors
        if a.get("state") != "DEAD" and a.get("ray_namespace") == "raytrain_ft"
    ]


def test_missing_token_is_one_clear_error(head, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    with pytest.raises(
        ClusterError,
        match="requires token authentication and no token was found: set RAY_AUTH_TOKEN",
    ):
        jobs.submit(_config(epochs=1), address=head.dashboard_url)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    with pytest.raises(ClusterError, match="rejected the token from RAY_AUTH_TOKEN"):
        jobs.attach("raysubmit_none", head.dashboard_url).status()


@pytest.mark.extended
def test_a_killed_driver_leaves_no_actors_behind(head, tmp_path):
    """SIGKILL (no cleanup runs): the supervisor dies with its driver and the detached
    servers/workers notice and exit."""
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN}
    driver = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "raytrain_ft.cli",
            "train",
            "--address",
            head.gcs_address,
            "--num-workers",
            "2",
            "--num-servers",
            "2",
            "--epochs",
            "500",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(
            lambda: len(_alive_run_actors(head)) >= 5,
            180,
            "the run's actors (supervisor, 3 server slots, workers)",
            interval_s=1.0,
        )
    finally:
        driver.kill()
        driver.wait()
    wait_for(lambda: not _alive_run_actors(head), 60, "the orphaned actors to exit", interval_s=1.0)


def test_cli_submit_of_your_own_model_survives_a_chaos_kill_follows_the_log_and_exports_metrics(
    head, token_env, tmp_path
):
    """The README walkthrough as a user runs it: `raytrain-ft submit --follow` of a model, loss
    and data named by import strings that live in a directory of the user's (the job's working_dir
    carries it to the cluster, where the driver and every worker import it); `raytrain-ft chaos`
    kills a server while it trains; the tailed log shows the recovery and ends with the job's
    state; the summary is read back from the log, every run metric from the head's Prometheus
    endpoint; `status` and `logs` answer for the job."""
    import shutil
    import threading

    workdir = tmp_path / "project"
    shutil.copytree(
        os.path.join(os.path.dirname(__file__), "..", "..", "examples"),
        workdir / "examples",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    env = {
        **os.environ,
        "RAY_API_SERVER_ADDRESS": head.dashboard_url,
    }  # the address as Ray's job CLI reads it
    cli = [sys.executable, "-m", "raytrain_ft.cli"]
    steps = 400
    follow = subprocess.Popen(
        [
            *cli,
            "submit",
            "--model",
            "examples.diabetes:model",
            "--loss",
            "mse",
            "--dataset",
            "examples.diabetes:data",
            "--batch-size",
            "16",
            "--lr",
            "0.02",
            "--num-workers",
            "2",
            "--num-servers",
            "2",
            "--steps",
            str(steps),
            "--seed",
            "3",
            "--log-every-s",
            "0.5",
            "--runtime-env-json",
            json.dumps({"working_dir": str(workdir)}),
            "--follow",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out: list[str] = []
    err: list[str] = []
    readers = [
        threading.Thread(target=lambda s=s, into=into: into.extend(s), daemon=True)
        for s, into in ((follow.stdout, out), (follow.stderr, err))
    ]
    for r in readers:
        r.start()
    try:
        wait_for(lambda: out or follow.poll() is not None, 120, "the job's submission")
        assert out and out[0].startswith("submitted "), "".join(out + err)[-3000:]
        job_id = out[0].split()[1]
        assert out[0] == f"submitted {job_id} to {head.dashboard_url}\n"
        handle = jobs.attach(job_id, head.dashboard_url)
        wait_for(lambda: handle.status() != "PENDING", 120, "the job to start")
        chaos = subprocess.run(
            [*cli, "chaos", "--address", head.gcs_address, "--kill", "server:0@step=40"],
            env={**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert chaos.returncode == 0 and "fired 1 kill\n" in chaos.stdout, (
            chaos.stdout + chaos.stderr[-3000:]
        )
        seen = {}

        def scraped_all_metrics():
            series = parse_prometheus(head.scrape())
            summary_run = jobs.parse_summary(handle.logs())
            run_ids = {lab.get("run_id") for lab, _ in series.get(prometheus_name("steps"), [])}
            for run_id in run_ids:
                if run_id and _metrics_complete(series, run_id):
                    seen["run_id"], seen["series"] = run_id, series
                    return True
            if summary_run is not None or handle.status() in jobs.TERMINAL_STATES:
                raise AssertionError(
                    "the job ended before every metric was scraped; last scrape had "
                    f"{sorted(n for n in series if 'raytrain' in n)}"
                )
            return False

        wait_for(
            scraped_all_metrics,
            240,
            "every run metric on the head's Prometheus endpoint",
            interval_s=1.0,
        )
        follow.wait(timeout=300)
    finally:
        if follow.poll() is None:
            follow.kill()
        follow.wait()
        for r in readers:
            r.join(timeout=10)
    stdout = "".join(out)
    assert follow.returncode == 0, stdout[-3000:] + "".join(err)[-3000:]
    assert f"done: {steps} steps" in stdout  # the tailed log
    assert "recovered: parameter server 0 died; rebuilt from its peer's replica" in stdout
    assert stdout.rstrip().endswith(f"job {job_id}: SUCCEEDED")
    summary = jobs.parse_summary(stdout)
    assert summary == handle.result()
    print(f"job: {summary['train_time_s']:.1f}s of training, the kill at step 40 of {steps}")
    assert summary["run_id"] == seen["run_id"]
    assert summary["steps_completed"] == summary["total_steps"] == steps
    assert summary["updates_applied"] == summary["updates_acknowledged"] == 2 * steps
    assert summary["eval_loss"] < 0.8 and summary["eval_accuracy"] is None
    [recovery] = summary["recoveries"]
    assert (
        recovery["role"] == "server"
        and recovery["source"] == "replica"
        and recovery["steps_lost"] == 0
    )
    # the histograms count every exchange and every update
    series = seen["series"]
    steps_metric = _value(series, prometheus_name("steps"), run_id=seen["run_id"])
    assert 0 < steps_metric <= 2 * steps
    assert (
        _value(
            series,
            prometheus_name("exchange_latency_seconds") + "_count",
            op="push_pull",
            run_id=seen["run_id"],
        )
        >= steps_metric
    )
    status = subprocess.run(
        [*cli, "status", job_id], env=env, capture_output=True, text=True, timeout=60
    )
    assert status.returncode == 0 and status.stdout.startswith(f"{job_id}: SUCCEEDED"), (
        status.stdout + status.stderr
    )
    missing = subprocess.run(
        [*cli, "logs", "raysubmit_nosuchjob"], env=env, capture_output=True, text=True, timeout=60
    )
    assert missing.returncode == 1 and "no job 'raysubmit_nosuchjob'" in missing.stderr, (
        missing.stderr
    )
