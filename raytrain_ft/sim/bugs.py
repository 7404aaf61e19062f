"""Known-bad protocol variants (``raytrain-ft simulate --inject-bug NAME``): each must be caught by
the checker.

Each is a subclass that undoes one rule the protocol depends on; a checker
that passes them all would be a checker that cannot fail.
"""

from __future__ import annotations

import dataclasses

from raytrain_ft.consistency import Verdict, mean_in_rank_order
from raytrain_ft.optim import clip_factor
from raytrain_ft.protocol.messages import Kill, PushReply, Reply
from raytrain_ft.protocol.server import ServerProtocol
from raytrain_ft.protocol.supervisor import (
    Registry,
    SupervisorProtocol,
    WorkerPhase,
    decide,
    resume_step,
)


class AckBeforeLog(ServerProtocol):
    """Answers workers as soon as their update is applied, before the holder has logged it."""

    def _logged(self, p) -> int:
        return p.state.seq


class NoFencing(ServerProtocol):
    """Holders take appends and installs from any epoch, and an export raises no fence."""

    def _admits(self, held, epoch: int) -> bool:
        return True

    def _raise_fence(self, held, epoch: int) -> bool:
        return True


class DoubleApply(ServerProtocol):
    """A resent push is applied again instead of being answered as a repeat."""

    def _classify(self, p, m) -> Verdict:
        verdict = super()._classify(p, m)
        return Verdict.ACCEPT if verdict is Verdict.REPEAT else verdict


class PerShardClip(ServerProtocol):
    """Global clipping done wrong: each shard clips its part of the update by its own part's norm
    instead of the factor the workers computed from every shard's."""

    def _clip_factor(self, c) -> float:
        return clip_factor([c.sq_norm], self.spec.optim.clip_grad_norm)


class PartialSkip(ServerProtocol):
    """fp16 done wrong: a shard drops only the overflowed pushes of an update and applies the mean
    of the others, instead of skipping the whole update."""

    def _skips(self, pending) -> bool:
        for rank in [r for r, g in pending.grads.items() if g is None]:
            del pending.grads[rank]
            pending.base_versions.pop(rank, None)
        return not pending.grads


class UngroupedMean(ServerProtocol):
    """Pre-aggregation done wrong: a push carrying the sum of several ranks' gradients counts as
    one gradient in the update's mean."""

    def _aggregate(self, p, pending):
        return mean_in_rank_order(pending.grads, self.spec.rule.sum_group)


class VolatileEpochs(SupervisorProtocol):
    """A restarted supervisor forgets the epochs it handed out and numbers them from the start
    again."""

    @classmethod
    def restore(cls, spec, ranges, params_of, saved: str, now: float, **kw):
        reg = Registry.from_json(saved)
        reg.reserved = [0] * len(reg.reserved)
        for slot in reg.slots:
            slot.epoch = 0
        return super().restore(spec, ranges, params_of, reg.to_json(), now, **kw)


class LostPendingStart(SupervisorProtocol):
    """A restarted supervisor forgets which workers it created but had not started yet."""

    @classmethod
    def restore(cls, spec, ranges, params_of, saved: str, now: float, **kw):
        reg = Registry.from_json(saved)
        for w in reg.workers:
            if w.phase in (WorkerPhase.CREATING, WorkerPhase.STARTING):
                w.phase = WorkerPhase.RUNNING
        return super().restore(spec, ranges, params_of, reg.to_json(), now, **kw)


class DurableTooSoon(ServerProtocol):
    """``--durability pipelined``: early answers claim their update is logged, so workers forget
    the push instead of keeping it for a rebuilt primary that lacks the update."""

    def _release(self) -> list:
        return [
            dataclasses.replace(e, value=dataclasses.replace(e.value, durable=True))
            if isinstance(e, Reply) and isinstance(e.value, PushReply)
            else e
            for e in super()._release()
        ]


class RelaxedOverrun(ServerProtocol):
    """``--durability relaxed:K`` done wrong: a primary answers one update more than the K it may
    hold unlogged, so its death can lose K + 1 acknowledged updates."""

    def _logged(self, p) -> int:
        return super()._logged(p) + (1 if self.spec.unlogged else 0)


class PerRankStart(SupervisorProtocol):
    """Pre-aggregation done wrong: each rank of a process is started at its own resume step, as if
    it pushed alone (ranks started in different rounds may get different steps and then wait on
    each other)."""

    def _start_step(self, descriptions, rank: int) -> int:
        return resume_step(descriptions, rank)


class LoneRestart(SupervisorProtocol):
    """Pre-aggregation done wrong: a dead (or suspected) rank is re-created on its own, not with
    its process's other ranks (which then wait for a rank in another process)."""

    @staticmethod
    def decide(reg, view, busy, spec, now):
        return decide(reg, view, busy, dataclasses.replace(spec, process_ranks=1), now)


class EagerRetire(SupervisorProtocol):
    """A replaced server that was only suspected is killed at once, though it may hold the only
    copy of a replica its successor lacks (break before make)."""

    def _retire(self, j: int, old, reason: str) -> list:
        return [Kill(old, reason)]


class LastHolderOnly(SupervisorProtocol):
    """A recovery refused by the last holder named (it never got the replica: a replicate toward
    it was still on its way) declares the shard lost, though the holder named before it, kept
    retiring, has every acknowledged update."""

    def _earlier_holder(self, shard: int, refused_by):
        return None


