"""Consistency modes and codecs on a real (small) Ray with 4 workers on digits."""

import dataclasses
import os

import pytest

from raytrain_ft.actors.worker import LEDGER_DIR_ENV_VAR
from raytrain_ft.compression import parse_codec
from raytrain_ft.config import (
    ChaosConfig,
    ClusterConfig,
    ConsistencyConfig,
    DataConfig,
    ModelConfig,
    OptimConfig,
    RecoveryConfig,
    TrainConfig,
)
from raytrain_ft.params import shard_ranges
from raytrain_ft.recovery.faults import parse_kills
from raytrain_ft.recovery.ledger import assert_exactly_once, read_ledgers
from raytrain_ft.trainer import Trainer

pytestmark = pytest.mark.integration

WORKERS, SERVERS = 4, 2


def _config(mode="sync", epochs=5, consistency=None, chaos=None, optim=None):
    return TrainConfig(
        model=ModelConfig(name="cnn"),
        data=DataConfig(dataset="digits", batch_size=32),
        optim=optim or OptimConfig(name="sgd", lr=0.05, momentum=0.9),
        cluster=ClusterConfig(num_workers=WORKERS, num_servers=SERVERS),
        consistency=consistency or ConsistencyConfig(),
        recovery=RecoveryConfig(num_spares=0),  # a replacement is started when a server dies
        chaos=chaos or ChaosConfig(),
        mode=mode,
        epochs=epochs,
        seed=0,
    )


# Downpour with n_push = n_fetch = 2 doubles the staleness; with the shard's one momentum buffer at
# 0.9 it was unstable (0.69-0.83 measured), at 0.5 it trains (0.905-0.939 over 3 runs of 10 epochs).
# The other asynchronous modes run at the defaults (per-stream momentum with look-ahead pulls).
LOW_MOMENTUM = OptimConfig(name="sgd", lr=0.05, momentum=0.5)
# --clip-grad-norm in the runs with kills: async clips each push on its worker, mixed each group's
# averaged gradient (a second round with the shards, through primary and worker kills)
CLIPPED = OptimConfig(name="sgd", lr=0.05, momentum=0.9, clip_grad_norm=1.0)


@pytest.mark.parametrize(
    "mode, epochs, consistency, optim, updates_per_round, kills",
    [
        pytest.param("sync", 3, ConsistencyConfig(), None, 1, None, marks=pytest.mark.extended),
        (
            "async",
            5,
            ConsistencyConfig(),
            CLIPPED,
            WORKERS,
            "server:0@step=15,worker:2@step=30",
        ),
        pytest.param(
            "async",
            8,
            ConsistencyConfig(n_push=2, n_fetch=2),
            LOW_MOMENTUM,
            WORKERS,
            None,
            marks=pytest.mark.extended,
        ),
        (
            "ssp",
            5,
            ConsistencyConfig(staleness=2),
            None,
            WORKERS,
            "replica:1@step=10,server:1@step=25,worker:0@step=35",
        ),
        (
            "mixed",
            5,
            ConsistencyConfig(group_size=2),
            CLIPPED,
            WORKERS // 2,
            "server:1@step=15,worker:3@step=30",
        ),
    ],
    ids=["sync", "async", "downpour-n2", "ssp2", "mixed2"],
)
def test_each_mode_trains_digits_with_4_workers(
    ray_local, mode, epochs, consistency, optim, updates_per_round, kills
):
    """Each mode learns; with primaries, a replica holder and workers killed mid-run (no spare: the
    supervisor starts each replacement) every push is applied exactly once, from the workers'
    ledgers, and the replicas match their primaries at the end."""
    result = Trainer(_config(mode, epochs, consistency, ChaosConfig(kill=kills), optim)).fit()
    # asynchronous runs are not repeatable (arrival order); at the defaults async, ssp and mixed
    # ended at 0.94-0.975 over seeds 0-2 without kills (the shard's one momentum buffer: 0.55-0.94;
    # README, consistency study); Downpour n2 at momentum 0.5 spreads more: 0.75 still fails a
    # mode that does not learn (chance is 0.1)
    floor = 0.75 if consistency.n_push > 1 else 0.85 if mode == "sync" else 0.9
    assert result.eval_accuracy >= floor, result.eval_accuracy
    # every push applied exactly once, in its update (Downpour pushes every n_push steps and at the
    # last)
    rounds = len(
        [
            t
            for t in range(result.total_steps)
            if (t + 1) % consistency.n_push == 0 or t == result.total_steps - 1
        ]
    )
    assert result.updates_applied == SERVERS * updates_per_round * rounds
    if kills:
        fired = sorted(k["kill"] for k in result.kills)
        assert fired == sorted(str(k) for k in parse_kills(kills)), "each fault fires exactly once"
        roles = sorted(k.role if k.role != "replica" else "server" for k in parse_kills(kills))
        assert sorted(e["role"] for e in result.recoveries) == roles, result.recoveries
        assert all(
            e["source"] == "replica" and e["rereplicated"]
            for e in result.recoveries
            if e["role"] == "server"
        )
        assert_exactly_once(
            result.applied_counts,
            read_ledgers(os.environ[LEDGER_DIR_ENV_VAR], result.run_id),
            WORKERS,
            result.total_steps,
        )
        assert 0 < result.updates_acknowledged <= result.updates_applied
    # the histogram is replicated with the shard (each command carries its update's staleness):
    # a killed primary's share is replayed into its successor's, so every update is counted once
    assert sum(result.staleness_histogram.values()) == result.updates_applied
    if mode == "sync":
        assert set(result.staleness_histogram) == {0}
    else:
        assert max(result.staleness_histogram) > 0  # asynchrony shows up as staleness
    if mode == "ssp":
        assert all(s["clock_lead_max"] <= consistency.staleness for s in result.servers)
    assert all(s["checkpoint_files_read"] == 0 for s in result.servers)
    assert (
        result.replicas_match == [True] * SERVERS
    )  # each replica, replayed in the primary's order, equals it
    assert all(
        w["wait_s"] >= 0 and w["bytes_pushed"] > 0 and w["bytes_pulled"] > 0 for w in result.workers
    )
    clipped = [w["clipped_updates"] for w in result.workers]
    if optim is CLIPPED:
        # every worker clipped some pushes; not all of them (clipping follows each push's norm:
        # which ones exceed it depends on arrival order, one worker may clip every push)
        assert all(0 < c <= result.total_steps for c in clipped), clipped
        assert sum(clipped) < WORKERS * result.total_steps, clipped
    else:
        assert clipped == [0] * WORKERS


