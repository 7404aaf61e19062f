"""Placement and tuning policies (pure): where server slots go, and how often a primary snapshots.

The supervisor's decisions live in ``protocol/supervisor.py``; these are the
policies it and the driver consult. Topology (which slot holds which replica)
is ``protocol.supervisor.replica_slot``.
"""

from __future__ import annotations


def server_nodes(head: str, cpus: dict[str, float], ordered: list[str] = ()) -> list[str]:
    """Nodes server slots are spread over: ``head`` first, then ``ordered`` (simulated nodes, in the
    order ``node:N`` kills count them), then the rest by id; nodes that offer no CPUs to tasks (a
    ``ray up`` head with ``CPU: 0``) are left out while another node offers some. Empty on a single
    node (no placement needed)."""
    if len(cpus) <= 1:
        return []
    order = (
        [head]
        + [n for n in ordered if n != head]
        + sorted(n for n in cpus if n != head and n not in ordered)
    )
    with_cpus = [n for n in order if cpus.get(n, 0) > 0]
    return with_cpus or order


def slot_nodes(num_slots_: int, nodes: list[str]) -> list[str]:
    """Spread slots round-robin over nodes, so ring neighbours sit on different nodes whenever 2+
    nodes exist.

    With an odd number of slots on an even number of nodes the last and first
    slot would share a node; the next node is skipped for the last slot then.
    """
    if not nodes:
        return []
    out = [nodes[j % len(nodes)] for j in range(num_slots_)]
    if num_slots_ > 1 and len(nodes) > 1 and out[-1] == out[0]:
        for candidate in nodes:
            if candidate not in (out[0], out[-2]):
                out[-1] = candidate
                break
    return out


def snapshot_interval_for(
    snapshot_cost_s: float,
    replay_cost_s: float,
    failures_per_update: float,
    lo: int = 1,
    hi: int = 10_000,
) -> int:
    """The snapshot interval that minimises expected time lost per update (Young's rule for
    checkpoint intervals).

    Every ``N`` updates a snapshot costs ``snapshot_cost_s``; a failure, ``failures_per_update`` per
    update, replays on average ``N / 2`` logged commands at ``replay_cost_s`` each. Expected cost
    per update ``snapshot_cost_s / N + failures_per_update * replay_cost_s * N / 2`` is least at
    ``N* = sqrt(2 * snapshot_cost_s / (failures_per_update * replay_cost_s))``, clamped to ``[lo,
    hi]``. With folded logs a recovery replays nothing (``replay_cost_s == 0``): the longest
    interval, ``hi``.
    """
    import math

    if snapshot_cost_s < 0 or replay_cost_s < 0 or failures_per_update < 0:
        raise ValueError("costs and the failure rate must be >= 0")
    if replay_cost_s == 0 or failures_per_update == 0:
        return hi
    if snapshot_cost_s == 0:
        return lo
    return max(
        lo, min(hi, round(math.sqrt(2 * snapshot_cost_s / (failures_per_update * replay_cost_s))))
    )


def unlogged_allowed(durability: str) -> int:
    """Updates a primary may acknowledge before its holder logged them: 0 for ``strict``,
    ``pipelined`` (its early answers are acknowledged by the next one, after the log) and ``auto``
    (one of those two), K for ``relaxed:K``. ValueError for anything else."""
    if durability in ("auto", "strict", "pipelined"):
        return 0
    kind, _, k = durability.partition(":")
    if kind == "relaxed" and k.isdigit() and int(k) >= 1:
        return int(k)
    raise ValueError(
        f"expected auto, strict, pipelined or relaxed:K with K >= 1, got {durability!r}"
    )


LOG_BUDGET_BYTES = 256 * 2**20
"""snapshot_interval auto: the most a holder's unfolded log may hold between two snapshots."""


class SnapshotPolicy:
    """``snapshot_interval: auto`` for one primary: Young's rule (``snapshot_interval_for``) on
    costs it measures as the run goes.

    - snapshot cost: seconds to build the last snapshot plus its bytes at the seconds per byte the
      holder's appends have cost so far;
    - replay cost per command: seconds the primary took to apply an update (a recovery replays
      with the same code) plus its command's bytes at the same seconds per byte (a recovery
      moves the log);
    - failures per update: seconds per update / ``expected_mtbf_s``, or the shard's own failovers
      per update if higher.

    With folded logs a recovery replays nothing, so periodic snapshots only cost: the longest
    interval. Without folding the interval is also capped so that the log between two snapshots
    stays under ``LOG_BUDGET_BYTES``. Until a snapshot has been measured, ``initial`` holds.
    """

    def __init__(
        self,
        fold: bool,
        expected_mtbf_s: float,
        failovers: int = 0,
        initial: int = 50,
        lo: int = 1,
        hi: int = 10_000,
    ):
        self.fold, self.expected_mtbf_s, self.failovers = fold, expected_mtbf_s, failovers
        self.initial, self.lo, self.hi = initial, lo, hi
        self.updates = 0
        self.apply_s = 0.0
        self.gap_s = 0.0
        self.command_bytes = 0.0
        self.snapshot_s: float | None = None
        self.seconds_per_byte = 0.0

    def observe_update(self, apply_s: float, gap_s: float, command_bytes: int) -> None:
        """One update: seconds to apply it, seconds since the previous one, its command's bytes."""
        self.updates += 1
        w = 1.0 / min(self.updates, 20)  # a running mean over about the last 20
        self.apply_s += w * (apply_s - self.apply_s)
        self.gap_s += w * (gap_s - self.gap_s)
        self.command_bytes += w * (command_bytes - self.command_bytes)

    def observe_snapshot(self, build_s: float, nbytes: int, seconds_per_byte: float) -> None:
        self.snapshot_s = build_s + nbytes * seconds_per_byte
        self.seconds_per_byte = seconds_per_byte

    def replay_s(self) -> float:
        """Seconds a recovery spends per logged command: moving it and applying it."""
        return self.apply_s + self.command_bytes * self.seconds_per_byte

    def failures_per_update(self) -> float:
        planned = self.gap_s / self.expected_mtbf_s
        seen = self.failovers / self.updates if self.updates else 0.0
        return max(planned, seen)

    def interval(self) -> int:
        if self.fold:
            return self.hi
        if self.snapshot_s is None:
            return self.initial
        hi = self.hi
        if self.command_bytes > 0:
            hi = max(self.lo, min(hi, int(LOG_BUDGET_BYTES // self.command_bytes)))
        return snapshot_interval_for(
            self.snapshot_s, self.replay_s(), self.failures_per_update(), self.lo, hi
        )
