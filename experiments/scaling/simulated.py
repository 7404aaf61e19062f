"""Scaling with simulated compute: throughput, speedup and efficiency vs workers and servers.

``cluster.simulate_compute_ms`` (``--simulate-compute MS``): each worker step
sleeps MS ms instead of data + forward + backward, then pushes a gradient of
the model's true size and pulls the parameters -- the whole parameter-server
path is real (object store, shards aggregating in rank order, optimizer,
replication to the peer holder). So 16-64 workers fit on a machine with 2
cores, and what limits scaling is the servers and the transport, not compute.

For each (workers W, servers S):
  throughput     samples/s after warm-up (all workers)
  speedup        throughput / throughput(1 worker, same S)
  efficiency     speedup / W                      (the seed's Table 1 shape)
  vs_ideal       throughput / (W * batch / MS)    (compute-bound ideal: communication free)

    python experiments/scaling/simulated.py --model cnn --workers 1,4,16,64 --servers 1,2,4,8 --simulate-ms 100
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from raytrain_ft.config import ClusterConfig, DataConfig, ModelConfig, TrainConfig
from raytrain_ft.trainer import Trainer


def make_config(model: str, workers: int, servers: int, simulate_ms: float, steps: int, batch: int, mode: str) -> TrainConfig:
    data = DataConfig(dataset="synthetic", batch_size=batch, synthetic_samples=max(4096, workers * batch * 2)) if model.startswith("resnet") \
        else DataConfig(dataset="digits", batch_size=batch)
    return TrainConfig(model=ModelConfig(name=model), data=data,
                       cluster=ClusterConfig(num_workers=workers, num_servers=servers, use_gpu="false", simulate_compute_ms=simulate_ms),
                       mode=mode, steps=steps, seed=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--workers", default="1,4,16,64")
    ap.add_argument("--servers", default="1,2,4,8")
    ap.add_argument("--simulate-ms", type=float, default=100.0)
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
    ray.init(num_cpus=max(max(workers), os.cpu_count() or 1), include_dashboard=False, logging_level="WARNING")
    rows = []
    try:
        for repeat in range(args.repeats):
            for s in servers:
                for w in workers:
                    t0 = time.time()
                    r = Trainer(make_config(args.model, w, s, args.simulate_ms, args.steps, args.batch_size, args.mode)).fit()
                    rows.append({"workers": w, "servers": s, "repeat": repeat, "samples_per_sec": r.steady_samples_per_sec,
                                 "updates_applied": r.updates_applied, "wall_s": time.time() - t0, "num_params": r.num_params,
                                 "wait_s_mean": statistics.mean(x["wait_s"] for x in r.workers)})
                    print(f"W={w:3d} S={s} {r.steady_samples_per_sec:9,.0f} samples/s  wall {time.time() - t0:5.1f}s", flush=True)
    finally:
        ray.shutdown()
    ideal_per_worker = args.batch_size / (args.simulate_ms / 1000.0)
    table = []
    for s in servers:
        base = statistics.median(r["samples_per_sec"] for r in rows if r["servers"] == s and r["workers"] == min(workers))
        for w in workers:
            thr = statistics.median(r["samples_per_sec"] for r in rows if r["servers"] == s and r["workers"] == w)
            speedup = thr / base * min(workers)
            table.append({"workers": w, "servers": s, "samples_per_sec": round(thr, 1), "speedup": round(speedup, 3),
                          "efficiency": round(speedup / w, 3), "vs_ideal": round(thr / (w * ideal_per_worker), 3)})
    for row in table:
        print(json.dumps(row))
    here = os.path.dirname(os.path.abspath(__file__))
    path = args.output or os.path.join(here, f"results_{args.model}_{args.mode}_{args.hardware}_{time.strftime('%Y%m')}.json")
    with open(path, "w") as fh:
        json.dump({"args": vars(args), "num_params": rows[0]["num_params"] if rows else None, "runs": rows, "table": table}, fh, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
