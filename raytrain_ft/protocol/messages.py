"""Messages between the run's processes, and the effects a protocol state machine asks its host to
carry out.

Every process of a run -- parameter server, worker, supervisor -- is addressed
by its actor *name* (unique per incarnation: a restarted rank or a replacement
server gets a new one), so the same protocol code runs under Ray (names of
detached actors) and in the simulator (keys of a dict).

A state machine never does I/O. It takes a request, a reply, a failure or a
timer and returns a list of effects:

- ``Reply(rid, value)``: answer request ``rid`` (the host resolves the call);
- ``Call(cid, dst, msg)``: send ``msg`` to ``dst``; the host feeds the answer
  back as ``on_reply(cid, value)`` or ``on_failure(cid, Failure)``;
- ``Persist(key, value)``: write durably (Ray's internal KV) *before* the
  effects after it are carried out;
- ``Create``/``Kill``: start or end a process (supervisor only);
- ``Timer(token, delay_s)``: call ``on_timer(token)`` later;
- ``Fold(shard)``: fold a replica's log off the critical path (holder);
- ``SaveCheckpoint``: write a checkpoint file (the file baseline only);
- ``Note(event, fields)``: something happened (logs, metrics, fault hooks).

Replies are values, never exceptions: a refusal is a ``Refused`` with a
``RefusalKind`` the caller's state machine acts on.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

Address = str
"""An actor's name: one incarnation of one process."""


class Failure(enum.Enum):
    """Why a call got no answer (the host translates its transport's errors into these)."""

    DEAD = "dead"
    """The callee is gone for good; the call may or may not have been carried out (Ray:
    ActorDiedError)."""
    UNAVAILABLE = "unavailable"
    """No answer in time; the callee may be alive and may still carry the call out
    (ActorUnavailableError)."""
    LOST = "lost"
    """The answer was lost with the node that held it; the call may have been carried out
    (ObjectLostError)."""


class RefusalKind(enum.Enum):
    NOT_PRIMARY = "not_primary"
    """The callee is not (or no longer) the shard's primary: ask the supervisor for the route."""
    FENCED = "fenced"
    """A newer epoch serves the shard; the caller's epoch is stale."""
    NO_REPLICA = "no_replica"
    """The callee holds no replica of that shard."""
    HOLDER_LOST = "holder_lost"
    """A recovery's replica holder is dead: whether it held the replica is unknown."""
    GAP = "gap"
    """A command arrived beyond the log's next seq: the replica needs a fresh snapshot."""
    RETRY = "retry"
    """A transient failure on the way (a peer did not answer in time): ask again."""
    CANNOT_SERVE = "cannot_serve"
    """Parameters of a step the shard no longer holds."""
    RESEND = "resend"
    """A clipped step's second phase reached a primary that lacks the sender's gradient (it was
    rebuilt meanwhile): send it again with the gradient."""
    FAILED = "failed"
    """The run failed; the reason says why."""


@dataclass(frozen=True, slots=True)
class Refused:
    kind: RefusalKind
    reason: str
    fence: int | None = None
    """FENCED by a holder: the epoch its replica is fenced at."""


# --- requests to a parameter server
# -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Load:
    """Become ``shard``'s primary at ``epoch`` with these values (a run's start, or a checkpoint
    restore)."""

    shard: Any
    """``ShardRange``."""
    epoch: int
    params: Any
    """None: the host fills them in -- from the checkpoint file of ``checkpoint_step``, else the
    shard's part of the model the run starts from."""
    seq: int = 0
    optimizer_state: dict | None = None
    checkpoint_step: int | None = None
    """Set when the values come from a checkpoint file (the host reads the file into ``params``)."""
    resume: bool = False
    """The file is in the directory the run resumes from (else: the run's own checkpoint
    directory)."""
    skipped: dict | None = None
    """fp16: the shard's record of skipped steps per rank (from the checkpoint file)."""


@dataclass(frozen=True, slots=True)
class SetReplica:
    """Primary: replicate to ``holder`` from now on (a full snapshot first)."""

    holder: Address
    version: int = 0
    """Increases with every holder the supervisor names: a delayed, older ``SetReplica`` is
    ignored."""


@dataclass(frozen=True, slots=True)
class InstallReplica:
    shard: Any
    """``ShardRange``."""
    epoch: int
    snapshot: Any
    """``Snapshot``."""


