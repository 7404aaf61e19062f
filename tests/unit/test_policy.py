"""Placement helpers, the supervisor's pure ``decide()``, and ``SupervisorProtocol`` driven on the
in-memory bus (write-ahead of every act, and a restart from the persisted registry at any point of a
run)."""

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import pytest

from raytrain_ft.config import OptimConfig
from raytrain_ft.consistency import Rule
from raytrain_ft.params import shard_ranges
from raytrain_ft.protocol.messages import (
    Call,
    Create,
    Depose,
    Describe,
    Failure,
    Kill,
    Load,
    Persist,
    PollStatus,
    Push,
    PushReply,
    Recovered,
    RecoverPrimary,
    RefusalKind,
    Refused,
    Reinstate,
    Reply,
    ServerDescription,
    SetReplica,
    Start,
    StartFailed,
    Timer,
)
from raytrain_ft.protocol.server import ServerProtocol, ServerSpec
from raytrain_ft.protocol.supervisor import (
    Action,
    Registry,
    RunPhase,
    SlotPhase,
    SlotRecord,
    SupervisorProtocol,
    SupervisorSpec,
    View,
    WorkerPhase,
    WorkerRecord,
    decide,
    last_replica_target,
    num_slots,
    primary_shard,
    replica_shards,
    replica_slot,
)
from raytrain_ft.recovery.policy import server_nodes, slot_nodes, snapshot_interval_for
from tests.unit.bus import Bus

# --- placement
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "k, expected_slots, holders", [(1, 2, [1]), (2, 2, [1, 0]), (4, 4, [1, 2, 3, 0])]
)
def test_topology_ring_or_dedicated_replica(k, expected_slots, holders):
    assert num_slots(k) == expected_slots
    assert [replica_slot(s, k) for s in range(k)] == holders
    for slot in range(expected_slots):
        assert all(replica_slot(s, k) == slot for s in replica_shards(slot, k))
    assert [primary_shard(j, k) for j in range(expected_slots)] == [
        j if j < k else None for j in range(expected_slots)
    ]


@pytest.mark.parametrize(
    "slots, nodes",
    [
        (4, ["a", "b", "c"]),
        (2, ["a", "b", "c"]),
        (5, ["a", "b", "c", "d"]),
        (4, ["a", "b"]),
        (3, ["a", "b", "c"]),
    ],
)
def test_ring_neighbours_sit_on_different_nodes(slots, nodes):
    placed = slot_nodes(slots, nodes)
    assert all(placed[j] != placed[(j + 1) % slots] for j in range(slots))


def test_an_odd_ring_on_two_nodes_cannot_be_spread():
    placed = slot_nodes(
        3, ["a", "b"]
    )  # a 3-cycle needs 3 colours: one neighbour pair shares a node
    assert sum(placed[j] == placed[(j + 1) % 3] for j in range(3)) == 1
    assert slot_nodes(3, []) == []


@pytest.mark.parametrize(
    "cpus, ordered, expected",
    [
        ({"h": 4}, [], []),  # one node: no placement
        ({"h": 4, "b": 2, "a": 2}, [], ["h", "a", "b"]),
        ({"h": 4, "b": 2, "a": 2}, ["b", "a"], ["h", "b", "a"]),  # simulated nodes in kill order
        (
            {"h": 0, "g2": 4, "g1": 4},
            [],
            ["g1", "g2"],
        ),  # a `ray up` head with CPU 0 holds no servers
        ({"h": 0, "g1": 4}, [], ["g1"]),
        ({"h": 0, "x": 0}, [], ["h", "x"]),  # nobody offers CPUs: spread anyway
    ],
)
def test_server_nodes(cpus, ordered, expected):
    assert server_nodes("h", cpus, ordered) == expected


