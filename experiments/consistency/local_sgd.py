"""Local SGD / DiLoCo against sync at equal epochs: eval accuracy, pushes, bytes and wall time.

Digits CNN, 4 workers x 2 shards, batch 32 per worker, the same epochs and
seeds for every variant (runs alternate inside each seed):

- ``sync``: the defaults (SGD lr 0.05, momentum 0.9 on the shards);
- ``local_sgd defaults``: ``--mode local_sgd --local-steps 8`` and nothing
  else (inner plain SGD at --lr; the shards' SGD + momentum 0.9 as the outer
  optimizer);
- ``local_sgd averaging``: inner AdamW 0.003, outer plain SGD at the inner
  rate (the workers' models averaged every round);
- ``DiLoCo``: inner AdamW 0.003, outer SGD with Nesterov momentum 0.9 at 0.7x
  the inner rate (the pseudo-gradient travels in gradient units).

    python experiments/consistency/local_sgd.py --seeds 0,1,2 --epochs 5

Writes results_local_sgd_<hardware>_<yyyymm>.json next to itself.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from raytrain_ft.config import (
    ClusterConfig,
    ConsistencyConfig,
    DataConfig,
    ModelConfig,
    OptimConfig,
    RecoveryConfig,
    TrainConfig,
)
from raytrain_ft.trainer import Trainer

ADAMW = dict(inner_optimizer="adamw", inner_lr=0.003)
VARIANTS = {
    # label: (mode, consistency fields, optimizer fields)
    "sync": ("sync", {}, dict(lr=0.05, momentum=0.9)),
    "local_sgd defaults": ("local_sgd", dict(local_steps=8), dict(lr=0.05, momentum=0.9)),
    "local_sgd averaging": (
        "local_sgd",
        dict(local_steps=8, **ADAMW),
        dict(lr=0.003, momentum=0.0),
    ),
    "DiLoCo": (
        "local_sgd",
        dict(local_steps=8, **ADAMW),
        dict(lr=0.7 * 0.003, momentum=0.9, nesterov=True),
    ),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--hardware", default="x86-2core")
    args = ap.parse_args()
    import ray

    here = os.path.dirname(os.path.abspath(__file__))
    ray.init(
        num_cpus=max(os.cpu_count() or 1, args.workers + 2),
        num_gpus=0,
        include_dashboard=False,
        logging_level="WARNING",
    )
    runs = []
    try:
        for seed in [int(s) for s in args.seeds.split(",")]:
            for label, (mode, fields, optim) in VARIANTS.items():
                cfg = TrainConfig(
                    model=ModelConfig(name="cnn"),
                    data=DataConfig(dataset="digits", batch_size=32),
                    optim=OptimConfig(name="sgd", **optim),
                    cluster=ClusterConfig(num_workers=args.workers, num_servers=2, use_gpu="false"),
                    recovery=RecoveryConfig(num_spares=0),
                    consistency=ConsistencyConfig(**fields),
                    mode=mode,
                    epochs=args.epochs,
                    seed=seed,
                )
                r = Trainer(cfg).fit()
                row = {
                    "variant": label,
                    "seed": seed,
                    "eval_accuracy": r.eval_accuracy,
                    "pushes_per_worker": r.steps_completed,
                    "bytes_pushed": sum(w["bytes_pushed"] for w in r.workers),
                    "train_time_s": r.train_time_s,
                }
                runs.append(row)
                print(json.dumps(row), flush=True)
    finally:
        ray.shutdown()
    summary = {}
    for label in VARIANTS:
        rows = [r for r in runs if r["variant"] == label]
        summary[label] = {
            "accuracy_mean": statistics.mean(r["eval_accuracy"] for r in rows),
            "accuracy_min": min(r["eval_accuracy"] for r in rows),
            "accuracy_max": max(r["eval_accuracy"] for r in rows),
            "pushes_per_worker": rows[0]["pushes_per_worker"],
            "bytes_pushed": statistics.median(r["bytes_pushed"] for r in rows),
            "train_time_s_median": statistics.median(r["train_time_s"] for r in rows),
        }
        s = summary[label]
        print(
            f"{label:20s} acc {s['accuracy_mean']:.4f} [{s['accuracy_min']:.4f}, "
            f"{s['accuracy_max']:.4f}] pushes/worker {s['pushes_per_worker']} "
            f"bytes {s['bytes_pushed'] / 1e6:.1f} MB time {s['train_time_s_median']:.1f}s"
        )
    out = {
        "machine": args.hardware,
        "epochs": args.epochs,
        "workers": args.workers,
        "created": time.strftime("%Y-%m-%d %H:%M"),
        "summary": summary,
        "runs": runs,
    }
    path = os.path.join(here, f"results_local_sgd_{args.hardware}_{time.strftime('%Y%m')}.json")
    with open(path, "w") as fh:
        json.dump(out, fh, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
