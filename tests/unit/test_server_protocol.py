"""``ServerProtocol`` on a synchronous in-memory bus: parking, rank order, idempotence, logging
before answering, snapshots, rebuilding a primary from its replica, the consistency modes, and
fencing."""

import numpy as np
import pytest
import torch

from raytrain_ft.compression import ErrorFeedback, TopK
from raytrain_ft.config import OptimConfig
from raytrain_ft.consistency import Rule
from raytrain_ft.params import shard_ranges
from raytrain_ft.protocol.messages import (
    Append,
    AppendAck,
    Depose,
    Describe,
    Exported,
    ExportReplica,
    InspectReplica,
    InstallReplica,
    Load,
    Pull,
    Push,
    PushReply,
    Recovered,
    RecoverPrimary,
    RefusalKind,
    Refused,
    Reinstate,
    ServerDescription,
    SetReplica,
)
from raytrain_ft.protocol.server import ServerProtocol, ServerSpec
from raytrain_ft.recovery.command_log import Command
from raytrain_ft.recovery.replay import replay
from tests.unit.bus import Bus

SGD = OptimConfig(name="sgd", lr=1.0, momentum=0.0)
MOMENTUM = OptimConfig(name="sgd", lr=0.1, momentum=0.9)


def _spec(workers=1, optim=SGD, rule=None, **kw):
    return ServerSpec(
        optim, total_steps=100, num_workers=workers, rule=rule or Rule("sync", workers), **kw
    )


def _pair(workers=1, optim=SGD, size=4, rule=None, **kw):
    """Primary "p" of the only shard (epoch 1) and its dedicated holder "h", on one bus."""
    shard = shard_ranges(size, 1)[0]
    spec = _spec(workers, optim, rule, **kw)
    bus = Bus()
    bus.add("p", ServerProtocol("p", spec))
    bus.add("h", ServerProtocol("h", spec))
    assert bus.ask("p", Load(shard, 1, np.zeros(size, np.float32))) == 0
    assert isinstance(bus.ask("p", SetReplica("h", 1)), int)  # the snapshot's bytes
    return bus, shard, spec


def _push(bus, rank, step, value, size=4, dst="p", base=None):
    grad = value if isinstance(value, np.ndarray) else np.full(size, value, np.float32)
    return bus.send(dst, Push(rank, step, grad, base))


def _log(bus, holder="h", shard=0):
    return bus.procs[holder].replicas[shard].log


def _refused(value, kind):
    assert isinstance(value, Refused), value
    assert value.kind is kind, value
    return value.reason


# --- sync
# -----------------------------------------------------------------------------------------------


def test_replies_park_until_all_ranks_pushed_then_all_get_the_same_update():
    bus, _, _ = _pair(workers=2)
    p = bus.procs["p"]
    first = _push(bus, 1, 0, 4.0)
    assert first not in bus.replies and p.stats().updates_applied == 0 and p.primary.state.seq == 0
    second = _push(bus, 0, 0, 2.0)
    a, b = bus.replies[first], bus.replies[second]
    np.testing.assert_array_equal(a.params, np.full(4, -3.0, np.float32))  # 0 - 1.0 * mean(2, 4)
    np.testing.assert_array_equal(a.params, b.params)
    assert (a.seq, a.acked, a.late) == (b.seq, b.acked, b.late) == (1, 1, False)
    st = p.stats()
    assert st.seq == 1 and st.updates_applied == 1 and st.duplicate_pushes == 0


def test_the_holder_has_logged_an_update_before_any_worker_sees_it():
    bus, _, _ = _pair(fold=False)
    bus.hold("h")
    rid = _push(bus, 0, 0, 1.0)
    assert rid not in bus.replies and _log(bus).next_seq == 0  # applied, not logged: no answer
    assert bus.procs["p"].primary.state.seq == 1
    bus.hold("p")
    bus.release("h")  # the holder logs; its AppendAck waits at the primary
    log = _log(bus)
    assert log.next_seq == 1 and log.entries[0].seq == 0
    np.testing.assert_array_equal(log.entries[0].update, np.ones(4, np.float32))
    assert rid not in bus.replies
    bus.release("p")
    assert bus.replies[rid].seq == 1 and bus.replies[rid].acked == 1


def test_a_push_before_any_replica_exists_waits_for_the_replica():
    shard = shard_ranges(4, 1)[0]
    bus = Bus()
    bus.add("p", ServerProtocol("p", _spec()))
    bus.add("h", ServerProtocol("h", _spec()))
    bus.ask("p", Load(shard, 1, np.zeros(4, np.float32)))
    rid = _push(bus, 0, 0, 1.0)
    assert rid not in bus.replies
    bus.send("p", SetReplica("h", 1))
    np.testing.assert_array_equal(bus.replies[rid].params, np.full(4, -1.0, np.float32))
    np.testing.assert_array_equal(
        _log(bus).snapshot.params, np.full(4, -1.0, np.float32)
    )  # the snapshot holds it


def test_repeated_push_is_answered_not_applied_twice():
    bus, _, _ = _pair()
    first = bus.replies[_push(bus, 0, 0, 1.0)]
    again = bus.replies[_push(bus, 0, 0, 1.0)]
    np.testing.assert_array_equal(first.params, again.params)
    assert (again.seq, again.acked) == (1, 1)
    st = bus.procs["p"].stats()
    assert st.updates_applied == 1 and st.duplicate_pushes == 1 and _log(bus).next_seq == 1


@pytest.mark.parametrize("step", [1, 3])
def test_push_ahead_of_the_shard_is_refused(step):
    bus, _, _ = _pair()
    reason = _refused(bus.replies[_push(bus, 0, step, 1.0)], RefusalKind.FAILED)
    assert f"pushed step {step}, ahead of the shard's step 0" in reason
    assert bus.procs["p"].primary.state.seq == 0 and _log(bus).next_seq == 0


