import numpy as np
import pytest
import torch

from raytrain_ft.config import OptimConfig
from raytrain_ft.consistency import mean_in_rank_order
from raytrain_ft.params import shard_ranges
from raytrain_ft.shard import ShardState


def test_aggregation_is_rank_ordered_and_exact():
    rng = np.random.default_rng(0)
    grads = {r: rng.standard_normal(1000).astype(np.float32) for r in range(4)}
    shuffled = {r: grads[r] for r in (3, 1, 0, 2)}  # arrival order must not matter
    mean = mean_in_rank_order(shuffled)
    expected = ((grads[0] + grads[1]) + grads[2]) + grads[3]
    assert np.array_equal(mean, expected / np.float32(4))
    with pytest.raises(ValueError, match="empty"):
        mean_in_rank_order({})


def test_apply_advances_the_clocks_of_the_pushes_it_aggregates():
    shard = shard_ranges(4, 1)[0]
    st = ShardState(shard, OptimConfig(name="sgd", lr=1.0, momentum=0.0), total_steps=10)
    st.load(np.zeros(4, dtype=np.float32))
    st.apply(np.ones(4, dtype=np.float32), st.hyper_params(0), pushes=((2, 5),))
    st.apply(np.ones(4, dtype=np.float32), st.hyper_params(0), pushes=((0, 0), (1, 0)))
    assert st.clocks == {2: 6, 0: 1, 1: 1} and st.seq == 2


def test_apply_optimizes_params_and_assigns_buffers():
    shard = shard_ranges(10, 2, num_params=7)[1]  # [5, 10): params 5,6 then buffers 7,8,9
    st = ShardState(shard, OptimConfig(name="sgd", lr=0.5, momentum=0.0), total_steps=10)
    st.load(np.arange(5, dtype=np.float32))
    st.apply(np.array([1, 1, 7, 8, 9], dtype=np.float32), st.hyper_params(0))
    assert torch.equal(st.params, torch.tensor([-0.5, 0.5, 7, 8, 9], dtype=torch.float32))
    assert st.seq == 1 and st.updates_applied == 1
    with pytest.raises(ValueError, match="expected 5"):
        st.load(np.zeros(4, dtype=np.float32))