def test_snapshot_interval_for_minimises_expected_cost():
    # 20 ms snapshots, 1 ms per replayed command, one failure per 100,000 updates
    n = snapshot_interval_for(0.020, 0.001, 1e-5)
    assert n == 2000

    def cost(k):
        return 0.020 / k + 1e-5 * 0.001 * k / 2

    assert all(cost(n) <= cost(k) for k in (n // 2, n - 1, n + 1, 2 * n))
    assert (
        snapshot_interval_for(0.020, 0.0, 1e-5) == 10_000
    )  # folded logs replay nothing: snapshots only cost
    assert snapshot_interval_for(0.020, 0.001, 0.0) == 10_000
    assert snapshot_interval_for(0.0, 0.001, 1e-5) == 1
    assert snapshot_interval_for(10.0, 0.001, 1e-9, hi=500) == 500
    with pytest.raises(ValueError):
        snapshot_interval_for(-1, 0.001, 1e-5)


# --- decide(): (registry, view) -> decisions
# -------------------------------------------------------------

SERVERS = "abc"


@dataclass(frozen=True)
class Status:
    """What a worker answers ``PollStatus`` with (the fields ``decide`` reads)."""

    started: bool
    done: bool = False
    error: str | None = None
    step: int = 0


def _spec(k=2, num_spares=1, **kw):
    return SupervisorSpec(
        num_shards=k,
        num_workers=2,
        total_steps=10,
        num_spares=num_spares,
        max_worker_restarts=2,
        **{"suspect_after_s": 10.0, **kw},
    )


def _desc(name, shard, epoch=1, deposed=False):
    return ServerDescription(name, shard, epoch, 0, 0, (0, 0), (), deposed, None)


def _reg(
    k=2,
    slot=SlotPhase.SERVING,
    worker=WorkerPhase.RUNNING,
    replicated=True,
    spares=("sp",),
    phase=None,
    restarts=0,
    tweak=None,
):
    """Servers "a", "b"(, "c") in the slots, workers "w0", "w1", one spare "sp"."""
    empty, loaded = slot is SlotPhase.EMPTY, slot in (SlotPhase.LOADING, SlotPhase.SERVING)
    slots = [
        SlotRecord(None if empty else SERVERS[j], slot, int(loaded)) for j in range(num_slots(k))
    ]
    workers = [
        WorkerRecord(None if worker is WorkerPhase.NONE else f"w{r}", worker, restarts)
        for r in range(2)
    ]
    training = worker not in (WorkerPhase.NONE, WorkerPhase.CREATING)
    if phase is None:
        phase = (
            RunPhase.RUNNING
            if worker in (WorkerPhase.RUNNING, WorkerPhase.DONE)
            else RunPhase.STARTING
        )
    reg = Registry(
        slots,
        [int(loaded)] * k,
        list(replicated) if isinstance(replicated, tuple) else [replicated] * k,
        workers,
        list(spares),
        phase,
        training=training,
        checkpoint_steps=[None] * k,
    )
    if tweak:
        tweak(reg)
    return reg


def _view(reg, k=2, answers=None, silent=None, gone=()):
    """What a probe round saw: every known process answering as the registry expects (a
    recovering slot's spare neither rebuilt nor rebuilding), but for ``answers`` (overrides) and
    ``silent`` (name -> seconds since it last answered)."""
    seen = {}
    for j, s in enumerate(reg.slots):
        if s.phase is SlotPhase.RECOVERING:
            seen[s.actor] = _desc(s.actor, None, 0)
        elif s.actor:  # a server not loaded yet serves no shard
            seen[s.actor] = _desc(s.actor, primary_shard(j, k) if s.epoch else None, s.epoch)
    for name in reg.spares:
        seen[name] = _desc(name, None, 0)
    for w in reg.workers:
        if w.actor:
            seen[w.actor] = Status(
                started=w.phase in (WorkerPhase.RUNNING, WorkerPhase.DONE),
                done=w.phase is WorkerPhase.DONE,
            )
    silent = silent or {}
    seen.update({n: Failure.UNAVAILABLE for n in silent})
    seen.update(answers or {})
    answered = {n for n, a in seen.items() if not isinstance(a, (Failure, StartFailed))} | set(
        silent
    )
    gone = set(gone) | {n for n, a in seen.items() if a is Failure.DEAD}
    return View(
        seen,
        {n: silent.get(n, 0.0) for n in seen},
        {n: 0.0 for n in seen},
        frozenset(answered),
        frozenset(gone),
    )


DEAD = Failure.DEAD
A = Action
_new2 = Registry.new(2, 2)
_creating = _reg(slot=SlotPhase.CREATING, worker=WorkerPhase.NONE, replicated=False)
_creating1 = _reg(k=1, slot=SlotPhase.CREATING, worker=WorkerPhase.NONE, replicated=False)
_unreplicated = _reg(worker=WorkerPhase.NONE, replicated=(False, True))
_servers_up = _reg(worker=WorkerPhase.NONE)
_workers_up = _reg(worker=WorkerPhase.CREATING)
_starting = _reg(worker=WorkerPhase.STARTING)
_running = _reg()
_running1 = _reg(k=1)
_running3 = _reg(k=3)
_untrained = _reg(worker=WorkerPhase.NONE, tweak=lambda r: r.__setattr__("training", False))
_at_limit = _reg(restarts=2)
_done = _reg(worker=WorkerPhase.DONE)
_done_unreplicated = _reg(worker=WorkerPhase.DONE, replicated=(True, False))
_replaced_max = _reg(tweak=lambda r: r.__setattr__("server_replacements", 100))


def _recovering(k=2, worker=WorkerPhase.RUNNING):
    """Slot 0 is being rebuilt on spare "sp2" at epoch 2, replacing "a" (what "a" held is not
    replicated)."""

    def tweak(r):
        r.slots[0] = SlotRecord("sp2", SlotPhase.RECOVERING, 2, replacing="a", replacing_epoch=1)
        r.reserved[0] = 2
        for s in replica_shards(0, k):
            r.replicated[s] = False

    return _reg(k=k, worker=worker, tweak=tweak)


DECIDE = [
    # id, spec, registry, view, busy, expected (action, target), reason substring
    (
        "startup: empty slots",
        _spec(),
        _new2,
        _view(_new2),
        (),
        [
            (A.CREATE_SLOT, 0),
            (A.CREATE_SLOT, 1),
            (A.CREATE_SPARE, None),
            (A.CREATE_WORKER, 0),
            (A.CREATE_WORKER, 1),
        ],
        "slot 0 has no actor",
    ),
    (
        "startup: created servers load",
        _spec(),
        _creating,
        _view(_creating),
        (),
        [(A.LOAD, 0), (A.LOAD, 1), (A.CREATE_WORKER, 0), (A.CREATE_WORKER, 1)],
        "server a is up",
    ),
    (
        "startup: one shard, dedicated holder",
        _spec(1),
        _creating1,
        _view(_creating1, k=1),
        (),
        [(A.LOAD, 0), (A.HOLDER_READY, 1), (A.CREATE_WORKER, 0), (A.CREATE_WORKER, 1)],
        "replica holder b is up",
    ),
    (
        "startup: a created server died",
        _spec(),
        _creating,
        _view(_creating, answers={"b": DEAD}),
        (),
        [(A.LOAD, 0), (A.CREATE_SLOT, 1), (A.CREATE_WORKER, 0), (A.CREATE_WORKER, 1)],
        "server b of slot 1 died",
    ),
    (
        "startup: replicate",
        _spec(),
        _unreplicated,
        _view(_unreplicated),
        (),
        [(A.REPLICATE, 0), (A.CREATE_WORKER, 0), (A.CREATE_WORKER, 1)],
        "shard 0 has no replica on slot 1",
    ),
    (
        "startup: replicate in flight",
        _spec(),
        _unreplicated,
        _view(_unreplicated),
        (("replicate", 0),),
        [(A.CREATE_WORKER, 0), (A.CREATE_WORKER, 1)],
        None,
    ),
    (
        "startup: workers are created while the servers start",
        _spec(),
        _servers_up,
        _view(_servers_up),
        (),
        [(A.CREATE_WORKER, 0), (A.CREATE_WORKER, 1)],
        "worker 0 has no actor",
    ),
    (
        "startup: start workers that are up",
        _spec(),
        _workers_up,
        _view(_workers_up),
        (),
        [(A.START_WORKER, 0), (A.START_WORKER, 1)],
        "worker 1 is up and not training",
    ),
    (
        "startup: a start in flight",
        _spec(),
        _workers_up,
        _view(_workers_up),
        (("start", 0),),
        [(A.START_WORKER, 1)],
        None,
    ),
    (
        "startup: no start before the primary's epoch shows",
        _spec(),
        _workers_up,
        _view(_workers_up, answers={"a": _desc("a", 0, epoch=0)}),
        (),
        [],
        None,
    ),
    (
        "startup: started workers run",
        _spec(),
        _starting,
        _view(_starting, answers={"w0": Status(True), "w1": Status(True)}),
        (),
        [(A.MARK_RUNNING, 0), (A.MARK_RUNNING, 1)],
        "worker 0 trains",
    ),
    ("healthy", _spec(), _running, _view(_running), (), [], None),
    (
        "dead primary, live holder: recover",
        _spec(),
        _running,
        _view(_running, answers={"a": DEAD}),
        (),
        [(A.RECOVER, 0)],
        "server a of slot 0 is dead",
    ),
    (
        "dead primary, no spare kept (num_spares 0): one is made for the recovery",
        _spec(num_spares=0),
        _reg(spares=()),
        _view(_reg(spares=()), answers={"a": DEAD}),
        (),
        [(A.RECOVER, 0), (A.CREATE_SPARE, None)],
        "0 of 0 warm spares, 1 recoveries waiting",
    ),
    (
        "no spare kept and nothing to recover: none made",
        _spec(num_spares=0),
        _reg(spares=()),
        _view(_reg(spares=())),
        (),
        [],
        None,
    ),
    (
        "deposed primary: recover",
        _spec(),
        _running,
        _view(_running, answers={"a": _desc("a", 0, deposed=True)}),
        (),
        [(A.RECOVER, 0)],
        "was deposed",
    ),
    (
        "suspected primary, healthy peers: recover",
        _spec(),
        _running,
        _view(_running, silent={"a": 11.0}),
        (),
        [(A.RECOVER, 0)],
        "has not answered for 11.0s",
    ),
    (
        "primary silent less than suspect_after_s: wait",
        _spec(),
        _running,
        _view(_running, silent={"a": 9.0}),
        (),
        [],
        None,
    ),
    (
        "dead primary before training: start it again",
        _spec(),
        _untrained,
        _view(_untrained, answers={"a": DEAD}),
        (),
        [(A.CREATE_SLOT, 0), (A.CREATE_WORKER, 0), (A.CREATE_WORKER, 1)],
        "before training began",
    ),
    (
        "dead primary and dead holder: lost",
        _spec(),
        _running,
        _view(_running, answers={"a": DEAD, "b": DEAD}),
        (),
        [(A.FAIL, 0)],
        "shard 0 is lost",
    ),
    (
        "suspected primary, dead holder: wait",
        _spec(),
        _running,
        _view(_running, answers={"b": DEAD}, silent={"a": 11.0}),
        (),
        [],
        None,
    ),
    (
        "one shard: suspected primary, dead holder: only the holder is replaced",
        _spec(1),
        _running1,
        _view(_running1, k=1, answers={"b": DEAD}, silent={"a": 11.0}),
        (),
        [(A.REPLACE_HOLDER, 1)],
        "server b of slot 1 is dead",
    ),
    (
        "suspected primary whose held replica's primary is dead: wait",
        _spec(3),
        _running3,
        _view(_running3, k=3, answers={"c": DEAD}, silent={"a": 11.0}),
        (),
        [],
        None,
    ),
    (
        "recovery=none: a dead server fails the run",
        _spec(recovery="none"),
        _running,
        _view(_running, answers={"b": DEAD}),
        (),
        [(A.FAIL, 1)],
        "recovery=none keeps no copy of it; run with --recovery replica",
    ),
    (
        "recovery=none: a suspected server is waited for",
        _spec(recovery="none"),
        _running,
        _view(_running, silent={"b": 11.0}),
        (),
        [],
        None,
    ),
    (
        "replacements exhausted",
        _spec(),
        _replaced_max,
        _view(_replaced_max, answers={"a": DEAD}),
        (),
        [(A.FAIL, 0)],
        "max_server_replacements=100",
    ),
    (
        "recovery not in flight: issue it",
        _spec(),
        _recovering(),
        _view(_recovering()),
        (),
        [(A.RECOVER, 0)],
        "not in flight",
    ),
    (
        "recovery not in flight, the spare rebuilt at its epoch (the answer was lost): adopt",
        _spec(),
        _recovering(),
        _view(_recovering(), answers={"sp2": _desc("sp2", 0, 2)}),
        (),
        [(A.ADOPT_RECOVERY, 0)],
        "its answer was lost",
    ),
    (
        "the same after the holder died: adopt, the run does not fail",
        _spec(k=1),
        _recovering(k=1),
        _view(_recovering(k=1), k=1, answers={"b": DEAD, "sp2": _desc("sp2", 0, 2)}),
        (),
        [(A.ADOPT_RECOVERY, 0), (A.REPLACE_HOLDER, 1)],
        "its answer was lost",
    ),
    (
        "the spare rebuilt at an older epoch than the recovery's: issue it again",
        _spec(),
        _recovering(),
        _view(_recovering(), answers={"sp2": _desc("sp2", 0, 1)}),
        (),
        [(A.RECOVER, 0)],
        "not in flight",
    ),
    (
        "recovery in flight",
        _spec(),
        _recovering(),
        _view(_recovering()),
        (("recover", 0),),
        [],
        None,
    ),
    (
        "all workers done, a primary still being rebuilt: no finish (found by the simulator: with "
        "relaxed durability the last pushes were answered before the primary died)",
        _spec(1),
        _recovering(1, worker=WorkerPhase.DONE),
        _view(_recovering(1, worker=WorkerPhase.DONE), k=1),
        (("recover", 0),),
        [],
        None,
    ),
    (
        "holder died mid-recovery of a suspected primary: abandon",
        _spec(1),
        _recovering(1),
        _view(_recovering(1), k=1, answers={"b": DEAD}, silent={"a": 11.0}),
        (),  # no recovery in flight (the supervisor restarted): decided from the round
        [(A.REPLACE_HOLDER, 1), (A.ABANDON_RECOVERY, 0)],
        "only suspected",
    ),
    (
        "holder died mid-recovery of a dead primary: lost",
        _spec(1),
        _recovering(1),
        _view(_recovering(1), k=1, answers={"b": DEAD, "a": DEAD}),
        (),  # no recovery in flight (the supervisor restarted): decided from the round
        [(A.FAIL, 0)],
        "died before the shard was rebuilt",
    ),
    (
        "dead spare",
        _spec(),
        _running,
        _view(_running, answers={"sp": DEAD}),
        (),
        [(A.DROP_SPARE, "sp"), (A.CREATE_SPARE, None)],
        "spare sp is dead",
    ),
    (
        "dead worker: restart",
        _spec(),
        _running,
        _view(_running, answers={"w0": DEAD}),
        (),
        [(A.CREATE_WORKER, 0)],
        "worker 0 (w0) is dead",
    ),
    (
        "pre-aggregation: a dead rank re-creates its process's ranks",
        _spec(process_ranks=2),
        _running,
        _view(_running, answers={"w1": DEAD}),
        (),
        [(A.CREATE_WORKER, 0), (A.CREATE_WORKER, 1)],
        "worker 0's process is re-created",
    ),
    (
        # found by the simulator: a falsely suspected process of both ranks, re-created at once,
        # pushed on (a sync step needs no one else) past the step its new ranks were started at
        "pre-aggregation: a silent process is killed before its ranks are re-created",
        _spec(process_ranks=2),
        _running,
        _view(_running, silent={"w1": 11.0}),
        (),
        [(A.KILL_WORKER, 1)],
        "has not answered for 11.0s: its process is killed before its ranks are re-created",
    ),
    (
        "pre-aggregation: a finished rank is re-created with its process",
        _spec(process_ranks=2),
        _reg(tweak=lambda r: setattr(r.workers[0], "phase", WorkerPhase.DONE)),
        _view(_running, answers={"w0": Status(True, True), "w1": DEAD}),
        (),
        [(A.CREATE_WORKER, 0), (A.CREATE_WORKER, 1)],
        "process is re-created",
    ),
    (
        "pre-aggregation: finished ranks of a dead process stay finished",
        _spec(process_ranks=2),
        _done,
        _view(_done, answers={"w0": DEAD, "w1": DEAD}),
        (),
        [(A.FINISH, None)],
        None,
    ),
    (
        "dead worker at the restart limit",
        _spec(),
        _at_limit,
        _view(_at_limit, answers={"w1": DEAD}),
        (),
        [(A.FAIL, 1)],
        "max_worker_restarts=2",
    ),
    (
        "worker error",
        _spec(),
        _running,
        _view(_running, answers={"w0": Status(True, error="boom")}),
        (),
        [(A.FAIL, 0)],
        "worker 0 failed at step 0: boom",
    ),
    (
        "a worker could not start",
        _spec(),
        _workers_up,
        _view(_workers_up, answers={"w1": StartFailed("no GPU on this node")}),
        (),
        [(A.FAIL, "w1")],
        "no GPU on this node",
    ),
    (
        "a server could not start",
        _spec(),
        _creating,
        _view(_creating, answers={"sp": StartFailed("bad optimizer")}),
        (),
        [(A.FAIL, "sp")],
        "bad optimizer",
    ),
    (
        "worker finished",
        _spec(),
        _running,
        _view(_running, answers={"w0": Status(True, done=True)}),
        (),
        [(A.MARK_DONE, 0)],
        "worker 0 finished",
    ),
    (
        "all done and replicated: finish",
        _spec(),
        _done,
        _view(_done),
        (),
        [(A.FINISH, None)],
        "every worker finished",
    ),
    (
        "all done, a shard unreplicated: replicate, no finish",
        _spec(),
        _done_unreplicated,
        _view(_done_unreplicated),
        (),
        [(A.REPLICATE, 1)],
        "shard 1 has no replica",
    ),
    (
        "all done, replication in flight: no finish",
        _spec(),
        _done_unreplicated,
        _view(_done_unreplicated),
        (("replicate", 1),),
        [],
        None,
    ),
]


@pytest.mark.parametrize(
    "spec, reg, view, busy, expected, reason",
    [row[1:] for row in DECIDE],
    ids=[row[0] for row in DECIDE],
)
def test_decide(spec, reg, view, busy, expected, reason):
    before = reg.to_json()
    decisions = decide(reg, view, frozenset(busy), spec, now=0.0)
    assert [(d.action, d.target) for d in decisions] == expected
    if reason:
        assert any(reason in d.reason for d in decisions), [d.reason for d in decisions]
    assert reg.to_json() == before  # pure: the registry is not touched


def test_decide_does_nothing_once_the_run_is_over():
    for phase in (RunPhase.DONE, RunPhase.FAILED):
        reg = _reg(phase=phase)
        assert (
            decide(
                reg,
                _view(reg, answers={"a": DEAD, "b": DEAD, "w0": DEAD}),
                frozenset(),
                _spec(),
                0.0,
            )
            == []
        )


def test_registry_round_trips_through_json():
    reg = _recovering()
    reg.workers[1] = WorkerRecord("w9", WorkerPhase.STARTING, 2, 7)
    back = Registry.from_json(reg.to_json())
    assert (
        back == reg
        and back.slots[0].phase is SlotPhase.RECOVERING
        and back.workers[1].phase is WorkerPhase.STARTING
    )


# --- SupervisorProtocol on the bus
# ---------------------------------------------------------------------------

SUP = "sup"
KEY = "registry"
RANGES = shard_ranges(4, 1)
SUP_SPEC = SupervisorSpec(num_shards=1, num_workers=1, total_steps=3, num_spares=1)
SERVER_SPEC = ServerSpec(
    OptimConfig(name="sgd", lr=1.0, momentum=0.0), 3, 1, Rule("sync", 1), fold=False
)


def _initial(shard):
    return np.zeros(RANGES[shard].size, np.float32)


@dataclass
class FakeWorker:
    """Answers ``PollStatus``; takes one ``Start`` (a repeat is answered False, as the real worker
    does)."""

    done: bool = False
    starts: list = field(default_factory=list)

    def on_request(self, rid, msg):
        if isinstance(msg, PollStatus):
            return [Reply(rid, Status(bool(self.starts), self.done and bool(self.starts)))]
        if isinstance(msg, Start):
            self.starts.append(msg)
            return [Reply(rid, len(self.starts) == 1)]
        raise AssertionError(msg)


class Clocked:
    """The supervisor at a fixed clock, as a bus process. It dies after carrying out ``crash_after``
    effects (counted over all its handlers), or when ``crash_if(effect)`` says "before" or "after"
    that effect: the rest of the handler's effects are never carried out, and it answers nothing
    from then on."""

    def __init__(self, sup: SupervisorProtocol, crash_after: int | None = None, crash_if=None):
        self.sup, self.crash_after, self.crash_if = sup, crash_after, crash_if
        self.emitted, self.crashed = 0, False

    def _out(self, effects):
        if self.crashed:
            return []
        for i, e in enumerate(effects):
            when = (
                "before"
                if self.crash_after is not None and self.emitted + i >= self.crash_after
                else (self.crash_if(e) if self.crash_if else None)
            )
            if when:
                effects, self.crashed = effects[: i + (when == "after")], True
                break
        self.emitted += len(effects)
        return effects

    def on_start(self):
        return self._out(self.sup.on_start(0.0))

    def on_request(self, rid, msg):
        return self._out(self.sup.on_request(rid, msg, 0.0))

    def on_reply(self, cid, value):
        return self._out(self.sup.on_reply(cid, value, 0.0))

    def on_failure(self, cid, failure):
        return self._out(self.sup.on_failure(cid, failure, 0.0))

    def on_timer(self, token):
        return self._out(self.sup.on_timer(token, 0.0))


class Run:
    """A one-shard, one-worker run: real ``ServerProtocol``s, fake workers, the supervisor on the
    bus."""

    def __init__(self, crash_after: int | None = None, crash_if=None):
        self.workers: dict[str, FakeWorker] = {}
        self.bus = Bus(create=self._create)
        self.restarts = 0
        self._start(
            Clocked(SupervisorProtocol(SUP_SPEC, RANGES, _initial, key=KEY), crash_after, crash_if)
        )

    def _create(self, e: Create):
        if e.kind == "server":
            return ServerProtocol(e.name, SERVER_SPEC)
        return self.workers.setdefault(e.name, FakeWorker())

    def _start(self, sup: Clocked) -> None:
        self.sup = sup
        self.bus.add(SUP, sup)
        self.bus.perform(SUP, sup.on_start())

    def restore(self) -> None:
        """The supervisor process restarts from what it persisted."""
        self.restarts += 1
        self._start(
            Clocked(
                SupervisorProtocol.restore(
                    SUP_SPEC, RANGES, _initial, self.bus.kv[KEY], 0.0, key=KEY
                )
            )
        )

    @property
    def reg(self) -> Registry:
        return self.sup.sup.reg

    def round(self) -> None:
        self.bus.fire(SUP, "probe")
        if self.sup.crashed:
            self.restore()

    def until(self, cond, rounds=30) -> None:
        for _ in range(rounds):
            if cond():
                return
            self.round()
        assert cond(), self.reg

    def train(self, steps) -> np.ndarray:
        """The test plays the worker: pushes ``steps`` steps to the primary, returns its
        parameters."""
        primary = self.reg.slots[0].actor
        p = self.bus.procs[primary]
        for _ in range(steps):
            step = p.primary.state.seq
            assert isinstance(
                self.bus.ask(primary, Push(0, step, np.full(4, step + 1.0, np.float32))), PushReply
            )
        return p.params().copy()

    def sup_effects(self):
        return [effects for name, effects in self.bus.handled if name == SUP]

    def calls(self, kind):
        return [
            e
            for effects in self.sup_effects()
            for e in effects
            if isinstance(e, Call) and isinstance(e.msg, kind)
        ]


def _scenario(run: Run) -> tuple[np.ndarray, str]:
    """Start; train 2 steps; lose the primary; recover it from the replica; train 1 more step;
    finish."""
    run.until(
        lambda: (
            run.reg.phase is RunPhase.RUNNING
            and run.reg.slots[0].phase is SlotPhase.SERVING
            and run.reg.replicated[0]
        )
    )
    worker = run.workers[run.reg.workers[0].actor]
    before = run.train(2)
    lost = run.reg.slots[0].actor
    run.bus.kill(lost)
    run.until(
        lambda: run.reg.slots[0].actor != lost and run.reg.slots[0].phase is SlotPhase.SERVING
    )
    recovered = run.bus.procs[run.reg.slots[0].actor]
    np.testing.assert_array_equal(recovered.params(), before)
    run.train(1)
    worker.done = True
    run.until(lambda: run.reg.phase is RunPhase.DONE)
    return before, lost


def _check_write_ahead(effects: list) -> None:
    """Every act (create, kill, an operation's call) follows a Persist of a registry that already
    records it."""
    reg = None
    for e in effects:
        if isinstance(e, Persist):
            reg = Registry.from_json(e.value)
            continue
        probe = isinstance(e, Call) and isinstance(e.msg, (Describe, PollStatus))
        if not isinstance(e, (Create, Kill, Call)) or probe:
            continue
        assert reg is not None, f"{e} before any Persist in {effects}"
        slots = {s.actor: (j, s) for j, s in enumerate(reg.slots)}
        workers = {w.actor: w for w in reg.workers}
        if isinstance(e, Create):
            if e.kind == "worker":
                assert (
                    reg.workers[e.rank].actor == e.name
                    and reg.workers[e.rank].phase is WorkerPhase.CREATING
                )
            elif e.slot is not None:
                assert (
                    reg.slots[e.slot].actor == e.name
                    and reg.slots[e.slot].phase is SlotPhase.CREATING
                )
            else:
                assert e.name in reg.spares
        elif isinstance(e, Kill):
            assert e.name not in slots and e.name not in workers and e.name not in reg.spares, e
        elif isinstance(e.msg, Load):
            j, s = slots[e.dst]
            assert s.phase is SlotPhase.LOADING and s.epoch == e.msg.epoch == reg.reserved[j]
        elif isinstance(e.msg, RecoverPrimary):
            j, s = slots[e.dst]
            assert (
                s.phase is SlotPhase.RECOVERING
                and s.epoch == e.msg.epoch == reg.reserved[j]
                and slots[e.msg.holder][0] == replica_slot(j, 1)
            )
        elif isinstance(e.msg, SetReplica):
            assert e.msg.version == reg.replica_version and slots[e.msg.holder][0] == 1
        elif isinstance(e.msg, Start):
            w = workers[e.dst]
            assert w.phase is WorkerPhase.STARTING and w.start_step == e.msg.step
        elif isinstance(e.msg, Depose):
            assert e.dst not in slots and e.msg.epoch == reg.slots[e.msg.shard].epoch
        else:
            pytest.fail(f"unexpected call {e}")


def test_every_act_of_the_supervisor_is_persisted_first():
    run = Run()
    _scenario(run)
    kinds = {
        type(e.msg).__name__
        for effects in run.sup_effects()
        for e in effects
        if isinstance(e, Call)
    }
    assert kinds >= {
        "Load",
        "SetReplica",
        "Start",
        "RecoverPrimary",
        "Depose",
    }  # the scenario exercised them all
    assert any(isinstance(e, Kill) for effects in run.sup_effects() for e in effects)
    for effects in run.sup_effects():
        _check_write_ahead(effects)
    assert [a for a, _ in run.sup.sup.history].count("recover") == 1


def _count_effects() -> int:
    run = Run()
    _scenario(run)
    return sum(len(effects) for effects in run.sup_effects())


def test_a_supervisor_restarted_from_its_registry_at_any_point_finishes_the_run():
    total = _count_effects()
    assert total > 40
    for cut in range(1, total):
        run = Run(crash_after=cut)
        _scenario(run)
        where = f"supervisor crashed after effect {cut}"
        assert run.restarts == 1, where
        for effects in run.sup_effects():
            _check_write_ahead(effects)
        # epochs are never handed out twice, across both incarnations
        epochs = [c.msg.epoch for c in run.calls((Load, RecoverPrimary))]
        assert len(epochs) == len(set(epochs)) and epochs == sorted(epochs), (where, epochs)
        names = [e.name for effects in run.sup_effects() for e in effects if isinstance(e, Create)]
        assert len(names) == len(set(names)), (where, names)
        # one worker trained, started once
        started = [w for w in run.workers.values() if w.starts]
        assert len(started) == 1 and [s.step for s in started[0].starts] == [0], where
        # the shard went on from where the lost primary was
        primary = run.bus.procs[run.reg.slots[0].actor]
        assert (
            primary.primary.state.seq == 3
            and primary.primary.epoch == run.reg.slots[0].epoch == run.reg.reserved[0]
        ), where


def test_a_worker_recorded_creating_is_started_by_the_restored_supervisor():
    run = Run()
    run.until(lambda: run.reg.workers[0].phase is WorkerPhase.CREATING)
    saved = Registry.from_json(run.bus.kv[KEY])
    name = saved.workers[0].actor
    assert (
        saved.workers[0].phase is WorkerPhase.CREATING
        and name in run.workers
        and not run.workers[name].starts
    )
    run.bus.kill(SUP)  # the supervisor dies before it starts the worker
    run.restore()
    assert run.reg.workers[0].actor == name and run.reg.restarts == 1
    # PollStatus: up, not started; it is started once the servers (which start beside it) serve and
    # are replicated
    run.until(lambda: run.calls(Start), rounds=10)
    assert [(c.dst, c.msg.step) for c in run.calls(Start)] == [(name, 0)]
    assert len(run.workers[name].starts) == 1 and run.reg.workers[0].phase is WorkerPhase.STARTING
    run.round()
    assert run.reg.workers[0].phase is WorkerPhase.RUNNING and run.reg.workers[0].restarts == 0


def test_a_worker_never_created_is_created_again_by_the_restored_supervisor():
    # it dies right after persisting CREATE_WORKER, before the Create
    run = Run(crash_if=lambda e: "before" if isinstance(e, Create) and e.kind == "worker" else None)
    run.until(lambda: run.restarts == 1)
    saved = Registry.from_json(run.bus.kv[KEY])
    assert (
        saved.workers[0].phase is WorkerPhase.CREATING and saved.workers[0].actor not in run.workers
    )
    assert run.restarts == 1
    run.until(lambda: run.reg.workers[0].phase is WorkerPhase.RUNNING)
    assert run.reg.workers[0].actor != saved.workers[0].actor and run.reg.workers[0].restarts == 1
    assert len(run.workers) == 1 and len(run.workers[run.reg.workers[0].actor].starts) == 1


def _supervisor_dies_around_a_recovery(when: str, holder_dies: bool = False):
    """A primary dies; the supervisor dies ``when`` ("before" or "after") sending RecoverPrimary
    to the spare (after: the spare rebuilds, its answer is lost); with ``holder_dies`` the holder
    dies next, before the restored supervisor's first round. Returns (run, registry saved at the
    crash, params before, spare, holder)."""
    run = Run()
    run.until(lambda: run.reg.phase is RunPhase.RUNNING and run.reg.replicated[0])
    before = run.train(2)
    lost, spare, holder = run.reg.slots[0].actor, run.reg.spares[0], run.reg.slots[1].actor
    run.bus.kill(lost)
    run.sup.crash_if = lambda e: (
        when if isinstance(e, Call) and isinstance(e.msg, RecoverPrimary) else None
    )
    run.round()
    assert run.restarts == 1
    saved = Registry.from_json(run.bus.kv[KEY])
    slot = saved.slots[0]
    assert (slot.actor, slot.phase, slot.replacing) == (spare, SlotPhase.RECOVERING, lost)
    if holder_dies:
        run.bus.kill(holder)
    return run, saved, before, spare, holder


@pytest.mark.parametrize("holder_dies", [False, True], ids=["holder-lives", "holder-dies"])
def test_a_recovery_whose_answer_was_lost_is_adopted_at_its_epoch(holder_dies):
    """The spare rebuilt at the recovery's epoch and answered, but the supervisor died first: the
    restored supervisor learns from its probe that the spare is the shard's primary at that epoch
    and records it serving -- the answer it lost -- instead of issuing the recovery again (which
    would fail the run if the holder had died since: the spare has every acknowledged update)."""
    run, saved, before, spare, holder = _supervisor_dies_around_a_recovery("after", holder_dies)
    epoch = saved.slots[0].epoch
    assert [c.msg.epoch for c in run.calls(RecoverPrimary)] == [epoch] == [saved.reserved[0]]
    assert run.bus.procs[spare].primary.epoch == epoch
    run.until(lambda: run.reg.slots[0].phase is SlotPhase.SERVING)
    assert run.reg.phase is not RunPhase.FAILED, run.reg.failure
    assert [c.msg.epoch for c in run.calls(RecoverPrimary)] == [epoch]  # not issued again
    assert (run.reg.slots[0].actor, run.reg.slots[0].epoch) == (spare, epoch)
    np.testing.assert_array_equal(run.bus.procs[spare].params(), before)
    if not holder_dies:
        assert run.bus.procs[holder].replicas[0].fence == epoch


def test_a_recovery_never_delivered_is_issued_again_with_a_newer_epoch():
    """The supervisor died before its RecoverPrimary went out: the spare never rebuilt, so the
    restored supervisor issues the recovery again, with an epoch never used."""
    run, saved, before, spare, holder = _supervisor_dies_around_a_recovery("before")
    assert run.calls(RecoverPrimary) == []
    run.until(lambda: run.reg.slots[0].phase is SlotPhase.SERVING)
    (call,) = run.calls(RecoverPrimary)
    assert call.msg.epoch > saved.slots[0].epoch and run.reg.slots[0].epoch == call.msg.epoch
    assert run.bus.procs[holder].replicas[0].fence == call.msg.epoch
    np.testing.assert_array_equal(run.bus.procs[spare].params(), before)


def test_auto_snapshot_interval_with_folded_logs_is_the_longest():
    from raytrain_ft.recovery.policy import SnapshotPolicy

    policy = SnapshotPolicy(fold=True, expected_mtbf_s=60.0, failovers=3)
    policy.observe_update(apply_s=0.01, gap_s=0.02, command_bytes=1000)
    policy.observe_snapshot(build_s=1.0, nbytes=0, seconds_per_byte=0.0)
    assert policy.interval() == policy.hi  # a recovery replays nothing: snapshots only cost


def test_auto_snapshot_interval_follows_youngs_rule_on_what_it_measured():
    from raytrain_ft.recovery.policy import SnapshotPolicy, snapshot_interval_for

    policy = SnapshotPolicy(fold=False, expected_mtbf_s=100.0, initial=50)
    assert policy.interval() == 50  # nothing measured yet
    for _ in range(30):
        policy.observe_update(apply_s=0.002, gap_s=0.02, command_bytes=4000)
    policy.observe_snapshot(build_s=0.01, nbytes=10_000, seconds_per_byte=1e-6)
    # snapshot 0.01 + 0.01 s; replay 0.002 + 0.004 s per command (apply + move 4000 bytes);
    # 0.02 s / 100 s = 2e-4 failures per update
    assert policy.failures_per_update() == pytest.approx(2e-4)
    assert policy.replay_s() == pytest.approx(0.006)
    assert policy.interval() == snapshot_interval_for(0.02, 0.006, 2e-4) == 183
    # failovers seen in the run raise the rate above the planned one: a shorter interval
    seen = SnapshotPolicy(fold=False, expected_mtbf_s=100.0, failovers=3)
    for _ in range(30):
        seen.observe_update(apply_s=0.002, gap_s=0.02, command_bytes=4000)
    seen.observe_snapshot(build_s=0.01, nbytes=10_000, seconds_per_byte=1e-6)
    assert seen.failures_per_update() == pytest.approx(0.1)
    assert seen.interval() == snapshot_interval_for(0.02, 0.006, 0.1) == 8


def test_auto_snapshot_interval_keeps_the_unfolded_log_within_its_budget():
    from raytrain_ft.recovery.policy import LOG_BUDGET_BYTES, SnapshotPolicy

    policy = SnapshotPolicy(fold=False, expected_mtbf_s=1e9)  # failures all but never happen
    policy.observe_update(apply_s=0.001, gap_s=0.01, command_bytes=LOG_BUDGET_BYTES // 40)
    policy.observe_snapshot(build_s=1.0, nbytes=0, seconds_per_byte=0.0)
    assert policy.interval() == 40


@pytest.mark.parametrize("text, k", [("strict", 0), ("relaxed:1", 1), ("relaxed:16", 16)])
def test_durability_parses_to_the_updates_allowed_unlogged(text, k):
    from raytrain_ft.recovery.policy import unlogged_allowed

    assert unlogged_allowed(text) == k


@pytest.mark.parametrize("text", ["relaxed", "relaxed:0", "relaxed:-1", "relaxed:x", "loose", ""])
def test_bad_durability_is_refused(text):
    from raytrain_ft.recovery.policy import unlogged_allowed

    with pytest.raises(ValueError, match="auto, strict, pipelined or relaxed:K"):
        unlogged_allowed(text)


def test_pre_aggregating_ranks_are_created_in_one_process_and_started_at_one_step():
    """The first rank of a process names it for the others; a rank started after a shard logged
    more updates gets the step its process's first started rank was given (else they would wait
    on each other), and a Start sent again repeats its step."""
    from raytrain_ft.protocol.messages import Create
    from raytrain_ft.protocol.supervisor import Decision

    spec = SupervisorSpec(
        num_shards=1, num_workers=3, total_steps=10, process_ranks=2, max_worker_restarts=5
    )
    reg = Registry.new(1, 3)
    reg.slots[0] = SlotRecord("a", SlotPhase.SERVING, 1)
    sup = SupervisorProtocol(spec, RANGES[:1], _initial, registry=reg)
    creates = [
        e
        for r in range(3)
        for e in sup._carry_out(Decision(A.CREATE_WORKER, r, "test"), 0.0)
        if isinstance(e, Create)
    ]
    names = [c.name for c in creates]
    assert [c.host for c in creates] == [names[0], names[0], names[2]]

    def described(clock):
        return View(
            {"a": ServerDescription("a", 0, 1, 0, 0, (clock,) * 3, (), False, None)}, {}, {}
        )

    def start(rank):
        (call,) = [
            e
            for e in sup._carry_out(Decision(A.START_WORKER, rank, "test"), 0.0)
            if hasattr(e, "msg") and isinstance(e.msg, Start)
        ]
        return call.msg.step

    sup.view = described(3)
    assert start(0) == 3
    sup.view = described(4)  # an update logged since
    assert start(1) == 3  # its process's step
    assert start(0) == 3  # sent again: the same step
    assert start(2) == 4  # a process of its own


def test_a_restarted_rank_done_at_once_closes_its_recovery():
    """A rank restarted at its last step is done without ever training: its recovery event is
    over then too (an open one would hold back the recoveries logged after it)."""
    from raytrain_ft.protocol.supervisor import Decision, RecoveryEvent

    reg = _reg(worker=WorkerPhase.STARTING)
    reg.workers[0].start_step = 10
    reg.events.append(RecoveryEvent("worker", 0, "restart", detected_at=1.0, actor="w0-old"))
    sup = SupervisorProtocol(_spec(), RANGES[:1], _initial, registry=reg)
    sup._carry_out(Decision(A.MARK_DONE, 0, "worker 0 finished"), 2.0)
    assert reg.workers[0].phase is WorkerPhase.DONE
    assert (reg.events[0].serving_at, reg.events[0].step) == (2.0, 10)


def _retiring_holder(targets=((0, "b"),)):
    """k=1: primary "a"; holder slot 1 moved from "b" (suspected, retiring) to "c", which lacks the
    replica."""

    def tweak(reg):
        reg.slots[1].actor, reg.slots[1].retiring = "c", ["b"]
        reg.replicated = [False]
        reg.replica_targets = [list(t) for t in targets]

    return _reg(k=1, tweak=tweak)


@pytest.mark.parametrize(
    "targets, answers, silent, expected, source",
    [
        # the primary died: rebuilt from the retiring holder, the last one sent the replica
        (((0, "b"),), {"a": DEAD, "b": _desc("b", None, 0)}, {}, A.RECOVER, "b"),
        # the primary only suspected: waited for (a retiring copy does not replace a suspect)
        (((0, "b"),), {"b": _desc("b", None, 0)}, {"a": 11.0}, None, None),
        # the retiring holder is itself silent: waited for, not given up
        (((0, "b"),), {"a": DEAD}, {"b": 11.0}, None, None),
        # the retiring holder is dead too: both copies are gone
        (((0, "b"),), {"a": DEAD, "b": DEAD}, {}, A.FAIL, None),
        # a replicate went to "c" since: "c" may have logged acknowledged updates "b" lacks, so
        # the rebuild asks "c" first (``test_a_holder_that_never_got_the_replica_...``: then "b")
        (((0, "b"), (0, "c")), {"a": DEAD, "b": _desc("b", None, 0)}, {}, A.RECOVER, "c"),
        # ... and with "c" dead, nobody can tell whether "b" has every acknowledged update
        (((0, "b"), (0, "c")), {"a": DEAD, "c": DEAD, "b": _desc("b", None, 0)}, {}, A.FAIL, None),
    ],
    ids=[
        "primary-dead",
        "primary-suspected",
        "holder-silent",
        "both-dead",
        "newer-target",
        "newer-target-dead",
    ],
)
def test_a_retiring_holder_is_rebuilt_from_only_when_it_has_the_newest_copy(
    targets, answers, silent, expected, source
):
    reg = _retiring_holder(targets)
    view = _view(reg, k=1, answers=answers, silent=silent)
    decisions = decide(reg, view, frozenset(), _spec(k=1), now=0.0)
    about_slot0 = [d.action for d in decisions if d.target == 0 and d.action in (A.RECOVER, A.FAIL)]
    assert about_slot0 == ([expected] if expected else []), decisions
    if expected is A.RECOVER:
        sup = SupervisorProtocol(_spec(k=1), shard_ranges(8, 1), lambda s: None, reg)
        sup.view = view
        assert ("b", "server") in sup._known()  # a retiring server is probed like the others
        calls = [e for e in sup._carry_out(decisions[0], 0.0) if isinstance(e, Call)]
        assert [c.msg.holder for c in calls if isinstance(c.msg, RecoverPrimary)] == [source]


def _recover_refused(kind, targets=((0, "b"), (0, "c")), answers=None):
    """k=1, primary "a" dead, holder slot 1 moved from "b" (retiring) to "c"; the rebuild asked
    "c", which answers ``kind``. Returns (supervisor, effects of the refusal)."""
    reg = _retiring_holder(targets)
    sup = SupervisorProtocol(_spec(k=1), shard_ranges(8, 1), lambda s: None, reg)
    sup.view = _view(reg, k=1, answers={"a": DEAD, "b": _desc("b", None, 0), **(answers or {})})
    (d,) = [d for d in decide(reg, sup.view, frozenset(), _spec(k=1), 0.0) if d.target == 0]
    (call,) = [
        e
        for e in sup._carry_out(d, 0.0)
        if isinstance(e, Call) and isinstance(e.msg, RecoverPrimary)
    ]
    assert call.msg.holder == "c"
    return sup, sup.on_reply(call.cid, Refused(kind, "c holds no replica of shard 0"), 0.1)


def test_a_holder_that_never_got_the_replica_sends_the_rebuild_to_the_one_before_it():
    """Make before break while a replicate toward a new holder is unconfirmed: the new holder
    refuses (it never got it, and fences the older epochs), so the holder named before it -- kept
    retiring, with every acknowledged update -- becomes the source, persisted before the retry."""
    sup, effects = _recover_refused(RefusalKind.NO_REPLICA)
    assert sup.reg.phase is not RunPhase.FAILED
    persisted = Registry.from_json(next(e for e in effects if isinstance(e, Persist)).value)
    assert last_replica_target(persisted, 0) == "b"
    (d,) = [d for d in decide(sup.reg, sup.view, frozenset(), _spec(k=1), 0.2) if d.target == 0]
    assert d.action is A.RECOVER  # the recovery is not in flight: issued again
    calls = [e for e in sup._carry_out(d, 0.2) if isinstance(e, Call)]
    assert [c.msg.holder for c in calls if isinstance(c.msg, RecoverPrimary)] == ["b"]
    assert calls[0].msg.epoch > 2  # a new epoch, newer than the one "c" fenced


def test_a_rebuild_walks_back_through_every_holder_that_never_got_the_replica():
    """Holder slot 1 moved from "w" to "x" before the replicate toward "x" landed, then from "x"
    to "y" (both kept retiring); primary "a" dies with the replicate toward "y" on its way. "y"
    and "x" each refuse (never got it) and are forgotten, so the rebuild reaches "w", which has
    every acknowledged update -- one step back per refusal, never around in a loop; a refusal
    from "w" too leaves no earlier holder and the run fails."""

    def tweak(reg):
        reg.slots[1].actor, reg.slots[1].retiring = "y", ["w", "x"]
        reg.replicated = [False]
        reg.replica_targets = [[0, "w"], [0, "x"], [0, "y"]]

    reg = _reg(k=1, tweak=tweak)
    sup = SupervisorProtocol(_spec(k=1), shard_ranges(8, 1), lambda s: None, reg)
    alive = {n: _desc(n, None, 0) for n in ("w", "x", "y")}
    sup.view = _view(reg, k=1, answers={"a": DEAD, **alive})
    asked = []
    for _ in range(3):
        (d,) = [d for d in decide(reg, sup.view, frozenset(), _spec(k=1), 0.0) if d.target == 0]
        assert d.action is A.RECOVER, d
        (call,) = [
            e
            for e in sup._carry_out(d, 0.0)
            if isinstance(e, Call) and isinstance(e.msg, RecoverPrimary)
        ]
        asked.append(call.msg.holder)
        sup.on_reply(call.cid, Refused(RefusalKind.NO_REPLICA, "holds no replica"), 0.1)
        if reg.phase is RunPhase.FAILED:
            break
    assert asked == ["y", "x", "w"]
    assert reg.phase is RunPhase.FAILED and "shard 0 is lost" in reg.failure


def test_a_refused_rebuild_does_not_put_a_deposed_primary_back():
    """A recovery of a primary that was deposed (it answers probes but serves no more) and is
    refused by the last holder turns to the earlier one; abandoning it would put a primary that
    no longer serves back in its slot."""

    def tweak(reg):
        reg.slots[0] = SlotRecord("sp2", SlotPhase.RECOVERING, 2, replacing="a", replacing_epoch=1)
        reg.reserved[0] = 2
        reg.slots[1].actor, reg.slots[1].retiring = "c", ["b"]
        reg.replicated = [False]
        reg.replica_targets = [[0, "b"], [0, "c"]]

    reg = _reg(k=1, tweak=tweak)
    sup = SupervisorProtocol(_spec(k=1), shard_ranges(8, 1), lambda s: None, reg)
    sup.view = _view(
        reg, k=1, answers={"a": _desc("a", 0, 1, deposed=True), "b": _desc("b", None, 0)}
    )
    (d,) = [d for d in decide(reg, sup.view, frozenset(), _spec(k=1), 0.0) if d.target == 0]
    (call,) = [
        e
        for e in sup._carry_out(d, 0.0)
        if isinstance(e, Call) and isinstance(e.msg, RecoverPrimary)
    ]
    assert call.msg.holder == "c"
    sup.on_reply(call.cid, Refused(RefusalKind.NO_REPLICA, "c holds no replica"), 0.1)
    assert reg.slots[0].phase is SlotPhase.RECOVERING and reg.slots[0].actor == "sp2"
    assert last_replica_target(reg, 0) == "b"


def _rebuilding_from_c(confirmed: bool):
    """k=1: slot 0 is being rebuilt on "sp2" at epoch 2, replacing "a" (``confirmed``: "a" was
    found dead or deposed when it began); holder slot 1 moved from "b" (retiring) to "c", which
    has not confirmed shard 0's replica."""

    def tweak(r):
        r.slots[0] = SlotRecord(
            "sp2",
            SlotPhase.RECOVERING,
            2,
            replacing="a",
            replacing_epoch=1,
            replacing_confirmed=confirmed,
        )
        r.reserved[0] = 2
        r.slots[1].actor, r.slots[1].retiring = "c", ["b"]
        r.replicated = [False]
        r.replica_targets = [[0, "b"], [0, "c"]]

    return _reg(k=1, tweak=tweak)


def test_the_primary_a_recovery_replaces_is_probed():
    """Whether it lives or was deposed decides an abandon: a round asks it like the others."""
    sup = SupervisorProtocol(
        _spec(k=1), shard_ranges(8, 1), lambda s: None, _rebuilding_from_c(False)
    )
    assert ("a", "server") in sup._known()


def test_a_rebuild_begun_for_a_dead_primary_is_never_abandoned_to_it():
    """After a supervisor restart nothing has probed "a" yet (it looks alive); its recovery began
    because it was dead, so a refusal turns to the earlier holder instead of putting "a" back."""
    reg = _rebuilding_from_c(True)
    sup = SupervisorProtocol(_spec(k=1), shard_ranges(8, 1), lambda s: None, reg)
    sup.view = _view(reg, k=1, answers={"a": _desc("a", 0, 1), "b": _desc("b", None, 0)})
    (d,) = [d for d in decide(reg, sup.view, frozenset(), _spec(k=1), 0.0) if d.target == 0]
    assert d.action is A.RECOVER
    (call,) = [
        e
        for e in sup._carry_out(d, 0.0)
        if isinstance(e, Call) and isinstance(e.msg, RecoverPrimary)
    ]
    sup.on_reply(call.cid, Refused(RefusalKind.NO_REPLICA, "c holds no replica"), 0.1)
    assert reg.slots[0].actor == "sp2" and reg.slots[0].phase is SlotPhase.RECOVERING
    assert last_replica_target(reg, 0) == "b"


def test_a_recovery_in_flight_is_not_abandoned_or_failed_before_it_answers():
    """The holder died while the spare replays: the recovery's own answer (rebuilt, or holder
    lost) decides, not a probe round that saw the holder dead first."""
    reg = _rebuilding_from_c(False)
    reg.replica_targets = [[0, "c"]]
    view = _view(reg, k=1, answers={"c": DEAD, "a": _desc("a", 0, 1)})
    busy = frozenset({("recover", 0)})
    about_0 = [d for d in decide(reg, view, busy, _spec(k=1), 0.0) if d.target == 0]
    assert about_0 == []
    about_0 = [d.action for d in decide(reg, view, frozenset(), _spec(k=1), 0.0) if d.target == 0]
    assert about_0 == [A.ABANDON_RECOVERY]  # no answer coming: "a", only suspected, serves on


@pytest.mark.parametrize(
    "spare",
    [None, "recovering", "rebuilt-before"],
    ids=["spare-undescribed", "spare-recovering", "spare-rebuilt-at-an-older-epoch"],
)
def test_a_recovery_is_neither_abandoned_nor_failed_while_its_spare_may_hold_the_shard(spare):
    """The holder is dead, but the spare was not heard from yet (a restarted supervisor's first
    round), is still recovering, or is the shard's primary at an older epoch of the recovery (its
    answer lost): it may have every acknowledged update, so nothing is given up; in the last case
    the recovery is issued again (the spare serves on at the new epoch)."""
    reg = _rebuilding_from_c(False)
    reg.replica_targets = [[0, "c"]]
    reg.slots[1].retiring = []
    answers = {"c": DEAD, "a": _desc("a", 0, 1)}
    if spare == "recovering":
        answers["sp2"] = dataclasses.replace(_desc("sp2", None, 0), recovering=True)
    elif spare == "rebuilt-before":
        answers["sp2"] = _desc("sp2", 0, 1)
    view = _view(reg, k=1, answers=answers)
    if spare is None:
        view.answers.pop("sp2")
        view = dataclasses.replace(view, answered=view.answered - {"sp2"})
    about_0 = [d.action for d in decide(reg, view, frozenset(), _spec(k=1), 0.0) if d.target == 0]
    assert about_0 == [A.RECOVER]


@pytest.mark.parametrize(
    "fenced_at, abandoned", [(2, True), (None, False)], ids=["by-this-fence", "by-a-successor"]
)
def test_a_primary_deposed_only_by_this_recoverys_fence_is_reinstated_when_the_holder_is_lost(
    fenced_at, abandoned
):
    """ "a", only suspected, was fenced out of its holder by the spare's export at epoch 2 and
    stepped down; the holder then dies before the spare has the replica (the export's answer lost
    with its node). "a" has every update it acknowledged -- the only copy -- so the recovery is
    abandoned and "a" reinstated, the fence undone; deposed by a successor instead, it is not."""
    reg = _rebuilding_from_c(False)
    reg.replica_targets = [[0, "c"]]
    reg.slots[1].retiring = []
    deposed = dataclasses.replace(_desc("a", 0, 1, deposed=True), fenced_at=fenced_at)
    view = _view(reg, k=1, answers={"c": DEAD, "a": deposed})
    decided = [d.action for d in decide(reg, view, frozenset(), _spec(k=1), 0.0) if d.target == 0]
    assert decided == ([A.ABANDON_RECOVERY] if abandoned else [A.FAIL])
    if abandoned:
        sup = SupervisorProtocol(_spec(k=1), shard_ranges(8, 1), lambda s: None, reg)
        sup.view = view
        (d,) = [d for d in decide(reg, view, frozenset(), _spec(k=1), 0.0) if d.target == 0]
        calls = [e for e in sup._carry_out(d, 0.0) if isinstance(e, Call)]
        assert [(c.dst, c.msg) for c in calls] == [("a", Reinstate(0, 3, 2))]


@pytest.mark.parametrize("overtaken", [False, True], ids=["answered-first", "answer-overtaken"])
def test_a_description_given_before_an_operation_changed_its_server_is_asked_again(overtaken):
    """The round in flight heard "a" deposed (fenced by the abandoned recovery's export); then the
    Reinstate's answer put "a" back at a new epoch (or: that answer overtook the description).
    Decided on that description, the round would find shard 0's primary deposed and its holder
    dead, and fail the run (found by the simulator: the holder's node lost while its export's
    answer travelled). The round asks "a" again and decides on what it says now."""
    reg = _rebuilding_from_c(False)
    reg.replica_targets = [[0, "c"]]
    reg.slots[1].retiring = []
    sup = SupervisorProtocol(_spec(k=1), shard_ranges(8, 1), lambda s: None, reg)
    deposed = dataclasses.replace(_desc("a", 0, 1, deposed=True), fenced_at=2)
    seen = _view(reg, k=1, answers={"c": DEAD, "a": deposed}).answers
    sup._answered.update(n for n, a in seen.items() if a is not DEAD)  # heard in earlier rounds

    def round_of(now):
        return {c.dst: c for c in sup._start_round(now) if isinstance(c, Call)}

    effects = []
    for name, call in round_of(0.0).items():  # this round abandons the recovery to "a"
        effects += sup.on_reply(call.cid, seen.get(name, Failure.UNAVAILABLE), 0.01)
    (reinstate,) = [e for e in effects if isinstance(e, Call) and isinstance(e.msg, Reinstate)]
    probes = round_of(0.1)
    if overtaken:
        assert not [
            e for e in sup.on_reply(reinstate.cid, Recovered(5, 0, 0), 0.11) if isinstance(e, Call)
        ]
        again = sup.on_reply(probes.pop("a").cid, deposed, 0.12)  # described before the Reinstate
    else:
        sup.on_reply(probes.pop("a").cid, deposed, 0.11)  # described before it was reinstated
        again = sup.on_reply(reinstate.cid, Recovered(5, 0, 0), 0.12)
    again = [e for e in again if isinstance(e, Call)]
    slot = reg.slots[0]
    assert (slot.actor, slot.phase, slot.epoch) == ("a", SlotPhase.SERVING, 3)
    for name, call in probes.items():
        sup.on_reply(call.cid, seen.get(name, Failure.UNAVAILABLE), 0.13)
    assert reg.phase is not RunPhase.FAILED, reg.failure  # the stale description decided nothing
    assert [(c.dst, c.msg) for c in again] == [("a", Describe())]
    assert sup._round is not None, "the round waits for the new description of a"
    sup.on_reply(again[0].cid, _desc("a", 0, 3), 0.14)
    assert reg.phase is not RunPhase.FAILED, reg.failure
    assert sup._round is None and sup.view.describe("a").epoch == 3


def test_a_stale_probe_answer_of_a_process_no_longer_known_does_not_hold_the_round_open():
    """The spare's probe was outstanding when its recovery's answer (holder lost) came: the
    recovery was abandoned and the spare killed. Its description, when it comes, is not asked
    again (nobody probes it any more) and the round ends then, not at the probe timeout."""
    reg = _recovering(k=2)
    sup = SupervisorProtocol(_spec(k=2), shard_ranges(8, 2), lambda s: None, reg)
    sup.view = _view(reg, answers={"a": _desc("a", 0, 1)})
    sup._answered.update(n for n, _ in sup._known())  # heard in earlier rounds
    (recover,) = [
        e
        for e in sup._op("recover", 0, "sp2", RecoverPrimary(sup.ranges[0], 2, "b"), "sp2", 2, "b")
        if isinstance(e, Call)
    ]
    probes = {c.dst: c for c in sup._start_round(1.0) if isinstance(c, Call)}
    for name, call in probes.items():
        if name != "sp2":
            sup.on_reply(call.cid, sup.view.answers[name], 1.01)
    sup.on_reply(recover.cid, Refused(RefusalKind.HOLDER_LOST, "holder b died"), 1.02)
    assert "sp2" not in dict(sup._known()) and reg.slots[0].reinstating
    sup.on_reply(probes["sp2"].cid, _desc("sp2", None, 0), 1.03)
    assert sup._round is None, "the round ended with the last answer it waits for"


def test_a_restarted_supervisor_kills_a_silent_process_before_re_creating_its_ranks():
    """Only an earlier incarnation heard the process's ranks; silent past the start timeout since
    the restart, they are not found dead: the process is killed first all the same (re-created at
    once, it could push on past its new ranks' start step)."""
    spec = _spec(process_ranks=2)
    reg = _reg()
    heard = _view(reg, silent={"w0": 11.0, "w1": 11.0})
    restarted = View(
        heard.answers,
        heard.silent_s,
        {n: spec.start_timeout_s for n in heard.answers},
        heard.answered - {"w0", "w1"},
        heard.gone,
    )
    for view in (heard, restarted):
        decided = [(d.action, d.target) for d in decide(reg, view, frozenset(), spec, 0.0)]
        assert decided == [(A.KILL_WORKER, 0), (A.KILL_WORKER, 1)], decided
    found_dead = _view(reg, answers={"w0": DEAD, "w1": DEAD})
    decided = [(d.action, d.target) for d in decide(reg, found_dead, frozenset(), spec, 0.0)]
    assert decided == [(A.CREATE_WORKER, 0), (A.CREATE_WORKER, 1)]


def test_a_new_spare_goes_to_a_node_without_the_runs_servers():
    """The slots' servers run on n0 and n1: a spare there could be rebuilt into a primary beside
    its shard's replica holder (one node's loss would take both), so it goes to n2."""
    from raytrain_ft.protocol.supervisor import Decision

    spec = _spec(k=2, node_ids=("n0", "n1", "n2"))
    reg = _reg(spares=())
    sup = SupervisorProtocol(spec, shard_ranges(8, 2), lambda s: None, reg)
    seen = _view(reg)
    on = {"a": "n0", "b": "n1"}
    sup.view = _view(reg, answers={n: dataclasses.replace(seen.answers[n], node=on[n]) for n in on})
    for _ in range(2):  # whatever the turn
        effects = sup._carry_out(Decision(A.CREATE_SPARE, None, "t"), 0.0)
        (create,) = [e for e in effects if isinstance(e, Create)]
        assert create.node == "n2", create
        reg.spares.remove(create.name)


def test_a_silent_spare_is_not_given_up_while_it_may_hold_the_rebuilt_shard():
    """ "a" is dead, the holder "c" too; the spare "sp2" has gone silent (not found dead): it may
    have finished the rebuild -- the only copy left -- so the run waits instead of failing."""
    reg = _rebuilding_from_c(True)
    reg.replica_targets = [[0, "c"]]
    reg.slots[1].retiring = []
    view = _view(reg, k=1, answers={"c": DEAD, "a": DEAD}, silent={"sp2": 11.0})
    assert view.condition("sp2", _spec(k=1)) == "suspect"
    decided = [d.action for d in decide(reg, view, frozenset(), _spec(k=1), 0.0)]
    assert A.FAIL not in decided and A.ABANDON_RECOVERY not in decided, decided
    gone = _view(reg, k=1, answers={"c": DEAD, "a": DEAD, "sp2": DEAD})
    assert [d.action for d in decide(reg, gone, frozenset(), _spec(k=1), 0.0)] == [A.FAIL]


def test_a_replaced_primary_not_heard_from_since_a_restart_is_not_abandoned_to():
    """After a restart nothing has probed "a" yet; the holder is dead and the spare holds nothing:
    whether "a" may serve on is unknown, so the supervisor waits for a round that hears it."""
    reg = _rebuilding_from_c(False)
    reg.replica_targets = [[0, "c"]]
    reg.slots[1].retiring = []
    view = _view(reg, k=1, answers={"c": DEAD})
    assert "a" not in view.answered
    assert [d for d in decide(reg, view, frozenset(), _spec(k=1), 0.0) if d.target == 0] == []


def test_a_holder_lost_while_the_replaced_primary_is_still_silent_abandons_not_fails():
    """ "a" was only suspected (silent, alive) when its rebuild on "sp2" began; the holder "c" dies
    before "sp2" has the replica. "a" still has every acknowledged update of shard 0 -- the only
    copy left -- so the recovery is abandoned and "a" serves on; the run does not fail because
    "a" has not answered again yet."""
    reg = _rebuilding_from_c(False)
    reg.replica_targets = [[0, "c"]]
    reg.slots[1].retiring = []
    sup = SupervisorProtocol(_spec(k=1), shard_ranges(8, 1), lambda s: None, reg)
    sup.view = _view(reg, k=1, silent={"a": 11.0})
    assert sup.view.condition("a", _spec(k=1)) == "suspect"
    (d,) = [d for d in decide(reg, sup.view, frozenset(), _spec(k=1), 0.0) if d.target == 0]
    (call,) = [
        e
        for e in sup._carry_out(d, 0.0)
        if isinstance(e, Call) and isinstance(e.msg, RecoverPrimary)
    ]
    spare_epoch = call.msg.epoch
    sup.on_reply(call.cid, Refused(RefusalKind.HOLDER_LOST, "holder c of shard 0: dead"), 0.1)
    assert reg.phase is not RunPhase.FAILED, reg.failure
    assert (reg.slots[0].actor, reg.slots[0].reinstating) == ("a", True)
    # "a" answers again: it is told to serve on at an epoch newer than the abandoned spare's (a
    # worker sent to the spare follows routes only forward in epochs)
    sup.view = _view(reg, k=1, answers={"a": _desc("a", 0, 1), "c": DEAD})
    (d,) = [d for d in decide(reg, sup.view, frozenset(), _spec(k=1), 0.2) if d.target == 0]
    (call,) = [e for e in sup._carry_out(d, 0.2) if isinstance(e, Call)]
    assert (call.dst, call.msg) == ("a", Reinstate(0, spare_epoch + 1, spare_epoch))
    sup.on_reply(call.cid, Recovered(5, 0, 0), 0.3)
    slot = reg.slots[0]
    assert (slot.actor, slot.phase, slot.epoch) == ("a", SlotPhase.SERVING, spare_epoch + 1)
    assert not reg.slots[0].reinstating and reg.phase is not RunPhase.FAILED


@pytest.mark.parametrize(
    "kind, targets, answers",
    [
        # the holder died: it may have logged acknowledged updates the earlier one lacks
        (RefusalKind.HOLDER_LOST, ((0, "b"), (0, "c")), None),
        # no earlier holder retiring: nothing else can have the shard
        (RefusalKind.NO_REPLICA, ((0, "c"),), None),
        # the earlier holder is dead too
        (RefusalKind.NO_REPLICA, ((0, "b"), (0, "c")), {"b": DEAD}),
    ],
    ids=["holder-dead", "no-earlier", "earlier-dead"],
)
def test_a_refused_rebuild_fails_the_run_when_no_earlier_holder_can_have_the_shard(
    kind, targets, answers
):
    sup, effects = _recover_refused(kind, targets, answers)
    assert sup.reg.phase is RunPhase.FAILED and "shard 0 is lost" in sup.reg.failure


def test_a_shard_held_by_a_server_being_replaced_is_rebuilt_from_it():
    """k=2: slot 1 (primary of shard 1, holder of shard 0's replica) is being rebuilt on "sp2"
    replacing "b", only suspected; shard 0's primary then dies. "b" has shard 0's newest copy (it
    was the last holder named): the rebuild waits while "b" is silent and uses it once it answers,
    instead of declaring shard 0 lost."""

    def tweak(r):
        r.slots[1] = SlotRecord("sp2", SlotPhase.RECOVERING, 2, replacing="b", replacing_epoch=1)
        r.reserved[1] = 2
        r.replicated[0] = False
        r.replica_targets = [[0, "b"], [1, "c"]]

    reg = _reg(k=2, tweak=tweak)
    spec = _spec(k=2)
    busy = frozenset({("recover", 1)})
    silent_b = _view(reg, k=2, answers={"a": DEAD}, silent={"b": 11.0})
    assert [d for d in decide(reg, silent_b, busy, spec, 0.0) if d.target == 0] == []
    back = _view(reg, k=2, answers={"a": DEAD, "b": _desc("b", 1, 1)})
    (d,) = [d for d in decide(reg, back, busy, spec, 0.0) if d.target == 0]
    assert d.action is A.RECOVER
    sup = SupervisorProtocol(spec, shard_ranges(8, 2), lambda s: None, reg)
    sup.view = back
    calls = [e for e in sup._carry_out(d, 0.0) if isinstance(e, Call)]
    assert [c.msg.holder for c in calls if isinstance(c.msg, RecoverPrimary)] == ["b"]
    dead_b = _view(reg, k=2, answers={"a": DEAD, "b": DEAD})
    assert [d.action for d in decide(reg, dead_b, busy, spec, 0.0) if d.target == 0] == [A.FAIL]


def test_a_retiring_server_is_in_the_registry_written_before_any_effect():
    """Write-ahead: the registry persisted with a holder replacement already names the replaced
    server as retiring, so a supervisor restarted right after still keeps it."""

    def tweak(reg):
        reg.replica_targets = [[0, "b"]]

    reg = _reg(k=1, tweak=tweak)
    sup = SupervisorProtocol(_spec(k=1), shard_ranges(8, 1), lambda s: None, reg)
    sup.view = _view(reg, k=1, silent={"b": 11.0})  # "b" suspected, not known dead
    # as an entry point carries it out: the registry written once, before every effect
    effects = sup._write_ahead(sup._replace_holder(1, "server b of slot 1 has not answered", 0.0))
    persisted = Registry.from_json(next(e for e in effects if isinstance(e, Persist)).value)
    assert persisted.slots[1].actor == "sp" and persisted.slots[1].retiring == ["b"]
    assert not [e for e in effects if isinstance(e, Kill)]  # kept, not killed


@pytest.mark.parametrize(
    "answers, target, failed_starting",
    [
        ({"w1": StartFailed("no GPU on this node")}, "w1", True),  # a constructor raised
        ({"w0": Status(True, error="model.loss: ... raised IndexError")}, 0, False),  # a step
    ],
)
def test_a_run_failed_starting_is_told_from_one_that_failed_a_step(
    answers, target, failed_starting
):
    """The driver's exit code follows this: 2 (a setting to fix) when a constructor raised, 1 when a
    step failed -- however soon after the start, so the same failure always exits the same way."""

    reg = _reg(worker=WorkerPhase.STARTING)
    sup = SupervisorProtocol(_spec(), RANGES, _initial, registry=reg)
    sup.view = _view(reg, answers=answers)
    (d,) = decide(reg, sup.view, frozenset(), _spec(), now=0.0)
    assert (d.action, d.target) == (A.FAIL, target)
    sup._carry_out(d, 0.0)
    assert reg.phase is RunPhase.FAILED and sup.failed_starting is failed_starting


def test_a_load_answered_with_a_start_failure_leaves_the_slot_unserved_and_the_run_fails():
    """The server's probes then answer the same start failure: the run fails with its reason
    instead of counting the shard as served (or asking it to load forever)."""
    reg = _reg(slot=SlotPhase.LOADING, worker=WorkerPhase.NONE)
    sup = SupervisorProtocol(_spec(), RANGES, _initial, registry=reg)
    why = StartFailed("model.name: the model built in this process differs from the driver's")
    sup._op_done(("load", 0, "a", 1), why, 0.0)
    assert reg.slots[0].phase is SlotPhase.LOADING
    sup.view = _view(reg, answers={"a": why})
    (d,) = decide(reg, sup.view, frozenset(), _spec(), now=0.0)
    sup._carry_out(d, 0.0)
    assert reg.phase is RunPhase.FAILED and sup.failed_starting
    assert reg.failure == f"server slot 0 failed to start: {why.reason}"


@pytest.mark.parametrize(
    "held_up, answered",
    [(0, False), (1, True), (2, True), (1, False)],
    ids=["on-time-silent", "held-up-answered", "held-up-twice-answered", "held-up-silent"],
)
def test_no_one_is_judged_silent_for_the_time_the_supervisor_itself_was_held_up(held_up, answered):
    """The workers answered a probe round while the supervisor's process was held up (a pause, its
    CPU taken by other processes): their answers wait behind the round's timeout timer, which fires
    late. It is set again for a probe interval, again each time it fires late, so they are heard:
    two live workers are not restarted (suspect_after_s 2 s, as the frozen-server chaos test
    runs). Workers that really did not answer are still suspected when the timer fires on time:
    restarted, the cause ``silent``."""
    spec = _spec(suspect_after_s=2.0, probe_timeout_s=2.0, probe_interval_s=0.2)
    reg = _reg()
    sup = SupervisorProtocol(spec, RANGES[:2], _initial, registry=reg)
    expected = _view(reg).answers

    def round_at(now) -> dict:
        return {e.dst: e.cid for e in sup._start_round(now) if isinstance(e, Call)}

    def timer_fires(now) -> list:
        return sup.on_timer(("probe_timeout", sup._rounds), now)

    for name, cid in round_at(0.0).items():  # every process heard at t=0.01
        sup.on_reply(cid, expected[name], 0.01)
    assert sup._round is None and not reg.events
    probes = round_at(0.2)
    for name in ("a", "b", "sp"):
        sup.on_reply(probes.pop(name), expected[name], 0.21)
    due = 0.2 + spec.probe_timeout_s
    for _ in range(held_up):  # it fires 1.3 s late: set again, and again if held up again
        (again,) = [e for e in timer_fires(due + 1.3) if isinstance(e, Timer)]
        assert again.delay_s == spec.probe_interval_s and sup._round is not None
        due += 1.3 + again.delay_s
    if answered:  # queued behind the timer: heard before it fires again
        for name, cid in probes.items():
            sup.on_reply(cid, expected[name], due - 0.1)
    timer_fires(due)  # on time
    assert sup._round is None
    restarted = [(e.role, e.index, e.cause) for e in reg.events]
    if answered:
        assert restarted == [] and sup.view.alive("w0") and sup.view.alive("w1")
    else:
        assert restarted == [("worker", 0, "silent"), ("worker", 1, "silent")]
        assert reg.events[0].silent_s >= spec.suspect_after_s


def test_a_lost_spare_is_noted_with_why_and_replaced():
    """A spare serves nothing, so its loss is no recovery; the supervisor still says it lost one
    and why (the actor logs the note as a warning), and starts another."""
    from raytrain_ft.protocol.messages import Note

    spec = _spec()
    reg = _reg()
    sup = SupervisorProtocol(spec, shard_ranges(8, 2), lambda s: None, reg)
    (spare,) = reg.spares
    for answers, silent, why in (
        ({spare: DEAD}, {}, f"spare {spare} is dead"),
        ({}, {spare: 11.0}, f"spare {spare} has not answered for 11.0s"),
    ):
        sup.view = _view(reg, answers=answers, silent=silent)
        decided = decide(reg, sup.view, frozenset(), spec, 0.0)
        assert [(d.action, d.target) for d in decided] == [
            (A.DROP_SPARE, spare),
            (A.CREATE_SPARE, None),
        ]
        effects = sup._carry_out(decided[0], 0.0)
        notes = [e for e in effects if isinstance(e, Note)]
        assert [(n.event, n.fields) for n in notes] == [
            ("spare_lost", {"actor": spare, "reason": why})
        ]
        assert spare not in reg.spares
        reg.spares.append(spare)
        # taken by a recovery decided earlier in the round: no loss to report
        reg.spares.remove(spare)
        assert not [e for e in sup._carry_out(decided[0], 0.0) if isinstance(e, Note)]
        reg.spares.append(spare)


def test_a_worker_recovery_ends_in_the_persisted_registry():
    """A restarted worker trains again: its recovery event ends then, and the registry is written,
    so a supervisor restarted later reads the event back as ended at that time -- not dated at
    its own first probe round, its downtime counted as the worker's restart (seen under load: a
    3 s worker restart reported as 37.8 s after a supervisor kill)."""
    from raytrain_ft.protocol.supervisor import Decision, RecoveryEvent, Registry

    spec = _spec()
    reg = _reg(worker=WorkerPhase.STARTING)
    reg.events.append(RecoveryEvent("worker", 1, "restart", detected_at=10.0, actor="w1-old"))
    sup = SupervisorProtocol(spec, shard_ranges(8, 2), lambda s: None, reg)
    effects = sup._write_ahead(sup._carry_out(Decision(A.MARK_RUNNING, 1, "t"), 13.0))
    (saved,) = [e for e in effects if isinstance(e, Persist)]
    (event,) = [e for e in Registry.from_json(saved.value).events if e.role == "worker"]
    assert event.serving_at == 13.0
    # a rank that was never restarted: nothing to record, no write
    assert sup._write_ahead(sup._carry_out(Decision(A.MARK_RUNNING, 0, "t"), 14.0)) == []


def test_a_recovery_waiting_for_a_spare_is_dated_from_when_it_was_decided():
    """With no warm spare (``--num-spares 0``) a dead primary waits for one to be started: its
    recovery counts that wait (it was dated when a spare was there, the wait left out: "serving
    again after 0.044s" for a shard down ~3 s). A wait the next round no longer decides (the
    server answered again) is forgotten."""
    spec = _spec(num_spares=0)
    reg = _reg(spares=())
    sup = SupervisorProtocol(spec, shard_ranges(8, 2), lambda s: None, reg)

    def round_at(now, answers):
        sup.view = _view(reg, answers=answers)
        decided = decide(reg, sup.view, frozenset(), spec, now)
        sup._keep_spare_waits(decided)
        for d in decided:
            sup._carry_out(d, now)
        return [(d.action, d.target) for d in decided]

    assert round_at(1.0, {"a": DEAD}) == [(A.RECOVER, 0), (A.CREATE_SPARE, None)]
    assert not [e for e in reg.events if e.role == "server"]  # no spare yet: waits
    round_at(3.0, {"a": DEAD})  # the spare started meanwhile: taken now
    (event,) = [e for e in reg.events if e.role == "server"]
    assert event.detected_at == 1.0 and event.actor == "a"
    # a slot whose server answers again before a spare comes: its wait is forgotten
    sup._spare_wanted_since[1] = 0.5
    sup._keep_spare_waits([])
    assert sup._spare_wanted_since == {}
