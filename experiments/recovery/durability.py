"""Durability settings: throughput gained, and what a primary's death costs, against strict.

Async mode (relaxed:K), digits CNN, 4 workers x 2 shards, batch 32, momentum 0.5; or ``--mode
sync`` (pipelined), the main job: 2 workers x 2 shards, momentum 0.9, ``--steps`` steps. For each
``--durability`` setting (``none``: no replication at all, ``--recovery none``), alternating inside
every repeat:
  throughput   steady samples/s without kills (÷ strict in the same repeat)
  kill         server:0 SIGKILLed at --kill-step: updates lost (the summary's count), eval
               accuracy and params_sha256 at the end

    python experiments/recovery/durability.py --repeats 3
    python experiments/recovery/durability.py --mode sync --settings none,strict,pipelined \
        --steps 300 --kill-step 150 --repeats 5 --output experiments/recovery/results_pipelined.json

Writes results_durability_<hardware>_<yyyymm>.json next to itself unless --output names a file.
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


def make_config(
    durability: str,
    epochs: int,
    kill: str = "",
    seed: int = 0,
    mode: str = "async",
    steps: int | None = None,
) -> TrainConfig:
    sync = mode == "sync"
    none = durability == "none"
    return TrainConfig(
        model=ModelConfig(name="cnn"),
        data=DataConfig(dataset="digits", batch_size=32),
        optim=OptimConfig(name="sgd", lr=0.05, momentum=0.9 if sync else 0.5),
        cluster=ClusterConfig(num_workers=2 if sync else 4, num_servers=2, use_gpu="false"),
        recovery=RecoveryConfig(
            mode="none" if none else "replica",
            durability="auto" if none else durability,
            num_spares=1 if kill else 0,
        ),
        chaos=ChaosConfig(kill=kill),
        mode=mode,
        **({"epochs": epochs} if steps is None else {"steps": steps}),  # steps: the run's length
        seed=seed,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--settings", default="strict,relaxed:1,relaxed:4,relaxed:16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--kill-step", type=int, default=40)
    ap.add_argument("--hardware", default="x86-2core")
    ap.add_argument("--mode", default="async", choices=["async", "sync"])
    ap.add_argument("--steps", type=int, default=None, help="steps instead of --epochs")
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    import ray

    here = os.path.dirname(os.path.abspath(__file__))
    settings = args.settings.split(",")
    ray.init(num_cpus=6, num_gpus=0, include_dashboard=False, logging_level="WARNING")
    runs = []
    try:
        for rep in range(args.repeats):
            for durability in settings:
                kw = dict(seed=rep, mode=args.mode, steps=args.steps)
                clean = Trainer(make_config(durability, args.epochs, **kw)).fit()
                row = {
                    "repeat": rep,
                    "durability": durability,
                    "samples_per_sec": clean.steady_samples_per_sec,
                    "replica_wait_s": sum(s["replica_wait_s"] for s in clean.servers),
                    "eval_accuracy": clean.eval_accuracy,
                    "params_sha256": clean.params_sha256,
                }
                if durability != "none":  # without replication a server kill ends the run
                    killed = Trainer(
                        make_config(
                            durability, args.epochs, kill=f"server:0@step={args.kill_step}", **kw
                        )
                    ).fit()
                    row |= {
                        "killed_updates_lost": killed.updates_lost,
                        "killed_eval_accuracy": killed.eval_accuracy,
                        "killed_recoveries": len(killed.recoveries),
                        "killed_params_sha256": killed.params_sha256,
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
        killed = [r for r in rows if "killed_updates_lost" in r]
        summary[durability] = {
            "samples_per_sec": statistics.median(r["samples_per_sec"] for r in rows),
            "ratio_vs_strict": statistics.median(ratios) if ratios else None,
            "ratio_vs_strict_per_repeat": ratios,
            "eval_accuracy_mean": statistics.mean(r["eval_accuracy"] for r in rows),
            "killed_updates_lost": [r["killed_updates_lost"] for r in killed],
            "killed_eval_accuracy_mean": statistics.mean(r["killed_eval_accuracy"] for r in killed)
            if killed
            else None,
            "killed_same_hash": [r["killed_params_sha256"] == r["params_sha256"] for r in killed],
        }
        if "none" in settings:
            none = {r["repeat"]: r["samples_per_sec"] for r in runs if r["durability"] == "none"}
            summary[durability]["ratio_vs_none"] = statistics.median(
                r["samples_per_sec"] / none[r["repeat"]] for r in rows if r["repeat"] in none
            )
        print(durability, json.dumps(summary[durability]))
    out = {
        "machine": args.hardware,
        "args": vars(args),
        "created": time.strftime("%Y-%m-%d %H:%M"),
        "summary": summary,
        "runs": runs,
    }
    path = args.output or os.path.join(
        here, f"results_durability_{args.hardware}_{time.strftime('%Y%m')}.json"
    )
    with open(path, "w") as fh:
        json.dump(out, fh, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