@dataclass(frozen=True, slots=True)
class Append:
    shard: int
    epoch: int
    commands: tuple
    """``Command``s with consecutive seqs."""
    snapshot: Any = None
    """A ``Snapshot`` to install after the commands (truncates the log)."""


@dataclass(frozen=True, slots=True)
class ExportReplica:
    """Holder: hand over the replica and refuse appends of every epoch below ``epoch`` from now
    on."""

    shard: int
    epoch: int


@dataclass(frozen=True, slots=True)
class RecoverPrimary:
    """Spare: become ``shard``'s primary at ``epoch`` from the replica ``holder`` keeps."""

    shard: Any
    """``ShardRange``."""
    epoch: int
    holder: Address


@dataclass(frozen=True, slots=True)
class Reinstate:
    """Primary of ``shard``, replaced while only suspected by a recovery that could not finish
    (its holder was lost): serve on at the newer ``epoch`` (workers sent to the abandoned spare
    follow routes only forward in epochs). Answered ``Recovered``; refused if it was deposed."""

    shard: int
    epoch: int
    fenced_upto: int = 0
    """A primary deposed only by its holder's fence at or below this epoch (the abandoned
    recovery's export) is reinstated too."""


@dataclass(frozen=True, slots=True)
class Depose:
    """Primary of ``shard`` below ``epoch``: a successor serves it; refuse every push from now
    on."""

    shard: int
    epoch: int


@dataclass(frozen=True, slots=True)
class Push:
    rank: int
    step: int
    payload: Any
    """float32 [shard.size] or a ``compression.Encoded``."""
    base_version: int | None = None
    """The seq of the parameters the gradient was computed on."""
    want_params: bool = True
    residual: Any = None
    """Lossy codecs: the sender's error-feedback residual after this push, kept with the shard so
    that a restarted worker goes on with exactly the residual it had."""
    probe: bool = False
    """Global gradient clipping, first phase: buffer the gradient and answer ``sq_norm``, the
    squared norm of this shard's part of the update once every push of it is in (nothing is
    applied yet)."""
    clip_factor: float | None = None
    """Global gradient clipping, second phase: apply the update scaled by this factor (computed by
    the worker from every shard's ``sq_norm``). ``payload`` may be None when the shard already
    holds this push from the first phase (a primary that lacks it refuses with RESEND)."""
    overflow: bool = False
    """fp16 loss scaling: the sender's gradient overflowed (``payload`` is None). The update this
    push belongs to is skipped: every shard records it and changes nothing, as a GradScaler skips
    ``optimizer.step()``."""
    early: bool = False
    """--durability pipelined (sync): the reply may come before the holder logged this push's
    update (never before the updates ahead of it). The sender keeps the push until a later reply
    proves it logged, and sends it again first to a primary of a newer epoch."""
    ranks: tuple[int, ...] = ()
    """Pre-aggregation (sync): the ranks of one process whose gradients ``payload`` sums, in rank
    order (``rank`` is the first); the push counts as each of theirs, for exactly-once too.
    Empty: ``rank``'s own gradient."""


@dataclass(frozen=True, slots=True)
class Pull:
    step: int | None = None
    """Parameters as of this step (sync restarts), or the newest (None)."""
    rank: int | None = None
    resume_step: int | None = None
    """With ``rank``: also answer the error-feedback residual ``rank`` had before this step."""


@dataclass(frozen=True, slots=True)
class Describe:
    pass


@dataclass(frozen=True, slots=True)
class InspectReplica:
    """Holder: the replica of ``shard`` as it is (the end-of-run check; raises no fence)."""

    shard: int


# --- replies of a parameter server
# ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PushReply:
    params: Any
    """The shard's parameters after the push's update (None when not asked for)."""
    seq: int
    """Updates the shard had applied when ``params`` were taken (the version of ``params``)."""
    acked: int
    """seq + 1 of the update that holds the push (0 when it carries none: an async repeat, a late
    push)."""
    late: bool = False
    """Sync with backup workers: the step closed without this push; it was dropped."""
    residual: Any = None
    """Pulls with a rank: its error-feedback residual to resume with (None: none kept)."""
    sq_norm: float | None = None
    """Answer to a probe: the squared L2 norm of this shard's part of the update (parameters only,
    float64)."""
    clip_factor: float | None = None
    """Answer to a probe of an update already applied: the clip factor it was applied with."""
    skipped: tuple | None = None
    """fp16 loss scaling: the steps of the asking rank whose updates were skipped (an overflow), in
    order; None when there are none. The rank's loss scale is a pure function of them
    (``amp.loss_scale``), so a restarted rank resumes with the scale it had."""
    durable: bool = True
    """The holder has logged the push's update. False only for an ``early`` push answered before
    that: the push is acknowledged once a later reply of the shard comes back."""