@pytest.mark.parametrize("msg", [Push(0, 0, np.ones(4, np.float32)), Pull(), Pull(0)])
def test_a_server_that_is_no_primary_refuses_pushes_and_pulls(msg):
    bus, _, _ = _pair()
    _refused(bus.ask("h", msg), RefusalKind.NOT_PRIMARY)


def test_pull_serves_the_current_and_the_previous_step_only():
    bus, _, _ = _pair()
    before = bus.ask("p", Pull(0))
    np.testing.assert_array_equal(before.params, np.zeros(4, np.float32))
    assert (before.seq, before.acked) == (0, 0)
    after = bus.replies[_push(bus, 0, 0, 1.0)].params
    np.testing.assert_array_equal(bus.ask("p", Pull(0)).params, before.params)
    np.testing.assert_array_equal(bus.ask("p", Pull(1)).params, after)
    assert bus.ask("p", Pull(0)).seq == 0 and bus.ask("p", Pull()).seq == 1
    _push(bus, 0, 1, 1.0)
    assert "cannot serve parameters of step 0" in _refused(
        bus.ask("p", Pull(0)), RefusalKind.CANNOT_SERVE
    )
    _refused(bus.ask("p", Pull(5)), RefusalKind.CANNOT_SERVE)
    np.testing.assert_array_equal(bus.ask("p", Pull(1)).params, after)
    np.testing.assert_array_equal(bus.ask("p", Pull(2)).params, np.full(4, -2.0, np.float32))


def test_snapshots_truncate_the_log():
    bus, _, _ = _pair(snapshot_interval=3, fold=False)
    for step in range(7):
        _push(bus, 0, step, 1.0)
    log = _log(bus)
    assert log.snapshot.seq == 6 and [c.seq for c in log.entries] == [6]
    np.testing.assert_array_equal(log.snapshot.params, np.full(4, -6.0, np.float32))
    assert bus.procs["h"].snapshots_received[0] == 2 and bus.procs["p"].snapshots_sent == 2


# --- rebuilding a primary
# ----------------------------------------------------------------------------------


def _train(bus, steps, start=0, size=4, seed=0):
    rng = np.random.default_rng(seed)
    grads = [rng.standard_normal(size).astype(np.float32) for _ in range(start + steps)]
    for step in range(start, start + steps):
        assert isinstance(bus.replies[_push(bus, 0, step, grads[step])], PushReply)


def _recover(bus, shard, spec, epoch=2, spare="s"):
    bus.add(spare, ServerProtocol(spare, spec))
    return bus.ask(spare, RecoverPrimary(shard, epoch, "h"))


@pytest.mark.parametrize("fold", [False, True])
def test_a_spare_rebuilt_from_the_replica_equals_the_lost_primary_bitwise(fold):
    bus, shard, spec = _pair(optim=MOMENTUM, snapshot_interval=4, fold=fold)
    twin, _, _ = _pair(optim=MOMENTUM, snapshot_interval=4, fold=fold)  # trains on, never fails
    _train(bus, 10)
    _train(twin, 10)
    lost = bus.procs["p"]
    bus.kill("p")
    got = _recover(bus, shard, spec)
    # unfolded: snapshot at 8 + commands 8 and 9; folded: the holder already applied them
    assert (
        isinstance(got, Recovered)
        and (got.seq, got.replayed) == (10, 0 if fold else 2)
        and got.bytes_moved > 0
    )
    spare = bus.procs["s"]
    a, b = spare.primary.state, lost.primary.state
    np.testing.assert_array_equal(spare.params(), lost.params())
    np.testing.assert_array_equal(spare.primary.previous, lost.primary.previous)
    np.testing.assert_array_equal(bus.ask("s", Pull(9)).params, lost.primary.previous)
    assert a.optimizer.state.keys() == b.optimizer.state.keys() and a.optimizer.state
    for key, value in b.optimizer.state.items():
        assert np.array_equal(a.optimizer.state[key].numpy(), value.numpy()), key
    assert a.clocks == b.clocks == {0: 10} and a.applied_copy() == b.applied_copy() == {
        0: bytes([1] * 10)
    }
    d = bus.ask("s", Describe())
    assert (d.shard, d.epoch, d.seq, d.logged, d.durable_clocks) == (0, 2, 10, 10, (10,))
    # the rebuilt primary keeps logging to the same holder, and training goes on as if nothing had
    # happened
    grad = np.full(4, 0.5, np.float32)
    np.testing.assert_array_equal(
        bus.replies[_push(bus, 0, 10, grad, dst="s")].params,
        twin.replies[_push(twin, 0, 10, grad)].params,
    )
    assert _log(bus).next_seq == 11


def test_a_retried_push_after_rebuild_is_answered_not_applied_again():
    bus, shard, spec = _pair()
    _train(bus, 3)
    lost = bus.procs["p"].params().copy()
    bus.kill("p")
    _recover(bus, shard, spec)
    again = bus.replies[_push(bus, 0, 2, 1.0, dst="s")]  # step 2 was logged before the primary died
    np.testing.assert_array_equal(again.params, lost)
    assert (again.seq, again.acked) == (3, 3)
    spare = bus.procs["s"]
    assert spare.duplicate_pushes == 1 and spare.primary.state.seq == 3 and _log(bus).next_seq == 3


