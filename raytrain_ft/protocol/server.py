"""The parameter server's protocol: a shard's primary, replica holder of peers' shards, or a warm
spare.

Pure: requests, replies, failures and timers in; effects out (``messages``).
The Ray actor (``actors/server.py``) and the simulator (``sim/``) both only
deliver messages to a ``ServerProtocol`` and carry out what it returns.

**Primary.** A push is classified by the run's consistency ``Rule``; an
accepted one waits in a ``PushBuffer`` until its update is complete (every
rank of the step in sync mode, the first N with backup workers, the rank's
group in mixed mode, the push alone in async/ssp), is aggregated in rank
order (a sync or mixed push may carry the sum of the ranks of one process,
counted as each of theirs: ``consistency.mean_in_rank_order``), gets the next
``seq``, is applied and queued as a ``Command`` for the shard's replica holder. One
``Append`` is in flight at a time and carries every command queued meanwhile
(group commit). **No reply leaves before the holder has logged every update
it reflects**: a reply waits until ``logged`` reaches the seq the answer
depends on (in sync modes, the seq of the parameters it carries), so whatever
a worker has seen survives the primary's death. A repeated ``(rank, step)``
is answered, never applied twice.

**Holder.** Keeps a ``CommandLog`` per peer shard and a *fence*: the epoch of
the primary allowed to write. ``ExportReplica(epoch)`` raises the fence before
it hands the replica to a successor, so a primary that was only suspected dead
(still alive, still sending) can no longer change the replica its successor
was built from: its ``Append`` is refused with ``FENCED`` and it steps down,
failing its waiting calls so their workers ask for the new route. A holder
asked for a replica it never got refuses (``NO_REPLICA``) and fences the
shard's older epochs all the same, so a late install cannot make it the only
copy of updates after the supervisor turned to the holder named before it.

**Spare.** ``RecoverPrimary`` fetches the snapshot + log from the holder,
replays it (``recovery.replay``) and serves as the primary of the new epoch,
logging to the same holder.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from raytrain_ft.compression import decode_push
from raytrain_ft.consistency import (
    DelayCompensation,
    PushBuffer,
    Verdict,
    may_proceed,
    mean_in_rank_order,
    slowest_clock,
)
from raytrain_ft.optim import squared_norm
from raytrain_ft.params import ShardRange
from raytrain_ft.protocol.messages import (
    Address,
    Append,
    AppendAck,
    Call,
    Depose,
    Describe,
    Exported,
    ExportReplica,
    Failure,
    Fold,
    InspectReplica,
    InstallReplica,
    Load,
    Note,
    Pull,
    Push,
    PushReply,
    Recovered,
    RecoverPrimary,
    RefusalKind,
    Refused,
    Reinstate,
    ReplicaInfo,
    Reply,
    SaveCheckpoint,
    ServerDescription,
    SetReplica,
    Timer,
)
from raytrain_ft.protocol.spec import ServerSpec
from raytrain_ft.recovery.command_log import Command, CommandLog, LogGapError, Snapshot
from raytrain_ft.recovery.policy import SnapshotPolicy
from raytrain_ft.recovery.replay import replay
from raytrain_ft.shard import ShardState, ShardStats

RETRY_APPEND_S = 0.05
"""Seconds before an append that got no answer (holder unreachable) is sent again."""


@dataclass(slots=True)
class _Held:
    """A reply waiting until the holder has logged ``need`` updates (and, in ssp, the rank may go
    on)."""

    rid: int
    need: int
    acked: int
    want_params: bool
    rank: int | None = None
    late: bool = False
    step: int | None = None
    """Pulls of exactly one step (sync restarts)."""
    gate: bool = False
    """ssp: a push's reply also waits until its rank is at most ``staleness`` steps ahead of the
    slowest."""
    pull: Pull | None = None
    early: bool = False
    """--durability pipelined: may be answered once every update before the push's is logged."""


_NOTHING = np.zeros(0, np.float32)
"""The update of a skipped command (fp16: a push overflowed)."""


@dataclass(slots=True)
class _Clipped:
    """Global gradient clipping: one update between its two phases."""

    step: int
    probes: list = field(default_factory=list)
    """rids of first-phase pushes waiting for the update's squared norm."""
    factor: float | None = None
    """The clip factor, from the first second-phase push."""
    pending: object = None
    """Once every push is in: the ``Pending`` pushes, their aggregate (None when skipped) and its
    squared norm."""
    update: np.ndarray | None = None
    sq_norm: float = 0.0


@dataclass(slots=True)
class _Primary:
    shard: ShardRange
    epoch: int
    state: ShardState
    buffer: PushBuffer
    logged: int
    durable_clocks: dict[int, int]
    holder: Address | None = None
    holder_ready: bool = False
    outbox: list = field(default_factory=list)
    """(Command, Snapshot or None) not yet sent to the holder, in seq order."""
    in_flight: tuple | None = None
    """(cid, holder, batch) of the one Append on its way."""
    install: tuple | None = None
    """(holder, snapshot) of the InstallReplica on its way."""
    waiting: dict = field(default_factory=dict)
    """Update key -> [(rid, want_params, rank)] of pushes buffered in an update not yet complete."""
    clipped: dict = field(default_factory=dict)
    """Update key -> ``_Clipped``: global clipping's updates waiting for a phase."""
    held: list[_Held] = field(default_factory=list)
    latest: np.ndarray | None = None
    out: np.ndarray | None = None
    """What replies hand workers (``latest``, or its look-ahead with per-stream momentum)."""
    stale: bool = True
    previous: np.ndarray | None = None
    earlier: np.ndarray | None = None
    """--durability pipelined: the values before the update before the last."""
    deposed: bool = False
    fenced_at: int | None = None
    """Deposed by the holder's fence at this epoch (a FENCED append or install)."""
    checkpoint_step: int | None = None
    replica_version: int = -1
    """The ``SetReplica.version`` of the holder in use."""
    handed_out: dict = field(default_factory=dict)
    """Delay compensation: version -> the parameters replies carried at that version (recent
    ones)."""
    compensation: DelayCompensation | None = None
    snapshots: SnapshotPolicy | None = None
    """snapshot_interval auto: the interval this primary chooses as it measures."""
    last_snapshot_seq: int = 0
    last_commit_at: float | None = None


