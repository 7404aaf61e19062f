"""Deterministic simulation of the recovery protocol (no Ray): seeded schedules, every fault, an
independent checker.

``explore(schedules, seed, modes)`` runs schedule after schedule, each a
``World`` built from ``schedule_seed(seed, i)``: a random configuration
(workers, shards, steps, snapshot interval, folding, nodes, spares, backup
workers) and a random fault plan, then ``checker.check``. Schedules are
independent, so ``processes > 1`` splits them over processes with the same
results. ``run_schedule(seed, mode, trace=True)`` replays one schedule event
for event. ``raytrain-ft simulate`` is the command line.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field

from raytrain_ft.consistency import MODES as ALL_MODES
from raytrain_ft.sim.bugs import can_show, with_holdups
from raytrain_ft.sim.checker import baseline_hash, check
from raytrain_ft.sim.world import Violation, World, random_config

MODES = tuple(m for m in ALL_MODES if m != "local_sgd")
"""The modes explored. local_sgd is sync to the shards (one push per rank per round, the same Rule
answers): the sync schedules are its schedules."""


MUST_REACH = (
    "recovery_started",
    "recovered",
    "recovery_adopted",
    "recovery_abandoned",
    "reinstated",
    "rereplicated",
    "deposed",
    "live_worker_killed",
    "deposed_by_fence",
    "fenced_primary_reinstated",
)
"""Protocol paths the default exploration (4,000 schedules of seed 2026) must each reach in at
least one schedule: a recovery, one adopted after its answer was lost, one abandoned to the
suspected primary it replaced, a primary put back, a replica re-made, a primary deposed by a
successor, a silent worker process killed before it is re-created (each reached in 40 or more of
the 4,000), a primary fenced out by its own recovery's export, and such a primary reinstated once
that recovery was abandoned (its holder's node lost with the export's answer): 36 and 12 of the
4,000, reached in the schedules with slow steps (``world.SLOW_SHARE``), where a falsely suspected
primary still takes pushes when the supervisor acts on the suspicion. A change to the faults or the
protocol that stops reaching one fails the test: a path no schedule reaches is a path the simulator
does not prove."""


def schedule_seed(seed: int, index: int) -> int:
    return (seed * 1_000_003 + index) & 0x7FFFFFFF


@dataclass(slots=True)
class ScheduleResult:
    seed: int
    mode: str
    config: object
    violations: list
    faults: list
    events: int
    trace: list = field(default_factory=list)
    coverage: dict = field(default_factory=dict)


def run_schedule(
    schedule: int, mode: str, bugs=(), trace: bool = False, holdups: bool = False
) -> ScheduleResult:
    """One schedule: its configuration and faults drawn from ``schedule`` (a seed). With a bug
    injected that breaks a rule only some configurations use (``SHOWN_ONLY_IN``), the configuration
    is drawn again from the same seed's stream until it uses that rule: a schedule that could not
    show the bug is not run (the same schedule on replay). ``holdups``: the faults include the
    supervisor held up (``World.holdups``; on for a bug only they can show)."""
    rng = random.Random(schedule)
    cfg = random_config(rng, mode)
    shows = can_show(bugs, mode)
    while shows is not None and not shows(cfg):
        cfg = random_config(rng, mode)
    world = World(
        cfg, schedule, faults=True, bugs=bugs, trace=trace, holdups=with_holdups(bugs, holdups)
    )
    try:
        outcome = world.run()
        baseline = baseline_hash(cfg) if mode == "sync" and not cfg.backup_workers else None
        violations = check(world, outcome, baseline)
    except Exception:  # a protocol state machine raised: a bug like any other violation
        violations = [Violation("exception", traceback.format_exc(limit=6))]
    return ScheduleResult(
        schedule, mode, cfg, violations, world.faults, world.events, world.trace, world.coverage
    )


@dataclass(slots=True)
class Exploration:
    schedules: int = 0
    faults: int = 0
    crashes: int = 0
    events: int = 0
    violations: int = 0
    first_violation: ScheduleResult | None = None
    first_index: int | None = None
    seconds: float = 0.0
    coverage: Counter = field(default_factory=Counter)
    """Per protocol path (``World.coverage``): in how many schedules it was reached."""

    def add(self, other: Exploration) -> None:
        self.schedules += other.schedules
        self.coverage.update(other.coverage)
        self.faults += other.faults
        self.crashes += other.crashes
        self.events += other.events
        self.violations += other.violations
        if other.first_violation is not None and (
            self.first_index is None or other.first_index < self.first_index
        ):
            self.first_violation, self.first_index = other.first_violation, other.first_index


def _explore_slice(args) -> Exploration:
    indices, seed, modes, bugs, stop_at_first, holdups = args
    out = Exploration()
    for i in indices:
        mode = modes[i % len(modes)]
        result = run_schedule(schedule_seed(seed, i), mode, bugs, holdups=holdups)
        out.schedules += 1
        out.faults += len(result.faults)
        out.crashes += sum(("crash" in f) or f.startswith("loss of") for f in result.faults)
        out.events += result.events
        out.coverage.update(dict.fromkeys(result.coverage, 1))
        if result.violations:
            out.violations += 1
            if out.first_violation is None:
                out.first_violation, out.first_index = result, i
            if stop_at_first:
                break
    return out


def process_pool(processes: int, niceness: int = 0):
    """Processes for ``explore`` (one pool may serve several explorations: each process imports the
    protocol once). Spawned, not forked: the caller may hold threads (an initialized Ray, gRPC)
    whose locks a forked child inherits held; a child that dies raises BrokenProcessPool instead of
    leaving the map waiting forever. ``niceness`` is added to each process's (``os.nice``): 15
    shares the cores equally with Ray's actors, which Ray starts at 15."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(
        processes,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=os.nice if niceness else None,
        initargs=(niceness,) if niceness else (),
    )