def test_when_the_holder_dies_the_update_waits_for_a_new_holder_then_is_acknowledged():
    bus, _, spec = _pair()
    bus.kill("h")
    rid = _push(bus, 0, 0, 1.0)
    assert rid not in bus.replies  # not acknowledged without a replica
    assert [n.event for _, n in bus.notes].count("holder_lost") == 1
    bus.add("h2", ServerProtocol("h2", spec))
    assert isinstance(bus.ask("p", SetReplica("h2", 2)), int)
    reply = bus.replies[rid]
    np.testing.assert_array_equal(reply.params, np.full(4, -1.0, np.float32))
    log = _log(bus, "h2")
    assert log.next_seq == 1 and np.array_equal(log.snapshot.params, reply.params)


# --- other consistency modes
# -----------------------------------------------------------------------------


def test_async_applies_each_push_on_arrival_and_the_log_replays_that_order():
    bus, shard, _ = _pair(
        workers=3, optim=MOMENTUM, rule=Rule("async", 3), snapshot_interval=1000, fold=False
    )
    rng = np.random.default_rng(0)
    order = [
        (2, 0),
        (0, 0),
        (1, 0),
        (0, 1),
        (2, 1),
        (1, 1),
        (1, 2),
        (0, 2),
    ]  # arrival order, ranks interleaved
    # all in flight at once (each computed on version 0): commands applied while an append is out go
    # in one call
    rids = [
        bus.send("p", Push(r, t, rng.standard_normal(4).astype(np.float32), 0), run=False)
        for r, t in order
    ]
    bus.run()
    log, p = _log(bus), bus.procs["p"]
    assert [c.pushes for c in log.entries] == [((r, t),) for r, t in order]
    assert sorted(bus.replies[rid].acked for rid in rids) == list(range(1, 9))
    rebuilt = replay(log.snapshot, log.entries, shard, MOMENTUM, 100)
    np.testing.assert_array_equal(rebuilt.state.params_copy(), p.params())
    assert rebuilt.state.clocks == p.primary.state.clocks == {0: 3, 1: 3, 2: 2}
    st = p.stats()
    assert st.staleness_histogram == {s: 1 for s in range(8)}  # update n was computed n updates ago
    assert (
        st.replica_appends == 2
    )  # the first command alone, then the seven applied while it was out


@pytest.mark.parametrize("correction", ["none", "auto", "dana"])
def test_momentum_correction_is_what_each_command_records_and_replay_applies(correction):
    rule = Rule("async", 4, momentum_correction=correction)
    bus, shard, _ = _pair(workers=4, optim=MOMENTUM, rule=rule, snapshot_interval=1000, fold=False)
    rng = np.random.default_rng(1)
    for t in range(3):
        for r in range(4):
            _push(bus, r, t, rng.standard_normal(4).astype(np.float32))
    log, p = _log(bus), bus.procs["p"]
    momentum, gain = rule.momentum(MOMENTUM.momentum)
    assert momentum == (pytest.approx(33 / 34) if correction == "auto" else 0.9)
    for c in log.entries:
        assert c.hp.momentum == momentum and c.hp.lr == pytest.approx(MOMENTUM.lr * 0.25 * gain)
        assert c.hp.stream == (c.pushes[0][0] if correction == "dana" else -1)
    rebuilt = replay(log.snapshot, log.entries, shard, MOMENTUM, 100)
    np.testing.assert_array_equal(rebuilt.state.params_copy(), p.params())
    assert _same_optimizer_state(rebuilt.state.optimizer.state_dict(), p.primary.state)


def _same_optimizer_state(a: dict, state) -> bool:
    b = state.optimizer.state_dict()
    return a["state"].keys() == b["state"].keys() and all(
        torch.equal(a["state"][k], b["state"][k]) for k in a["state"]
    )


def test_dana_hands_workers_the_look_ahead_and_keeps_the_true_parameters_everywhere_else():
    """Replies carry w - lr * m * (sum of the streams' buffers); snapshots, the final parameters and
    a rebuilt primary carry w itself, and the rebuilt primary hands out the same look-ahead."""
    rule = Rule("mixed", 4, group_size=2, momentum_correction="dana")
    bus, shard, spec = _pair(workers=4, optim=MOMENTUM, rule=rule, snapshot_interval=2)
    grads = {r: np.full(4, r + 1.0, np.float32) for r in range(4)}
    for r in (0, 1, 2, 3, 2, 3):  # group 0 once, group 2 twice
        _push(bus, r, 1 if (r > 1 and bus.procs["p"].primary.state.seq > 1) else 0, grads[r])
    p = bus.procs["p"]
    w = p.params()
    lr = MOMENTUM.lr * 0.5  # a group's update is half a global step
    buf0 = 1.5 * np.ones(4, np.float32)  # group 0: mean of ranks 0, 1, once
    buf2 = 3.5 * 0.9 + 3.5 * np.ones(4, np.float32)  # group 2: mean of ranks 2, 3, twice
    np.testing.assert_allclose(w, -lr * 1.5 - lr * 3.5 - lr * buf2, rtol=1e-6)
    reply = bus.replies[bus.send("p", Pull(None, 0))]
    np.testing.assert_allclose(reply.params, w - lr * 0.9 * (buf0 + buf2), rtol=1e-6)
    assert not np.allclose(reply.params, w)
    log = _log(bus)
    rebuilt = replay(log.snapshot, log.entries, shard, MOMENTUM, 100)
    np.testing.assert_array_equal(rebuilt.state.params_copy(), w)
    bus.kill("p")
    _recover(bus, shard, spec)
    again = bus.replies[bus.send("s", Pull(None, 0))]
    np.testing.assert_array_equal(again.params, reply.params)
    np.testing.assert_array_equal(bus.procs["s"].params(), w)


