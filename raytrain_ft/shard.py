"""Pure state of one parameter-server shard: parameters, optimizer state, per-rank clocks, one
update at a time.

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
    seq: int
    """Updates applied so far (in sync mode: the step the shard waits for next)."""
    updates_applied: int
    duplicate_pushes: int
    numel: int
    replica_wait_s: float = 0.0
    """Seconds the primary waited for its replica holder to log commands (after applying the
    update)."""
    replica_bytes_sent: int = 0
    checkpoint_files_read: int = 0
    late_pushes: int = 0
    """Sync with backup workers: pushes that arrived after their step closed (dropped)."""
    staleness_histogram: dict | None = None
    """{staleness: updates}: how many shard updates happened between a gradient's parameters and its
    application."""
    clock_lead_max: int = 0
    """SSP: the most steps any worker was ahead of the slowest when the shard let it go on."""
    replica_appends: int = 0
    """Append calls that carried this shard's commands to its holder (group commit: several commands
    per call)."""
    clock_trace: tuple = ()
    """SSP: (rank, its clock, slowest clock) each time the shard let a worker start its next
    step."""
    snapshot_interval: int = 0
    """The snapshot interval in force at the end (what ``auto`` chose; 0 without replication)."""
    snapshots_sent: int = 0
    cpu_s: float = 0.0
    """CPU seconds of the server process holding this primary, since it started (its primary's
    and its replicas' work; set by the actor)."""


class ShardState:
    """Parameters and optimizer state of one key range, advanced one aggregated update at a time."""

    def __init__(self, shard: ShardRange, optim_cfg: OptimConfig, total_steps: int):
        self.shard = shard
        self.optim_cfg = optim_cfg
        self.total_steps = total_steps
        self.params = torch.zeros(shard.size, dtype=torch.float32)
        self.optimizer = make_optimizer(optim_cfg, shard.param_slice.stop)
        self.seq = 0
        """Updates applied (the command log's next seq; in sync mode also the step the shard waits
        for)."""
        self.updates_applied = 0
        self.clocks: dict[int, int] = {}
        """Per rank: the next step this shard expects from it (every update's pushes advance it)."""
        self.applied: dict[int, bytearray] = {}
        """Per rank: how many times each of its steps' pushes went into an update (the record an
        independent ledger of acknowledged pushes is checked against: every acknowledged push counts
        exactly 1)."""
        self.residuals: dict[int, list] = {}
        """Per rank: [(step, error-feedback residual after that step's push)], the newest two (lossy
        codecs)."""
        self.staleness: dict[int, int] = {}
        """{staleness: updates} over every update applied (replicated: a rebuilt primary keeps its
        predecessors' share)."""
        self.clip_factors: dict[int, list] = {}
        """Per rank: [(step, clip factor)] of its newest two pushes applied with global clipping (a
        probe resent after its update was applied is answered the factor the update had)."""
        self.skipped: dict[int, list[int]] = {}
        """Per rank: its steps whose updates were skipped because a push overflowed (fp16 loss
        scaling; what the rank's loss scale is a function of)."""

    def load(
        self,
        params: np.ndarray | torch.Tensor,
        seq: int = 0,
        optimizer_state: dict | None = None,
        clocks: dict | None = None,
        applied: dict | None = None,
        residuals: dict | None = None,
        staleness: dict | None = None,
        clip_factors: dict | None = None,
        skipped: dict | None = None,
    ) -> None:
        values = torch.from_numpy(np.array(params, dtype=np.float32, copy=True))
        if values.numel() != self.shard.size:
            raise ValueError(
                f"shard {self.shard.index}: got {values.numel()} values, expected {self.shard.size}"
            )
        self.params.copy_(values)
        self.seq = seq
        if optimizer_state is not None:
            self.optimizer.load_state(optimizer_state)
        self.clocks = dict(clocks or {})
        self.applied = {int(r): bytearray(c) for r, c in (applied or {}).items()}
        self.residuals = {
            int(r): [(s, np.array(a, dtype=np.float32, copy=True)) for s, a in items]
            for r, items in (residuals or {}).items()
        }
        self.staleness = {int(k): int(v) for k, v in (staleness or {}).items()}
        self.clip_factors = {int(r): list(items) for r, items in (clip_factors or {}).items()}
        self.skipped = {int(r): [int(t) for t in steps] for r, steps in (skipped or {}).items()}

    def load_snapshot(self, snapshot) -> None:
        """Load a ``recovery.command_log.Snapshot`` (every replicated field)."""
        self.load(
            snapshot.params,
            snapshot.seq,
            snapshot.optimizer_state,
            snapshot.clocks,
            snapshot.applied,
            snapshot.residuals,
            snapshot.staleness,
            snapshot.clip_factors,
            snapshot.skipped,
        )

    def apply_command(self, command) -> None:
        """Redo a logged ``recovery.command_log.Command`` exactly as the primary applied it."""
        self.apply(
            command.update,
            command.hp,
            command.pushes,
            command.residuals,
            command.staleness,
            command.clip_factor,
            command.skipped,
        )

    def hyper_params(self, step: int) -> HyperParams:
        return hyper_params(step, self.optim_cfg, self.total_steps)

    def apply(
        self,
        mean_update: np.ndarray,
        hp: HyperParams,
        pushes: tuple = (),
        residuals: tuple = (),
        staleness: int = 0,
        clip_factor: float | None = None,
        skipped: bool = False,
    ) -> None:
        """Apply one aggregated update: optimizer on the parameter part, assignment on the buffer
        part (``skipped``: neither -- a push overflowed -- only the bookkeeping below).
        ``pushes``: the (rank, step) pairs it aggregates (advances those ranks' clocks);
        ``residuals``: (rank, step, array) of the pushing workers' error-feedback residuals;
        ``staleness``: the update's, counted in the histogram; ``clip_factor``: global clipping's
        factor, already in ``mean_update`` (kept to answer resent probes)."""
        if skipped:
            for rank, step in pushes:
                self.skipped.setdefault(rank, []).append(step)
        else:
            with warnings.catch_warnings():  # read-only object-store views are only read here
                warnings.simplefilter("ignore", UserWarning)
                update = torch.from_numpy(mean_update)
            ps, bs = self.shard.param_slice, self.shard.buffer_slice
            if ps.stop > ps.start:
                self.optimizer.step(self.params[ps], update[ps], hp)
            if bs.stop > bs.start:
                self.params[bs].copy_(update[bs])
        self.seq += 1
        self.updates_applied += 1
        for rank, step in pushes:
            if step + 1 > self.clocks.get(rank, 0):
                self.clocks[rank] = step + 1
            counts = self.applied.setdefault(rank, bytearray())
            if step >= len(counts):
                counts.extend(bytes(step + 1 - len(counts)))
            counts[step] = min(255, counts[step] + 1)
        for rank, step, residual in residuals:
            self.residuals[rank] = (self.residuals.get(rank, []) + [(step, residual)])[-2:]
        self.staleness[staleness] = self.staleness.get(staleness, 0) + 1
        if clip_factor is not None:
            for rank, step in pushes:
                self.clip_factors[rank] = (self.clip_factors.get(rank, []) + [(step, clip_factor)])[
                    -2:
                ]

    def skipped_of(self, rank: int | None) -> tuple | None:
        """The steps of ``rank`` whose updates were skipped (None: none, or no rank)."""
        steps = self.skipped.get(rank) if rank is not None else None
        return tuple(steps) if steps else None

    def clip_factor_of(self, rank: int, step: int) -> float | None:
        """The clip factor the update holding push ``(rank, step)`` was applied with (None: not
        among the newest two)."""
        return next((f for s, f in self.clip_factors.get(rank, []) if s == step), None)

    def params_copy(self) -> np.ndarray:
        return self.params.numpy().copy()

    def residual_before(self, rank: int, step: int) -> np.ndarray | None:
        """The residual ``rank`` had after its last push before ``step`` (what it resumes ``step``
        with)."""
        earlier = [(s, a) for s, a in self.residuals.get(rank, []) if s < step]
        return max(earlier, key=lambda sa: sa[0])[1] if earlier else None

    def residuals_copy(self) -> dict:
        return {r: [(s, a.copy()) for s, a in items] for r, items in self.residuals.items()}

    def was_applied(self, rank: int, step: int) -> bool:
        counts = self.applied.get(rank)
        return counts is not None and step < len(counts) and counts[step] > 0

    def clip_factors_copy(self) -> dict[int, list]:
        return {r: list(items) for r, items in self.clip_factors.items()}

    def skipped_copy(self) -> dict[int, list[int]]:
        return {r: list(steps) for r, steps in self.skipped.items()}

    def applied_copy(self) -> dict[int, bytes]:
        return {r: bytes(c) for r, c in self.applied.items()}
