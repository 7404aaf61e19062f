"""Sync mode on a real (small) Ray: equivalence with single-process PyTorch, determinism,
BatchNorm."""

import dataclasses
import os

import numpy as np
import pytest
import torch
from torch import nn

from raytrain_ft.actors.worker import LEDGER_DIR_ENV_VAR
from raytrain_ft.config import (
    ChaosConfig,
    ClusterConfig,
    DataConfig,
    ModelConfig,
    OptimConfig,
    RecoveryConfig,
    TrainConfig,
)
from raytrain_ft.data import global_step_indices, load_dataset
from raytrain_ft.params import flatten_state
from raytrain_ft.recovery.ledger import assert_exactly_once, read_ledgers
from raytrain_ft.trainer import Trainer, initial_model

pytestmark = pytest.mark.integration


def _config(**kw):
    base = dict(
        model=ModelConfig(name="cnn"),
        data=DataConfig(dataset="digits", image_size=8, batch_size=16, prefetch_batches=2),
        optim=OptimConfig(name="sgd", lr=0.05, momentum=0.9, weight_decay=1e-4),
        cluster=ClusterConfig(num_workers=2, num_servers=3),
        recovery=RecoveryConfig(num_spares=0),  # nothing is killed: a spare only costs a process
        steps=24,
        seed=7,
    )
    base.update(kw)
    return TrainConfig(**base)


def single_process_reference(cfg: TrainConfig, eval_losses: list | None = None) -> torch.Tensor:
    """Plain PyTorch: one model, batch = the concatenation of every worker's batch of the step
    (with ``clip_grad_norm_`` when the config clips). ``eval_losses`` gets the eval loss after
    each step (index k: after k steps)."""
    data = load_dataset(cfg.data, cfg.seed)
    model = initial_model(cfg, data)
    opt = torch.optim.SGD(
        model.parameters(),
        lr=cfg.optim.lr,
        momentum=cfg.optim.momentum,
        weight_decay=cfg.optim.weight_decay,
        foreach=False,
    )
    W, B = cfg.cluster.num_workers, cfg.data.batch_size
    n = len(data.train_y)

    def evaluated():
        if eval_losses is not None:
            model.eval()
            with torch.no_grad():
                out = model(data.eval_x)
            eval_losses.append(float(torch.nn.functional.cross_entropy(out, data.eval_y)))
            model.train()

    evaluated()
    for step in range(cfg.steps):
        idx = np.concatenate([global_step_indices(n, cfg.seed, r, W, B, step) for r in range(W)])
        x, y = data.train_x[idx], data.train_y[idx]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        if cfg.optim.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad_norm)
        opt.step()
        evaluated()
    return flatten_state(model)


