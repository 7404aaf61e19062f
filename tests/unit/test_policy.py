"""Supervisor decisions and state machine, driven one ``advance()`` at a time with a fake cluster."""

from collections import deque

import pytest

from raytrain_ft.recovery.policy import (
    Action,
    ClusterStatus,
    Limits,
    SupervisorCore,
    SupervisorState,
    WorkerView,
    decide,
    num_slots,
    replica_shards,
    replica_slot,
    server_nodes,
    slot_nodes,
)

LIMITS = Limits(target_spares=1, max_worker_restarts=2, max_server_replacements=5)


def _status(slots=(True, True, True, True), workers=None, spares=1, replacements=0, unreplicated=()):
    workers = workers or (WorkerView(0, True), WorkerView(1, True))
    return ClusterStatus(4, tuple(slots), tuple(workers), spares, replacements, tuple(unreplicated))


@pytest.mark.parametrize("k, expected_slots, holders", [(1, 2, [1]), (2, 2, [1, 0]), (4, 4, [1, 2, 3, 0])])
def test_topology_ring_or_dedicated_replica(k, expected_slots, holders):
    assert num_slots(k) == expected_slots
    assert [replica_slot(s, k) for s in range(k)] == holders
    for slot in range(expected_slots):
        assert all(replica_slot(s, k) == slot for s in replica_shards(slot, k))


@pytest.mark.parametrize("slots, nodes", [(4, ["a", "b", "c"]), (2, ["a", "b", "c"]), (5, ["a", "b", "c", "d"]), (4, ["a", "b"]), (3, ["a", "b", "c"])])
def test_ring_neighbours_sit_on_different_nodes(slots, nodes):
    placed = slot_nodes(slots, nodes)
    assert all(placed[j] != placed[(j + 1) % slots] for j in range(slots))


def test_an_odd_ring_on_two_nodes_cannot_be_spread():
    placed = slot_nodes(3, ["a", "b"])  # a 3-cycle needs 3 colours: one neighbour pair shares a node
    assert sum(placed[j] == placed[(j + 1) % 3] for j in range(3)) == 1


@pytest.mark.parametrize("status, actions, reason", [
    (_status(), [], None),
    (_status(spares=0), [Action.ADD_SPARE], "0 of 1 warm spares"),
    (_status(slots=(False, True, True, True)), [Action.REPLACE_SERVER], "server slot 0 is dead"),
    (_status(slots=(False, True, False, True)), [Action.REPLACE_SERVER, Action.REPLACE_SERVER], "slot 2"),
    (_status(slots=(False, False, True, True)), [Action.RAISE], "shard 0 is lost"),
    (_status(workers=(WorkerView(0, False), WorkerView(1, True))), [Action.RESTART_WORKER], "worker 0 is dead"),
    (_status(workers=(WorkerView(0, False, restarts=2), WorkerView(1, True))), [Action.RAISE], "max_worker_restarts=2"),
    (_status(workers=(WorkerView(0, True, error="boom"), WorkerView(1, True))), [Action.RAISE], "worker 0 failed: boom"),
    (_status(workers=(WorkerView(0, True, done=True), WorkerView(1, False, done=True))), [Action.FINISH], "every worker finished"),
    (_status(slots=(False, True, True, True), replacements=5), [Action.RAISE], "max_server_replacements=5"),
    (_status(unreplicated=(2,)), [Action.REREPLICATE], "shard 2 has no replica"),
])
def test_decide(status, actions, reason):
    _check(status, actions, reason, LIMITS)


def test_without_copies_a_dead_server_fails_the_run():
    _check(_status(slots=(True, False, True, True)), [Action.RAISE], "recovery=none", Limits(servers_recoverable=False))


def _check(status, actions, reason, limits):
    decisions = decide(status, limits)
    assert [d.action for d in decisions] == actions
    if reason:
        assert any(reason in d.reason for d in decisions)


