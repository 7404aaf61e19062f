"""Pure state of one parameter-server shard: aggregation in rank order and the optimizer step.

The actor in ``actors/server.py`` wraps this with asyncio waiting; everything
that decides *what* the parameters become lives here and is tested without Ray.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from raytrain_ft.config import OptimConfig
from raytrain_ft.optim import HyperParams, hyper_params, make_optimizer
from raytrain_ft.params import ShardRange


@dataclass(frozen=True, slots=True)
class ShardStats:
    index: int
    step: int
    """Updates applied so far (in sync mode: the step the shard waits for next)."""
    updates_applied: int
    duplicate_pushes: int
    numel: int
    replica_wait_s: float = 0.0
    """Seconds the primary waited for its replica holder to log commands (after applying the update)."""
    replica_bytes_sent: int = 0
    checkpoint_files_read: int = 0


def aggregate_in_rank_order(grads: dict[int, np.ndarray], num_workers: int) -> np.ndarray:
    """Mean of the pushes of ranks ``0..num_workers-1``, summed in rank order (bitwise reproducible).

    With one worker the push itself is returned (it may be a read-only view of
    the object store: callers only read the result).
    """
    missing = [r for r in range(num_workers) if r not in grads]
    if missing:
        raise ValueError(f"cannot aggregate: no gradient from ranks {missing}")
    if num_workers == 1:
        return grads[0]
    acc = np.add(grads[0], grads[1], dtype=np.float32)
    for r in range(2, num_workers):
        acc += grads[r]
    acc /= np.float32(num_workers)
    return acc


class ShardState:
    """Parameters and optimizer state of one key range, advanced one aggregated update at a time."""

    def __init__(self, shard: ShardRange, optim_cfg: OptimConfig, total_steps: int):
        self.shard = shard
        self.optim_cfg = optim_cfg
        self.total_steps = total_steps
        self.params = torch.zeros(shard.size, dtype=torch.float32)
        self.optimizer = make_optimizer(optim_cfg, shard.param_slice.stop)
        self.step = 0
        self.updates_applied = 0

    def load(self, params: np.ndarray | torch.Tensor, step: int = 0, optimizer_state: dict | None = None) -> None:
        values = torch.from_numpy(np.array(params, dtype=np.float32, copy=True))
        if values.numel() != self.shard.size:
            raise ValueError(f"shard {self.shard.index}: got {values.numel()} values, expected {self.shard.size}")
        self.params.copy_(values)
        self.step = step
        if optimizer_state is not None:
            self.optimizer.load_state(optimizer_state)

    def hyper_params(self, step: int) -> HyperParams:
        return hyper_params(step, self.optim_cfg, self.total_steps)

    def apply(self, mean_update: np.ndarray, hp: HyperParams) -> None:
        """Apply one aggregated update: optimizer on the parameter part, assignment on the buffer part."""
        with warnings.catch_warnings():  # read-only object-store views are only read here
            warnings.simplefilter("ignore", UserWarning)
            update = torch.from_numpy(mean_update)
        ps, bs = self.shard.param_slice, self.shard.buffer_slice
        if ps.stop > ps.start:
            self.optimizer.step(self.params[ps], update[ps], hp)
        if bs.stop > bs.start:
            self.params[bs].copy_(update[bs])
        self.step += 1
        self.updates_applied += 1

    def params_copy(self) -> np.ndarray:
        return self.params.numpy().copy()
