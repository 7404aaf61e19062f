"""Where replication's per-update cost goes, without workers competing for the cores.

1. A primary + its dedicated replica holder, one caller doing push_pull (one worker, no compute):
   round trip with the command log on (`replica`) vs off (`none`).
2. The transport of one command alone: an array as one argument (object store above Ray's
   100 KB inline limit) vs split into <= 90 KB arguments (inlined in the RPC).

    python experiments/recovery/replication_cost.py --numel 80000 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--numel",
        type=int,
        default=80_000,
        help="shard values (80,000 = 320 KB, one shard of the small CNN with 2 shards)",
    )
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument(
        "--output",
        default=os.path.join(
            os.path.dirname(__file__), "results_replication_cost_x86-2core_202611.json"
        ),
    )
    args = ap.parse_args()

    import ray

    from raytrain_ft.actors.server import ParameterServer
    from raytrain_ft.config import OptimConfig
    from raytrain_ft.params import shard_ranges

    @ray.remote(num_cpus=0)
    class Holder:
        async def one(self, a):
            self.x = np.array(a, copy=True)

        async def chunks(self, *parts):
            self.x = np.concatenate(parts)

    @ray.remote(num_cpus=0)
    class Sender:
        def __init__(self, holder):
            self.holder = holder

        async def run(self, how: str, numel: int, calls: int) -> float:
            a, times = np.ones(numel, np.float32), []
            for _ in range(calls):
                t0 = time.perf_counter()
                if how == "one_argument":
                    await self.holder.one.remote(a)
                else:
                    await self.holder.chunks.remote(*np.array_split(a, -(-a.nbytes // 90_000)))
                times.append(time.perf_counter() - t0)
            return statistics.median(times[calls // 6 :]) * 1e3

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    shard = shard_ranges(args.numel, 1)[0]
    optim = OptimConfig(name="sgd", lr=0.01, momentum=0.9)
    server = ray.remote(num_cpus=0)(ParameterServer)
    rows: dict[str, list] = {"push_pull_ms": [], "replica_wait_ms": [], "transport_ms": []}
    try:
        for _ in range(args.repeats):
            for mode in ("replica", "none"):
                primary = server.remote(0, shard, optim, 100_000, 1, 1, 50, mode)
                holder = server.remote(1, None, optim, 100_000, 1)
                ray.get([primary.ready.remote(), holder.ready.remote()])
                ray.get(primary.load.remote(np.zeros(args.numel, np.float32)))
                if mode == "replica":
                    ray.get(primary.set_replica.remote(holder))
                grad, times = np.ones(args.numel, np.float32), []
                for step in range(args.calls):
                    t0 = time.perf_counter()
                    ray.get(primary.push_pull.remote(0, step, ray.put(grad)))
                    times.append(time.perf_counter() - t0)
                stats = ray.get(primary.stats.remote())
                rows["push_pull_ms"].append(
                    {"mode": mode, "median": statistics.median(times[args.calls // 6 :]) * 1e3}
                )
                rows["replica_wait_ms"].append(
                    {"mode": mode, "per_update": stats.replica_wait_s / args.calls * 1e3}
                )
                ray.kill(primary)
                ray.kill(holder)
            sender = Sender.remote(Holder.remote())
            for how in ("one_argument", "inline_chunks"):
                rows["transport_ms"].append(
                    {"how": how, "median": ray.get(sender.run.remote(how, args.numel, args.calls))}
                )
    finally:
        ray.shutdown()

    def med(key, field, value):
        return statistics.median(r["median"] for r in rows[key] if r[field] == value)

    summary = {
        "push_pull_replica_ms": med("push_pull_ms", "mode", "replica"),
        "push_pull_none_ms": med("push_pull_ms", "mode", "none"),
        "replica_wait_per_update_ms": statistics.median(
            r["per_update"] for r in rows["replica_wait_ms"] if r["mode"] == "replica"
        ),
        "transport_one_argument_ms": med("transport_ms", "how", "one_argument"),
        "transport_inline_chunks_ms": med("transport_ms", "how", "inline_chunks"),
    }
    print(json.dumps(summary, indent=2))
    with open(args.output, "w") as fh:
        json.dump({"args": vars(args), "summary": summary, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
