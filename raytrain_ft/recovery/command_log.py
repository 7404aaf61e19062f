"""The replica of one shard: a snapshot plus the command log of the updates applied since.

A *command* is everything needed to redo one update: its ``seq`` (in sync mode
the step), the aggregated update vector and the optimizer hyper-parameters in
force. The replica holder appends a command before the primary acknowledges
the update to any worker, so every acknowledged update is in some log.

Arrays are copied on the way in: a command must not depend on memory owned by
another process (an object-store value dies with the actor that put it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from raytrain_ft.optim import HyperParams


class LogGapError(ValueError):
    """A command arrived with a ``seq`` beyond the next one the log expects (a lost command)."""


def _owned(array: np.ndarray) -> np.ndarray:
    return np.array(array, dtype=np.float32, copy=True)


@dataclass(frozen=True, slots=True)
class Command:
    seq: int
    """Position in the shard's update order (sync mode: the step the update belongs to)."""
    update: np.ndarray
    """Aggregated update [shard.size] float32: gradient mean on the parameter part, buffer values
    after it."""
    hp: HyperParams
    """Optimizer hyper-parameters in force for this update."""
    pushes: tuple = ()
    """(rank, step) of each worker push the update aggregates; replay advances the same per-rank
    clocks and applied record, so a push resent after a recovery is still recognised."""
    residuals: tuple = ()
    """(rank, step, array): the pushing workers' error-feedback residuals after these pushes (lossy
    codecs), so a restarted worker resumes with exactly the residual it had."""
    staleness: int = 0
    """The update's staleness (shard updates between its stalest gradient's parameters and it):
    replay rebuilds the shard's staleness histogram, so a lost primary's share is kept."""
    clip_factor: float | None = None
    """Global gradient clipping: the factor already in ``update`` (a probe resent after a recovery
    is answered it)."""
    skipped: bool = False
    """fp16 loss scaling: a push of this update overflowed, so it changes nothing but the
    bookkeeping (``update`` is empty)."""

    @property
    def nbytes(self) -> int:
        return int(self.update.nbytes) + sum(int(a.nbytes) for _, _, a in self.residuals)


@dataclass(frozen=True, slots=True)
class Snapshot:
    seq: int
    """Updates applied before it was taken (the next command's seq)."""
    params: np.ndarray
    """Shard values [shard.size] after update ``seq - 1``."""
    optimizer_state: dict
    """``FlatOptimizer.state_dict()`` at that point."""
    previous_params: np.ndarray | None = None
    """Shard values before update ``seq - 1`` (a worker that restarts mid-step pulls these), if
    known."""
    clocks: dict | None = None
    """Per rank: the next step the shard expects from it (``ShardState.clocks``)."""
    applied: dict | None = None
    """Per rank: times each step's push went into an update (``ShardState.applied``)."""
    residuals: dict | None = None
    """Per rank: its newest error-feedback residuals as [(step, array)]
    (``ShardState.residuals``)."""
    staleness: dict | None = None
    """{staleness: updates} of every update so far (``ShardState.staleness``)."""
    clip_factors: dict | None = None
    """Per rank: [(step, factor)] of its newest clipped pushes (``ShardState.clip_factors``)."""
    skipped: dict | None = None
    """Per rank: its steps whose updates were skipped (``ShardState.skipped``)."""
    earlier_params: np.ndarray | None = None
    """Shard values before update ``seq - 2``, if known and kept (``keeps_earlier``)."""
    keeps_earlier: bool = False
    """--durability pipelined: a shard may be two updates ahead of a rebuilt peer, so a restarted
    worker may need the values two updates back; logs and replays keep them too."""

    @property
    def nbytes(self) -> int:
        n = self.params.nbytes + sum(
            v.numel() * v.element_size() for v in self.optimizer_state.get("state", {}).values()
        )
        n += sum(a.nbytes for items in (self.residuals or {}).values() for _, a in items)
        n += sum(a.nbytes for a in (self.previous_params, self.earlier_params) if a is not None)
        return int(n)

    def owned(self) -> Snapshot:
        prev = _owned(self.previous_params) if self.previous_params is not None else None
        state = {
            "step_count": self.optimizer_state.get("step_count", 0),
            "state": {k: v.clone() for k, v in self.optimizer_state.get("state", {}).items()},
        }
        applied = {r: bytes(c) for r, c in (self.applied or {}).items()}
        residuals = {
            r: [(s, _owned(a)) for s, a in items] for r, items in (self.residuals or {}).items()
        }
        return Snapshot(
            self.seq,
            _owned(self.params),
            state,
            prev,
            dict(self.clocks or {}),
            applied,
            residuals,
            dict(self.staleness or {}),
            {r: list(items) for r, items in (self.clip_factors or {}).items()},
            {r: list(steps) for r, steps in (self.skipped or {}).items()},
            _owned(self.earlier_params) if self.earlier_params is not None else None,
            self.keeps_earlier,
        )


