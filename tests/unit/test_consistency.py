"""Consistency rules: grouping, repeats, backups, the SSP bound and learning-rate shares (no
Ray)."""

import numpy as np
import pytest

from raytrain_ft.consistency import (
    PushBuffer,
    Rule,
    Verdict,
    may_proceed,
    merge_histograms,
    slowest_clock,
)


@pytest.mark.parametrize(
    "mode, rank, group",
    [
        ("sync", 2, (0, 1, 2, 3, 4)),
        ("mixed", 0, (0, 1)),
        ("mixed", 3, (2, 3)),
        ("mixed", 4, (4,)),
        ("async", 3, (3,)),
        ("ssp", 1, (1,)),
    ],
)
def test_groups(mode, rank, group):
    assert Rule(mode, 5, group_size=2).group(rank) == group


@pytest.mark.parametrize(
    "rule, rank, step, shard_step, clock, verdict",
    [
        (Rule("sync", 4), 0, 3, 3, 0, Verdict.ACCEPT),
        (Rule("sync", 4), 0, 2, 3, 0, Verdict.REPEAT),
        (Rule("sync", 4), 0, 4, 3, 0, Verdict.AHEAD),
        (Rule("sync", 4, backup_workers=1), 0, 2, 3, 0, Verdict.LATE),
        (Rule("async", 4), 1, 7, 30, 7, Verdict.ACCEPT),
        (Rule("async", 4), 1, 6, 30, 7, Verdict.REPEAT),
        (Rule("async", 4), 1, 9, 30, 7, Verdict.ACCEPT),  # n_push > 1 skips steps
        (Rule("mixed", 4, group_size=2), 1, 5, 12, 6, Verdict.REPEAT),
    ],
)
def test_classify(rule, rank, step, shard_step, clock, verdict):
    assert rule.classify(rank, step, shard_step, clock) is verdict


def test_sync_with_backups_closes_a_step_on_the_first_n_arrivals():
    buf = PushBuffer(Rule("sync", 4, backup_workers=1))
    g = {r: np.full(2, float(r), np.float32) for r in range(4)}
    assert buf.add(3, 0, g[3], 0)[1] is None
    assert buf.add(1, 0, g[1], 0)[1] is None
    key, done = buf.add(0, 0, g[0], 0)
    assert key == (0, 0) and sorted(done.grads) == [0, 1, 3] and not buf.pending


def test_mixed_groups_complete_independently():
    buf = PushBuffer(Rule("mixed", 4, group_size=2))
    g = np.ones(2, np.float32)
    assert buf.add(2, 0, g, 0)[1] is None
    assert buf.add(0, 0, g, 0)[1] is None
    key, done = buf.add(3, 0, g, 5)
    assert key == (2, 0) and sorted(done.grads) == [2, 3] and done.base_versions == {2: 0, 3: 5}
    assert list(buf.pending) == [(0, 0)]


def test_a_resent_push_replaces_the_waiting_one():
    buf = PushBuffer(Rule("sync", 2))
    buf.add(0, 0, np.ones(2, np.float32), 0)
    buf.add(0, 0, np.ones(2, np.float32), 0)
    assert buf.replaced == 1 and buf.add(1, 0, np.ones(2, np.float32), 0)[1] is not None


@pytest.mark.parametrize(
    "clocks, rank, staleness, ok",
    [
        ({0: 3, 1: 1}, 0, 2, True),
        ({0: 4, 1: 1}, 0, 2, False),
        ({0: 4, 1: 1}, 1, 0, True),  # the slowest always goes on
        ({0: 1, 1: 1}, 0, 0, True),
        ({0: 2, 1: 1}, 0, 0, False),  # staleness 0 = lock-step
        ({0: 2}, 0, 5, True),  # a rank with no push yet is at clock 0
        ({0: 6}, 0, 5, False),
    ],
)
def test_ssp_bound(clocks, rank, staleness, ok):
    assert may_proceed(clocks, rank, Rule("ssp", 2, staleness=staleness)) is ok


def test_other_modes_never_wait_on_clocks():
    assert may_proceed({0: 100}, 0, Rule("async", 2)) and slowest_clock({0: 100}, 2) == 0


@pytest.mark.parametrize(
    "rule, pushes, staleness, scale",
    [
        (Rule("sync", 4), 4, 0, 1.0),
        (Rule("async", 4), 1, 3, 0.25),
        (Rule("async", 4, staleness_lr="inverse"), 1, 4, 0.0625),
        (Rule("ssp", 4, staleness_lr="inverse"), 1, 1, 0.25),
        (Rule("mixed", 4, group_size=2), 2, 1, 0.5),
    ],
)
def test_learning_rate_share(rule, pushes, staleness, scale):
    assert rule.lr_scale(pushes, staleness) == pytest.approx(scale)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mode="lazy"), "unknown mode"),
        (dict(mode="sync", backup_workers=4), "backup_workers"),
        (dict(mode="async", backup_workers=1), "sync mode only"),
        (dict(staleness_lr="x"), "staleness_lr"),
    ],
)
def test_bad_rules(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Rule(num_workers=4, **kwargs)


def test_merge_histograms():
    assert merge_histograms([{0: 2, 3: 1}, {"3": 4}]) == {0: 2, 3: 5}
