"""Time to accuracy: wall seconds of training until a held-out metric first reaches a target, for
plain PyTorch, Ray Train DDP and this project's modes, side by side in one run.

Two tasks (``--task``):

- ``digits-cnn`` (the default; the README's main job's model and data): 4 workers x 32 samples
  per step, SGD lr 0.05 momentum 0.9, at most 10 epochs, target 0.97 held-out accuracy;
- ``resnet18``: ResNet-18 on 32x32x3 synthetic images (a fixed prototype per class plus noise,
  2,048 training samples), 2 workers x 32 samples per step, SGD lr 0.05 momentum 0.9, at most 3
  epochs, target a held-out cross-entropy of 0.7 (chance: 2.30; plain PyTorch ends near 0.54).

Plain PyTorch is one process with the workers' batches concatenated (what sync computes). Each
system is evaluated while it trains:

- plain PyTorch: every ``--eval-every-steps`` steps, the clock stopped while it
  evaluates;
- Ray Train DDP (gloo, one process per worker; ``experiments/peers/ray_train_ddp.py``):
  rank 0 every ``--eval-every-steps`` steps, its clock stopped while it
  evaluates;
- this project (the workers x 2 shards, one process each): ``--eval-every-s``,
  the driver evaluates the shards' parameters as they are
  (``eval_history``), on the same cores, so its evaluations cost the
  training some CPU; t counts from when the driver starts waiting on the
  workers (their first steps).

A run that never reaches the target counts as not reaching it (reported as
null, not as its length). Systems alternate within each seed so that drift on
the machine hits every system alike; medians over the seeds.

    python experiments/time_to_accuracy/run.py --seeds 0,1,2 \\
        --output experiments/time_to_accuracy/results_x86-2core_202611
    python experiments/time_to_accuracy/run.py --task resnet18 --seeds 0,1 \\
        --systems "plain PyTorch,Ray Train DDP,sync,async,mixed (G=2)" --eval-every-steps 8 \\
        --eval-every-s 10 --output experiments/time_to_accuracy/results_resnet18_x86-2core_202611

Writes <output>.json and <output>.png (the held-out metric over time, one line per system and
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

SERVERS, BATCH = 2, 32


@dataclasses.dataclass(frozen=True)
class Task:
    model: str
    data: dict
    workers: int
    metric: str  # "accuracy" (reach at or above the target) or "loss" (at or below)
    target: float
    epochs: int
    title: str

    def reached(self, acc: float, loss: float) -> bool:
        return acc >= self.target if self.metric == "accuracy" else loss <= self.target


TASKS = {
    "digits-cnn": Task("cnn", dict(dataset="digits"), 4, "accuracy", 0.97, 10, "digits CNN"),
    "resnet18": Task(
        "resnet18",
        dict(dataset="synthetic", image_size=32, synthetic_channels=3, synthetic_samples=2048),
        2,
        "loss",
        0.7,
        3,
        "ResNet-18, 32x32x3 synthetic",
    ),
}

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


def config(
    task: Task, mode: str, fields: dict, optim: dict, seed: int, epochs: int, eval_every_s=0.0
):
    return TrainConfig(
        model=ModelConfig(name=task.model),
        data=DataConfig(**task.data, batch_size=BATCH),
        optim=OptimConfig(**{"name": "sgd", "lr": 0.05, "momentum": 0.9, **optim}),
        cluster=ClusterConfig(num_workers=task.workers, num_servers=SERVERS, use_gpu="false"),
        recovery=RecoveryConfig(num_spares=0),
        consistency=ConsistencyConfig(**fields),
        mode=mode,
        epochs=epochs,
        seed=seed,
        eval_every_s=eval_every_s,
    )


def first_reaching(curve: list, task: Task):
    """The first t of (t, accuracy, loss) points that reach the task's target, or None."""
    return next((t for t, acc, loss in curve if task.reached(acc, loss)), None)


def plain_pytorch(task: Task, seed: int, epochs: int, eval_every: int) -> list:
    cfg = config(task, "sync", {}, {}, seed, epochs)
    torch.set_num_threads(1)
    workers = task.workers
    data = load_dataset(cfg.data, seed)
    model = initial_model(cfg, data)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    n = len(data.train_y)
    steps = steps_per_epoch(n, workers, BATCH) * epochs
    curve, clock = [], 0.0
    for step in range(steps):
        began = time.perf_counter()
        model.train()
        idx = torch.cat(
            [
                torch.from_numpy(global_step_indices(n, seed, r, workers, BATCH, step))
                for r in range(workers)
            ]
        )
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(data.train_x[idx]), data.train_y[idx]).backward()
        opt.step()
        clock += time.perf_counter() - began
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            acc, loss = evaluate(model, data.eval_x, data.eval_y)
            curve.append((round(clock, 3), acc, loss))
    return curve


