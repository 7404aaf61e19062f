"""fp16 loss scaling: the scale as a pure function of the skipped steps (GradScaler's rule), and a
shard skipping every update that holds an overflowed push, replicated and reported back."""

import numpy as np
import pytest
import torch

from raytrain_ft import amp
from raytrain_ft.config import OptimConfig
from raytrain_ft.protocol.exchange import ExchangeProtocol
from raytrain_ft.protocol.messages import (
    Load,
    Pull,
    Push,
    PushReply,
    RecoverPrimary,
    Route,
)
from raytrain_ft.protocol.server import ServerProtocol
from tests.unit.bus import sync_primary_and_holder

SGD = OptimConfig(name="sgd", lr=1.0, momentum=0.9)


@pytest.mark.parametrize("overflow_at", [(), (0, 1, 2), (3, 9, 10, 30), (0, 5, 6, 7, 25, 26)])
def test_the_scale_follows_torch_grad_scaler(monkeypatch, overflow_at):
    """GradScaler on the CPU, fed an infinite gradient at the chosen steps, against
    ``amp.loss_scale`` given those steps (growth interval shortened to 4 in both)."""
    monkeypatch.setattr(amp, "GROWTH_INTERVAL", 4)
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.0)
    scaler = torch.amp.GradScaler("cpu", growth_interval=4)
    for step in range(40):
        assert scaler.get_scale() == amp.loss_scale(step, overflow_at), step
        opt.zero_grad()
        loss = (w * (float("inf") if step in overflow_at else 1.0)).sum()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()


def test_the_scale_ignores_later_steps_and_repeats():
    assert amp.loss_scale(0, ()) == amp.INIT_SCALE
    assert amp.loss_scale(3, [2, 2, 5]) == amp.INIT_SCALE / 2


def _pair():
    return sync_primary_and_holder(SGD, 2, np.ones(4))


def _push(bus, rank, step, overflow=False, dst="p"):
    grad = None if overflow else np.full(4, rank + 1.0, np.float32)
    return bus.send(dst, Push(rank, step, grad, step, overflow=overflow))


def test_an_update_with_an_overflowed_push_changes_nothing_but_is_recorded_and_reported():
    bus, _, _ = _pair()
    a, b = _push(bus, 0, 0), _push(bus, 1, 0, overflow=True)
    p = bus.procs["p"].primary
    for rid in (a, b):
        reply = bus.replies[rid]
        np.testing.assert_array_equal(reply.params, np.ones(4, np.float32))  # nothing applied
        assert (reply.seq, reply.acked, reply.skipped) == (1, 1, (0,))
    assert p.state.skipped == {0: [0], 1: [0]} and p.state.optimizer.step_count == 0
    entry = bus.procs["h"].replicas[0].log.entries[0]
    assert entry.skipped and entry.update.size == 0  # logged, with nothing to redo
    # the next step is a normal one, and its answers still report the skipped step
    c, _ = _push(bus, 0, 1), _push(bus, 1, 1)
    reply = bus.replies[c]
    assert reply.seq == 2 and reply.skipped == (0,)
    assert not np.array_equal(reply.params, np.ones(4, np.float32))


def test_a_rebuilt_primary_keeps_the_skipped_steps_and_a_restarted_rank_gets_them():
    bus, shard, spec = _pair()
    _push(bus, 0, 0, overflow=True), _push(bus, 1, 0)
    _push(bus, 0, 1), _push(bus, 1, 1)
    lost = bus.procs["p"].params().copy()
    bus.kill("p")
    bus.add("s", ServerProtocol("s", spec))
    bus.ask("s", RecoverPrimary(shard, 2, "h"))
    s = bus.procs["s"].primary.state
    assert s.skipped == {0: [0], 1: [0]}
    np.testing.assert_array_equal(bus.procs["s"].params(), lost)
    # a rank restarting at step 2 pulls with its rank: the answer carries its skipped steps
    resumed = bus.ask("s", Pull(2, 1, 2))
    assert resumed.skipped == (0,) and amp.loss_scale(2, resumed.skipped) == amp.INIT_SCALE / 2
    assert bus.ask("s", Pull(2)).skipped is None  # a pull without a rank gets none


def test_a_checkpoint_carries_the_skipped_steps_and_a_load_from_it_restores_them():
    """--recovery checkpoint / --resume-from: the shard's checkpoint holds the skipped steps, and a
    primary loaded from it answers a restarted rank with them (its scale as before)."""
    bus, shard, spec = _pair()
    _push(bus, 0, 0, overflow=True), _push(bus, 1, 0)
    save = bus.procs["p"]._checkpoint(bus.procs["p"].primary)
    assert save.skipped == {0: [0], 1: [0]}
    bus.add("r", ServerProtocol("r", spec))
    bus.ask("r", Load(shard, 2, save.params, save.step, save.optimizer_state, skipped=save.skipped))
    resumed = bus.ask("r", Pull(1, 0, 1))
    assert resumed.skipped == (0,) and amp.loss_scale(1, resumed.skipped) == amp.INIT_SCALE / 2


def test_an_overflowed_step_under_clipping_answers_probes_with_a_factor_of_one():
    bus, _, _ = _pair()
    a = bus.send("p", Push(0, 0, np.full(4, 2.0, np.float32), 0, False, probe=True))
    b = bus.send("p", Push(1, 0, None, 0, False, probe=True, overflow=True))
    for rid in (a, b):
        assert bus.replies[rid].clip_factor == 1.0 and bus.replies[rid].sq_norm is None
    done = bus.replies[bus.send("p", Push(1, 0, None, 0, True, clip_factor=1.0, overflow=True))]
    np.testing.assert_array_equal(done.params, np.ones(4, np.float32))
    assert done.skipped == (0,)


def test_the_exchange_pushes_an_overflow_without_payload():
    ex = ExchangeProtocol(0, [Route(0, "p", 1)], "sup")
    (call,) = ex.push(0, 3, None, 0, True, overflow=True)
    assert call.msg.overflow and call.msg.payload is None and call.msg.want_params
    ex.on_reply(call.cid, PushReply(np.zeros(2, np.float32), 4, 4, skipped=(3,)))
    assert ex.take(0).skipped == (3,)