@dataclass(slots=True)
class _Replica:
    shard: ShardRange
    log: CommandLog
    fence: int


class ServerProtocol:
    """One server process's protocol state. ``clock`` gives seconds (only for the stats it
    keeps)."""

    def __init__(
        self,
        name: Address,
        spec: ServerSpec,
        clock: Callable[[], float] = lambda: 0.0,
        node: str = "",
        process: str = "",
    ):
        self.name = name
        self.node, self.process = node, process
        self.spec = spec
        self.clock = clock
        self.primary: _Primary | None = None
        self.replicas: dict[int, _Replica] = {}
        self.refused_exports: dict[int, int] = {}
        """Per shard this server holds no replica of: the newest epoch whose export it refused.
        An install from an older epoch is fenced, so "no replica" stays true for the primaries a
        recovery at that epoch replaces (the supervisor may then rebuild from an earlier holder)."""
        self._cids = itertools.count(1)
        self._calls: dict[int, tuple] = {}
        self._recovery: tuple | None = None
        """(rid, RecoverPrimary, cid) while this spare rebuilds a shard."""
        # stats (reported, never used for decisions)
        self.duplicate_pushes = 0
        self.late_pushes = 0
        self.clock_trace: list[tuple[int, int, int]] = []
        self.replica_bytes_sent = 0
        self.replica_appends = 0
        self.replica_wait_s = 0.0
        self._commit_times: dict[int, float] = {}
        self.snapshots_sent = 0
        self.snapshots_received: dict[int, int] = {}
        self.checkpoint_files_read = 0

    # --- entry points
    # -------------------------------------------------------------------------------

    def on_request(self, rid: int, msg) -> list:
        handler = _REQUESTS.get(type(msg))
        if handler is None:
            return [
                Reply(
                    rid,
                    Refused(
                        RefusalKind.FAILED,
                        f"server {self.name} does not handle {type(msg).__name__}",
                    ),
                )
            ]
        return handler(self, rid, msg)

    def on_reply(self, cid: int, value) -> list:
        call = self._calls.pop(cid, None)
        if call is None:
            return []
        return _REPLIES[call[0]](self, call, value)

    def on_failure(self, cid: int, failure: Failure) -> list:
        call = self._calls.pop(cid, None)
        if call is None:
            return []
        return _REPLIES[call[0]](self, call, failure)

    def on_timer(self, token) -> list:
        p = self.primary
        if p is None or p.deposed:
            return []
        if token == "retry_append":
            return self._flush()
        if (
            token == "retry_install"
            and not p.holder_ready
            and p.install is None
            and p.holder is not None
        ):
            return [self._install(p, None)]
        return []

    def fold(self, shard: int) -> int:
        """Fold shard ``shard``'s logged commands into its snapshot (the ``Fold`` effect). Returns
        commands folded."""
        r = self.replicas.get(shard)
        if r is None:
            return 0
        return r.log.catch_up(r.shard, self.spec.optim, self.spec.total_steps)

    # --- calls it makes
    # -----------------------------------------------------------------------------

    def _call(self, kind: str, dst: Address, msg, *context) -> Call:
        cid = next(self._cids)
        self._calls[cid] = (kind, *context)
        return Call(cid, dst, msg)

    # --- primary: set-up
    # ---------------------------------------------------------------------------

    def _new_primary(self, shard: ShardRange, epoch: int, state: ShardState) -> _Primary:
        return _Primary(
            shard,
            epoch,
            state,
            PushBuffer(self.spec.rule),
            logged=state.seq,
            durable_clocks=dict(state.clocks),
            compensation=(
                DelayCompensation(self.spec.rule.delay_compensation)
                if self.spec.rule.delay_compensation
                else None
            ),
            snapshots=(
                SnapshotPolicy(self.spec.fold, self.spec.expected_mtbf_s, failovers=epoch - 1)
                if self.spec.snapshot_interval == "auto"
                else None
            ),
            last_snapshot_seq=state.seq,
        )

    def _on_load(self, rid: int, m: Load) -> list:
        stale = self._stale(m.shard.index, m.epoch)
        if stale is not None:
            return [Reply(rid, stale)]
        effects = self._step_down("rolled back to a checkpoint") if self.primary is not None else []
        state = ShardState(m.shard, self.spec.optim, self.spec.total_steps)
        state.load(m.params, m.seq, m.optimizer_state, skipped=m.skipped)
        state.updates_applied = m.seq
        self.primary = p = self._new_primary(m.shard, m.epoch, state)
        if m.checkpoint_step is not None:
            self.checkpoint_files_read += 1
            p.checkpoint_step = m.checkpoint_step
        elif self.spec.checkpoint_interval:  # the baseline can always roll back to the start
            effects.append(self._checkpoint(p))
        return effects + [Reply(rid, state.seq)]

    def _stale(self, shard: int, epoch: int) -> Refused | int | None:
        """A command for an epoch this server has already served past (a delayed message) is
        refused; the same epoch again is answered as done (a repeated command); None: carry it
        out."""
        p = self.primary
        if p is None or p.shard.index != shard:
            return None
        if epoch < p.epoch:
            return Refused(
                RefusalKind.FENCED,
                f"{self.name} serves shard {shard} at epoch {p.epoch}, newer than {epoch}",
            )
        return p.state.seq if epoch == p.epoch else None

    def _on_set_replica(self, rid: int, m: SetReplica) -> list:
        p = self.primary
        if p is None or p.deposed:
            return [Reply(rid, self._not_primary())]
        if m.version < p.replica_version:
            return [
                Reply(
                    rid,
                    Refused(
                        RefusalKind.FENCED, f"holder {m.holder} was named before the holder in use"
                    ),
                )
            ]
        p.holder, p.holder_ready, p.replica_version = m.holder, False, m.version
        return [self._install(p, rid)]

    def _install(self, p: _Primary, rid: int | None) -> Call:
        snapshot = self._snapshot(p)
        p.install = (p.holder, snapshot)
        return self._call(
            "install", p.holder, InstallReplica(p.shard, p.epoch, snapshot), p.holder, snapshot, rid
        )

    def _installed(self, call: tuple, value) -> list:
        _, holder, snapshot, rid = call
        p = self.primary

        def answer(v) -> list:
            return [Reply(rid, v)] if rid is not None else []

        if p is None or p.deposed or p.install is None or p.install[1] is not snapshot:
            return answer(
                Refused(
                    RefusalKind.NO_REPLICA, f"the install of a replica on {holder} was superseded"
                )
            )
        p.install = None
        if isinstance(value, Refused) and value.kind is RefusalKind.FENCED:
            p.fenced_at = value.fence
            return answer(value) + self._step_down(value.reason)
        if isinstance(value, (Refused, Failure)):
            why = value.reason if isinstance(value, Refused) else f"holder {holder}: {value.value}"
            retry = (
                [Timer("retry_install", RETRY_APPEND_S)]
                if rid is None and value in (Failure.UNAVAILABLE, Failure.LOST)
                else []
            )
            return (
                answer(
                    Refused(
                        RefusalKind.NO_REPLICA,
                        f"replica of shard {p.shard.index} not installed: {why}",
                    )
                )
                + retry
            )
        p.holder_ready = True
        self.replica_bytes_sent += snapshot.nbytes
        self._advance_logged(p, snapshot.seq, snapshot.clocks or {})
        effects = [
            Note(
                "replica_installed",
                {
                    "shard": p.shard.index,
                    "holder": holder,
                    "seq": snapshot.seq,
                    "bytes": snapshot.nbytes,
                },
            )
        ]
        return effects + answer(snapshot.nbytes) + self._flush() + self._release()

    def _on_recover_primary(self, rid: int, m: RecoverPrimary) -> list:
        p = self.primary
        if p is not None and p.shard.index != m.shard.index:
            return [
                Reply(
                    rid,
                    Refused(
                        RefusalKind.FAILED,
                        f"{self.name} is already the primary of shard {p.shard.index}",
                    ),
                )
            ]
        stale = self._stale(m.shard.index, m.epoch)
        if isinstance(stale, Refused):
            return [Reply(rid, stale)]
        if stale is not None:
            return [Reply(rid, Recovered(p.state.seq, 0, 0))]
        if self._recovery is not None and self._recovery[1].epoch > m.epoch:
            return [
                Reply(
                    rid,
                    Refused(
                        RefusalKind.FENCED,
                        f"{self.name} is recovering shard {m.shard.index} at a newer epoch",
                    ),
                )
            ]
        # a recovery the supervisor repeats with a newer epoch (it restarted meanwhile): the state
        # it has, if any, is replaced once the new export arrives
        superseded = []
        if self._recovery is not None:
            superseded = [
                Reply(
                    self._recovery[0],
                    Refused(RefusalKind.FENCED, f"recovery at epoch {m.epoch} supersedes it"),
                )
            ]
            self._recovery = None
        if self._rebuilt_before(m.shard.index) and p.holder == m.holder:
            # rebuilt at an older epoch of this recovery (the answer was lost, the supervisor asks
            # again): the holder has nothing this server lacks, so it serves on at the new epoch
            return superseded + self._serve_on(rid, m.epoch)
        call = self._call("export", m.holder, ExportReplica(m.shard.index, m.epoch), rid, m)
        self._recovery = (rid, m, call.cid)
        return superseded + [call]

    def _exported(self, call: tuple, value) -> list:
        _, rid, m = call
        if self._recovery is None or self._recovery[0] != rid:
            return []
        self._recovery = None
        cannot = isinstance(value, Failure) or (
            isinstance(value, Refused) and value.kind is RefusalKind.NO_REPLICA
        )
        if cannot and self._rebuilt_before(m.shard.index) and self.primary.epoch < m.epoch:
            # the holder named this time cannot give the replica, but this server was rebuilt at
            # an older epoch of the same recovery from the newest copy: it has every acknowledged
            # update (a recovering slot's spare is routed no worker, so it has served none since)
            return self._serve_on(rid, m.epoch)
        if isinstance(value, Failure):
            kind = RefusalKind.HOLDER_LOST if value is Failure.DEAD else RefusalKind.RETRY
            return [
                Reply(
                    rid, Refused(kind, f"holder {m.holder} of shard {m.shard.index}: {value.value}")
                )
            ]
        if isinstance(value, Refused):
            return [Reply(rid, value)]
        result = replay(
            value.snapshot, list(value.entries), m.shard, self.spec.optim, self.spec.total_steps
        )
        effects = self._step_down(f"rebuilt at epoch {m.epoch}") if self.primary is not None else []
        p = self.primary = self._new_primary(m.shard, m.epoch, result.state)
        p.previous, p.earlier = result.previous_params, result.earlier_params
        p.holder, p.holder_ready = (
            m.holder,
            True,
        )  # the holder keeps the log it exported, fenced at our epoch
        moved = value.snapshot.nbytes + sum(c.nbytes for c in value.entries)
        return effects + [
            Note(
                "primary_recovered",
                {
                    "shard": m.shard.index,
                    "epoch": m.epoch,
                    "seq": p.state.seq,
                    "replayed": result.replayed,
                },
            ),
            Reply(
                rid,
                Recovered(
                    p.state.seq, result.replayed, moved, tuple(sorted(p.state.clocks.items()))
                ),
            ),
        ]

    def _on_reinstate(self, rid: int, m: Reinstate) -> list:
        p = self.primary
        if (
            p is not None
            and p.shard.index == m.shard
            and p.deposed
            and p.fenced_at is not None
            and p.fenced_at <= m.fenced_upto
        ):
            # deposed only by the abandoned recovery's fence: nothing serves past it, and it has
            # every update it acknowledged (waiting pushes were refused; their workers send again)
            p.deposed, p.fenced_at = False, None
        if not self._rebuilt_before(m.shard):
            return [
                Reply(
                    rid,
                    Refused(
                        RefusalKind.NO_REPLICA,
                        f"{self.name} no longer serves shard {m.shard} (deposed or replaced)",
                    ),
                )
            ]
        stale = self._stale(m.shard, m.epoch)
        if isinstance(stale, Refused):
            return [Reply(rid, stale)]
        return self._serve_on(rid, m.epoch)

    def _rebuilt_before(self, shard: int) -> bool:
        """This server is ``shard``'s primary and not deposed (a spare asked again for a rebuild it
        finished, a primary told to serve on)."""
        p = self.primary
        return p is not None and p.shard.index == shard and not p.deposed

    def _serve_on(self, rid: int, epoch: int) -> list:
        """Go on serving the shard, as it is, at the newer ``epoch``."""
        p = self.primary
        p.epoch = epoch
        clocks = tuple(sorted(p.state.clocks.items()))
        return [
            Note("reinstated", {"shard": p.shard.index, "epoch": epoch}),
            Reply(rid, Recovered(p.state.seq, 0, 0, clocks)),
        ]

    def _on_depose(self, rid: int, m: Depose) -> list:
        p = self.primary
        if p is not None and p.shard.index == m.shard and p.epoch < m.epoch and not p.deposed:
            return self._step_down(f"epoch {m.epoch} serves shard {m.shard}") + [Reply(rid, True)]
        return [Reply(rid, False)]

    def _step_down(self, reason: str) -> list:
        """Stop serving: every waiting call is refused (its worker asks for the new route)."""
        p = self.primary
        p.deposed = True
        refusal = Refused(
            RefusalKind.FENCED, f"shard {p.shard.index} epoch {p.epoch} on {self.name}: {reason}"
        )
        rids = [h.rid for h in p.held] + [w[0] for waiting in p.waiting.values() for w in waiting]
        rids += [rid for c in p.clipped.values() for rid in c.probes]
        p.held, p.waiting, p.clipped = [], {}, {}
        p.buffer.clear()
        p.outbox = []
        return [Note("deposed", {"shard": p.shard.index, "epoch": p.epoch, "reason": reason})] + [
            Reply(rid, refusal) for rid in rids
        ]

    # --- primary: training traffic
    # -----------------------------------------------------------------

    def _not_primary(self) -> Refused:
        if self.primary is not None and self.primary.deposed:
            return Refused(
                RefusalKind.FENCED,
                f"{self.name} was deposed as primary of shard {self.primary.shard.index}",
            )
        return Refused(
            RefusalKind.NOT_PRIMARY, f"{self.name} is not a primary (a spare or a replica holder)"
        )

    def _on_push(self, rid: int, m: Push) -> list:
        p = self.primary
        if p is None or p.deposed:
            return [Reply(rid, self._not_primary())]
        state, rule = p.state, self.spec.rule
        if m.ranks and m.ranks != (summed := rule.sum_members(m.rank)):
            return [
                Reply(
                    rid,
                    Refused(
                        RefusalKind.FAILED,
                        f"shard {p.shard.index}: a pre-aggregated push of ranks {m.ranks} does "
                        f"not match the ranks this run sums together ({summed}; pre-aggregation "
                        "needs sync mode without backup workers, or mixed mode whose groups are "
                        "the processes)",
                    ),
                )
            ]
        verdict = self._classify(p, m)
        if verdict is Verdict.AHEAD:
            return [
                Reply(
                    rid,
                    Refused(
                        RefusalKind.FAILED,
                        f"shard {p.shard.index}: worker {m.rank} pushed step {m.step}, ahead of "
                        "the "
                        f"shard's step {state.seq}; in sync mode a worker may only push the step "
                        "the shard waits for",
                    ),
                )
            ]
        if verdict is Verdict.ACCEPT:
            if m.probe or m.clip_factor is not None:
                return self._accept_clipped(p, rid, m)
            return self._accept(p, rid, m)
        if m.probe:  # its update was applied: answer the factor it had (its phase 2 is a repeat)
            factor = state.clip_factor_of(m.rank, m.step)
            if factor is None:
                return [
                    Reply(
                        rid,
                        Refused(
                            RefusalKind.CANNOT_SERVE,
                            f"shard {p.shard.index}: the clip factor of worker {m.rank}'s step "
                            f"{m.step} is no longer kept (the shard is at update {state.seq})",
                        ),
                    )
                ]
            return [Reply(rid, PushReply(None, state.seq, 0, clip_factor=factor))]
        if verdict is Verdict.LATE:
            self.late_pushes += 1
            p.held.append(_Held(rid, state.seq, 0, m.want_params, m.rank, late=True))
        else:
            self.duplicate_pushes += 1
            # a sync repeat was applied as update `step`; async repeats carry no seq (the first
            # answer did)
            acked = m.step + 1 if not rule.per_rank_clocks else 0
            p.held.append(
                _Held(
                    rid,
                    state.seq,
                    acked,
                    m.want_params,
                    m.rank,
                    gate=rule.mode == "ssp",
                    early=m.early,
                )
            )
        return self._release()

    def _classify(self, p: _Primary, m: Push) -> Verdict:
        verdict = self.spec.rule.classify(
            m.rank, m.step, p.state.seq, p.state.clocks.get(m.rank, 0)
        )
        if verdict is Verdict.LATE and p.state.was_applied(m.rank, m.step):
            return (
                Verdict.REPEAT
            )  # backup workers: the step closed *with* this push (its answer was lost)
        return verdict

    def _buffer(self, p: _Primary, m: Push):
        """Buffer a push (an overflowed one as None); (its key, the complete update or None)."""
        base = p.state.seq if m.base_version is None else m.base_version
        grad = None if m.overflow else decode_push(m.payload)
        return p.buffer.add(m.rank, m.step, grad, base, m.residual, m.ranks)

    def _accept(self, p: _Primary, rid: int, m: Push) -> list:
        key, complete = self._buffer(p, m)
        p.waiting.setdefault(key, []).append((rid, m.want_params, m.rank, m.early))
        if complete is None:
            return []
        return self._commit(p, m.step, complete) + self._answer_when_logged(p, key)

    def _accept_clipped(self, p: _Primary, rid: int, m: Push) -> list:
        """Global gradient clipping (sync and mixed): the update's pushes come in as probes, which
        are answered the squared norm of this shard's part of the aggregate once all are in; the
        update is applied when the first second-phase push brings the factor the worker computed
        from every shard's norm (every worker computes the same one). A primary rebuilt between
        the phases holds none of the pushes: second-phase pushes without the gradient are refused
        with RESEND, and the resent ones complete the update again, to the same bits. An update
        skipped for an overflow answers its probes with a factor of 1 (nothing is applied)."""
        key = self.spec.rule.key(m.rank, m.step)
        c = p.clipped.setdefault(key, _Clipped(m.step))
        effects = []
        if c.pending is None:
            held = p.buffer.pending.get(key)
            if m.payload is None and not m.overflow and (held is None or m.rank not in held.grads):
                return [
                    Reply(
                        rid,
                        Refused(
                            RefusalKind.RESEND,
                            f"shard {p.shard.index} holds no gradient of worker {m.rank} for "
                            f"step {m.step} (a rebuilt primary): send it again",
                        ),
                    )
                ]
            if m.payload is not None or m.overflow:
                c.pending = self._buffer(p, m)[1]
                if c.pending is not None:
                    if not self._skips(c.pending):
                        c.update = self._aggregate(p, c.pending)
                        c.sq_norm = squared_norm(c.update[p.shard.param_slice])
                    effects += [Reply(r, self._norm_reply(p, c)) for r in c.probes]
                    c.probes = []
        if m.probe:
            if c.pending is None:
                c.probes.append(rid)
                return effects
            return effects + [Reply(rid, self._norm_reply(p, c))]
        p.waiting.setdefault(key, []).append((rid, m.want_params, m.rank, m.early))
        if c.factor is None:
            c.factor = m.clip_factor
        if c.pending is None:
            return effects
        del p.clipped[key]
        update, factor = c.update, self._clip_factor(c)
        if factor != 1.0 and update is not None:
            update = np.array(update, dtype=np.float32, copy=True)
            update[p.shard.param_slice] *= np.float32(factor)
        effects += self._commit(p, c.step, c.pending, update, factor)
        return effects + self._answer_when_logged(p, key)

    @staticmethod
    def _norm_reply(p: _Primary, c: _Clipped) -> PushReply:
        if c.update is None:  # skipped (an overflow): no norm, nothing to scale
            return PushReply(None, p.state.seq, 0, clip_factor=1.0)
        return PushReply(None, p.state.seq, 0, sq_norm=c.sq_norm)

    def _clip_factor(self, c: _Clipped) -> float:
        """The factor a clipped update is applied with: the workers', from every shard's norm."""
        return c.factor

    def _answer_when_logged(self, p: _Primary, key) -> list:
        """An update was applied: its pushes' replies wait until the holder has logged it."""
        seq, gate = p.state.seq, self.spec.rule.mode == "ssp"
        for waiting_rid, want, rank, early in p.waiting.pop(key):
            p.held.append(_Held(waiting_rid, seq, seq, want, rank, gate=gate, early=early))
        return self._flush() + self._release()

    def _skips(self, pending) -> bool:
        """fp16 loss scaling: a push of the update overflowed (its gradient is None), so every
        shard skips the whole update, as every DDP rank skips a step after an all-reduced
        overflow."""
        return any(g is None for g in pending.grads.values())

    def _aggregate(self, p: _Primary, pending) -> np.ndarray:
        """The update of a complete set of pushes: their mean in rank order (delay-compensated
        first, if on)."""
        grads = pending.grads
        if p.compensation is not None:
            grads = {r: self._compensated(p, g, pending.base_versions[r]) for r, g in grads.items()}
        return mean_in_rank_order(grads, self.spec.rule.sum_group, pending.members)

    def _commit(
        self,
        p: _Primary,
        step: int,
        pending,
        update: np.ndarray | None = None,
        clip_factor: float | None = None,
    ) -> list:
        """Apply one update (``update``: its aggregate, already computed) and queue its command
        for the holder."""
        state, rule = p.state, self.spec.rule
        seq = state.seq
        skipped = self._skips(pending)
        if skipped:
            update = _NOTHING
        elif update is None:
            update = self._aggregate(p, pending)
        stalest = max(seq - v for v in pending.base_versions.values())
        hp = state.hyper_params(step)
        ranks = pending.ranks()
        scale = rule.lr_scale(len(ranks), stalest)
        momentum, gain = rule.momentum(hp.momentum)
        sgd = self.spec.optim.name == "sgd"
        stream = rule.momentum_stream(min(pending.grads)) if hp.momentum and sgd else -1
        if scale * gain != 1.0 or momentum != hp.momentum or stream >= 0:
            hp = dataclasses.replace(hp, lr=hp.lr * scale * gain, momentum=momentum, stream=stream)
        pushes = tuple((r, step) for r in ranks)
        residuals = tuple((r, step, pending.residuals[r]) for r in sorted(pending.residuals))
        if (
            rule.exact_resume
        ):  # a worker restarting mid-step pulls the parameters before this update
            if self.spec.pipelined:  # arrays no update changes: kept by reference
                p.earlier = p.previous
            p.previous = self._params_now(p)
        command = Command(seq, update, hp, pushes, residuals, stalest, clip_factor, skipped)
        if (
            self.spec.replicate
        ):  # the command is queued before the update is applied: never an ack without it
            p.outbox.append([command, None])
        started = self.clock()
        state.apply(update, hp, pushes, residuals, stalest, clip_factor, skipped)
        p.stale = True
        effects = [Note("update", {"shard": p.shard.index, "seq": seq, "staleness": stalest})]
        if self.spec.replicate:
            now = self._commit_times[seq] = self.clock()
            if p.snapshots is not None:
                gap = now - p.last_commit_at if p.last_commit_at is not None else 0.0
                p.snapshots.observe_update(now - started, gap, command.nbytes)
            p.last_commit_at = now
            if self._snapshot_due(p):
                built = self.clock()
                p.outbox[-1][1] = snapshot = self._snapshot(p)
                p.last_snapshot_seq = state.seq
                if p.snapshots is not None:
                    per_byte = self.replica_wait_s / max(1, self.replica_bytes_sent)
                    p.snapshots.observe_snapshot(self.clock() - built, snapshot.nbytes, per_byte)
        else:
            self._advance_logged(p, state.seq, state.clocks)
        if self.spec.checkpoint_interval and state.seq % self.spec.checkpoint_interval == 0:
            effects.append(self._checkpoint(p))
        return effects

    def _snapshot_due(self, p: _Primary) -> bool:
        if p.snapshots is None:
            return p.state.seq % self.spec.snapshot_interval == 0
        return p.state.seq - p.last_snapshot_seq >= p.snapshots.interval()

    def snapshot_interval(self) -> int:
        """The interval in force: the configured one, or what the auto policy chooses now."""
        p = self.primary
        if self.spec.snapshot_interval != "auto":
            return int(self.spec.snapshot_interval)
        return p.snapshots.interval() if p is not None and p.snapshots is not None else 0

    def _checkpoint(self, p: _Primary) -> SaveCheckpoint:
        p.checkpoint_step = p.state.seq
        return SaveCheckpoint(
            p.shard.index,
            p.state.seq,
            self._params_now(p),
            p.state.optimizer.state_dict(),
            p.state.skipped_copy(),
        )

    def _on_pull(self, rid: int, m: Pull) -> list:
        p = self.primary
        if p is None or p.deposed:
            return [Reply(rid, self._not_primary())]
        seq = p.state.seq
        if m.step is None or m.step == seq:
            p.held.append(_Held(rid, seq, 0, True, step=m.step, pull=m))
            return self._release()
        kept = {seq - 1: p.previous, seq - 2: p.earlier}.get(m.step)
        if kept is not None:
            return [
                Reply(
                    rid,
                    PushReply(
                        kept,
                        m.step,
                        0,
                        residual=self._residual(p, m),
                        skipped=p.state.skipped_of(m.rank),
                    ),
                )
            ]
        return [
            Reply(
                rid,
                Refused(
                    RefusalKind.CANNOT_SERVE,
                    f"shard {p.shard.index} cannot serve parameters of step {m.step}: "
                    f"it holds step {seq} (and the one before"
                    f"{', and the one before that' if self.spec.pipelined else ''})",
                ),
            )
        ]

    def _params_now(self, p: _Primary) -> np.ndarray:
        """The current parameters as an array no later update changes (copied at most once per
        update)."""
        self._refresh(p)
        return p.latest

    def _params_out(self, p: _Primary) -> np.ndarray:
        """What replies hand workers: the current parameters, or with per-stream momentum (dana)
        their look-ahead (``optim.SGD.lookahead``; buffers as they are)."""
        self._refresh(p)
        return p.out

    def _refresh(self, p: _Primary) -> None:
        if p.stale:
            p.latest, p.stale = p.state.params_copy(), False
            ps = p.shard.param_slice
            ahead = p.state.optimizer.lookahead(p.state.params[ps])
            if ahead is None:
                p.out = p.latest
            else:
                p.out = p.latest.copy()
                p.out[ps] = ahead.numpy()
            if p.compensation is not None:
                p.handed_out[p.state.seq] = p.out
                # a push older than 2 updates per rank goes uncorrected
                for v in [v for v in p.handed_out if v < p.state.seq - 2 * self.spec.num_workers]:
                    del p.handed_out[v]

    def _compensated(self, p: _Primary, grad: np.ndarray, base: int) -> np.ndarray:
        """DC-ASGD on the parameter part of a push computed on version ``base``."""
        ps = p.shard.param_slice
        then = p.handed_out.get(base) if base < p.state.seq else None
        now = p.state.params.numpy()[ps]
        out = np.array(grad, dtype=np.float32, copy=True)
        out[ps] = p.compensation.correct(out[ps], now, then[ps] if then is not None else None)
        return out

    def _release(self) -> list:
        """Answer every held reply whose updates are logged (and, in ssp, whose rank may go on)."""
        p = self.primary
        if p is None or not p.held:
            return []
        rule, state = self.spec.rule, p.state
        # sync modes answer with parameters no later than the log: a worker never computes on an
        # update a rebuilt primary would not have (it would push a step ahead of it)
        floor = state.seq if not rule.per_rank_clocks else 0
        logged = self._logged(p)
        out, keep = [], []
        for h in p.held:
            # pipelined: the push's own update may be unlogged, never one before it
            if logged < max(h.need, floor if h.want_params else 0) - h.early:
                keep.append(h)
            elif h.gate and not may_proceed(state.clocks, h.rank, rule):
                keep.append(h)
            else:
                if h.gate:
                    self.clock_trace.append(
                        (
                            h.rank,
                            state.clocks.get(h.rank, 0),
                            slowest_clock(state.clocks, self.spec.num_workers),
                        )
                    )
                if (
                    h.step is not None and h.step != state.seq
                ):  # an exact pull overtaken by an update
                    out.append(self._on_pull(h.rid, h.pull)[0])
                    continue
                params = self._params_out(p) if h.want_params else None
                seq = state.seq
                if (
                    params is not None
                    and self.spec.pipelined
                    and h.pull is None
                    and h.acked == seq - 1 > 0
                    and p.previous is not None
                ):
                    # pipelined: a restarted rank's repeat of the step before the last gets the
                    # values that followed its step (the ones it computes the next step on)
                    params, seq = p.previous, seq - 1
                residual = self._residual(p, h.pull) if h.pull is not None else None
                rank = h.rank if h.pull is None else h.pull.rank
                out.append(
                    Reply(
                        h.rid,
                        PushReply(
                            params,
                            seq,
                            h.acked,
                            h.late,
                            residual,
                            skipped=state.skipped_of(rank),
                            durable=logged >= h.acked,
                        ),
                    )
                )
        p.held = keep
        return out

    def _residual(self, p: _Primary, m: Pull):
        if m.rank is None:
            return None
        step = m.resume_step if m.resume_step is not None else m.step
        return p.state.residual_before(m.rank, step) if step is not None else None

    def _logged(self, p: _Primary) -> int:
        """What a reply may depend on: the updates the holder has logged, and with relaxed
        durability up to ``spec.unlogged`` more (a primary's death loses at most those)."""
        return p.logged + self.spec.unlogged

    # --- primary: the log at the holder
    # ------------------------------------------------------------

    def _snapshot(self, p: _Primary) -> Snapshot:
        s = p.state
        return Snapshot(
            s.seq,
            self._params_now(p),
            s.optimizer.state_dict(),
            p.previous,
            dict(s.clocks),
            s.applied_copy(),
            s.residuals_copy(),
            dict(s.staleness),
            s.clip_factors_copy(),
            s.skipped_copy(),
            p.earlier,
            self.spec.pipelined,
        )

    def _flush(self) -> list:
        """Send every queued command to the holder in one Append, unless one is on its way
        already."""
        p = self.primary
        if (
            p is None
            or p.deposed
            or p.in_flight is not None
            or not p.outbox
            or not p.holder_ready
            or not self.spec.replicate
        ):
            return []
        batch, p.outbox = p.outbox, []
        snapshots = [snap for _, snap in batch if snap is not None]
        snapshot = snapshots[-1] if snapshots else None
        call = self._call(
            "append",
            p.holder,
            Append(p.shard.index, p.epoch, tuple(c for c, _ in batch), snapshot),
            p.holder,
            batch,
        )
        p.in_flight = (call.cid, p.holder, batch)
        effects = [call]
        if snapshot is not None:
            self.snapshots_sent += 1
            effects.append(
                Note(
                    "snapshot_sent",
                    {"shard": p.shard.index, "n": self.snapshots_sent, "seq": snapshot.seq},
                )
            )
        return effects

    def _appended(self, call: tuple, value) -> list:
        _, holder, batch = call
        p = self.primary
        if (
            p is None
            or p.in_flight is None
            or p.in_flight[1] != holder
            or p.in_flight[2] is not batch
        ):
            return []
        p.in_flight = None
        if isinstance(value, AppendAck) and holder == p.holder:
            last = batch[-1][0]
            clocks = {}
            for command, _ in batch:
                for rank, step in command.pushes:
                    clocks[rank] = max(clocks.get(rank, 0), step + 1)
            self._advance_logged(p, last.seq + 1, clocks)
            self.replica_appends += 1
            self.replica_bytes_sent += sum(c.nbytes for c, _ in batch) + sum(
                s.nbytes for _, s in batch if s is not None
            )
            now = self.clock()
            for command, _ in batch:
                self.replica_wait_s += now - self._commit_times.pop(command.seq, now)
            return self._flush() + self._release()
        if isinstance(value, Refused) and value.kind is RefusalKind.FENCED:
            p.fenced_at = value.fence
            return self._step_down(value.reason)
        p.outbox = batch + p.outbox  # sent again (the holder ignores seqs it has)
        if holder != p.holder:  # the supervisor named a new holder meanwhile
            return self._flush()
        if isinstance(value, Refused) or value is Failure.DEAD:
            # the holder lost the replica, has a gap, or died: a snapshot to it (or, if dead, to the
            # holder the supervisor names next) restores it
            p.holder_ready = False
            if value is Failure.DEAD:
                return [Note("holder_lost", {"shard": p.shard.index, "holder": holder})]
            return [self._install(p, None)]
        return [Timer("retry_append", RETRY_APPEND_S)]

    def _advance_logged(self, p: _Primary, seq: int, clocks: dict) -> None:
        if seq > p.logged:
            p.logged = seq
        for rank, clock in clocks.items():
            if clock > p.durable_clocks.get(rank, 0):
                p.durable_clocks[rank] = clock

    # --- replica holder
    # ----------------------------------------------------------------------------

    def _on_install_replica(self, rid: int, m: InstallReplica) -> list:
        shard = m.shard.index
        held = self.replicas.get(shard)
        if held is None and m.epoch < self.refused_exports.get(shard, 0):
            return [
                Reply(
                    rid,
                    Refused(
                        RefusalKind.FENCED,
                        f"{self.name} refused shard {shard}'s replica to a recovery at epoch "
                        f"{self.refused_exports[shard]}; install came from epoch {m.epoch}",
                    ),
                )
            ]
        if held is not None and not self._admits(held, m.epoch):
            return [
                Reply(
                    rid,
                    Refused(
                        RefusalKind.FENCED,
                        f"replica of shard {shard} on {self.name} is fenced at epoch {held.fence}, "
                        f"install came from epoch {m.epoch}",
                        held.fence,
                    ),
                )
            ]
        self.replicas[shard] = _Replica(m.shard, CommandLog.from_snapshot(m.snapshot), m.epoch)
        return [Reply(rid, self.replicas[shard].log.next_seq)]

    def _on_append(self, rid: int, m: Append) -> list:
        held = self.replicas.get(m.shard)
        if held is None:
            return [
                Reply(
                    rid,
                    Refused(
                        RefusalKind.NO_REPLICA, f"{self.name} holds no replica of shard {m.shard}"
                    ),
                )
            ]
        if not self._admits(held, m.epoch):
            return [
                Reply(
                    rid,
                    Refused(
                        RefusalKind.FENCED,
                        f"replica of shard {m.shard} on {self.name} is fenced at epoch "
                        f"{held.fence}, "
                        f"append came from epoch {m.epoch}",
                        held.fence,
                    ),
                )
            ]
        held.fence = max(held.fence, m.epoch)
        effects = []
        try:
            for command in m.commands:
                held.log.append(command)
            if m.snapshot is not None:
                n = self.snapshots_received[m.shard] = self.snapshots_received.get(m.shard, 0) + 1
                effects.append(
                    Note("snapshot_received", {"shard": m.shard, "n": n, "seq": m.snapshot.seq})
                )
                held.log.install_snapshot(m.snapshot)
        except LogGapError as e:
            return effects + [Reply(rid, Refused(RefusalKind.GAP, str(e)))]
        effects.append(Reply(rid, AppendAck(held.log.next_seq)))
        if self.spec.fold:
            effects.append(Fold(m.shard))
        return effects

    def _on_export_replica(self, rid: int, m: ExportReplica) -> list:
        held = self.replicas.get(m.shard)
        if held is None:
            self.refused_exports[m.shard] = max(self.refused_exports.get(m.shard, 0), m.epoch)
            return [
                Reply(
                    rid,
                    Refused(
                        RefusalKind.NO_REPLICA, f"{self.name} holds no replica of shard {m.shard}"
                    ),
                )
            ]
        if not self._raise_fence(held, m.epoch):
            return [
                Reply(
                    rid,
                    Refused(
                        RefusalKind.FENCED,
                        f"replica of shard {m.shard} on {self.name} is already fenced at epoch "
                        f"{held.fence}; a recovery needs a newer epoch than {m.epoch}",
                    ),
                )
            ]
        return [Reply(rid, Exported(held.log.snapshot.owned(), tuple(held.log.entries)))]

    def _admits(self, held: _Replica, epoch: int) -> bool:
        """Fencing: only the newest primary may write a replica."""
        return epoch >= held.fence

    def _raise_fence(self, held: _Replica, epoch: int) -> bool:
        """An export for a successor at ``epoch``: from now on refuse every older primary. False if
        the epoch is not newer than the fence (an epoch is never handed out twice)."""
        if epoch <= held.fence:
            return False
        held.fence = epoch
        return True

    # --- both
    # ----------------------------------------------------------------------------------------

    def _on_describe(self, rid: int, m: Describe) -> list:
        return [Reply(rid, self.describe())]

    def _on_inspect_replica(self, rid: int, m: InspectReplica) -> list:
        held = self.replicas.get(m.shard)
        if held is None:
            return [
                Reply(
                    rid,
                    Refused(
                        RefusalKind.NO_REPLICA, f"{self.name} holds no replica of shard {m.shard}"
                    ),
                )
            ]
        return [Reply(rid, Exported(held.log.snapshot.owned(), tuple(held.log.entries)))]

    def describe(self) -> ServerDescription:
        p, w = self.primary, self.spec.num_workers
        replicas = tuple(
            ReplicaInfo(s, r.fence, r.log.next_seq) for s, r in sorted(self.replicas.items())
        )
        if p is None:
            return ServerDescription(
                self.name,
                None,
                0,
                0,
                0,
                (),
                replicas,
                False,
                None,
                self._recovery is not None,
                self.node,
                self.process,
            )
        if self.spec.rule.per_rank_clocks:
            clocks = tuple(p.durable_clocks.get(r, 0) for r in range(w))
        else:
            clocks = (p.logged,) * w
        return ServerDescription(
            self.name,
            p.shard.index,
            p.epoch,
            p.state.seq,
            p.logged,
            clocks,
            replicas,
            p.deposed,
            p.checkpoint_step,
            self._recovery is not None,
            self.node,
            self.process,
            p.fenced_at if p.deposed else None,
        )

    def stats(self) -> ShardStats:
        p = self.primary
        s = p.state
        lead = max((clock - slowest for _, clock, slowest in self.clock_trace), default=0)
        return ShardStats(
            s.shard.index,
            s.seq,
            s.updates_applied,
            self.duplicate_pushes,
            s.shard.size,
            self.replica_wait_s,
            self.replica_bytes_sent,
            self.checkpoint_files_read,
            self.late_pushes,
            dict(s.staleness),
            lead,
            self.replica_appends,
            tuple(self.clock_trace),
            self.snapshot_interval() if self.spec.replicate else 0,
            self.snapshots_sent,
        )

    def params(self) -> np.ndarray:
        return self._params_now(self.primary)

    def recent_params(self) -> dict[int, np.ndarray]:
        """{updates: parameters} this primary can give now: its current values, and the ones
        before its last update (and the one before that, pipelined) where it keeps them for a
        restarted rank (sync modes). A reader of several shards takes one count they all have."""
        p = self.primary
        seq = p.state.seq
        kept = {seq: self._params_now(p), seq - 1: p.previous, seq - 2: p.earlier}
        return {k: v for k, v in kept.items() if v is not None and k >= 0}


_REQUESTS: dict[type, Callable] = {
    Load: ServerProtocol._on_load,
    SetReplica: ServerProtocol._on_set_replica,
    RecoverPrimary: ServerProtocol._on_recover_primary,
    Depose: ServerProtocol._on_depose,
    Reinstate: ServerProtocol._on_reinstate,
    Push: ServerProtocol._on_push,
    Pull: ServerProtocol._on_pull,
    InstallReplica: ServerProtocol._on_install_replica,
    Append: ServerProtocol._on_append,
    ExportReplica: ServerProtocol._on_export_replica,
    Describe: ServerProtocol._on_describe,
    InspectReplica: ServerProtocol._on_inspect_replica,
}
_REPLIES: dict[str, Callable] = {
    "install": ServerProtocol._installed,
    "export": ServerProtocol._exported,
    "append": ServerProtocol._appended,
}