def ray_train_ddp(task: Task, seed: int, epochs: int, eval_every: int, storage: str) -> list:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from experiments.peers import ray_train_ddp as ddp

    cfg = config(task, "sync", {}, {}, seed, epochs)
    n = len(load_dataset(cfg.data, seed).train_y)
    cfg = dataclasses.replace(cfg, steps=steps_per_epoch(n, task.workers, BATCH) * epochs)
    out = ddp.fit(cfg, storage, eval_every=eval_every)
    return [(round(t, 3), acc, loss) for _, t, acc, loss in out["evals"]]


def project(task: Task, label: str, seed: int, epochs: int, eval_every_s: float) -> list:
    mode, fields, optim = PROJECT[label]
    result = Trainer(config(task, mode, fields, optim, seed, epochs, eval_every_s)).fit()
    curve = [(e["t"], e["eval_accuracy"], e["eval_loss"]) for e in result.eval_history]
    # the final evaluation
    curve.append((round(result.train_time_s, 3), result.eval_accuracy, result.eval_loss))
    return curve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", choices=sorted(TASKS), default="digits-cnn")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=None, help="at most (default: the task's)")
    ap.add_argument("--target", type=float, default=None, help="default: the task's")
    ap.add_argument("--eval-every-s", type=float, default=0.25)
    ap.add_argument("--eval-every-steps", type=int, default=4)
    ap.add_argument("--systems", default=",".join(["plain PyTorch", "Ray Train DDP", *PROJECT]))
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    task = TASKS[args.task]
    task = dataclasses.replace(
        task,
        target=task.target if args.target is None else args.target,
        epochs=task.epochs if args.epochs is None else args.epochs,
    )
    systems = args.systems.split(",")
    runs = []
    storage = tempfile.mkdtemp(prefix="tta-")
    for seed in (int(s) for s in args.seeds.split(",")):
        for system in systems:
            if system == "plain PyTorch":
                curve = plain_pytorch(task, seed, task.epochs, args.eval_every_steps)
            elif system == "Ray Train DDP":
                ray.init(num_cpus=task.workers, include_dashboard=False, logging_level="ERROR")
                try:
                    curve = ray_train_ddp(task, seed, task.epochs, args.eval_every_steps, storage)
                finally:
                    ray.shutdown()
            else:
                curve = project(task, system, seed, task.epochs, args.eval_every_s)
            reached = first_reaching(curve, task)
            runs.append(dict(system=system, seed=seed, curve=curve, time_to_target_s=reached))
            print(
                f"seed {seed} {system:20s} final accuracy {curve[-1][1]:.4f} loss "
                f"{curve[-1][2]:.4f} at {curve[-1][0]:.1f}s; {task.metric} {task.target} at "
                f"{reached if reached is None else f'{reached:.2f}s'}",
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
                    task=args.task,
                    metric=task.metric,
                    target=task.target,
                    epochs=task.epochs,
                    workers=task.workers,
                    servers=SERVERS,
                    created=time.strftime("%Y-%m-%d %H:%M"),
                    summary=summary,
                    runs=runs,
                ),
                f,
                indent=1,
            )
        plot(runs, systems, task, args.output + ".png")
        print(f"wrote {args.output}.json and .png")


def plot(runs: list, systems: list, task: Task, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    column = 1 if task.metric == "accuracy" else 2
    for i, system in enumerate(systems):
        for j, r in enumerate(x for x in runs if x["system"] == system):
            t = [p[0] for p in r["curve"]]
            ax.plot(
                t,
                [p[column] for p in r["curve"]],
                color=colors[i % len(colors)],
                alpha=0.8,
                label=system if j == 0 else None,
            )
    ax.axhline(task.target, color="grey", linestyle="--", linewidth=1)
    if task.metric == "accuracy":
        ax.set_ylim(0.5, 1.0)
    else:
        ax.set_yscale("log")
    ax.set_xlabel("training seconds")
    ax.set_ylabel(f"held-out {'accuracy' if task.metric == 'accuracy' else 'cross-entropy'}")
    ax.set_title(
        f"{task.title}, {task.workers} workers x {BATCH} samples per step; one line per seed"
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
