"""Supervisor decisions: pure functions of a frozen status snapshot, and the state machine around them.

The supervisor actor (``actors/supervisor.py``) probes the cluster into a
``ClusterStatus``, asks ``decide()`` what to do, and carries the decisions out
through an injected ``ClusterOps``. Everything here is tested without Ray.

Topology: there are ``num_slots`` server actors. Slot ``i < num_shards``
holds the primary of shard ``i``; the replica of shard ``i`` lives in slot
``replica_slot(i)`` -- the next peer in the ring, or a dedicated replica slot
when there is a single shard. Replacing a dead slot rebuilds its primary from
the replica its peer holds and re-replicates the shard it held for its other
peer (the new actor takes the dead one's place in the ring).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol


def num_slots(num_shards: int) -> int:
    return num_shards if num_shards > 1 else 2


def replica_slot(shard: int, num_shards: int) -> int:
    """Slot holding shard ``shard``'s replica: the next peer, or slot 1 (a dedicated replica actor) for one shard."""
    return (shard + 1) % num_shards if num_shards > 1 else 1


def primary_shard(slot: int, num_shards: int) -> int | None:
    return slot if slot < num_shards else None


def replica_shards(slot: int, num_shards: int) -> tuple[int, ...]:
    return tuple(s for s in range(num_shards) if replica_slot(s, num_shards) == slot)


def server_nodes(head: str, cpus: dict[str, float], ordered: list[str] = ()) -> list[str]:
    """Nodes server slots are spread over: ``head`` first, then ``ordered`` (simulated nodes, in the order ``node:N``
    kills count them), then the rest by id; nodes that offer no CPUs to tasks (a ``ray up`` head with ``CPU: 0``) are
    left out while another node offers some. Empty on a single node (no placement needed)."""
    if len(cpus) <= 1:
        return []
    order = [head] + [n for n in ordered if n != head] + sorted(n for n in cpus if n != head and n not in ordered)
    with_cpus = [n for n in order if cpus.get(n, 0) > 0]
    return with_cpus or order


def slot_nodes(num_slots_: int, nodes: list[str]) -> list[str]:
    """Spread slots round-robin over nodes, so ring neighbours sit on different nodes whenever 2+ nodes exist.

    With an odd number of slots on an even number of nodes the last and first
    slot would share a node; the next node is skipped for the last slot then.
    """
    if not nodes:
        return []
    out = [nodes[j % len(nodes)] for j in range(num_slots_)]
    if num_slots_ > 1 and len(nodes) > 1 and out[-1] == out[0]:
        for candidate in nodes:
            if candidate not in (out[0], out[-2]):
                out[-1] = candidate
                break
    return out


class SupervisorState(enum.Enum):
    """STARTING: actors are being created and loaded. RUNNING: every actor answers and every shard has a replica.
    RECOVERING: replacing dead servers or restarting workers. DONE: every worker finished. FAILED: a loss
    that cannot be recovered (a shard lost with its replica, restart budget spent, an error in user code)."""

    STARTING = "starting"
    RUNNING = "running"
    RECOVERING = "recovering"
    DONE = "done"
    FAILED = "failed"


class Action(enum.Enum):
    REPLACE_SERVER = "replace_server"
    """Move the dead slot's shard to a spare (from its replica), re-replicate what it held."""
    REREPLICATE = "rereplicate"
    """A shard's primary and holder are alive but the holder lacks its replica: send a fresh snapshot (I4)."""
    RESTART_WORKER = "restart_worker"
    ADD_SPARE = "add_spare"
    FINISH = "finish"
    RAISE = "raise"


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    target: int | None
    reason: str


@dataclass(frozen=True, slots=True)
class WorkerView:
    rank: int
    alive: bool
    done: bool = False
    error: str | None = None
    restarts: int = 0


@dataclass(frozen=True, slots=True)
class ClusterStatus:
    num_shards: int
    slots_alive: tuple[bool, ...]
    workers: tuple[WorkerView, ...]
    spares: int
    server_replacements: int = 0
    unreplicated: tuple[int, ...] = ()
    """Shards whose live holder lacks their replica (e.g. a recovery cut short by a supervisor crash)."""


@dataclass(frozen=True, slots=True)
class Limits:
    target_spares: int = 1
    max_worker_restarts: int = 3
    """Restarts allowed per rank."""
    max_server_replacements: int = 100
    servers_recoverable: bool = True
    """False with recovery=none: nothing holds a copy of a server's shard."""