@dataclass(frozen=True, slots=True)
class AppendAck:
    next_seq: int


@dataclass(frozen=True, slots=True)
class Exported:
    snapshot: Any
    entries: tuple


@dataclass(frozen=True, slots=True)
class Recovered:
    seq: int
    replayed: int
    bytes_moved: int
    clocks: tuple = ()
    """((rank, next step), ...) of the rebuilt state: what the run's summary counts each recovery's
    lost updates from (``trainer.updates_lost_by_recovery``)."""


@dataclass(frozen=True, slots=True)
class ReplicaInfo:
    shard: int
    fence: int
    next_seq: int


@dataclass(frozen=True, slots=True)
class ServerDescription:
    """What a server holds: the supervisor's probe, and how a restarted supervisor learns the live
    state."""

    name: Address
    shard: int | None
    """The shard it is primary of (None: a spare or a dedicated replica holder)."""
    epoch: int
    seq: int
    """Updates applied."""
    logged: int
    """Updates its replica holder has logged (all of them when the run keeps no replica)."""
    durable_clocks: tuple[int, ...]
    """Per rank: the next step the shard expects from it, counting only logged updates (a restarted
    rank resumes there)."""
    replicas: tuple[ReplicaInfo, ...]
    deposed: bool
    checkpoint_step: int | None
    """The newest step this primary wrote a checkpoint file for (the file baseline)."""
    recovering: bool = False
    node: str = ""
    """The node the server runs on (placement of replacements)."""
    process: str = ""
    """NODE_IP:PID of the server's process (fault injection)."""
    fenced_at: int | None = None
    """Deposed by its holder's fence at this epoch (a rebuild's export), not by a successor that
    serves: it still has every update it acknowledged."""


# --- worker and supervisor messages
# ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Route:
    shard: int
    address: Address
    epoch: int


@dataclass(frozen=True, slots=True)
class RouteAfter:
    """Worker -> supervisor: the route of ``shard`` now. ``failed``: a call to the epoch-``epoch``
    primary failed, answer once a newer epoch serves (or the old one is found healthy); otherwise
    answer at once."""

    shard: int
    epoch: int
    failed: bool = True


@dataclass(frozen=True, slots=True)
class Start:
    """Supervisor -> worker: train steps ``[step, end_step)`` with these routes."""

    step: int
    end_step: int
    routes: tuple[Route, ...]


@dataclass(frozen=True, slots=True)
class PollStatus:
    pass


@dataclass(frozen=True, slots=True)
class StartFailed:
    """A probe's answer when the process could not be started at all (its constructor raised): not a
    crash to repair but a setting to fix."""

    reason: str


# --- effects
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    rid: int
    value: Any


@dataclass(frozen=True, slots=True)
class Call:
    cid: int
    dst: Address
    msg: Any


@dataclass(frozen=True, slots=True)
class Persist:
    key: str
    value: str


@dataclass(frozen=True, slots=True)
class Create:
    name: Address
    kind: str
    """"server" (a primary, holder or spare) or "worker"."""
    rank: int | None = None
    slot: int | None = None
    """Servers: the slot it is created for (None: a spare)."""
    node: str | None = None
    """Placement hint: a node id (None: anywhere)."""
    routes: tuple = ()
    """Workers: the routes at creation."""
    host: Address | None = None
    """Workers that pre-aggregate: the process to create the rank in (ranks created with the same
    host share it; the first creates it)."""


@dataclass(frozen=True, slots=True)
class Kill:
    name: Address
    reason: str


@dataclass(frozen=True, slots=True)
class Timer:
    token: Any
    delay_s: float


@dataclass(frozen=True, slots=True)
class Fold:
    shard: int


@dataclass(frozen=True, slots=True)
class SaveCheckpoint:
    shard: int
    step: int
    params: Any
    optimizer_state: dict
    skipped: dict | None = None
    """fp16: per rank, its steps whose updates were skipped (``ShardState.skipped``): a rank
    resumed from the checkpoint gets its loss scale back."""


@dataclass(frozen=True, slots=True)
class Note:
    event: str
    fields: dict = field(default_factory=dict)
