"""A run's protocol state machines in one process, on a seeded scheduler with every fault.

The processes are the real ``ServerProtocol``s, ``SupervisorProtocol`` and the
workers' ``ExchangeProtocol``s; only the transport and the clock are
simulated. Every message is an event with a random delay (so messages
reorder), and so is every timer, every gradient computation and every fault.
Faults (``FaultPlan``):

- **crash** of any process at a random time, or between two effects of one
  handler (a supervisor killed after persisting and before creating, a
  holder killed after logging and before answering);
- **node loss**: every process of a node at once; answers in flight from it
  are lost (``Failure.LOST``);
- **window crashes**, aimed at the moments a copy moves (a recovery or a
  re-replication begins, a server retires, a restarted supervisor issues a
  recovery again): the holder, the replaced primary, the spare, the
  supervisor or their whole node dies, sometimes with its answers on their
  way; a server dies right after carrying out a request that moves a copy
  (an export that raised its holder's fence, a rebuild, an install) and
  before its answer arrives, or its node is lost while that answer travels;
- **false suspicion**: a live server stops answering the supervisor's probes
  for longer than ``suspect_after_s``, so the supervisor replaces it while it
  keeps serving the workers that still route to it;
- **transient errors**: a worker's call fails with ``UNAVAILABLE`` although
  the server received it (and may still apply it);
- **supervisor restarts** from its persisted registry; calls to it wait for
  the restarted incarnation, as Ray retries them.

A run is a pure function of ``(SimConfig, seed)``: ``--replay SEED`` runs one
schedule again event for event.

The fault injector keeps each schedule inside what the design promises to
survive -- at every moment every shard keeps a live primary or a holder with
its whole replica -- so any violation the checker finds is a protocol bug,
not an impossible demand. It reads the registry and process states to choose
faults; the checker (``sim/checker.py``) never reads them to judge.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import itertools
import random
from dataclasses import dataclass, field

import numpy as np

from raytrain_ft.config import OptimConfig
from raytrain_ft.consistency import Rule, sum_in_rank_order
from raytrain_ft.params import ShardRange
from raytrain_ft.protocol.exchange import ExchangeProtocol, clip_factor_of, process_blocked
from raytrain_ft.protocol.messages import (
    Append,
    AppendAck,
    Call,
    Create,
    Depose,
    Describe,
    ExportReplica,
    Failure,
    Fold,
    InstallReplica,
    Kill,
    Note,
    Persist,
    PollStatus,
    Push,
    PushReply,
    RecoverPrimary,
    Reinstate,
    Reply,
    SaveCheckpoint,
    SetReplica,
    Start,
    Timer,
)
from raytrain_ft.protocol.server import ServerSpec
from raytrain_ft.protocol.supervisor import (
    RunPhase,
    SlotPhase,
    SupervisorProtocol,
    SupervisorSpec,
    any_started,
    holds_for_slot,
    replica_slot,
    replica_target_history,
)

SUPERVISOR = "supervisor"
COPY_MOVING = (ExportReplica, InstallReplica, RecoverPrimary, Reinstate, SetReplica, Depose)
"""Requests whose answers tell the supervisor (or a spare) that a copy moved or a primary changed:
the simulator sometimes crashes the server that carried one out before its answer arrives."""
WINDOW_NOTES = ("recovery_started", "rereplication_started", "retiring", "recovery_source")
"""Supervisor notes that open a window in which a shard's newest copy may sit on a server being
replaced: the simulator often crashes something soon after one (``World.inject_in_window``)."""
SLOW_SHARE = 0.5
"""The share of schedules whose steps take ``SLOW_COMPUTE_S`` instead of ``SimConfig.compute_s``."""
SLOW_COMPUTE_S = 0.05
"""Long enough that 3-6 steps outlast the supervisor's suspicion delay (0.1 s) several times: a
primary suspected while alive keeps serving while its recovery runs (fenced out, and put back if
that recovery is abandoned)."""
REGISTRY_KEY = "registry"
STARTUP_S = 0.08
"""About when a simulated run's workers start training (servers created, loaded and replicated
first)."""
MODEL_VALUES = 3
"""Values per shard that evolve like a model (the provenance slots follow them)."""
MOMENTUM = 0.1
"""SGD momentum of the simulated shards. A push applied once moves its provenance slot by 1 plus the
momentum's echo in later updates, at most ``G * 0.1 / 0.9`` <= 0.34 (G: the largest ratio of two
updates' learning rates, the group size in mixed mode); twice by >= 2; never by less than 1 --
exactly-once is decodable from the parameters."""


@dataclass(frozen=True, slots=True)
class SimConfig:
    mode: str = "sync"
    num_workers: int = 2
    num_shards: int = 2
    steps: int = 5
    snapshot_interval: int = 3
    fold: bool = True
    backup_workers: int = 0
    group_size: int = 2
    staleness: int = 1
    num_nodes: int = 3
    num_spares: int = 1
    compute_s: float = 0.01
    max_faults: int = 3
    unlogged: int = 0
    """Relaxed durability (async modes): updates a primary may acknowledge before they are logged;
    the checker then allows that many lost acknowledged updates per primary lost."""
    momentum_correction: str = "none"
    """Asynchronous modes: ``dana`` gives every update stream its own momentum buffer (more
    optimizer state for snapshots, logs and replay to carry exactly) and hands workers look-ahead
    parameters."""
    overflow: bool = False
    """fp16 loss scaling: some pushes (a pure function of rank and step) overflowed; their
    updates must be skipped by every shard."""
    clip: float | None = None
    """Sync and mixed: global gradient clipping to this norm (two phases per step: probes answered
    with each shard's squared norm, then the factor). Large values exercise the phases with a
    factor of exactly 1, small ones scale every update."""
    pipelined: bool = False
    """Sync without backup workers or clipping: ``--durability pipelined`` (a push but the
    last may be answered before its update is logged; the worker keeps it until its next answer
    and sends it again first to a newer primary)."""
    preaggregate: int = 1
    """Sync without backup workers or clipping, and mixed (equal to ``group_size``) without
    clipping: ranks per process (``ranks_per_process``) that send one push of their summed
    gradients for all of them; the process's first rank pushes, the others follow it, and they
    die together (1: a push per rank)."""

    @property
    def shard_size(self) -> int:
        return MODEL_VALUES + self.num_workers * self.steps

    def rule(self) -> Rule:
        return Rule(
            self.mode,
            self.num_workers,
            self.backup_workers,
            self.group_size,
            self.staleness,
            momentum_correction=self.momentum_correction,
            sum_group=self.preaggregate,
        )

    def overflows(self, rank: int, step: int) -> bool:
        """fp16: whether push ``(rank, step)`` overflowed (a pure function: a restarted rank's
        resend overflows again)."""
        return self.overflow and (rank + 2 * step) % 5 == 1

    def ranges(self) -> list[ShardRange]:
        n = self.shard_size
        total = n * self.num_shards
        return [ShardRange(i, i * n, (i + 1) * n, total) for i in range(self.num_shards)]

    def slot(self, rank: int, step: int) -> int:
        """Position of the provenance value of push ``(rank, step)`` inside every shard."""
        return MODEL_VALUES + rank * self.steps + step

    def push_value(self) -> float:
        """Size of a push's provenance value so that one application moves its slot by exactly lr *
        1."""
        rule = self.rule()
        needed = rule.needed(0)
        return needed / rule.lr_scale(needed, 0)

    def initial(self, shard: int) -> np.ndarray:
        rng = np.random.default_rng(1000 + shard)
        x = np.zeros(self.shard_size, dtype=np.float32)
        x[:MODEL_VALUES] = rng.standard_normal(MODEL_VALUES).astype(np.float32)
        x[MODEL_VALUES:] = 100.0  # provenance slots: 100 - (displacement)
        return x


def random_config(rng: random.Random, mode: str) -> SimConfig:
    w = rng.choice((2, 3, 3, 4))
    backups = rng.choice((0, 0, 1)) if mode == "sync" and w > 2 else 0
    cfg = SimConfig(
        mode=mode,
        num_workers=w,
        num_shards=rng.choice((1, 2, 3)),
        steps=rng.randint(3, 6),
        snapshot_interval=rng.choice((1, 2, 3, 50)),
        fold=rng.random() < 0.7,
        backup_workers=backups,
        group_size=rng.choice((2, 3)),
        staleness=rng.choice((0, 1, 2)),
        num_nodes=rng.choice((1, 3, 4)),
        num_spares=rng.choice((0, 1, 1, 2)),
        max_faults=rng.choice((1, 2, 3, 4)),
        # drawn last: every other field of a schedule is what it was before relaxed durability
        unlogged=rng.choice((0, 0, 1, 2)) if mode == "async" else 0,
        momentum_correction=rng.choice(("none", "dana")) if mode != "sync" else "none",
        clip=rng.choice((None, None, 1e9, 0.5))
        if mode in ("sync", "mixed") and not backups
        else None,
        overflow=rng.random() < 0.3,
    )
    # drawn after every other field (the schedules drawn before it keep their configurations)
    pipelined = rng.random() < 0.5
    if mode == "sync" and not backups and cfg.clip is None and pipelined:
        cfg = dataclasses.replace(cfg, pipelined=True)
    # drawn last too: ranks sharing a process pre-aggregate (in mixed mode its groups are the
    # processes)
    preaggregate = rng.choice((1, 2, 2, 3))
    if mode == "sync" and not backups and cfg.clip is None:
        cfg = dataclasses.replace(cfg, preaggregate=preaggregate)
    if mode == "mixed" and cfg.clip is None and preaggregate > 1:
        cfg = dataclasses.replace(cfg, preaggregate=cfg.group_size)
    # drawn last too: slow steps, so that a falsely suspected primary still takes pushes when the
    # supervisor acts on the suspicion (after SUSPECT_AFTER_S) and its recovery fences it
    if rng.random() < SLOW_SHARE:
        cfg = dataclasses.replace(cfg, compute_s=SLOW_COMPUTE_S)
    return cfg


# --- processes
# ------------------------------------------------------------------------------------------


@dataclass(slots=True)
class SimHost:
    """Pre-aggregation: one process's ranks (``GroupSum``'s shared state)."""

    ranks: dict = field(default_factory=dict)
    """Rank -> its worker in this process."""
    handed: dict = field(default_factory=dict)
    """Rank -> the step it handed in."""
    done: int = -1
    """The last step the first rank pushed and installed."""
    left: set = field(default_factory=set)
    error: str | None = None


@dataclass(slots=True)
class WorkerStatus:
    """What a simulated worker answers ``PollStatus`` with (the fields the supervisor reads)."""

    started: bool
    done: bool
    error: str | None
    step: int


class SimWorker:
    """A worker rank: pull, compute (a deterministic function of its parameters, rank and step),
    push to every shard, install the answers; the same step rules as the real worker
    (``actors/worker.py``)."""

    def __init__(self, world: World, name: str, rank: int, routes, host: str | None = None):
        self.world, self.name, self.rank = world, name, rank
        cfg = world.cfg
        self.exchange = ExchangeProtocol(rank, list(routes), SUPERVISOR, watchdog_s=0.05)
        self.params = [None] * cfg.num_shards
        self.versions = [0] * cfg.num_shards
        self.started = self.done = False
        self.step = self.end = 0
        self.phase = "idle"
        self.error: str | None = None
        self.seen_acks = 0
        self.host = world.hosts.setdefault(host, SimHost()) if host is not None else None
        """Pre-aggregation: the process this rank shares with the others of its ``members``
        (``actors/worker.py``'s ``GroupSum``): each hands in its step, the first pushes their
        summed gradients for all of them once every one handed in that step, and the others take
        its parameters."""
        members = cfg.rule().sum_members(rank) if host is not None else ()
        self.members = members if len(members) > 1 else ()

    def status(self) -> WorkerStatus:
        return WorkerStatus(self.started, self.done, self.error or self.exchange.error, self.step)

    def on_request(self, rid: int, msg) -> list:
        if isinstance(msg, PollStatus):
            return [Reply(rid, self.status())]
        if isinstance(msg, Start):
            if self.started:
                return [Reply(rid, False)]
            self.started, self.step, self.end = True, msg.step, msg.end_step
            self.exchange.set_routes(msg.routes)
            exact = self.world.cfg.rule().exact_resume
            effects = [Reply(rid, True)]
            self.phase = "pull"
            for i in range(self.world.cfg.num_shards):
                effects += self.exchange.pull(i, self.step if exact else None, self.world.now)
            return effects
        return []

    def on_answer(self, cid: int, value, failure: bool) -> list:
        ex = self.exchange
        effects = (
            ex.on_failure(cid, value, self.world.now)
            if failure
            else ex.on_reply(cid, value, self.world.now)
        )
        for acked in ex.ledger[self.seen_acks :]:
            self.world.ledger.append(acked)  # the checker's record survives the worker
        self.seen_acks = len(ex.ledger)
        if ex.error:
            self.error = ex.error
            return effects
        if not any(ex.pending(i) for i in range(self.world.cfg.num_shards)):
            if self.phase in ("pull", "push"):
                effects += self._installed()
            elif self.phase == "probe":
                effects += self._probed()
        return effects

    def _probed(self) -> list:
        """Every shard answered the probe: compute the clip factor (or take the one a shard that
        already applied the step had), record it for the checker, send the second phase."""
        cfg = self.world.cfg
        replies = [self.exchange.take(i) for i in range(cfg.num_shards)]
        factor = clip_factor_of(replies, cfg.clip)
        self.world.clip_factors.setdefault(cfg.rule().key(self.rank, self.step), set()).add(factor)
        self.phase = "push"
        effects = []
        for i in range(cfg.num_shards):
            effects += self.exchange.finish(i, factor, True, self.world.now)
        return effects

    def on_tick(self) -> list:
        if self.done:
            return []
        checks = self.exchange.on_tick(self.world.now) if self.started else []
        return checks + [Timer("tick", self.exchange.watchdog_s)]

    def _installed(self) -> list:
        for i in range(self.world.cfg.num_shards):
            reply = self.exchange.take(i)
            if reply is not None and reply.params is not None:
                self.params[i] = np.array(reply.params, dtype=np.float32, copy=True)
                self.versions[i] = reply.seq
        if self.phase == "push":
            self.step += 1
            if (
                self.world.cfg.backup_workers
            ):  # the shards closed steps without this rank: go on at their step
                self.step = max(self.step, min(min(self.versions), self.end))
            if self.members:  # the process's pushed step is in: the others take its parameters
                self.host.done = self.step - 1
                self.world.poke_host(self.host, "group")
        return self._next()

    def _next(self) -> list:
        if self.step >= self.end:
            self.done, self.phase = True, "done"
            if self.host is not None:
                self.host.left.add(self.rank)
                self.world.poke_host(self.host, "group")
            return []
        self.phase = "compute"
        return [Timer("computed", self.world.cfg.compute_s * self.world.rng.uniform(0.5, 1.5))]

    def _grouped(self) -> list:
        """Pre-aggregation: the first rank pushes once every rank handed in its step; the others
        take its parameters once it installed the answers (``GroupSum``). Ranks that can never
        push as one fail, as the real ones do."""
        h, lead = self.host, self.members[0]
        if self.rank != lead:
            first = h.ranks.get(lead)
            if h.error or (first is not None and first.error):
                self.error = f"pre-aggregation stopped: {h.error or first.error}"
                return []
            if h.done < self.step or first is None:
                return []
            self.params = [p.copy() for p in first.params]
            self.versions = list(first.versions)
            self.step += 1
            return self._next()
        if any(h.handed.get(r) != self.step for r in self.members):
            why = process_blocked(self.members, h.handed, h.left, self.step, h.done)
            if why:
                h.error = self.error = why
                self.world.poke_host(h, "group")
            return []
        return self._push_step()

    def on_timer(self, token) -> list:
        if token == "tick":
            return self.on_tick()
        if token == "group" and self.phase == "group" and not self.error:
            return self._grouped()
        if token != "computed" or self.phase != "compute":
            return []
        if self.members:
            self.host.handed[self.rank] = self.step
            self.phase = "group"
            if self.rank != self.members[0]:
                self.world.poke_host(self.host, "group")
                return []
            return self._grouped()
        return self._push_step()

    def _push_step(self) -> list:
        cfg, effects = self.world.cfg, []
        self.phase = "push" if cfg.clip is None else "probe"
        ranks = self.members or (self.rank,)
        overflow = any(cfg.overflows(r, self.step) for r in ranks)
        for i in range(cfg.num_shards):
            effects += self.exchange.push(
                i,
                self.step,
                None
                if overflow
                else sum_in_rank_order([self.gradient(i, r) for r in ranks]),  # as the process
                self.versions[i],
                True,
                self.world.now,
                probe=cfg.clip is not None,
                overflow=overflow,
                early=cfg.pipelined and self.step < self.end - 1,
                ranks=self.members,
            )
        return effects

    def gradient(self, shard: int, rank: int) -> np.ndarray:
        """A deterministic function of the parameters the worker holds, the rank and the step."""
        cfg = self.world.cfg
        p = self.params[shard]
        g = np.zeros(cfg.shard_size, dtype=np.float32)
        model = p[:MODEL_VALUES]
        g[:MODEL_VALUES] = np.float32(0.1) * model * model - np.float32(
            0.01 * (rank + 1) * (self.step + 1)
        )
        g[cfg.slot(rank, self.step)] = np.float32(cfg.push_value())
        return g


@dataclass(slots=True)
class Proc:
    name: str
    kind: str
    """server | worker | supervisor."""
    node: str
    obj: object
    alive: bool = True
    incarnation: int = 0
    deaf_until: float = 0.0
    """False suspicion: calls from the supervisor are held up until then."""
    died_at: float | None = None


@dataclass(slots=True)
class Violation:
    kind: str
    detail: str


@dataclass(slots=True)
class RunOutcome:
    finished: bool
    failure: str | None
    faults: list[str]
    events: int
    sim_time_s: float
    trace: list[str]


class World:
    """One schedule: processes, the network, the clock, the KV, the faults."""

    def __init__(
        self,
        cfg: SimConfig,
        seed: int,
        faults: bool = True,
        bugs=None,
        trace: bool = False,
        max_time_s: float = 60.0,
        holdups: bool = False,
    ):
        from raytrain_ft.sim.bugs import protocol_classes

        self.cfg, self.seed = cfg, seed
        self.rng = random.Random(seed)
        self.now = 0.0
        self._queue: list = []
        self._seq = itertools.count()
        self.procs: dict[str, Proc] = {}
        self.kv: dict[str, str] = {}
        self.ledger: list = []
        self.hosts: dict[str, SimHost] = {}
        """Pre-aggregation: processes by the name the supervisor gave them."""
        self._requests: dict[tuple, object] = {}
        self.logged_through: dict[int, int] = {}
        """Per shard: commands below this seq were acknowledged by a holder, as the answers to
        Append and InstallReplica went out (the simulator's record, not the primaries')."""
        self.early_acks: list[str] = []
        """Answers to pushes that claimed their update logged before any holder had (I6)."""
        self.clip_factors: dict[tuple, set] = {}
        """Global clipping: update key -> the factors workers computed for it (the checker's record;
        more than one is a violation)."""
        self.faults_on = faults
        self.holdups = holdups
        """Faults include the supervisor held up (its process paused, or starved of CPU) from a
        probe round it just sent: what comes for it waits until it runs again, and then the timers
        that fell due meanwhile fire before the answers that came (as its actor's event loop runs
        them). Drawn only when on: the schedules without hold-ups are the same either way."""
        self._holdup_s = 0.0
        """A hold-up drawn, starting with the supervisor's next probe round (0: none)."""
        self._held_until = 0.0
        self._held: list = []
        """Events for the supervisor that came while it was held up, in order."""
        self.judged_while_held: list[str] = []
        """Processes replaced as silent while an answer of theirs waited for the held-up supervisor
        (the checker's record: a violation)."""
        self.faults: list[str] = []
        self.coverage: collections.Counter = collections.Counter()
        """How often the schedule reached each protocol path: every note the processes made (but
        ``update``), a fenced-out primary's deposition and reinstatement, a live worker process
        killed by the supervisor. An exploration sums them; its tests require the rare paths to be
        reached at all (``sim.MUST_REACH``)."""
        self._fenced_out: set = set()
        self.trace_on = trace
        self.trace: list[str] = []
        self.max_time_s = max_time_s
        self.events = 0
        self._pending: dict[str, dict[int, tuple]] = {}
        """Per process: rid -> (caller, caller incarnation, cid, message) of requests it has not
        answered."""
        self._rids = itertools.count(1)
        self._creating: set[str] = set()
        """Processes created but not up yet: calls to them wait (as Ray queues calls to a pending
        actor)."""
        self.server_cls, self.supervisor_cls = protocol_classes(bugs or ())
        self.nodes = [f"node{i}" for i in range(cfg.num_nodes)]
        self.ranges = cfg.ranges()
        self.spec = ServerSpec(
            OptimConfig(name="sgd", lr=1.0, momentum=MOMENTUM, clip_grad_norm=cfg.clip),
            cfg.steps,
            cfg.num_workers,
            cfg.rule(),
            cfg.snapshot_interval,
            replicate=True,
            fold=cfg.fold,
            unlogged=cfg.unlogged,
            pipelined=cfg.pipelined,
        )
        self.sup_spec = SupervisorSpec(
            cfg.num_shards,
            cfg.num_workers,
            cfg.steps,
            "replica",
            num_spares=cfg.num_spares,
            probe_interval_s=0.08,
            probe_timeout_s=0.01,
            suspect_after_s=0.1,
            timer_slack_s=0.0,
            start_timeout_s=5.0,
            op_timeout_s=0.5,
            max_worker_restarts=100,
            node_ids=tuple(self.nodes) if cfg.num_nodes > 1 else (),
            process_ranks=cfg.preaggregate,
        )
        self._fault_budget = cfg.max_faults if faults else 0
        self._window_budget = 2 if faults else 0
        """Crashes more, in windows ``WINDOW_NOTES`` open (the other faults may be spent by then:
        a window follows one) or a supervisor restart opens while a recovery is under way."""
        self._progress = 0
        self.primary_losses: dict[int, int] = {}
        """Per shard: primaries that stopped serving it (crashed, or stepped down), counted from the
        processes themselves -- what relaxed durability's loss allowance is judged by."""

    # --- scheduling
    # ----------------------------------------------------------------------------------

    def at(self, delay: float, *event) -> None:
        heapq.heappush(self._queue, (self.now + max(0.0, delay), next(self._seq), event))

    def delay(self) -> float:
        return self.rng.uniform(0.0001, 0.002) * (10 if self.rng.random() < 0.03 else 1)

    def log(self, text: str) -> None:
        if self.trace_on:
            self.trace.append(f"{self.now * 1000:9.3f}ms {text}")

    # --- processes
    # -------------------------------------------------------------------------------------

    def _new_supervisor(self, restore: bool) -> SupervisorProtocol:
        params_of = self.cfg.initial
        if restore:
            return self.supervisor_cls.restore(
                self.sup_spec,
                self.ranges,
                params_of,
                self.kv[REGISTRY_KEY],
                self.now,
                key=REGISTRY_KEY,
            )
        return self.supervisor_cls(
            self.sup_spec, self.ranges, params_of, now=self.now, key=REGISTRY_KEY
        )

    def start(self) -> None:
        sup = self.procs[SUPERVISOR] = Proc(
            SUPERVISOR, "supervisor", self.nodes[0], self._new_supervisor(False)
        )
        self.perform(sup, sup.obj.on_start(self.now))
        if self.faults_on:  # most faults land while the workers train, some while the run starts
            for _ in range(self._fault_budget):
                if self.rng.random() < 0.2:
                    self.at(self.rng.uniform(0.0, STARTUP_S), "fault", "now")
                else:
                    self.at(0.0, "fault", "training")

    def create(self, eff: Create) -> None:
        node = eff.node if eff.node in self.nodes else self.rng.choice(self.nodes)
        if self.cfg.num_nodes > 1 and eff.kind == "worker":  # a process's ranks share its node
            node = self.nodes[((eff.rank or 0) // self.cfg.preaggregate) % len(self.nodes)]
        if eff.kind == "server":
            obj = self.server_cls(eff.name, self.spec, clock=lambda: self.now, node=node)
        else:
            obj = SimWorker(self, eff.name, eff.rank, eff.routes, eff.host)
        self._creating.add(eff.name)
        self.at(self.rng.uniform(0.005, 0.03), "created", Proc(eff.name, eff.kind, node, obj))

    def kill(self, name: str, why: str) -> None:
        proc = self.procs.get(name)
        if proc is None or not proc.alive:
            return
        if proc.kind == "server":
            p = proc.obj.primary
            if p is not None and not p.deposed:
                self.primary_losses[p.shard.index] = self.primary_losses.get(p.shard.index, 0) + 1
        proc.alive, proc.died_at = False, self.now
        self.log(f"CRASH {name} ({why})")
        if self.rng.random() < 0.5:
            self._drop_undelivered(proc)
        for caller, inc, cid, msg in self._pending.pop(name, {}).values():
            if proc.kind == "supervisor":  # Ray runs the call again on the restarted supervisor
                self.at(self.delay(), "request", caller, inc, cid, name, msg)
            else:
                self.at(self.delay() * 5, "failure", caller, inc, cid, Failure.DEAD)
        if proc.kind == "supervisor":
            self.at(self.rng.uniform(0.005, 0.03), "restart_supervisor")
        if proc.kind == "worker" and proc.obj.host is not None:  # its process's ranks die with it
            for p in list(self.procs.values()):
                if p.kind == "worker" and p.alive and p.obj.host is proc.obj.host:
                    self.kill(p.name, f"{why}; shares {name}'s process")

    def _drop_undelivered(self, proc: Proc) -> None:
        """The calls a process made that have not reached their callee die with it: Ray sends an
        actor call from the caller's process after ``.remote()`` returned. A primary's last append
        is lost so (with relaxed durability: the updates it answered before they were logged)."""
        mine = [
            e
            for e in self._queue
            if e[2][0] == "request" and e[2][1] == proc.name and e[2][2] == proc.incarnation
        ]
        if not mine:
            return
        self._queue = [e for e in self._queue if e not in mine]
        heapq.heapify(self._queue)
        self.faults.append(
            f"{proc.name}'s undelivered calls died with it: "
            + ", ".join(type(e[2][5]).__name__ for e in mine)
        )

    def poke_host(self, host: SimHost, token: str) -> None:
        """Wake every rank of a process (their threads wait on one condition)."""
        for w in host.ranks.values():
            proc = self.procs.get(w.name)
            if proc is not None and proc.alive:
                self.at(0.0, "timer", proc.name, proc.incarnation, token)

    # --- carrying out effects
    # ------------------------------------------------------------------------

    def perform(self, proc: Proc, effects: list, crash_at: int | None = None) -> None:
        if (
            self._holdup_s
            and proc.kind == "supervisor"
            and any(isinstance(e, Call) and isinstance(e.msg, Describe) for e in effects)
        ):  # a probe round goes out: the supervisor is held up right after it
            self._held_until = self.now + self._holdup_s
            self.at(self._holdup_s, "resume")
            self._holdup_s = 0.0
        for n, eff in enumerate(effects):
            if not proc.alive:
                return
            if crash_at is not None and n == crash_at:
                self.faults.append(
                    f"{proc.name} crashed between two effects ({type(eff).__name__} not carried "
                    "out)"
                )
                self.kill(proc.name, "mid-handler")
                return
            if isinstance(eff, Call):
                self.at(
                    self.delay(), "request", proc.name, proc.incarnation, eff.cid, eff.dst, eff.msg
                )
            elif isinstance(eff, Reply):
                request = self._requests.pop((proc.name, eff.rid), None)
                self._observe_answer(proc, request, eff.value)
                caller = self._pending.get(proc.name, {}).pop(eff.rid, None)
                fate = self._answer_fate(proc, request) if caller is not None else None
                if fate == "dies":
                    self.at(self.delay() * 5, "failure", *caller[:3], Failure.DEAD)
                    return
                if caller is not None:
                    # a slow answer: a replica's state through the object store
                    slow = fate == "slow" or isinstance(request, ExportReplica)
                    delay = self.rng.uniform(0.005, 0.03) if slow else self.delay()
                    self.at(delay, "reply", *caller[:3], eff.value, proc.name)
                    if fate == "slow":  # its node is lost while the answer travels
                        self.at(delay * self.rng.uniform(0.1, 0.9), "fault", "answering", proc.name)
            elif isinstance(eff, Timer):
                self.at(eff.delay_s, "timer", proc.name, proc.incarnation, eff.token)
            elif isinstance(eff, Persist):
                self.kv[eff.key] = eff.value
                self._progress += 1
            elif isinstance(eff, Create):
                self.create(eff)
            elif isinstance(eff, Kill):
                victim = self.procs.get(eff.name)
                if self.trace_on:
                    self.log(f"{proc.name} kills {eff.name}: {eff.reason}")
                if victim is not None and victim.alive:
                    if victim.kind == "worker" and proc.kind == "supervisor":
                        self.coverage["live_worker_killed"] += 1  # silent, killed before re-made
                    self.at(self.rng.uniform(0.0, 0.05), "killed", eff.name, eff.reason)
            elif isinstance(eff, Fold):
                self.at(0.0, "fold", proc.name, proc.incarnation, eff.shard)
            elif isinstance(eff, Note):
                if self.trace_on and eff.event != "update":
                    self.log(f"{proc.name} notes {eff.event} {eff.fields}")
                if eff.event != "update":
                    self.coverage[eff.event] += 1
                if eff.event == "deposed":  # a primary replaced while alive
                    shard = eff.fields["shard"]
                    if proc.obj.primary is not None and proc.obj.primary.fenced_at is not None:
                        self.coverage["deposed_by_fence"] += 1
                        self._fenced_out.add((proc.name, proc.incarnation, shard))
                    self.primary_losses[shard] = self.primary_losses.get(shard, 0) + 1
                    self._aim_at_fencing_holder(proc)
                if (
                    eff.event == "reinstated"
                    and (proc.name, proc.incarnation, eff.fields["shard"]) in self._fenced_out
                ):
                    self.coverage["fenced_primary_reinstated"] += 1
                if eff.event in ("update", "recovered", "rereplicated"):
                    self._progress += 1
                if (
                    eff.event in WINDOW_NOTES
                    and proc.kind == "supervisor"
                    and self._window_budget
                    and self.rng.random() < 0.5
                ):
                    self.at(self.rng.uniform(0.0, 0.03), "fault", "window")
            elif isinstance(eff, SaveCheckpoint):
                raise AssertionError("the simulator runs replica recovery only")

    def _observe_answer(self, proc: Proc, request, value) -> None:
        """Record what holders acknowledged; check that every answer claiming a push's update
        logged (strict and pipelined durability) comes after a holder acknowledged it."""
        if isinstance(request, Append) and isinstance(value, AppendAck):
            shard, through = request.shard, value.next_seq
        elif isinstance(request, InstallReplica) and isinstance(value, int):
            shard, through = request.shard.index, value
        else:
            if (
                isinstance(request, Push)
                and isinstance(value, PushReply)
                and value.durable
                and value.acked
                and not self.cfg.unlogged
                and proc.obj.primary is not None
            ):
                shard = proc.obj.primary.shard.index
                if self.logged_through.get(shard, 0) < value.acked:
                    self.early_acks.append(
                        f"{proc.name} answered worker {request.rank}'s push of step "
                        f"{request.step} as logged (update {value.acked - 1} of shard {shard}) "
                        f"before any holder acknowledged it"
                    )
            return
        self.logged_through[shard] = max(self.logged_through.get(shard, 0), through)

    # --- the event loop
    # --------------------------------------------------------------------------------

    def run(self) -> RunOutcome:
        self.start()
        last_progress, last_progress_at = -1, 0.0
        while self._queue:
            t, _, event = heapq.heappop(self._queue)
            self.now = t
            if t > self.max_time_s:
                break
            self.events += 1
            self.dispatch(event)
            sup = self.procs[SUPERVISOR].obj
            if self._progress != last_progress:
                last_progress, last_progress_at = self._progress, t
            elif t - last_progress_at > 5.0:
                break  # nothing changed for 5 simulated seconds: no one can make progress
            if self.procs[SUPERVISOR].alive and sup.phase in (RunPhase.DONE, RunPhase.FAILED):
                break
        sup = self.procs[SUPERVISOR].obj
        finished = self.procs[SUPERVISOR].alive and sup.phase is RunPhase.DONE
        return RunOutcome(
            finished, sup.reg.failure, list(self.faults), self.events, self.now, self.trace
        )

    def dispatch(self, event: tuple) -> None:
        kind = event[0]
        if self.now < self._held_until and _for_supervisor(event):
            self._held.append(event)
            return
        if kind == "resume":
            self._resume()
            return
        if kind == "request":
            _, src, src_inc, cid, dst, msg = event
            proc = self.procs.get(dst)
            if (dst == SUPERVISOR and (proc is None or not proc.alive)) or dst in self._creating:
                self.at(
                    0.002, *event
                )  # Ray retries calls to a restarting supervisor, queues calls to a starting actor
                return
            if proc is None or not proc.alive:
                self.at(self.delay() * 5, "failure", src, src_inc, cid, Failure.DEAD)
                return
            if proc.deaf_until > self.now and src == SUPERVISOR:
                if self.trace_on:
                    self.log(f"{dst} cut off from the supervisor: {type(msg).__name__} delayed")
                self.at(
                    proc.deaf_until - self.now + self.delay(), *event
                )  # it arrives once the partition heals
                return
            rid = next(self._rids)
            self._pending.setdefault(dst, {})[rid] = (src, src_inc, cid, msg)
            self._requests[(dst, rid)] = msg  # answered into the void or not: seen by the checker
            if self.trace_on:
                self.log(f"{src} -> {dst}: {type(msg).__name__}")
            if (
                src != SUPERVISOR
                and dst != SUPERVISOR
                and self._fault_budget
                and self.rng.random() < 0.01
            ):
                self._fault_budget -= 1
                self.faults.append(
                    f"{src}'s call to {dst} reported unavailable (the server still got it)"
                )
                self._pending[dst].pop(rid)
                self.at(self.delay(), "failure", src, src_inc, cid, Failure.UNAVAILABLE)
                self._handle(proc, "request", rid, msg)  # answered into the void
                return
            self._handle(proc, "request", rid, msg)
        elif kind == "reply":
            _, dst, inc, cid, value, src = event
            proc = self.procs.get(dst)
            if proc is None or not proc.alive or proc.incarnation != inc:
                return
            self._handle(proc, "reply", cid, value)
        elif kind == "failure":
            _, dst, inc, cid, failure = event
            proc = self.procs.get(dst)
            if proc is None or not proc.alive or proc.incarnation != inc:
                return
            self._handle(proc, "failure", cid, failure)
        elif kind == "timer":
            _, name, inc, token = event
            proc = self.procs.get(name)
            if proc is None or not proc.alive or proc.incarnation != inc:
                return
            self._handle(proc, "timer", token, None)
        elif kind == "fold":
            _, name, inc, shard = event
            proc = self.procs.get(name)
            if proc is not None and proc.alive and proc.incarnation == inc:
                proc.obj.fold(shard)
        elif kind == "created":
            proc = event[1]
            self._creating.discard(proc.name)
            if proc.name in self.procs:
                return
            self.procs[proc.name] = proc
            self.log(f"created {proc.name} on {proc.node}")
            if proc.kind == "worker" and proc.obj.host is not None:
                proc.obj.host.ranks[proc.obj.rank] = proc.obj
            if proc.kind == "worker":
                self.perform(proc, [Timer("tick", self.cfg.compute_s)])
        elif kind == "killed":
            self.kill(event[1], f"killed by the supervisor: {event[2]}")
        elif kind == "restart_supervisor":
            proc = self.procs[SUPERVISOR]
            proc.obj = self._new_supervisor(True)
            proc.alive, proc.incarnation = True, proc.incarnation + 1
            self.log("supervisor restarted from the registry")
            self.perform(proc, proc.obj.on_start(self.now))
            recovering = any(s.phase is SlotPhase.RECOVERING for s in self._registry().slots)
            if recovering and self._window_budget and self.rng.random() < 0.5:
                # the restored supervisor issues the recovery again: the holder may die meanwhile
                self.at(self.rng.uniform(0.0, 0.03), "fault", "window")
        elif kind == "fault":
            if event[1] == "training":  # once a worker trains, at a random moment of its steps
                if not any_started(self._registry()):
                    self.at(0.02, *event)
                else:
                    self.at(
                        self.rng.uniform(0.0, self.cfg.steps * self.cfg.compute_s * 1.2),
                        "fault",
                        "now",
                    )
                return
            if event[1] == "window":
                self.inject_in_window()
                return
            if event[1] == "answering":
                self._lose_while_answering(event[2])
                return
            self.inject()
        else:
            raise AssertionError(kind)

    def _handle(self, proc: Proc, what: str, key, value) -> None:
        obj = proc.obj
        if proc.kind == "supervisor":
            if what == "request":
                effects = obj.on_request(key, value, self.now)
            elif what == "reply":
                effects = obj.on_reply(key, value, self.now)
            elif what == "failure":
                effects = obj.on_failure(key, value, self.now)
            else:
                effects = obj.on_timer(key, self.now)
        elif proc.kind == "worker":
            if what == "request":
                effects = obj.on_request(key, value)
            elif what == "timer":
                effects = obj.on_timer(key)
            else:
                effects = obj.on_answer(key, value, what == "failure")
        else:
            if what == "request":
                effects = obj.on_request(key, value)
            elif what == "reply":
                effects = obj.on_reply(key, value)
            elif what == "failure":
                effects = obj.on_failure(key, value)
            else:
                effects = obj.on_timer(key)
        crash_at = None
        if (
            self._fault_budget
            and len(effects) > 1
            and self.rng.random() < 0.02
            and self._may_crash({proc.name})
        ):
            self._fault_budget -= 1
            crash_at = self.rng.randrange(1, len(effects))
        self.perform(proc, effects, crash_at)

    # --- faults
    # --------------------------------------------------------------------------------------------

    def _resume(self) -> None:
        """The held-up supervisor runs again: the timers that fell due first, then the answers and
        requests that came, in order. Whoever it replaces as silent while an answer of theirs still
        waits here is recorded (``judged_while_held``)."""
        self._held_until = 0.0
        held, self._held = self._held, []
        if any(e[0] == "reply" for e in held):
            self.coverage["held_up_answers"] += 1
        held.sort(key=lambda e: e[0] != "timer")  # stable: each kind keeps its order
        for n, event in enumerate(held):
            waiting = {e[5] for e in held[n + 1 :] if e[0] == "reply"}
            known = len(self._registry().events)
            self.dispatch(event)
            self.judged_while_held += [
                f"{e.actor} was replaced as silent for {e.silent_s}s while its answer waited for "
                "the held-up supervisor"
                for e in self._registry().events[known:]
                if e.cause == "silent" and e.actor in waiting
            ]

    def _registry(self):
        sup = self.procs[SUPERVISOR].obj
        return sup.reg

    def _may_crash(self, victims: set[str]) -> bool:
        """Whether losing ``victims`` together leaves every shard a live primary or a server with
        its newest copy that the supervisor can find: the holder it confirmed, or else the last
        holder it named, still one of the holder slot's servers (a retiring one, or the one a
        recovery replaces, make before break), with the replica -- or without it, and so on back
        through the holders named before it (each later one's install has not happened)."""
        reg, k = self._registry(), self.cfg.num_shards

        def gone(name):
            p = self.procs.get(name)
            return name is None or name in victims or p is None or not p.alive

        def has_copy(name, shard):
            return not gone(name) and shard in self.procs[name].obj.replicas

        def still_serves(slot, shard):
            # a recovery's primary that was only suspected (or one being reinstated after its
            # recovery was abandoned), alive and not deposed by a successor: it still has every
            # acknowledged update of its shard (the supervisor abandons the recovery)
            name = slot.actor if slot.reinstating else slot.replacing
            if name is None or slot.replacing_confirmed or gone(name):
                return False
            p = self.procs[name].obj.primary
            if p is None or p.shard.index != shard:
                return False
            # deposed only by its holder's fence (this recovery's export) it is reinstated all
            # the same: it has every update it acknowledged
            return not p.deposed or (p.fenced_at is not None and p.fenced_at <= slot.epoch)

        def rebuilt(slot, shard):
            # a recovery's spare that finished a rebuild of it, at its epoch or an older one (its
            # answer on its way, or lost with a supervisor): it has every acknowledged update
            return not gone(slot.actor) and self.procs[slot.actor].obj._rebuilt_before(shard)

        def spare_done(slot, shard):
            # the recovery's spare (crashed now or not) has the shard rebuilt
            p = self.procs.get(slot.actor)
            return (
                not slot.reinstating and p is not None and p.alive and p.obj._rebuilt_before(shard)
            )

        def newest_copy_kept(shard):
            holder = reg.slots[replica_slot(shard, k)]
            history = replica_target_history(reg, shard)
            if (
                holder.phase is SlotPhase.SERVING
                and holder.actor not in history
                and gone(holder.actor)
            ):
                # the supervisor names the slot's serving actor next (a re-replication on its
                # way): dead with the primary, nobody could tell it whether that install happened
                return False
            for name in history:  # newest first
                if gone(name) or not holds_for_slot(reg, shard, k, name):
                    return False
                if has_copy(name, shard):
                    return True
            return False

        for shard in range(k):
            slot = reg.slots[shard]
            holder = reg.slots[replica_slot(shard, k)]
            primary_ok = (slot.phase is SlotPhase.SERVING and not gone(slot.actor)) or (
                slot.phase is SlotPhase.RECOVERING
                and (
                    rebuilt(slot, shard)
                    # once the spare has the shard rebuilt, the supervisor retires the primary
                    # it replaces as soon as it learns so (an answer, an adoption -- perhaps
                    # from a view older than this crash): that one is no copy to count on then
                    or (still_serves(slot, shard) and not spare_done(slot, shard))
                )
            )
            holder_ok = (
                reg.replicated[shard]
                and holder.phase in (SlotPhase.SERVING, SlotPhase.RECOVERING)
                and not gone(holder.actor)
            ) or (not reg.replicated[shard] and newest_copy_kept(shard))
            if not primary_ok and not holder_ok and (reg.training or reg.replicated[shard]):
                # (before training, a shard not replicated yet is simply loaded again from the
                # initial values: no worker can start before its replication is confirmed)
                return False
            if slot.phase is SlotPhase.RECOVERING and not holder_ok and not primary_ok:
                return False
        return True

    def inject_in_window(self) -> None:
        """A crash just after the supervisor began moving a copy (``WINDOW_NOTES``) or restarted
        during a recovery: of a primary whose shard's replica is unconfirmed, of the holder last
        named for it, of a recovery's holder, of a retiring server -- the moments when a shard's
        newest copy may be on a server being replaced -- or of the supervisor itself.
        Nothing if the crash would leave a shard no copy the supervisor can find."""
        reg, k = self._registry(), self.cfg.num_shards
        unconfirmed = [s for s in range(k) if not reg.replicated[s]]
        names = {reg.slots[s].actor for s in unconfirmed}
        names |= {h for s in unconfirmed for h in replica_target_history(reg, s)}
        names |= {name for slot in reg.slots for name in slot.retiring}
        # the holder a recovery rebuilds from: the primary it replaces may still serve, or the
        # spare may have finished (its answer on its way, or lost with the supervisor)
        names |= {
            reg.slots[replica_slot(j, k)].actor
            for j, slot in enumerate(reg.slots[:k])
            if slot.phase is SlotPhase.RECOVERING
        }
        live = sorted(n for n in names if n in self.procs and self.procs[n].alive)
        if not live or self._window_budget <= 0:
            return
        victim = self.rng.choice(live)
        if self.rng.random() < 0.25 and self.procs[SUPERVISOR].alive:
            victim = SUPERVISOR  # the answer to what it just sent is lost with it
        what, lost = f"crash of {victim}", None
        if victim == SUPERVISOR:
            self._window_crash({victim}, what)
        elif self.procs[victim].node != self.nodes[0] and self.rng.random() < 0.3:
            # its whole node: every process on it, and half their answers on their way
            node = self.procs[victim].node
            self._window_crash(self._on_node(node), f"loss of {node} ({victim}'s node)", "half")
        else:
            if self.rng.random() < 0.5:
                # it died before its answers reached their callers: what it did stands, its
                # callers never learn (an export whose answer is lost, an install not confirmed)
                what, lost = what + ", its answers on their way lost", "half"
            self._window_crash({victim}, what, lost)

    def _on_node(self, node: str) -> set[str]:
        """The live processes of ``node`` but the supervisor (what its loss kills)."""
        return {
            p.name
            for p in self.procs.values()
            if p.alive and p.node == node and p.kind != "supervisor"
        }

    def _window_crash(self, victims: set[str], what: str, lost: str | None = None) -> bool:
        """Crash ``victims`` together in a window, unless the design cannot survive it; of their
        answers on their way ``lost`` ones are lost too: none, ``"half"`` or ``"all"``."""
        if not self._window_budget or not self._may_crash(victims):
            return False
        self._window_budget -= 1
        self.faults.append(f"{what} while a copy moves")
        self.log(f"FAULT {self.faults[-1]}")
        for name in sorted(victims):  # in one order: each kill may draw from the rng
            self.kill(name, self.faults[-1])
        if lost:
            self._lose_replies_from(victims, every=lost == "all")
        return True

    def _answer_fate(self, proc: Proc, request) -> str | None:
        """Window crashes aimed at an answer that moves a copy (a holder's export that raised its
        fence, a spare's rebuild): ``"dies"``, ``proc`` dies just after carrying out ``request``
        and before answering (the caller learns only that it died); ``"slow"``, the answer
        travels a while and its sender's node may be lost meanwhile, the answer with it."""
        if not (
            self._window_budget
            and proc.kind == "server"
            and isinstance(request, COPY_MOVING)
            and self._registry().training  # the first copies are not a recovery's
            and self.rng.random() < 0.25
        ):
            return None
        if isinstance(request, ExportReplica) or self.rng.random() < 0.5:
            return "slow"
        what = f"crash of {proc.name} answering {type(request).__name__}"
        return "dies" if self._window_crash({proc.name}, what) else None

    def _aim_at_fencing_holder(self, proc: Proc) -> None:
        """A primary just stepped down, perhaps fenced by its holder's export to a recovery's
        spare: while that export's answer travels, the holder's node may be lost with it (the
        spare never gets the replica; the deposed primary has every update it acknowledged)."""
        p = proc.obj.primary
        holder = p.holder if p is not None else None
        if (
            self._window_budget
            and holder is not None
            and any(e[0] == "reply" and e[5] == holder for _, _, e in self._queue)
            and self.rng.random() < 0.5
        ):
            self.at(self.rng.uniform(0.0, 0.002), "fault", "answering", holder)

    def _lose_while_answering(self, name: str) -> None:
        """The node of ``name`` is lost while an answer of ``name`` is on its way (``"slow"``),
        the answer with it (on the head's node, ``name`` alone dies)."""
        proc = self.procs.get(name)
        if proc is None or not proc.alive:
            return
        if proc.node == self.nodes[0]:
            self._window_crash({name}, f"crash of {name} (its answer on its way lost)", "all")
        else:
            what = f"loss of {proc.node} ({name}'s answer on its way)"
            self._window_crash(self._on_node(proc.node), what, "all")

    def inject(self) -> None:
        if self._fault_budget <= 0:
            return
        if self.holdups and self.rng.random() < 0.3:
            self._fault_budget -= 1
            self._holdup_s = self.rng.uniform(0.12, 0.5)  # longer than suspect_after_s
            self.faults.append(
                f"the supervisor held up for {self._holdup_s * 1000:.0f}ms from its next probe"
                " round"
            )
            self.log(f"FAULT {self.faults[-1]}")
            return
        live = [p for p in self.procs.values() if p.alive]
        choice = self.rng.random()
        if choice < 0.12:
            victims = {SUPERVISOR}
            what = "supervisor crash"
        elif choice < 0.27 and self.cfg.num_nodes > 1:
            node = self.rng.choice(self.nodes[1:])
            victims = self._on_node(node)
            what = f"loss of {node}"
        elif choice < 0.4:
            # a server; with pre-aggregation a worker too (its process is killed and re-created)
            servers = [
                p
                for p in live
                if p.kind == "server" or (p.kind == "worker" and self.cfg.preaggregate > 1)
            ]
            if not servers:
                return
            p = self.rng.choice(servers)
            if not self._may_crash({p.name}):
                self.at(0.02, "fault", "now")
                return
            self._fault_budget -= 1
            p.deaf_until = self.now + self.rng.uniform(0.15, 0.4)
            self.faults.append(
                f"false suspicion of {p.name} for {(p.deaf_until - self.now) * 1000:.0f}ms"
            )
            self.log(f"FAULT {self.faults[-1]}")
            return
        else:  # a slot's server half the time (primary or replica holder), else a worker or spare
            reg = self._registry()
            slots = {s.actor for s in reg.slots}
            servers = [p for p in live if p.name in slots]
            others = [p for p in live if p.kind != "supervisor" and p.name not in slots]
            pool = servers if servers and (self.rng.random() < 0.5 or not others) else others
            if not pool:
                return
            victims = {self.rng.choice(pool).name}
            what = f"crash of {next(iter(victims))}"
        if not victims or not self._may_crash(victims):
            self.at(0.02, "fault", "now")  # not now: try again a little later
            return
        self._fault_budget -= 1
        self.faults.append(what)
        self.log(f"FAULT {what}")
        for name in sorted(victims):  # in one order: each kill may draw from the rng
            self.kill(name, what)
        if what.startswith("loss of"):
            self._lose_replies_from(victims)

    def _lose_replies_from(self, victims: set[str], every: bool = False) -> None:
        """Answers still travelling from a lost node's processes are lost with it (its object store
        is gone): half of them, or ``every`` one."""
        kept = []
        for t, s, event in self._queue:
            if event[0] == "reply" and event[5] in victims and (every or self.rng.random() < 0.5):
                kept.append((t, s, ("failure", event[1], event[2], event[3], Failure.LOST)))
            else:
                kept.append((t, s, event))
        heapq.heapify(kept)
        self._queue = kept


def _for_supervisor(event: tuple) -> bool:
    """Whether ``event`` is delivered to the supervisor (a request to it, an answer, a timer)."""
    kind = event[0]
    if kind == "request":
        return event[4] == SUPERVISOR
    return kind in ("reply", "failure", "timer") and event[1] == SUPERVISOR
