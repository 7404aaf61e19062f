"""ParameterServer: the Ray actor of one server slot -- a shard's primary and/or replicas of peers' shards."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from dataclasses import dataclass

import numpy as np

from raytrain_ft.actors import process_address
from raytrain_ft.config import OptimConfig
from raytrain_ft.errors import TrainingError
from raytrain_ft.params import ShardRange
from raytrain_ft.recovery.checkpoint import load_shard_checkpoint, save_shard_checkpoint
from raytrain_ft.recovery.command_log import Command, CommandLog, Snapshot
from raytrain_ft.recovery.replay import replay
from raytrain_ft.shard import ShardState, ShardStats, aggregate_in_rank_order

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ServerDescription:
    """What a server holds (the supervisor rebuilds its tables from these after a restart)."""

    slot: int | None
    shard: int | None
    epoch: int
    step: int
    replica_shards: tuple[int, ...]
    node_id: str
    process: str
    """NODE_IP:PID of the server's process."""


@dataclass(frozen=True, slots=True)
class RecoveryStats:
    replayed: int
    bytes_moved: int
    seconds: float
    step: int


def _die(fault_key: str, spec: str) -> None:
    """A real crash for fault injection: record the kill in Ray's internal KV, then SIGKILL this process."""
    import json

    from ray.experimental import internal_kv

    record = {"kill": spec, "at": time.time(), "how": "SIGKILL (self, mid-snapshot)"}
    internal_kv._internal_kv_put(f"{fault_key}{spec}", json.dumps(record).encode(), overwrite=True)
    os.kill(os.getpid(), signal.SIGKILL)


