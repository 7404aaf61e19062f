"""--durability pipelined (sync): a push's answer may leave before the holder logged its update,
never before the updates ahead of it; the answer says so (``durable``), the worker keeps the push
until a later answer and sends it again first to a newer primary. Primaries, logs and replays keep
the values two updates back for a restarted rank. No Ray."""

import dataclasses

import numpy as np
import pytest

from raytrain_ft.config import OptimConfig
from raytrain_ft.protocol.exchange import Acked, ExchangeProtocol
from raytrain_ft.protocol.messages import (
    Pull,
    Push,
    PushReply,
    RecoverPrimary,
    Route,
)
from raytrain_ft.protocol.server import ServerProtocol
from raytrain_ft.recovery.command_log import CommandLog
from raytrain_ft.recovery.replay import replay
from tests.unit.bus import sync_primary_and_holder

SGD = OptimConfig(name="sgd", lr=0.5, momentum=0.9)


def _pushes(bus, step, early=True, dst="p"):
    return [
        bus.send(dst, Push(r, step, np.full(4, r + step + 1.0, np.float32), step, early=early))
        for r in (0, 1)
    ]


def test_an_early_push_is_answered_before_the_log_but_never_before_the_update_ahead_of_it():
    bus, _, _ = sync_primary_and_holder(SGD, 2, np.ones(4), pipelined=True)
    bus.hold("h")  # the holder logs nothing until released
    first = _pushes(bus, 0)
    replies = [bus.replies.get(rid) for rid in first]
    assert all(r is not None and not r.durable and r.seq == 1 for r in replies), replies
    assert not np.array_equal(replies[0].params, np.ones(4, np.float32))  # the update, unlogged
    second = _pushes(bus, 1)
    # update 1 is applied, but update 0 is not logged yet: no answer may carry update 1
    assert bus.procs["p"].primary.state.seq == 2
    assert all(rid not in bus.replies for rid in second)
    bus.release("h", 1)  # the append of update 0 arrives and is acknowledged
    replies = [bus.replies[rid] for rid in second]
    assert all(r.seq == 2 and not r.durable for r in replies)
    bus.release("h")
    assert bus.procs["h"].replicas[0].log.next_seq == 2


def test_a_push_that_is_not_early_still_waits_for_the_log():
    bus, _, _ = sync_primary_and_holder(SGD, 2, np.ones(4), pipelined=True)
    bus.hold("h")
    rids = _pushes(bus, 0, early=False)
    assert all(rid not in bus.replies for rid in rids)
    bus.release("h")
    assert all(bus.replies[rid].durable for rid in rids)


def test_a_rebuilt_primary_that_lacks_an_early_update_makes_it_again_to_the_same_bits():
    bus, shard, spec = sync_primary_and_holder(SGD, 2, np.ones(4), pipelined=True)
    bus.hold("h")
    handed_out = bus.replies[_pushes(bus, 0)[0]].params
    bus.kill("p")  # before its holder logged update 0
    bus.held.pop("h")  # the append is lost with it
    bus.add("s", ServerProtocol("s", spec))
    bus.ask("s", RecoverPrimary(shard, 2, "h"))
    assert bus.procs["s"].primary.state.seq == 0
    # the workers' kept pushes, sent again first and not early: answered once logged
    again = [bus.replies[rid] for rid in _pushes(bus, 0, early=False, dst="s")]
    assert all(r.durable and r.acked == 1 for r in again)
    np.testing.assert_array_equal(again[0].params, handed_out)


def _log_with_updates(n, keeps_earlier=True):
    bus, shard, spec = sync_primary_and_holder(SGD, 2, np.ones(4), pipelined=keeps_earlier)
    seen = [bus.procs["p"].params().copy()]
    for step in range(n):
        _pushes(bus, step, early=False)
        seen.append(bus.procs["p"].params().copy())
    return bus, shard, spec, seen