def test_sync_matches_single_process_pytorch_with_and_without_overlap(ray_local):
    """Both runs equal plain PyTorch with the global batch, and each other bitwise: overlapping
    communication with compute changes no value, and the same seed gives the same hash. The second
    also evaluates the shards' parameters while it trains (eval_every_s): reading them changes no
    value either; nor does answering before the log (the first run is --durability strict, the
    second the default, pipelined), nor the shard count --num-servers auto picks for the second
    (the first has 3 shards)."""
    results = {}
    for overlap in (False, True):
        cfg = _config(
            # with overlap, pushes go from the push thread GPU workers use
            cluster=ClusterConfig(
                num_workers=2,
                num_servers="auto" if overlap else 3,
                overlap_comm=overlap,
                push_thread="true" if overlap else "auto",
            ),
            # the first answers once logged, the second before (the default in sync)
            recovery=RecoveryConfig(num_spares=0, durability="auto" if overlap else "strict"),
            eval_every_s=0.01 if overlap else 0.0,
        )
        results[overlap] = result = Trainer(cfg).fit()
        shards = result.config["cluster"]["num_servers"]
        if overlap:  # auto: the count it chose runs, and the plan says why
            plan = result.server_plan
            assert shards == plan["chosen"] == len(result.servers), plan
            assert set(plan["predicted_exchange_ms"]) == {"1", "2", "3", "4", "6", "8", "12", "16"}
            assert min(plan["predicted_exchange_ms"].values()) > 0 and plan["cpus"] >= 1
        else:
            assert shards == 3 and result.server_plan is None
        assert result.steps_completed == cfg.steps == 24
        # the servers built the initial values from the task, the driver read the end state: the
        # supervisor never loaded torch (and this run equals single-process PyTorch below)
        assert result.supervisor_imported_torch is False
        # every shard applied every step once, and every applied update was acknowledged
        assert result.updates_applied == result.updates_acknowledged == 24 * shards
        # CPU per step of each role, measured in each process (server and supervisor work is
        # real work here: every step goes through them)
        cpu = result.cpu_per_step
        assert set(cpu) == {"worker_compute_s", "worker_other_s", "server_s", "supervisor_s"}
        assert cpu["worker_compute_s"] > 0 and cpu["worker_other_s"] > 0 and cpu["server_s"] > 0
        assert all(0 < w["compute_cpu_s"] <= w["cpu_s"] for w in result.workers), result.workers
        assert all(w["push_thread"] == overlap for w in result.workers)
        # pipelined: every push but the last step's was answered before its log (3 shards)
        assert [w["early_answers"] for w in result.workers] == [23 * shards if overlap else 0] * 2
    assert results[False].eval_history == []
    evals = results[True].eval_history
    assert evals, "a 24-step run lasts long enough for an evaluation every 10 ms"
    assert all(0 <= e["eval_accuracy"] <= 1 and e["eval_loss"] > 0 for e in evals), evals
    assert [e["t"] for e in evals] == sorted(e["t"] for e in evals)
    assert all(0 <= e["step"] == e["updates"] <= 24 for e in evals), evals
    eval_losses: list = []
    reference = single_process_reference(cfg, eval_losses)
    # each row names the step of the parameters it evaluated (it named a probe round old one)
    for e in evals:
        assert e["eval_loss"] == pytest.approx(eval_losses[e["step"]], rel=1e-4), (e, eval_losses)
    torch.testing.assert_close(
        torch.from_numpy(results[False].final_params), reference, rtol=1e-4, atol=2e-5
    )
    assert results[True].params_sha256 == results[False].params_sha256


def test_global_clipping_matches_clip_grad_norm_and_survives_a_primary_and_a_worker_kill(
    ray_local,
):
    """--clip-grad-norm in sync mode clips the step's averaged gradient by its norm over all three
    shards, as ``clip_grad_norm_`` after DDP's all-reduce would (the probes go out from the
    backward hooks); clipping changes the result. A primary killed mid-run (its replacement asks
    again for the gradients of a step caught between the two rounds) and a restarted worker end
    with the same hash, every push applied once by the workers' ledgers."""
    optim = OptimConfig(name="sgd", lr=0.05, momentum=0.9, weight_decay=1e-4, clip_grad_norm=0.3)

    def config(kill=None):
        return _config(
            optim=optim,
            cluster=ClusterConfig(num_workers=2, num_servers=3, overlap_comm=True),
            recovery=RecoveryConfig(num_spares=1 if kill else 0),
            chaos=ChaosConfig(kill=kill),
        )

    cfg = config()
    result = Trainer(cfg).fit()
    assert result.updates_applied == result.updates_acknowledged == 24 * 3
    # the norm of a fresh CNN's gradient is above 0.3 at most steps: clipping does something
    clipped = [w["clipped_updates"] for w in result.workers]
    assert clipped[0] == clipped[1] and 12 <= clipped[0] <= 24, clipped
    got = torch.from_numpy(result.final_params)
    torch.testing.assert_close(got, single_process_reference(cfg), rtol=1e-4, atol=2e-5)
    unclipped = single_process_reference(
        _config(optim=dataclasses.replace(optim, clip_grad_norm=None))
    )
    assert not torch.allclose(got, unclipped, rtol=1e-3, atol=1e-3)
    killed = Trainer(config("server:0@step=8,worker:1@step=16")).fit()
    assert sorted(e["role"] for e in killed.recoveries) == ["server", "worker"], killed.recoveries
    assert all(k["how"] != "already gone" for k in killed.kills)
    assert_exactly_once(
        killed.applied_counts,
        read_ledgers(os.environ[LEDGER_DIR_ENV_VAR], killed.run_id),
        2,
        24,
    )
    assert killed.updates_acknowledged == killed.updates_applied == 24 * 3
    assert killed.params_sha256 == result.params_sha256
    assert killed.replicas_match == [True] * 3


