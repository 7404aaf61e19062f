"""The independent checker: judges a finished schedule from its own records, never from the servers'
counters.

What it reads: the final parameters of the shards' live primaries, the
replicas their holders keep, and the *ledger* -- every push a worker saw
answered, recorded by the simulator as the answer was delivered (so it
survives the worker). What it checks:

- **I1, exactly once.** Every simulated push carries, besides its model
  gradient, a provenance value in a slot of its own ``(rank, step)``. The
  shards run SGD with momentum 0.1 and pushes sized so that one application
  moves its slot by 1 (plus momentum's echo, < 0.34); twice by 2 or more. Every
  push answered as applied must have moved its slot exactly once in every
  shard; none may have moved twice; one answered as dropped (late) not at all.
  In sync and async runs that finish, every push of every step counts once.
  With global clipping a slot moves by its update's clip factor instead of 1:
  the checker divides by the factor the *workers* computed for that update.
- **fp16 overflows.** Some pushes are flagged as overflowed (a pure function of
  rank and step); every update holding one must have moved no slot at all.
- **I5, one clip factor per update.** In sync mode every worker that computed
  the factor of an update computed the same one (each from all shards'
  squared norms). Mixed mode restarts a rank on the newest parameters, so a
  gradient resent after a restart may differ, and with it the factor.
- **I2, the same run.** In plain sync mode the final parameters' sha256 equals
  that of the same configuration run without faults.
- **I4, no window left open.** Every shard's replica, replayed, equals its
  primary: parameters, optimizer state, per-rank clocks and applied record,
  staleness histogram and clip factors.
- **I6, acknowledged only once logged.** An answer that tells a worker its
  push's update is logged (with strict or pipelined durability) goes out
  only after a holder acknowledged that update: the simulator records the
  holders' answers to appends and installs as they go out.
- **Liveness.** The run finishes. A schedule in which nothing moves any more
  (no update, no registry change for 5 simulated seconds) is a deadlock.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from raytrain_ft.recovery.replay import replay
from raytrain_ft.sim.world import RunOutcome, SimConfig, Violation, World


@dataclass(frozen=True, slots=True)
class FinalShard:
    shard: int
    epoch: int
    params: np.ndarray
    server: str


def final_primaries(world: World) -> dict[int, FinalShard]:
    """Per shard, the live, not deposed primary with the newest epoch (found from the processes
    themselves). A server that died after the probe round the run's end was decided on started is
    read as it was: no protocol can see a failure in the instant the run ends."""
    seen_until = world.procs["supervisor"].obj.view_started_at
    out: dict[int, FinalShard] = {}
    for proc in world.procs.values():
        if proc.kind != "server" or (not proc.alive and proc.died_at < seen_until):
            continue
        p = proc.obj.primary
        if p is None or p.deposed:
            continue
        i = p.shard.index
        if i not in out or p.epoch > out[i].epoch:
            out[i] = FinalShard(i, p.epoch, proc.obj.params().copy(), proc.name)
    return out


def params_hash(shards: dict[int, FinalShard], num_shards: int) -> str:
    flat = np.concatenate([shards[i].params for i in range(num_shards)])
    return hashlib.sha256(flat.astype(np.float32).tobytes()).hexdigest()


def check(world: World, outcome: RunOutcome, baseline_hash: str | None) -> list[Violation]:
    cfg = world.cfg
    if not outcome.finished:
        why = (
            outcome.failure
            or f"no progress for 5 simulated seconds at t={outcome.sim_time_s:.3f}s "
            f"({stuck(world)})"
        )
        return [Violation("liveness", f"the run did not finish: {why}")]
    shards = final_primaries(world)
    missing = [i for i in range(cfg.num_shards) if i not in shards]
    if missing:
        return [Violation("liveness", f"no live primary serves shards {missing} at the end")]
    out = exactly_once(world, shards)
    out += [Violation("I6", claim) for claim in world.early_acks[:1]]
    out += [Violation("held-up", what) for what in world.judged_while_held[:1]]
    if baseline_hash is not None and cfg.mode == "sync" and not cfg.backup_workers:
        got = params_hash(shards, cfg.num_shards)
        if got != baseline_hash:
            out.append(
                Violation(
                    "I2",
                    f"final params sha256 {got[:16]} differs from the fault-free run's "
                    f"{baseline_hash[:16]}",
                )
            )
    out += replicas_match(world, shards)
    return out


def exactly_once(world: World, shards: dict[int, FinalShard]) -> list[Violation]:
    """I1 from the provenance slots: every push applied once; an acknowledged one never lost. With
    relaxed durability (``cfg.unlogged = K``) an acknowledged push may be lost with its primary,
    at most K updates per primary the shard lost (counted by the world as they crashed or stepped
    down, not from epochs: a recovery re-issued or a primary serving on raises the epoch and loses
    nothing)."""
    cfg, out = world.cfg, []
    rule = cfg.rule()
    lost: dict[int, set] = {}
    applied_acks, late_acks = set(), set()
    for a in world.ledger:
        (late_acks if a.late else applied_acks).add((a.shard, a.rank, a.step))
    for key, seen in world.clip_factors.items():
        if len(seen) > 1 and cfg.mode == "sync":
            out.append(
                Violation("I5", f"update {key}: workers computed different clip factors {seen}")
            )
    # fp16: an update is skipped when any of its pushes overflowed (the workers' own flags)
    flagged = {
        rule.key(r, t)
        for r in range(cfg.num_workers)
        for t in range(cfg.steps)
        if cfg.overflows(r, t)
    }

    for shard in range(cfg.num_shards):
        params = shards[shard].params
        initial = cfg.initial(shard)
        for rank in range(cfg.num_workers):
            for step in range(cfg.steps):
                slot = cfg.slot(rank, step)
                # global clipping scales the update the push went into by its factor (one the
                # workers computed, never the servers' record); in mixed mode a rank restarted
                # mid-update recomputes its gradient on newer parameters, so a shard may have
                # applied the factor computed from either gradient
                scales = world.clip_factors.get(rule.key(rank, step), {1.0}) if cfg.clip else {1.0}
                moved = float(initial[slot] - params[slot])
                readings = {_times(moved / f) for f in scales}
                times = 1 if 1 in readings else min(readings)
                skip = _skip_status(
                    cfg, (shard, step), flagged, rule.key(rank, step), applied_acks, late_acks
                )
                if skip is None:  # a step closed without all ranks: unknown whether it held one
                    continue
                if skip:  # fp16: the update had an overflowed push; nothing moves
                    if times:
                        out.append(
                            Violation(
                                "I1",
                                f"shard {shard}: push (rank {rank}, step {step}) belongs to an "
                                f"update with an overflowed push, which must be skipped, but its "
                                f"slot moved {moved:.3f}",
                            )
                        )
                    continue
                key = (shard, rank, step)
                if times >= 2:
                    out.append(
                        Violation(
                            "I1",
                            f"shard {shard}: push (rank {rank}, step {step}) was applied more than "
                            f"once (slot moved {moved:.3f})",
                        )
                    )
                elif key in applied_acks and times == 0 and cfg.unlogged:
                    lost.setdefault(shard, set()).add(rule.key(rank, step))
                elif key in applied_acks and times == 0:
                    out.append(
                        Violation(
                            "I1",
                            f"shard {shard}: push (rank {rank}, step {step}) was acknowledged but "
                            "is not in the final state",
                        )
                    )
                elif key in late_acks and key not in applied_acks and times:
                    out.append(
                        Violation(
                            "I1",
                            f"shard {shard}: push (rank {rank}, step {step}) was answered as "
                            "dropped but was applied",
                        )
                    )
                elif not cfg.backup_workers and times == 0:
                    out.append(
                        Violation(
                            "I1",
                            f"shard {shard}: push (rank {rank}, step {step}) never reached the "
                            "final state",
                        )
                    )
    for shard, updates in lost.items():
        losses = world.primary_losses.get(shard, 0)
        if len(updates) > cfg.unlogged * losses:
            out.append(
                Violation(
                    "I1",
                    f"shard {shard}: {len(updates)} acknowledged updates lost, more than "
                    f"{cfg.unlogged} (relaxed durability) x {losses} primaries lost: "
                    f"{sorted(updates)}",
                )
            )
    return out


def _skip_status(
    cfg, at: tuple, flagged: set, key, applied_acks: set, late_acks: set
) -> bool | None:
    """fp16: whether shard ``at[0]``'s update ``key`` (of step ``at[1]``) had to be skipped: one
    of its pushes overflowed. With backup workers a step closes with the first pushes in, so an
    overflowed push counts if the ledger says it was applied, not if it was late; None when the
    ledger cannot tell (its worker died before the answer)."""
    if key not in flagged:
        return False
    if not cfg.backup_workers:
        return True
    shard, step = at
    overflowed = [(shard, r, step) for r in range(cfg.num_workers) if cfg.overflows(r, step)]
    if any(k in applied_acks for k in overflowed):
        return True
    return False if all(k in late_acks for k in overflowed) else None


def _times(moved: float) -> int:
    """How many applications a provenance slot's displacement reads as (0, 1, or 2 for more)."""
    return 0 if moved < 0.5 else (1 if moved < 1.67 else 2)


