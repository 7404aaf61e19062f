import pytest
import torch
from torch import nn

from raytrain_ft.errors import ConfigError
from raytrain_ft.params import (
    FlatModel,
    flatten_state,
    load_flat_state,
    params_sha256,
    shard_ranges,
)


@pytest.mark.parametrize("total, k", [(10, 1), (10, 3), (7, 7), (1_000_003, 8), (5, 2)])
def test_shard_ranges_cover_and_balance(total, k):
    rs = shard_ranges(total, k)
    assert rs[0].start == 0 and rs[-1].end == total
    assert all(a.end == b.start for a, b in zip(rs, rs[1:]))
    sizes = [r.size for r in rs]
    assert max(sizes) - min(sizes) <= 1


def test_more_shards_than_values_is_a_config_error():
    with pytest.raises(ConfigError) as e:
        shard_ranges(3, 4)
    assert e.value.field == "cluster.num_servers"


def test_param_and_buffer_slices():
    rs = shard_ranges(10, 3, num_params=5)  # sizes 4, 3, 3 -> [0,4) [4,7) [7,10)
    assert (rs[0].param_slice, rs[0].buffer_slice) == (slice(0, 4), slice(4, 4))
    assert (rs[1].param_slice, rs[1].buffer_slice) == (slice(0, 1), slice(1, 3))
    assert (rs[2].param_slice, rs[2].buffer_slice) == (slice(0, 0), slice(0, 3))


def _bn_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)
    )


def test_params_and_grads_are_views_into_flat_buffers():
    model = _bn_model()
    before = flatten_state(model)
    fm = FlatModel(model)
    assert torch.equal(fm.flat, before)
    assert fm.num_params == sum(p.numel() for p in model.parameters())
    assert (
        fm.num_buffer_values == 9
    )  # running_mean + running_var of 4 channels, and num_batches_tracked (as a float)
    lo, hi = fm.flat.data_ptr(), fm.flat.data_ptr() + fm.flat.numel() * 4
    glo, ghi = fm.flat_grad.data_ptr(), fm.flat_grad.data_ptr() + fm.flat_grad.numel() * 4
    for _ in range(2):  # the second backward must still land in the same buffer
        fm.zero_grad()
        model(torch.randn(5, 1, 6, 6)).sum().backward()
        for p in model.parameters():
            assert lo <= p.data_ptr() < hi
            assert glo <= p.grad.data_ptr() < ghi
    assert fm.flat_grad[: fm.num_params].abs().sum() > 0
    # BatchNorm's running stats (updated in place by forward) live in the flat vector
    bn = model[1]
    assert lo <= bn.running_mean.data_ptr() < hi
    assert not torch.equal(fm.buffer_view, before[fm.num_params :])
    fm.stage_buffers()  # float buffers as they are; the integer count (2 forwards) as a float
    assert (
        torch.equal(fm.flat_grad[fm.num_params : -1], fm.buffer_view[:-1])
        and fm.flat_grad[-1] == 2.0
    )


def test_flat_state_round_trip_and_hash():
    a, b = _bn_model(), _bn_model()
    flat = flatten_state(a) + 1.0
    load_flat_state(b, flat)
    assert torch.equal(flatten_state(b), flat)
    assert params_sha256(flat) == params_sha256(flat.clone())
    assert params_sha256(flat) != params_sha256(flat + 1e-7)
    with pytest.raises(ValueError):
        load_flat_state(b, flat[:-1])


@pytest.mark.parametrize(
    "span, expected",
    [((0, 4), [0]), ((3, 5), [0, 1]), ((4, 7), [1]), ((0, 10), [0, 1, 2]), ((9, 10), [2])],
)
def test_overlapping_shards(span, expected):
    from raytrain_ft.params import overlapping_shards

    assert overlapping_shards(*span, shard_ranges(10, 3)) == expected  # [0,4) [4,7) [7,10)


def test_spans_tile_the_flat_vector():
    fm = FlatModel(_bn_model())
    assert fm.spans[0][0] == 0 and fm.spans[-1][1] == fm.numel
    assert all(a[1] == b[0] for a, b in zip(fm.spans, fm.spans[1:]))


def test_a_shard_installed_mid_forward_leaves_backward_and_the_buffers_working():
    """With overlap a shard's parameters are installed into the flat vector as the first layer
    needing them runs, after earlier BatchNorm layers saved their running statistics for
    backward. Buffers keep their own version counters (as parameters do), so backward accepts
    them; they still read and write the flat vector."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2)
    )
    flat = FlatModel(model)
    a, b = flat.spans[len(flat.params) - 2]  # the Linear's weight: not used before it runs

    def install(_module, _inputs):
        flat.flat[a:b].add_(0.0)  # what installing a shard's answer does to the flat vector

    model[-1].register_forward_pre_hook(install)
    before = flat.buffer_view.clone()
    model.train()
    model(torch.randn(2, 3, 8, 8)).sum().backward()  # raised before buffers had own counters
    assert flat.params[0].grad.abs().sum() > 0
    # the running statistics BatchNorm updated in place are the flat vector's values
    assert not torch.equal(flat.buffer_view, before)
    assert torch.equal(model[1].running_mean, flat.flat[flat.spans[len(flat.params)][0] :][:4])


def test_installing_one_shard_syncs_only_its_integer_buffers():
    """num_batches_tracked lives in the flat vector as a float32 copy; installing one shard sets
    the counters in that shard's range only (another shard's layers may have run this step)."""
    model = nn.Sequential(nn.BatchNorm1d(2), nn.BatchNorm1d(2))
    flat = FlatModel(model)
    (first, (a, _)), (second, (b, _)) = flat.int_buffers
    flat.flat[a] = 5.0
    flat.flat[b] = 7.0
    second.fill_(3)  # this step's increment, made after the other shard was installed
    flat.sync_int_buffers(a, b)
    assert int(first) == 5 and int(second) == 3
    flat.sync_int_buffers()
    assert int(second) == 7


class _Ema(nn.Module):
    """A running mean kept in a buffer, in place or (the bug) by rebinding it."""

    def __init__(self, in_place: bool, grow: bool = False):
        super().__init__()
        self.l = nn.Linear(4, 3)
        self.register_buffer("ema", torch.zeros(4))
        self.in_place, self.grow = in_place, grow

    def forward(self, x):
        if self.in_place:
            self.ema.mul_(0.9).add_(0.1 * x.mean(0))
        elif self.grow:
            self.ema = torch.cat([self.ema, x.mean(0)])
        else:
            self.ema = 0.9 * self.ema + 0.1 * x.mean(0)
        return self.l(x)


def test_a_buffer_rebound_by_forward_is_named_instead_of_lost():
    """The shards hold a buffer at a fixed place: a forward that rebinds it (a new tensor, perhaps
    of another size) trained on with the change silently dropped; it now fails in one line, and an
    in-place update travels."""
    x = torch.randn(8, 4)
    fm = FlatModel(_Ema(in_place=True))
    fm.module(x)
    fm.stage_buffers()
    assert torch.equal(fm.flat_grad[fm.num_params :], 0.1 * x.mean(0))
    for grow, now in ((False, [4]), (True, [8])):
        fm = FlatModel(_Ema(in_place=False, grow=grow))
        fm.module(x)
        with pytest.raises(ConfigError) as e:
            fm.stage_buffers()
        assert f"replaced its buffer 'ema' (now {now}, was [4])" in str(e.value)
        assert e.value.field == "model.name"
