"""Samples/s of 1 worker + 1 parameter server vs a plain single-process PyTorch loop.

Same model, same batch size, same torch thread count, same synthetic data and
optimizer (SGD + momentum); warm-up steps excluded on both sides; runs
alternate (plain, PS, plain, PS, ...) so drift on a noisy machine hits both;
medians of the repeats and their ratio are reported.

    python experiments/throughput_vs_pytorch/run.py --models cnn resnet18 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
from torch.utils.data import TensorDataset

from raytrain_ft.config import ClusterConfig, DataConfig, ModelConfig, OptimConfig, TrainConfig
from raytrain_ft.data import BatchStream, load_dataset
from raytrain_ft.trainer import Trainer, initial_model


def make_config(
    model: str,
    batch_size: int,
    steps: int,
    threads: int,
    num_servers: int = 1,
    overlap_comm: bool = True,
) -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(name=model),
        data=DataConfig(
            dataset="synthetic",
            image_size=32,
            synthetic_channels=3,
            synthetic_samples=4096,
            batch_size=batch_size,
        ),
        optim=OptimConfig(name="sgd", lr=0.01, momentum=0.9),
        cluster=ClusterConfig(
            num_workers=1,
            num_servers=num_servers,
            cpus_per_worker=threads,
            use_gpu="false",
            overlap_comm=overlap_comm,
        ),
        steps=steps,
        seed=0,
    )


def plain_pytorch(cfg: TrainConfig, warmup: int) -> float:
    """The loop a user would write without a parameter server; returns steady samples/s."""
    torch.set_num_threads(cfg.cluster.cpus_per_worker)
    data = load_dataset(cfg.data, cfg.seed)
    model = initial_model(cfg, data)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum)
    stream = BatchStream(
        TensorDataset(data.train_x, data.train_y),
        seed=cfg.seed,
        rank=0,
        num_workers=1,
        batch_size=cfg.data.batch_size,
        start_step=0,
        end_step=cfg.steps,
        prefetch=cfg.data.prefetch_batches,
    )
    t_warm = None
    for step in range(cfg.steps):
        x, y = stream.next()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if step == warmup:
            t_warm = time.time()
    stream.close()
    return (cfg.steps - 1 - warmup) * cfg.data.batch_size / (time.time() - t_warm)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--models", nargs="+", default=["cnn", "resnet18"])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument(
        "--steps",
        type=int,
        nargs="+",
        default=None,
        help="steps per run, one per model (default cnn 300, resnet18 30)",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--num-servers", type=int, default=1)
    ap.add_argument("--overlap-comm", choices=["true", "false"], default="true")
    ap.add_argument(
        "--output", default="experiments/throughput_vs_pytorch/results_x86-2core_202611.json"
    )
    args = ap.parse_args()
    defaults = {"cnn": 300, "mlp": 300, "resnet18": 30, "resnet50": 12}
    steps = args.steps or [defaults[m] for m in args.models]

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(
        num_cpus=max(args.threads, os.cpu_count() or 1),
        include_dashboard=False,
        logging_level="WARNING",
    )
    results = []
    try:
        for model, n in zip(args.models, steps):
            cfg = make_config(
                model,
                args.batch_size,
                n,
                args.threads,
                args.num_servers,
                args.overlap_comm == "true",
            )
            warmup = min(5, n // 4)
            plain, ps = [], []
            for r in range(args.repeats):
                plain.append(plain_pytorch(cfg, warmup))
                res = Trainer(cfg).fit()
                assert res.warmup_steps_excluded == warmup
                ps.append(res.steady_samples_per_sec)
                print(
                    f"{model} repeat {r}: plain {plain[-1]:.1f} samples/s, ps {ps[-1]:.1f} "
                    "samples/s",
                    flush=True,
                )
            row = {
                "model": model,
                "num_servers": args.num_servers,
                "overlap_comm": args.overlap_comm,
                "batch_size": args.batch_size,
                "steps": n,
                "warmup_steps": warmup,
                "threads": args.threads,
                "plain_samples_per_sec": plain,
                "ps_samples_per_sec": ps,
                "plain_median": statistics.median(plain),
                "ps_median": statistics.median(ps),
                "ratio": statistics.median(ps) / statistics.median(plain),
            }
            results.append(row)
            print(
                f"{model}: ratio ps/plain = {row['ratio']:.3f} (median {row['ps_median']:.1f} vs "
                f"{row['plain_median']:.1f} samples/s)",
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
                "results": results,
            },
            fh,
            indent=2,
        )
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