class AnsweringOnlyAbandon(SupervisorProtocol):
    """A recovery whose holder was lost is abandoned only if the primary it replaces answers
    again: one still silent (only suspected, alive) fails the run, though it holds the only copy
    of its shard."""

    def _may_serve_on(self, slot) -> bool:
        return (
            super()._may_serve_on(slot) and self.view.condition(slot.replacing, self.spec) == "ok"
        )


class NoHeldUpGrace(SupervisorProtocol):
    """A probe round's timeout that fires late (the supervisor itself was held up) ends the round at
    once: everyone whose answer waits behind the timer is judged silent and replaced."""

    def _put_off(self, now: float) -> bool:
        return False


BUGS = {
    "ack-before-log": ("server", AckBeforeLog),
    "no-fencing": ("server", NoFencing),
    "double-apply": ("server", DoubleApply),
    "per-shard-clip": ("server", PerShardClip),
    "partial-skip": ("server", PartialSkip),
    "durable-too-soon": ("server", DurableTooSoon),
    "ungrouped-mean": ("server", UngroupedMean),
    "relaxed-overrun": ("server", RelaxedOverrun),
    "volatile-epochs": ("supervisor", VolatileEpochs),
    "lost-pending-start": ("supervisor", LostPendingStart),
    "per-rank-start": ("supervisor", PerRankStart),
    "lone-restart": ("supervisor", LoneRestart),
    "eager-retire": ("supervisor", EagerRetire),
    "last-holder-only": ("supervisor", LastHolderOnly),
    "answering-only-abandon": ("supervisor", AnsweringOnlyAbandon),
    "no-held-up-grace": ("supervisor", NoHeldUpGrace),
}

SHOWN_ONLY_WITH_HOLDUPS = frozenset({"no-held-up-grace"})
"""Bugs that only schedules holding the supervisor up can show (``World(holdups=True)``,
``simulate --holdups``): injecting one turns the hold-ups on."""


def with_holdups(bugs, asked: bool) -> bool:
    """Whether schedules hold the supervisor up: ``asked`` for, or a bug only they can show."""
    return asked or bool(SHOWN_ONLY_WITH_HOLDUPS & set(bugs))


SHOWN_ONLY_IN = {
    "per-shard-clip": (("sync", "mixed"), "global clipping"),
    "durable-too-soon": (("sync",), "pipelined durability"),
    "ungrouped-mean": (("sync", "mixed"), "pre-aggregation"),
    "per-rank-start": (("sync", "mixed"), "pre-aggregation"),
    "lone-restart": (("sync", "mixed"), "pre-aggregation"),
    "relaxed-overrun": (("async",), "relaxed durability"),
}
"""Bugs in a rule that the simulator's schedules use only in some modes (``random_config``): the
modes they can show in and the rule they break. Every other bug shows in every mode."""

USES_RULE = {
    "global clipping": lambda c: c.clip is not None,
    "pipelined durability": lambda c: c.pipelined,
    "pre-aggregation": lambda c: c.preaggregate > 1,
    "relaxed durability": lambda c: c.unlogged > 0,
}
"""Whether a schedule's configuration uses a rule of ``SHOWN_ONLY_IN``."""


def can_show(bugs, mode: str):
    """A test of a configuration: whether it uses a rule one of ``bugs`` breaks (``SHOWN_ONLY_IN``)
    in ``mode``; None where every configuration can show them (a bug of every mode among them,
    or none of their rules used in ``mode``)."""
    rules = []
    for name in bugs:
        if name not in SHOWN_ONLY_IN:
            return None
        modes, rule = SHOWN_ONLY_IN[name]
        if mode in modes:
            rules.append(USES_RULE[rule])
    if not rules:
        return None
    return lambda c: any(uses(c) for uses in rules)


def refuse_unshowable(bugs, modes) -> None:
    """ValueError for a bug that the explored modes cannot show (no schedule of theirs uses the
    rule it breaks), naming the modes that can."""
    for name in bugs:
        shown_in, rule = SHOWN_ONLY_IN.get(name, (None, ""))
        if shown_in is not None and not set(modes) & set(shown_in):
            raise ValueError(
                f"{name} breaks {rule}, which the schedules of {' or '.join(modes)} do not use "
                f"(no schedule could show it); use --mode {' or '.join(shown_in)} (or all)"
            )


def protocol_classes(bugs) -> tuple[type, type]:
    """(server class, supervisor class) with the named bugs switched on: several bugs of one role
    make one class that has each of them (each overrides its own methods)."""
    chosen: dict[str, list[type]] = {"server": [], "supervisor": []}
    for name in bugs:
        if name not in BUGS:
            raise ValueError(f"unknown bug {name!r}; choose from {', '.join(BUGS)}")
        role, cls = BUGS[name]
        if cls not in chosen[role]:
            chosen[role].append(cls)

    def combined(base: type, classes: list[type]) -> type:
        if len(classes) <= 1:
            return classes[0] if classes else base
        return type("+".join(c.__name__ for c in classes), tuple(classes), {})

    return (
        combined(ServerProtocol, chosen["server"]),
        combined(SupervisorProtocol, chosen["supervisor"]),
    )