class FakeCluster:
    """Returns queued statuses from probe() and records what the state machine asked for."""

    def __init__(self, statuses):
        self.statuses = deque(statuses)
        # === Test methods ===
        self.calls = []

    def probe(self):
        return self.statuses.popleft()

    def replace_server(self, slot, now):
        self.calls.append(("replace_server", slot))
        return {"role": "server", "index": slot, "detected_at": now}

    def rereplicate(self, shard):
        self.calls.append(("rereplicate", shard))

    def restart_worker(self, rank, now):
        self.calls.append(("restart_worker", rank))
        return None  # recorded later, once the worker trains

    def add_spare(self):
        self.calls.append(("add_spare", None))


def test_state_machine_recovers_then_runs_then_finishes():
    done = (WorkerView(0, True, done=True), WorkerView(1, True, done=True))
    fake = FakeCluster([
        _status(),
        _status(slots=(True, False, True, True), workers=(WorkerView(0, False), WorkerView(1, True))),
        _status(spares=0),
        _status(workers=done),
    ])
    core = SupervisorCore(fake, LIMITS)
    assert core.advance(0.0) == (SupervisorState.STARTING, SupervisorState.RUNNING)
    assert core.advance(1.0) == (SupervisorState.RUNNING, SupervisorState.RUNNING)
    assert fake.calls == [("replace_server", 1), ("restart_worker", 0)]
    assert core.events == [{"role": "server", "index": 1, "detected_at": 1.0}]
    assert "server slot 1 is dead" in core.history[-1][2]
    core.advance(2.0)
    assert fake.calls[-1] == ("add_spare", None)
    assert core.advance(3.0) == (SupervisorState.RUNNING, SupervisorState.DONE)
    assert core.advance(4.0) == (SupervisorState.DONE, SupervisorState.DONE)  # terminal: no more probes
    assert not fake.statuses


def test_state_machine_fails_with_the_reason_and_stops():
    fake = FakeCluster([_status(slots=(True, True, False, False))])
    core = SupervisorCore(fake, LIMITS)
    assert core.advance(0.0) == (SupervisorState.STARTING, SupervisorState.FAILED)
    assert "shard 2 is lost" in core.failure and fake.calls == []
    assert core.advance(1.0) == (SupervisorState.FAILED, SupervisorState.FAILED)


@pytest.mark.parametrize(
    "cpus, ordered, expected",
    [
        ({"h": 4}, [], []),  # one node: no placement
        ({"h": 4, "b": 2, "a": 2}, [], ["h", "a", "b"]),
        ({"h": 4, "b": 2, "a": 2}, ["b", "a"], ["h", "b", "a"]),  # simulated nodes in kill order
        ({"h": 0, "g2": 4, "g1": 4}, [], ["g1", "g2"]),  # a `ray up` head with CPU 0 holds no servers
        ({"h": 0, "g1": 4}, [], ["g1"]),
        ({"h": 0, "x": 0}, [], ["h", "x"]),  # nobody offers CPUs: spread anyway
    ],
)
def test_server_nodes(cpus, ordered, expected):
    assert server_nodes("h", cpus, ordered) == expected


def test_snapshot_interval_for_minimises_expected_cost():
    from raytrain_ft.recovery.policy import snapshot_interval_for

    # 20 ms snapshots, 1 ms per replayed command, one failure per 100,000 updates
    n = snapshot_interval_for(0.020, 0.001, 1e-5)
    assert n == 2000

    def cost(k):
        return 0.020 / k + 1e-5 * 0.001 * k / 2

    assert all(cost(n) <= cost(k) for k in (n // 2, n - 1, n + 1, 2 * n))
    assert snapshot_interval_for(0.020, 0.0, 1e-5) == 10_000  # folded logs replay nothing: snapshots only cost
    assert snapshot_interval_for(0.020, 0.001, 0.0) == 10_000
    assert snapshot_interval_for(0.0, 0.001, 1e-5) == 1
    assert snapshot_interval_for(10.0, 0.001, 1e-9, hi=500) == 500
    with pytest.raises(ValueError):
        snapshot_interval_for(-1, 0.001, 1e-5)