class ParameterServer:
    """A server slot. As a shard's *primary* it runs sync (BSP) updates:
    ``push_pull(rank, step, grad)`` parks the call until every worker's gradient
    for ``step`` has arrived, aggregates them in rank order, sends the command
    to the shard's replica holder, applies the optimizer slice and -- once the
    holder has logged the command -- answers every parked call with the new
    parameters. A repeated ``(rank, step)`` is answered, never applied twice.
    As a *replica holder* it keeps a ``CommandLog`` per peer shard. A server
    created without a shard is a warm spare.

    Can lose: everything it holds if its process dies. Nothing acknowledged is
    lost with it: the shard is rebuilt from the holder's log, and the replicas
    it held are re-sent by their primaries.
    """

    def __init__(self, slot: int | None, shard: ShardRange | None, optim_cfg: OptimConfig, total_steps: int, num_workers: int,
                 threads: int = 1, snapshot_interval: int = 50, durability: str = "replica", checkpoint_dir: str | None = None, checkpoint_interval: int = 0,
                 faults: dict | None = None, fault_key: str = "", fold_replicas: bool = True):
        import torch

        torch.set_num_threads(threads)
        self.slot = slot
        self.optim_cfg, self.total_steps, self.num_workers = optim_cfg, total_steps, num_workers
        self.snapshot_interval = snapshot_interval
        # durability = the run's recovery mode: replica logs every update at a peer; checkpoint (the
        # baseline) writes files every checkpoint_interval steps instead; none keeps no copy
        self.replicate = durability == "replica"
        self.checkpointing = checkpoint_dir is not None
        self.checkpoint_files_read = 0
        self.checkpoint_dir, self.checkpoint_interval = checkpoint_dir, checkpoint_interval
        self.state = ShardState(shard, optim_cfg, total_steps) if shard is not None else None
        self.epoch = 0
        self.replicas: dict[int, CommandLog] = {}
        self._replica_ranges: dict[int, ShardRange] = {}
        self._folding: set[int] = set()
        self.fold_replicas = fold_replicas
        self._pending: dict[int, dict[int, np.ndarray]] = {}
        self._replies: dict[int, asyncio.Future] = {}
        self._latest: np.ndarray | None = None
        self._previous: np.ndarray | None = None
        self._holder = None
        self._holder_event: asyncio.Event | None = None
        self.duplicate_pushes = 0
        self.replica_bytes_sent = 0
        self.replica_wait_s = 0.0
        self._snapshots_sent = 0
        self._snapshots_received: dict[int, int] = {}
        # fault injection, {trigger: spec}: ("snapshot_send", n) dies after sending the n-th snapshot;
        # ("snapshot_receive", shard, n) dies on receiving shard's n-th snapshot
        self._faults = dict(faults or {})
        self._fault_key = fault_key

    @property
    def _tag(self) -> str:
        shard = self.state.shard.index if self.state else "-"
        return f"[server/{shard} slot={self.slot} step={self.state.step if self.state else '-'}]"

    def _event(self) -> asyncio.Event:
        if self._holder_event is None:
            self._holder_event = asyncio.Event()
        return self._holder_event

    async def ready(self) -> str:
        return process_address()

    async def describe(self) -> ServerDescription:
        import ray

        s = self.state
        return ServerDescription(
            self.slot, s.shard.index if s else None, self.epoch, s.step if s else 0,
            tuple(sorted(self.replicas)),
            ray.get_runtime_context().get_node_id(), process_address(),
        )

    # --- primary: set-up ---------------------------------------------------------

    async def load(self, params: np.ndarray, step: int = 0, optimizer_state: dict | None = None) -> int:
        self._require_primary()
        self.state.load(params, step, optimizer_state)
        self._latest = self.state.params_copy()
        self._previous = None
        if self.checkpointing:  # the baseline can always roll back to the start
            save_shard_checkpoint(self.checkpoint_dir, self.state.shard.index, step, self._latest, self.state.optimizer.state_dict())
        return self.state.step

    def _snapshot(self) -> Snapshot:
        s = self.state
        return Snapshot(s.step, self._latest, s.optimizer.state_dict(), self._previous)

    async def set_replica(self, holder_handle) -> int:
        """Send a full snapshot to ``holder_handle`` and log every later update there. Returns bytes sent."""
        self._require_primary()
        event = self._event()
        self._holder = None
        event.clear()
        snapshot = self._snapshot()
        await holder_handle.install_replica.remote(self.state.shard, snapshot)
        self._holder = holder_handle
        event.set()
        self.replica_bytes_sent += snapshot.nbytes
        logger.info("%s replica of shard %d installed at seq %d (%d bytes)", self._tag, self.state.shard.index, snapshot.seq, snapshot.nbytes)
        return snapshot.nbytes

    async def recover_primary(self, slot: int, shard: ShardRange, holder_handle, epoch: int) -> RecoveryStats:
        """Become shard ``shard``'s primary: fetch its snapshot + log from the holder and replay it."""
        t0 = time.perf_counter()
        snapshot, entries = await holder_handle.export_replica.remote(shard.index)
        result = replay(snapshot, entries, shard, self.optim_cfg, self.total_steps)
        self.slot, self.state, self.epoch = slot, result.state, epoch
        self._latest = self.state.params_copy()
        self._previous = result.previous_params
        self._holder = holder_handle
        self._event().set()
        moved = snapshot.nbytes + sum(c.nbytes for c in entries)
        logger.info("%s rebuilt from replica: %d commands replayed on snapshot seq %d", self._tag, result.replayed, snapshot.seq)
        return RecoveryStats(result.replayed, moved, time.perf_counter() - t0, self.state.step)

    async def restore_checkpoint(self, slot: int, shard: ShardRange, path: str, epoch: int) -> RecoveryStats:
        """Become (or rewind) shard ``shard``'s primary from a checkpoint file: the recovery=checkpoint
        baseline, and resuming a run after a whole-cluster loss (never replica recovery)."""
        t0 = time.perf_counter()
        params, step, opt_state, nbytes = load_shard_checkpoint(path)
        self.checkpoint_files_read += 1
        if self.state is None or self.state.shard.index != shard.index:
            self.state = ShardState(shard, self.optim_cfg, self.total_steps)
        for fut in self._replies.values():  # calls parked on a step that is being rolled back
            if not fut.done():
                fut.set_exception(TrainingError(f"{self._tag} rolled back to checkpoint step {step}"))
        self._pending.clear()
        self._replies.clear()
        self.state.load(params, step, opt_state)
        self.state.updates_applied = step
        self.slot, self.epoch = slot, epoch
        self._latest, self._previous = self.state.params_copy(), None
        return RecoveryStats(0, nbytes, time.perf_counter() - t0, step)

    def assign_slot(self, slot: int) -> None:
        self.slot = slot

    # --- primary: training traffic -------------------------------------------------

    async def pull(self, step: int | None = None) -> np.ndarray:
        """Parameters as of ``step`` (the current one when None; the one before is kept for restarted workers)."""
        self._require_primary()
        if self._latest is None:
            raise TrainingError(f"{self._tag} was never loaded with initial parameters")
        if step is None or step == self.state.step:
            return self._latest
        if step == self.state.step - 1 and self._previous is not None:
            return self._previous
        raise TrainingError(f"{self._tag} cannot serve parameters of step {step}: it holds step {self.state.step} (and the one before)")

    async def push_pull(self, rank: int, step: int, grad: np.ndarray) -> np.ndarray:
        self._require_primary()
        state = self.state
        if step < state.step:
            # already applied (a retried call): answer with the current parameters
            self.duplicate_pushes += 1
            return self._latest  # type: ignore[return-value]
        if step > state.step:
            raise TrainingError(
                f"{self._tag} worker {rank} pushed step {step} ahead of the shard; "
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
            del self._pending[step]
            await self._commit(step, aggregate_in_rank_order(pushes, self.num_workers))
            del self._replies[step]
            reply.set_result(self._latest)
        return await reply

    async def _commit(self, step: int, mean: np.ndarray) -> None:
        """Apply one update; with replication, only return once the holder has logged its command."""
        state = self.state
        hp = state.hyper_params(step)
        command = Command(step, mean, hp)
        snapshot_due = self.replicate and (step + 1) % self.snapshot_interval == 0
        pending = None
        if self.replicate and not snapshot_due and self._holder is not None:
            # .remote() serializes the command now; the holder copies it while we run the optimizer
            pending = (self._holder, self._holder.append.remote(state.shard.index, command, None))
        previous = self._latest
        state.apply(mean, hp)
        self._latest, self._previous = state.params_copy(), previous
        if self.replicate:
            snapshot = self._snapshot() if snapshot_due else None
            t0 = time.perf_counter()
            await self._log(command, snapshot, pending)
            self.replica_wait_s += time.perf_counter() - t0
        if self.checkpointing and state.step % self.checkpoint_interval == 0:
            save_shard_checkpoint(self.checkpoint_dir, state.shard.index, state.step, self._latest, state.optimizer.state_dict())

    async def _log(self, command: Command, snapshot: Snapshot | None, pending) -> None:
        import ray

        while True:
            if pending is None:
                holder = self._holder
                if holder is None:  # the holder died: wait for the supervisor to give us a new one
                    await self._event().wait()
                    continue
                pending = (holder, holder.append.remote(self.state.shard.index, command, snapshot))
                if snapshot is not None:
                    self._snapshots_sent += 1
                    spec = self._faults.get(("snapshot_send", self._snapshots_sent))
                    if spec:
                        logger.warning("%s fault injection: dying while snapshot %d is in flight", self._tag, self._snapshots_sent)
                        _die(self._fault_key, spec)
            holder, ref = pending
            try:
                await ref
                self.replica_bytes_sent += command.nbytes + (snapshot.nbytes if snapshot else 0)
                return
            except ray.exceptions.RayActorError:
                logger.warning("%s replica holder died while logging seq %d; waiting for a new one", self._tag, command.seq)
                if self._holder is holder:
                    self._holder = None
                    self._event().clear()
                pending = None

    # --- replica holder ------------------------------------------------------------

    async def install_replica(self, shard: ShardRange, snapshot: Snapshot) -> int:
        self.replicas[shard.index] = CommandLog.from_snapshot(snapshot)
        self._replica_ranges[shard.index] = shard
        return self.replicas[shard.index].next_seq

    async def append(self, shard: int, command: Command, snapshot: Snapshot | None = None) -> int:
        log = self.replicas.get(shard)
        if log is None:
            raise TrainingError(f"[replica slot={self.slot}] holds no replica of shard {shard}")
        log.append(command)
        if snapshot is not None:
            n = self._snapshots_received[shard] = self._snapshots_received.get(shard, 0) + 1
            spec = self._faults.get(("snapshot_receive", shard, n))
            if spec:
                logger.warning("[replica slot=%s] fault injection: dying while installing snapshot %d of shard %d", self.slot, n, shard)
                _die(self._fault_key, spec)
            log.install_snapshot(snapshot)
        if self.fold_replicas and shard not in self._folding:
            self._folding.add(shard)
            asyncio.get_running_loop().create_task(self._fold(shard))
        return log.next_seq

    async def _fold(self, shard: int) -> None:
        """Apply logged commands to the replica once the acknowledgement is on its way (off the critical path)."""
        try:
            await asyncio.sleep(0)
            log = self.replicas.get(shard)
            if log is not None:
                log.catch_up(self._replica_ranges[shard], self.optim_cfg, self.total_steps)
        finally:
            self._folding.discard(shard)

    async def export_replica(self, shard: int) -> tuple[Snapshot, list[Command]]:
        log = self.replicas.get(shard)
        if log is None:
            raise TrainingError(f"[replica slot={self.slot}] holds no replica of shard {shard}")
        return log.snapshot, list(log.entries)

    # --- both ------------------------------------------------------------------------

    def _require_primary(self) -> None:
        if self.state is None:
            raise TrainingError(f"[server slot={self.slot}] is not a primary (a spare or a dedicated replica holder)")

    async def stats(self) -> ShardStats:
        self._require_primary()
        s = self.state
        return ShardStats(s.shard.index, s.step, s.updates_applied, self.duplicate_pushes, s.shard.size, self.replica_wait_s, self.replica_bytes_sent,
                          self.checkpoint_files_read)
