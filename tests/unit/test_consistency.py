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
    "rule, momentum, expected",
    [
        # n streams remember n - 1 updates on their own; sync's 0.9 remembers 9 global steps = 9n
        # updates: the explicit momentum keeps the other 8n + 1, M / (1 + M)
        (Rule("async", 4, momentum_correction="auto"), 0.9, 33 / 34),
        (Rule("ssp", 8, momentum_correction="auto"), 0.9, 65 / 66),
        (Rule("mixed", 4, group_size=2, momentum_correction="auto"), 0.9, 17 / 18),
        (Rule("async", 8, momentum_correction="auto"), 0.5, 0.5),  # 8 - 7 = 1 update either way
        (Rule("async", 4, momentum_correction="auto"), 0.3, 0.0),  # asynchrony alone remembers more
        # sync, one stream, and correction off keep the configured momentum
        (Rule("sync", 4, momentum_correction="auto"), 0.9, 0.9),
        (Rule("mixed", 4, group_size=4, momentum_correction="auto"), 0.9, 0.9),
        (Rule("async", 1, momentum_correction="auto"), 0.9, 0.9),
        (Rule("async", 4), 0.9, 0.9),
        (Rule("async", 4, momentum_correction="dana"), 0.9, 0.9),  # per stream, not per update
    ],
)
def test_momentum_correction_keeps_the_step_per_gradient(rule, momentum, expected):
    corrected, gain = rule.momentum(momentum)
    assert corrected == pytest.approx(expected)
    # every gradient still moves the parameters by lr / (1 - momentum) in total
    assert gain * rule.lr_scale(1, 0) / (1 - corrected) == pytest.approx(
        rule.lr_scale(1, 0) / (1 - momentum)
    )
    assert momentum == 0 or rule.momentum(0.0) == (0.0, 1.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mode="lazy"), "unknown mode"),
        (dict(mode="sync", backup_workers=4), "backup_workers"),
        (dict(mode="async", backup_workers=1), "sync mode only"),
        (dict(staleness_lr="x"), "staleness_lr"),
        (dict(momentum_correction="half"), "momentum_correction"),
    ],
)
def test_bad_rules(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Rule(num_workers=4, **kwargs)


def test_merge_histograms():
    assert merge_histograms([{0: 2, 3: 1}, {"3": 4}]) == {0: 2, 3: 5}


def test_delay_compensation_corrects_by_the_parameter_change_since_the_gradient():
    from raytrain_ft.consistency import DelayCompensation

    dc = DelayCompensation(strength=2.0)
    g = np.array([1.0, -2.0, 0.5], np.float32)
    then = np.zeros(3, np.float32)
    now = np.array([0.1, 0.1, -0.2], np.float32)
    out = dc.correct(g, now, then)
    mean_square = 0.05 * g * g  # the first gradient seen, decay 0.95 from zero
    expected = g + 2.0 / np.sqrt(mean_square + 1e-7) * g * g * (now - then)
    np.testing.assert_allclose(out, expected, rtol=1e-5)
    # fresh parameters (or unknown ones) are not corrected, but still feed the average
    np.testing.assert_array_equal(dc.correct(g, now, None), g)
    np.testing.assert_allclose(dc.mean_square, 0.95 * mean_square + 0.05 * g * g, rtol=1e-6)
    np.testing.assert_array_equal(dc.correct(g, now, now), g)


@pytest.mark.parametrize("value", [-0.5, float("inf"), float("nan")])
def test_delay_compensation_needs_a_finite_non_negative_strength(value):
    with pytest.raises(ValueError, match="delay_compensation"):
        Rule("async", 2, delay_compensation=value)


def test_delay_compensation_is_refused_in_sync_mode():
    with pytest.raises(ValueError, match="async, ssp and mixed"):
        Rule("sync", 2, delay_compensation=1.0)


def test_local_sgd_is_sync_to_the_shards_over_rounds():
    from raytrain_ft.consistency import local_rounds, round_span

    rule = Rule("local_sgd", 3)
    assert rule.synchronous and rule.exact_resume and not rule.per_rank_clocks
    assert rule.group(2) == (0, 1, 2) and rule.needed(0) == 3 and rule.lr_scale(3, 0) == 1.0
    assert (
        rule.classify(1, 4, 5, 0) is Verdict.REPEAT and rule.classify(1, 6, 5, 0) is Verdict.AHEAD
    )
    assert rule.update_streams == 1 and rule.momentum(0.9) == (0.9, 1.0)
    # 55 local steps in rounds of 8: 7 rounds, the last one of 7 steps
    assert local_rounds(55, 8) == 7 and local_rounds(56, 8) == 7 and local_rounds(57, 8) == 8
    assert list(round_span(0, 8, 55)) == list(range(8))
    assert list(round_span(6, 8, 55)) == list(range(48, 55))
    assert sum(len(round_span(r, 8, 55)) for r in range(7)) == 55


@pytest.mark.parametrize(
    "rule, streams",
    [
        (Rule("async", 4, momentum_correction="dana"), [0, 1, 2, 3]),
        (Rule("ssp", 3, staleness=1, momentum_correction="dana"), [0, 1, 2]),
        (Rule("mixed", 5, group_size=2, momentum_correction="dana"), [0, 0, 2, 2, 4]),
        # one stream, or per-stream momentum not asked for: the shard's one buffer
        (Rule("mixed", 4, group_size=4, momentum_correction="dana"), [-1] * 4),
        (Rule("sync", 4, momentum_correction="dana"), [-1] * 4),
        (Rule("local_sgd", 2, momentum_correction="dana"), [-1] * 2),
        (Rule("async", 1, momentum_correction="dana"), [-1]),
        (Rule("async", 4), [-1] * 4),
        (Rule("async", 4, momentum_correction="auto"), [-1] * 4),
    ],
)
def test_dana_gives_each_update_stream_its_own_momentum_buffer(rule, streams):
    assert [rule.momentum_stream(r) for r in range(rule.num_workers)] == streams
