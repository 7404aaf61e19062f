"""Relaxed durability: throughput gained, and what a primary's death costs, against strict.

Async mode, digits CNN, 4 workers x 2 shards, batch 32, momentum 0.5, for
each ``--durability`` setting, alternating inside every repeat:
  throughput   steady samples/s without kills (÷ strict in the same repeat)
  kill         server:0 SIGKILLed at --kill-step: updates lost (the summary's count), eval
               accuracy at the end

    python experiments/recovery/durability.py --repeats 3

Writes results_durability_<hardware>_<yyyymm>.json next to itself.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from raytrain_ft.config import (
    ChaosConfig,
    ClusterConfig,
    DataConfig,
    ModelConfig,
    OptimConfig,
    RecoveryConfig,
    TrainConfig,
)
from raytrain_ft.trainer import Trainer


def make_config(durability: str, epochs: int, kill: str = "", seed: int = 0) -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(name="cnn"),
        data=DataConfig(dataset="digits", batch_size=32),
        optim=OptimConfig(name="sgd", lr=0.05, momentum=0.5),
        cluster=ClusterConfig(num_workers=4, num_servers=2, use_gpu="false"),
        recovery=RecoveryConfig(durability=durability, num_spares=1 if kill else 0),
        chaos=ChaosConfig(kill=kill),
        mode="async",
        epochs=epochs,
        seed=seed,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--settings", default="strict,relaxed:1,relaxed:4,relaxed:16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--kill-step", type=int, default=40)
    ap.add_argument("--hardware", default="x86-2core")
    args = ap.parse_args()
    import ray

    here = os.path.dirname(os.path.abspath(__file__))
    settings = args.settings.split(",")
    ray.init(num_cpus=6, num_gpus=0, include_dashboard=False, logging_level="WARNING")
    runs = []
    try:
        for rep in range(args.repeats):
            for durability in settings:
                clean = Trainer(make_config(durability, args.epochs, seed=rep)).fit()
                killed = Trainer(
                    make_config(
                        durability, args.epochs, kill=f"server:0@step={args.kill_step}", seed=rep
                    )
                ).fit()
                row = {
                    "repeat": rep,
                    "durability": durability,
                    "samples_per_sec": clean.steady_samples_per_sec,
                    "replica_wait_s": sum(s["replica_wait_s"] for s in clean.servers),
                    "eval_accuracy": clean.eval_accuracy,
                    "killed_updates_lost": killed.updates_lost,
                    "killed_eval_accuracy": killed.eval_accuracy,
                    "killed_recoveries": len(killed.recoveries),
                }
                runs.append(row)
                print(json.dumps(row), flush=True)
    finally:
        ray.shutdown()
    strict = {r["repeat"]: r["samples_per_sec"] for r in runs if r["durability"] == "strict"}
    summary = {}
    for durability in settings:
        rows = [r for r in runs if r["durability"] == durability]
        ratios = [r["samples_per_sec"] / strict[r["repeat"]] for r in rows if r["repeat"] in strict]
        summary[durability] = {
            "samples_per_sec": statistics.median(r["samples_per_sec"] for r in rows),
            "ratio_vs_strict": statistics.median(ratios) if ratios else None,
            "ratio_vs_strict_per_repeat": ratios,
            "eval_accuracy_mean": statistics.mean(r["eval_accuracy"] for r in rows),
            "killed_updates_lost": [r["killed_updates_lost"] for r in rows],
            "killed_eval_accuracy_mean": statistics.mean(r["killed_eval_accuracy"] for r in rows),
        }
        print(durability, json.dumps(summary[durability]))
    out = {
        "machine": args.hardware,
        "args": vars(args),
        "created": time.strftime("%Y-%m-%d %H:%M"),
        "summary": summary,
        "runs": runs,
    }
    path = os.path.join(here, f"results_durability_{args.hardware}_{time.strftime('%Y%m')}.json")
    with open(path, "w") as fh:
        json.dump(out, fh, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
