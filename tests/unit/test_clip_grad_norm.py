"""Global gradient-norm clipping: the factor (as ``clip_grad_norm_`` computes it), the two-phase
update on a shard primary (probes answered with squared norms, then the factor), a primary rebuilt
between the phases, a probe resent after its update, and the worker's exchange resending the
gradient when asked."""

import math

import numpy as np
import pytest
import torch

from raytrain_ft.config import (
    ClusterConfig,
    ConfigError,
    ConsistencyConfig,
    OptimConfig,
    TrainConfig,
)
from raytrain_ft.optim import clip_factor, clip_in_place, squared_norm
from raytrain_ft.protocol.exchange import ExchangeProtocol
from raytrain_ft.protocol.messages import (
    Call,
    Push,
    PushReply,
    RecoverPrimary,
    RefusalKind,
    Refused,
    Route,
)
from raytrain_ft.protocol.server import ServerProtocol
from tests.unit.bus import sync_primary_and_holder

SGD = OptimConfig(name="sgd", lr=1.0, momentum=0.0)


def test_the_factor_matches_torch_clip_grad_norm():
    rng = np.random.default_rng(0)
    grads = [torch.from_numpy(rng.standard_normal(n).astype(np.float32)) for n in (7, 300, 33)]
    for max_norm in (0.5, 3.0, 1e6):
        mine = [g.clone() for g in grads]
        factor = clip_factor([squared_norm(g) for g in mine], max_norm)
        for g in mine:
            g.mul_(factor)
        theirs = [torch.nn.Parameter(g.clone()) for g in grads]
        for p, g in zip(theirs, grads):
            p.grad = g.clone()
        torch.nn.utils.clip_grad_norm_(theirs, max_norm)
        for a, b in zip(mine, theirs):
            torch.testing.assert_close(a, b.grad, rtol=1e-6, atol=0)
    assert clip_factor([4.0], 10.0) == 1.0  # under the norm: untouched, exactly
    assert math.isnan(clip_factor([float("inf")], 1.0))


def test_squared_norm_is_exact_whatever_the_order_of_its_parts():
    x = np.random.default_rng(1).standard_normal(10_001).astype(np.float32)
    whole = squared_norm(x)
    assert whole == squared_norm(torch.from_numpy(x.copy()))
    assert whole == pytest.approx(float(np.dot(x.astype(np.float64), x.astype(np.float64))))
    # the sum of the shards' parts is exact too: the factor does not depend on the sharding
    parts = [squared_norm(x[:3000]), squared_norm(x[3000:])]
    assert clip_factor(parts, 1.0) == clip_factor([whole], 1.0)


def test_clip_in_place_scales_only_above_the_norm():
    g = torch.full((4,), 2.0)  # norm 4
    assert not clip_in_place(g, 5.0) and torch.equal(g, torch.full((4,), 2.0))
    assert clip_in_place(g, 1.0)
    assert float(torch.linalg.vector_norm(g)) == pytest.approx(1.0, rel=1e-5)


# --- the shard's two phases
# ----------------------------------------------------------------------------


def _pair(buffers=0):
    return sync_primary_and_holder(SGD, 2, np.zeros(6), num_params=6 - buffers)


GRADS = {0: np.array([3, 0, 0, 0, 1, 1], np.float32), 1: np.array([1, 0, 4, 0, 1, 1], np.float32)}


def _probe(bus, rank, step=0, dst="p"):
    return bus.send(dst, Push(rank, step, GRADS[rank], 0, False, probe=True))


def _finish(bus, rank, factor, step=0, dst="p", payload=None):
    return bus.send(dst, Push(rank, step, payload, 0, True, clip_factor=factor))


def test_probes_are_answered_the_squared_norm_once_every_push_is_in_and_nothing_is_applied():
    bus, _, _ = _pair()
    a = _probe(bus, 0)
    assert a not in bus.replies
    b = _probe(bus, 1)
    mean = (GRADS[0] + GRADS[1]) / 2
    for rid in (a, b):
        reply = bus.replies[rid]
        assert reply.params is None and reply.acked == 0
        assert reply.sq_norm == squared_norm(mean)
    assert bus.procs["p"].primary.state.seq == 0  # nothing applied before the factor


def test_the_first_factor_applies_the_update_scaled_and_every_finisher_gets_the_same_answer():
    bus, _, _ = _pair()
    _probe(bus, 0), _probe(bus, 1)
    a = bus.replies[_finish(bus, 0, 0.25)]
    b = bus.replies[_finish(bus, 1, 0.25)]
    expected = -0.25 * (GRADS[0] + GRADS[1]) / 2
    np.testing.assert_array_equal(a.params, expected.astype(np.float32))
    np.testing.assert_array_equal(b.params, a.params)
    assert (a.seq, a.acked) == (b.seq, b.acked) == (1, 1)
    log = bus.procs["h"].replicas[0].log
    assert log.entries[0].clip_factor == 0.25  # the holder logs the scaled update and the factor
    np.testing.assert_array_equal(log.entries[0].update, -expected)