def test_delay_compensation_corrects_a_stale_push_and_the_command_carries_the_correction():
    rule = Rule("async", 2, delay_compensation=2.0)
    bus, shard, _ = _pair(workers=2, optim=MOMENTUM, rule=rule, snapshot_interval=1000, fold=False)
    g0 = np.array([1.0, -1.0, 0.5, 2.0], np.float32)
    g1 = np.array([0.5, 0.5, -1.0, 1.0], np.float32)
    # both computed on version 0: rank 1's arrives after rank 0's update, one version stale
    bus.send("p", Pull(None, 0), run=True)  # version 0 handed out
    _push(bus, 0, 0, g0, base=0)
    _push(bus, 1, 0, g1, base=0)
    log, p = _log(bus), bus.procs["p"]
    first, second = log.entries
    np.testing.assert_array_equal(first.update, g0)  # fresh: as pushed
    now = replay(log.snapshot, log.entries[:1], shard, MOMENTUM, 100).state.params_copy()
    mean_square = 0.95 * 0.05 * g0 * g0 + 0.05 * g1 * g1
    expected = g1 + 2.0 / np.sqrt(mean_square + 1e-7) * g1 * g1 * (now - 0.0)
    np.testing.assert_allclose(second.update, expected, rtol=1e-5)
    rebuilt = replay(log.snapshot, log.entries, shard, MOMENTUM, 100)
    np.testing.assert_array_equal(rebuilt.state.params_copy(), p.params())


def test_async_push_resent_to_a_rebuilt_primary_is_recognised_from_the_replayed_clocks():
    bus, shard, spec = _pair(workers=2, rule=Rule("async", 2))
    assert bus.replies[_push(bus, 1, 0, 1.0, base=0)].acked == 1
    bus.kill("p")
    _recover(bus, shard, spec)
    again = bus.replies[_push(bus, 1, 0, 1.0, dst="s", base=0)]
    spare = bus.procs["s"]
    assert again.acked == 0 and again.seq == 1  # an async repeat carries no seq of its own
    assert (
        spare.duplicate_pushes == 1
        and spare.primary.state.seq == 1
        and spare.primary.state.clocks == {1: 1}
    )


def test_ssp_holds_a_worker_more_than_s_steps_ahead_until_the_slowest_catches_up():
    bus, _, _ = _pair(workers=2, rule=Rule("ssp", 2, staleness=1))
    p = bus.procs["p"]
    assert (
        _push(bus, 0, 0, 1.0, base=0) in bus.replies
    )  # clock 1, slowest 0: a lead of 1 is allowed
    ahead = _push(bus, 0, 1, 1.0, base=1)  # clock 2: a lead of 2 > 1
    assert ahead not in bus.replies and p.primary.state.seq == 2  # applied on arrival, answer held
    slow = _push(bus, 1, 0, 1.0, base=0)  # the slowest reaches clock 1
    assert slow in bus.replies and ahead in bus.replies
    assert bus.replies[ahead].seq == 3
    assert all(clock - slowest <= 1 for _, clock, slowest in p.clock_trace)
    assert (0, 2, 1) in p.clock_trace


def test_mixed_groups_update_the_shard_independently():
    bus, _, _ = _pair(workers=4, rule=Rule("mixed", 4, group_size=2), fold=False)
    p = bus.procs["p"]
    a = _push(bus, 2, 0, 2.0, base=0)
    assert a not in bus.replies and p.primary.state.seq == 0
    b = _push(bus, 3, 0, 4.0, base=0)  # group (2, 3) complete: one update, lr * 2/4
    assert bus.replies[a].seq == bus.replies[b].seq == 1
    np.testing.assert_array_equal(
        p.params(), np.full(4, -1.5, np.float32)
    )  # 0 - 1.0 * 0.5 * mean(2, 4)
    c, d = (
        _push(bus, 0, 0, 1.0, base=0),
        _push(bus, 1, 0, 1.0, base=0),
    )  # group (0, 1), its own step 0
    assert bus.replies[c].acked == bus.replies[d].acked == 2
    np.testing.assert_array_equal(p.params(), np.full(4, -2.0, np.float32))
    assert [e.pushes for e in _log(bus).entries] == [((2, 0), (3, 0)), ((0, 0), (1, 0))]


def test_backup_workers_close_the_step_without_the_straggler_and_drop_its_late_push():
    bus, _, _ = _pair(workers=3, rule=Rule("sync", 3, backup_workers=1), fold=False)
    p = bus.procs["p"]
    a = _push(bus, 0, 0, 1.0)
    b = _push(bus, 2, 0, 3.0)
    assert bus.replies[a].acked == bus.replies[b].acked == 1
    late = bus.replies[_push(bus, 1, 0, 100.0)]  # the straggler
    assert (late.seq, late.acked, late.late) == (1, 0, True) and p.late_pushes == 1
    np.testing.assert_array_equal(
        late.params, np.full(4, -2.0, np.float32)
    )  # mean of ranks 0 and 2 only
    # rank 0's push went into the closed step: its resend is a repeat, not late
    again = bus.replies[_push(bus, 0, 0, 1.0)]
    assert (again.seq, again.acked, again.late) == (1, 1, False)
    assert p.duplicate_pushes == 1 and p.late_pushes == 1 and p.primary.state.seq == 1
    assert [e.pushes for e in _log(bus).entries] == [((0, 0), (2, 0))]


def test_a_compressed_push_is_decoded_before_it_is_applied():
    bus, _, _ = _pair(size=8, fold=False)
    push = ErrorFeedback(TopK(0.25), 8).encode(np.array([0, 0, 5, 0, 0, -7, 0, 1], np.float32))
    reply = bus.replies[bus.send("p", Push(0, 0, push))]
    expected = np.array([0, 0, 5, 0, 0, -7, 0, 0], np.float32)
    np.testing.assert_array_equal(_log(bus).entries[0].update, expected)
    np.testing.assert_array_equal(reply.params, -expected)


