"""The ParameterServer class driven in-process with asyncio (no Ray runtime): parking, rank order,
idempotence, logging before acknowledging, snapshots, rebuilding from a replica."""

import asyncio

import numpy as np
import pytest

from raytrain_ft.actors.server import ParameterServer
from raytrain_ft.config import OptimConfig
from raytrain_ft.errors import TrainingError
from raytrain_ft.params import shard_ranges
from tests.unit.fakes import InProcessHandle

SGD = OptimConfig(name="sgd", lr=1.0, momentum=0.0)
MOMENTUM = OptimConfig(name="sgd", lr=0.1, momentum=0.9)


def _pair(num_workers=2, optim=SGD, snapshot_interval=50, size=4, fold=False):
    """A primary (slot 0) and its dedicated replica holder (slot 1), wired in-process; ``fold``: the holder
    applies logged commands after acknowledging them."""
    shard = shard_ranges(size, 1)[0]
    primary = ParameterServer(0, shard, optim, total_steps=100, num_workers=num_workers, snapshot_interval=snapshot_interval)
    holder = ParameterServer(1, None, optim, total_steps=100, num_workers=num_workers, fold_replicas=fold)
    holder_handle = InProcessHandle(holder)

    async def setup():
        await primary.load(np.zeros(size, dtype=np.float32))
        await primary.set_replica(holder_handle)

    asyncio.run(setup())
    return primary, holder, holder_handle


def test_calls_park_until_all_ranks_pushed_then_all_get_the_same_update():
    s, holder, _ = _pair()

    async def scenario():
        first = asyncio.create_task(s.push_pull(1, 0, np.full(4, 4.0, np.float32)))
        await asyncio.sleep(0)  # let rank 1 park
        assert not first.done() and (await s.stats()).updates_applied == 0
        second = await s.push_pull(0, 0, np.full(4, 2.0, np.float32))
        return await first, second

    a, b = asyncio.run(scenario())
    assert np.array_equal(a, b) and np.array_equal(a, np.full(4, -3.0, np.float32))  # 0 - 1.0 * mean(2, 4)
    st = asyncio.run(s.stats())
    assert st.step == 1 and st.updates_applied == 1


def test_the_holder_has_logged_an_update_before_any_worker_sees_it():
    s, holder, _ = _pair(num_workers=1)
    asyncio.run(s.push_pull(0, 0, np.ones(4, np.float32)))
    log = holder.replicas[0]
    assert log.next_seq == 1 and log.entries[0].seq == 0
    assert np.array_equal(log.entries[0].update, np.ones(4, np.float32))


def test_repeated_push_is_answered_not_applied_twice():
    s, holder, _ = _pair(num_workers=1)
    first = asyncio.run(s.push_pull(0, 0, np.ones(4, np.float32)))
    again = asyncio.run(s.push_pull(0, 0, np.ones(4, np.float32)))
    assert np.array_equal(first, again)
    st = asyncio.run(s.stats())
    assert st.updates_applied == 1 and st.duplicate_pushes == 1 and holder.replicas[0].next_seq == 1


def test_push_ahead_of_the_shard_is_refused():
    s, _, _ = _pair(num_workers=1)
    with pytest.raises(TrainingError, match="ahead of the shard"):
        asyncio.run(s.push_pull(0, 3, np.ones(4, np.float32)))


def test_pull_before_load_names_the_problem():
    s = ParameterServer(0, shard_ranges(4, 1)[0], OptimConfig(), total_steps=1, num_workers=1)
    with pytest.raises(TrainingError, match="never loaded"):
        asyncio.run(s.pull())


def test_pull_serves_the_current_and_the_previous_step_only():
    s, _, _ = _pair(num_workers=1)
    before = asyncio.run(s.pull(0)).copy()
    after = asyncio.run(s.push_pull(0, 0, np.ones(4, np.float32)))
    assert np.array_equal(asyncio.run(s.pull(0)), before) and np.array_equal(asyncio.run(s.pull(1)), after)
    asyncio.run(s.push_pull(0, 1, np.ones(4, np.float32)))
    with pytest.raises(TrainingError, match="cannot serve parameters of step 0"):
        asyncio.run(s.pull(0))


def test_snapshots_truncate_the_log():
    s, holder, _ = _pair(num_workers=1, snapshot_interval=3)
    for step in range(7):
        asyncio.run(s.push_pull(0, step, np.ones(4, np.float32)))
    log = holder.replicas[0]
    assert log.snapshot.seq == 6 and [c.seq for c in log.entries] == [6]


def _train(s, steps, start=0):
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal(4).astype(np.float32) for _ in range(start + steps)]
    for step in range(start, start + steps):
        asyncio.run(s.push_pull(0, step, grads[step]))
    return grads


@pytest.mark.parametrize("fold", [False, True])
def test_a_spare_rebuilt_from_the_replica_equals_the_lost_primary_bitwise(fold):
    s, holder, holder_handle = _pair(num_workers=1, optim=MOMENTUM, snapshot_interval=4, fold=fold)
    _train(s, 10)
    spare = ParameterServer(None, None, MOMENTUM, total_steps=100, num_workers=1)
    stats = asyncio.run(spare.recover_primary(0, s.state.shard, holder_handle, epoch=1))
    # unfolded: snapshot at 8 + commands 8 and 9; folded: the holder already applied them
    assert stats.replayed == (0 if fold else 2) and stats.step == 10
    assert np.array_equal(asyncio.run(spare.pull()), asyncio.run(s.pull()))
    assert np.array_equal(asyncio.run(spare.pull(9)), asyncio.run(s.pull(9)))
    for key, value in s.state.optimizer.state.items():
        assert np.array_equal(spare.state.optimizer.state[key].numpy(), value.numpy())
    # the rebuilt primary keeps logging to the same holder and training continues identically
    grad = np.full(4, 0.5, np.float32)
    assert np.array_equal(asyncio.run(spare.push_pull(0, 10, grad)), asyncio.run(s.push_pull(0, 10, grad)))


def test_a_retried_push_after_rebuild_is_answered_not_applied_again():
    s, holder, holder_handle = _pair(num_workers=1)
    _train(s, 3)
    spare = ParameterServer(None, None, SGD, total_steps=100, num_workers=1)
    asyncio.run(spare.recover_primary(0, s.state.shard, holder_handle, epoch=1))
    again = asyncio.run(spare.push_pull(0, 2, np.ones(4, np.float32)))  # step 2 was logged before the primary died
    assert np.array_equal(again, asyncio.run(s.pull())) and spare.duplicate_pushes == 1


def test_when_the_holder_dies_the_update_waits_for_a_new_holder_then_is_acknowledged():
    s, holder, holder_handle = _pair(num_workers=1)

    async def scenario():
        holder_handle.dead = True
        push = asyncio.create_task(s.push_pull(0, 0, np.ones(4, np.float32)))
        for _ in range(5):
            await asyncio.sleep(0)
        assert not push.done()  # not acknowledged without a replica
        new_holder = ParameterServer(1, None, SGD, total_steps=100, num_workers=1)
        await s.set_replica(InProcessHandle(new_holder))
        reply = await push
        return new_holder, reply

    new_holder, reply = asyncio.run(scenario())
    log = new_holder.replicas[0]
    assert log.next_seq == 1 and np.array_equal(log.snapshot.params, reply)