def test_a_factor_of_one_applies_exactly_what_an_unclipped_step_would():
    clipped, _, _ = _pair()
    _probe(clipped, 0), _probe(clipped, 1)
    got = clipped.replies[_finish(clipped, 0, 1.0)].params
    plain, _, _ = _pair()
    plain.send("p", Push(0, 0, GRADS[0], 0)), plain.send("p", Push(1, 0, GRADS[1], 0))
    np.testing.assert_array_equal(got, plain.procs["p"].params())


def test_only_the_parameter_part_is_scaled_and_normed_buffers_are_assigned():
    bus, shard, _ = _pair(buffers=2)
    assert shard.buffer_slice == slice(4, 6)
    a, _ = _probe(bus, 0), _probe(bus, 1)
    mean = (GRADS[0] + GRADS[1]) / 2
    assert bus.replies[a].sq_norm == squared_norm(mean[:4])
    params = bus.replies[_finish(bus, 0, 0.5)].params
    np.testing.assert_array_equal(params[:4], -0.5 * mean[:4])
    np.testing.assert_array_equal(params[4:], mean[4:])  # buffer values, not scaled


def test_a_primary_rebuilt_between_the_phases_asks_for_the_gradients_again():
    bus, shard, spec = _pair()
    a, _ = _probe(bus, 0), _probe(bus, 1)
    norm = bus.replies[a].sq_norm
    bus.kill("p")
    bus.add("s", ServerProtocol("s", spec))
    bus.ask("s", RecoverPrimary(shard, 2, "h"))
    refused = bus.replies[_finish(bus, 0, 0.5, dst="s")]
    assert isinstance(refused, Refused) and refused.kind is RefusalKind.RESEND
    # the resent second phase carries the gradient; the other rank's too: the same update
    first = _finish(bus, 0, 0.5, dst="s", payload=GRADS[0])
    assert first not in bus.replies
    second = bus.replies[_finish(bus, 1, 0.5, dst="s", payload=GRADS[1])]
    np.testing.assert_array_equal(second.params, bus.replies[first].params)
    np.testing.assert_array_equal(
        second.params, (-0.5 * (GRADS[0] + GRADS[1]) / 2).astype(np.float32)
    )
    # a probe resent now (its first answer was lost) gets the factor the update had, and the
    # rebuilt primary's norm is the one its predecessor gave
    again = bus.replies[_probe(bus, 0, dst="s")]
    assert again.clip_factor == 0.5 and again.sq_norm is None
    twin, _, _ = _pair()
    _probe(twin, 1)
    assert twin.replies[_probe(twin, 0)].sq_norm == norm


def test_a_probe_resent_after_a_rebuild_that_replayed_the_update_gets_its_factor():
    bus, shard, spec = _pair()
    _probe(bus, 0), _probe(bus, 1)
    _finish(bus, 0, 0.125)
    bus.kill("p")
    bus.add("s", ServerProtocol("s", spec))
    bus.ask("s", RecoverPrimary(shard, 2, "h"))  # replays the logged command
    assert bus.replies[_probe(bus, 1, dst="s")].clip_factor == 0.125
    repeat = bus.replies[_finish(bus, 1, 0.125, dst="s")]
    assert (repeat.seq, repeat.acked) == (1, 1)
    assert bus.procs["s"].primary.state.seq == 1  # answered, not applied again


def test_the_exchange_resends_the_second_phase_with_the_gradient_when_asked():
    ex = ExchangeProtocol(0, [Route(0, "p", 1)], "sup")
    grad = np.ones(3, np.float32)
    (probe,) = ex.push(0, 4, grad, 0, True, probe=True)
    assert isinstance(probe, Call) and probe.msg.probe and not probe.msg.want_params
    ex.on_reply(probe.cid, PushReply(None, 4, 0, sq_norm=3.0))
    assert ex.take(0).sq_norm == 3.0 and ex.ledger == []  # a probe acknowledges nothing
    (finish,) = ex.finish(0, 0.5, True)
    assert finish.msg.payload is None and finish.msg.clip_factor == 0.5 and finish.msg.want_params
    (resent,) = ex.on_reply(finish.cid, Refused(RefusalKind.RESEND, "rebuilt"))
    assert resent.msg.payload is grad and resent.msg.clip_factor == 0.5 and not resent.msg.probe
    ex.on_reply(resent.cid, PushReply(np.zeros(3, np.float32), 5, 5))
    assert [(a.step, a.seq) for a in ex.ledger] == [(4, 5)]


def test_clipping_with_backup_workers_is_refused():
    with pytest.raises(ConfigError, match="backup"):
        TrainConfig(
            optim=OptimConfig(clip_grad_norm=1.0),
            consistency=ConsistencyConfig(backup_workers=1),
            cluster=ClusterConfig(num_workers=3, overlap_comm=False),
        )
    with pytest.raises(ConfigError, match="clip_grad_norm"):
        OptimConfig(clip_grad_norm=0.0)
