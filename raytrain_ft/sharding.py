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
            f"{num_shards} shards for a model with {total} values; use at most {total} servers",
        )
    num_params = total if num_params is None else num_params
    base, extra = divmod(total, num_shards)
    out, start = [], 0
    for i in range(num_shards):
        end = start + base + (1 if i < extra else 0)
        out.append(ShardRange(i, start, end, num_params))
        start = end
    return out