def replicas_match(world: World, shards: dict[int, FinalShard]) -> list[Violation]:
    """I4. A holder that died after the probe round the run's end was decided on started is not
    counted: no protocol can see a failure in the instant the run ends."""
    out = []
    seen_until = world.procs["supervisor"].obj.view_started_at
    for shard, final in shards.items():
        primary = world.procs[final.server].obj.primary
        holder = world.procs.get(primary.holder) if primary.holder else None
        if holder is not None and not holder.alive and holder.died_at >= seen_until:
            continue
        held = holder.obj.replicas.get(shard) if holder is not None and holder.alive else None
        if held is None or not primary.holder_ready:
            out.append(
                Violation(
                    "I4",
                    f"shard {shard}: its primary {final.server} has no live replica at the end",
                )
            )
            continue
        log = held.log
        # relaxed durability: a run may end with up to K acknowledged updates still on their way
        # to the holder; the replica plus those commands must equal the primary
        on_the_way = [c for c, _ in (primary.in_flight[2] if primary.in_flight else [])] + [
            c for c, _ in primary.outbox
        ]
        on_the_way = [c for c in on_the_way if c.seq >= log.next_seq]
        if len(on_the_way) > world.cfg.unlogged:
            out.append(
                Violation(
                    "I4",
                    f"shard {shard}: {len(on_the_way)} updates not logged at the end, more than "
                    f"the {world.cfg.unlogged} durability allows",
                )
            )
            continue
        rebuilt = replay(
            log.snapshot.owned(),
            list(log.entries) + on_the_way,
            held.shard,
            world.spec.optim,
            world.spec.total_steps,
        ).state
        state = primary.state
        same_opt = _same_optimizer(rebuilt.optimizer.state_dict(), state.optimizer.state_dict())
        if not np.array_equal(rebuilt.params.numpy(), state.params.numpy()):
            out.append(
                Violation(
                    "I4",
                    f"shard {shard}: replica on {primary.holder}, replayed, has other parameters "
                    "than the primary",
                )
            )
        elif not same_opt:
            out.append(
                Violation(
                    "I4",
                    f"shard {shard}: replica on {primary.holder}, replayed, has another optimizer "
                    "state",
                )
            )
        elif rebuilt.clocks != state.clocks or rebuilt.applied_copy() != state.applied_copy():
            out.append(
                Violation(
                    "I4",
                    f"shard {shard}: replica on {primary.holder}, replayed, has other per-rank "
                    "clocks or applied pushes",
                )
            )
        elif rebuilt.staleness != state.staleness:
            out.append(
                Violation(
                    "I4",
                    f"shard {shard}: replica on {primary.holder}, replayed, has another staleness "
                    f"histogram {rebuilt.staleness} vs the primary's {state.staleness}",
                )
            )
        elif rebuilt.skipped != state.skipped:
            out.append(
                Violation(
                    "I4",
                    f"shard {shard}: replica on {primary.holder}, replayed, has other skipped "
                    f"steps {rebuilt.skipped} vs the primary's {state.skipped}",
                )
            )
        elif rebuilt.clip_factors != state.clip_factors:
            out.append(
                Violation(
                    "I4",
                    f"shard {shard}: replica on {primary.holder}, replayed, has other clip "
                    f"factors {rebuilt.clip_factors} vs the primary's {state.clip_factors}",
                )
            )
    return out


