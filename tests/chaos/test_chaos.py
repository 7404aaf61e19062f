"""Real kills against real runs; every run must complete with I1-I4 holding.

I1 nothing lost, nothing twice: every push a worker's ledger records as acknowledged is in its
   shard's applied record exactly once, and every (rank, step) of the run was applied once
(``tests/chaos/ledger.py``). I2 same run: the params hash equals the failure-free run with the same
seed. I3 no files: no server reads a checkpoint file (the runs that also write disaster checkpoints
to a directory show recovery still reads none of them). I4 no open window: every shard's replica,
   replayed, equals its primary at the end (parameters, optimizer state, per-rank clocks, applied
   record), and every server recovery re-replicated what the dead actor held.
"""

import json
import logging
import os
import subprocess
import sys

import pytest

from raytrain_ft.actors.worker import LEDGER_DIR_ENV_VAR
from raytrain_ft.config import (
    ChaosConfig,
    ClusterConfig,
    DataConfig,
    ModelConfig,
    OptimConfig,
    RecoveryConfig,
    TrainConfig,
)
from raytrain_ft.recovery.faults import parse_kills
from raytrain_ft.recovery.ledger import assert_exactly_once, read_ledgers
from raytrain_ft.trainer import Trainer

pytestmark = pytest.mark.chaos

STEPS = 60


def _snapshots_every_10(recovery: dict) -> dict:
    """Replicas snapshot every 10 updates (the other modes keep no replicas to snapshot)."""
    if recovery.get("mode", "replica") == "replica":
        return {"snapshot_interval": 10, **recovery}
    return recovery


def _config(num_servers=2, kill=None, checkpoint_dir=None, one_kill_at_a_time=False, **recovery):
    return TrainConfig(
        model=ModelConfig(name="cnn"),
        data=DataConfig(dataset="digits", image_size=8, batch_size=16),
        optim=OptimConfig(name="sgd", lr=0.05, momentum=0.9),
        cluster=ClusterConfig(num_workers=2, num_servers=num_servers),
        recovery=RecoveryConfig(checkpoint_dir=checkpoint_dir, **_snapshots_every_10(recovery)),
        chaos=ChaosConfig(kill=kill, one_kill_at_a_time=one_kill_at_a_time),
        steps=STEPS,
        seed=3,
    )


_baselines: dict[int, str] = {}


def baseline_hash(num_servers: int, request=None) -> str:
    """The failure-free run's hash. The optimizer is elementwise and each shard sums the workers'
    gradients in rank order, so the number of shards changes no bit: one run of 2 shards is every
    shard count's baseline (unit-tested without Ray in tests/unit/test_sharding.py). Computed once
    per session: the first pytest worker to need it writes it where the others read it
    (``shared_baseline``). ``request``: a test without the session's Ray, which gets it only to
    compute the hash here."""
    if not _baselines:
        shared = _SHARED.get("path")
        if shared is not None and shared.exists():
            _baselines[2] = shared.read_text()
        else:
            if request is not None:
                request.getfixturevalue("ray_local")
            result = Trainer(_config(2, num_spares=0)).fit()  # nothing dies: no spare needed
            assert result.recoveries == [] and result.kills == []
            _baselines[2] = result.params_sha256
            if shared is not None:  # whole or not at all: written aside, then renamed
                aside = shared.with_suffix(f".{os.getpid()}")
                aside.write_text(result.params_sha256)
                aside.rename(shared)
    return _baselines[2]


_SHARED: dict = {}


