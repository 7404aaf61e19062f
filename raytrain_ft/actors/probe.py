"""What an exchange costs on this cluster, measured before ``--num-servers auto`` picks the shard
count (``raytrain_ft.sharding.choose_num_servers`` decides; this module only measures).

A throwaway actor (no torch: it starts in about a second) answers calls shaped like a shard's: a
push of ``values / S`` float32 values sent as the run sends it (inside the call, in parts of at
most INLINE_BYTES up to PARTS_MAX_BYTES, else through the object store) and a reply of as many
values coming back the same way (``reply_parts``): one call alone, and W calls at once (the W
workers' pushes to one shard). The optimizer step and the sum of a push are timed here with the
run's own optimizer.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from raytrain_ft.actors import NAMESPACE, inline_parts
from raytrain_ft.actors.transport import reply_parts
from raytrain_ft.config import TrainConfig
from raytrain_ft.sharding import ExchangeCosts, auto_server_candidates

PROBE_REPEATS = 7
"""Round trips timed per candidate shard count (the median is kept, after one warm-up call)."""
BATCH_REPEATS = 3
"""Rounds of W calls at once timed per candidate shard count (the median is kept)."""
PROBE_MAX_VALUES = 1 << 20
"""The optimizer step and a push's sum are timed on at most this many values, then scaled."""


class CallProbe:
    """Answers ``exchange`` as a shard answers a push: ``n_out`` inline parts of a reply of
    ``n_values`` float32 values (one return when ``n_out`` is 0)."""

    def __init__(self):
        self._replies: dict[int, np.ndarray] = {}

    def exchange(self, n_values: int, n_out: int, *push):
        reply = self._replies.get(n_values)
        if reply is None:
            reply = self._replies[n_values] = np.zeros(n_values, dtype=np.float32)
        if n_out == 0:
            return reply
        return tuple(np.array_split(reply, n_out))


def shard_round(handle, n_values: int, at_once: int = 1):
    """A function sending ``at_once`` shard-shaped calls of ``n_values`` values to ``handle``
    together and waiting until all have come back."""
    import ray

    payload = np.full(n_values, 1e-3, dtype=np.float32)
    parts = inline_parts(payload)
    args = parts if parts is not None else (payload,)
    n_out = reply_parts(payload.nbytes)
    method = handle.exchange.options(num_returns=max(1, n_out))

    def round_trip() -> None:
        refs = [method.remote(n_values, n_out, *args) for _ in range(at_once)]
        ray.get([r for call in refs for r in (call if isinstance(call, list) else [call])])

    return round_trip


def _calls_s(handle, n_values: int, at_once: int = 1, repeats: int = PROBE_REPEATS) -> float:
    """Median seconds of ``shard_round`` (after one round that warms the actor's caches)."""
    round_trip = shard_round(handle, n_values, at_once)
    round_trip()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        round_trip()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _update_costs(cfg: TrainConfig, num_values: int, total_steps: int) -> tuple[float, float]:
    """(optimizer step, sum of one push) in seconds per value, with the run's optimizer."""
    import torch

    from raytrain_ft.optim import hyper_params, make_optimizer

    n = max(1, min(num_values, PROBE_MAX_VALUES))
    opt = make_optimizer(cfg.optim, n)
    hp = hyper_params(0, cfg.optim, total_steps)
    param, grad, acc = torch.zeros(n), torch.full((n,), 1e-3), torch.zeros(n)

    def median_s(fn) -> float:
        fn()
        times = []
        for _ in range(5):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.cluster.server_threads)  # as a server runs its update
    try:
        step_s, add_s = (
            median_s(lambda: opt.step(param, grad, hp)),
            median_s(lambda: acc.add_(grad)),
        )
    finally:
        torch.set_num_threads(threads)
    return step_s / n, add_s / n


def measure_exchange_costs(cfg: TrainConfig, num_values: int, total_steps: int) -> ExchangeCosts:
    """Time a shard-shaped round trip for each candidate shard count on the running Ray (from the
    driver: on the head node for a submitted job), and the shards' update in this process with a
    server's torch threads."""
    import ray

    probe = ray.remote(CallProbe).options(num_cpus=0, namespace=NAMESPACE).remote()
    sizes = {s: -(-num_values // s) for s in auto_server_candidates(num_values)}
    workers = cfg.cluster.num_workers
    try:
        call_s = _calls_s(probe, 0)
        round_trips = {s: _calls_s(probe, n) for s, n in sizes.items()}
        batches = {
            s: _calls_s(probe, n, workers, BATCH_REPEATS) if workers > 1 else round_trips[s]
            for s, n in sizes.items()
        }
    finally:
        ray.kill(probe)
    update_s, add_s = _update_costs(cfg, num_values, total_steps)
    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    if cfg.mode != "sync":  # the workers compute while the servers work
        cpus = max(1.0, cpus - workers * cfg.cluster.cpus_per_worker)
    return ExchangeCosts(call_s, round_trips, batches, update_s, add_s, cpus)
