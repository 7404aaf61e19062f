"""What every server of a run shares (light: the supervisor builds it without importing torch)."""

from __future__ import annotations

from dataclasses import dataclass

from raytrain_ft.config import OptimConfig
from raytrain_ft.consistency import Rule


@dataclass(frozen=True, slots=True)
class ServerSpec:
    """What every server of a run shares."""

    optim: OptimConfig
    total_steps: int
    num_workers: int
    rule: Rule
    snapshot_interval: int | str = 50
    """Updates between snapshots to the holder, or "auto" (``recovery.policy.SnapshotPolicy``)."""
    expected_mtbf_s: float = 3600.0
    """snapshot_interval auto: the mean time between server failures planned for."""
    unlogged: int = 0
    """recovery.durability relaxed:K: updates a primary may acknowledge before its holder logged
    them (0: strict)."""
    replicate: bool = True
    """False with recovery=none or checkpoint: no holder; updates count as logged once applied."""
    fold: bool = True
    """Holders fold acknowledged commands into their snapshot (a recovery then moves one state)."""
    checkpoint_interval: int = 0
    """Write a checkpoint file every this many updates (0: never)."""
    pipelined: bool = False
    """--durability pipelined (sync): workers may be answered before the log, so one shard may
    run two updates ahead of a rebuilt peer; primaries keep the values two updates back."""
