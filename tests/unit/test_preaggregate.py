"""Pre-aggregation: the ranks of one process send one push of their summed gradients. The sum,
the shard's mean, exactly-once and the exchange's ledger treat it as each of its ranks' pushes,
with the same bits as the ranks' own pushes."""

import numpy as np
import pytest

from raytrain_ft.config import ConfigError, from_dict
from raytrain_ft.consistency import PushBuffer, Rule, mean_in_rank_order, sum_in_rank_order
from raytrain_ft.protocol.exchange import ExchangeProtocol
from raytrain_ft.protocol.messages import Push, PushReply, RefusalKind, Route
from tests.unit.test_server_protocol import _log, _pair, _refused


def _grads(workers: int, size: int = 257, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    # values of mixed magnitudes: float32 sums then depend on their order
    return {
        r: (rng.standard_normal(size) * 10.0 ** rng.integers(-3, 4, size)).astype(np.float32)
        for r in range(workers)
    }


def _preaggregated(grads, k):
    """What the processes of ``k`` ranks push: (payload per first rank, its members)."""
    payloads, members = {}, {}
    for first in range(0, len(grads), k):
        ranks = tuple(range(first, min(first + k, len(grads))))
        payloads[first] = sum_in_rank_order([grads[r] for r in ranks])
        if len(ranks) > 1:
            members[first] = ranks
    return payloads, members


@pytest.mark.parametrize("workers,k", [(4, 2), (6, 3), (7, 3), (8, 4), (5, 4), (3, 2)])
def test_a_preaggregated_mean_has_the_bits_of_the_ranks_own_pushes(workers, k):
    grads = _grads(workers, seed=workers * 10 + k)
    own = mean_in_rank_order(grads, k)
    payloads, members = _preaggregated(grads, k)
    np.testing.assert_array_equal(mean_in_rank_order(payloads, k, members), own)
    # a mix: some processes pre-aggregate, the others' ranks push on their own
    mixed, mixed_members = dict(payloads), dict(members)
    del mixed[k]
    mixed_members.pop(k, None)
    for r in range(k, min(2 * k, workers)):
        mixed[r] = grads[r]
    np.testing.assert_array_equal(mean_in_rank_order(mixed, k, mixed_members), own)


def test_the_summation_order_matters_so_the_shard_must_follow_the_processes():
    """The check above can fail: summed in plain rank order, the same pushes give other bits."""
    grads = _grads(8, seed=3)
    payloads, members = _preaggregated(grads, 4)
    plain = mean_in_rank_order(grads, 1)
    assert not np.array_equal(mean_in_rank_order(payloads, 4, members), plain)
    np.testing.assert_allclose(mean_in_rank_order(payloads, 4, members), plain, rtol=1e-4)


def test_one_push_of_every_rank_divides_a_copy_never_the_payload():
    grads = _grads(3)
    payloads, members = _preaggregated(grads, 3)
    payload = payloads[0]
    payload.flags.writeable = False  # as an object-store view
    mean = mean_in_rank_order(payloads, 3, members)
    np.testing.assert_array_equal(mean, mean_in_rank_order(grads, 3))
    assert mean is not payload


def test_the_buffer_counts_a_preaggregated_push_as_its_ranks():
    rule = Rule("sync", 5, sum_group=2)
    buf = PushBuffer(rule)
    g = np.ones(3, np.float32)
    assert buf.add(0, 0, g, 0, members=(0, 1))[1] is None
    assert buf.add(4, 0, g, 0)[1] is None
    key, done = buf.add(2, 0, g, 0, members=(2, 3))
    assert key == (0, 0) and done is not None
    assert done.ranks() == [0, 1, 2, 3, 4]


def test_sum_members_are_the_ranks_of_a_process_in_sync_and_mixed():
    assert Rule("sync", 5, sum_group=2).sum_members(3) == (2, 3)
    assert Rule("sync", 5, sum_group=2).sum_members(4) == (4,)
    assert Rule("sync", 5).sum_members(3) == ()
    assert Rule("sync", 5, backup_workers=1, sum_group=2).sum_members(3) == ()
    # mixed: a group's ranks are synchronous; pre-aggregated when the groups are the processes
    assert Rule("mixed", 4, group_size=2, sum_group=2).sum_members(1) == (0, 1)
    assert Rule("mixed", 6, group_size=2, sum_group=3).sum_members(1) == ()
    assert Rule("async", 4, sum_group=2).sum_members(1) == ()


# --- the shard ------------------------------------------------------------------------------------


def test_a_shard_applies_a_preaggregated_push_as_each_of_its_ranks_once():
    rule = Rule("sync", 3, sum_group=2)
    bus, _, _ = _pair(workers=3, rule=rule, fold=False)
    p = bus.procs["p"]
    group = bus.send("p", Push(0, 0, np.full(4, 6.0, np.float32), ranks=(0, 1)))
    assert group not in bus.replies and p.primary.state.seq == 0  # rank 2 is still missing
    alone = bus.send("p", Push(2, 0, np.full(4, 3.0, np.float32)))
    reply = bus.replies[group]
    np.testing.assert_array_equal(reply.params, np.full(4, -3.0, np.float32))  # -(6 + 3) / 3
    np.testing.assert_array_equal(bus.replies[alone].params, reply.params)
    command = _log(bus).entries[0]
    assert command.pushes == ((0, 0), (1, 0), (2, 0))  # exactly-once and replay see each rank
    # the group's push again (its answer was lost): answered, never applied twice
    again = bus.send("p", Push(0, 0, np.full(4, 6.0, np.float32), ranks=(0, 1)))
    assert bus.replies[again].seq == 1 and p.primary.state.seq == 1
    assert p.stats().duplicate_pushes == 1


def test_a_push_of_ranks_that_do_not_share_a_process_is_refused():
    bus, _, _ = _pair(workers=4, rule=Rule("sync", 4, sum_group=2))
    rid = bus.send("p", Push(1, 0, np.ones(4, np.float32), ranks=(1, 2)))
    assert "does not match" in _refused(bus.replies[rid], RefusalKind.FAILED)
    bus2, _, _ = _pair(workers=4, rule=Rule("async", 4))
    rid = bus2.send("p", Push(0, 0, np.ones(4, np.float32), ranks=(0, 1)))
    _refused(bus2.replies[rid], RefusalKind.FAILED)


# --- the exchange ---------------------------------------------------------------------------------


def test_the_exchange_ledger_records_every_rank_a_push_held():
    ex = ExchangeProtocol(0, [Route(0, "p", 1)], "sup")
    (call,) = ex.push(0, 4, np.ones(2, np.float32), 0, True, ranks=(0, 1, 2))
    assert call.msg.ranks == (0, 1, 2)
    ex.on_reply(call.cid, PushReply(np.zeros(2, np.float32), 5, 5))
    assert [(a.rank, a.step, a.seq) for a in ex.ledger] == [(0, 4, 5), (1, 4, 5), (2, 4, 5)]


def test_an_early_preaggregated_push_enters_the_ledger_for_each_rank_once_logged():
    ex = ExchangeProtocol(0, [Route(0, "p", 1)], "sup")
    (call,) = ex.push(0, 0, np.ones(2, np.float32), 0, True, early=True, ranks=(0, 1))
    ex.on_reply(call.cid, PushReply(np.zeros(2, np.float32), 1, 1, durable=False))
    assert ex.ledger == []
    (call,) = ex.push(0, 1, np.ones(2, np.float32), 1, True, ranks=(0, 1))
    ex.on_reply(call.cid, PushReply(np.zeros(2, np.float32), 2, 2))
    assert [(a.rank, a.step) for a in ex.ledger] == [(0, 0), (1, 0), (0, 1), (1, 1)]


# --- configuration --------------------------------------------------------------------------------


def _config(**cluster):
    return from_dict(
        {"cluster": {"num_workers": 4, "simulate_compute_ms": 10, **cluster}, "steps": 5}
    )


def test_auto_preaggregates_where_it_applies_and_sums_the_processes_first_either_way():
    on = _config(ranks_per_process=2)
    assert on.preaggregates and on.rule().sum_group == 2
    off = _config(ranks_per_process=2, preaggregate="false")
    assert not off.preaggregates and off.rule().sum_group == 2  # the same bits as pre-aggregated
    assert not _config().preaggregates and _config().rule().sum_group == 1
    asynchronous = from_dict(
        {
            "mode": "async",
            "cluster": {"num_workers": 4, "simulate_compute_ms": 10, "ranks_per_process": 2},
            "steps": 5,
        }
    )
    assert not asynchronous.preaggregates and asynchronous.rule().sum_group == 1
    mixed = from_dict(
        {
            "mode": "mixed",
            "consistency": {"group_size": 2},
            "cluster": {"num_workers": 4, "simulate_compute_ms": 10, "ranks_per_process": 2},
            "steps": 5,
        }
    )
    assert mixed.preaggregates and mixed.rule().sum_members(3) == (2, 3)


@pytest.mark.parametrize(
    "extra,needle",
    [
        ({}, "cluster.ranks_per_process above 1"),
        ({"mode": "async", "ranks_per_process": 2}, "each rank's push on its own"),
        ({"mode": "mixed", "ranks_per_process": 2, "group_size": 4}, "consistency.group_size"),
        (
            {"mode": "mixed", "ranks_per_process": 2, "group_size": 2, "delay_compensation": 0.1},
            "delay compensation",
        ),
        ({"backup_workers": 1, "ranks_per_process": 2}, "backup workers"),
        ({"clip_grad_norm": 1.0, "ranks_per_process": 2}, "clipping"),
        ({"codec": "topk:0.1", "ranks_per_process": 2}, "residual"),
    ],
)
def test_preaggregate_true_names_what_it_cannot_work_with(extra, needle):
    d = {"cluster": {"num_workers": 4, "simulate_compute_ms": 10, "preaggregate": "true"}}
    d["steps"] = 5
    for key, value in extra.items():
        if key == "mode":
            d["mode"] = value
        elif key == "ranks_per_process":
            d["cluster"][key] = value
        elif key == "clip_grad_norm":
            d.setdefault("optim", {})[key] = value
        else:
            d.setdefault("consistency", {})[key] = value
    with pytest.raises(ConfigError) as err:
        from_dict(d)
    assert err.value.field == "cluster.preaggregate" and needle in str(err.value)


# --- the process's ranks (GroupSum, threads, no Ray) ----------------------------------------------


class _FakeExchange:
    def __init__(self, pushed: list):
        self.pushed, self.versions, self.wait_s = pushed, [0], 0.0
        self.push_source, self.push_ranks = None, ()

    def push_remaining(self):
        self.pushed.append((self.push_ranks, self.push_source.copy()))
        self.versions = [self.versions[0] + 1]

    def install_all(self):
        pass


class _FakeRank:
    def __init__(self, rank: int, pushed: list):
        import torch

        self.rank, self._step = rank, 0
        self.grad = np.full(3, float(rank + 1), np.float32)
        self.exchange = _FakeExchange(pushed)
        self.flat = type("Flat", (), {"flat": torch.full((3,), float(rank)), "int_buffers": []})()

    def host_gradient(self):
        return self.grad


def _run_ranks(group, ranks, steps_of):
    import threading

    errors: dict[int, str] = {}

    def train(w):
        try:
            for step in steps_of[w.rank]:
                w._step = step
                group.exchange(w)
        except Exception as error:  # noqa: BLE001 -- recorded for the test
            errors[w.rank] = str(error)
        finally:
            group.leave(w.rank)

    threads = [threading.Thread(target=train, args=(w,), daemon=True) for w in ranks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert not any(t.is_alive() for t in threads), "a rank of the process hung"
    return errors


def test_a_process_pushes_once_per_step_for_its_ranks_and_they_take_its_parameters():
    from raytrain_ft.actors.worker import GroupSum

    pushed: list = []
    group = GroupSum((4, 5, 6))
    ranks = [_FakeRank(r, pushed) for r in (4, 5, 6)]
    for w in ranks:
        group.join(w)
    ranks[0].flat.flat.fill_(7.0)  # the first rank's parameters, as its install left them
    errors = _run_ranks(group, ranks, {r: range(3) for r in (4, 5, 6)})
    assert errors == {}
    assert [p[0] for p in pushed] == [(4, 5, 6)] * 3  # only the first rank's exchange pushed
    np.testing.assert_array_equal(pushed[0][1], np.full(3, 5 + 6 + 7, np.float32))
    assert all(float(w.flat.flat[0]) == 7.0 for w in ranks)
    assert all(w.exchange.versions == [3] for w in ranks)


@pytest.mark.parametrize(
    "steps_of",
    [
        {0: range(1, 4), 1: range(0, 4)},  # restarted at different steps
        {0: range(3, 4), 1: range(4, 4)},  # one already at the end
        {0: range(0, 4), 1: range(1, 4)},  # the other way round
    ],
)
def test_ranks_of_a_process_that_cannot_push_as_one_fail_instead_of_hanging(steps_of):
    """The supervisor starts a process's ranks at one step; were it not so, they would wait on
    each other for ever: the first rank reports it and every rank of the process fails."""
    from raytrain_ft.actors.worker import GroupSum

    group = GroupSum((0, 1))
    ranks = [_FakeRank(r, []) for r in (0, 1)]
    for w in ranks:
        group.join(w)
    errors = _run_ranks(group, ranks, steps_of)
    assert errors and all("cannot push as one" in e for e in errors.values())
