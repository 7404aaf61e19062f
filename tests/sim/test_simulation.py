"""The recovery protocol explored without Ray: seeded schedules with every fault, judged by the
independent checker."""

import os
import random

import pytest

from raytrain_ft.sim import (
    MODES,
    MUST_REACH,
    explore,
    process_pool,
    run_schedule,
)
from raytrain_ft.sim.bugs import (
    BUGS,
    SHOWN_ONLY_IN,
    USES_RULE,
    AckBeforeLog,
    DoubleApply,
    VolatileEpochs,
    protocol_classes,
)
from raytrain_ft.sim.world import random_config

SCHEDULES_PER_MODE = int(os.environ.get("RAYTRAIN_FT_SIM_SCHEDULES", "1000"))
"""In the default suite (25-50 s on 2 cores); the extended tier runs 10,000 more per mode."""
VARIANT_SCHEDULES = 4000
"""Each known-bad variant is caught within this many schedules of seed 7 (the latest,
``eager-retire`` and ``per-rank-start``, at the 447th; a bug in a rule only some configurations use
is explored in those alone, ``run_schedule``); an exploration stops at its first violation."""
PROCESSES = os.cpu_count() or 1
NICENESS = 15
"""The explorations' processes run at the niceness Ray starts its actors at: beside the other
stream's Ray tests (tests/conftest.py) they share the cores equally. At the normal priority they
took nearly all of it -- a server recovery beside them took 48.7 s, 0.07-0.2 s alone."""


@pytest.fixture(scope="module")
def pool():
    """One pool for the module's explorations (each process imports the protocol and torch once)."""
    with process_pool(PROCESSES, NICENESS) as p:
        yield p


@pytest.mark.parametrize(
    "seed, per_mode",
    [
        (2026, SCHEDULES_PER_MODE),
        pytest.param(2027, 10_000, marks=pytest.mark.extended),
    ],
    ids=["default", "extended"],
)
def test_no_schedule_violates_an_invariant_in_any_mode(seed, per_mode, pool):
    ex = explore(per_mode * len(MODES), seed=seed, modes=MODES, processes=PROCESSES, pool=pool)
    v = ex.first_violation
    assert ex.violations == 0, (
        f"schedule {v.seed} ({v.mode}): {v.violations[0]} -- replay: raytrain-ft simulate --replay "
        f"{v.seed} --mode {v.mode}"
    )
    assert ex.schedules == per_mode * len(MODES)
    assert ex.crashes >= ex.schedules  # the schedules did crash things (about two faults each)
    unreached = [path for path in MUST_REACH if not ex.coverage[path]]
    assert not unreached, f"no schedule reached {unreached}: {dict(ex.coverage)}"


@pytest.mark.parametrize("bug", sorted(BUGS))
def test_every_known_bad_variant_is_caught(bug, pool):
    """The checker can fail: each injected protocol bug is found within 4,000 schedules of the
    modes it can show in (``SHOWN_ONLY_IN``; the others' schedules could not catch it)."""
    modes = SHOWN_ONLY_IN[bug][0] if bug in SHOWN_ONLY_IN else MODES
    ex = explore(
        VARIANT_SCHEDULES, seed=7, modes=modes, bugs=(bug,), processes=PROCESSES, pool=pool
    )
    assert ex.violations >= 1, f"{bug} was not caught in {VARIANT_SCHEDULES} schedules"


def test_no_one_is_replaced_as_silent_for_the_time_the_supervisor_was_held_up(pool):
    """Schedules whose faults include the supervisor held up 120-500 ms (longer than
    ``suspect_after_s``) right after it sent a probe round: the answers that came meanwhile wait
    behind the round's timeout, which fires first when it runs again. No process may be replaced
    as silent while an answer of its waits there, and every other check holds. (With a late
    timeout ending the round at once, ``no-held-up-grace``, the 5th schedule of seed 7 fails.)"""
    ex = explore(1000, seed=2026, modes=MODES, processes=PROCESSES, pool=pool, holdups=True)
    v = ex.first_violation
    assert ex.violations == 0, (
        f"schedule {v.seed} ({v.mode}): {v.violations[0]} -- replay: raytrain-ft simulate --replay "
        f"{v.seed} --mode {v.mode} --holdups"
    )
    assert ex.coverage["held_up_answers"] >= 50, dict(ex.coverage)


def test_a_bug_shown_only_in_some_modes_is_so_by_the_schedules_of_every_mode():
    """SHOWN_ONLY_IN, judged from the schedules' configurations: a mode it names uses the rule the
    bug breaks in some schedules, any other mode in none (simulate refuses such a pairing)."""
    uses = USES_RULE
    rng = random.Random(3)
    for mode in MODES:
        configs = [random_config(rng, mode) for _ in range(500)]
        for name, (modes, rule) in SHOWN_ONLY_IN.items():
            assert any(uses[rule](c) for c in configs) == (mode in modes), (name, mode)