def test_batchnorm_buffers_are_reconciled_across_workers(ray_local):
    """ResNet-18's BatchNorm statistics are averaged by the shards; with overlap and 3 shards
    (one installed mid-forward, after earlier BatchNorm layers ran) the result is bitwise the
    run without overlap: the installs keep the buffers autograd saved and the counters of the
    layers that already ran."""
    cfg = _config(
        model=ModelConfig(name="resnet18"),
        data=DataConfig(dataset="synthetic", image_size=8, synthetic_samples=256, batch_size=8),
        steps=3,
        cluster=ClusterConfig(num_workers=2, num_servers=3, overlap_comm=True),
    )
    result = Trainer(cfg).fit()
    plain = Trainer(
        dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, overlap_comm=False))
    ).fit()
    assert result.params_sha256 == plain.params_sha256
    data = load_dataset(cfg.data, cfg.seed)
    init = flatten_state(initial_model(cfg, data))
    final = torch.from_numpy(result.final_params)
    buffers = final[result.num_params :]
    assert buffers.numel() > 0 and torch.isfinite(buffers).all()
    assert not torch.equal(buffers, init[result.num_params :])  # running stats moved
    assert np.isfinite(result.final_loss)


@pytest.mark.extended
def test_adam_trains_mlp_and_loss_falls(ray_local):
    cfg = _config(
        model=ModelConfig(name="mlp"),
        optim=OptimConfig(name="adam", lr=3e-3, schedule="cosine", warmup_steps=5),
        steps=None,
        epochs=2,
        cluster=ClusterConfig(num_workers=2, num_servers=2),
    )
    result = Trainer(cfg).fit()
    assert result.eval_accuracy > 0.8
    assert result.final_loss < 1.0


@pytest.mark.extended
def test_one_worker_with_batchnorm_matches_pytorch_including_running_stats(ray_local):
    """With one worker the reconciled buffers are exactly the worker's own running statistics.
    One step: ResNet-18 with BatchNorm on 8x8 images in batches of 8 is numerically chaotic -- in
    plain PyTorch a 1e-7 change of the initial parameters moves them by 1e-3 after one step and
    1e-2 after two -- so the last-bit differences of the shards' update arithmetic (1.2e-7 here
    after one step) leave the tolerance after the second."""
    cfg = _config(
        model=ModelConfig(name="resnet18"),
        data=DataConfig(dataset="synthetic", image_size=8, synthetic_samples=256, batch_size=8),
        steps=1,
        cluster=ClusterConfig(num_workers=1, num_servers=2),
    )
    result = Trainer(cfg).fit()
    reference = single_process_reference(cfg)
    final = torch.from_numpy(result.final_params)
    torch.testing.assert_close(
        final[result.num_params :], reference[result.num_params :], rtol=1e-4, atol=1e-5
    )
    torch.testing.assert_close(final, reference, rtol=1e-4, atol=1e-4)


