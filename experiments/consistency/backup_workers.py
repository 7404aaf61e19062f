"""Backup workers vs a straggler, side by side in one Ray session (medians of repeats, runs
alternating).

Sync mode, 4 workers, digits CNN. Rank 3 is made a straggler (``--slow-workers 3:MS``:
  MS milliseconds of extra compute per step). Runs: clean -- no straggler, backup_workers = 0 (the
  reference) straggler -- straggler, backup_workers = 0 (every step waits for it)
  backup      -- straggler, backup_workers = 1 (a step closes on the first 3 gradients)

Reported: steps/s (global steps the shards completed per second of training) and
its ratio to ``clean``; applied samples/s (gradients that made it into an update);
steps the straggler skipped; late pushes dropped.

    python experiments/consistency/backup_workers.py --slow-ms 100 --repeats 3
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
    ConsistencyConfig,
    DataConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
)
from raytrain_ft.trainer import Trainer

WORKERS = 4


def make_config(slow_ms: float, backups: int, steps: int) -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(name="cnn"),
        data=DataConfig(dataset="digits", batch_size=32),
        optim=OptimConfig(name="sgd", lr=0.05, momentum=0.9),
        cluster=ClusterConfig(num_workers=WORKERS, num_servers=2, use_gpu="false"),
        consistency=ConsistencyConfig(backup_workers=backups),
        chaos=ChaosConfig(slow_workers=f"3:{slow_ms}" if slow_ms else None),
        mode="sync",
        steps=steps,
        seed=0,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slow-ms", type=float, default=100.0)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hardware", default="x86-2core")
    args = ap.parse_args()
    import ray

    variants = {"clean": (0.0, 0), "straggler": (args.slow_ms, 0), "backup": (args.slow_ms, 1)}
    ray.init(
        num_cpus=max(os.cpu_count() or 1, WORKERS), include_dashboard=False, logging_level="WARNING"
    )
    runs = []
    try:
        for repeat in range(args.repeats):
            for name, (slow, backups) in variants.items():
                r = Trainer(make_config(slow, backups, args.steps)).fit()
                applied = r.total_steps * (WORKERS - backups) * 32
                row = {
                    "variant": name,
                    "repeat": repeat,
                    "steps_per_s": r.total_steps / r.train_time_s,
                    "applied_samples_per_s": applied / r.train_time_s,
                    "train_time_s": r.train_time_s,
                    "eval_accuracy": r.eval_accuracy,
                    "skipped_steps": r.workers[3]["skipped_steps"],
                    "late_pushes": sum(s["late_pushes"] for s in r.servers),
                }
                runs.append(row)
                print(
                    f"{name:10s} repeat={repeat} {row['steps_per_s']:.2f} steps/s "
                    f"acc={r.eval_accuracy:.4f} "
                    f"skipped={row['skipped_steps']} late={row['late_pushes']}",
                    flush=True,
                )
    finally:
        ray.shutdown()
    summary = {}
    for name in variants:
        rows = [r for r in runs if r["variant"] == name]
        summary[name] = {
            k: statistics.median(r[k] for r in rows)
            for k in (
                "steps_per_s",
                "applied_samples_per_s",
                "eval_accuracy",
                "skipped_steps",
                "late_pushes",
            )
        }
    # ratios per repeat (side by side), then the median
    for name in ("straggler", "backup"):
        ratios = [
            b["steps_per_s"] / a["steps_per_s"]
            for a, b in zip(
                [r for r in runs if r["variant"] == "clean"],
                [r for r in runs if r["variant"] == name],
            )
        ]
        summary[name]["steps_per_s_vs_clean"] = statistics.median(ratios)
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(
        here, f"results_backup_workers_{args.hardware}_{time.strftime('%Y%m')}.json"
    )
    with open(path, "w") as fh:
        json.dump(
            {
                "machine": args.hardware,
                "slow_ms": args.slow_ms,
                "steps": args.steps,
                "repeats": args.repeats,
                "created": time.strftime("%Y-%m-%d %H:%M"),
                "summary": summary,
                "runs": runs,
            },
            fh,
            indent=1,
        )
    print(f"wrote {path}")
    for name, s in summary.items():
        print(
            f"{name:10s} {s['steps_per_s']:.2f} steps/s  ratio "
            f"{s.get('steps_per_s_vs_clean', 1.0):.3f}  acc {s['eval_accuracy']:.4f}"
        )


if __name__ == "__main__":
    main()