@pytest.fixture(scope="session", autouse=True)
def shared_baseline(tmp_path_factory):
    """Where the baseline hash is kept for every pytest worker of this session (xdist's workers
    share their base temp directory's parent): the node test, in the stream without a session Ray
    (tests/conftest.py), then needs no Ray of its own for it."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    _SHARED["path"] = shared / f"chaos-baseline-{STEPS}-steps.sha256"


def assert_invariants(result, num_servers: int, kills: str, tmp_path, baseline: str):
    fired = sorted(k["kill"] for k in result.kills)
    assert fired == sorted(str(k) for k in parse_kills(kills)), "each fault fires exactly once"
    assert all(k["how"] != "already gone" for k in result.kills), "each kill hit a live target"
    assert result.steps_completed == STEPS
    # I1, from the workers' ledgers against the shards' applied records
    assert_exactly_once(
        result.applied_counts, read_ledgers(os.environ[LEDGER_DIR_ENV_VAR], result.run_id), 2, STEPS
    )
    assert result.updates_acknowledged == result.updates_applied == num_servers * STEPS
    # I2
    assert result.params_sha256 == baseline
    # I3
    assert all(s["checkpoint_files_read"] == 0 for s in result.servers)
    # I4
    assert result.replicas_match == [True] * num_servers
    for event in result.recoveries:
        assert event["duration_s"] < 30, event
        if event["role"] in ("server", "replica"):
            assert event["source"] == "replica"


def _run(tmp_path, num_servers, kills, checkpoint_dir=None):
    baseline = baseline_hash(num_servers)
    result = Trainer(_config(num_servers, kill=kills, checkpoint_dir=checkpoint_dir)).fit()
    assert_invariants(result, num_servers, kills, tmp_path, baseline)
    return result


def _roles(result):
    return sorted((e["role"], e["index"]) for e in result.recoveries)


def test_a_primary_its_replacement_a_worker_the_supervisor_a_holder_and_a_spare_die_in_turn(
    ray_local, tmp_path
):
    """Two shards on a ring: slot i is shard i's primary and holds shard i-1's replica. In turn: a
    primary; the spare rebuilding it, mid-recovery; a worker; the supervisor; the peer holding shard
    1's replica (slot 0 again, so after a supervisor restart a recovery runs on the rebuilt
    registry); a spare. Disaster checkpoint files are written all along, and recovery reads none of
    them."""
    kills = (
        "server:0@step=10,server:0@recovery=1,worker:1@step=22,"
        "supervisor@step=32,replica:1@step=42,spare:0@step=50"
    )
    result = _run(tmp_path, 2, kills, checkpoint_dir=str(tmp_path / "checkpoints"))
    assert any((tmp_path / "checkpoints").iterdir())
    assert _roles(result) == [("server", 0), ("server", 0), ("supervisor", 0), ("worker", 1)]
    servers = [e for e in result.recoveries if e["role"] == "server"]
    assert all(
        e["rereplicated"] == [1] and e["bytes_moved"] > 0 for e in servers
    )  # I4: what slot 0 held is rebuilt
    assert (
        servers[1]["epoch"] > servers[0]["epoch"] >= 2
    )  # epochs never reused, across the supervisor's restart
    worker = next(e for e in result.recoveries if e["role"] == "worker")
    assert 22 <= worker["step"] < STEPS and result.supervisor_restarts == 1
    assert sum(w["reroutes"] for w in result.workers) >= 1
    # the restarted supervisor, like the first, never loaded torch (nor the model's code)
    assert result.supervisor_imported_torch is False


@pytest.mark.extended
def test_two_primaries_at_once_then_a_third_and_a_fourth_during_its_recovery(ray_local, tmp_path):
    # four shards: 0 and 2 are not neighbours (each one's replica lives on a survivor); then 3 dies,
    # and 1 (which holds shard 0's replica) dies while 3 is being rebuilt from slot 0
    kills = "server:0@step=15,server:2@step=15,server:3@step=35,server:1@recovery=3"
    result = _run(tmp_path, 4, kills)
    assert _roles(result) == [("server", 0), ("server", 1), ("server", 2), ("server", 3)]


@pytest.mark.extended
def test_the_dedicated_holder_of_a_single_shard_then_the_primary_mid_snapshot(ray_local, tmp_path):
    # one shard: slot 1 is a dedicated replica holder; the primary dies right after sending its 3rd
    # snapshot
    result = _run(tmp_path, 1, "replica:0@step=15,server:0@snapshot=3")
    assert _roles(result) == [("replica", 1), ("server", 0)]


def test_a_primary_mid_snapshot_and_a_holder_while_it_installs_one(ray_local, tmp_path):
    """Snapshots every 10 updates. Shard 0's primary dies right after sending its 2nd; slot 1
    (shard 1's primary, holding shard 0's replica) is killed at step 25, after receiving 2, and the
    spare that takes its place dies right after receiving its own 3rd: a @snapshot kill fires in
    whichever server reaches it, not only in a slot's first actor."""
    result = _run(tmp_path, 2, "server:0@snapshot=2,replica:0@step=25,replica:0@snapshot=3")
    assert _roles(result) == [("server", 0), ("server", 1), ("server", 1)], result.recoveries