def assert_simulated_sgd(cfg, result):
    """Plain SGD with --simulate-compute ends at init - steps * lr * mean of the ranks' fixed
    gradients."""
    from raytrain_ft.actors.worker import SIMULATED_GRAD_SCALE

    init = flatten_state(initial_model(cfg, load_dataset(cfg.data, cfg.seed)))
    grads = [
        torch.randn(init.numel(), generator=torch.Generator().manual_seed(cfg.seed * 1000 + rank))
        * SIMULATED_GRAD_SCALE
        for rank in range(cfg.cluster.num_workers)
    ]
    n = result.num_params
    torch.testing.assert_close(
        torch.from_numpy(result.final_params[:n].copy()),
        init[:n] - cfg.steps * cfg.optim.lr * torch.stack(grads).mean(0)[:n],
        rtol=0,
        atol=1e-6,
    )


def test_simulated_compute_pushes_fixed_gradients_through_the_real_path(ray_local):
    """--simulate-compute: no forward/backward, yet every step's gradient crosses the object store,
    is averaged in rank order and applied: plain SGD ends exactly at init - steps * lr * mean of the
    ranks' fixed gradients. With two ranks per process, ranks 0 and 1 share a process and rank 2 has
    its own; the result is the same. Pre-aggregated (ranks 0 and 1 send one push of their sum) or
    not, the parameters have the same bits."""
    workers, steps, lr = 3, 10, 0.5
    hashes = {}
    for preaggregate in ("true", "false"):
        cfg = _config(
            optim=OptimConfig(name="sgd", lr=lr, momentum=0.0, weight_decay=0.0),
            cluster=ClusterConfig(
                num_workers=workers,
                num_servers=2,
                simulate_compute_ms=20,
                ranks_per_process=2,
                preaggregate=preaggregate,
            ),
            steps=steps,
        )
        r = Trainer(cfg).fit()
        processes = [w["process"] for w in r.workers]
        assert len(set(processes)) == 2 and processes[0] == processes[1] != processes[2]
        pushed = [w["bytes_pushed"] for w in r.workers]
        if preaggregate == "true":  # rank 0 pushes for ranks 0 and 1
            assert r.preaggregated and pushed[1] == 0 and pushed[0] == pushed[2] > 0
        else:
            assert not r.preaggregated and pushed[0] == pushed[1] == pushed[2] > 0
        hashes[preaggregate] = r.params_sha256
        assert_simulated_sgd(cfg, r)
        # the ledgers acknowledge each rank's push, pre-aggregated or not
        assert r.updates_applied == r.updates_acknowledged == steps * 2
        assert [w["samples"] for w in r.workers] == [steps * cfg.data.batch_size] * workers
        assert r.train_time_s >= steps * 0.020  # every step slept its simulated compute
    assert hashes["true"] == hashes["false"]


class _SometimesUsed(nn.Module):
    """A module never used (its own shard) and one used every other forward: with overlap no
    forward hook installs their shards' answers on the steps they sit out."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(64, 10)
        self.odd = nn.Linear(64, 10)
        self.unused = nn.Linear(64, 64)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        x = x.flatten(1)
        out = self.body(x)
        return out + self.odd(x) if self.calls % 2 else out


def test_modules_that_sit_out_a_forward_change_no_value_with_overlap(ray_local):
    """Overlap on equals overlap off bitwise for a model with an unused and a sometimes-used module
    (each on a shard of its own): the shards no forward installed are installed before their next
    push (their second push failed the run before: "shard 2 already has a call outstanding")."""
    hashes = []
    for overlap in (False, True):
        cfg = _config(
            cluster=ClusterConfig(num_workers=2, num_servers=3, overlap_comm=overlap),
            recovery=RecoveryConfig(num_spares=0),
        )
        cfg.steps = 6
        result = Trainer(cfg, model=_SometimesUsed).fit()
        assert result.steps_completed == 6 and result.updates_applied == 6 * 3
        hashes.append(result.params_sha256)
    assert hashes[0] == hashes[1]
