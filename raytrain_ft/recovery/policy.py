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
