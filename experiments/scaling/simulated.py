"""Scaling with simulated compute: throughput, speedup and efficiency vs workers and servers.

``cluster.simulate_compute_ms`` (``--simulate-compute MS``): each worker step
sleeps MS ms instead of data + forward + backward, then pushes a gradient of
the model's true size and pulls the parameters -- the whole parameter-server
path is real (object store, shards aggregating in rank order, optimizer,
replication to the peer holder). So 16-64 workers fit on a machine with 2
cores, and what limits scaling is the servers and the transport, not compute.
Ranks share processes (``cluster.ranks_per_process``, at most
``--max-processes`` worker processes): 64 torch processes need more memory
than this machine has. Each rank keeps its own thread; with pre-aggregation
(``--preaggregate true``, the default where it applies) the ranks of a
process sum their gradients and send one push per shard for all of them, as
the GPUs of one node would; ``--preaggregate true,false`` compares both.

On one machine every worker-shard call of every simulated rank is paid from
the same cores, which a real cluster spreads over W + S machines; so the
compute time (``--simulate-ms``, a list) is swept to show where the calls,
not the compute, set the pace.

For each (workers W, servers S):
  throughput     samples/s after warm-up (all workers)
  speedup        throughput / throughput(1 worker, same S)
  efficiency     speedup / W                      (the seed's Table 1 shape)
  vs_ideal       throughput / (W * batch / MS)    (compute-bound ideal: communication free)

    python experiments/scaling/simulated.py --model cnn --workers 1,4,16,64 --servers 1,2,4,8 \
        --simulate-ms 100,1000
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import time

from raytrain_ft.config import ClusterConfig, DataConfig, ModelConfig, TrainConfig
from raytrain_ft.trainer import Trainer


def make_config(
    model: str,
    workers: int,
    servers: int,
    simulate_ms: float,
    steps: int,
    batch: int,
    mode: str,
    max_processes: int,
    preaggregate: str = "auto",
) -> TrainConfig:
    data = (
        DataConfig(
            dataset="synthetic", batch_size=batch, synthetic_samples=max(4096, workers * batch * 2)
        )
        if model.startswith("resnet")
        else DataConfig(dataset="digits", batch_size=batch)
    )
    return TrainConfig(
        model=ModelConfig(name=model),
        data=data,
        cluster=ClusterConfig(
            num_workers=workers,
            num_servers=servers,
            use_gpu="false",
            simulate_compute_ms=simulate_ms,
            ranks_per_process=math.ceil(workers / max_processes),
            # one rank per process has nothing to pre-aggregate (true would be refused)
            preaggregate=preaggregate if workers > max_processes else "auto",
        ),
        mode=mode,
        steps=steps,
        seed=0,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--workers", default="1,4,16,64")
    ap.add_argument("--servers", default="1,2,4,8")
    ap.add_argument(
        "--simulate-ms", default="100", help="comma-separated compute times per step (ms)"
    )
    ap.add_argument(
        "--max-processes",
        type=int,
        default=8,
        help="worker processes at most (ranks share them beyond)",
    )
    ap.add_argument(
        "--preaggregate",
        default="auto",
        help="comma-separated cluster.preaggregate values to compare side by side (true,false)",
    )
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--mode", default="sync")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--hardware", default="x86-2core")
    ap.add_argument("--output")
    args = ap.parse_args()
    import ray

    workers = [int(w) for w in args.workers.split(",")]
    servers = [int(s) for s in args.servers.split(",")]
    computes = [float(m) for m in args.simulate_ms.split(",")]
    preaggregates = args.preaggregate.split(",")
    ray.init(
        num_cpus=max(max(workers), os.cpu_count() or 1),
        include_dashboard=False,
        logging_level="WARNING",
    )
    rows = []
    try:
        for repeat in range(args.repeats):
            for ms, s, w, pre in itertools.product(computes, servers, workers, preaggregates):
                t0 = time.time()
                cfg = make_config(
                    args.model,
                    w,
                    s,
                    ms,
                    args.steps,
                    args.batch_size,
                    args.mode,
                    args.max_processes,
                    pre,
                )
                r = Trainer(cfg).fit()
                step_s = w * args.batch_size / r.steady_samples_per_sec
                rows.append(
                    {
                        "simulate_ms": ms,
                        "workers": w,
                        "servers": s,
                        "preaggregate": pre,
                        "preaggregated": r.preaggregated,
                        "repeat": repeat,
                        "samples_per_sec": r.steady_samples_per_sec,
                        "ranks_per_process": cfg.cluster.ranks_per_process,
                        "step_s": step_s,
                        "updates_applied": r.updates_applied,
                        "wall_s": time.time() - t0,
                        "num_params": r.num_params,
                        "wait_s_mean": statistics.mean(x["wait_s"] for x in r.workers),
                    }
                )
                print(
                    f"compute {ms:.0f}ms W={w:3d} S={s} "
                    f"({cfg.cluster.ranks_per_process}/process"
                    f"{', pre-aggregated' if r.preaggregated else ''}) "
                    f"{r.steady_samples_per_sec:9,.0f} samples/s  "
                    f"step {step_s * 1000:6.0f} ms  wall {time.time() - t0:5.1f}s",
                    flush=True,
                )
    finally:
        ray.shutdown()
    table = []
    for ms, s, pre in itertools.product(computes, servers, preaggregates):
        ideal_per_worker = args.batch_size / (ms / 1000.0)

        def median(w, key="samples_per_sec", ms=ms, s=s, pre=pre):
            return statistics.median(
                r[key]
                for r in rows
                if r["simulate_ms"] == ms
                and r["servers"] == s
                and r["workers"] == w
                and r["preaggregate"] == pre
            )

        base = median(min(workers))
        for w in workers:
            thr = median(w)
            speedup = thr / base * min(workers)
            table.append(
                {
                    "simulate_ms": ms,
                    "workers": w,
                    "servers": s,
                    "preaggregate": pre,
                    "samples_per_sec": round(thr, 1),
                    "speedup": round(speedup, 3),
                    "efficiency": round(speedup / w, 3),
                    "vs_ideal": round(thr / (w * ideal_per_worker), 3),
                    "overhead_ms_per_step": round(median(w, "step_s") * 1000 - ms, 1),
                }
            )
    for row in table:
        print(json.dumps(row))
    here = os.path.dirname(os.path.abspath(__file__))
    path = args.output or os.path.join(
        here, f"results_{args.model}_{args.mode}_{args.hardware}_{time.strftime('%Y%m')}.json"
    )
    with open(path, "w") as fh:
        json.dump(
            {
                "args": vars(args),
                "num_params": rows[0]["num_params"] if rows else None,
                "runs": rows,
                "table": table,
            },
            fh,
            indent=2,
        )
    print(f"wrote {path}")
    plot(table, path[: -len(".json")] + ".png")


def plot(table: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    computes = sorted({r["simulate_ms"] for r in table})
    fig, axes = plt.subplots(1, len(computes), figsize=(5 * len(computes), 4), squeeze=False)
    for ax, ms in zip(axes[0], computes):
        pres = sorted({r.get("preaggregate", "auto") for r in table})
        for s, pre in itertools.product(sorted({r["servers"] for r in table}), pres):
            pts = sorted(
                (r["workers"], r["efficiency"])
                for r in table
                if r["simulate_ms"] == ms
                and r["servers"] == s
                and r.get("preaggregate", "auto") == pre
            )
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                marker="o",
                linestyle="-" if pre != "false" else "--",
                label=f"{s} server{'s' if s > 1 else ''}"
                + (f", pre-aggregate {pre}" if len(pres) > 1 else ""),
            )
        ax.axhline(0.8, color="grey", linestyle=":", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, 1.1)
        ax.set_xlabel("workers")
        ax.set_ylabel("efficiency (speedup / workers)")
        ax.set_title(f"simulated compute {ms:.0f} ms / step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
