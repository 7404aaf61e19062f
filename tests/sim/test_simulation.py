"""The recovery protocol explored without Ray: seeded schedules with every fault, judged by the
independent checker."""

import os

import pytest

from raytrain_ft.sim import MODES, explore, run_schedule
from raytrain_ft.sim.bugs import BUGS

SCHEDULES_PER_MODE = int(os.environ.get("RAYTRAIN_FT_SIM_SCHEDULES", "10000"))
PROCESSES = os.cpu_count() or 1


def test_no_schedule_violates_an_invariant_in_any_mode():
    ex = explore(SCHEDULES_PER_MODE * len(MODES), seed=2026, modes=MODES, processes=PROCESSES)
    v = ex.first_violation
    assert ex.violations == 0, (
        f"schedule {v.seed} ({v.mode}): {v.violations[0]} -- replay: raytrain-ft simulate --replay "
        f"{v.seed} --mode {v.mode}"
    )
    assert ex.schedules == SCHEDULES_PER_MODE * len(MODES)
    assert ex.crashes >= ex.schedules  # the schedules did crash things (about two faults each)


@pytest.mark.parametrize("bug", sorted(BUGS))
def test_every_known_bad_variant_is_caught(bug):
    """The checker can fail: each injected protocol bug is found within 2,000 schedules."""
    ex = explore(2000, seed=7, modes=MODES, bugs=(bug,), processes=PROCESSES)
    assert ex.violations >= 1, f"{bug} was not caught in 2000 schedules"


def test_a_schedule_replays_event_for_event():
    a = run_schedule(12345, "async", trace=True)
    b = run_schedule(12345, "async", trace=True)
    assert a.trace == b.trace and a.faults == b.faults and len(a.trace) > 100
    assert run_schedule(12346, "async", trace=True).trace != a.trace