# --- fencing
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rule, first, then",
    [
        (Rule("sync", 2), [(0, 0)], [(1, 0)]),
        (
            Rule("mixed", 4, group_size=2),
            [(0, 0)],
            [(2, 0), (3, 0)],
        ),  # rank 0 still waits for rank 1 when p steps down
    ],
)
def test_an_export_fences_the_old_primary_which_steps_down_and_refuses_its_waiting_pushes(
    rule, first, then
):
    bus, _, _ = _pair(workers=rule.num_workers, rule=rule)
    rids = [_push(bus, r, t, 1.0, base=0) for r, t in first]
    assert isinstance(
        bus.ask("h", ExportReplica(0, 2)), Exported
    )  # a successor at epoch 2 is being built
    rids += [
        _push(bus, r, t, 1.0, base=0) for r, t in then
    ]  # completes an update: its Append is refused
    for rid in rids:
        assert "fenced at epoch 2" in _refused(bus.replies[rid], RefusalKind.FENCED)
    assert [
        (name, n.event, n.fields["epoch"]) for name, n in bus.notes if n.event == "deposed"
    ] == [("p", "deposed", 1)]
    assert _log(bus).next_seq == 0  # the fenced append changed nothing
    assert bus.ask("p", Describe()).deposed
    _refused(bus.replies[_push(bus, then[0][0], 1, 1.0, base=0)], RefusalKind.FENCED)
    _refused(bus.ask("p", Pull()), RefusalKind.FENCED)


def test_an_append_from_an_older_epoch_is_refused_by_the_holder():
    bus, _, _ = _pair()
    bus.ask("h", ExportReplica(0, 3))
    stale = Append(
        0, 2, (Command(0, np.ones(4, np.float32), bus.procs["p"].primary.state.hyper_params(0)),)
    )
    _refused(bus.ask("h", stale), RefusalKind.FENCED)
    assert _log(bus).next_seq == 0
    assert bus.ask("h", InspectReplica(0)).entries == ()


def test_an_install_from_an_older_epoch_is_refused():
    bus, shard, _ = _pair()
    _train(bus, 2)
    assert isinstance(bus.ask("h", ExportReplica(0, 2)), Exported)
    p = bus.procs["p"]
    stale = InstallReplica(shard, 1, p._snapshot(p.primary))
    assert "install came from epoch 1" in _refused(bus.ask("h", stale), RefusalKind.FENCED)
    # the old primary, asked to replicate again, is refused the same way and steps down
    _refused(bus.ask("p", SetReplica("h", 2)), RefusalKind.FENCED)
    assert bus.ask("p", Describe()).deposed
    assert _log(bus).next_seq == 2 and bus.procs["h"].replicas[0].fence == 2


@pytest.mark.parametrize(
    "epochs, refused",
    [
        ((1,), True),  # the installing primary's own epoch is the fence
        ((0,), True),
        ((2, 2), True),  # an epoch is never handed out twice
        ((3, 2), True),
        ((2, 3), False),
    ],
)
def test_an_export_needs_an_epoch_newer_than_the_fence(epochs, refused):
    bus, _, _ = _pair()
    *before, last = epochs
    for e in before:
        assert isinstance(bus.ask("h", ExportReplica(0, e)), Exported)
    got = bus.ask("h", ExportReplica(0, last))
    if refused:
        assert "a recovery needs a newer epoch" in _refused(got, RefusalKind.FENCED)
    else:
        assert isinstance(got, Exported)
    assert bus.procs["h"].replicas[0].fence == max(1, *before, last if not refused else 0)


def test_an_export_of_a_shard_not_held_is_refused():
    bus, _, _ = _pair()
    _refused(bus.ask("h", ExportReplica(5, 2)), RefusalKind.NO_REPLICA)
    _refused(bus.ask("p", ExportReplica(0, 2)), RefusalKind.NO_REPLICA)


def test_a_holder_that_refused_an_export_it_lacked_refuses_older_installs_too():
    """Asked for a replica it never got (a replicate toward it was still on its way), a holder
    fences the shard's older epochs: the install arriving late from the primary the recovery
    replaces is refused, and that primary steps down, so no update it acknowledges afterwards can
    be logged only here while the supervisor rebuilds from the holder named before."""
    bus, shard, _ = _pair()
    bus.add("h2", ServerProtocol("h2", bus.procs["p"].spec))
    _refused(bus.ask("h2", ExportReplica(0, 2)), RefusalKind.NO_REPLICA)
    assert "refused shard 0's replica to a recovery at epoch 2" in _refused(
        bus.ask("p", SetReplica("h2", 2)), RefusalKind.FENCED
    )
    assert bus.ask("p", Describe()).deposed and 0 not in bus.procs["h2"].replicas
    # a primary of the recovery's epoch (or newer) installs as usual
    p2 = bus.procs["p"]
    newer = InstallReplica(shard, 2, p2._snapshot(p2.primary))
    assert bus.ask("h2", newer) == 0 and bus.procs["h2"].replicas[0].fence == 2


def test_a_delayed_older_load_does_not_undo_a_newer_one():
    bus, shard, _ = _pair()
    _train(bus, 2)
    params = bus.procs["p"].params().copy()
    _refused(bus.ask("p", Load(shard, 0, np.full(4, 9.0, np.float32))), RefusalKind.FENCED)
    assert (
        bus.ask("p", Load(shard, 1, np.full(4, 9.0, np.float32))) == 2
    )  # the same epoch again: done already
    np.testing.assert_array_equal(bus.procs["p"].params(), params)
    d = bus.ask("p", Describe())
    assert (d.epoch, d.seq, d.deposed) == (1, 2, False)


