"""Latency vs CPU of the calls ``--num-servers auto``'s probe times: for each shard count S, W
shard-shaped calls at once to one throwaway actor (the probe's own ``CallProbe`` and transport),
timed as elapsed seconds and as CPU seconds of both ends (this process's and the actor's
``process_time``), and the CPU summed over all S shards of a step.

On this machine the summed CPU tracked the exchange measured in the 8-rank setting of
``experiments/scaling/auto_servers.py`` where the probe's latencies did not (README, "--num-servers
auto").

    python experiments/scaling/probe_cpu.py --values 151306 --workers 8 \
        --output experiments/scaling/results_probe_cpu_x86-2core_202611.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from raytrain_ft.actors.probe import CallProbe, shard_round


class TimedProbe(CallProbe):
    def cpu(self) -> float:
        return time.process_time()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--values", type=int, default=151_306, help="the model's float32 values")
    ap.add_argument("--workers", type=int, default=8, help="calls sent at once (W)")
    ap.add_argument("--servers", default="1,2,4")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--output", required=True)
    args = ap.parse_args()
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
    rows = []
    try:
        probe = ray.remote(TimedProbe).options(num_cpus=0).remote()
        ray.get(probe.cpu.remote())
        for s in (int(x) for x in args.servers.split(",")):
            n = -(-args.values // s)
            round_trip = shard_round(probe, n, args.workers)
            samples = []
            for i in range(args.repeats + 1):
                actor0, own0, t0 = (
                    ray.get(probe.cpu.remote()),
                    time.process_time(),
                    time.perf_counter(),
                )
                round_trip()
                t1, own1, actor1 = (
                    time.perf_counter(),
                    time.process_time(),
                    ray.get(probe.cpu.remote()),
                )
                if i:  # the first round warms the actor's caches
                    samples.append((t1 - t0, own1 - own0, actor1 - actor0))
            elapsed, caller, callee = (statistics.median(x[j] for x in samples) for j in range(3))
            row = {
                "servers": s,
                "bytes_per_call": 4 * n,
                "elapsed_ms": elapsed * 1e3,
                "caller_cpu_ms": caller * 1e3,
                "callee_cpu_ms": callee * 1e3,
                "cpu_per_call_ms": (caller + callee) / args.workers * 1e3,
                "cpu_per_step_all_shards_ms": (caller + callee) * s * 1e3,
            }
            rows.append(row)
            print(
                json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()})
            )
    finally:
        ray.shutdown()
    with open(args.output, "w") as fh:
        json.dump({"values": args.values, "workers": args.workers, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
