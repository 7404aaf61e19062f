"""Warm server processes (``cluster.keep_warm_s``): wall time of ``Trainer.fit()`` for runs that
start their server processes against runs that take the last run's, alternated in one Ray session
(this machine's speed drifts; alternation keeps the comparison side by side).

    python experiments/warm_processes/run.py --repeats 3 --output results.json

A "cold" run finds no resting process to take (the pool is emptied first) and starts its servers; a
"warm" run follows it and takes them. Both: 2 workers, 2 servers and a spare,
the digits CNN, 60 steps (the chaos tests' run).
"""

import argparse
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def config(keep_warm_s: float):
    from raytrain_ft.config import (
        ClusterConfig,
        DataConfig,
        ModelConfig,
        OptimConfig,
        RecoveryConfig,
        TrainConfig,
    )

    return TrainConfig(
        model=ModelConfig(name="cnn"),
        data=DataConfig(dataset="digits", image_size=8, batch_size=16),
        optim=OptimConfig(name="sgd", lr=0.05, momentum=0.9),
        cluster=ClusterConfig(num_workers=2, num_servers=2, keep_warm_s=keep_warm_s),
        recovery=RecoveryConfig(snapshot_interval=10, num_spares=1),
        steps=60,
        seed=3,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--output", default=None)
    args = p.parse_args()

    import ray

    from raytrain_ft import end_warm_processes
    from raytrain_ft.trainer import Trainer

    ray.init(
        num_cpus=4,
        num_gpus=0,
        include_dashboard=False,
        _temp_dir=tempfile.mkdtemp(prefix="rtft-warm-", dir="/tmp"),
        logging_level="WARNING",
    )
    try:
        Trainer(config(0)).fit()  # imports and caches warmed in the driver for both kinds
        times = {"cold": [], "warm": []}
        hashes = set()
        for _ in range(args.repeats):
            end_warm_processes()
            t = time.perf_counter()
            r = Trainer(config(30)).fit()  # cold: starts its servers (and keeps them)
            times["cold"].append(time.perf_counter() - t)
            hashes.add(r.params_sha256)
            t = time.perf_counter()
            r = Trainer(config(30)).fit()  # warm: takes them
            times["warm"].append(time.perf_counter() - t)
            hashes.add(r.params_sha256)
        end_warm_processes()
    finally:
        ray.shutdown()
    out = {
        kind: {"fit_s": [round(x, 2) for x in xs], "median_s": round(statistics.median(xs), 2)}
        for kind, xs in times.items()
    }
    out["warm_over_cold"] = round(out["warm"]["median_s"] / out["cold"]["median_s"], 3)
    out["same_hash"] = len(hashes) == 1
    print(json.dumps(out, indent=1))
    if args.output:
        with open(args.output, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
