"""Kill specifications (``ROLE[:INDEX]@step=N | @time=S | @recovery=N | @snapshot=N``) and random
schedules.

Pure: parsing, validation and scheduling. ``recovery/chaos.py`` carries the
kills out against a running run.

Triggers:
- ``step=N``: once the slowest worker has reached step N;
- ``time=S``: S seconds after training started;
- ``recovery=N``: while the supervisor's N-th server recovery is in progress (fired by the
  supervisor; ``server:i`` names the replacement being rebuilt when i is the shard being recovered);
- ``rereplication=N``: while the supervisor's N-th re-replication (a snapshot to a new holder) is in
  progress (``supervisor@recovery=N`` / ``@rereplication=N``: the supervisor dies right after it
  started them);
- ``snapshot=N``: ``server:i`` dies right after sending its N-th snapshot, ``replica:i`` right after
  receiving it, before installing it (fired inside the actor).

Stragglers (``RANK:MS``, see ``parse_slow``): a worker that takes MS milliseconds longer per step.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from raytrain_ft.errors import ConfigError

ROLES = ("server", "replica", "worker", "spare", "supervisor", "node")
TRIGGERS = ("step", "time", "recovery", "rereplication", "snapshot")
COUNTED_TRIGGERS = ("recovery", "rereplication", "snapshot")
"""Triggers that count events from 1 (the first recovery, re-replication, snapshot)."""
FIELD = "chaos.kill"
"""The config field kills are given in (``--kill``)."""
MAX_SLOW_MS = 3_600_000.0
"""Longest straggler delay per step (``--slow-workers RANK:MS``): one hour."""


@dataclass(frozen=True, slots=True)
class KillSpec:
    role: str
    index: int
    trigger: str
    value: float

    def __str__(self) -> str:
        value = int(self.value) if self.trigger != "time" else self.value
        return f"{self.role}:{self.index}@{self.trigger}={value}"


def never_fired(kills: list[str], fired: list[dict]) -> list[str]:
    """The kills (as written) no record of ``fired`` names."""
    done = {record["kill"] for record in fired}
    return [k for k in kills if k not in done]


def parse_kill(text: str, field: str = FIELD) -> KillSpec:
    """Parse ``ROLE[:INDEX]@TRIGGER=VALUE`` (e.g. ``server:1@step=40``, ``node:2@time=5``)."""
    usage = (
        "expected ROLE[:INDEX]@step=N or @time=S "
        "(or @recovery=N, @rereplication=N, @snapshot=N), e.g. server:0@step=20"
    )
    target, sep, when = text.strip().partition("@")
    if not sep:
        raise ConfigError(field, f"{text!r}: {usage}")
    role, _, index_text = target.partition(":")
    if role not in ROLES:
        raise ConfigError(
            field, f"{text!r}: unknown role {role!r}; choose one of {', '.join(ROLES)}"
        )
    try:
        index = int(index_text) if index_text else 0
    except ValueError:
        raise ConfigError(field, f"{text!r}: index {index_text!r} is not an integer") from None
    trigger, eq, value_text = when.partition("=")
    if not eq or trigger not in TRIGGERS:
        raise ConfigError(field, f"{text!r}: {usage}")
    try:
        value = float(value_text)
    except ValueError:
        raise ConfigError(field, f"{text!r}: {value_text!r} is not a number") from None
    if not math.isfinite(value):
        raise ConfigError(field, f"{text!r}: {value_text!r} is not a finite number")
    if index < 0 or value < 0:
        raise ConfigError(field, f"{text!r}: index and value must be >= 0")
    if trigger != "time" and not value_text.strip().isdigit():  # as --steps takes it: not 1e3
        raise ConfigError(field, f"{text!r}: @{trigger} takes a whole number, got {value_text!r}")
    if trigger in COUNTED_TRIGGERS and value < 1:
        raise ConfigError(
            field, f"{text!r}: @{trigger} counts from 1 (the first {trigger} is {trigger}=1)"
        )
    if trigger == "snapshot" and role not in ("server", "replica"):
        raise ConfigError(field, f"{text!r}: @snapshot applies to server or replica only")
    if role == "node" and index == 0:
        raise ConfigError(
            field,
            f"{text!r}: node 0 is the head node (it runs the supervisor and Ray's control plane); "
            "kill node 1 or higher",
        )
    return KillSpec(role, index, trigger, value)


def parse_kills(texts: str | list[str] | None, field: str = FIELD) -> list[KillSpec]:
    """Several specs, from a list or one comma-separated string; the same kill twice is an error."""
    if not texts:
        return []
    if isinstance(texts, str):
        texts = [texts]
    kills: list[KillSpec] = []
    for text in texts:
        for part in str(text).split(","):
            if not part.strip():
                raise ConfigError(
                    field,
                    f"{str(text)!r}: an empty kill between commas (a stray comma?); give "
                    "ROLE[:INDEX]@step=N specs separated by single commas",
                )
            k = parse_kill(part, field)
            if k in kills:
                raise ConfigError(
                    field,
                    f"{part.strip()!r}: the same kill is given twice ({k}); give each kill once",
                )
            kills.append(k)
    return kills


def check_targets(
    kills: list[KillSpec],
    num_shards: int | str,
    num_workers: int,
    num_nodes: int,
    num_spares: int = 1,
    field: str = FIELD,
    recovery_mode: str = "replica",
) -> None:
    """Each kill names something the run has (``num_shards`` auto: only shard 0 is known to
    exist before the run starts; without ``--recovery replica`` no replica, snapshot or
    re-replication; with ``--recovery none`` no spare)."""
    if recovery_mode != "replica":
        for k in kills:
            if k.role == "replica" or k.trigger in ("snapshot", "rereplication"):
                what = {"snapshot": "snapshots", "rereplication": "re-replications"}.get(
                    k.trigger, "replica holder"
                )
                raise ConfigError(
                    field,
                    f"{k}: --recovery {recovery_mode} keeps no replicas (so no {what}); use "
                    "--recovery replica",
                )
    if recovery_mode == "none":
        num_spares = 0  # nothing is rebuilt, so no spare is started
    if num_shards == "auto":
        for k in kills:
            if k.role in ("server", "replica") and k.index > 0:
                raise ConfigError(
                    field,
                    f"{k}: --num-servers auto picks the shard count when the run starts, so only "
                    f"{k.role}:0 is sure to exist; set --num-servers to kill shard {k.index}",
                )
        num_shards = 1
    limits = {
        "server": num_shards,
        "replica": num_shards,
        "worker": num_workers,
        "spare": num_spares,
        "supervisor": 1,
        "node": num_nodes,
    }
    for k in kills:
        if k.index >= limits[k.role]:
            extra = (
                " (run with --local-nodes N to simulate nodes)"
                if k.role == "node" and num_nodes <= 1
                else ""
            )
            raise ConfigError(
                field,
                f"{k}: the run has {limits[k.role]} {k.role}(s), index {k.index} does not "
                f"exist{extra}",
            )


def check_live_kills(kills: list[KillSpec], field: str = FIELD) -> None:
    """Kills ``raytrain-ft chaos`` can fire against a run already going: @step or @time of an
    actor (a node, and kills on the run's own protocol events, are the run's own ``--kill``)."""
    unsupported = [str(k) for k in kills if k.trigger not in ("step", "time") or k.role == "node"]
    if unsupported:
        raise ConfigError(
            field,
            f"{', '.join(unsupported)}: against a running run only "
            "server/replica/worker/spare/supervisor kills "
            "@step or @time work; give node/@recovery/@rereplication/@snapshot kills to "
            "`raytrain-ft train --kill`",
        )


def check_kills_of(cfg) -> list[KillSpec]:
    """The run's ``--kill`` list, each checked against what the run config has (before the run,
    and before a job is submitted)."""
    kills = parse_kills(cfg.chaos.kill)
    check_targets(
        kills,
        cfg.cluster.num_servers,
        cfg.cluster.num_workers,
        cfg.cluster.local_nodes,
        cfg.recovery.num_spares,
        recovery_mode=cfg.recovery.mode,
    )
    if cfg.steps is not None:  # the run's length is known without its data (else checked later)
        total = cfg.steps
        if cfg.mode == "local_sgd":
            from raytrain_ft.consistency import local_rounds

            total = local_rounds(cfg.steps, cfg.consistency.local_steps)
        check_steps(kills, total)
    return kills


def check_steps(kills: list[KillSpec], total_steps: int, field: str = FIELD) -> None:
    """Each ``@step`` kill falls inside the run: once ``total_steps`` are done the run is over and
    the kill would never fire."""
    for k in kills:
        if k.trigger == "step" and k.value >= total_steps:
            raise ConfigError(
                field,
                f"{k}: the run ends after step {total_steps}, so this kill would never fire; "
                f"kill at a step below {total_steps}, or train longer (--epochs / --steps)",
            )


MAX_RANDOM_KILLS = 10_000
"""Most kills a random schedule may hold (expected: duration ÷ mean time between failures)."""


def random_schedule(
    seed: int,
    mtbf_s: float,
    duration_s: float,
    roles: list[str],
    sizes: dict[str, int],
    min_gap_s: float = 0.0,
) -> list[KillSpec]:
    """Kills over ``duration_s`` with gaps ``min_gap_s + Exp(mean mtbf_s - min_gap_s)`` (mean
    ``mtbf_s``); roles and indices uniform.

    ``min_gap_s`` keeps kills apart by more than a recovery: the replicas survive any single
    failure, not a second one that hits a ring neighbour before the first is repaired.
    """
    for name, value in (
        ("--mtbf-s", mtbf_s),
        ("--duration-s", duration_s),
        ("--min-gap-s", min_gap_s),
    ):
        if not math.isfinite(value) or value < 0:
            raise ConfigError(name, f"must be a finite number >= 0, got {value!r}")
    if mtbf_s <= 0 or not 0 <= min_gap_s < mtbf_s:
        raise ConfigError(
            "--mtbf-s",
            f"need --mtbf-s > --min-gap-s >= 0, got --mtbf-s {mtbf_s}, --min-gap-s {min_gap_s}",
        )
    bad = [r for r in roles if r not in ROLES]
    if bad or not roles:
        raise ConfigError("--roles", f"{bad or roles}: choose from {', '.join(ROLES)}")
    if duration_s / mtbf_s > MAX_RANDOM_KILLS:
        raise ConfigError(
            "--mtbf-s",
            f"--duration-s {duration_s:g} at --mtbf-s {mtbf_s:g} would schedule about "
            f"{duration_s / mtbf_s:,.0f} kills (at most {MAX_RANDOM_KILLS:,}); raise --mtbf-s or "
            "shorten --duration-s",
        )
    rng = random.Random(seed)
    out, t = [], 0.0
    while True:
        t += min_gap_s + rng.expovariate(1.0 / (mtbf_s - min_gap_s))
        if t >= duration_s:
            return out
        role = rng.choice(roles)
        low = 1 if role == "node" else 0
        index = rng.randrange(low, max(low + 1, sizes.get(role, 1)))
        out.append(KillSpec(role, index, "time", round(t, 3)))


def parse_slow(
    text: str | None, num_workers: int | None = None, field: str = "chaos.slow_workers"
) -> dict[int, float]:
    """``RANK:MS[,RANK:MS...]`` -> {rank: extra seconds per step}."""
    out: dict[int, float] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        rank_text, sep, ms_text = part.strip().partition(":")
        try:
            rank, ms = int(rank_text), float(ms_text)
        except ValueError:
            rank, ms = -1, -1.0
        if not sep or rank < 0 or not 0 <= ms <= MAX_SLOW_MS:  # (NaN fails the comparison too)
            raise ConfigError(
                field,
                f"{part.strip()!r}: expected RANK:MS with RANK >= 0 and MS a number from 0 to "
                f"{int(MAX_SLOW_MS):,} "
                "(an hour), e.g. 3:200",
            )
        if num_workers is not None and rank >= num_workers:
            raise ConfigError(
                field, f"{part.strip()!r}: rank {rank} does not exist (--num-workers {num_workers})"
            )
        if rank in out:
            raise ConfigError(
                field, f"{part.strip()!r}: rank {rank} is given twice; give each rank once"
            )
        out[rank] = ms / 1000.0
    return out
