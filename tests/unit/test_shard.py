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


@pytest.mark.parametrize(
    "optim",
    [
        OptimConfig(name="sgd", lr=0.05, momentum=0.9, weight_decay=1e-4, nesterov=True),
        OptimConfig(name="adam", lr=0.01, weight_decay=1e-4),
    ],
    ids=["sgd", "adam"],
)
def test_the_number_of_shards_changes_no_bit(optim):
    """Each shard sums the workers' gradients in rank order and the optimizers are elementwise, so
    any cut of the flat vector gives the same parameters bit for bit (the chaos tests use one
    failure-free run as the baseline of every shard count)."""
    rng = np.random.default_rng(1)
    total, num_params, steps = 103, 97, 6
    init = rng.standard_normal(total).astype(np.float32)
    grads = [
        {r: rng.standard_normal(total).astype(np.float32) for r in range(3)} for _ in range(steps)
    ]
    finals = []
    for k in (1, 2, 3, 5):
        states = []
        for shard in shard_ranges(total, k, num_params):
            st = ShardState(shard, optim, total_steps=steps)
            st.load(init[shard.start : shard.end])
            states.append(st)
        for t, g in enumerate(grads):
            for st in states:
                sl = slice(st.shard.start, st.shard.end)
                st.apply(mean_in_rank_order({r: a[sl] for r, a in g.items()}), st.hyper_params(t))
        finals.append(np.concatenate([st.params_copy() for st in states]).tobytes())
    assert all(f == finals[0] for f in finals)
