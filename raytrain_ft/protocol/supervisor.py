"""The supervisor's protocol: a durable registry, a pure ``decide()``, and the state machine around
them.

Every ``probe_interval_s`` the supervisor asks every process it knows for its
state (``Describe`` to servers, ``PollStatus`` to workers). Once the round is
complete (or timed out), ``decide(registry, view, busy, spec, now)`` -- a
pure function of the durable registry, what the round saw and which
operations are in flight -- returns the ``Decision``s to carry out, each with
a reason. The registry is the desired and known state of the run:

- which actor serves each server *slot* (slot i: shard i's primary, holding
  the replica of shard i-1; with one shard, slot 1 is a dedicated holder),
  in which phase, at which epoch; the highest epoch ever handed out per shard;
- which shards' holders have confirmed their replica (I4);
- the warm spares; per rank, the worker actor and its phase;
- recovery events and counters.

**Write-ahead.** Every decision changes the registry, and the registry is
persisted (a ``Persist`` effect, Ray's internal KV) *before* the effects that
act on it: an actor's name is recorded before it is created, an epoch is
reserved before a holder is fenced with it, a worker is recorded as starting
before ``Start`` is sent. A supervisor killed between any two effects comes
back (``SupervisorProtocol.restore``) to a registry that names everything it
may have started, and finishes what was in progress: a slot RECOVERING gets
its recovery issued again with a newer epoch, a worker CREATING or STARTING is
looked up and started, a spare it may have created is probed and used or
dropped. Nothing it forgets can be acted on twice: epochs are never reused,
and every request it repeats is idempotent.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import json
from dataclasses import dataclass, field
from typing import Any

from raytrain_ft.protocol.messages import (
    Address,
    Call,
    Create,
    Depose,
    Describe,
    Failure,
    Kill,
    Load,
    Note,
    Persist,
    PollStatus,
    Recovered,
    RecoverPrimary,
    RefusalKind,
    Refused,
    Reinstate,
    Reply,
    Route,
    RouteAfter,
    ServerDescription,
    SetReplica,
    Start,
    StartFailed,
    Timer,
)


def num_slots(num_shards: int) -> int:
    return num_shards if num_shards > 1 else 2


def replica_slot(shard: int, num_shards: int) -> int:
    """Slot holding shard ``shard``'s replica: the next peer, or slot 1 (a dedicated replica actor)
    for one shard."""
    return (shard + 1) % num_shards if num_shards > 1 else 1


def primary_shard(slot: int, num_shards: int) -> int | None:
    return slot if slot < num_shards else None


def replica_shards(slot: int, num_shards: int) -> tuple[int, ...]:
    return tuple(s for s in range(num_shards) if replica_slot(s, num_shards) == slot)


class RunPhase(enum.Enum):
    """STARTING: creating, loading and replicating servers, then creating and starting workers.
    RUNNING: every worker was started; failures are being watched and repaired.
    DONE: every worker finished. FAILED: a loss that cannot be recovered (a shard lost with its
    replica, a restart budget spent, an error in user code); ``failure`` says which."""

    STARTING = "starting"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class SlotPhase(enum.Enum):
    """EMPTY: no actor yet. CREATING: an actor is named and being started. LOADING: a primary is
    being given its values (start, or a checkpoint restore). SERVING: the actor plays the slot.
    RECOVERING: a spare is rebuilding the slot's shard from its replica at ``epoch``."""

    EMPTY = "empty"
    CREATING = "creating"
    LOADING = "loading"
    SERVING = "serving"
    RECOVERING = "recovering"


class WorkerPhase(enum.Enum):
    """NONE: to be created. CREATING: named and starting. STARTING: ``Start`` sent. RUNNING:
    training. DONE: finished its last step."""

    NONE = "none"
    CREATING = "creating"
    STARTING = "starting"
    RUNNING = "running"
    DONE = "done"


class Action(enum.Enum):
    CREATE_SLOT = "create_slot"
    LOAD = "load"
    HOLDER_READY = "holder_ready"
    REPLICATE = "replicate"
    RECOVER = "recover"
    """A spare rebuilds a dead primary's shard from its replica (also re-issued after a supervisor
    restart)."""
    ADOPT_RECOVERY = "adopt_recovery"
    """The recovery's answer was lost (the supervisor restarted) but the spare describes itself as
    the rebuilt primary at the recovery's epoch: it serves, as if the answer had come."""
    ABANDON_RECOVERY = "abandon_recovery"
    """The holder died mid-recovery, but the primary being replaced was only suspected: it serves
    on."""
    REPLACE_HOLDER = "replace_holder"
    ROLLBACK = "rollback"
    """The file baseline: every shard back to the newest common checkpoint, every worker
    restarted."""
    CREATE_SPARE = "create_spare"
    DROP_SPARE = "drop_spare"
    KILL_WORKER = "kill_worker"
    """A worker process silent too long but not found dead is killed; its ranks are re-created once
    a call finds it dead (alive, it could push on past their start step)."""
    CREATE_WORKER = "create_worker"
    START_WORKER = "start_worker"
    MARK_RUNNING = "mark_running"
    MARK_DONE = "mark_done"
    FINISH = "finish"
    FAIL = "fail"


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    target: Any
    reason: str


@dataclass(slots=True)
class SlotRecord:
    actor: Address | None = None
    phase: SlotPhase = SlotPhase.EMPTY
    epoch: int = 0
    load_step: int | None = None
    """LOADING from a checkpoint file of this step (None: the run's initial values)."""
    replacing: Address | None = None
    """RECOVERING: the primary being replaced, killed only once its successor serves (if the
    recovery cannot finish and it was only suspected, it serves on)."""
    replacing_epoch: int = 0
    replacing_confirmed: bool = False
    """RECOVERING: the primary replaced was confirmed dead or deposed when the recovery began (it
    can never serve on: the recovery is never abandoned to it)."""
    reinstating: bool = False
    """RECOVERING: the recovery was abandoned (the holder lost while the primary it replaced was
    only suspected); that primary, back as ``actor``, is told to serve on at a newer epoch
    (``Reinstate``): routes only ever move forward in epochs."""
    retiring: list = field(default_factory=list)
    """Servers this slot's actors replaced that may hold the only copy of a replica the slot holds
    (they were the last holder it was sent to; a successor starts without it): probed, and killed
    only once each such replica is on the slot's actor (``replicated``). Until then a recovery of
    a primary confirmed dead rebuilds from one (``fallback_holder``): make before break, so a
    server replaced on a mere suspicion takes no copy with it."""


@dataclass(slots=True)
class WorkerRecord:
    actor: Address | None = None
    phase: WorkerPhase = WorkerPhase.NONE
    restarts: int = 0
    start_step: int | None = None
    host: Address | None = None
    """Pre-aggregation: the process the rank was created in, shared by its process's ranks (the
    actor name of the first of them)."""


@dataclass(slots=True)
class RecoveryEvent:
    role: str
    """server | replica | worker | supervisor."""
    index: int
    source: str
    """replica | checkpoint | restart | rebuilt."""
    detected_at: float
    serving_at: float | None = None
    replayed: int = 0
    bytes_moved: int = 0
    epoch: int | None = None
    step: int | None = None
    steps_lost: int = 0
    replicated_at: float | None = None
    """When the last shard whose replica the lost server held was replicated again (I4)."""
    rereplicated: list = field(default_factory=list)
    """Shards whose replica the lost server held, replicated again on its replacement."""
    actor: str | None = None
    takeover_clocks: list = field(default_factory=list)
    """Server recoveries: [[rank, next step], ...] of the rebuilt state (``Recovered.clocks``)."""
    updates_lost: int | None = None
    """Server recoveries: acknowledged updates the rebuilt primary lacked for good (relaxed
    durability; 0 with strict), counted at the end of the run from the shards' applied records."""
    cause: str = "died"
    """Why the actor was replaced (``View.cause``): died (a call found it dead, or it never
    started), silent (it had not answered for ``silent_s``: suspected, and killed and fenced though
    it may have lived), deposed (a newer epoch of its shard serves), rollback (a worker restarted
    because the run went back to a checkpoint), process (a rank re-created with the other ranks of
    its process, one of which died or went silent)."""
    silent_s: float | None = None
    """cause silent: how long it had not answered when it was replaced."""


