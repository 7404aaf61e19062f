"""The ParameterServer class driven in-process with asyncio (no Ray runtime): parking, rank order,
idempotence, logging before acknowledging, snapshots, rebuilding from a replica."""

import asyncio

import numpy as np
import pytest

from raytrain_ft.actors.server import ParameterServer
from raytrain_ft.compression import ErrorFeedback, TopK
from raytrain_ft.config import OptimConfig
from raytrain_ft.consistency import Rule
from raytrain_ft.recovery.replay import replay
from raytrain_ft.errors import TrainingError
from raytrain_ft.params import shard_ranges
from tests.unit.fakes import InProcessHandle

SGD = OptimConfig(name="sgd", lr=1.0, momentum=0.0)
MOMENTUM = OptimConfig(name="sgd", lr=0.1, momentum=0.9)


def _pair(num_workers=2, optim=SGD, snapshot_interval=50, size=4, fold=False, rule=None):
    """A primary (slot 0) and its dedicated replica holder (slot 1), wired in-process; ``fold``: the holder
    applies logged commands after acknowledging them."""
    shard = shard_ranges(size, 1)[0]
    primary = ParameterServer(0, shard, optim, total_steps=100, num_workers=num_workers, snapshot_interval=snapshot_interval, rule=rule)
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

    (a, seq_a, acked_a), (b, seq_b, acked_b) = asyncio.run(scenario())
    assert np.array_equal(a, b) and np.array_equal(a, np.full(4, -3.0, np.float32))  # 0 - 1.0 * mean(2, 4)
    assert seq_a == seq_b == 1 and acked_a == acked_b == 1
    st = asyncio.run(s.stats())
    assert st.step == 1 and st.updates_applied == 1


def test_a_push_in_parts_is_the_same_push():
    whole, _, _ = _pair(num_workers=2, size=10)
    parts, _, _ = _pair(num_workers=2, size=10)
    g0, g1 = np.arange(10, dtype=np.float32), np.linspace(-1, 1, 10, dtype=np.float32)

    async def scenario(s, split):
        first = asyncio.create_task(s.push_pull_parts(1, 0, None, True, *np.array_split(g1, 3)) if split else s.push_pull(1, 0, g1))
        await asyncio.sleep(0)
        second = await (s.push_pull_parts(0, 0, None, True, *np.array_split(g0, 4)) if split else s.push_pull(0, 0, g0))
        return await first, second

    (a, seq_a, acked_a), (b, _, _) = asyncio.run(scenario(whole, False))
    (c, seq_c, acked_c), (d, _, _) = asyncio.run(scenario(parts, True))
    assert np.array_equal(a, c) and np.array_equal(b, d) and (seq_a, acked_a) == (seq_c, acked_c) == (1, 1)
    assert np.array_equal(c, -(g0 + g1) / 2)


def test_the_holder_has_logged_an_update_before_any_worker_sees_it():
    s, holder, _ = _pair(num_workers=1)
    asyncio.run(s.push_pull(0, 0, np.ones(4, np.float32)))
    log = holder.replicas[0]
    assert log.next_seq == 1 and log.entries[0].seq == 0
    assert np.array_equal(log.entries[0].update, np.ones(4, np.float32))


def test_repeated_push_is_answered_not_applied_twice():
    s, holder, _ = _pair(num_workers=1)
    first, _, _ = asyncio.run(s.push_pull(0, 0, np.ones(4, np.float32)))
    again, _, _ = asyncio.run(s.push_pull(0, 0, np.ones(4, np.float32)))
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
    before = asyncio.run(s.pull(0))[0].copy()
    after = asyncio.run(s.push_pull(0, 0, np.ones(4, np.float32)))[0]
    assert np.array_equal(asyncio.run(s.pull(0))[0], before) and np.array_equal(asyncio.run(s.pull(1))[0], after)
    assert asyncio.run(s.pull(0))[1:] == (0, 0) and asyncio.run(s.pull())[1] == 1
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
    assert np.array_equal(asyncio.run(spare.pull())[0], asyncio.run(s.pull())[0])
    assert np.array_equal(asyncio.run(spare.pull(9))[0], asyncio.run(s.pull(9))[0])
    for key, value in s.state.optimizer.state.items():
        assert np.array_equal(spare.state.optimizer.state[key].numpy(), value.numpy())
    # the rebuilt primary keeps logging to the same holder and training continues identically
    grad = np.full(4, 0.5, np.float32)
    assert np.array_equal(asyncio.run(spare.push_pull(0, 10, grad))[0], asyncio.run(s.push_pull(0, 10, grad))[0])


def test_a_retried_push_after_rebuild_is_answered_not_applied_again():
    s, holder, holder_handle = _pair(num_workers=1)
    _train(s, 3)
    spare = ParameterServer(None, None, SGD, total_steps=100, num_workers=1)
    asyncio.run(spare.recover_primary(0, s.state.shard, holder_handle, epoch=1))
    again, _, _ = asyncio.run(spare.push_pull(0, 2, np.ones(4, np.float32)))  # step 2 was logged before the primary died
    assert np.array_equal(again, asyncio.run(s.pull())[0]) and spare.duplicate_pushes == 1


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
        reply, _, _ = await push
        return new_holder, reply

    new_holder, reply = asyncio.run(scenario())
    log = new_holder.replicas[0]
    assert log.next_seq == 1 and np.array_equal(log.snapshot.params, reply)