def test_a_newer_load_replaces_the_primary_and_refuses_what_waited():
    bus, shard, _ = _pair(workers=2)
    waiting = _push(bus, 0, 0, 1.0)
    assert bus.ask("p", Load(shard, 2, np.full(4, 9.0, np.float32), seq=5)) == 5
    _refused(bus.replies[waiting], RefusalKind.FENCED)
    d = bus.ask("p", Describe())
    assert (d.epoch, d.seq, d.deposed) == (2, 5, False)


def test_a_delayed_older_recover_primary_does_not_undo_a_newer_one():
    bus, shard, spec = _pair()
    _train(bus, 2)
    bus.kill("p")
    assert isinstance(_recover(bus, shard, spec, epoch=3), Recovered)
    _push(bus, 0, 2, 1.0, dst="s")
    params = bus.procs["s"].params().copy()
    _refused(bus.ask("s", RecoverPrimary(shard, 2, "h")), RefusalKind.FENCED)
    assert bus.ask("s", RecoverPrimary(shard, 3, "h")) == Recovered(
        3, 0, 0
    )  # the same epoch again: done already
    np.testing.assert_array_equal(bus.procs["s"].params(), params)
    d = bus.ask("s", Describe())
    assert (d.epoch, d.seq) == (3, 3) and bus.procs["h"].replicas[0].fence == 3


def test_an_older_recover_primary_arriving_during_a_newer_recovery_is_refused():
    bus, shard, spec = _pair()
    _train(bus, 2)
    bus.add("s", ServerProtocol("s", spec))
    bus.hold("h")
    newer = bus.send("s", RecoverPrimary(shard, 4, "h"))
    _refused(bus.ask("s", RecoverPrimary(shard, 3, "h")), RefusalKind.FENCED)
    bus.release("h")
    assert isinstance(bus.replies[newer], Recovered) and bus.replies[newer].seq == 2
    assert bus.ask("s", Describe()).epoch == 4 and bus.procs["h"].replicas[0].fence == 4


def test_a_newer_recover_primary_supersedes_one_in_flight():
    bus, shard, spec = _pair()
    _train(bus, 2)
    bus.add("s", ServerProtocol("s", spec))
    bus.hold("h")
    older = bus.send("s", RecoverPrimary(shard, 2, "h"))
    newer = bus.send("s", RecoverPrimary(shard, 3, "h"))  # a restarted supervisor issues it again
    assert "supersedes" in _refused(bus.replies[older], RefusalKind.FENCED)
    bus.release("h")
    assert isinstance(bus.replies[newer], Recovered) and bus.replies[newer].seq == 2
    assert bus.ask("s", Describe()).epoch == 3 and bus.procs["h"].replicas[0].fence == 3


def test_a_set_replica_older_than_the_one_in_use_is_refused():
    bus, _, spec = _pair()
    bus.add("h2", ServerProtocol("h2", spec))
    assert "named before the holder in use" in _refused(
        bus.ask("p", SetReplica("h2", 0)), RefusalKind.FENCED
    )
    _push(bus, 0, 0, 1.0)
    assert _log(bus).next_seq == 1 and bus.procs["h2"].replicas == {}  # h stays the holder
    assert isinstance(
        bus.ask("p", SetReplica("h2", 1)), int
    )  # the same version again is taken (a repeat)
    _push(bus, 0, 1, 1.0)
    assert _log(bus, "h2").next_seq == 2 and _log(bus).next_seq == 1


@pytest.mark.parametrize(
    "shard, epoch, deposed", [(0, 2, True), (0, 1, False), (0, 0, False), (1, 5, False)]
)
def test_a_depose_with_a_newer_epoch_makes_the_primary_refuse_pushes(shard, epoch, deposed):
    bus, _, _ = _pair()
    assert bus.ask("p", Depose(shard, epoch)) is deposed
    reply = bus.replies[_push(bus, 0, 0, 1.0)]
    if deposed:
        assert "was deposed" in _refused(reply, RefusalKind.FENCED)
        assert bus.ask("p", Describe()).deposed and _log(bus).next_seq == 0
    else:
        assert isinstance(reply, PushReply) and reply.seq == 1


def test_sync_replies_never_carry_parameters_newer_than_the_holder_logged():
    """Backup workers: step 1 can be applied while step 0's append is out. Step 0's answers wait
    until the holder logged step 1 too, because they would carry its parameters (a rebuilt primary
    might not have them)."""
    bus, _, _ = _pair(workers=3, rule=Rule("sync", 3, backup_workers=1))
    bus.hold("h")
    step0 = [_push(bus, 0, 0, 1.0), _push(bus, 2, 0, 3.0)]
    step1 = [_push(bus, 1, 1, 2.0), _push(bus, 2, 1, 4.0)]
    assert bus.procs["p"].primary.state.seq == 2
    assert bus.ask("p", Describe()).logged == 0
    pull = bus.send("p", Pull())
    bus.release("h", 1)  # step 0 logged; step 1's append is now held at the holder
    assert bus.ask("p", Describe()).logged == 1 and _log(bus).next_seq == 1
    assert not any(rid in bus.replies for rid in step0 + step1 + [pull])
    bus.release("h")
    replies = [bus.replies[rid] for rid in step0 + step1 + [pull]]
    assert [r.seq for r in replies] == [2] * 5 and [r.acked for r in replies] == [1, 1, 2, 2, 0]
    for r in replies:
        np.testing.assert_array_equal(r.params, np.full(4, -5.0, np.float32))  # -(1+3)/2 - (2+4)/2