@dataclass(slots=True)
class Registry:
    """What the supervisor must not forget (persisted before it acts)."""

    slots: list[SlotRecord]
    reserved: list[int]
    """Per shard: the highest epoch ever handed out (a new one is reserved before it is used)."""
    replicated: list[bool]
    """Per shard: its holder slot's actor confirmed holding its replica."""
    workers: list[WorkerRecord]
    spares: list[Address] = field(default_factory=list)
    phase: RunPhase = RunPhase.STARTING
    failure: str | None = None
    next_name: int = 0
    restarts: int = 0
    server_replacements: int = 0
    recoveries_started: int = 0
    replica_version: int = 0
    """Holders named so far (``SetReplica.version``: a primary ignores an older, delayed one)."""
    rereplications_started: int = 0
    """Replicas rebuilt after a server was lost (the first replication of each shard at the start
    not counted)."""
    started_at: float = 0.0
    """When the run's supervisor first started (recovery event times are reported relative to
    it)."""
    training: bool = False
    """Some worker was sent ``Start`` (before that no update exists, and a lost server is simply
    started again)."""
    checkpoint_steps: list = field(default_factory=list)
    """Per shard: the newest checkpoint file step its primaries reported (the file baseline)."""
    replica_targets: list = field(default_factory=list)
    """``[shard, holder]``: the holders a replicate of each shard was sent toward, oldest first
    (recorded before it is sent; an earlier one kept while it is still one of the holder slot's
    servers). A primary installs, re-sends snapshots to and appends to the holder it was last told
    of, or the one it was rebuilt from (recorded as the last when the recovery is sent), so the
    last holder named for a shard is the one with its newest copy -- unless it never got the
    replica: then it refuses the export (``RefusalKind.NO_REPLICA``), fences the shard's older
    epochs and is forgotten, and the one named before it is the last."""
    events: list[RecoveryEvent] = field(default_factory=list)

    @classmethod
    def new(cls, num_shards: int, num_workers: int) -> Registry:
        return cls(
            [SlotRecord() for _ in range(num_slots(num_shards))],
            [0] * num_shards,
            [False] * num_shards,
            [WorkerRecord() for _ in range(num_workers)],
            checkpoint_steps=[None] * num_shards,
        )

    def to_json(self) -> str:
        return json.dumps(
            {name: _plain(getattr(self, name)) for name in _FIELDS[Registry]}, separators=(",", ":")
        )

    @classmethod
    def from_json(cls, text: str) -> Registry:
        d = json.loads(text)
        d["slots"] = [SlotRecord(**{**s, "phase": SlotPhase(s["phase"])}) for s in d["slots"]]
        d["workers"] = [
            WorkerRecord(**{**w, "phase": WorkerPhase(w["phase"])}) for w in d["workers"]
        ]
        d["phase"] = RunPhase(d["phase"])
        d["events"] = [RecoveryEvent(**e) for e in d["events"]]
        return cls(**d)

    def routes(self, num_shards: int) -> tuple[Route, ...]:
        return tuple(self.route(i) for i in range(num_shards))

    def route(self, shard: int) -> Route:
        """Where workers send a shard's traffic. A recovering slot's spare is routed none before
        the supervisor has recorded it serving (it may be rebuilt again, or the recovery
        abandoned, and must not have acknowledged anything): until then, the primary it replaces."""
        slot = self.slots[shard]
        if slot.phase is SlotPhase.RECOVERING and slot.replacing is not None:
            return Route(shard, slot.replacing, slot.replacing_epoch)
        return Route(shard, slot.actor or "", slot.epoch)


_WRITE_ASKED = Persist("", "")
"""What a decision returns to have the registry written (``SupervisorProtocol._persist``)."""

_FIELDS = {
    cls: tuple(f.name for f in dataclasses.fields(cls))
    for cls in (Registry, SlotRecord, WorkerRecord, RecoveryEvent)
}


def _record(obj) -> dict:
    """A flat record (its fields hold scalars, enums or lists of scalars) as JSON-able builtins."""
    out = {}
    for name in _FIELDS[type(obj)]:
        v = getattr(obj, name)
        out[name] = v.value if isinstance(v, enum.Enum) else v
    return out


def _plain(value):
    """``value`` as JSON-able builtins (records as dicts, enums as their values); faster than
    ``asdict``."""
    if isinstance(value, list):
        return [_record(v) if type(v) in _FIELDS else v for v in value]
    return value.value if isinstance(value, enum.Enum) else value


@dataclass(frozen=True, slots=True)
class SupervisorSpec:
    num_shards: int
    num_workers: int
    total_steps: int
    recovery: str = "replica"
    """replica | checkpoint | none."""
    start_step: int = 0
    """Steps the run starts at (a resume from checkpoint files)."""
    resume_step: int | None = None
    """--resume-from: every shard loads its checkpoint file of this step at the start."""
    num_spares: int = 1
    max_worker_restarts: int = 3
    max_server_replacements: int = 100
    probe_interval_s: float = 0.2
    probe_timeout_s: float = 2.0
    suspect_after_s: float = 10.0
    """A server that has not answered a probe for this long is replaced as if dead (it is killed and
    fenced)."""
    timer_slack_s: float = 0.05
    """A timer that fires later than this after it was due means the supervisor was held up (its
    event loop is milliseconds late at most otherwise; the simulator's timers are never late)."""
    start_timeout_s: float = 180.0
    """An actor that does not answer this long after it was created ends the run (too few
    resources)."""
    op_timeout_s: float = 60.0
    """An operation (load, recover, replicate, start) not answered this long is given up and decided
    again."""
    node_ids: tuple[str, ...] = ()
    """Nodes to spread server slots over (empty: one node, no placement)."""
    process_ranks: int = 1
    """Pre-aggregation: ranks per process that push as one (consecutive ranks). They are created
    in one process, re-created all together when one of them dies (a process's ranks die
    together, and one suspected dead is killed with its process), and started at one step: a rank
    of them cannot go on without the others (1: each rank on its own)."""

    def process_of(self, rank: int) -> tuple[int, ...]:
        """The ranks that share ``rank``'s process and push as one (``rank`` alone if none)."""
        first = rank - rank % self.process_ranks
        return tuple(range(first, min(first + self.process_ranks, self.num_workers)))


@dataclass(frozen=True, slots=True)
class View:
    """What the last probe round saw: per name, a description/status, or a ``Failure``."""

    answers: dict
    silent_s: dict
    """Per name: seconds since it last answered a probe (0 if it answered this round)."""
    age_s: dict
    """Per name: seconds since this supervisor incarnation first knew it."""
    answered: frozenset = frozenset()
    """Names that answered at least one probe of this supervisor incarnation."""
    gone: frozenset = frozenset()
    """Names some call found dead (an actor's death is final)."""

    def alive(self, name: str | None) -> bool:
        return (
            name is not None
            and name in self.answers
            and not isinstance(self.answers[name], (Failure, StartFailed))
        )

    def start_failed(self, name: str | None) -> str | None:
        a = self.answers.get(name) if name else None
        return a.reason if isinstance(a, StartFailed) else None

    def gone_for_good(self, name: str | None) -> bool:
        """Some call found it dead (not merely silent)."""
        return name is None or name in self.gone or self.answers.get(name) is Failure.DEAD

    def dead(self, name: str | None, spec: SupervisorSpec) -> bool:
        """Gone for good, or silent long enough to be treated so: ``suspect_after_s`` once it has
        answered, ``start_timeout_s`` before (a process still starting up is slow, not dead)."""
        if self.gone_for_good(name) or self.start_failed(name):
            return True
        if self.alive(name):
            return False
        if name in self.answered:
            return self.silent_s.get(name, 0.0) >= spec.suspect_after_s
        return self.age_s.get(name, 0.0) >= spec.start_timeout_s

    def describe(self, name: str | None) -> ServerDescription | None:
        a = self.answers.get(name)
        return a if isinstance(a, ServerDescription) else None

    def cause(self, name: str | None) -> dict:
        """Why ``name``, treated as dead, is replaced: ``{"cause": "died" | "deposed" | "silent"}``,
        with ``silent_s`` for a silent one (``RecoveryEvent.cause``)."""
        if self.gone_for_good(name) or self.start_failed(name):
            return {"cause": "died"}
        d = self.describe(name)
        if d is not None and d.deposed:
            return {"cause": "deposed"}
        return {"cause": "silent", "silent_s": round(self.silent_s.get(name, 0.0), 3)}

    def why(self, name: str | None) -> str:
        """``cause`` as the end of a sentence: is dead / was deposed / has not answered for 2.1s."""
        c = self.cause(name)
        if c["cause"] == "silent":
            return f"has not answered for {c['silent_s']:.1f}s"
        return "was deposed" if c["cause"] == "deposed" else "is dead"

    def condition(self, name: str | None, spec: SupervisorSpec) -> str:
        """ok | suspect (silent too long: maybe partitioned, maybe dead) | dead (confirmed, or
        deposed)."""
        d = self.describe(name)
        if self.gone_for_good(name) or (d is not None and d.deposed):
            return "dead"
        return "suspect" if self.dead(name, spec) else "ok"

    def status(self, name: str | None):
        a = self.answers.get(name) if name else None
        return None if a is None or isinstance(a, (Failure, ServerDescription, StartFailed)) else a


ROUND_PUT_OFFS = 8
"""The most times one probe round's timeout is set again because it fired late (``_put_off``)."""


def any_started(reg: Registry) -> bool:
    """Whether some worker may have pushed: one was ever sent ``Start`` (no update exists before
    that)."""
    return reg.training


def resume_step(descriptions: list[ServerDescription], rank: int) -> int:
    """Where a (re)started rank goes on: the first step some shard has not *logged* from it. Only
    logged updates count: one applied but not yet logged may be lost with its primary, and a rank
    resumed past it would push a step ahead of the rebuilt shard."""
    return min(d.durable_clocks[rank] for d in descriptions)


def _whole_processes(out: list, reg: Registry, spec: SupervisorSpec) -> list:
    """Pre-aggregation: a rank re-created means its process's ranks are all re-created with it (in
    rank order, so the first names the process), and nothing else is decided for them this
    round; ranks that all finished stay finished."""
    recreate = {
        m for d in out if d.action is Action.CREATE_WORKER for m in spec.process_of(d.target)
    }
    if not recreate:
        return out
    kept = [d for d in out if not (d.target in recreate and d.action in WORKER_ACTIONS)]
    return kept + [
        Decision(Action.CREATE_WORKER, m, f"worker {m}'s process is re-created")
        for m in sorted(recreate)
    ]


SPARE_TAKERS = frozenset((Action.RECOVER, Action.REPLACE_HOLDER, Action.ROLLBACK))
"""Decisions carried out on a spare (a new actor for a dead or suspected slot)."""
WORKER_ACTIONS = frozenset(
    (
        Action.KILL_WORKER,
        Action.CREATE_WORKER,
        Action.START_WORKER,
        Action.MARK_RUNNING,
        Action.MARK_DONE,
    )
)


