"""One shard's round trip (an update in, the parameters back) through an ordinary Ray actor call --
the path every push takes today -- and through a Ray compiled graph (shared-memory channels set up
once, then reused every step), side by side in one Ray session.

    python experiments/transport/compiled_graph.py --values 1000,151306 --repeats 3 \
        --output experiments/transport/results_compiled_graph_x86-2core_202611.json

Each call applies ``p -= 0.01 * g`` on the actor and returns a copy of ``p`` (float32). Reported:
the median round trip, the caller's and the actor's CPU per call, medians over the repeats, and
the CPU a graph's actor burns while it waits for its next input (``--idle-s`` of waiting: its
shared-memory channel is read by polling). Only the transport
is compared: no protocol, no fault handling (a compiled graph is static: a routing change or an
actor's death means tearing it down and compiling another).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--values", default="1000,151306", help="float32 values per call, comma-separated"
    )
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--idle-s", type=float, default=3.0)
    ap.add_argument("--output", default=None)
    args = ap.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray.dag import InputNode

    ray.init(num_cpus=3, include_dashboard=False, logging_level="ERROR")

    @ray.remote
    class Shard:
        def __init__(self, n: int):
            self.p = np.zeros(n, np.float32)

        async def pid(self):
            return os.getpid()

        async def update(self, g):  # as the servers' methods are: an async actor
            self.p -= 0.01 * g
            return self.p.copy()

    @ray.remote
    class GraphShard:
        def __init__(self, n: int):
            self.p = np.zeros(n, np.float32)

        def update(self, g):
            self.p -= 0.01 * g
            return self.p.copy()

        def pid(self):
            return os.getpid()

    def cpu_s(pid: int) -> float:
        """A process's user + system CPU seconds so far (/proc)."""
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def timed(call, g, pid: int) -> tuple[float, float, float]:
        for _ in range(30):
            call(g)
        cpu0, actor0, lat = time.process_time(), cpu_s(pid), []
        for _ in range(args.calls):
            t = time.perf_counter()
            call(g)
            lat.append(time.perf_counter() - t)
        return (
            statistics.median(lat) * 1e3,
            (time.process_time() - cpu0) / args.calls * 1e3,
            (cpu_s(pid) - actor0) / args.calls * 1e3,
        )

    def idle_cpu(pid: int) -> float:
        """CPU seconds per second the actor spends while no call comes."""
        c0, t0 = cpu_s(pid), time.monotonic()
        time.sleep(args.idle_s)
        return (cpu_s(pid) - c0) / (time.monotonic() - t0)

    rows = []
    try:
        for n in (int(v) for v in args.values.split(",")):
            g = np.ones(n, np.float32)
            plain, graph, idle = [], [], {}
            actor, gactor = Shard.remote(n), GraphShard.remote(n)
            pid, gpid = ray.get([actor.pid.remote(), gactor.pid.remote()])
            with InputNode() as inp:
                dag = gactor.update.bind(inp)
            compiled = dag.experimental_compile(_buffer_size_bytes=max(1 << 20, 8 * 4 * n))
            try:
                for _ in range(args.repeats):  # alternated
                    plain.append(timed(lambda x, a=actor: ray.get(a.update.remote(x)), g, pid))
                    graph.append(timed(lambda x, c=compiled: ray.get(c.execute(x)), g, gpid))
                idle = {"actor_call": idle_cpu(pid), "compiled_graph": idle_cpu(gpid)}
            finally:
                compiled.teardown()
            row = {
                "values": n,
                "bytes": 4 * n,
                "actor_call_ms": statistics.median(p[0] for p in plain),
                "actor_call_caller_cpu_ms": statistics.median(p[1] for p in plain),
                "compiled_graph_ms": statistics.median(p[0] for p in graph),
                "compiled_graph_caller_cpu_ms": statistics.median(p[1] for p in graph),
                "actor_call_actor_cpu_ms": statistics.median(p[2] for p in plain),
                "compiled_graph_actor_cpu_ms": statistics.median(p[2] for p in graph),
                "waiting_actor_cpu_s_per_s": idle,
                "repeats": {"actor_call": plain, "compiled_graph": graph},
            }
            rows.append(row)
            print(
                f"{n:,} values ({4 * n / 1024:,.0f} KiB): actor call {row['actor_call_ms']:.2f} ms "
                f"(caller CPU {row['actor_call_caller_cpu_ms']:.2f} ms), compiled graph "
                f"{row['compiled_graph_ms']:.2f} ms (caller CPU "
                f"{row['compiled_graph_caller_cpu_ms']:.2f} ms); actor CPU per call "
                f"{row['actor_call_actor_cpu_ms']:.2f} vs {row['compiled_graph_actor_cpu_ms']:.2f} "
                f"ms; a waiting actor burns {idle['actor_call']:.2f} vs "
                f"{idle['compiled_graph']:.2f} CPU-s per s",
                flush=True,
            )
    finally:
        ray.shutdown()
    if args.output:
        with open(args.output, "w") as fh:
            json.dump(
                {"machine": f"{platform.machine()} {os.cpu_count()} cores", "results": rows},
                fh,
                indent=2,
            )
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