@pytest.mark.parametrize(
    "rule, pushes",
    [
        (Rule("sync", 2), [(0, 0), (1, 0), (1, 1), (0, 1), (0, 1)]),
        (Rule("sync", 3, backup_workers=1), [(0, 0), (2, 0), (1, 0), (1, 1), (2, 1), (0, 1)]),
    ],
)
def test_no_sync_answer_carries_parameters_the_holder_has_not_logged(rule, pushes):
    """With the holder slow (every append held until the test lets it through) no answer's seq
    exceeds the log."""
    bus, _, _ = _pair(workers=rule.num_workers, rule=rule)
    bus.hold("h")
    rids = [_push(bus, r, t, float(r + 1), base=0) for r, t in pushes]
    answered = {}
    while bus.held["h"]:
        bus.release("h", 1)
        for rid in rids:
            if rid in bus.replies and rid not in answered:
                answered[rid] = bus.replies[rid]
                assert answered[rid].seq <= _log(bus).next_seq
    bus.release("h")
    assert set(answered) == set(rids) and all(isinstance(r, PushReply) for r in answered.values())


def test_describe_reports_what_the_server_holds():
    bus, _, _ = _pair(workers=2, rule=Rule("async", 2))
    _push(bus, 1, 0, 1.0, base=0)
    _push(bus, 1, 1, 1.0, base=1)
    d = bus.ask("p", Describe())
    assert isinstance(d, ServerDescription)
    assert (d.name, d.shard, d.epoch, d.seq, d.logged, d.durable_clocks, d.deposed) == (
        "p",
        0,
        1,
        2,
        2,
        (0, 2),
        False,
    )
    h = bus.ask("h", Describe())
    assert h.shard is None and [(r.shard, r.fence, r.next_seq) for r in h.replicas] == [(0, 1, 2)]


def test_an_append_ack_is_what_the_holder_returns():
    bus, _, _ = _pair(fold=False)
    hp = bus.procs["p"].primary.state.hyper_params(0)
    assert bus.ask("h", Append(0, 1, (Command(0, np.ones(4, np.float32), hp),))) == AppendAck(1)
    assert bus.ask("h", Append(0, 1, (Command(0, np.ones(4, np.float32), hp),))) == AppendAck(
        1
    )  # a resend
    _refused(bus.ask("h", Append(0, 1, (Command(3, np.ones(4, np.float32), hp),))), RefusalKind.GAP)


@pytest.mark.parametrize("holder", ["h", "h2"], ids=["same-holder", "other-holder"])
def test_a_recovery_issued_again_to_a_spare_that_finished_it_serves_on_at_the_new_epoch(holder):
    """A restarted supervisor issues a recovery again, with a newer epoch, to the spare that had
    already finished it (its Recovered answer was lost); the holder has died since. The spare has
    every acknowledged update (the holder fenced the older epochs for it, and no worker is routed
    to a recovering slot's spare), so it serves on at the new epoch: with the same holder named it
    does not even ask it; with another one named, that one's failure does not fail the rebuild."""
    bus, shard, spec = _pair()
    for step in range(3):
        _push(bus, 0, step, 1.0)
    before = bus.procs["p"].params()
    bus.kill("p")
    assert isinstance(_recover(bus, shard, spec, epoch=2), Recovered)
    bus.kill("h")
    again = bus.ask("s", RecoverPrimary(shard, 3, holder))
    assert isinstance(again, Recovered) and again.seq == 3
    assert bus.ask("s", Describe()).epoch == 3
    np.testing.assert_array_equal(bus.procs["s"].params(), before)


def test_a_spare_that_never_finished_still_refuses_when_the_holder_is_lost():
    bus, shard, spec = _pair()
    _push(bus, 0, 0, 1.0)
    bus.kill("p")
    bus.kill("h")
    bus.add("s", ServerProtocol("s", spec))
    _refused(bus.ask("s", RecoverPrimary(shard, 2, "h")), RefusalKind.HOLDER_LOST)


@pytest.mark.parametrize("interval, fold, expected", [(3, True, 4), ("auto", True, 0)])
def test_auto_snapshot_interval_sends_no_periodic_snapshot_to_a_folding_holder(
    interval, fold, expected
):
    bus, shard, _ = _pair(snapshot_interval=interval, fold=fold)
    for step in range(12):
        _push(bus, 0, step, 1.0)
    p = bus.procs["p"]
    st = p.stats()
    assert st.updates_applied == 12
    # the holder's log holds every update either way; only the periodic snapshots differ
    assert p.snapshots_sent == expected and st.snapshots_sent == expected
    assert st.snapshot_interval == (3 if interval == 3 else 10_000)
    rebuilt = replay(_log(bus).snapshot, _log(bus).entries, shard, SGD, 100)
    np.testing.assert_array_equal(rebuilt.state.params_copy(), p.params())


def test_relaxed_durability_answers_up_to_k_updates_before_the_holder_logged_them():
    bus, _, _ = _pair(
        workers=1, rule=Rule("async", 1), fold=False, snapshot_interval=1000, unlogged=2
    )
    bus.hold("h")  # the holder logs nothing for now
    rids = [_push(bus, 0, step, 1.0) for step in range(3)]
    p = bus.procs["p"].primary
    assert p.state.seq == 3 and p.logged == 0
    # two updates may go unlogged: their pushes are answered; the third waits for the log
    assert [rid in bus.replies for rid in rids] == [True, True, False]
    bus.release("h")
    assert rids[2] in bus.replies and _log(bus).next_seq == 3


def test_strict_durability_answers_nothing_the_holder_has_not_logged():
    bus, _, _ = _pair(workers=1, rule=Rule("async", 1), fold=False, snapshot_interval=1000)
    bus.hold("h")
    rids = [_push(bus, 0, step, 1.0) for step in range(3)]
    assert not any(rid in bus.replies for rid in rids)