def replica_target_history(reg: Registry, shard: int) -> list:
    """The holders a replicate of ``shard`` was sent toward, newest first."""
    return [holder for s, holder in reversed(reg.replica_targets) if s == shard]


def name_replica_target(reg: Registry, shard: int, k: int, holder: Address) -> None:
    """Record ``holder`` as the last holder of ``shard`` (before a replicate or a recovery names
    it). The earlier ones are kept while they are still servers of the holder slot: a retiring one
    has the newest copy if every later one never got it."""
    earlier = [
        h
        for h in replica_target_history(reg, shard)
        if h != holder and holds_for_slot(reg, shard, k, h)
    ]
    reg.replica_targets = [t for t in reg.replica_targets if t[0] != shard] + [
        [shard, h] for h in reversed([holder, *earlier])
    ]


def forget_replica_target(reg: Registry, shard: int, holder: Address) -> None:
    """``holder`` refused ``shard``'s export since it never got the replica (and fenced the older
    epochs): it holds no copy, and the holder named before it is the last."""
    reg.replica_targets = [t for t in reg.replica_targets if list(t) != [shard, holder]]


def last_replica_target(reg: Registry, shard: int) -> Address | None:
    """The holder a replicate of ``shard`` was last sent toward (``Registry.replica_targets``)."""
    history = replica_target_history(reg, shard)
    return history[0] if history else None


def holds_for_slot(reg: Registry, shard: int, k: int, name: Address | None) -> bool:
    """Whether ``name`` is one of the servers of ``shard``'s holder slot: its actor, the one a
    recovery of the slot replaces, or one it retires."""
    slot = reg.slots[replica_slot(shard, k)]
    return name is not None and (
        name == slot.actor or name == slot.replacing or name in slot.retiring
    )


def may_rebuild_from(reg: Registry, view, shard: int, k: int, name: Address | None) -> bool:
    """Whether ``name`` is still one of ``shard``'s holder slot's servers and no call found it
    dead: a holder a recovery may ask for the shard's replica."""
    return holds_for_slot(reg, shard, k, name) and not (
        view is not None and view.gone_for_good(name)
    )


def fallback_holder(reg: Registry, view, shard: int | None, k: int) -> Address | None:
    """The server to rebuild ``shard`` from when its holder slot's actor is not confirmed holding
    the replica: the last holder the replica was sent to, if it is still one of the slot's servers
    (its actor while the install is unconfirmed, one a recovery replaces, or one it retires: make
    before break) and no call found it dead; else None."""
    if shard is None or reg.replicated[shard]:
        return None
    last = last_replica_target(reg, shard)
    return last if may_rebuild_from(reg, view, shard, k, last) else None


def earlier_holder(reg: Registry, view, shard: int, k: int, refused_by: Address) -> Address | None:
    """After the last holder named for ``shard`` (``refused_by``) refused a recovery's export since
    it never got the replica: the holder named before it, if it is still one of the holder slot's
    servers and no call found it dead (it has every update a primary acknowledged: none was logged
    on the later one, which now refuses the older epochs); else None."""
    history = replica_target_history(reg, shard)
    if len(history) < 2 or history[0] != refused_by:
        return None
    return history[1] if may_rebuild_from(reg, view, shard, k, history[1]) else None


def fenced_by_recovery(view: View, slot: SlotRecord, name: Address | None) -> bool:
    """``name`` (a recovering slot's replaced or reinstating primary) was deposed only by its
    holder's fence at or below the slot's epoch -- this recovery's export -- not by a successor
    that serves: it still has every update it acknowledged, so it may be reinstated."""
    d = view.describe(name)
    return (
        d is not None
        and d.deposed
        and d.fenced_at is not None
        and d.fenced_at <= slot.epoch
        and not view.gone_for_good(name)
    )


def replaced_may_serve_on(view: View, spec: SupervisorSpec, slot: SlotRecord) -> bool:
    """The primary slot ``slot``'s recovery replaces was only suspected when it began and is
    neither found dead nor deposed by a successor (one deposed only by this recovery's fence
    counts as serving on): if the recovery cannot finish, it may be put back."""
    return (
        slot.replacing is not None
        and not slot.replacing_confirmed
        and (
            view.condition(slot.replacing, spec) != "dead"
            or fenced_by_recovery(view, slot, slot.replacing)
        )
    )


def lost_while_reinstating(shard: int, slot: SlotRecord) -> str:
    return (
        f"shard {shard} is lost: its replica holder died while its primary {slot.actor}, only "
        "suspected, was being replaced, and that primary is dead or deposed now"
    )


