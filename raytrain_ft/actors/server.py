"""ParameterServer: the Ray actor that owns one shard (key range) of the flat parameter vector."""

from __future__ import annotations

import asyncio
import logging

import numpy as np

from raytrain_ft.config import OptimConfig
from raytrain_ft.errors import TrainingError
from raytrain_ft.params import ShardRange
from raytrain_ft.shard import ShardState, ShardStats, aggregate_in_rank_order

logger = logging.getLogger(__name__)


class ParameterServer:
    """Shard actor for sync (BSP) training.

    ``push_pull(rank, step, grad)`` parks the call until every worker's gradient
    for ``step`` has arrived, aggregates them in rank order, applies the
    optimizer slice, and answers every parked call with the new parameters.
    A repeated ``(rank, step)`` is answered, never applied twice.

    Can lose: everything it holds if its process dies (parameters, optimizer
    state, the partial gradients of the step in progress).
    """

    def __init__(self, shard: ShardRange, optim_cfg: OptimConfig, total_steps: int, num_workers: int, threads: int = 1):
        import torch

        torch.set_num_threads(threads)
        self.state = ShardState(shard, optim_cfg, total_steps)
        self.num_workers = num_workers
        self._pending: dict[int, dict[int, np.ndarray]] = {}
        self._replies: dict[int, asyncio.Future] = {}
        self._latest: np.ndarray | None = None
        self.duplicate_pushes = 0
        self._tag = f"[server/{shard.index}"

    async def ready(self) -> int:
        return self.state.shard.index

    async def load(self, params: np.ndarray, step: int = 0, optimizer_state: dict | None = None) -> int:
        self.state.load(params, step, optimizer_state)
        self._latest = self.state.params_copy()
        return self.state.step

    async def pull(self) -> np.ndarray:
        """Current parameters of the shard (no waiting)."""
        if self._latest is None:
            raise TrainingError(f"server {self.state.shard.index} was never loaded with initial parameters")
        return self._latest

    async def push_pull(self, rank: int, step: int, grad: np.ndarray) -> np.ndarray:
        state = self.state
        if step < state.step:
            # already applied (a retried call): answer with the current parameters
            self.duplicate_pushes += 1
            return self._latest  # type: ignore[return-value]
        if step > state.step:
            raise TrainingError(
                f"{self._tag} step={state.step}] worker {rank} pushed step {step} ahead of the shard; "
                "a worker may only push the step the shard is waiting for in sync mode"
            )
        pushes = self._pending.setdefault(step, {})
        if rank in pushes:
            self.duplicate_pushes += 1
        pushes[rank] = grad
        reply = self._replies.get(step)
        if reply is None:
            reply = self._replies[step] = asyncio.get_running_loop().create_future()
        if len(pushes) == self.num_workers:
            mean = aggregate_in_rank_order(pushes, self.num_workers)
            state.apply(mean, state.hyper_params(step))
            self._latest = state.params_copy()
            del self._pending[step]
            del self._replies[step]
            reply.set_result(self._latest)
        return await reply

    async def stats(self) -> ShardStats:
        s = self.state
        return ShardStats(s.shard.index, s.step, s.updates_applied, self.duplicate_pushes, s.shard.size)