# --- other consistency modes ---------------------------------------------------------


def test_async_applies_each_push_on_arrival_and_the_log_replays_that_order():
    rule = Rule("async", 3)
    s, holder, _ = _pair(num_workers=3, optim=MOMENTUM, snapshot_interval=1000, rule=rule)
    rng = np.random.default_rng(0)
    order = [(2, 0), (0, 0), (1, 0), (0, 1), (2, 1), (1, 1), (1, 2), (0, 2)]  # arrival order, ranks interleaved

    async def scenario():
        # all pushes in flight at once: the group commit batches their commands, in seq order
        return await asyncio.gather(*(s.push_pull(r, t, rng.standard_normal(4).astype(np.float32), 0) for r, t in order))

    replies = asyncio.run(scenario())
    log = holder.replicas[0]
    assert [c.pushes for c in log.entries] == [((r, t),) for r, t in order]
    assert sorted(acked for _, _, acked in replies) == list(range(1, 9))
    rebuilt = replay(log.snapshot, log.entries, s.state.shard, MOMENTUM, 100)
    assert np.array_equal(rebuilt.state.params_copy(), s.state.params_copy())
    assert rebuilt.state.clocks == s.state.clocks == {0: 3, 1: 3, 2: 2}
    st = asyncio.run(s.stats())
    assert sum(st.staleness_histogram.values()) == 8 and max(st.staleness_histogram) == 7  # every push computed on version 0
    assert st.replica_appends < 8  # group commit: commands applied while an append was in flight went in one call


def test_async_push_resent_to_a_rebuilt_primary_is_recognised_from_the_replayed_clocks():
    s, holder, holder_handle = _pair(num_workers=2, rule=Rule("async", 2))
    asyncio.run(s.push_pull(1, 0, np.ones(4, np.float32), 0))
    spare = ParameterServer(None, None, SGD, total_steps=100, num_workers=2, rule=Rule("async", 2))
    asyncio.run(spare.recover_primary(0, s.state.shard, holder_handle, epoch=1))
    asyncio.run(spare.push_pull(1, 0, np.ones(4, np.float32), 0))
    assert spare.duplicate_pushes == 1 and spare.state.step == 1


def test_ssp_holds_a_worker_more_than_s_steps_ahead_until_the_slowest_catches_up():
    s, _, _ = _pair(num_workers=2, rule=Rule("ssp", 2, staleness=1))

    async def scenario():
        await s.push_pull(0, 0, np.ones(4, np.float32), 0)  # clock 1, slowest 0: lead 1 allowed
        ahead = asyncio.create_task(s.push_pull(0, 1, np.ones(4, np.float32), 1))  # clock 2: lead 2 > 1
        for _ in range(5):
            await asyncio.sleep(0)
        held = not ahead.done()
        await s.push_pull(1, 0, np.ones(4, np.float32), 0)  # the slowest reaches clock 1
        await ahead
        return held

    assert asyncio.run(scenario())
    assert all(clock - slowest <= 1 for _, clock, slowest in s.clock_trace)
    assert (0, 2, 1) in s.clock_trace


def test_mixed_groups_update_the_shard_independently():
    s, holder, _ = _pair(num_workers=4, rule=Rule("mixed", 4, group_size=2))

    async def scenario():
        a = asyncio.create_task(s.push_pull(2, 0, np.full(4, 2.0, np.float32), 0))
        await s.push_pull(3, 0, np.full(4, 4.0, np.float32), 0)  # group (2, 3) complete: one update, lr * 2/4
        await a
        return s.state.step

    assert asyncio.run(scenario()) == 1
    assert np.array_equal(s.state.params_copy(), np.full(4, -1.5, np.float32))  # 0 - 1.0 * 0.5 * mean(2, 4)
    assert holder.replicas[0].entries[0].pushes == ((2, 0), (3, 0))


def test_backup_workers_close_the_step_without_the_straggler_and_drop_its_late_push():
    s, _, _ = _pair(num_workers=3, rule=Rule("sync", 3, backup_workers=1))

    async def scenario():
        a = asyncio.create_task(s.push_pull(0, 0, np.full(4, 1.0, np.float32)))
        await s.push_pull(2, 0, np.full(4, 3.0, np.float32))
        await a
        return await s.push_pull(1, 0, np.full(4, 100.0, np.float32))  # the straggler, late

    values, seq, acked = asyncio.run(scenario())
    assert seq == 1 and acked == 0 and s.late_pushes == 1
    assert np.array_equal(values, np.full(4, -2.0, np.float32))  # mean of ranks 0 and 2 only


def test_a_compressed_push_is_decoded_before_it_is_applied():
    s, holder, _ = _pair(num_workers=1, size=8)
    push = ErrorFeedback(TopK(0.25), 8).encode(np.array([0, 0, 5, 0, 0, -7, 0, 1], np.float32))
    asyncio.run(s.push_pull(0, 0, push))
    assert np.array_equal(holder.replicas[0].entries[0].update, np.array([0, 0, 5, 0, 0, -7, 0, 0], np.float32))