def decide(
    reg: Registry, view: View, busy: frozenset, spec: SupervisorSpec, now: float
) -> list[Decision]:
    """What to do now, with reasons. A FAIL comes alone."""
    k, out = spec.num_shards, []
    if reg.phase in (RunPhase.DONE, RunPhase.FAILED):
        return []
    roles = [(s.actor, f"server slot {j}") for j, s in enumerate(reg.slots)] + [
        (n, "a spare server") for n in reg.spares
    ]
    for name, what in roles + [(w.actor, f"worker {rank}") for rank, w in enumerate(reg.workers)]:
        if view.start_failed(name):  # a constructor raised: starting it again would raise again
            return [
                Decision(Action.FAIL, name, f"{what} failed to start: {view.start_failed(name)}")
            ]

    def rebuilt(j: int) -> bool:
        """Slot ``j`` is recovering and its spare already is the shard's primary at the recovery's
        epoch (the rebuild finished; its answer was lost): every acknowledged update is in it --
        what it would have answered with -- however the holder fares since."""
        slot, d = reg.slots[j], view.describe(reg.slots[j].actor)
        return (
            slot.phase is SlotPhase.RECOVERING
            and d is not None
            and d.shard == primary_shard(j, k)
            and d.epoch == slot.epoch
            and not d.deposed
            and not d.recovering
        )

    def spare_may_hold(j: int) -> bool:
        """Slot ``j``'s spare, not found dead, may have the shard rebuilt (at an older epoch of the
        recovery, its answer lost): undescribed yet, still recovering, or its primary."""
        slot = reg.slots[j]
        if view.dead(slot.actor, spec):
            return False
        d = view.describe(slot.actor)
        return d is None or d.recovering or (d.shard == primary_shard(j, k) and not d.deposed)

    # --- servers ---
    dead_primaries = []
    for j, slot in enumerate(reg.slots):
        shard = primary_shard(j, k)
        if slot.phase is SlotPhase.EMPTY:
            out.append(Decision(Action.CREATE_SLOT, j, f"slot {j} has no actor"))
        elif slot.phase is SlotPhase.CREATING:
            if view.alive(slot.actor):
                if shard is None:
                    out.append(
                        Decision(Action.HOLDER_READY, j, f"replica holder {slot.actor} is up")
                    )
                else:
                    out.append(Decision(Action.LOAD, j, f"server {slot.actor} is up"))
            elif view.gone_for_good(slot.actor) or (
                slot.actor in view.answered and view.dead(slot.actor, spec)
            ):
                out.append(
                    Decision(
                        Action.CREATE_SLOT,
                        j,
                        f"server {slot.actor} of slot {j} died or went silent while starting",
                    )
                )
            elif view.dead(slot.actor, spec):
                return [
                    Decision(
                        Action.FAIL,
                        j,
                        f"server slot {j} did not start within {spec.start_timeout_s:.0f}s; the "
                        "cluster may lack "
                        "the resources it asks for (see `ray status`), or raise "
                        "RAYTRAIN_FT_ACTOR_START_TIMEOUT_S",
                    )
                ]
        elif slot.phase is SlotPhase.LOADING:
            if view.dead(slot.actor, spec):
                out.append(
                    Decision(
                        Action.CREATE_SLOT, j, f"server {slot.actor} of slot {j} died while loading"
                    )
                )
            elif ("load", j) not in busy and view.alive(slot.actor):
                out.append(Decision(Action.LOAD, j, f"slot {j} loads"))
        elif slot.phase is SlotPhase.RECOVERING:
            if ("recover", j) in busy:
                pass
            elif rebuilt(j):
                out.append(
                    Decision(
                        Action.ADOPT_RECOVERY,
                        j,
                        f"{slot.actor} already serves shard {shard} at the recovery's epoch "
                        f"{slot.epoch} (its answer was lost)",
                    )
                )
            else:
                out.append(
                    Decision(
                        Action.RECOVER,
                        j,
                        f"slot {j}'s recovery is not in flight (the spare died, or the supervisor "
                        "restarted)",
                    )
                )
        elif slot.phase is SlotPhase.SERVING:
            desc = view.describe(slot.actor)
            if view.dead(slot.actor, spec) or (desc is not None and desc.deposed):
                dead_primaries.append(
                    (j, f"server {slot.actor} of slot {j} {view.why(slot.actor)}")
                )
    nothing_trained = not any_started(reg)

    def condition(name) -> str:
        return view.condition(name, spec)

    def replica_copy(shard: int) -> str:
        """The condition of shard ``shard``'s second copy, at its holder."""
        holder = reg.slots[replica_slot(shard, k)]
        if not reg.replicated[shard] or holder.phase not in (
            SlotPhase.SERVING,
            SlotPhase.RECOVERING,
        ):
            return "dead"
        return condition(holder.actor)

    def fallback(shard: int) -> str | None:
        """For a shard whose holder slot's actor is not confirmed holding its replica: the
        condition of the server that may have its newest copy (``fallback_holder``), or None."""
        name = fallback_holder(reg, view, shard, k)
        if name is None:
            return None
        return "suspect" if view.dead(name, spec) else "ok"

    # A suspected server is replaced only when every shard it holds a copy of keeps a healthy other
    # copy: a suspicion never costs a shard. A loss is declared only when both copies are confirmed
    # gone.
    for j, why in dead_primaries:
        shard = primary_shard(j, k)
        confirmed = condition(reg.slots[j].actor) == "dead"
        if (
            nothing_trained
        ):  # no worker was started yet: start the slot again from the run's initial values
            out.append(Decision(Action.CREATE_SLOT, j, f"{why} before training began"))
            continue
        if spec.recovery == "none":
            if confirmed:
                return [
                    Decision(
                        Action.FAIL,
                        j,
                        f"{why}, and recovery=none keeps no copy of it; "
                        "run with --recovery replica",
                    )
                ]
            continue
        if spec.recovery == "checkpoint":
            return [
                Decision(
                    Action.ROLLBACK, j, f"{why}: every shard goes back to its newest checkpoint"
                )
            ]
        if reg.server_replacements + 1 > spec.max_server_replacements:
            return [
                Decision(
                    Action.FAIL,
                    j,
                    f"{why}, and server replacements would exceed recovery.max_server_replacements="
                    f"{spec.max_server_replacements}",
                )
            ]
        mine = replica_copy(shard) if shard is not None else "ok"
        spare_copy = fallback(shard) if mine == "dead" and confirmed else None
        if spare_copy is not None:  # the primary is gone; the last holder named may have a copy
            if spare_copy == "ok":
                out.append(
                    Decision(
                        Action.RECOVER,
                        j,
                        f"{why} (rebuilt from {fallback_holder(reg, view, shard, k)}, the last "
                        "holder its replica was sent to)",
                    )
                )
            continue  # a suspected one is waited for
        if confirmed and mine == "dead":
            return [
                Decision(
                    Action.FAIL,
                    shard,
                    f"shard {shard} is lost: {why}, and its replica holder (slot "
                    f"{replica_slot(shard, k)}) "
                    "is dead or had not received its replica yet",
                )
            ]
        held = [
            h
            for h in replica_shards(j, k)
            if reg.slots[h].phase is not SlotPhase.SERVING or condition(reg.slots[h].actor) != "ok"
        ]
        if mine != "ok" or (not confirmed and held):
            continue  # the other copy is not healthy: wait for this one rather than give a shard up
        out.append(Decision(Action.REPLACE_HOLDER if shard is None else Action.RECOVER, j, why))
    for j, slot in enumerate(reg.slots):
        if slot.phase is SlotPhase.RECOVERING:
            shard = primary_shard(j, k)
            if ("recover", j) in busy or rebuilt(j):
                continue  # its answer (rebuilt, or the holder lost) decides, or was lost: adopted
            if slot.reinstating:
                if condition(slot.actor) == "dead" and not fenced_by_recovery(
                    view, slot, slot.actor
                ):
                    return [Decision(Action.FAIL, shard, lost_while_reinstating(shard, slot))]
                continue  # its Reinstate is issued (again) once it answers
            if spare_may_hold(j):
                continue  # asked again: it serves on if it was rebuilt before (never give it up)
            if replica_copy(shard) == "dead" and fallback(shard) is None:
                # nothing to rebuild from: not issued again
                out = [d for d in out if not (d.action is Action.RECOVER and d.target == j)]
                if replaced_may_serve_on(view, spec, slot):
                    if slot.replacing not in view.answered:
                        continue  # not heard from since a restart: whether it serves on is unknown
                    out.append(
                        Decision(
                            Action.ABANDON_RECOVERY,
                            j,
                            f"the replica holder of shard {shard} died while {slot.replacing}, "
                            "only "
                            "suspected, was being replaced",
                        )
                    )
                    continue
                if not view.gone_for_good(slot.actor) and view.describe(slot.actor) is None:
                    continue  # the spare is silent, not found dead: it may have the shard rebuilt
                return [
                    Decision(
                        Action.FAIL,
                        shard,
                        f"shard {shard} is lost: its primary died, and its replica holder "
                        f"(slot {replica_slot(shard, k)}) died before the shard was rebuilt",
                    )
                ]
    serving = [s.phase is SlotPhase.SERVING and view.alive(s.actor) for s in reg.slots]
    for shard in range(k):
        h = replica_slot(shard, k)
        if (
            spec.recovery == "replica"
            and not reg.replicated[shard]
            and serving[shard]
            and serving[h]
            and ("replicate", shard) not in busy
        ):
            out.append(
                Decision(Action.REPLICATE, shard, f"shard {shard} has no replica on slot {h}")
            )
    # --- spares ---
    spares_alive = 0
    for name in reg.spares:
        if view.dead(name, spec):
            out.append(Decision(Action.DROP_SPARE, name, f"spare {name} {view.why(name)}"))
        else:
            spares_alive += 1
    # a recovery takes a spare: with fewer warm spares than recoveries waiting (num_spares 0, or
    # more deaths than spares) one is made for them, or the recovery would wait forever
    takers = sum(d.action in SPARE_TAKERS for d in out)
    if spec.recovery != "none" and spares_alive < max(spec.num_spares, takers):
        out.append(
            Decision(
                Action.CREATE_SPARE,
                None,
                f"{spares_alive} of {spec.num_spares} warm spares, {takers} recoveries waiting",
            )
        )
    # --- workers ---
    all_up = all(serving) and (spec.recovery != "replica" or all(reg.replicated))
    primaries = [view.describe(reg.slots[i].actor) for i in range(k)]
    can_start = all(serving[:k]) and all(
        d is not None and d.shard == i and d.epoch == reg.slots[i].epoch and not d.deposed
        for i, d in enumerate(primaries)
    )
    for rank, w in enumerate(reg.workers):
        status = view.status(w.actor)
        if status is not None and status.error:
            # one line of the project's own, or a traceback below the line
            sep = "\n" if "\n" in status.error.strip() else " "
            why = f"worker {rank} failed at step {status.step}:{sep}{status.error.strip()}"
            return [Decision(Action.FAIL, rank, why)]
        if (
            w.phase is WorkerPhase.NONE
        ):  # created while the servers start (a worker process starts slowest)
            out.append(Decision(Action.CREATE_WORKER, rank, f"worker {rank} has no actor"))
            continue
        if w.phase is WorkerPhase.DONE:
            continue
        if view.dead(w.actor, spec):
            if (
                w.actor not in view.answered
                and not view.gone_for_good(w.actor)
                and reg.phase is not RunPhase.RUNNING
            ):
                return [
                    Decision(
                        Action.FAIL,
                        rank,
                        f"worker {rank} did not start within {spec.start_timeout_s:.0f}s; the "
                        "cluster may lack "
                        "the resources it asks for (see `ray status`), or raise "
                        "RAYTRAIN_FT_ACTOR_START_TIMEOUT_S",
                    )
                ]
            if w.restarts >= spec.max_worker_restarts:
                return [
                    Decision(
                        Action.FAIL,
                        rank,
                        f"worker {rank} died {w.restarts + 1} times; the limit is "
                        f"recovery.max_worker_restarts={spec.max_worker_restarts}",
                    )
                ]
            if spec.process_ranks > 1 and not view.gone_for_good(w.actor):
                # silent, not found dead: its process may live on and push for every rank it
                # holds (a sync step then needs no one else), past the step its ranks would be
                # re-created at -- also when only an earlier supervisor incarnation heard it. It
                # is killed first, re-created once a call finds it dead.
                out.append(
                    Decision(
                        Action.KILL_WORKER,
                        rank,
                        f"worker {rank} ({w.actor}) has not answered for "
                        f"{view.silent_s.get(w.actor, 0):.1f}s: its process is killed before its "
                        "ranks are re-created",
                    )
                )
                continue
            out.append(
                Decision(
                    Action.CREATE_WORKER, rank, f"worker {rank} ({w.actor}) {view.why(w.actor)}"
                )
            )
            continue
        if status is None:
            continue
        if status.done:
            out.append(Decision(Action.MARK_DONE, rank, f"worker {rank} finished"))
        elif status.started and w.phase is not WorkerPhase.RUNNING:
            out.append(Decision(Action.MARK_RUNNING, rank, f"worker {rank} trains"))
        elif (
            not status.started
            and w.phase in (WorkerPhase.CREATING, WorkerPhase.STARTING)
            and ("start", rank) not in busy
            and can_start
            and (all_up or reg.phase is RunPhase.RUNNING)
        ):
            out.append(Decision(Action.START_WORKER, rank, f"worker {rank} is up and not training"))
    if spec.process_ranks > 1:
        out = _whole_processes(out, reg, spec)
    # the end is declared only on a round every server answered (a holder silent for a moment may be
    # dead) and every slot serves: workers may be done while a primary is still being rebuilt (with
    # relaxed durability their last pushes were answered before the primary died), and the final
    # parameters are read from the primaries
    replicated = spec.recovery != "replica" or (
        all(reg.replicated) and all(view.alive(s.actor) for s in reg.slots)
    )
    if (
        reg.phase is RunPhase.RUNNING
        and all(w.phase is WorkerPhase.DONE for w in reg.workers)
        and not out
        and replicated
        and all(s.phase is SlotPhase.SERVING for s in reg.slots)
    ):
        return [
            Decision(
                Action.FINISH,
                None,
                "every worker finished"
                + (" and every shard is replicated" if spec.recovery == "replica" else ""),
            )
        ]
    return out


