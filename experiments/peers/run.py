"""Peers side by side: plain PyTorch, Ray Train DDP (gloo), this project in sync mode.

Same model, same data, same global batch (workers x per-worker batch), same number of
workers, same torch threads per worker, SGD + momentum; warm-up steps excluded. Each repeat
runs the three in turn, so drift on a noisy machine hits all of them; medians of repeats
and ratios to Ray Train DDP are reported.

  plain      one process, global batch, --threads x workers torch threads (the same cores)
  ddp        Ray Train TorchTrainer, DDP over gloo, one rank per worker, each its partition
  ps         raytrain-ft sync: the same ranks and partitions, --num-servers parameter servers
             (replication and its command log on, as by default)
  ps R/S     with --ps R:S,...: the same with R ranks per worker process (the ranks of a process
             sum their gradients and send one push per shard, as the GPUs of one node would) and
             S servers; each such setting runs in every repeat beside the others

    python experiments/peers/run.py --models cnn resnet18 --workers 2 --repeats 3
    python experiments/peers/run.py --models cnn --ps 1:2,2:1,2:2 --repeats 5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from experiments.peers import ray_train_ddp  # noqa: E402
from experiments.throughput_vs_pytorch.run import plain_pytorch  # noqa: E402
from raytrain_ft.config import ClusterConfig, DataConfig, ModelConfig, OptimConfig, TrainConfig  # noqa: E402
from raytrain_ft.trainer import Trainer  # noqa: E402

SETTINGS = {  # model: (dataset, image size, channels, steps)
    "cnn": ("digits", 8, 1, 300),
    "resnet18": ("synthetic", 32, 3, 30),
}


def make_config(
    model: str,
    workers: int,
    batch: int,
    threads: int,
    servers: int,
    steps: int | None = None,
    ranks_per_process: int = 1,
) -> TrainConfig:
    dataset, size, channels, default_steps = SETTINGS[model]
    return TrainConfig(
        model=ModelConfig(name=model),
        data=DataConfig.images(dataset, size, channels, 4096, batch_size=batch),
        optim=OptimConfig(name="sgd", lr=0.01, momentum=0.9, weight_decay=0.0),
        cluster=ClusterConfig(
            num_workers=workers,
            num_servers=servers,
            cpus_per_worker=threads,
            use_gpu="false",
            ranks_per_process=ranks_per_process,
        ),
        steps=steps or default_steps,
        seed=0,
    )


def steady(times: list, warmup: int, global_batch: int) -> float:
    """Samples/s over the steps after ``warmup`` from (step, end time) pairs."""
    t = [x for _, x in sorted(times)]
    return (len(t) - 1 - warmup) * global_batch / (t[-1] - t[warmup])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--models", nargs="+", default=["cnn", "resnet18"])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32, help="per worker")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--num-servers", type=int, default=2)
    ap.add_argument(
        "--ps",
        default="",
        help="more raytrain-ft settings, RANKS_PER_PROCESS:SERVERS,... (e.g. 2:1,2:2); the first "
        "is reported as 'ps' when given, else --num-servers with a process per rank",
    )
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--output", default="experiments/peers/results_x86-2core_202611.json")
    args = ap.parse_args()
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(
        num_cpus=max(args.workers * args.threads, os.cpu_count() or 1),
        include_dashboard=False,
        logging_level="WARNING",
    )
    storage = tempfile.mkdtemp(prefix="ddp-")
    results = []
    try:
        for model in args.models:
            cfg = make_config(
                model, args.workers, args.batch_size, args.threads, args.num_servers, args.steps
            )
            plain_cfg = dataclasses.replace(
                cfg,
                data=dataclasses.replace(cfg.data, batch_size=args.batch_size * args.workers),
                cluster=dataclasses.replace(
                    cfg.cluster, num_workers=1, cpus_per_worker=args.threads * args.workers
                ),
            )
            warmup = min(5, cfg.steps // 4)
            settings = [tuple(int(v) for v in x.split(":")) for x in args.ps.split(",") if x]
            settings = settings or [(1, args.num_servers)]
            ps_cfgs = {
                ("ps" if i == 0 else f"ps {rpp}/{servers}"): dataclasses.replace(
                    cfg,
                    cluster=dataclasses.replace(
                        cfg.cluster, ranks_per_process=rpp, num_servers=servers
                    ),
                )
                for i, (rpp, servers) in enumerate(settings)
            }
            runs = {"plain": [], "ddp": [], **{k: [] for k in ps_cfgs}}
            acc = {"ddp": [], **{k: [] for k in ps_cfgs}}
            hashes = {k: set() for k in ps_cfgs}
            for r in range(args.repeats):
                runs["plain"].append(plain_pytorch(plain_cfg, warmup))
                d = ray_train_ddp.fit(cfg, storage)
                runs["ddp"].append(steady(d["times"], warmup, args.batch_size * args.workers))
                acc["ddp"].append(d["eval_accuracy"])
                for key, ps_cfg in ps_cfgs.items():
                    res = Trainer(ps_cfg).fit()
                    assert res.warmup_steps_excluded == warmup
                    runs[key].append(res.steady_samples_per_sec)
                    acc[key].append(res.eval_accuracy)
                    hashes[key].add(res.params_sha256)
                print(
                    f"{model} repeat {r}: "
                    + ", ".join(f"{k} {v[-1]:.1f}" for k, v in runs.items())
                    + " samples/s",
                    flush=True,
                )
            med = {k: statistics.median(v) for k, v in runs.items()}
            row = {
                "model": model,
                "workers": args.workers,
                "batch_per_worker": args.batch_size,
                "threads_per_worker": args.threads,
                "num_servers": args.num_servers,
                "steps": cfg.steps,
                "warmup_steps": warmup,
                "samples_per_sec": runs,
                "median": med,
                "ps_over_ddp": med["ps"] / med["ddp"],
                "ps_over_plain": med["ps"] / med["plain"],
                "ddp_over_plain": med["ddp"] / med["plain"],
                "ps_over_ddp_per_repeat": [p / d for p, d in zip(runs["ps"], runs["ddp"])],
                "eval_accuracy": acc,
                "ps_settings": {
                    k: {
                        "ranks_per_process": c.cluster.ranks_per_process,
                        "num_servers": c.cluster.num_servers,
                        "preaggregated": c.preaggregates,
                        "over_ddp": med[k] / med["ddp"],
                        "over_ddp_per_repeat": [p / d for p, d in zip(runs[k], runs["ddp"])],
                        "params_sha256": sorted(hashes[k]),
                    }
                    for k, c in ps_cfgs.items()
                },
            }
            results.append(row)
            print(
                f"{model}: ps/ddp {row['ps_over_ddp']:.3f}, ps/plain {row['ps_over_plain']:.3f}, "
                f"ddp/plain {row['ddp_over_plain']:.3f} "
                f"(medians: plain {med['plain']:.1f}, ddp {med['ddp']:.1f}, ps {med['ps']:.1f} "
                "samples/s)",
                flush=True,
            )
            for k, v in row["ps_settings"].items():
                print(
                    f"  {k}: ranks/process {v['ranks_per_process']}, {v['num_servers']} servers: "
                    f"{v['over_ddp']:.3f} x DDP",
                    flush=True,
                )
    finally:
        ray.shutdown()
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as fh:
        json.dump(
            {
                "machine": (
                    f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}"
                ),
                "args": vars(args),
                "results": results,
            },
            fh,
            indent=2,
        )
    print(f"wrote {args.output}")
    plot(results, args.output[: -len(".json")] + ".png")


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 3.8), squeeze=False)
    for ax, row in zip(axes[0], results):
        names = list(row["median"])  # plain, ddp, then the raytrain-ft settings
        # results written before --ps: one setting, a process per rank
        settings = row.get("ps_settings") or {
            "ps": {"ranks_per_process": 1, "num_servers": row["num_servers"]}
        }
        labels = ["plain PyTorch\n(1 process)", "Ray Train\nDDP (gloo)"] + [
            f"raytrain-ft sync\n{v['num_servers']} srv, {v['ranks_per_process']} rank/proc"
            for v in settings.values()
        ]
        colors = ["grey", "tab:orange"] + ["tab:blue"] * (len(names) - 2)
        ax.bar(labels, [row["median"][n] for n in names], color=colors)
        ax.tick_params(axis="x", labelsize=7)
        for i, n in enumerate(names):
            ax.scatter(
                [i] * len(row["samples_per_sec"][n]),
                row["samples_per_sec"][n],
                color="black",
                s=10,
                zorder=3,
            )
        ax.set_ylabel("samples/s (steady)")
        ax.set_title(f"{row['model']}, {row['workers']} workers x batch {row['batch_per_worker']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