def test_overlap_changes_no_value_where_the_worker_clips_its_own_gradient(ray_local):
    """Async with --clip-grad-norm clips on the worker, so pushes wait for the whole gradient (no
    backward hooks); with overlap, forward still installs each shard's answer as its first layer
    runs. One worker (deterministic): overlap on and off give the same bits, every step clipped."""
    results = []
    for overlap in (False, True):
        cfg = dataclasses.replace(
            _config("async", optim=dataclasses.replace(CLIPPED, clip_grad_norm=0.3)),
            cluster=ClusterConfig(
                num_workers=1,
                num_servers=SERVERS,
                overlap_comm=overlap,
                push_thread="true" if overlap else "auto",
            ),
            data=DataConfig(dataset="digits", image_size=8, batch_size=32),
            steps=20,
        )
        results.append(Trainer(cfg).fit())
    assert [r.workers[0]["clipped_updates"] for r in results] == [20, 20]
    assert results[1].params_sha256 == results[0].params_sha256


def test_ssp_never_lets_a_worker_run_more_than_s_steps_ahead(ray_local, staleness=1):
    # a straggler makes the bound bite: the others run ahead until the shards hold them
    cfg = _config(
        "ssp", 1, ConsistencyConfig(staleness=staleness), ChaosConfig(slow_workers="3:30")
    )
    result = Trainer(cfg).fit()
    for trace in result.clock_traces:
        assert len(trace) >= WORKERS * result.total_steps  # every release was recorded
        leads = [clock - slowest for _, clock, slowest in trace]
        assert max(leads) == staleness, (staleness, max(leads))
        assert min(leads) >= 0
    assert all(s["clock_lead_max"] == staleness for s in result.servers)


def test_backup_worker_keeps_a_straggler_from_holding_the_step(ray_local):
    cfg = _config("sync", 5, ConsistencyConfig(backup_workers=1), ChaosConfig(slow_workers="3:150"))
    result = Trainer(cfg).fit()
    assert (
        result.steps_completed == result.total_steps
        and result.updates_applied == SERVERS * result.total_steps
    )
    assert result.workers[3]["skipped_steps"] > 0 and all(
        s["late_pushes"] > 0 for s in result.servers
    )
    assert result.eval_accuracy >= 0.85  # which pushes make each step varies: 0.889-0.942 measured


def _expected_push_bytes(spec: str, total: int, num_params: int) -> int:
    codec = parse_codec(spec)
    return sum(
        codec.expected_bytes(r.param_slice.stop) + 4 * (r.size - r.param_slice.stop)
        for r in shard_ranges(total, SERVERS, num_params)
    )


def test_a_codec_compresses_pushes_as_expected_and_error_feedback_keeps_accuracy(ray_local):
    """Top-k (1%) end to end: the bytes on the wire are exactly the codec's (the other codecs' sizes
    are unit-tested on the same formula), and error feedback keeps the accuracy of a dense run."""
    optim = OptimConfig(name="sgd", lr=0.1, momentum=0.5)
    r = Trainer(_config("sync", 5, ConsistencyConfig(codec="topk:0.01"), optim=optim)).fit()
    pushes = WORKERS * r.total_steps
    total = len(r.final_params)
    assert r.bytes_pushed == pushes * _expected_push_bytes("topk:0.01", total, r.num_params)
    assert r.bytes_pushed / (pushes * _expected_push_bytes("none", total, r.num_params)) < 0.03
    assert r.eval_accuracy >= 0.85, r.eval_accuracy
    # the residual stayed on the workers (--codec-residual local, the default): nothing else sent
    assert all(w["residual_bytes"] == 0 for w in r.workers)


@pytest.mark.extended
def test_at_the_defaults_every_asynchronous_mode_ends_within_2_points_of_sync(ray_local):
    """The defaults' promise (digits CNN, 4 workers x 2 shards, 5 epochs, SGD lr 0.05 momentum 0.9):
    async, ssp (S=2) and mixed (G=2) end within 2 points of sync's eval accuracy, mean of 3 seeds.
    With the shard's one momentum buffer they ended 7-16 points short (README)."""
    means = {}
    for mode, consistency in [
        ("sync", ConsistencyConfig()),
        ("async", ConsistencyConfig()),
        ("ssp", ConsistencyConfig(staleness=2)),
        ("mixed", ConsistencyConfig(group_size=2)),
    ]:
        accuracies = [
            Trainer(dataclasses.replace(_config(mode, 5, consistency), seed=seed))
            .fit()
            .eval_accuracy
            for seed in (0, 1, 2)
        ]
        means[mode] = sum(accuracies) / len(accuracies)
    assert all(means[m] >= means["sync"] - 0.02 for m in ("async", "ssp", "mixed")), means