class SupervisorProtocol:
    """The supervisor's state machine. ``params_of(shard)``: the initial values of a shard (start
    only)."""

    decide = staticmethod(decide)
    """The pure policy each probe round applies (a known-bad variant swaps it)."""

    def __init__(
        self,
        spec: SupervisorSpec,
        ranges: list,
        params_of,
        registry: Registry | None = None,
        now: float = 0.0,
        key: str = "registry",
        name_prefix: str = "",
    ):
        self.spec, self.ranges, self.params_of = spec, ranges, params_of
        self.key, self.name_prefix = key, name_prefix
        self.reg = registry or Registry.new(spec.num_shards, spec.num_workers)
        if registry is None:
            self.reg.started_at = now
        self._cids = itertools.count(1)
        self._ops: dict[int, tuple] = {}
        """cid -> (kind, target, context) of each operation in flight."""
        self._op_dst: dict[int, str] = {}
        """cid -> the process each operation in flight was sent to."""
        self._round: dict[int, str] | None = None
        """cid -> name of each probe of the round in flight."""
        self._answers: dict[str, Any] = {}
        self._stale_probes: set[int] = set()
        """Probes of the open round whose answer may predate an operation on their process (each
        is asked again when it answers)."""
        self._rounds = 0
        """Probe rounds started by this incarnation."""
        self._view_round = 0
        """The number of the probe round ``view`` comes from."""
        self._last_seen: dict[str, float] = {}
        self._known_since: dict[str, float] = {}
        self._answered: set[str] = set()
        self._gone: set[str] = set()
        self._late: dict[int, str] = {}
        """cid -> name of probes answered after their round was over."""
        self._soon_pending = False
        self._again = False
        self._spare_wanted_since: dict[int, float] = {}
        """Slot -> when a replacement was first decided for it and no spare was there to take
        (``--num-spares 0``, or more deaths than spares): its recovery is dated from then, the
        wait for a new spare's process included. Dropped once a round no longer decides it."""
        self._probe_timers = 0
        """Probe timers set and not fired yet. A round's end sets the next only when none is: a
        round started otherwise (a look-again, a worker's failure report, the actor's heartbeat)
        must not start a second chain of timers -- chains never end, so the rounds multiplied (a
        1-worker run measured 17.6 rounds/s at a 0.2 s interval)."""
        self._parked: list[tuple[int, RouteAfter, int]] = []
        """(rid, request, probe rounds started when it came) of route requests not answered yet."""
        self._started_at = now
        self.view: View | None = None
        self.failed_starting = False
        """The run failed because an actor's constructor raised (a setting to fix), not while it
        trained (not kept across a restart of this supervisor: the run then counts as failed
        training)."""
        self.latest: dict[str, Any] = {}
        """Per name: its newest probe answer (the round in flight included)."""
        self.view_started_at = 0.0
        """When the probe round ``view`` comes from started (what happened after it, the view cannot
        show)."""
        self._round_started_at = 0.0
        self._round_due = 0.0
        """When the open round's timeout timer is due (``_put_off``)."""
        self._put_offs = 0
        """Times the open round's timeout was set again (``_put_off``)."""
        self.history: list[tuple[str, str]] = []
        """(action, reason) of every decision carried out, in order."""

    @classmethod
    def restore(
        cls, spec: SupervisorSpec, ranges: list, params_of, saved: str, now: float, **kw
    ) -> SupervisorProtocol:
        """A restarted supervisor: the registry as persisted; the next probe round finds out the
        rest."""
        reg = Registry.from_json(saved)
        reg.restarts += 1
        reg.events.append(
            RecoveryEvent("supervisor", 0, "rebuilt", detected_at=now, serving_at=now)
        )
        return cls(spec, ranges, params_of, reg, now, **kw)

    # --- entry points
    # -------------------------------------------------------------------------------

    def on_start(self, now: float) -> list:
        return self._write_ahead([self._persist(), *self._soon()])

    def _soon(self) -> list:
        """Look again as soon as possible (something changed): at once if no round is in flight,
        else right after it; one such request stands for any number made meanwhile."""
        if self._round is not None:
            self._again = True
            return []
        if self._soon_pending:
            return []
        self._soon_pending = True
        self._probe_timers += 1
        return [Timer("probe", 0.0)]

    def on_timer(self, token, now: float) -> list:
        return self._write_ahead(self._on_timer(token, now))

    def on_request(self, rid: int, msg, now: float) -> list:
        return self._write_ahead(self._on_request(rid, msg, now))

    def on_reply(self, cid: int, value, now: float) -> list:
        return self._write_ahead(self._on_reply(cid, value, now))

    def on_failure(self, cid: int, failure: Failure, now: float) -> list:
        return self._write_ahead(self._on_reply(cid, failure, now))

    def _write_ahead(self, effects: list) -> list:
        """One ``Persist`` of the registry as it ends up, before every other effect of the handler
        (a decision later in the same handler being recorded early is what a crash right after it
        would leave anyway)."""
        if not any(isinstance(e, Persist) for e in effects):
            return effects
        written = Persist(self.key, self.reg.to_json())
        return [written] + [e for e in effects if not isinstance(e, Persist)]

    def _on_timer(self, token, now: float) -> list:
        if token == "probe":
            self._soon_pending = False
            self._probe_timers = max(0, self._probe_timers - 1)
            return self._start_round(now) if self._round is None else []
        if token == "heartbeat":  # the actor's safety net, whatever happened to the timers
            if (
                self._round is None
                and now - self._round_started_at > 5 * self.spec.probe_interval_s
            ):
                self._probe_timers = 0  # none fired for that long: the next round's end sets one
                return self._start_round(now)
            return []
        if (
            isinstance(token, tuple)
            and token[0] == "probe_timeout"
            and token[1] == self._rounds
            and self._round is not None
        ):
            if self._put_off(now):
                return [Timer(token, self.spec.probe_interval_s)]
            return self._finish_round(now)  # the silent ones count as unanswered
        if isinstance(token, tuple) and token[0] == "op_timeout" and token[1] in self._ops:
            self._op_dst.pop(token[1], None)
            return self._op_done(self._ops.pop(token[1]), Failure.UNAVAILABLE, now)
        return []

    def _put_off(self, now: float) -> bool:
        """Whether the open round's timeout, firing at ``now``, is set again (for a probe
        interval) instead of ending the round: it fired late (by more than ``timer_slack_s``), so
        this supervisor was held up itself -- a pause, its process stopped or starved of CPU --
        and answers that came meanwhile may wait behind the timer (its event loop runs a due
        timer first) or in Ray's threads, which resume with it. They are heard first: no one is
        judged silent for the time the supervisor was not listening. Again each time it fires
        late, up to ``ROUND_PUT_OFFS`` times per round (a supervisor that is always late still
        decides)."""
        late_s = now - self._round_due
        if late_s <= self.spec.timer_slack_s or self._put_offs >= ROUND_PUT_OFFS:
            return False
        self._put_offs += 1
        self._round_due = now + self.spec.probe_interval_s
        return True

    def _on_request(self, rid: int, msg, now: float) -> list:
        if isinstance(msg, RouteAfter):
            self._parked.append((rid, msg, self._rounds))
            effects = self._answer_routes(now)
            if msg.failed and any(p[0] == rid for p in self._parked) and self._round is None:
                effects += self._start_round(now)  # a worker saw a failure: look now
            return effects
        return [
            Reply(
                rid,
                Refused(RefusalKind.FAILED, f"the supervisor does not handle {type(msg).__name__}"),
            )
        ]

    def _on_reply(self, cid: int, value, now: float) -> list:
        in_round = self._round is not None and cid in self._round
        name = self._round.pop(cid) if in_round else self._late.pop(cid, None)
        if name is not None:
            first = name not in self._answered and not isinstance(value, Failure)
            self.latest[name] = value
            if not isinstance(value, Failure):
                self._last_seen[name] = now
                self._answered.add(name)
            elif value is Failure.DEAD:
                self._gone.add(name)
            if in_round and cid in self._stale_probes:
                self._stale_probes.discard(cid)
                again = [] if isinstance(value, Failure) else self._probe(name)
                if again:  # alive: what it holds now is asked again
                    return again
                # (no longer known -- killed, retired -- or failed: the round goes on without it)
            if not in_round:  # a process that was still starting answered: decide about it soon
                return self._soon() if first or value is Failure.DEAD else []
            self._answers[name] = value
            # the round is complete once everyone who ever answered has: one still starting holds no
            # decision up
            if not any(n in self._answered for n in self._round.values()):
                return self._finish_round(now)
            return []
        op = self._ops.pop(cid, None)
        if op is None:
            return []
        dst = self._op_dst.pop(cid, None)
        return ([] if isinstance(value, Failure) else self._ask_again(dst)) + self._op_done(
            op, value, now
        )

    def _ask_again(self, name: str | None) -> list:
        """``name`` answered an operation (it may serve, hold or have given up something new):
        what it told the open round may come from before that and counts for nothing -- the
        round asks it again, so no decision reads a role it no longer has (a primary reinstated
        while its description still says deposed). An answer still on its way is asked again
        when it comes (it may have been given before the operation, and overtaken)."""
        if self._round is None:
            return []
        waiting = [cid for cid, n in self._round.items() if n == name]
        if waiting:
            self._stale_probes.update(waiting)
            return []
        if name not in self._answers:
            return []
        del self._answers[name]
        return self._probe(name)

    def _probe(self, name: str) -> list:
        """Ask ``name`` what it holds (a server) or how far it is (a worker), in the open round."""
        kind = dict(self._known()).get(name)
        if kind is None:
            return []
        cid = next(self._cids)
        self._round[cid] = name
        return [Call(cid, name, Describe() if kind == "server" else PollStatus())]

    def _cause(self, name: str | None) -> dict:
        """``View.cause`` of ``name`` in the view decisions are taken on (fields of its event)."""
        return self.view.cause(name) if self.view is not None else {}

    @property
    def phase(self) -> RunPhase:
        return self.reg.phase

    # --- probing
    # ------------------------------------------------------------------------------------

    def _known(self) -> list[tuple[str, str]]:
        names = [(s.actor, "server") for s in self.reg.slots if s.actor] + [
            (n, "server") for n in self.reg.spares
        ]
        names += [(n, "server") for s in self.reg.slots for n in s.retiring]
        # a primary being replaced: whether it lives or was deposed decides an abandon
        names += [(s.replacing, "server") for s in self.reg.slots if s.replacing]
        names += [(w.actor, "worker") for w in self.reg.workers if w.actor]
        return names

    def _start_round(self, now: float) -> list:
        if self.reg.phase in (RunPhase.DONE, RunPhase.FAILED):
            return []
        self._round, self._answers, self._stale_probes = {}, {}, set()
        self._rounds += 1
        self._round_started_at = now
        effects = []
        for name, kind in self._known():
            self._known_since.setdefault(name, now)
            self._last_seen.setdefault(name, now)
            cid = next(self._cids)
            self._round[cid] = name
            effects.append(Call(cid, name, Describe() if kind == "server" else PollStatus()))
        if not self._round:
            return self._finish_round(now)
        self._round_due, self._put_offs = now + self.spec.probe_timeout_s, 0
        return effects + [Timer(("probe_timeout", self._rounds), self.spec.probe_timeout_s)]

    def _finish_round(self, now: float) -> list:
        for cid, name in self._round.items():
            self._answers.setdefault(name, Failure.UNAVAILABLE)
            self._late[cid] = name  # its answer, if it comes, still counts
        self._round = None
        self._view_round = self._rounds
        self.view_started_at = self._round_started_at
        names = {n for n, _ in self._known()}
        self.view = View(
            dict(self._answers),
            {n: now - self._last_seen.get(n, now) for n in names},
            {n: now - self._known_since.get(n, now) for n in names},
            frozenset(self._answered),
            frozenset(self._gone),
        )
        self._learn(self.view)
        effects = []
        decided = self.decide(
            self.reg,
            self.view,
            frozenset((op[0], op[1]) for op in self._ops.values()),
            self.spec,
            now,
        )
        self._keep_spare_waits(decided)
        for d in decided:
            effects += self._carry_out(d, now)
            if self.reg.phase is RunPhase.FAILED:
                break
        effects += self._answer_routes(now)
        if self.reg.phase not in (RunPhase.DONE, RunPhase.FAILED):
            again, self._again = self._again, False
            if again:
                effects += self._soon()
            elif self._probe_timers == 0:
                self._probe_timers += 1
                effects.append(Timer("probe", self.spec.probe_interval_s))
        return effects

    def _keep_spare_waits(self, decided: list) -> None:
        """Forget when a slot began waiting for a spare once a round decides no replacement of it
        (its server answered again, or the wait ended otherwise)."""
        wanted = {d.target for d in decided if d.action in (Action.RECOVER, Action.REPLACE_HOLDER)}
        for j in [j for j in self._spare_wanted_since if j not in wanted]:
            del self._spare_wanted_since[j]

    def _learn(self, view: View) -> None:
        """Bookkeeping from descriptions: the newest checkpoint step per shard (the file
        baseline)."""
        for i in range(self.spec.num_shards):
            d = view.describe(self.reg.slots[i].actor)
            if d is not None and d.checkpoint_step is not None:
                known = self.reg.checkpoint_steps[i]
                self.reg.checkpoint_steps[i] = (
                    d.checkpoint_step if known is None else max(known, d.checkpoint_step)
                )

    # --- carrying decisions out
    # ----------------------------------------------------------------------

    def _persist(self) -> Persist:
        """Asks for the registry to be written: every entry point's ``_write_ahead`` replaces the
        handler's asks with one ``Persist`` of the registry as the handler leaves it, serialized
        once (a handler asked ~3 times on average: two thirds of the serializations were
        thrown away)."""
        return _WRITE_ASKED

    def _start_step(self, descriptions: list, rank: int) -> int:
        """Where a (re)started rank goes on; with pre-aggregation, one step for its process's
        ranks: the one a rank of them was already given, else the lowest they resume at (a
        step already applied is answered as a repeat)."""
        if self.spec.process_ranks == 1:
            return resume_step(descriptions, rank)
        process = self.spec.process_of(rank)
        # a Start sent again (its answer was lost) carries the step the first one did
        given = [
            self.reg.workers[m].start_step
            for m in process
            if self.reg.workers[m].start_step is not None
        ]
        if given:
            return given[0]
        return min(resume_step(descriptions, m) for m in process)

    def _name(self, kind: str) -> str:
        self.reg.next_name += 1
        return f"{self.name_prefix}{kind}-{self.reg.next_name}"

    def _op(self, kind: str, target, dst: str, msg, *context) -> list:
        """Call ``dst`` as operation ``kind`` on ``target``, given up after ``op_timeout_s``."""
        cid = next(self._cids)
        self._ops[cid] = (kind, target, *context)
        self._op_dst[cid] = dst
        return [Call(cid, dst, msg), Timer(("op_timeout", cid), self.spec.op_timeout_s)]

    def _node_for_slot(self, j: int) -> str | None:
        from raytrain_ft.recovery.policy import slot_nodes

        nodes = slot_nodes(len(self.reg.slots), list(self.spec.node_ids))
        return nodes[j] if nodes else None

    def _carry_out(self, d: Decision, now: float) -> list:
        self.history.append((d.action.value, d.reason))
        reg, k = self.reg, self.spec.num_shards
        a = d.action
        if a is Action.FAIL:
            reg.phase, reg.failure = RunPhase.FAILED, d.reason
            self.failed_starting = self.view is not None and bool(self.view.start_failed(d.target))
            return [
                self._persist(),
                Note("run_failed", {"reason": d.reason}),
            ] + self._refuse_routes(d.reason)
        if a is Action.FINISH:
            reg.phase = RunPhase.DONE
            return [self._persist(), Note("run_done", {})]
        if a is Action.CREATE_SLOT:
            slot = reg.slots[d.target]
            old = slot.actor
            slot.actor, slot.phase = self._name("server"), SlotPhase.CREATING
            for shard in {primary_shard(d.target, k), *replica_shards(d.target, k)} - {None}:
                reg.replicated[shard] = False
            kills = [Kill(name, d.reason) for name in (old, *slot.retiring) if name]
            slot.retiring = []
            return (
                [self._persist()]
                + kills
                + [Create(slot.actor, "server", slot=d.target, node=self._node_for_slot(d.target))]
            )
        if (
            a is Action.HOLDER_READY
        ):  # bookkeeping a probe re-derives: written with the next change, not on its own
            reg.slots[d.target].phase = SlotPhase.SERVING
            return []
        if a is Action.LOAD:
            return self._load(d.target)
        if a is Action.REPLICATE:
            shard = d.target
            holder = reg.slots[replica_slot(shard, k)].actor
            reg.replica_version += 1  # persisted before the holder is named with it
            name_replica_target(reg, shard, k, holder)
            primary = reg.slots[shard].actor
            calls = self._op(
                "replicate",
                shard,
                primary,
                SetReplica(holder, reg.replica_version),
                holder,
                primary,
                reg.slots[shard].epoch,
            )
            if not reg.training:
                return [self._persist()] + calls
            reg.rereplications_started += 1
            return (
                [self._persist()]
                + calls
                + [
                    Note(
                        "rereplication_started",
                        {"n": reg.rereplications_started, "shard": shard, "holder": holder},
                    )
                ]
            )
        if a is Action.RECOVER:
            return self._recover(d.target, d.reason, now)
        if a is Action.ADOPT_RECOVERY:
            slot, desc = reg.slots[d.target], self.view.describe(reg.slots[d.target].actor)
            # what the lost answer said (nothing replayed or moved is known any more)
            answer = Recovered(desc.seq, 0, 0, tuple(enumerate(desc.durable_clocks)))
            return [Note("recovery_adopted", {"shard": d.target, "epoch": slot.epoch})] + (
                self._rebuilt(d.target, slot.actor, slot.epoch, answer, now)
            )
        if a is Action.ABANDON_RECOVERY:
            return self._abandon(d.target, d.reason, now)
        if a is Action.REPLACE_HOLDER:
            return self._replace_holder(d.target, d.reason, now)
        if a is Action.ROLLBACK:
            return self._rollback(d.target, d.reason, now)
        if a is Action.CREATE_SPARE:
            name = self._name("server")
            reg.spares.append(name)
            return [self._persist(), Create(name, "server", node=self._spare_node())]
        if a is Action.DROP_SPARE:
            if d.target not in reg.spares:  # a recovery decided earlier this round took it
                return [Kill(d.target, d.reason)]
            reg.spares.remove(d.target)
            return [
                self._persist(),
                Kill(d.target, d.reason),
                Note("spare_lost", {"actor": d.target, "reason": d.reason}),
            ]
        if a is Action.KILL_WORKER:
            return [Kill(reg.workers[d.target].actor, d.reason)]
        if a is Action.CREATE_WORKER:
            w = reg.workers[d.target]
            old = w.actor
            if old is not None:
                w.restarts += 1
                reg.events.append(
                    RecoveryEvent(
                        "worker",
                        d.target,
                        "restart",
                        detected_at=now,
                        actor=old,
                        **(
                            self._cause(old)
                            if self.view is None or self.view.dead(old, self.spec)
                            # pre-aggregation: re-created because another rank of its process was
                            else {"cause": "process"}
                        ),
                    )
                )
            w.actor, w.phase, w.start_step = (
                self._name(f"worker{d.target}-"),
                WorkerPhase.CREATING,
                None,
            )
            if self.spec.process_ranks > 1:  # the first rank of a process names it
                first = self.spec.process_of(d.target)[0]
                w.host = w.actor if first == d.target else reg.workers[first].host
            kills = [Kill(old, d.reason)] if old else []
            return (
                [self._persist()]
                + kills
                + [Create(w.actor, "worker", rank=d.target, routes=reg.routes(k), host=w.host)]
            )
        if a is Action.START_WORKER:
            rank, w = d.target, reg.workers[d.target]
            descriptions = [self.view.describe(reg.slots[i].actor) for i in range(k)]
            if not all(
                d is not None and d.shard == i and d.epoch == reg.slots[i].epoch
                for i, d in enumerate(descriptions)
            ):
                # A decision carried out earlier this round moved a shard: decide again next round.
                return []
            step = self._start_step(descriptions, rank)
            w.phase, w.start_step, reg.training = WorkerPhase.STARTING, step, True
            return [self._persist()] + self._op(
                "start", rank, w.actor, Start(step, self.spec.total_steps, reg.routes(k)), w.actor
            )
        if a in (Action.MARK_RUNNING, Action.MARK_DONE):
            w = reg.workers[d.target]
            w.phase = WorkerPhase.RUNNING if a is Action.MARK_RUNNING else WorkerPhase.DONE
            # a restarted rank trains again (or, started at its last step, is done at once): its
            # recovery is over
            recorded = False
            for e in reversed(reg.events):
                if e.role == "worker" and e.index == d.target and e.serving_at is None:
                    e.serving_at, e.step = now, w.start_step
                    recorded = True
                    break
            if reg.phase is RunPhase.STARTING and all(
                x.phase in (WorkerPhase.RUNNING, WorkerPhase.DONE) for x in reg.workers
            ):
                reg.phase = RunPhase.RUNNING
            # the phases are derived again from the next probe if lost, but not when a recovery
            # ended: a restarted supervisor would date it at its own first probe, its downtime
            # counted as the worker's
            return [self._persist()] if recorded else []
        raise AssertionError(a)

    def _load(self, j: int) -> list:
        reg, slot = self.reg, self.reg.slots[j]
        step = slot.load_step if slot.load_step is not None else self.spec.resume_step
        reg.reserved[j] += 1
        slot.phase, slot.epoch = SlotPhase.LOADING, reg.reserved[j]
        if step is not None:
            msg = Load(
                self.ranges[j],
                slot.epoch,
                None,
                step,
                None,
                checkpoint_step=step,
                resume=slot.load_step is None,
            )
        else:
            msg = Load(self.ranges[j], slot.epoch, self.params_of(j), self.spec.start_step)
        return [self._persist()] + self._op("load", j, slot.actor, msg, slot.actor, slot.epoch)

    def _take_spare(self, avoid_nodes: set) -> str | None:
        view = self.view
        alive = [
            n
            for n in self.reg.spares
            if view is not None and view.alive(n) and not view.dead(n, self.spec)
        ]
        if not alive:
            return None
        alive.sort(
            key=lambda n: (
                view.describe(n) is not None
                and getattr(view.describe(n), "node", "") in avoid_nodes
            )
        )
        self.reg.spares.remove(alive[0])
        return alive[0]

    def _spare_node(self) -> str | None:
        """Where a new spare goes: a node with the fewest of the run's servers (slots' actors and
        spares) as last described, in turn among equals. A spare beside a shard's replica holder
        would make one node's loss take the rebuilt primary with its replica."""
        reg, nodes = self.reg, list(self.spec.node_ids)
        if not nodes:
            return None
        servers = {n: 0 for n in nodes}
        for name in [s.actor for s in reg.slots] + reg.spares:
            d = self.view.describe(name) if self.view is not None else None
            if d is not None and d.node in servers:
                servers[d.node] += 1
        first = (len(reg.spares) + reg.server_replacements) % len(nodes)
        return min(nodes[first:] + nodes[:first], key=servers.__getitem__)

    def _peer_nodes(self, j: int) -> set:
        k, view = self.spec.num_shards, self.view
        peers = {replica_slot(s, k) for s in (primary_shard(j, k),) if s is not None} | set(
            replica_shards(j, k)
        )
        peers |= {replica_slot(s, k) for s in replica_shards(j, k)}
        return {
            getattr(view.describe(self.reg.slots[p].actor), "node", None) for p in peers if p != j
        } - {None, ""}

    def _recover(self, j: int, reason: str, now: float) -> list:
        """Put a spare in slot ``j`` and rebuild its shard there from the replica; after a
        supervisor restart (or the spare's death) issue the recovery again, always with a new
        epoch."""
        reg, k, view = self.reg, self.spec.num_shards, self.view
        slot = reg.slots[j]
        effects = []
        if slot.reinstating:
            if not view.alive(slot.actor):
                return []  # silent still: asked once it answers (decide fails the run if it died)
            abandoned = slot.epoch  # a fence up to the abandoned recovery's epoch may be undone
            reg.reserved[j] += 1
            slot.epoch = reg.reserved[j]
            calls = self._op(
                "recover",
                j,
                slot.actor,
                Reinstate(j, slot.epoch, abandoned),
                slot.actor,
                slot.epoch,
                None,
            )
            return [self._persist(), *calls]
        if slot.phase is SlotPhase.SERVING or view.dead(slot.actor, self.spec):
            spare = self._take_spare(self._peer_nodes(j))
            if spare is None:  # CREATE_SPARE makes one; the next round uses it
                if slot.phase is SlotPhase.SERVING:
                    self._spare_wanted_since.setdefault(j, now)
                return []
            if slot.phase is SlotPhase.SERVING:
                reg.server_replacements += 1
                reg.recoveries_started += 1
                for s in replica_shards(
                    j, k
                ):  # the new actor lacks what the old one held (I4: re-replicated later)
                    reg.replicated[s] = False
                reg.events.append(
                    RecoveryEvent(
                        "server",
                        j,
                        "replica",
                        detected_at=self._spare_wanted_since.pop(j, now),
                        actor=slot.actor,
                        **self._cause(slot.actor),
                    )
                )
                slot.replacing, slot.replacing_epoch = slot.actor, slot.epoch
                slot.replacing_confirmed = view.condition(slot.actor, self.spec) == "dead"
            slot.actor, slot.phase = spare, SlotPhase.RECOVERING
        elif not view.alive(slot.actor):
            return []  # the spare is busy (replaying) or slow: ask again next round
        reg.reserved[j] += 1  # never reused: a holder refuses an epoch it has seen
        slot.epoch = reg.reserved[j]
        holder = fallback_holder(reg, view, j, k) or reg.slots[replica_slot(j, k)].actor
        name_replica_target(reg, j, k, holder)  # the rebuilt primary logs to it
        calls = self._op(
            "recover",
            j,
            slot.actor,
            RecoverPrimary(self.ranges[j], slot.epoch, holder),
            slot.actor,
            slot.epoch,
            holder,
        )
        return (
            [self._persist()]
            + effects
            + calls
            + [
                Note(
                    "recovery_started",
                    {
                        "n": reg.recoveries_started,
                        "shard": j,
                        "spare": slot.actor,
                        "epoch": slot.epoch,
                    },
                )
            ]
        )

    def _abandon(self, j: int, reason: str, now: float) -> list:
        """The recovery of slot ``j`` cannot finish (its holder was lost) but the primary it
        replaces was only suspected: that primary serves on, at a newer epoch (``Reinstate``), and
        gets a new holder once the holder's slot is replaced."""
        slot = self.reg.slots[j]
        spare = slot.actor
        slot.actor, slot.replacing, slot.replacing_confirmed = slot.replacing, None, False
        slot.reinstating = True
        self.reg.replicated[j] = False
        for e in reversed(self.reg.events):
            if e.role == "server" and e.index == j and e.serving_at is None:
                self.reg.events.remove(e)
                break
        return (self._recover(j, reason, now) or [self._persist()]) + [
            Kill(spare, f"recovery of shard {j} abandoned: {reason}"),
            Note("recovery_abandoned", {"shard": j, "reason": reason}),
            *self._soon(),
        ]

    def _replace_holder(self, j: int, reason: str, now: float) -> list:
        reg = self.reg
        spare = self._take_spare(set())
        if spare is None:
            self._spare_wanted_since.setdefault(j, now)
            return []
        reg.server_replacements += 1
        reg.recoveries_started += 1
        old = reg.slots[j].actor
        reg.slots[j].actor = spare
        for s in replica_shards(j, self.spec.num_shards):
            reg.replicated[s] = False
        reg.events.append(
            RecoveryEvent(
                "replica",
                j,
                "replica",
                detected_at=self._spare_wanted_since.pop(j, now),
                serving_at=now,
                actor=old,
                **self._cause(old),
            )
        )
        retired = self._retire(j, old, reason)  # before the registry is written: it records it
        return [
            self._persist(),
            *retired,
            Note("recovery_started", {"n": reg.recoveries_started, "shard": None, "spare": spare}),
        ]

    def _retire(self, j: int, old: Address, reason: str) -> list:
        """Slot ``j``'s actor ``old`` was replaced: killed now if it is gone or is not the last
        holder some replica the slot holds was sent to (then it has no copy anyone needs); else
        kept (``retiring``) until each such replica is on the successor."""
        slot, reg = self.reg.slots[j], self.reg
        needed = [
            s
            for s in replica_shards(j, self.spec.num_shards)
            if not reg.replicated[s] and last_replica_target(reg, s) == old
        ]
        if not needed or self.view is None or self.view.gone_for_good(old):
            return [Kill(old, reason)]
        slot.retiring.append(old)
        return [Note("retiring", {"slot": j, "actor": old, "until": needed})]

    def _retired(self) -> list:
        """Kill each retiring server whose replicas are all on its slot's actor again."""
        out = []
        for j, slot in enumerate(self.reg.slots):
            if slot.retiring and all(
                self.reg.replicated[s] for s in replica_shards(j, self.spec.num_shards)
            ):
                out += [
                    Kill(name, f"its replicas are on {slot.actor} again") for name in slot.retiring
                ]
                slot.retiring = []
        return out

    def _rollback(self, j: int, reason: str, now: float) -> list:
        """The file baseline: kill every worker, put every shard back to the newest common
        checkpoint."""
        reg, k = self.reg, self.spec.num_shards
        known = [s for s in reg.checkpoint_steps]
        if any(s is None for s in known):
            reg.phase, reg.failure = (
                RunPhase.FAILED,
                f"{reason}, and not every shard has a checkpoint file yet",
            )
            return [self._persist()]
        step = min(known)
        spare = self._take_spare(set())
        if spare is None:
            return []
        reg.server_replacements += 1
        reg.recoveries_started += 1
        effects = [Kill(reg.slots[j].actor, reason)]
        cause = self._cause(reg.slots[j].actor)
        reg.slots[j].actor = spare
        reached = max(
            (getattr(self.view.status(w.actor), "step", step) for w in reg.workers), default=step
        )
        reg.events.append(
            RecoveryEvent(
                "server",
                j,
                "checkpoint",
                detected_at=now,
                actor=None,
                step=step,
                steps_lost=max(0, reached - step),
                **cause,
            )
        )
        for i in range(k):
            reg.slots[i].phase, reg.slots[i].load_step = SlotPhase.LOADING, step
        for rank, w in enumerate(reg.workers):
            if w.actor is not None and w.phase is not WorkerPhase.DONE:
                effects.append(Kill(w.actor, "the run rolls back to a checkpoint"))
            reg.events.append(
                RecoveryEvent(
                    "worker", rank, "restart", detected_at=now, actor=w.actor, cause="rollback"
                )
            )
            w.actor, w.phase, w.start_step = None, WorkerPhase.NONE, None
        reg.phase = RunPhase.STARTING
        return [self._persist()] + effects + [e for i in range(k) for e in self._load(i)]

    # --- operations finishing
    # --------------------------------------------------------------------------

    def _rebuilt(self, j: int, actor: Address, epoch: int, value: Recovered, now: float) -> list:
        """Slot ``j``'s spare ``actor`` serves its shard, rebuilt at ``epoch``: the replaced
        primary is deposed and retired, waiting route requests answered."""
        reg = self.reg
        slot = reg.slots[j]
        slot.phase, slot.reinstating = SlotPhase.SERVING, False
        old, slot.replacing, slot.replacing_confirmed = slot.replacing, None, False
        for e in reversed(reg.events):
            if e.role == "server" and e.index == j and e.serving_at is None:
                e.serving_at, e.replayed, e.bytes_moved, e.epoch, e.step = (
                    now,
                    value.replayed,
                    value.bytes_moved,
                    epoch,
                    value.seq,
                )
                e.takeover_clocks = [[int(r), int(c)] for r, c in value.clocks]
                break
        # the predecessor may only have been suspected: make sure it stops serving, and retire it
        # before the registry is written (the registry records it)
        retired = self._retire(j, old, f"shard {j} moved to {actor}") if old else []
        effects = [
            self._persist(),
            Note("recovered", {"shard": j, "epoch": epoch, "actor": actor}),
        ]
        if old is not None:
            effects += self._op("depose", j, old, Depose(j, epoch)) + retired
        return effects + self._answer_routes(now) + self._soon()

    def _op_done(self, op: tuple, value, now: float) -> list:
        kind, target = op[0], op[1]
        reg = self.reg
        if isinstance(value, StartFailed):  # the callee cannot serve this run: the probes say so
            return self._soon()  # and the decisions fail the run with its reason
        if kind == "load":
            actor, epoch = op[2], op[3]
            slot = reg.slots[target]
            if slot.actor != actor or slot.epoch != epoch or isinstance(value, (Failure, Refused)):
                return self._soon()
            slot.phase, slot.load_step = SlotPhase.SERVING, None
            for e in reversed(reg.events):
                if e.source == "checkpoint" and e.serving_at is None:
                    e.serving_at = now
            return [self._persist(), *self._soon()]
        if kind == "recover":
            actor, epoch, holder = op[2], op[3], op[4]
            slot = reg.slots[target]
            if slot.actor != actor or slot.epoch != epoch:
                return []
            if isinstance(value, Recovered):
                return self._rebuilt(target, actor, epoch, value, now)
            if slot.reinstating and isinstance(value, Refused):
                return self._carry_out(
                    Decision(Action.FAIL, target, lost_while_reinstating(target, slot)), now
                )
            lost = isinstance(value, Refused) and value.kind in (
                RefusalKind.NO_REPLICA,
                RefusalKind.HOLDER_LOST,
            )
            if lost and self._may_serve_on(slot):
                # the primary replaced was only suspected (silent, perhaps still): it has every
                # acknowledged update of its shard, the only copy left
                return self._abandon(target, value.reason, now)
            if lost and self._unheard(slot):
                return self._soon()  # whether it may serve on is unknown yet: the rounds decide
            earlier = (
                self._earlier_holder(target, holder)
                if lost and value.kind is RefusalKind.NO_REPLICA
                else None
            )
            if earlier is not None:  # the last holder named never got it: the one before has it
                forget_replica_target(reg, target, holder)
                return [
                    self._persist(),
                    Note(
                        "recovery_source",
                        {"shard": target, "holder": earlier, "refused_by": holder},
                    ),
                    *self._soon(),
                ]
            if lost:
                reason = (
                    f"shard {target} is lost: its primary died and its replica holder "
                    f"cannot give the replica ({value.reason})"
                )
                reg.phase, reg.failure = RunPhase.FAILED, reason
                return [
                    self._persist(),
                    Note("run_failed", {"reason": reason}),
                ] + self._refuse_routes(reason)
            return self._soon()  # the spare died or refused: the next round issues it again
        if kind == "replicate":
            holder, primary, epoch = op[2], op[3], op[4]
            current = (
                reg.slots[replica_slot(target, self.spec.num_shards)].actor == holder
                and reg.slots[target].actor == primary
                and (reg.slots[target].epoch == epoch)
            )
            if isinstance(value, int) and not isinstance(value, bool) and current:
                reg.replicated[target] = True
                holder_slot = replica_slot(target, self.spec.num_shards)
                for e in reversed(reg.events):
                    if (
                        e.role in ("server", "replica")
                        and e.index == holder_slot
                        and e.source == "replica"
                    ):
                        e.replicated_at = now
                        if target not in e.rereplicated:
                            e.rereplicated.append(target)
                        break
                kills = self._retired()  # before the registry is written: it records them gone
                return [
                    self._persist(),
                    Note("rereplicated", {"shard": target, "holder": holder}),
                    *kills,
                ]
            return []
        if kind in ("start", "depose"):
            return self._soon()
        raise AssertionError(kind)

    def _may_serve_on(self, slot: SlotRecord) -> bool:
        """Whether the primary a recovery replaces was only suspected and is neither found dead nor
        deposed (a deposed one no longer serves): the run must not fail while it may serve on."""
        return (
            self.view is not None
            and slot.replacing in self.view.answered
            and replaced_may_serve_on(self.view, self.spec, slot)
        )

    def _unheard(self, slot: SlotRecord) -> bool:
        """The primary a recovery replaces was only suspected and has not answered this supervisor
        (it restarted since): not known dead, nor known to serve on."""
        return (
            slot.replacing is not None
            and not slot.replacing_confirmed
            and self.view is not None
            and slot.replacing not in self.view.answered
            and not self.view.gone_for_good(slot.replacing)
        )

    def _earlier_holder(self, shard: int, refused_by: Address) -> Address | None:
        return earlier_holder(self.reg, self.view, shard, self.spec.num_shards, refused_by)

    # --- routes
    # ----------------------------------------------------------------------------------------

    def _answer_routes(self, now: float) -> list:
        """Answer route requests: at once for a check; for a failed call, once a newer epoch serves
        the shard, or once a probe round that started after the request found the same primary
        answering (the failure was transient: the worker sends again)."""
        if not self._parked:
            return []
        reg, view = self.reg, self.view
        effects, keep = [], []
        for rid, m, rounds in self._parked:
            slot = reg.slots[m.shard]
            serving = slot.phase is SlotPhase.SERVING
            desc = view.describe(slot.actor) if view is not None else None
            healthy = (
                serving and desc is not None and not desc.deposed and self._view_round > rounds
            )
            if not m.failed or (serving and slot.epoch > m.epoch) or healthy:
                effects.append(Reply(rid, reg.route(m.shard)))
            else:
                keep.append((rid, m, rounds))
        self._parked = keep
        return effects

    def _refuse_routes(self, reason: str) -> list:
        effects = [Reply(rid, Refused(RefusalKind.FAILED, reason)) for rid, _, _ in self._parked]
        self._parked = []
        return effects

    # --- what the driver reads
    # --------------------------------------------------------------------------

    def epochs(self) -> tuple[int, ...]:
        return tuple(self.reg.slots[i].epoch for i in range(self.spec.num_shards))
