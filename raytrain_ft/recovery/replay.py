"""``replay(snapshot, entries) -> state``: rebuild a shard from its replica, deterministically.

The primary applied each command with ``ShardState.apply``; replay applies the
same commands with the same function from the same starting values, so the
rebuilt parameters and optimizer state are bitwise equal to the lost ones.
Entries at or below the state's seq are skipped, so replaying an entry twice
changes nothing. Seq is the order in which the primary applied updates (in
async modes, arrival order), so replay reproduces that order exactly; each
command's (rank, step) pushes rebuild the per-rank clocks that recognise a
resent push.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raytrain_ft.config import OptimConfig
from raytrain_ft.params import ShardRange
from raytrain_ft.recovery.command_log import Command, LogGapError, Snapshot
from raytrain_ft.shard import ShardState


@dataclass(slots=True)
class Replayed:
    state: ShardState
    previous_params: np.ndarray | None
    """Values before the last update (None when nothing was replayed and the snapshot lacks
    them)."""
    replayed: int
    """Commands applied on top of the snapshot."""
    earlier_params: np.ndarray | None = None
    """Values before the update before the last (``Snapshot.keeps_earlier``; None if unknown)."""


def replay(
    snapshot: Snapshot,
    entries: list[Command],
    shard: ShardRange,
    optim_cfg: OptimConfig,
    total_steps: int,
) -> Replayed:
    state = ShardState(shard, optim_cfg, total_steps)
    state.load_snapshot(snapshot)
    previous = (
        None if snapshot.previous_params is None else np.array(snapshot.previous_params, copy=True)
    )
    earlier = snapshot.earlier_params
    earlier = np.array(earlier, copy=True) if earlier is not None else None
    replayed = 0
    for command in entries:
        if command.seq < state.seq:
            continue  # already in the state (duplicate entry)
        if command.seq > state.seq:
            raise LogGapError(
                f"shard {shard.index}: replay expected seq {state.seq}, found {command.seq}"
            )
        earlier = previous if snapshot.keeps_earlier else None
        previous = state.params_copy()
        state.apply_command(command)
        replayed += 1
    state.updates_applied = state.seq
    return Replayed(state, previous, replayed, earlier)
