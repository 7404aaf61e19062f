"""Server-side flat optimizers and schedules against torch.optim on identical inputs."""

import dataclasses

import pytest
import torch

from raytrain_ft.config import OptimConfig
from raytrain_ft.optim import hyper_params, lr_at, make_optimizer

CASES = [
    (OptimConfig(name="sgd", lr=0.1, momentum=0.0), torch.optim.SGD, dict(lr=0.1)),
    (OptimConfig(name="sgd", lr=0.1, momentum=0.9), torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
    (
        OptimConfig(name="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
        torch.optim.SGD,
        dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
    ),
    (
        OptimConfig(name="sgd", lr=0.05, momentum=0.5, weight_decay=5e-4),
        torch.optim.SGD,
        dict(lr=0.05, momentum=0.5, weight_decay=5e-4),
    ),
    (OptimConfig(name="rmsprop", lr=0.01, momentum=0.0), torch.optim.RMSprop, dict(lr=0.01)),
    (
        OptimConfig(name="rmsprop", lr=0.01, momentum=0.9, alpha=0.9, weight_decay=1e-4),
        torch.optim.RMSprop,
        dict(lr=0.01, momentum=0.9, alpha=0.9, weight_decay=1e-4),
    ),
    (OptimConfig(name="adagrad", lr=0.1), torch.optim.Adagrad, dict(lr=0.1)),
    (
        OptimConfig(name="adagrad", lr=0.1, weight_decay=1e-3),
        torch.optim.Adagrad,
        dict(lr=0.1, weight_decay=1e-3),
    ),
    (OptimConfig(name="adam", lr=1e-3), torch.optim.Adam, dict(lr=1e-3)),
    (
        OptimConfig(name="adam", lr=3e-3, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=1e-2),
        torch.optim.Adam,
        dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2),
    ),
]


@pytest.mark.parametrize(
    "cfg, torch_cls, kwargs", CASES, ids=lambda c: getattr(c, "name", None) or ""
)
def test_matches_torch_optim(cfg, torch_cls, kwargs):
    gen = torch.Generator().manual_seed(1)
    init = torch.randn(257, generator=gen)
    grads = [torch.randn(257, generator=gen) for _ in range(12)]

    ref = torch.nn.Parameter(init.clone())
    ref_opt = torch_cls([ref], foreach=False, **kwargs)
    ours = init.clone()
    opt = make_optimizer(cfg, ours.numel())
    for step, g in enumerate(grads):
        ref.grad = g.clone()
        ref_opt.step()
        opt.step(ours, g.clone(), hyper_params(step, cfg, 100))
    torch.testing.assert_close(ours, ref.detach(), rtol=1e-6, atol=1e-7)


def test_sharded_update_equals_whole_vector_update():
    cfg = OptimConfig(name="adam", lr=1e-2, weight_decay=1e-3)
    gen = torch.Generator().manual_seed(2)
    whole = torch.randn(100, generator=gen)
    parts = [whole[:37].clone(), whole[37:].clone()]
    o_whole, o_parts = make_optimizer(cfg, 100), [make_optimizer(cfg, 37), make_optimizer(cfg, 63)]
    for step in range(5):
        g = torch.randn(100, generator=gen)
        hp = hyper_params(step, cfg, 10)
        o_whole.step(whole, g, hp)
        o_parts[0].step(parts[0], g[:37], hp)
        o_parts[1].step(parts[1], g[37:], hp)
    assert torch.equal(torch.cat(parts), whole)


def test_state_round_trip_is_exact():
    cfg = OptimConfig(name="sgd", lr=0.1, momentum=0.9)
    a, b = make_optimizer(cfg, 8), make_optimizer(cfg, 8)
    pa = torch.randn(8)
    a.step(pa, torch.randn(8), hyper_params(0, cfg, 10))
    pb = pa.clone()
    b.load_state(a.state_dict())
    g = torch.randn(8)
    a.step(pa, g, hyper_params(1, cfg, 10))
    b.step(pb, g, hyper_params(1, cfg, 10))
    assert torch.equal(pa, pb) and b.step_count == 2


def test_per_stream_momentum_keeps_one_buffer_per_stream_and_looks_ahead_by_their_sum():
    """DANA: a stream's updates equal plain momentum SGD fed only that stream's gradients, its
    buffer is bitwise that SGD's (the streams' buffers never mix), and the look-ahead is
    param - lr * m * (sum of the buffers)."""
    cfg = OptimConfig(name="sgd", lr=0.1, momentum=0.9)
    shared, plain = make_optimizer(cfg, 6), [make_optimizer(cfg, 6) for _ in range(3)]
    param, alone = torch.zeros(6), [torch.zeros(6) for _ in range(3)]
    gen = torch.Generator().manual_seed(0)
    for t, stream in enumerate([0, 2, 0, 1, 2, 2, 0, 1]):
        g = torch.randn(6, generator=gen)
        hp = dataclasses.replace(hyper_params(t, cfg, 10), stream=stream)
        before = param.clone()
        shared.step(param, g, hp)
        step = alone[stream].clone()
        plain[stream].step(step, g, hyper_params(t, cfg, 10))
        # the change this update makes is what that stream's own momentum alone would make
        torch.testing.assert_close(param - before, step - alone[stream])
        alone[stream] = step
    buffers = [shared.state[f"momentum_buffer.{s}"] for s in range(3)]
    for s in range(3):
        assert torch.equal(buffers[s], plain[s].state["momentum_buffer"])
    expected = param - 0.1 * 0.9 * (buffers[0] + buffers[1] + buffers[2])
    torch.testing.assert_close(shared.lookahead(param), expected)
    assert make_optimizer(cfg, 6).lookahead(param) is None  # one buffer: no look-ahead


def _torch_lrs(make_sched, steps, lr):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr)
    sched = make_sched(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize(
    "cfg, make_sched",
    [
        (
            OptimConfig(lr=0.1, schedule="step", step_size=7, gamma=0.5),
            lambda o: torch.optim.lr_scheduler.StepLR(o, 7, 0.5),
        ),
        (
            OptimConfig(lr=0.1, schedule="cosine", min_lr=0.001),
            lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=40, eta_min=0.001),
        ),
        (
            OptimConfig(lr=0.1, warmup_steps=5),
            lambda o: torch.optim.lr_scheduler.LinearLR(
                o, start_factor=0.2, end_factor=1.0, total_iters=4
            ),
        ),
    ],
    ids=["step", "cosine", "warmup"],
)
def test_schedules_match_torch(cfg, make_sched):
    ref = _torch_lrs(make_sched, 40, cfg.lr)
    ours = [lr_at(s, cfg, 40) for s in range(40)]
    assert ours == pytest.approx(ref, rel=1e-6, abs=1e-9)


def test_warmup_then_cosine_ends_at_min_lr():
    cfg = OptimConfig(lr=0.2, warmup_steps=10, schedule="cosine", min_lr=0.01)
    assert lr_at(0, cfg, 100) == pytest.approx(0.02)
    assert lr_at(9, cfg, 100) == pytest.approx(0.2)
    assert lr_at(10, cfg, 100) == pytest.approx(0.2)
    assert lr_at(100, cfg, 100) == pytest.approx(0.01)