CHUNK = 25
"""Schedules per unit of work handed to a process: small enough that an exploration stopping at
its first violation wastes little, large enough that the hand-over costs little beside them."""


def explore(
    schedules: int,
    seed: int,
    modes=MODES,
    bugs=(),
    stop_at_first: bool = True,
    processes: int = 1,
    pool=None,
    holdups: bool = False,
) -> Exploration:
    """Run ``schedules`` schedules (mode ``modes[i % len(modes)]`` for the i-th), over ``processes``
    processes (of ``pool`` if given, else started for this call). The schedules go out in chunks of
    ``CHUNK`` and come back in order; with ``stop_at_first`` the exploration stops at the chunk of
    its first violation, so it reports the lowest-numbered violation (the one a single process
    would find) and has run only the schedules up to it (and the chunks already in flight)."""
    t0 = time.perf_counter()
    modes = tuple(modes)
    if processes <= 1 or schedules < 2 * processes:
        out = _explore_slice((range(schedules), seed, modes, tuple(bugs), stop_at_first, holdups))
    else:
        # a pool given by the caller is left running (for its other explorations)
        with process_pool(processes) if pool is None else contextlib.nullcontext(pool) as chosen:
            out = _explore_chunks(
                chosen, schedules, seed, modes, tuple(bugs), stop_at_first, processes, holdups
            )
    out.seconds = time.perf_counter() - t0
    return out


def _explore_chunks(
    pool, schedules, seed, modes, bugs, stop_at_first, processes, holdups
) -> Exploration:
    from collections import deque

    chunks = (
        (range(a, min(a + CHUNK, schedules)), seed, modes, bugs, stop_at_first, holdups)
        for a in range(0, schedules, CHUNK)
    )
    in_flight: deque = deque()
    out = Exploration()
    try:
        while True:
            while len(in_flight) < 2 * processes:  # every process busy, one chunk queued behind
                chunk = next(chunks, None)
                if chunk is None:
                    break
                in_flight.append(pool.submit(_explore_slice, chunk))
            if not in_flight:
                return out
            part = in_flight.popleft().result()
            out.add(part)
            if stop_at_first and part.violations:
                return out
    finally:
        for f in in_flight:  # stopped early: what has not started is dropped
            f.cancel()
