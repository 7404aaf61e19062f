"""Acknowledged updates lost with a primary under relaxed durability (no Ray): holes in a shard's
applied record, and which recovery each belongs to."""

from raytrain_ft.config import ConsistencyConfig, RecoveryConfig, TrainConfig
from raytrain_ft.trainer import lost_updates, updates_lost_by_recovery, updates_lost_in


def _cfg(mode="async", **consistency):
    return TrainConfig(
        mode=mode,
        consistency=ConsistencyConfig(**consistency),
        recovery=RecoveryConfig(durability="relaxed:4") if mode != "sync" else RecoveryConfig(),
        steps=40,
    )


def _counts(applied_steps: set, n: int) -> bytes:
    return bytes(1 if s in applied_steps else 0 for s in range(n))


def test_holes_below_a_ranks_last_applied_step_are_lost_updates():
    applied = {0: _counts(set(range(20)) - {12, 13}, 20), 1: _counts(set(range(18)), 18)}
    assert sorted(lost_updates(applied, _cfg()).values()) == [(0, 12), (0, 13)]
    assert updates_lost_in(applied, _cfg()) == 2
    assert updates_lost_in(applied, _cfg("sync")) == 0  # sync is always strict


def test_downpour_counts_only_push_steps():
    applied = {0: bytes([0, 1, 0, 0, 0, 1, 0, 1])}  # n_push 2: steps 1, 3, 5, 7 push; 3 lost
    assert list(lost_updates(applied, _cfg(n_push=2)).values()) == [(0, 3)]


def test_each_hole_belongs_to_the_last_rebuilt_state_that_lacked_it():
    """Two recoveries of one shard: the first rebuilt state had rank 0 up to step 9 (steps 10-11,
    answered by the primary before it, lost), the second had it up to step 24 (step 25 lost) and
    rank 1 up to 29 (nothing lost)."""
    lost = {10, 11, 25}
    applied = {0: _counts(set(range(35)) - lost, 35), 1: _counts(set(range(35)), 35)}
    takeovers = [[[0, 10], [1, 10]], [[0, 25], [1, 30]]]
    assert updates_lost_by_recovery(applied, _cfg(), takeovers) == [2, 1]
    # every lost update is counted once, by one recovery
    assert sum(updates_lost_by_recovery(applied, _cfg(), takeovers)) == updates_lost_in(
        applied, _cfg()
    )
    assert updates_lost_by_recovery(applied, _cfg(), []) == []


def test_a_ranks_last_push_lost_counts_once_the_run_completed():
    """Found by the relaxed-durability chaos test: rank 2's push of the last step (49) was
    answered, then lost with its primary; no later push of that rank makes it a hole below its
    last applied step, but a completed run had every push answered, the last one included."""
    applied = {0: _counts(set(range(50)), 50), 2: _counts(set(range(49)), 49)}
    assert updates_lost_in(applied, _cfg()) == 0  # not knowing where the run ended
    assert sorted(lost_updates(applied, _cfg(), total_steps=50).values()) == [(2, 49)]
    assert updates_lost_by_recovery(applied, _cfg(), [[[0, 30], [2, 30]]], 50) == [1]
    # Downpour: the last step pushes too (n_push 4, 50 steps: steps 3, 7, ..., 47 and 49)
    downpour = {0: bytes(1 if (s + 1) % 4 == 0 else 0 for s in range(48))}
    assert list(lost_updates(downpour, _cfg(n_push=4), total_steps=50).values()) == [(0, 49)]