def decide(status: ClusterStatus, limits: Limits) -> list[Decision]:
    """What to do now. A RAISE comes alone; otherwise replacements, then restarts, then spares."""
    k = status.num_shards
    dead_slots = [j for j, alive in enumerate(status.slots_alive) if not alive]
    if dead_slots and not limits.servers_recoverable:
        return [Decision(Action.RAISE, dead_slots[0], f"server slot {dead_slots[0]} died and recovery=none keeps no copy of it; run with --recovery replica")]
    for j in dead_slots:
        for shard in ([primary_shard(j, k)] if primary_shard(j, k) is not None else []):
            holder = replica_slot(shard, k)
            if not status.slots_alive[holder]:
                return [Decision(Action.RAISE, shard, f"shard {shard} is lost: its primary (slot {j}) and its replica holder (slot {holder}) are both dead")]
    for w in status.workers:
        if w.error:
            return [Decision(Action.RAISE, w.rank, f"worker {w.rank} failed: {w.error}")]
        if not w.alive and not w.done and w.restarts >= limits.max_worker_restarts:
            return [Decision(Action.RAISE, w.rank, f"worker {w.rank} died {w.restarts + 1} times; the limit is recovery.max_worker_restarts={limits.max_worker_restarts}")]
    if dead_slots and status.server_replacements + len(dead_slots) > limits.max_server_replacements:
        return [Decision(Action.RAISE, dead_slots[0], f"server replacements would exceed recovery.max_server_replacements={limits.max_server_replacements}")]
    out = [Decision(Action.REPLACE_SERVER, j, f"server slot {j} is dead") for j in dead_slots]
    out += [Decision(Action.REREPLICATE, s, f"shard {s} has no replica") for s in status.unreplicated]
    out += [Decision(Action.RESTART_WORKER, w.rank, f"worker {w.rank} is dead at restart {w.restarts}") for w in status.workers if not w.alive and not w.done]
    if out:
        return out
    if status.workers and all(w.done for w in status.workers):
        return [Decision(Action.FINISH, None, "every worker finished")]
    if status.spares < limits.target_spares:
        return [Decision(Action.ADD_SPARE, None, f"{status.spares} of {limits.target_spares} warm spares")]
    return []


class ClusterOps(Protocol):
    """What the state machine needs from the cluster (the Ray actor implements it; tests fake it)."""

    def probe(self) -> ClusterStatus: ...

    def replace_server(self, slot: int, now: float) -> dict | None: ...

    def rereplicate(self, shard: int) -> None: ...

    def restart_worker(self, rank: int, now: float) -> dict | None: ...

    def add_spare(self) -> None: ...


@dataclass
class SupervisorCore:
    """The supervisor's state machine: ``advance(now)`` runs one iteration and returns (previous, next)."""

    ops: ClusterOps
    limits: Limits
    state: SupervisorState = SupervisorState.STARTING
    events: list[dict] = field(default_factory=list)
    """Recovery events, in order (what the JSON summary reports)."""
    failure: str | None = None
    history: list[tuple[SupervisorState, SupervisorState, str]] = field(default_factory=list)

    def advance(self, now: float) -> tuple[SupervisorState, SupervisorState]:
        previous = self.state
        if previous in (SupervisorState.DONE, SupervisorState.FAILED):
            return previous, previous
        status = self.ops.probe()
        decisions = decide(status, self.limits)
        reason = "; ".join(d.reason for d in decisions) or "all healthy"
        nxt = SupervisorState.RUNNING
        for d in decisions:
            if d.action is Action.RAISE:
                self.failure = d.reason
                nxt = SupervisorState.FAILED
                break
            if d.action is Action.FINISH:
                nxt = SupervisorState.DONE
            elif d.action is Action.REPLACE_SERVER:
                self.state = SupervisorState.RECOVERING
                self._record(self.ops.replace_server(d.target, now))
            elif d.action is Action.REREPLICATE:
                self.ops.rereplicate(d.target)
            elif d.action is Action.RESTART_WORKER:
                self.state = SupervisorState.RECOVERING
                self._record(self.ops.restart_worker(d.target, now))
            elif d.action is Action.ADD_SPARE:
                self.ops.add_spare()
        self.state = nxt
        if decisions:
            self.history.append((previous, nxt, reason))
        return previous, nxt

    def _record(self, event: dict | None) -> None:
        """Keep an event once (an op may record it itself, or finish it later and return None)."""
        if event is not None and not any(e is event for e in self.events):
            self.events.append(event)


def snapshot_interval_for(snapshot_cost_s: float, replay_cost_s: float, failures_per_update: float, lo: int = 1, hi: int = 10_000) -> int:
    """The snapshot interval that minimises expected time lost per update (Young's rule for checkpoint intervals).

    Every ``N`` updates a snapshot costs ``snapshot_cost_s``; a failure, ``failures_per_update`` per update,
    replays on average ``N / 2`` logged commands at ``replay_cost_s`` each. Expected cost per update
    ``snapshot_cost_s / N + failures_per_update * replay_cost_s * N / 2`` is least at
    ``N* = sqrt(2 * snapshot_cost_s / (failures_per_update * replay_cost_s))``, clamped to ``[lo, hi]``.
    With folded logs a recovery replays nothing (``replay_cost_s == 0``): the longest interval, ``hi``.
    """
    import math

    if snapshot_cost_s < 0 or replay_cost_s < 0 or failures_per_update < 0:
        raise ValueError("costs and the failure rate must be >= 0")
    if replay_cost_s == 0 or failures_per_update == 0:
        return hi
    if snapshot_cost_s == 0:
        return lo
    return max(lo, min(hi, round(math.sqrt(2 * snapshot_cost_s / (failures_per_update * replay_cost_s)))))
