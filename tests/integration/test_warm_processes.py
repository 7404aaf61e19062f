"""Warm processes (``actors/warm.py``): the servers and workers of a run that ended well serve the
next run of the same driver; no call of the last run reaches them; unclaimed ones end."""

import time

import pytest

from raytrain_ft.actors import NAMESPACE
from raytrain_ft.config import (
    ChaosConfig,
    ClusterConfig,
    DataConfig,
    ModelConfig,
    OptimConfig,
    RecoveryConfig,
    TrainConfig,
)
from raytrain_ft.errors import TrainingError
from raytrain_ft.trainer import Trainer

pytestmark = pytest.mark.integration


def _config(keep_warm_s=30.0, kill=None, mode="replica"):
    return TrainConfig(
        model=ModelConfig(name="cnn"),
        data=DataConfig(dataset="digits", image_size=8, batch_size=16),
        optim=OptimConfig(name="sgd", lr=0.05, momentum=0.9),
        cluster=ClusterConfig(num_workers=2, num_servers=2, keep_warm_s=keep_warm_s),
        recovery=RecoveryConfig(mode=mode, num_spares=1 if mode == "replica" else 0),
        chaos=ChaosConfig(kill=kill),
        steps=12,
        seed=5,
    )


def _resting() -> set[str]:
    """Ray names of the processes resting in this driver's pool (read from the pool itself)."""
    import ray
    from ray.experimental import internal_kv

    from raytrain_ft.actors.warm import POOL_PREFIX

    job = ray.get_runtime_context().get_job_id()
    prefix = f"{POOL_PREFIX}{job}/"  # then KIND/NODE/RAY_NAME
    return {
        k.decode()[len(prefix) :].split("/", 2)[2] for k in internal_kv._internal_kv_list(prefix)
    }


def _named_actors() -> set[str]:
    import ray

    return {
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == NAMESPACE
    }


def _wait_until(condition, timeout_s=30.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_the_next_run_takes_the_last_runs_server_processes_and_no_late_call_reaches_them(
    ray_local,
):
    import ray

    from raytrain_ft import end_warm_processes
    from raytrain_ft.actors.transport import Addressed, failure_of
    from raytrain_ft.actors.warm import Gone, prune_stale, worker_kind
    from raytrain_ft.protocol.messages import Failure

    end_warm_processes()  # what earlier tests left
    first = Trainer(_config()).fit()
    kept = _resting()
    # two primaries (each holding the other's replica), the spare and the two workers
    assert len(kept) == 5 and sum("/worker" in n for n in kept) == 2
    _wait_until(lambda: _named_actors() == kept)  # the supervisor ended, the rest rest
    second = Trainer(_config()).fit()
    assert second.params_sha256 == first.params_sha256  # a reused process changes no bit
    assert _resting() == kept  # the same five processes rest again
    _wait_until(lambda: _named_actors() == kept)  # and no process was started

    # the second run's names are gone with it: a call to one (or to the process's first name, by
    # its Ray handle) raises Gone, which a caller reads as a dead actor
    server = ray.get_actor(min(n for n in kept if "/server-" in n), namespace=NAMESPACE)
    worker = ray.get_actor(min(n for n in kept if "/worker" in n), namespace=NAMESPACE)
    for call in (
        server.ready.remote(),
        Addressed(server, f"{second.run_id}/server-1").ready.remote(),
        worker.poll_status.remote(),
        Addressed(worker, f"{second.run_id}/worker0--1").poll_status.remote(),
    ):
        with pytest.raises(Exception) as raised:
            ray.get(call)
        assert isinstance(raised.value, Gone) or isinstance(raised.value.cause, Gone)
        assert failure_of(raised.value) is Failure.DEAD
    # a run whose workers need 2 CPUs each ends the resting 1-CPU workers first (they would hold
    # CPUs it needs); servers reserve none and stay
    assert prune_stale(worker_kind(2, 0)) == 2
    assert _resting() == {n for n in kept if "/server-" in n}
    assert end_warm_processes() == 3
    _wait_until(lambda: not _named_actors())


def test_kills_and_failures_keep_nothing_dead_and_an_unclaimed_process_ends(ray_local):
    from raytrain_ft import end_warm_processes

    end_warm_processes()
    with pytest.raises(TrainingError):  # no copies: a server's death fails the run
        Trainer(_config(kill="server:0@step=4", mode="none")).fit()
    assert _resting() == set()  # a run that failed keeps nothing
    _wait_until(lambda: not _named_actors())

    killed = Trainer(_config(kill="server:1@step=4")).fit()
    assert [e["role"] for e in killed.recoveries] == ["server"], killed.recoveries
    kept = _resting()
    run = killed.run_id
    # slot 1's primary (server-2) killed, the spare (server-3) took its place, and a new spare was
    # made
    assert [k["target"] for k in killed.kills] == [f"{run}/server-2"]
    assert killed.recoveries[0]["actor"] == f"{run}/server-2"  # the lost one
    kept_servers = {n for n in kept if "/server-" in n}
    assert {f"{run}/server-1", f"{run}/server-3"} <= kept_servers, kept  # both primaries
    # the spare made after the kill is kept unless it was still starting when the run's release
    # gave up on it (10 s after the end, a slow machine); the killed one never is
    extra = kept_servers - {f"{run}/server-1", f"{run}/server-3"}
    assert len(extra) <= 1 and f"{run}/server-2" not in extra, kept
    assert len(kept - kept_servers) == 2  # both workers
    _wait_until(lambda: _named_actors() == kept)
    # the next run takes them; kept 1 s after it and unclaimed, they end themselves (well before
    # the 30 s they were kept for: so that run took them)
    Trainer(_config(keep_warm_s=1.0)).fit()
    _wait_until(lambda: not _named_actors() and not _resting(), timeout_s=10)


def test_a_process_that_loaded_code_edited_since_is_not_taken(ray_local):
    """A notebook edits the user's model module between two runs: the servers kept warm built the
    old model (their new run's workers would build the new one), so the next run does not take
    them."""
    import os

    from examples import diabetes
    from raytrain_ft import end_warm_processes
    from raytrain_ft.actors.warm import prune_stale, worker_kind

    end_warm_processes()
    train, held_out = diabetes.data()
    cfg = TrainConfig(
        cluster=ClusterConfig(num_workers=1, num_servers=1),
        data=DataConfig(batch_size=16),
        optim=OptimConfig(lr=0.02),
        recovery=RecoveryConfig(num_spares=0),
        steps=4,
        seed=1,
    )
    Trainer(cfg, model=diabetes.model, loss="mse", train_data=train, eval_data=held_out).fit()
    kept = _resting()
    assert len(kept) == 3  # the shard's primary, the dedicated holder of its replica, the worker
    kind = worker_kind(1, 0)
    assert prune_stale(kind) == 0 and _resting() == kept  # nothing changed: they stay
    stat = os.stat(diabetes.__file__)
    os.utime(diabetes.__file__, (stat.st_atime, time.time() + 1))  # "edited"
    try:
        # the primary and the worker built the model from that module; the holder never loaded it
        # (it installed the primary's snapshot) and would import the edited file if it had to
        assert prune_stale(kind) == 2 and len(_resting()) == 1
    finally:
        os.utime(diabetes.__file__, (stat.st_atime, stat.st_mtime))
    assert end_warm_processes() == 1
    _wait_until(lambda: not _named_actors())