def test_kill_a_node_of_three(ledger_dir, tmp_path, request):
    """Via the CLI on 3 simulated nodes (its own Ray, in a subprocess): the node's server and
    workers die together. It runs last in its stream (tests/conftest.py), by when the other stream
    has written the baseline hash; run alone, it starts the session's Ray to compute it."""
    baseline = baseline_hash(3, request)
    out = tmp_path / "run.json"
    kills = "node:1@step=20"
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    cmd = [
        sys.executable,
        "-m",
        "raytrain_ft.cli",
        "train",
        "--quiet",
        "--output-json",
        str(out),
        "--local-nodes",
        "3",
        "--model",
        "cnn",
        "--dataset",
        "digits",
        "--image-size",
        "8",
        "--batch-size",
        "16",
        "--optimizer",
        "sgd",
        "--lr",
        "0.05",
        "--momentum",
        "0.9",
        "--num-workers",
        "2",
        "--num-servers",
        "3",
        "--snapshot-interval",
        "10",
        "--steps",
        str(STEPS),
        "--seed",
        "3",
        "--kill",
        kills,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(out.read_text())

    class Result:
        pass

    result = Result()
    result.__dict__.update(summary)
    assert_invariants(result, 3, kills, tmp_path, baseline)
    roles = _roles(result)
    assert ("server", 1) in roles, roles  # slot 1 lives on node 1


def test_checkpoint_baseline_rolls_back_and_completes(ray_local, tmp_path):
    """The comparison baseline: the run restarts from the last checkpoint files and recomputes the
    lost steps."""
    checkpoints = tmp_path / "checkpoints"
    cfg = _config(
        2,
        kill="server:0@step=25",
        checkpoint_dir=str(checkpoints),
        mode="checkpoint",
        checkpoint_interval=10,
    )
    result = Trainer(cfg).fit()
    assert result.steps_completed == STEPS and result.params_sha256 == baseline_hash(
        2
    )  # sync rollback is deterministic too
    (server,) = [e for e in result.recoveries if e["role"] == "server"]
    assert (
        server["source"] == "checkpoint" and server["step"] % 10 == 0 and server["steps_lost"] >= 0
    )
    assert sorted(e["index"] for e in result.recoveries if e["role"] == "worker") == [
        0,
        1,
    ]  # the whole run restarted
    assert any(p.name.startswith("shard-0-step-") for p in checkpoints.iterdir())
    # the replacement loaded a checkpoint file, the restarted run the task's initial model: both
    # in the servers, none in the supervisor
    assert result.supervisor_imported_torch is False


def test_without_copies_a_server_death_fails_with_a_clear_message(ray_local, tmp_path):
    from raytrain_ft.errors import TrainingError

    with pytest.raises(TrainingError, match="recovery=none keeps no copy"):
        Trainer(_config(2, kill="server:1@step=10", mode="none")).fit()


@pytest.mark.parametrize("mode", ["replica", "none"])
def test_a_primary_dead_after_training_ended_is_read_from_its_replica(
    ray_local, tmp_path, monkeypatch, mode
):
    """Shard 0's primary (also the holder of shard 1's replica) is SIGKILLed after the workers
    finished, just before the driver reads the end state: shard 0's end state is rebuilt from its
    replica, and the run ends with the failure-free hash; without copies, one line says the shard
    is lost."""
    import ray

    from raytrain_ft.actors import supervisor
    from raytrain_ft.actors.transport import Directory
    from raytrain_ft.errors import TrainingError

    read_final = supervisor.read_final

    def killed_first(run_id, names, *args):
        handle = Directory(run_id).handle(names.primaries[0])
        ray.kill(getattr(handle, "actor", handle), no_restart=True)  # a warm process's own
        return read_final(run_id, names, *args)

    monkeypatch.setattr(supervisor, "read_final", killed_first)
    if mode == "none":
        with pytest.raises(TrainingError, match="shard 0 is lost after training ended"):
            Trainer(_config(2, mode="none")).fit()
        return
    baseline = baseline_hash(2)
    result = Trainer(_config(2)).fit()
    assert result.params_sha256 == baseline
    assert result.updates_acknowledged == result.updates_applied == 2 * STEPS
    assert result.replicas_match == [None, None]  # shard 0's primary and shard 1's holder gone


def _train_in_background(cfg):
    """Start ``Trainer(cfg).fit()`` in a thread, as a job would run it, and wait until its
    supervisor can be found. Returns (thread, box: "result" once it ends, supervisor handle)."""
    import threading

    from ray._private.test_utils import wait_for_condition

    from raytrain_ft.recovery.chaos import find_supervisor

    box = {}
    thread = threading.Thread(target=lambda: box.update(result=Trainer(cfg).fit()), daemon=True)
    thread.start()

    def run_visible():
        try:
            box["run"] = find_supervisor(None)
            return True
        except Exception:
            return False

    wait_for_condition(run_visible, timeout=120, retry_interval_ms=100)
    return thread, box, box["run"][1]


@pytest.mark.extended  # the job test kills through `raytrain-ft chaos` too
def test_chaos_against_a_running_run(ray_local, tmp_path):
    """What `raytrain-ft chaos` does: find the run's supervisor and kill by role while it trains."""
    from raytrain_ft.recovery.chaos import run_schedule
    from raytrain_ft.recovery.faults import parse_kills

    cfg = _config(2)
    cfg.steps = 200
    thread, box, supervisor = _train_in_background(cfg)
    fired = run_schedule(supervisor, parse_kills("server:1@step=60,worker:0@step=100"))
    thread.join(timeout=300)
    result = box["result"]
    assert [f["kill"] for f in fired] == ["server:1@step=60", "worker:0@step=100"]
    assert _roles(result) == [("server", 1), ("worker", 0)]
    assert (
        result.updates_acknowledged == result.updates_applied == 2 * 200
        and result.replicas_match == [True, True]
    )


@pytest.mark.parametrize(
    "role, num_servers, replaced",
    [
        ("server", 2, ("server", 0)),
        pytest.param("replica", 1, ("replica", 1), marks=pytest.mark.extended),
    ],
    ids=["primary", "holder"],
)
def test_a_frozen_server_is_replaced_while_alive_and_fenced_when_it_wakes(
    ray_local, tmp_path, role, num_servers, replaced
):
    """A suspected-but-alive server, for real: its process is stopped (SIGSTOP) at step 15, so it
    answers nothing and holds its callers' messages. The supervisor suspects it after
    ``suspect_after_s`` and replaces it while it still lives (a primary's shard is rebuilt from its
    replica, the stopped one fenced; a dedicated holder's replica goes to its successor, the
    stopped one kept retiring until it is there); the run trains on without it to step 40; then it
    wakes (SIGCONT) with the stale pushes and appends it was sent, and must change nothing: I1-I4
    as for a kill, the same hash."""
    import signal
    import time

    import ray
    from ray._private.test_utils import wait_for_condition

    baseline = baseline_hash(num_servers)
    thread, box, supervisor = _train_in_background(_config(num_servers, suspect_after_s=2.0))

    def status():
        return ray.get(supervisor.status.remote(), timeout=30)

    def reached(step):
        s = status()
        return s.state == "running" and min(s.shard_steps, default=0) >= step

    wait_for_condition(lambda: reached(15), timeout=120, retry_interval_ms=50)
    name, process = status().targets.lookup(role, 0)
    pid = int(process.rpartition(":")[2])
    os.kill(pid, signal.SIGSTOP)
    seen = None
    try:  # stopped until the run has trained on without it (or has ended: then the asserts say why)
        deadline = time.monotonic() + 120
        while thread.is_alive() and time.monotonic() < deadline:
            try:
                seen = status()
            except ray.exceptions.RayActorError:  # the run ended: its supervisor is gone
                break
            if min(seen.shard_steps) >= 40 and any(e["actor"] == name for e in seen.events):
                break
            time.sleep(0.1)
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:  # the supervisor killed it once its copies were elsewhere
            pass
    thread.join(timeout=300)
    result = box["result"]
    why = [(e["role"], e["index"], e["cause"], e["silent_s"]) for e in result.recoveries]
    assert [
        (e["role"], e["index"], e["actor"], e["cause"])
        for e in result.recoveries
        if e["role"] != "worker"
    ] == [(*replaced, name, "silent")], why
    # nothing here kills a worker: one is restarted only if it too went silent for 2 s (a loaded
    # machine; the recovery then covers it as well), never found dead
    assert all(e["cause"] == "silent" for e in result.recoveries if e["role"] == "worker"), why
    assert seen is not None and min(seen.shard_steps) >= 40, "it trained on while one was stopped"
    assert_invariants(result, num_servers, "", tmp_path, baseline)


def test_a_held_up_supervisor_judges_no_one_silent_for_its_own_pause(ray_local, tmp_path):
    """The supervisor's own process is stopped (SIGSTOP) for 6 s, longer than
    ``suspect_after_s`` (4 s), while a probe round waits for worker 0 (stopped for 1 s just
    before, so the round is open; it answers while the supervisor is stopped). When the supervisor
    runs again, the round's timeout that fell due meanwhile fires before that answer is handled:
    it is set again, the answer is heard, and nothing is replaced -- the run ends with the
    failure-free hash. With the round ended at once (``_put_off`` returning False) worker 0 was
    restarted as silent for ~6.5 s."""
    import signal
    import time

    import ray
    from ray._private.test_utils import wait_for_condition

    baseline = baseline_hash(2)
    thread, box, supervisor = _train_in_background(_config(2, suspect_after_s=4.0))

    def status():
        return ray.get(supervisor.status.remote(), timeout=30)

    wait_for_condition(
        lambda: status().state == "running" and min(status().shard_steps) >= 15,
        timeout=120,
        retry_interval_ms=50,
    )
    seen = status()
    worker = int(seen.targets.lookup("worker", 0)[1].rpartition(":")[2])
    pids = [worker, int(seen.process.rpartition(":")[2])]
    stopped = []
    try:  # the durations are the fault itself: what is checked comes after the run
        os.kill(worker, signal.SIGSTOP)
        stopped.append(worker)
        time.sleep(0.5)  # a probe round (every 0.2 s) now waits for worker 0
        os.kill(pids[1], signal.SIGSTOP)
        stopped.append(pids[1])
        time.sleep(0.5)
        os.kill(worker, signal.SIGCONT)  # it answers; the answer waits for the supervisor
        stopped.remove(worker)
        time.sleep(5.5)
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
    thread.join(timeout=300)
    result = box["result"]
    assert result.recoveries == [], [
        (e["role"], e["index"], e["cause"], e["silent_s"]) for e in result.recoveries
    ]
    assert_invariants(result, 2, "", tmp_path, baseline)


@pytest.mark.extended
def test_a_frozen_worker_process_is_killed_before_its_ranks_are_re_created(ray_local, tmp_path):
    """A suspected-but-alive worker process, for real: both ranks share one process and push as
    one (pre-aggregation); it is stopped (SIGSTOP) at step 15. The supervisor suspects it after
    ``suspect_after_s``, kills it first (alive, it could push on for both ranks past the step they
    would be re-created at) and re-creates its ranks once a call finds it dead: the run ends with
    the failure-free hash, every push applied once."""
    import dataclasses
    import signal
    import time

    import ray
    from ray._private.test_utils import wait_for_condition

    baseline = baseline_hash(2)
    cfg = _config(2, suspect_after_s=2.0)
    cfg = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, ranks_per_process=2))
    thread, box, supervisor = _train_in_background(cfg)

    def status():
        return ray.get(supervisor.status.remote(), timeout=30)

    wait_for_condition(
        lambda: min(status().shard_steps, default=0) >= 15, timeout=120, retry_interval_ms=50
    )
    name, process = status().targets.lookup("worker", 0)
    pid = int(process.rpartition(":")[2])
    os.kill(pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(
            e["role"] == "worker" for e in status().events
        ):
            time.sleep(0.1)
    finally:
        try:
            os.kill(pid, signal.SIGCONT)  # it should be dead by now: then there is nothing to wake
        except ProcessLookupError:
            pass
    thread.join(timeout=300)
    result = box["result"]
    assert sorted((e["role"], e["index"]) for e in result.recoveries) == [
        ("worker", 0),
        ("worker", 1),
    ], result.recoveries
    assert_invariants(result, 2, "", tmp_path, baseline)


@pytest.mark.soak
def test_soak_thirty_random_kills(ray_local, tmp_path):
    """>= 30 random kills across roles (one at a time, >= 1 s apart); the run completes and I1
    holds."""
    from raytrain_ft.recovery.faults import random_schedule

    kills = random_schedule(
        7,
        mtbf_s=1.8,
        duration_s=60,
        roles=["server", "replica", "worker", "supervisor"],
        sizes={"server": 2, "replica": 2, "worker": 2},
        min_gap_s=1.0,
    )
    assert len(kills) >= 30
    cfg = _config(
        2, kill=",".join(map(str, kills)), max_worker_restarts=100, one_kill_at_a_time=True
    )
    cfg.steps = 6000
    result = Trainer(cfg).fit()
    assert len(result.kills) == len(kills), "the run ended before every kill fired; raise steps"
    assert result.steps_completed == cfg.steps
    assert result.updates_acknowledged == result.updates_applied == 2 * cfg.steps
    assert result.replicas_match == [True, True]


def test_resume_after_losing_the_whole_cluster(ray_local, tmp_path, caplog):
    """Checkpoint files exist for this: a new run picks up at the newest complete step and ends the
    same."""
    checkpoints = tmp_path / "checkpoints"
    full = Trainer(
        _config(2, checkpoint_dir=str(checkpoints), checkpoint_interval=10, num_spares=0)
    ).fit()
    assert full.params_sha256 == baseline_hash(2)  # writing files changes nothing
    for path in checkpoints.iterdir():  # the cluster was lost after step 30
        if int(path.stem.split("-step-")[1]) > 30:
            path.unlink()
    with caplog.at_level(logging.INFO, logger="raytrain_ft.trainer"):
        resumed = Trainer(
            _config(
                2,
                checkpoint_dir=str(tmp_path / "after"),
                resume_from=str(checkpoints),
                num_spares=0,
            )
        ).fit()
    # the run says where it resumed
    assert (
        f"resuming from the checkpoints of step 30 in {checkpoints}: steps 31 to {STEPS} left"
        in (caplog.text)
    )
    assert resumed.params_sha256 == full.params_sha256
    assert (
        resumed.steps_completed == STEPS
        and resumed.updates_applied == resumed.updates_acknowledged == 2 * STEPS
    )
    assert (
        sum(w["samples"] for w in resumed.workers) == 2 * (STEPS - 30) * 16
    )  # only steps 30..59 were trained


def test_resume_from_a_directory_without_checkpoints_names_it(tmp_path):
    from raytrain_ft.errors import DataError

    with pytest.raises(DataError, match="no step has a checkpoint file for each of the 2 shards"):
        Trainer(_config(2, resume_from=str(tmp_path))).fit()


@pytest.mark.extended
def test_kill_a_process_hosting_two_simulated_ranks(ray_local):
    """ranks_per_process=2: SIGKILL of rank 1's process takes rank 0 with it; both restart, resume
    at the shards' step, and plain SGD still ends exactly where the failure-free run does."""
    from tests.integration.test_sync_training import assert_simulated_sgd

    cfg = TrainConfig(
        model=ModelConfig(name="cnn"),
        data=DataConfig(dataset="digits", image_size=8, batch_size=16),
        optim=OptimConfig(name="sgd", lr=0.5, momentum=0.0, weight_decay=0.0),
        cluster=ClusterConfig(
            num_workers=3, num_servers=2, simulate_compute_ms=20, ranks_per_process=2
        ),
        recovery=RecoveryConfig(snapshot_interval=10),
        chaos=ChaosConfig(kill="worker:1@step=10"),
        steps=30,
        seed=3,
    )
    result = Trainer(cfg).fit()
    assert [k["kill"] for k in result.kills] == ["worker:1@step=10"]
    assert sorted((e["role"], e["index"]) for e in result.recoveries) == [
        ("worker", 0),
        ("worker", 1),
    ]
    assert all(10 <= e["step"] < 30 for e in result.recoveries)
    assert result.updates_acknowledged == result.updates_applied == 2 * 30
    processes = [w["process"] for w in result.workers]
    assert processes[0] == processes[1] != processes[2]
    assert_simulated_sgd(cfg, result)


def _lossy_codec_config(kill=None, residual="replicated"):
    cfg = _config(2, kill=kill, num_spares=0)  # only a worker dies: no spare server needed
    cfg.consistency.codec, cfg.consistency.codec_residual = "topk:0.05", residual
    cfg.cluster.overlap_comm, cfg.cluster.push_thread = True, "true"
    return cfg


def test_a_lossy_codec_restarted_worker_resumes_with_its_residual(ray_local, tmp_path):
    """With --codec-residual replicated, error feedback survives a worker kill: the restarted rank
    gets its residual back from the shards, so a top-k run with a kill ends with the same hash as
    without (a reset residual would change the pushes). The pushes go from the push thread during
    backward, as on a GPU."""
    clean = Trainer(_lossy_codec_config()).fit()
    _lossy_codec_hashes["clean"] = clean.params_sha256
    killed = Trainer(_lossy_codec_config("worker:1@step=20")).fit()
    assert [k["kill"] for k in killed.kills] == ["worker:1@step=20"]
    assert [e["role"] for e in killed.recoveries] == ["worker"], killed.recoveries
    assert killed.params_sha256 == clean.params_sha256
    assert all(w["residual_bytes"] > 0 for w in killed.workers)


_lossy_codec_hashes: dict[str, str] = {}


@pytest.mark.extended
def test_a_lossy_codec_residual_kept_on_the_worker_changes_the_bits_of_a_killed_run(ray_local):
    """The default keeps the residual on the worker: the restarted rank starts from zero, so the
    run completes with other bits than the failure-free one (what replicating the residual buys;
    the check above can fail)."""
    clean = _lossy_codec_hashes.get("clean") or Trainer(_lossy_codec_config()).fit().params_sha256
    local = Trainer(_lossy_codec_config("worker:1@step=20", residual="local")).fit()
    assert [e["role"] for e in local.recoveries] == ["worker"], local.recoveries
    assert all(w["residual_bytes"] == 0 for w in local.workers)
    assert local.params_sha256 != clean
