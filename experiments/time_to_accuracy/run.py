"""Time to accuracy: wall seconds of training until the held-out accuracy first reaches a target,
for plain PyTorch, Ray Train DDP and this project's modes, side by side in one run.

Digits CNN (the README's main job's model and data), 4 workers x 32 samples per
step (plain PyTorch: one process, the 4 workers' batches concatenated, which
is what sync computes), SGD lr 0.05 momentum 0.9, at most ``--epochs`` epochs,
target ``--target`` eval accuracy. Each system is evaluated while it trains:

- plain PyTorch: every ``--eval-every-steps`` steps, the clock stopped while it
  evaluates;
- Ray Train DDP (gloo, 4 workers; ``experiments/peers/ray_train_ddp.py``):
  rank 0 every ``--eval-every-steps`` steps, its clock stopped while it
  evaluates;
- this project (4 workers x 2 shards, one process each): ``--eval-every-s``,
  the driver evaluates the shards' parameters as they are
  (``eval_history``), on the same cores, so its evaluations cost the
  training some CPU; t counts from when the driver starts waiting on the
  workers (their first steps).

A run that never reaches the target counts as not reaching it (reported as
null, not as its length). Systems alternate within each seed so that drift on
the machine hits every system alike; medians over the seeds.

    python experiments/time_to_accuracy/run.py --seeds 0,1,2 \\
        --output experiments/time_to_accuracy/results_x86-2core_202611

Writes <output>.json and <output>.png (held-out accuracy over time, one line per system and
seed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time

import torch

from raytrain_ft.config import (
    ClusterConfig,
    ConsistencyConfig,
    DataConfig,
    ModelConfig,
    OptimConfig,
    RecoveryConfig,
    TrainConfig,
)
from raytrain_ft.data import global_step_indices, load_dataset, steps_per_epoch
from raytrain_ft.trainer import Trainer, evaluate, initial_model

WORKERS, SERVERS, BATCH = 4, 2, 32

# label: (mode, consistency fields, optimizer fields)
PROJECT = {
    "sync": ("sync", {}, {}),
    "async": ("async", {}, {}),
    "ssp (S=2)": ("ssp", dict(staleness=2), {}),
    "mixed (G=2)": ("mixed", dict(group_size=2), {}),
    # DiLoCo, the README's local SGD settings (H = 8)
    "local_sgd (DiLoCo)": (
        "local_sgd",
        dict(local_steps=8, inner_optimizer="adamw", inner_lr=0.003),
        dict(lr=0.0021, nesterov=True),
    ),
}


def config(mode: str, fields: dict, optim: dict, seed: int, epochs: int, eval_every_s=0.0):
    return TrainConfig(
        model=ModelConfig(name="cnn"),
        data=DataConfig(dataset="digits", batch_size=BATCH),
        optim=OptimConfig(**{"name": "sgd", "lr": 0.05, "momentum": 0.9, **optim}),
        cluster=ClusterConfig(num_workers=WORKERS, num_servers=SERVERS, use_gpu="false"),
        recovery=RecoveryConfig(num_spares=0),
        consistency=ConsistencyConfig(**fields),
        mode=mode,
        epochs=epochs,
        seed=seed,
        eval_every_s=eval_every_s,
    )


def first_reaching(curve: list, target: float):
    """The first t of (t, accuracy) points at or above ``target``, or None."""
    return next((t for t, acc in curve if acc >= target), None)


def plain_pytorch(seed: int, epochs: int, eval_every: int) -> list:
    cfg = config("sync", {}, {}, seed, epochs)
    torch.set_num_threads(1)
    data = load_dataset(cfg.data, seed)
    model = initial_model(cfg, data)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    n = len(data.train_y)
    steps = steps_per_epoch(n, WORKERS, BATCH) * epochs
    curve, clock = [], 0.0
    for step in range(steps):
        began = time.perf_counter()
        model.train()
        idx = torch.cat(
            [
                torch.from_numpy(global_step_indices(n, seed, r, WORKERS, BATCH, step))
                for r in range(WORKERS)
            ]
        )
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(data.train_x[idx]), data.train_y[idx]).backward()
        opt.step()
        clock += time.perf_counter() - began
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            acc, _ = evaluate(model, data.eval_x, data.eval_y)
            curve.append((round(clock, 3), acc))
    return curve


def ray_train_ddp(seed: int, epochs: int, eval_every: int, storage: str) -> list:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from experiments.peers import ray_train_ddp as ddp

    cfg = config("sync", {}, {}, seed, epochs)
    n = len(load_dataset(cfg.data, seed).train_y)
    cfg = dataclasses.replace(cfg, steps=steps_per_epoch(n, WORKERS, BATCH) * epochs)
    out = ddp.fit(cfg, storage, eval_every=eval_every)
    return [(round(t, 3), acc) for _, t, acc in out["evals"]]


def project(label: str, seed: int, epochs: int, eval_every_s: float) -> list:
    mode, fields, optim = PROJECT[label]
    result = Trainer(config(mode, fields, optim, seed, epochs, eval_every_s)).fit()
    curve = [(e["t"], e["eval_accuracy"]) for e in result.eval_history]
    curve.append((round(result.train_time_s, 3), result.eval_accuracy))  # the final evaluation
    return curve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--target", type=float, default=0.97)
    ap.add_argument("--eval-every-s", type=float, default=0.25)
    ap.add_argument("--eval-every-steps", type=int, default=4)
    ap.add_argument("--systems", default=",".join(["plain PyTorch", "Ray Train DDP", *PROJECT]))
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    systems = args.systems.split(",")
    runs = []
    storage = tempfile.mkdtemp(prefix="tta-")
    for seed in (int(s) for s in args.seeds.split(",")):
        for system in systems:
            if system == "plain PyTorch":
                curve = plain_pytorch(seed, args.epochs, args.eval_every_steps)
            elif system == "Ray Train DDP":
                ray.init(num_cpus=WORKERS, include_dashboard=False, logging_level="ERROR")
                try:
                    curve = ray_train_ddp(seed, args.epochs, args.eval_every_steps, storage)
                finally:
                    ray.shutdown()
            else:
                curve = project(system, seed, args.epochs, args.eval_every_s)
            reached = first_reaching(curve, args.target)
            runs.append(dict(system=system, seed=seed, curve=curve, time_to_target_s=reached))
            print(
                f"seed {seed} {system:20s} final {curve[-1][1]:.4f} at {curve[-1][0]:.1f}s; "
                f"{args.target} at {reached if reached is None else f'{reached:.2f}s'}",
                flush=True,
            )
    summary = {}
    for system in systems:
        times = [r["time_to_target_s"] for r in runs if r["system"] == system]
        got = [t for t in times if t is not None]
        summary[system] = dict(
            median_s=statistics.median(got) if len(got) == len(times) else None,
            reached=f"{len(got)}/{len(times)}",
            times_s=times,
        )
        print(f"{system:20s} median {summary[system]['median_s']} reached {len(got)}/{len(times)}")
    if args.output:
        with open(args.output + ".json", "w") as f:
            json.dump(
                dict(
                    target=args.target,
                    epochs=args.epochs,
                    workers=WORKERS,
                    servers=SERVERS,
                    created=time.strftime("%Y-%m-%d %H:%M"),
                    summary=summary,
                    runs=runs,
                ),
                f,
                indent=1,
            )
        plot(runs, systems, args.target, args.output + ".png")
        print(f"wrote {args.output}.json and .png")


def plot(runs: list, systems: list, target: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, system in enumerate(systems):
        for j, r in enumerate(x for x in runs if x["system"] == system):
            t, acc = zip(*r["curve"])
            ax.plot(
                t, acc, color=colors[i % len(colors)], alpha=0.8, label=system if j == 0 else None
            )
    ax.axhline(target, color="grey", linestyle="--", linewidth=1)
    ax.set_ylim(0.5, 1.0)
    ax.set_xlabel("training seconds")
    ax.set_ylabel("held-out accuracy")
    ax.set_title("digits CNN, 4 workers x 32 samples per step; one line per seed")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
