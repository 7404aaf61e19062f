"""Key-range sharding of the flat parameter vector (no torch: the supervisor and the protocol use
it)."""

from __future__ import annotations

from dataclasses import dataclass

from raytrain_ft.errors import ConfigError


@dataclass(frozen=True, slots=True)
class ShardRange:
    """Half-open key range ``[start, end)`` of the flat vector owned by one shard."""

    index: int
    start: int
    end: int
    num_params: int
    """Length of the whole flat vector's parameter prefix (buffers follow it)."""

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def param_slice(self) -> slice:
        """Positions of this shard (relative to ``start``) that hold parameters."""
        return slice(0, max(0, min(self.end, self.num_params) - self.start))

    @property
    def buffer_slice(self) -> slice:
        """Positions of this shard (relative to ``start``) that hold float buffers."""
        return slice(max(0, min(self.end, self.num_params) - self.start), self.size)


def shard_ranges(total: int, num_shards: int, num_params: int | None = None) -> list[ShardRange]:
    """Split ``total`` keys into ``num_shards`` contiguous ranges whose sizes differ by at most
    one."""
    if num_shards <= 0:
        raise ConfigError("cluster.num_servers", f"must be > 0, got {num_shards}")
    if num_shards > total:
        raise ConfigError(
            "cluster.num_servers",
            f"{num_shards} shards for a model with {total} value{'s' if total != 1 else ''}; use "
            f"at most {total} server{'s' if total != 1 else ''}",
        )
    num_params = total if num_params is None else num_params
    base, extra = divmod(total, num_shards)
    out, start = [], 0
    for i in range(num_shards):
        end = start + base + (1 if i < extra else 0)
        out.append(ShardRange(i, start, end, num_params))
        start = end
    return out


AUTO_SERVER_CANDIDATES = (1, 2, 3, 4, 6, 8, 12, 16)
"""Shard counts ``--num-servers auto`` considers (those up to the model's size)."""
AUTO_SERVERS_MARGIN = 0.05
"""``--num-servers auto`` takes more servers only where they are predicted to save more than this
fraction of a step's exchange: each server is one more process to start, watch and rebuild."""


@dataclass(frozen=True, slots=True)
class ExchangeCosts:
    """What an exchange costs on this cluster, measured at the start of a run with ``--num-servers
    auto`` (``raytrain_ft.actors.probe``)."""

    call_s: float
    """One call carrying no values: what a worker pays again for each more shard it calls."""
    round_trip_s: dict[int, float]
    """Per candidate shard count S: seconds of one call carrying a push of one shard (the model's
    float32 values / S) and bringing back as many parameter values, with the run's transport
    (inline, in parts or through the object store by size)."""
    batch_s: dict[int, float]
    """Per candidate shard count S: seconds until W such calls, sent to one server at once (as the
    W workers send theirs), have all come back: what a server's share of a step costs in calls,
    queueing and the CPU they take included."""
    update_s_per_value: float
    """The shards' optimizer step, seconds per value."""
    add_s_per_value: float
    """Adding one push (or one replicated command) into a shard, seconds per value."""
    cpus: float
    """CPUs the exchange's calls and updates can use at once (the cluster's; in sync the workers
    wait while the servers work)."""


def predicted_exchange_s(
    num_servers: int,
    *,
    num_values: int,
    num_workers: int,
    costs: ExchangeCosts,
    replicated: bool,
    replica_on_path: bool,
) -> float:
    """Seconds a step spends in the exchange with ``num_servers`` shards: the longer of the path
    through one server (a worker issuing its S calls one after another; the server's W calls, the
    sum of W pushes and the update of its values; with ``replica_on_path`` the command its holder
    logs before it answers) and all servers' work spread over ``costs.cpus``. More servers split
    the bytes and the update; they multiply the calls. ``num_workers`` is the W of
    ``costs.batch_s``."""
    values = num_values / num_servers
    update = values * (num_workers * costs.add_s_per_value + costs.update_s_per_value)
    holder = costs.round_trip_s[num_servers] + values * costs.add_s_per_value if replicated else 0
    server = costs.batch_s[num_servers] + update
    path = (num_servers - 1) * costs.call_s + server + (holder if replica_on_path else 0.0)
    every = num_servers * (server + holder)
    return max(path, every / max(1.0, costs.cpus))


@dataclass(frozen=True, slots=True)
class ServerPlan:
    """The shard count ``--num-servers auto`` chose and why (the run's summary keeps it)."""

    chosen: int
    predicted_s: dict[int, float]
    costs: ExchangeCosts

    def to_dict(self) -> dict:
        return {
            "chosen": self.chosen,
            "predicted_exchange_ms": {
                str(s): round(t * 1e3, 3) for s, t in sorted(self.predicted_s.items())
            },
            "call_ms": round(self.costs.call_s * 1e3, 3),
            "round_trip_ms": {
                str(s): round(t * 1e3, 3) for s, t in sorted(self.costs.round_trip_s.items())
            },
            "batch_ms": {str(s): round(t * 1e3, 3) for s, t in sorted(self.costs.batch_s.items())},
            "update_ns_per_value": round(self.costs.update_s_per_value * 1e9, 3),
            "add_ns_per_value": round(self.costs.add_s_per_value * 1e9, 3),
            "cpus": self.costs.cpus,
        }


def auto_server_candidates(num_values: int) -> list[int]:
    """The shard counts ``--num-servers auto`` weighs for a model of ``num_values`` values."""
    return [s for s in AUTO_SERVER_CANDIDATES if s <= num_values]


def choose_num_servers(
    *,
    num_values: int,
    num_workers: int,
    costs: ExchangeCosts,
    replicated: bool,
    replica_on_path: bool,
) -> ServerPlan:
    """The fewest servers whose predicted exchange is within AUTO_SERVERS_MARGIN of the best
    candidate's (``predicted_exchange_s`` for each shard count ``costs`` measured)."""
    if not costs.round_trip_s:
        raise ValueError("no candidate shard count was measured")
    predicted = {
        s: predicted_exchange_s(
            s,
            num_values=num_values,
            num_workers=num_workers,
            costs=costs,
            replicated=replicated,
            replica_on_path=replica_on_path,
        )
        for s in sorted(costs.round_trip_s)
    }
    best = min(predicted.values())
    chosen = min(s for s, t in predicted.items() if t <= best * (1 + AUTO_SERVERS_MARGIN))
    return ServerPlan(chosen, predicted, costs)