@dataclass(slots=True)
class CommandLog:
    """Replica of one shard held by a peer: ``snapshot`` + ``entries`` (seq snapshot.seq,
    snapshot.seq+1, ...).

    ``catch_up()`` folds the entries into the snapshot by applying them to a live
    shard state the log keeps (the holder calls it after acknowledging), so a
    recovery moves one state instead of a long history and replays almost
    nothing. The result is the same as replaying later: the same commands, the
    same code, in order.
    """

    snapshot: Snapshot
    entries: list[Command] = field(default_factory=list)
    duplicates: int = 0
    folded: int = 0
    """Commands applied into the snapshot by ``catch_up``."""
    _state: object = None
    _previous: object = None
    _earlier: object = None
    """keeps_earlier: the values before the update before the last (None until known)."""
    _previous_known: bool = False

    @classmethod
    def from_snapshot(cls, snapshot: Snapshot) -> CommandLog:
        return cls(snapshot.owned())

    @property
    def next_seq(self) -> int:
        return self.snapshot.seq + len(self.entries)

    def append(self, command: Command) -> bool:
        """Add the next command; a seq already held is ignored (a retried send). Returns True if
        added."""
        if command.seq < self.next_seq:
            self.duplicates += 1
            return False
        if command.seq > self.next_seq:
            raise LogGapError(
                f"command seq {command.seq} arrived, the log expects {self.next_seq}: a command is "
                "missing"
            )
        residuals = tuple((r, s, _owned(a)) for r, s, a in command.residuals)
        # an owned copy of every field (replace keeps the ones not named: none is dropped)
        self.entries.append(
            dataclasses.replace(
                command,
                update=_owned(command.update),
                pushes=tuple(command.pushes),
                residuals=residuals,
            )
        )
        return True

    def install_snapshot(self, snapshot: Snapshot) -> int:
        """Swap in a newer snapshot and drop the commands it covers. Returns how many were
        dropped."""
        if snapshot.seq < self.snapshot.seq:
            return 0  # stale (re-sent) snapshot
        if snapshot.seq > self.next_seq:
            raise LogGapError(
                f"snapshot at seq {snapshot.seq} is ahead of the log (next seq {self.next_seq})"
            )
        dropped = snapshot.seq - self.snapshot.seq
        self.entries = [c for c in self.entries if c.seq >= snapshot.seq]
        self.snapshot = snapshot.owned()
        self._state = None  # rebuilt from the new snapshot at the next catch_up
        return dropped

    def catch_up(self, shard, optim_cfg, total_steps: int) -> int:
        """Apply the logged commands to the snapshot in place; returns how many were applied."""
        import torch

        from raytrain_ft.shard import ShardState

        if not self.entries:
            return 0
        if self._state is None:
            state = ShardState(shard, optim_cfg, total_steps)
            state.load_snapshot(self.snapshot)
            self._state = state
            self._previous = torch.zeros_like(state.params)
            if self.snapshot.previous_params is not None:
                self._previous.copy_(torch.from_numpy(self.snapshot.previous_params))
            earlier = self.snapshot.earlier_params
            self._earlier = torch.from_numpy(earlier.copy()) if earlier is not None else None
            self._previous_known = self.snapshot.previous_params is not None
        state, previous = self._state, self._previous
        applied = 0
        for command in self.entries:
            if self.snapshot.keeps_earlier:
                # the values before the last update become the ones two back
                if not self._previous_known:
                    self._earlier = None
                elif self._earlier is None:
                    self._earlier = previous.clone()
                else:
                    self._earlier.copy_(previous)
            previous.copy_(state.params)
            self._previous_known = True
            state.apply_command(command)
            applied += 1
        self.entries = []
        self.folded += applied
        # views of the live state: serialized (copied) whenever the snapshot is sent
        self.snapshot = Snapshot(
            state.seq,
            state.params.numpy(),
            {"step_count": state.optimizer.step_count, "state": state.optimizer.state},
            previous.numpy(),
            state.clocks,
            state.applied,
            state.residuals,
            state.staleness,
            state.clip_factors,
            state.skipped,
            self._earlier.numpy() if self._earlier is not None else None,
            self.snapshot.keeps_earlier,
        )
        return applied

    @property
    def nbytes(self) -> int:
        return self.snapshot.nbytes + sum(c.nbytes for c in self.entries)
