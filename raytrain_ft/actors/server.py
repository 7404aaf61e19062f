"""ParameterServer: the Ray actor of one server slot -- a shard's primary and/or replicas of peers' shards."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import time
from dataclasses import dataclass

import numpy as np

from raytrain_ft.actors import NAMESPACE, PARTS_MAX_BYTES, inline_parts, process_address, watch_supervisor
from raytrain_ft.compression import decode_push
from raytrain_ft.config import OptimConfig
from raytrain_ft.consistency import PushBuffer, Rule, Verdict, add_to_histogram, may_proceed, mean_in_rank_order, slowest_clock
from raytrain_ft.errors import TrainingError
from raytrain_ft.params import ShardRange
from raytrain_ft.recovery.checkpoint import load_shard_checkpoint, save_shard_checkpoint
from raytrain_ft.recovery.command_log import Command, CommandLog, Snapshot
from raytrain_ft.recovery.replay import replay
from raytrain_ft.shard import ShardState, ShardStats

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ServerDescription:
    """What a server holds (the supervisor rebuilds its tables from these after a restart)."""

    slot: int | None
    shard: int | None
    epoch: int
    step: int
    replica_shards: tuple[int, ...]
    clocks: tuple[int, ...]
    """Per rank: the next step the shard expects from it (a restarted worker resumes there in async modes)."""
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
    """A server slot. As a shard's *primary* it applies updates under the run's
    consistency ``Rule``: ``push_pull(rank, step, grad, ...)`` buffers the push
    until its update is complete (all ranks of the step in sync mode, the
    first N with backup workers, the rank's group in mixed mode, the push
    alone in async/ssp), aggregates in rank order, gives the update the next
    ``seq``, applies it and queues its command for the shard's replica holder;
    the calls are answered once the holder has logged it (group commit: one
    append call carries every command queued meanwhile, in seq order). A
    repeated ``(rank, step)`` is answered, never applied twice. In ssp mode the
    answer also waits until the rank is at most ``staleness`` steps ahead of
    the slowest rank.
    As a *replica holder* it keeps a ``CommandLog`` per peer shard. A server
    created without a shard is a warm spare.

    Can lose: everything it holds if its process dies. Nothing acknowledged is
    lost with it: the shard is rebuilt from the holder's log, and the replicas
    it held are re-sent by their primaries.
    """

    def __init__(self, slot: int | None, shard: ShardRange | None, optim_cfg: OptimConfig, total_steps: int, num_workers: int,
                 threads: int = 1, snapshot_interval: int = 50, durability: str = "replica", checkpoint_dir: str | None = None, checkpoint_interval: int = 0,
                 faults: dict | None = None, fault_key: str = "", fold_replicas: bool = True, rule: Rule | None = None, run_id: str = "",
                 metrics: bool = True):
        import torch

        from raytrain_ft.actors.metrics import SERVER_METRICS, Recorder

        torch.set_num_threads(threads)
        self.slot = slot
        self.optim_cfg, self.total_steps, self.num_workers = optim_cfg, total_steps, num_workers
        self.rule = rule or Rule("sync", num_workers)
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
        self._buffer = PushBuffer(self.rule)
        self._replies: dict[tuple[int, int], asyncio.Future] = {}
        self._latest: np.ndarray | None = None
        self._stale_latest = False
        self._previous: np.ndarray | None = None
        self._holder = None
        self._outbox: list[tuple[Command, Snapshot | None, asyncio.Future]] = []
        self._sending = False
        self._gate: list[tuple[int, asyncio.Future]] = []
        self.duplicate_pushes = 0
        self.late_pushes = 0
        self.staleness: dict[int, int] = {}
        self.clock_trace: list[tuple[int, int, int]] = []
        self.replica_bytes_sent = 0
        self.replica_appends = 0
        self.replica_wait_s = 0.0
        self._snapshots_sent = 0
        self._snapshots_received: dict[int, int] = {}
        # fault injection, {trigger: spec}: ("snapshot_send", n) dies after sending the n-th snapshot;
        # ("snapshot_receive", shard, n) dies on receiving shard's n-th snapshot
        self._faults = dict(faults or {})
        self._fault_key = fault_key
        self.metrics = Recorder(run_id, SERVER_METRICS if metrics else ())
        watch_supervisor(run_id, NAMESPACE)
        self._logged_seq = 0
        """Updates of this shard the replica holder has logged (replica lag = applied - logged)."""

    def _metric_tags(self) -> dict:
        return {"shard": str(self.state.shard.index)}

    @property
    def _tag(self) -> str:
        shard = self.state.shard.index if self.state else "-"
        return f"[server/{shard} slot={self.slot} step={self.state.step if self.state else '-'}]"

    async def ready(self) -> str:
        return process_address()

    async def describe(self) -> ServerDescription:
        import ray

        s = self.state
        clocks = tuple((s.step if not self.rule.per_rank_clocks else s.clocks.get(r, 0)) for r in range(self.num_workers)) if s else ()
        return ServerDescription(
            self.slot, s.shard.index if s else None, self.epoch, s.step if s else 0,
            tuple(sorted(self.replicas)), clocks,
            ray.get_runtime_context().get_node_id(), process_address(),
        )

    # --- primary: set-up ---------------------------------------------------------

    async def load(self, params: np.ndarray, step: int = 0, optimizer_state: dict | None = None) -> int:
        self._require_primary()
        self.state.load(params, step, optimizer_state)
        self._latest, self._previous, self._stale_latest = self.state.params_copy(), None, False
        self._logged_seq = step
        if self.checkpointing:  # the baseline can always roll back to the start
            save_shard_checkpoint(self.checkpoint_dir, self.state.shard.index, step, self._latest, self.state.optimizer.state_dict())
        return self.state.step

    def _snapshot(self) -> Snapshot:
        s = self.state
        return Snapshot(s.step, self._params_now(), s.optimizer.state_dict(), self._previous, dict(s.clocks))

    async def set_replica(self, holder_handle) -> int:
        """Send a full snapshot to ``holder_handle`` and log every later update there. Returns bytes sent."""
        self._require_primary()
        self._holder = None  # commands queue up (unacknowledged) until the new holder has the snapshot
        snapshot = self._snapshot()
        await holder_handle.install_replica.remote(self.state.shard, snapshot)
        self._logged_seq = max(self._logged_seq, snapshot.seq)
        self._holder = holder_handle
        self._flush()  # commands applied while the snapshot travelled (the holder ignores those it covers)
        self.replica_bytes_sent += snapshot.nbytes
        logger.info("%s replica of shard %d installed at seq %d (%d bytes)", self._tag, self.state.shard.index, snapshot.seq, snapshot.nbytes)
        return snapshot.nbytes

    async def recover_primary(self, slot: int, shard: ShardRange, holder_handle, epoch: int) -> RecoveryStats:
        """Become shard ``shard``'s primary: fetch its snapshot + log from the holder and replay it."""
        t0 = time.perf_counter()
        snapshot, entries = await holder_handle.export_replica.remote(shard.index)
        result = replay(snapshot, entries, shard, self.optim_cfg, self.total_steps)
        self.slot, self.state, self.epoch = slot, result.state, epoch
        self._latest, self._previous, self._stale_latest = self.state.params_copy(), result.previous_params, False
        self._holder = holder_handle
        self._logged_seq = self.state.step  # every replayed update came from the holder's log
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
        self._buffer.clear()
        self._replies.clear()
        self.state.load(params, step, opt_state)
        self.state.updates_applied = step
        self.slot, self.epoch = slot, epoch
        self._latest, self._previous, self._stale_latest = self.state.params_copy(), None, False
        self._logged_seq = step
        return RecoveryStats(0, nbytes, time.perf_counter() - t0, step)

    def assign_slot(self, slot: int) -> None:
        self.slot = slot

    # --- primary: training traffic -------------------------------------------------

    def _params_now(self) -> np.ndarray:
        """The current parameters as an array no later update changes (copied at most once per update)."""
        if self._stale_latest:
            self._latest, self._stale_latest = self.state.params_copy(), False
        return self._latest  # type: ignore[return-value]

    async def pull(self, step: int | None = None) -> tuple[np.ndarray, int, int]:
        """(parameters, seq, 0) as of ``step`` (the current ones when None; sync keeps the step before too, for
        a worker that restarts mid-step); the same shape as a ``push_pull`` reply."""
        self._require_primary()
        if self._latest is None:
            raise TrainingError(f"{self._tag} was never loaded with initial parameters")
        if step is None or step == self.state.step:
            return self._params_now(), self.state.step, 0
        if step == self.state.step - 1 and self._previous is not None:
            return self._previous, step, 0
        raise TrainingError(f"{self._tag} cannot serve parameters of step {step}: it holds step {self.state.step} (and the one before)")

    async def push_pull(self, rank: int, step: int, grad, base_version: int | None = None, want_params: bool = True) -> tuple:
        """Apply ``rank``'s push of ``step`` under the consistency rule. ``grad``: float32 [shard.size] or an
        ``Encoded`` push; ``base_version``: the seq of the parameters it was computed on. Returns
        (parameters or None, seq of those parameters, updates this push is acknowledged in: seq + 1 of its update)."""
        self._require_primary()
        state, rule = self.state, self.rule
        verdict = rule.classify(rank, step, state.step, state.clocks.get(rank, 0))
        if verdict is Verdict.AHEAD:
            raise TrainingError(f"{self._tag} worker {rank} pushed step {step} ahead of the shard; in sync mode a worker may only push the step the shard waits for")
        if verdict is Verdict.ACCEPT:
            key, complete = self._buffer.add(rank, step, decode_push(grad), state.step if base_version is None else base_version)
            reply = self._replies.get(key)
            if reply is None:
                reply = self._replies[key] = asyncio.get_running_loop().create_future()
            if complete is not None:
                del self._replies[key]
                try:
                    seq = await self._commit(step, complete)
                except BaseException as e:
                    reply.set_exception(e)
                    raise
                reply.set_result(seq)
            acked = await reply
        else:
            if verdict is Verdict.LATE:
                self.late_pushes += 1
            else:
                self.duplicate_pushes += 1
            # a sync repeat was applied as update `step`; async repeats carry no seq (the first answer did)
            acked = step + 1 if verdict is Verdict.REPEAT and not rule.per_rank_clocks else 0
        if rule.mode == "ssp":
            await self._clock_gate(rank)
        if not want_params:
            return None, state.step, acked
        # plain sync: no later update can exist yet (step + 1 needs this worker's next push), so these are
        # exactly the parameters of step + 1
        return self._params_now(), state.step, acked

    async def push_pull_parts(self, rank: int, step: int, base_version: int | None, want_params: bool, *parts: np.ndarray) -> tuple:
        """``push_pull`` of a dense gradient sent as consecutive parts, each small enough to travel inside the call."""
        return await self.push_pull(rank, step, np.concatenate(parts), base_version, want_params)

    async def _commit(self, step: int, pending) -> int:
        """Apply one update; with replication, only return once the holder has logged its command. Returns seq + 1."""
        state, rule = self.state, self.rule
        seq = state.step
        update = mean_in_rank_order(pending.grads)
        stalest = max(seq - v for v in pending.base_versions.values())
        add_to_histogram(self.staleness, stalest)
        hp = state.hyper_params(step)
        scale = rule.lr_scale(len(pending.grads), stalest)
        if scale != 1.0:
            hp = dataclasses.replace(hp, lr=hp.lr * scale)
        pushes = tuple((r, step) for r in sorted(pending.grads)) if rule.per_rank_clocks else ()
        command = Command(seq, update, hp, pushes)
        snapshot_due = self.replicate and (seq + 1) % self.snapshot_interval == 0
        done = None
        if self.replicate:
            done = asyncio.get_running_loop().create_future()
            self._outbox.append((command, None, done))
            if not snapshot_due:
                self._flush()  # .remote() serializes the commands now; the holder copies them while we apply
        if rule.exact_resume:  # a worker restarting mid-step pulls the parameters before this update
            self._previous = self._params_now()
        state.apply(update, hp, pushes)
        self._stale_latest = True
        if self.metrics.enabled:
            tags = self._metric_tags()
            self.metrics.inc("updates", 1, tags)
            self.metrics.observe("staleness", stalest, tags)
            self.metrics.set("replica_lag_seq", state.step - self._logged_seq if self.replicate else 0, tags)
        if self.replicate:
            if snapshot_due:
                self._outbox[-1] = (command, self._snapshot(), done)
                self._flush()
            t0 = time.perf_counter()
            await done
            self.replica_wait_s += time.perf_counter() - t0
        if rule.mode == "ssp":
            self._open_gate()
        if self.checkpointing and state.step % self.checkpoint_interval == 0:
            save_shard_checkpoint(self.checkpoint_dir, state.shard.index, state.step, self._params_now(), state.optimizer.state_dict())
        return seq + 1

    async def _clock_gate(self, rank: int) -> None:
        """SSP: return once ``rank`` is at most ``staleness`` steps ahead of the slowest rank."""
        clocks = self.state.clocks
        if not may_proceed(clocks, rank, self.rule):
            fut = asyncio.get_running_loop().create_future()
            self._gate.append((rank, fut))
            await fut
        slowest = slowest_clock(clocks, self.num_workers)
        self.clock_trace.append((rank, clocks.get(rank, 0), slowest))

    def _open_gate(self) -> None:
        clocks = self.state.clocks
        waiting = []
        for rank, fut in self._gate:
            if may_proceed(clocks, rank, self.rule):
                if not fut.done():
                    fut.set_result(None)
            else:
                waiting.append((rank, fut))
        self._gate = waiting

    def _flush(self) -> None:
        """Send every queued command to the holder in one call, unless a send is in flight (its completion sends the rest)."""
        if self._sending or not self._outbox or self._holder is None:
            return
        import ray

        batch, self._outbox = self._outbox, []
        snapshots = [snap for _, snap, _ in batch if snap is not None]
        snapshot = snapshots[-1] if snapshots else None
        holder = self._holder
        commands = [c for c, _, _ in batch]
        if snapshot is None and sum(c.nbytes for c in commands) <= PARTS_MAX_BYTES:  # inside the call, no object store
            parts = [inline_parts(c.update) for c in commands]
            ref = holder.append_parts.remote(self.state.shard.index, [dataclasses.replace(c, update=None) for c in commands],
                                             [len(p) for p in parts], *[a for p in parts for a in p])
        else:
            ref = holder.append.remote(self.state.shard.index, commands, snapshot)
        self._sending = True
        if snapshot is not None:
            self._snapshots_sent += 1
            spec = self._faults.get(("snapshot_send", self._snapshots_sent))
            if spec:
                logger.warning("%s fault injection: dying while snapshot %d is in flight", self._tag, self._snapshots_sent)
                _die(self._fault_key, spec)

        async def finish() -> None:
            try:
                await ref
                self.replica_bytes_sent += sum(c.nbytes for c, _, _ in batch) + (snapshot.nbytes if snapshot else 0)
                self.replica_appends += 1
                self._logged_seq = max(self._logged_seq, batch[-1][0].seq + 1)
                self.metrics.set("replica_lag_seq", self.state.step - self._logged_seq, self._metric_tags())
                for _, _, fut in batch:
                    if not fut.done():
                        fut.set_result(None)
            except ray.exceptions.RayActorError:
                logger.warning("%s replica holder died while logging seq %d..%d; waiting for a new one", self._tag, batch[0][0].seq, batch[-1][0].seq)
                if self._holder is holder:
                    self._holder = None  # set_replica with a new holder sends the queue again
                self._outbox = batch + self._outbox  # resent to the new holder (it ignores what its snapshot covers)
            except ray.exceptions.RayError as e:  # the holder refused the commands (a bug): fail the waiting calls
                for _, _, fut in batch:
                    if not fut.done():
                        fut.set_exception(TrainingError(f"{self._tag} replica holder refused seq {batch[0][0].seq}..{batch[-1][0].seq}: {e}"))
            finally:
                self._sending = False
                self._flush()

        asyncio.get_running_loop().create_task(finish())

    # --- replica holder ------------------------------------------------------------

    async def install_replica(self, shard: ShardRange, snapshot: Snapshot) -> int:
        self.replicas[shard.index] = CommandLog.from_snapshot(snapshot)
        self._replica_ranges[shard.index] = shard
        return self.replicas[shard.index].next_seq

    async def append(self, shard: int, commands: list[Command], snapshot: Snapshot | None = None) -> int:
        """Log ``commands`` (consecutive seqs; ones already held are ignored), then install ``snapshot`` if given."""
        log = self.replicas.get(shard)
        if log is None:
            raise TrainingError(f"[replica slot={self.slot}] holds no replica of shard {shard}")
        for command in commands:
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

    async def append_parts(self, shard: int, commands: list[Command], counts: list[int], *parts: np.ndarray) -> int:
        """``append`` of commands sent without their update vectors, which follow as ``counts[i]`` parts each."""
        it = iter(parts)
        whole = [dataclasses.replace(c, update=np.concatenate([next(it) for _ in range(n)])) for c, n in zip(commands, counts)]
        return await self.append(shard, whole)

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
        lead = max((clock - slowest for _, clock, slowest in self.clock_trace), default=0)
        return ShardStats(s.shard.index, s.step, s.updates_applied, self.duplicate_pushes, s.shard.size, self.replica_wait_s, self.replica_bytes_sent,
                          self.checkpoint_files_read, self.late_pushes, dict(self.staleness), lead, self.replica_appends, tuple(self.clock_trace))