@pytest.mark.parametrize("n", [1, 2, 5])
def test_the_values_two_updates_back_survive_snapshots_logs_and_replay(n):
    bus, shard, spec, seen = _log_with_updates(n)
    p = bus.procs["p"].primary
    np.testing.assert_array_equal(p.previous, seen[n - 1])
    if n >= 2:
        np.testing.assert_array_equal(p.earlier, seen[n - 2])
        # a restarted rank pulls the step two back
        assert bus.ask("p", Pull(n - 2)).seq == n - 2
        np.testing.assert_array_equal(bus.ask("p", Pull(n - 2)).params, seen[n - 2])
    log = bus.procs["h"].replicas[0].log
    # replayed from the holder's snapshot + commands
    result = replay(log.snapshot, list(log.entries), shard, spec.optim, spec.total_steps)
    np.testing.assert_array_equal(result.previous_params, seen[n - 1])
    expected_earlier = seen[n - 2] if n >= 2 else None
    if expected_earlier is None:
        assert result.earlier_params is None
    else:
        np.testing.assert_array_equal(result.earlier_params, expected_earlier)
    # folded: the holder's own catch-up keeps them too
    folded = CommandLog.from_snapshot(log.snapshot)
    for c in log.entries:
        folded.append(c)
    folded.catch_up(shard, spec.optim, spec.total_steps)
    assert folded.snapshot.keeps_earlier
    np.testing.assert_array_equal(folded.snapshot.previous_params, seen[n - 1])
    if n >= 2:
        np.testing.assert_array_equal(folded.snapshot.earlier_params, seen[n - 2])


def test_without_pipelining_nothing_two_back_is_kept():
    bus, *_ = _log_with_updates(3, keeps_earlier=False)
    assert bus.procs["p"].primary.earlier is None
    assert bus.procs["h"].replicas[0].log.snapshot.earlier_params is None
    assert not isinstance(bus.ask("p", Pull(1)), PushReply)  # refused: not kept


def test_a_restarted_ranks_repeat_of_the_step_before_the_last_gets_the_values_after_it():
    """A shard two updates ahead of a rebuilt peer: the restarted rank pulls the step two back,
    then repeats it here; the answer carries the values that followed that step (the ones the
    rank computes its next step on), not the newest."""
    bus, _, _, seen = _log_with_updates(3)
    reply = bus.ask("p", Push(1, 1, np.full(4, 9.0, np.float32), 1))  # a repeat of step 1
    assert reply.acked == 2 and reply.seq == 2
    np.testing.assert_array_equal(reply.params, seen[2])
    newest = bus.ask("p", Push(1, 2, np.full(4, 9.0, np.float32), 2))  # repeat of the last step
    assert newest.seq == 3
    np.testing.assert_array_equal(newest.params, seen[3])


def _exchange():
    return ExchangeProtocol(0, [Route(0, "p", 1)], "sup")


def _early_reply(step, durable=False):
    return PushReply(np.zeros(2, np.float32), step + 1, step + 1, durable=durable)


def test_the_exchange_acknowledges_an_early_push_only_with_the_next_answer():
    ex = _exchange()
    (call,) = ex.push(0, 0, np.ones(2, np.float32), 0, True, early=True)
    assert call.msg.early
    ex.on_reply(call.cid, _early_reply(0))
    assert ex.ledger == [] and ex.take(0).seq == 1  # the parameters are there to compute on
    (call,) = ex.push(0, 1, np.ones(2, np.float32), 1, True, early=False)  # the last step
    assert call.msg.step == 1  # same primary: nothing to send again
    ex.on_reply(call.cid, _early_reply(1, durable=True))
    assert ex.ledger == [Acked(0, 0, 0, 1, False), Acked(0, 0, 1, 2, False)]


@pytest.mark.parametrize("how", ["set_routes", "reroute"])
def test_a_kept_push_goes_first_to_a_primary_of_a_newer_epoch(how):
    ex = _exchange()
    kept = ex.push(0, 0, np.ones(2, np.float32), 0, True, early=True)[0]
    ex.on_reply(kept.cid, _early_reply(0))
    if how == "set_routes":
        ex.set_routes([Route(0, "s", 2)])
        (call,) = ex.push(0, 1, np.ones(2, np.float32), 1, True, early=True)
    else:
        (sent,) = ex.push(0, 1, np.ones(2, np.float32), 1, True, early=True)
        (ask,) = ex.on_failure(sent.cid, __import__("raytrain_ft").protocol.messages.Failure.DEAD)
        (call,) = ex.on_reply(ask.cid, Route(0, "s", 2))
    # the kept push first, to the new primary, answered only once logged, without parameters
    assert call.dst == "s" and call.msg == dataclasses.replace(
        kept.msg, early=False, want_params=False
    )
    (then,) = ex.on_reply(call.cid, PushReply(None, 1, 1))
    assert ex.ledger == [Acked(0, 0, 0, 1, False)]
    assert then.dst == "s" and then.msg.step == 1 and then.msg.early
    ex.on_reply(then.cid, _early_reply(1))
    assert ex.take(0).seq == 2 and len(ex.ledger) == 1  # step 1 kept in its turn
