"""Throughput vs workers and vs parameter servers with real compute (the seed's Table 1/2 shape).

Real forward/backward on this machine's cores: the small CNN on digits and
ResNet-18 on 32x32x3 synthetic images, sync and mixed (groups of 2) modes.
Every worker has 1 torch thread; each (model, mode, workers, servers) point
runs once per repeat, repeats alternate, medians reported.

  speedup     samples/s ÷ samples/s of 1 worker with 1 server (same model and mode)
  efficiency  speedup ÷ workers           (the resource added: workers, 1 core each)
  per_core    speedup ÷ min(workers, cores): what the added workers could give on this machine

    python experiments/scaling/real.py --models cnn,resnet18 --modes sync,mixed --workers 1,2,4 \
        --servers 1,2,4 --repeats 2
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
    TrainConfig,
)
from raytrain_ft.trainer import Trainer

SETTINGS = {
    "cnn": ("digits", 16, 1, 200),
    "resnet18": ("synthetic", 32, 3, 10),
}  # dataset, image size, channels, steps


def make_config(model: str, mode: str, workers: int, servers: int, batch: int) -> TrainConfig:
    dataset, size, channels, steps = SETTINGS[model]
    return TrainConfig(
        model=ModelConfig(name=model),
        data=DataConfig.images(dataset, size, channels, 2048, batch_size=batch),
        optim=OptimConfig(name="sgd", lr=0.01, momentum=0.9),
        cluster=ClusterConfig(num_workers=workers, num_servers=servers, use_gpu="false"),
        mode=mode,
        consistency=ConsistencyConfig(
            **({"group_size": 2 if workers % 2 == 0 else 1} if mode == "mixed" else {})
        ),
        steps=steps,
        seed=0,
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--models", default="cnn,resnet18")
    ap.add_argument("--modes", default="sync,mixed")
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--servers", default="1,2,4")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument(
        "--output",
        default=os.path.join(
            os.path.dirname(os.path.abspath(__file__)), "results_real_x86-2core_202611.json"
        ),
    )
    args = ap.parse_args()
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    workers = [int(w) for w in args.workers.split(",")]
    servers = [int(s) for s in args.servers.split(",")]
    cores = os.cpu_count() or 1
    ray.init(num_cpus=max(max(workers), cores), include_dashboard=False, logging_level="WARNING")
    rows = []
    try:
        for rep in range(args.repeats):
            for model in args.models.split(","):
                for mode in args.modes.split(","):
                    for s in servers:
                        for w in workers:
                            if mode == "mixed" and w == 1:
                                continue  # one worker: mixed is sync
                            r = Trainer(make_config(model, mode, w, s, args.batch_size)).fit()
                            rows.append(
                                {
                                    "model": model,
                                    "mode": mode,
                                    "workers": w,
                                    "servers": s,
                                    "repeat": rep,
                                    "samples_per_sec": r.steady_samples_per_sec,
                                    "eval_accuracy": r.eval_accuracy,
                                }
                            )
                            print(
                                f"rep {rep} {model} {mode} W={w} S={s}: "
                                f"{r.steady_samples_per_sec:.1f} samples/s",
                                flush=True,
                            )
    finally:
        ray.shutdown()
    table = []
    for model in args.models.split(","):
        base = statistics.median(
            r["samples_per_sec"]
            for r in rows
            if r["model"] == model
            and r["mode"] == "sync"
            and r["workers"] == 1
            and r["servers"] == 1
        )
        for mode in args.modes.split(","):
            for s in servers:
                for w in workers:
                    got = [
                        r["samples_per_sec"]
                        for r in rows
                        if (r["model"], r["mode"], r["workers"], r["servers"])
                        == (model, mode, w, s)
                    ]
                    if not got:
                        continue
                    thr = statistics.median(got)
                    table.append(
                        {
                            "model": model,
                            "mode": mode,
                            "workers": w,
                            "servers": s,
                            "samples_per_sec": round(thr, 1),
                            "speedup": round(thr / base, 3),
                            "efficiency": round(thr / base / w, 3),
                            "per_core": round(thr / base / min(w, cores), 3),
                        }
                    )
                    print(json.dumps(table[-1]))
    with open(args.output, "w") as fh:
        json.dump(
            {
                "args": vars(args),
                "cores": cores,
                "runs": rows,
                "table": table,
                "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            },
            fh,
            indent=2,
        )
    print(f"wrote {args.output}")
    plot(table, args.output[: -len(".json")] + ".png")


def plot(table: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in table})
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        for mode in sorted({r["mode"] for r in table}):
            for s in sorted({r["servers"] for r in table}):
                pts = sorted(
                    (r["workers"], r["speedup"])
                    for r in table
                    if (r["model"], r["mode"], r["servers"]) == (model, mode, s)
                )
                ax.plot(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    marker="o",
                    linestyle="-" if mode == "sync" else "--",
                    label=f"{mode}, {s} server(s)",
                )
        ax.set_xlabel("workers (1 torch thread each; this machine has 2 cores)")
        ax.set_ylabel("speedup vs 1 worker, 1 server")
        ax.set_title(model)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