def test_a_reinstated_primary_serves_on_at_the_newer_epoch_and_its_new_holder_takes_it():
    """Its recovery abandoned (the holder lost while it was only suspected), the primary is told
    to serve on at a newer epoch: it keeps its state, a repeat is answered the same, an older
    epoch is refused, and a new holder installs it at the new epoch past the old fences."""
    bus, _, spec = _pair()
    _push(bus, 0, 0, 1.0)
    bus.kill("h")
    done = bus.ask("p", Reinstate(0, 4))
    assert isinstance(done, Recovered) and done.seq == 1
    assert bus.ask("p", Reinstate(0, 4)) == done  # a repeat
    assert "newer than 3" in _refused(bus.ask("p", Reinstate(0, 3)), RefusalKind.FENCED)
    assert bus.ask("p", Describe()).epoch == 4
    bus.add("h2", ServerProtocol("h2", spec))
    assert isinstance(bus.ask("p", SetReplica("h2", 2)), int)
    assert bus.procs["h2"].replicas[0].fence == 4
    reply = bus.replies[_push(bus, 0, 1, 1.0)]
    np.testing.assert_array_equal(reply.params, np.full(4, -2.0, np.float32))


@pytest.mark.parametrize("how", ["deposed", "other-shard", "spare"])
def test_a_reinstate_is_refused_by_a_server_that_no_longer_serves_the_shard(how):
    bus, _, _ = _pair()
    if how == "deposed":
        assert bus.ask("p", Depose(0, 2)) is True
    target, shard = ("h", 0) if how == "spare" else ("p", 1 if how == "other-shard" else 0)
    assert "no longer serves" in _refused(
        bus.ask(target, Reinstate(shard, 5)), RefusalKind.NO_REPLICA
    )


def test_serving_on_cancels_a_pending_rebuild_so_the_epoch_never_goes_back():
    """A spare rebuilt at epoch 2 from "h" is asked at epoch 3 with another holder (its export
    still on the way), then at epoch 4 with "h" again: it serves on at 4 and the epoch-3 rebuild is
    refused then, so that export's answer can neither move the epoch back nor replace the state."""
    bus, shard, spec = _pair()
    _push(bus, 0, 0, 1.0)
    bus.kill("p")
    assert isinstance(_recover(bus, shard, spec, epoch=2), Recovered)
    bus.add("h2", ServerProtocol("h2", spec))
    bus.hold("h2")
    pending = bus.send("s", RecoverPrimary(shard, 3, "h2"))
    assert pending not in bus.replies
    assert isinstance(bus.ask("s", RecoverPrimary(shard, 4, "h")), Recovered)
    assert "supersedes" in _refused(bus.replies[pending], RefusalKind.FENCED)
    bus.release("h2")
    assert bus.ask("s", Describe()).epoch == 4


@pytest.mark.parametrize("upto, reinstated", [(2, True), (1, False)])
def test_a_primary_deposed_only_by_a_rebuilds_fence_can_be_reinstated(upto, reinstated):
    """A rebuild's export fences the holder at epoch 2; the primary's next append is refused and it
    steps down, saying which fence deposed it. If that rebuild is abandoned (its holder lost), a
    Reinstate up to that epoch puts it back with every update it had; one that does not reach the
    fence is refused."""
    bus, shard, spec = _pair()
    _push(bus, 0, 0, 1.0)
    assert isinstance(bus.ask("h", ExportReplica(0, 2)), Exported)
    rid = _push(bus, 0, 1, 1.0)
    _refused(bus.replies[rid], RefusalKind.FENCED)
    d = bus.ask("p", Describe())
    assert d.deposed and d.fenced_at == 2 and d.seq == 2
    bus.kill("h")
    answer = bus.ask("p", Reinstate(0, 3, upto))
    if reinstated:
        assert isinstance(answer, Recovered) and answer.seq == 2
        assert not bus.ask("p", Describe()).deposed
    else:
        assert "no longer serves" in _refused(answer, RefusalKind.NO_REPLICA)


def test_a_primary_deposed_by_a_successor_is_never_reinstated():
    bus, _, _ = _pair()
    assert bus.ask("p", Depose(0, 2)) is True
    assert bus.ask("p", Describe()).fenced_at is None
    _refused(bus.ask("p", Reinstate(0, 5, 4)), RefusalKind.NO_REPLICA)


def test_a_reader_of_several_shards_gets_one_step_of_them_all():
    """A periodic evaluation reads every shard's primary a moment apart: one may be an update
    ahead. Each offers the values it keeps for restarted ranks too, and the reader takes the newest
    count they all hold (it mixed two steps before)."""
    import numpy as np

    from raytrain_ft.actors.supervisor import one_cut

    bus, _, _ = _pair(pipelined=True)
    seen = {0: bus.procs["p"].params().copy()}
    for step in range(3):
        _push(bus, 0, step, float(step + 1))
        seen[step + 1] = bus.procs["p"].params().copy()
    recent = bus.procs["p"].recent_params()
    assert sorted(recent) == [1, 2, 3]
    for k, values in recent.items():
        np.testing.assert_array_equal(values, seen[k])
    behind = {2: seen[2], 1: seen[1], 0: seen[0]}  # a second shard, one update behind
    flat, updates = one_cut([recent, behind])
    assert updates == 2
    np.testing.assert_array_equal(flat, np.concatenate([seen[2], seen[2]]))
    # asynchronous modes keep only the current values: each shard's newest, the fewest count
    flat, updates = one_cut([{5: seen[3]}, {4: seen[1]}])
    assert updates == 4 and np.array_equal(flat, np.concatenate([seen[3], seen[1]]))