def _same_optimizer(a: dict, b: dict) -> bool:
    if a["step_count"] != b["step_count"] or set(a["state"]) != set(b["state"]):
        return False
    return all(np.array_equal(a["state"][k].numpy(), b["state"][k].numpy()) for k in a["state"])


def stuck(world: World) -> str:
    """Who waits on what (for a deadlock report)."""
    parts = []
    for proc in world.procs.values():
        if proc.kind == "worker" and proc.alive and not proc.obj.done:
            w = proc.obj
            parts.append(f"{proc.name} step {w.step} {w.phase} started={w.started}")
    reg = world.procs["supervisor"].obj.reg
    parts.append("slots " + ", ".join(f"{s.actor}:{s.phase.value}@{s.epoch}" for s in reg.slots))
    parts.append("workers " + ", ".join(f"{w.actor}:{w.phase.value}" for w in reg.workers))
    return "; ".join(parts)


_baselines: dict[tuple, str] = {}


def baseline_hash(cfg: SimConfig) -> str:
    """The fault-free run's final params hash (sync I2). Plain sync results depend only on the
    workers, shards and steps (not on snapshots, folding, placement or spares), so one fault-free
    run serves every such config (pre-aggregation's summation order is part of the results)."""
    key = (cfg.num_workers, cfg.num_shards, cfg.steps, cfg.clip, cfg.overflow, cfg.preaggregate)
    if key not in _baselines:
        canonical = SimConfig(
            mode="sync",
            num_workers=cfg.num_workers,
            num_shards=cfg.num_shards,
            steps=cfg.steps,
            clip=cfg.clip,
            overflow=cfg.overflow,
            preaggregate=cfg.preaggregate,
        )
        world = World(canonical, seed=0, faults=False)
        outcome = world.run()
        if not outcome.finished:
            raise AssertionError(
                f"the fault-free run of {canonical} did not finish: "
                f"{outcome.failure or stuck(world)}"
            )
        _baselines[key] = params_hash(final_primaries(world), cfg.num_shards)
    return _baselines[key]