def test_bugs_of_one_role_are_combined_not_replaced():
    server, supervisor = protocol_classes(["ack-before-log", "double-apply", "volatile-epochs"])
    assert issubclass(server, AckBeforeLog) and issubclass(server, DoubleApply)
    assert supervisor is VolatileEpochs


def test_a_parallel_exploration_stops_where_one_process_would(pool):
    """Spread over processes, an exploration reports the same first violation as one process and
    has run only the schedules up to it (the chunks come back in order)."""
    one = explore(300, seed=7, bugs=("last-holder-only",), processes=1)
    spread = explore(300, seed=7, bugs=("last-holder-only",), processes=PROCESSES, pool=pool)
    assert one.first_violation is not None and one.first_index >= 25  # past the first chunk
    assert spread.first_violation.seed == one.first_violation.seed
    assert spread.schedules == one.schedules == one.first_index + 1


def test_a_schedule_replays_event_for_event():
    a = run_schedule(12345, "async", trace=True)
    b = run_schedule(12345, "async", trace=True)
    assert a.trace == b.trace and a.faults == b.faults and len(a.trace) > 100
    assert run_schedule(12346, "async", trace=True).trace != a.trace


def test_a_schedule_does_not_depend_on_the_string_hash_seed():
    """Each process hashes strings with its own seed, so a set of names iterates in another order
    in another process; the schedules must not (a replay or a parallel exploration would then
    not see what the exploration saw)."""
    import subprocess
    import sys

    code = (
        "from raytrain_ft.sim import explore; e = explore(150, seed=2026); "
        "print(e.faults, e.events, e.crashes)"
    )
    runs = [  # side by side: one core each
        subprocess.Popen(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": str(h)},
            preexec_fn=lambda: os.nice(NICENESS),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for h in (1, 2)
    ]
    outs = [run.communicate(timeout=300) for run in runs]
    assert all(run.returncode == 0 for run in runs), [err[-2000:] for _, err in outs]
    assert len({out for out, _ in outs}) == 1, outs


def test_the_exploration_covers_processes_that_preaggregate():
    """Sync and mixed schedules draw processes of 2 and 3 ranks that send one push for all of
    them (whose ranks die together), next to a push per rank."""
    import random

    from raytrain_ft.sim.world import random_config

    drawn = [random_config(random.Random(s), "sync").preaggregate for s in range(300)]
    assert {1, 2, 3} <= set(drawn) and len(drawn) - drawn.count(1) >= 75
    mixed = [random_config(random.Random(s), "mixed") for s in range(300)]
    assert sum(c.preaggregate > 1 for c in mixed) >= 75  # in mixed mode, processes are its groups
    assert all(c.preaggregate in (1, c.group_size) for c in mixed)
    assert all(random_config(random.Random(s), "async").preaggregate == 1 for s in range(50))


def test_probe_rounds_keep_their_interval():
    """One chain of probe timers: a round started otherwise (a look-again after a change, a
    worker's failure report) does not start a second chain. Before, chains piled up over a run
    (22.7 rounds per simulated second here at a 0.08 s interval; 17.6 rounds/s in a real 1-worker
    run at 0.2 s), and every round is a Ray call to every process."""
    from raytrain_ft.sim.world import SUPERVISOR, SimConfig, World

    cfg = SimConfig(mode="sync", num_workers=2, num_shards=2, steps=15, num_nodes=1, compute_s=0.5)
    world = World(cfg, 7, faults=False)
    outcome = world.run()
    assert outcome.finished
    rounds, interval = world.procs[SUPERVISOR].obj._rounds, world.sup_spec.probe_interval_s
    assert rounds <= 1.1 * outcome.sim_time_s / interval + 5, (rounds, outcome.sim_time_s)


def test_a_bug_in_a_rule_is_explored_only_in_schedules_that_use_the_rule():
    """With such a bug injected, a schedule's configuration is drawn again (from the same seed)
    until it uses the rule; replayed, the schedule is the same; without the bug, or in a mode
    where the rule is never used, the configuration is the first drawn."""
    for i in range(20):
        shown = run_schedule(7000 + i, "sync", bugs=("per-rank-start",))
        assert USES_RULE["pre-aggregation"](shown.config)
        again = run_schedule(7000 + i, "sync", bugs=("per-rank-start",))
        assert (again.config, again.faults, again.events) == (
            shown.config,
            shown.faults,
            shown.events,
        )
    plain = [run_schedule(7000 + i, "sync").config for i in range(20)]
    assert not all(USES_RULE["pre-aggregation"](c) for c in plain)
    assert plain[0] == random_config(random.Random(7000), "sync")
    relaxed = run_schedule(7000, "sync", bugs=("relaxed-overrun",)).config
    assert relaxed == plain[0]  # sync never uses relaxed durability: nothing to look for
