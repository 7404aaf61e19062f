"""Which defaults let async, ssp and mixed learn as well as sync: a study over seeds and worker
counts.

Each asynchronous mode runs with every mechanism the servers offer against
the staleness that asynchrony brings, at the project's default optimizer
(SGD, lr 0.05, momentum 0.9), digits CNN, batch 32 per worker, 2 shards,
5 epochs (the same samples in every mode):

- ``plain``: momentum 0.9 on every update (``--momentum-correction none``);
- ``inverse``: the learning rate divided by each update's staleness
  (``--staleness-lr inverse``);
- ``corrected``: each update's momentum chosen so that, with the momentum
  asynchrony adds, it remembers as many samples as sync's
  (``--momentum-correction auto``, ``Rule.momentum``);
- ``momentum 0.75``: a shorter memory at the same step per gradient
  (``--momentum 0.75 --lr 0.125``; what lowering the momentum by hand does);
- ``dc S``: delay compensation (DC-ASGD-a, ``--delay-compensation S``): a
  stale gradient corrected by the parameters' change since it was computed;
- ``dana``: per-stream momentum buffers with look-ahead pulls (DANA-Zero,
  ``--momentum-correction dana``, the default since this study).

``plain``, ``inverse``, ``corrected``, ``momentum 0.75`` and ``dc S`` use the
shard's one momentum buffer (``--momentum-correction none`` unless named).

Sync runs once per seed as the reference. Runs alternate inside each seed so
that drift on the machine hits every variant alike.

    python experiments/consistency/async_defaults.py --workers 4 --seeds 0,1,2 --variants dana \\
        --output experiments/consistency/results_async_defaults_dana_w4_x86-2core_202611
    python experiments/consistency/async_defaults.py --workers 8 --seeds 0,1,2 --variants dana \\
        --output experiments/consistency/results_async_defaults_dana_w8_x86-2core_202611
    python experiments/consistency/async_defaults.py --workers 4 --seeds 0,1,2 \\
        --variants "plain,inverse,corrected,momentum 0.75" \\
        --output experiments/consistency/results_async_defaults_w4_x86-2core_202611
    python experiments/consistency/async_defaults.py --workers 4 --seeds 0,1,2 \\
        --variants "dc 0.5,dc 2" \\
        --output experiments/consistency/results_async_defaults_dc_w4_x86-2core_202611
    python experiments/consistency/async_defaults.py --workers 8 --seeds 0,1,2 \\
        --modes async,mixed --variants "plain,inverse,corrected,dc 2" \\
        --output experiments/consistency/results_async_defaults_w8_x86-2core_202611

Writes results_async_defaults_<hardware>_<yyyymm>.json and a PNG (accuracy per variant, the sync
mean as a line) next to itself.
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

VARIANTS = {
    # label: (consistency fields beyond the mode's own, optimizer (momentum, lr))
    "plain": (dict(momentum_correction="none", staleness_lr="none"), (0.9, 0.05)),
    "inverse": (dict(momentum_correction="none", staleness_lr="inverse"), (0.9, 0.05)),
    "corrected": (dict(momentum_correction="auto", staleness_lr="none"), (0.9, 0.05)),
    # a shorter momentum memory at the same step per gradient, lr / (1 - momentum) = 0.5
    "momentum 0.75": (dict(momentum_correction="none", staleness_lr="none"), (0.75, 0.125)),
    "dc 0.5": (dict(momentum_correction="none", delay_compensation=0.5), (0.9, 0.05)),
    "dc 2": (dict(momentum_correction="none", delay_compensation=2.0), (0.9, 0.05)),
    # per-stream momentum with look-ahead pulls (DANA-Zero), the default since this study
    "dana": (dict(momentum_correction="dana", staleness_lr="none"), (0.9, 0.05)),
}
MODES = {"async": {}, "ssp": dict(staleness=2), "mixed": dict(group_size=2)}


def make_config(
    mode: str, fields: dict, workers: int, seed: int, epochs: int, optim=(0.9, 0.05)
) -> TrainConfig:
    momentum, lr = optim
    return TrainConfig(
        model=ModelConfig(name="cnn"),
        data=DataConfig(dataset="digits", batch_size=32),
        optim=OptimConfig(name="sgd", lr=lr, momentum=momentum),
        cluster=ClusterConfig(num_workers=workers, num_servers=2, use_gpu="false"),
        recovery=RecoveryConfig(num_spares=0),
        consistency=ConsistencyConfig(**fields),
        mode=mode,
        epochs=epochs,
        seed=seed,
    )


def runs_for(workers: int, modes: list[str], variants: list[str]):
    yield "sync", "-", {}, (0.9, 0.05)
    for mode in modes:
        for variant in variants:
            # staleness-lr applies to async and ssp only (Rule.lr_scale)
            if mode == "mixed" and "inverse" in variant:
                continue
            fields, optim = VARIANTS[variant]
            yield mode, variant, {**MODES[mode], **fields}, optim


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", default="4,8")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--hardware", default="x86-2core")
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    import ray

    here = os.path.dirname(os.path.abspath(__file__))
    worker_counts = [int(w) for w in args.workers.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    modes, variants = args.modes.split(","), args.variants.split(",")
    ray.init(
        num_cpus=max(os.cpu_count() or 1, max(worker_counts) + 2),
        num_gpus=0,
        include_dashboard=False,
        logging_level="WARNING",
    )
    runs = []
    try:
        for workers in worker_counts:
            for seed in seeds:
                for mode, variant, fields, optim in runs_for(workers, modes, variants):
                    cfg = make_config(mode, fields, workers, seed, args.epochs, optim)
                    r = Trainer(cfg).fit()
                    runs.append(
                        {
                            "workers": workers,
                            "seed": seed,
                            "mode": mode,
                            "variant": variant,
                            "eval_accuracy": r.eval_accuracy,
                            "eval_loss": r.eval_loss,
                            "train_time_s": r.train_time_s,
                            "updates_applied": r.updates_applied,
                            "staleness_histogram": r.staleness_histogram,
                        }
                    )
                    print(
                        f"W={workers} seed={seed} {mode:5s} {variant:18s} "
                        f"acc={r.eval_accuracy:.4f} loss={r.eval_loss:.4f} "
                        f"time={r.train_time_s:.1f}s",
                        flush=True,
                    )
    finally:
        ray.shutdown()
    table: dict = {}
    for row in runs:
        key = (row["workers"], row["mode"], row["variant"])
        table.setdefault(key, []).append(row["eval_accuracy"])
    summary = [
        {
            "workers": w,
            "mode": m,
            "variant": v,
            "accuracy_mean": statistics.mean(accs),
            "accuracy_min": min(accs),
            "accuracy_max": max(accs),
            "seeds": len(accs),
        }
        for (w, m, v), accs in table.items()
    ]
    out = {
        "machine": args.hardware,
        "epochs": args.epochs,
        "seeds": seeds,
        "created": time.strftime("%Y-%m-%d %H:%M"),
        "summary": summary,
        "runs": runs,
    }
    stem = args.output or os.path.join(
        here, f"results_async_defaults_{args.hardware}_{time.strftime('%Y%m')}"
    )
    with open(stem + ".json", "w") as fh:
        json.dump(out, fh, indent=1)
    print(f"wrote {stem}.json")
    sync = {s["workers"]: s["accuracy_mean"] for s in summary if s["mode"] == "sync"}
    for s in summary:
        gap = s["accuracy_mean"] - sync[s["workers"]]
        print(
            f"W={s['workers']} {s['mode']:5s} {s['variant']:18s} mean={s['accuracy_mean']:.4f} "
            f"[{s['accuracy_min']:.4f}, {s['accuracy_max']:.4f}] vs sync {gap:+.4f}"
        )
    plot(summary, worker_counts, stem + ".png")


def plot(summary: list[dict], worker_counts: list[int], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(worker_counts), figsize=(6 * len(worker_counts), 4.5))
    axes = axes if len(worker_counts) > 1 else [axes]
    for ax, w in zip(axes, worker_counts, strict=True):
        rows = [s for s in summary if s["workers"] == w and s["mode"] != "sync"]
        sync = next(s for s in summary if s["workers"] == w and s["mode"] == "sync")
        labels = [f"{s['mode']}\n{s['variant']}" for s in rows]
        means = [s["accuracy_mean"] for s in rows]
        err = [
            [s["accuracy_mean"] - s["accuracy_min"] for s in rows],
            [s["accuracy_max"] - s["accuracy_mean"] for s in rows],
        ]
        ax.bar(range(len(rows)), means, yerr=err, capsize=3, color="tab:blue", alpha=0.7)
        ax.axhline(sync["accuracy_mean"], color="k", label=f"sync {sync['accuracy_mean']:.3f}")
        ax.axhline(sync["accuracy_mean"] - 0.02, color="k", ls=":", label="sync - 2 points")
        ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=7)
        ax.set(ylabel="eval accuracy (mean, min-max over seeds)", title=f"{w} workers x 2 shards")
        ax.set_ylim(min(0.5, min(means) - 0.05), 1.0)
        ax.legend(loc="lower left")
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
