"""Convergence vs consistency: eval accuracy after k steps for sync / mixed / SSP(S) / async.

The seed's finding (DistBelief, SSP, the BSC mixed-mode study): the more
asynchrony, the less accuracy each step buys. Every mode here uses the same
model, data, lr and momentum per global step (async updates get lr * share,
see ``Rule.lr_scale``), 4 workers, one Ray session. Accuracy "after k steps"
is a separate run with ``steps = k`` (constant learning rate, so the run is the
prefix of a longer one in sync mode; async modes are a fresh realization of the
arrival order) -- repeats average over that randomness.

    python experiments/consistency/convergence.py --steps 10,20,40,80,160 --repeats 2

Writes results_<hardware>_<yyyymm>.json and accuracy_vs_step.png (+ vs wall time) next to itself.
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

MODES = {
    # label: (mode, consistency)
    "sync": ("sync", ConsistencyConfig()),
    "mixed G=2": ("mixed", ConsistencyConfig(group_size=2)),
    "SSP S=2": ("ssp", ConsistencyConfig(staleness=2)),
    "SSP S=8": ("ssp", ConsistencyConfig(staleness=8)),
    "async": ("async", ConsistencyConfig()),
}


def make_config(
    mode: str, consistency: ConsistencyConfig, steps: int, workers: int, seed: int
) -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(name="cnn"),
        data=DataConfig(dataset="digits", batch_size=32),
        optim=OptimConfig(name="sgd", lr=0.05, momentum=0.9),
        cluster=ClusterConfig(num_workers=workers, num_servers=2, use_gpu="false"),
        consistency=consistency,
        mode=mode,
        steps=steps,
        seed=seed,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", default="10,20,40,80,160")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--hardware", default="x86-2core")
    args = ap.parse_args()
    import ray

    here = os.path.dirname(os.path.abspath(__file__))
    steps_grid = [int(s) for s in args.steps.split(",")]
    labels = args.modes.split(",")
    ray.init(
        num_cpus=max(os.cpu_count() or 1, args.workers),
        include_dashboard=False,
        logging_level="WARNING",
    )
    runs = []
    try:
        for repeat in range(args.repeats):
            for steps in steps_grid:
                for label in labels:  # modes alternate, so drift on the machine hits them alike
                    mode, consistency = MODES[label]
                    r = Trainer(
                        make_config(mode, consistency, steps, args.workers, seed=repeat)
                    ).fit()
                    row = {
                        "mode": label,
                        "steps": steps,
                        "repeat": repeat,
                        "eval_accuracy": r.eval_accuracy,
                        "eval_loss": r.eval_loss,
                        "train_time_s": r.train_time_s,
                        "updates_applied": r.updates_applied,
                        "staleness_histogram": r.staleness_histogram,
                        "wait_s": [w["wait_s"] for w in r.workers],
                    }
                    runs.append(row)
                    print(
                        f"{label:10s} steps={steps:4d} repeat={repeat} acc={r.eval_accuracy:.4f} "
                        f"time={r.train_time_s:.1f}s",
                        flush=True,
                    )
    finally:
        ray.shutdown()
    table = {}
    for label in labels:
        table[label] = {}
        for steps in steps_grid:
            rows = [r for r in runs if r["mode"] == label and r["steps"] == steps]
            table[label][steps] = {
                "accuracy_mean": statistics.mean(r["eval_accuracy"] for r in rows),
                "accuracy_min": min(r["eval_accuracy"] for r in rows),
                "accuracy_max": max(r["eval_accuracy"] for r in rows),
                "train_time_s_median": statistics.median(r["train_time_s"] for r in rows),
            }
    out = {
        "machine": args.hardware,
        "workers": args.workers,
        "repeats": args.repeats,
        "steps": steps_grid,
        "created": time.strftime("%Y-%m-%d %H:%M"),
        "table": table,
        "runs": runs,
    }
    path = os.path.join(here, f"results_{args.hardware}_{time.strftime('%Y%m')}.json")
    with open(path, "w") as fh:
        json.dump(out, fh, indent=1)
    print(f"wrote {path}")
    print(f"{'mode':10s} " + " ".join(f"{s:>7d}" for s in steps_grid))
    for label in labels:
        print(
            f"{label:10s} "
            + " ".join(f"{table[label][s]['accuracy_mean']:7.3f}" for s in steps_grid)
        )
    plot(table, labels, steps_grid, here)


def plot(table: dict, labels: list[str], steps_grid: list[int], here: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label in labels:
        acc = [table[label][s]["accuracy_mean"] for s in steps_grid]
        lo = [table[label][s]["accuracy_min"] for s in steps_grid]
        hi = [table[label][s]["accuracy_max"] for s in steps_grid]
        axes[0].plot(steps_grid, acc, marker="o", label=label)
        axes[0].fill_between(steps_grid, lo, hi, alpha=0.15)
        axes[1].plot(
            [table[label][s]["train_time_s_median"] for s in steps_grid],
            acc,
            marker="o",
            label=label,
        )
    axes[0].set(
        xlabel="steps (per worker)",
        ylabel="eval accuracy (digits)",
        xscale="log",
        title="accuracy vs step",
    )
    axes[1].set(
        xlabel="training wall time (s)",
        ylabel="eval accuracy",
        xscale="log",
        title="accuracy vs wall time",
    )
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = os.path.join(here, "accuracy_vs_step.png")
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
