"""The ParameterServer class driven in-process with asyncio (no Ray): parking, rank order, idempotence."""

import asyncio

import numpy as np
import pytest

from raytrain_ft.actors.server import ParameterServer
from raytrain_ft.config import OptimConfig
from raytrain_ft.errors import TrainingError
from raytrain_ft.params import shard_ranges


def _server(num_workers=2):
    shard = shard_ranges(4, 1)[0]
    s = ParameterServer(shard, OptimConfig(name="sgd", lr=1.0, momentum=0.0), total_steps=10, num_workers=num_workers)
    asyncio.run(s.load(np.zeros(4, dtype=np.float32)))
    return s


def test_calls_park_until_all_ranks_pushed_then_all_get_the_same_update():
    s = _server()

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


def test_repeated_push_is_answered_not_applied_twice():
    s = _server(num_workers=1)
    first = asyncio.run(s.push_pull(0, 0, np.ones(4, np.float32)))
    again = asyncio.run(s.push_pull(0, 0, np.ones(4, np.float32)))
    assert np.array_equal(first, again)
    st = asyncio.run(s.stats())
    assert st.updates_applied == 1 and st.duplicate_pushes == 1


def test_push_ahead_of_the_shard_is_refused():
    s = _server(num_workers=1)
    with pytest.raises(TrainingError, match="ahead of the shard"):
        asyncio.run(s.push_pull(0, 3, np.ones(4, np.float32)))


def test_pull_before_load_names_the_problem():
    s = ParameterServer(shard_ranges(4, 1)[0], OptimConfig(), total_steps=1, num_workers=1)
    with pytest.raises(TrainingError, match="never loaded"):
        asyncio.run(s.pull())
