"""Command log and replay: pure, deterministic, idempotent per seq."""

import numpy as np
import pytest
import torch

from raytrain_ft.config import OptimConfig
from raytrain_ft.optim import hyper_params
from raytrain_ft.params import shard_ranges
from raytrain_ft.recovery.command_log import Command, CommandLog, LogGapError, Snapshot
from raytrain_ft.recovery.replay import replay
from raytrain_ft.shard import ShardState

SIZE, STEPS = 50, 12


def _commands(optim, shard, start=0, n=STEPS, seed=0):
    rng = np.random.default_rng(seed)
    return [
        Command(s, rng.standard_normal(shard.size).astype(np.float32), hyper_params(s, optim, 100))
        for s in range(start, start + n)
    ]


def _snapshot_of(state: ShardState) -> Snapshot:
    return Snapshot(state.seq, state.params_copy(), state.optimizer.state_dict())


@pytest.mark.parametrize(
    "optim",
    [
        OptimConfig(name="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4),
        OptimConfig(name="adam", lr=0.01, weight_decay=0.01),
        OptimConfig(name="rmsprop", lr=0.01, momentum=0.5),
        OptimConfig(name="adagrad", lr=0.1),
        OptimConfig(name="sgd", lr=0.1, schedule="cosine", warmup_steps=3),
    ],
)
def test_replay_from_any_snapshot_equals_the_primary_bitwise(optim):
    shard = shard_ranges(SIZE, 1, num_params=40)[0]  # 40 parameters + 10 buffer values
    primary = ShardState(shard, optim, 100)
    primary.load(np.linspace(-1, 1, SIZE, dtype=np.float32))
    start = _snapshot_of(primary)
    commands = _commands(optim, shard)
    snapshots = [start]
    for c in commands:
        primary.apply(c.update, c.hp)
        snapshots.append(_snapshot_of(primary))
    for cut in (0, 5, STEPS):
        result = replay(snapshots[cut], commands[cut:], shard, optim, 100)
        assert result.replayed == STEPS - cut and result.state.seq == STEPS
        assert torch.equal(result.state.params, primary.params)
        for key, value in primary.optimizer.state.items():
            assert torch.equal(result.state.optimizer.state[key], value)


def test_replaying_entries_twice_changes_nothing():
    optim = OptimConfig(name="sgd", lr=0.1, momentum=0.9)
    shard = shard_ranges(SIZE, 1)[0]
    state = ShardState(shard, optim, 100)
    commands = _commands(optim, shard)
    once = replay(_snapshot_of(state), commands, shard, optim, 100)
    twice = replay(_snapshot_of(state), commands + commands, shard, optim, 100)
    assert once.replayed == twice.replayed == STEPS
    assert torch.equal(once.state.params, twice.state.params)


def test_replay_refuses_a_gap_and_keeps_the_values_before_the_last_update():
    optim = OptimConfig(name="sgd", lr=0.1)
    shard = shard_ranges(SIZE, 1)[0]
    state = ShardState(shard, optim, 100)
    commands = _commands(optim, shard)
    with pytest.raises(LogGapError, match="expected seq 3"):
        replay(_snapshot_of(state), commands[:3] + commands[4:], shard, optim, 100)
    result = replay(_snapshot_of(state), commands[:3], shard, optim, 100)
    two = replay(_snapshot_of(state), commands[:2], shard, optim, 100)
    assert np.array_equal(result.previous_params, two.state.params_copy())


def test_log_appends_in_order_ignores_duplicates_and_refuses_gaps():
    optim = OptimConfig()
    shard = shard_ranges(SIZE, 1)[0]
    log = CommandLog.from_snapshot(
        Snapshot(0, np.zeros(SIZE, np.float32), {"step_count": 0, "state": {}})
    )
    commands = _commands(optim, shard, n=4)
    assert log.append(commands[0]) and log.append(commands[1])
    assert not log.append(commands[0]) and log.duplicates == 1
    with pytest.raises(LogGapError, match="seq 3 arrived, the log expects 2"):
        log.append(commands[3])
    assert log.next_seq == 2


def test_log_copies_what_it_is_given():
    optim = OptimConfig()
    update = np.ones(SIZE, np.float32)
    log = CommandLog.from_snapshot(
        Snapshot(0, np.zeros(SIZE, np.float32), {"step_count": 0, "state": {}})
    )
    log.append(Command(0, update, hyper_params(0, optim, 10)))
    update[:] = 7.0  # the sender's memory may be reused or die with its process
    assert np.all(log.entries[0].update == 1.0)


def test_snapshot_truncates_the_log_and_stale_snapshots_are_ignored():
    optim = OptimConfig()
    shard = shard_ranges(SIZE, 1)[0]
    log = CommandLog.from_snapshot(
        Snapshot(0, np.zeros(SIZE, np.float32), {"step_count": 0, "state": {}})
    )
    for c in _commands(optim, shard, n=5):
        log.append(c)
    assert (
        log.install_snapshot(Snapshot(3, np.ones(SIZE, np.float32), {"step_count": 3, "state": {}}))
        == 3
    )
    assert [c.seq for c in log.entries] == [3, 4] and log.next_seq == 5
    assert (
        log.install_snapshot(
            Snapshot(1, np.zeros(SIZE, np.float32), {"step_count": 1, "state": {}})
        )
        == 0
    )
    assert log.snapshot.seq == 3
    with pytest.raises(LogGapError, match="ahead of the log"):
        log.install_snapshot(
            Snapshot(9, np.zeros(SIZE, np.float32), {"step_count": 9, "state": {}})
        )


@pytest.mark.parametrize("fold_every", [1, 3])
def test_catch_up_folds_the_log_into_the_same_state_replay_gives(fold_every):
    optim = OptimConfig(name="adam", lr=0.01)
    shard = shard_ranges(SIZE, 1, num_params=40)[0]
    start = _snapshot_of(ShardState(shard, optim, 100))
    commands = _commands(optim, shard)
    log = CommandLog.from_snapshot(start)
    for i, c in enumerate(commands):
        log.append(c)
        if (i + 1) % fold_every == 0:
            log.catch_up(shard, optim, 100)
    assert log.next_seq == STEPS and log.folded + len(log.entries) == STEPS
    folded = replay(log.snapshot, log.entries, shard, optim, 100)
    full = replay(start, commands, shard, optim, 100)
    assert torch.equal(folded.state.params, full.state.params)
    assert np.array_equal(folded.previous_params, full.previous_params)
    for key, value in full.state.optimizer.state.items():
        assert torch.equal(folded.state.optimizer.state[key], value)
    # a snapshot from the primary replaces the folded state
    log.install_snapshot(_snapshot_of(full.state))
    assert log.entries == [] and log.snapshot.seq == STEPS


@pytest.mark.parametrize("fold", [False, True])
def test_per_rank_clocks_survive_the_log_snapshot_fold_and_replay(fold):
    """Async modes: commands carry their (rank, step) pushes; snapshot, fold and replay rebuild the
    clocks."""
    optim = OptimConfig(name="sgd", lr=0.1, momentum=0.9)
    shard = shard_ranges(SIZE, 1)[0]
    primary = ShardState(shard, optim, 100)
    primary.load(np.zeros(SIZE, dtype=np.float32), clocks={0: 4})
    log = CommandLog.from_snapshot(
        Snapshot(
            primary.seq,
            primary.params_copy(),
            primary.optimizer.state_dict(),
            clocks=dict(primary.clocks),
        )
    )
    arrivals = [(1, 0), (0, 4), (1, 1), (2, 0), (0, 5)]
    for seq, (rank, step) in enumerate(arrivals):
        c = Command(
            seq,
            np.full(SIZE, seq + 1.0, np.float32),
            hyper_params(step, optim, 100),
            ((rank, step),),
        )
        primary.apply(c.update, c.hp, c.pushes)
        log.append(c)
        if fold:
            log.catch_up(shard, optim, 100)
    rebuilt = replay(log.snapshot, log.entries, shard, optim, 100)
    assert rebuilt.state.clocks == primary.clocks == {0: 6, 1: 2, 2: 1}
    assert torch.equal(rebuilt.state.params, primary.params)
    # the applied record (what the independent exactly-once check reads) is rebuilt the same way
    assert rebuilt.state.applied_copy() == primary.applied_copy()
    assert (
        rebuilt.state.was_applied(0, 5)
        and rebuilt.state.was_applied(2, 0)
        and not rebuilt.state.was_applied(0, 3)
    )
