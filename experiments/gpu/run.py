"""GPU workers on one GPU: samples/s of plain PyTorch vs raytrain-ft (one GPU worker, CPU shards),
overlap on and off, pipelined durability (the default in sync) vs strict, codecs, bf16, fp16 with
loss scaling, global gradient clipping (plain PyTorch runs the same: GradScaler,
clip_grad_norm_); and what one push costs on the worker (device-to-host copy, encoding on the host
vs on the device).

Plain PyTorch runs in this process with the same deterministic flags a GPU worker sets (and once
with PyTorch's fast defaults, cudnn.benchmark and no deterministic algorithms, for context). Runs
alternate plain, PS, plain, PS ... so drift hits both; medians of the repeats are reported.

    python experiments/gpu/run.py --output experiments/gpu/results_h100.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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
from raytrain_ft.data import load_dataset
from raytrain_ft.device import deterministic
from raytrain_ft.trainer import Trainer, initial_model


def make_config(
    model,
    batch,
    steps,
    overlap=True,
    codec="none",
    precision="fp32",
    servers=2,
    push_thread="auto",
    clip=None,
    durability="auto",
):
    return TrainConfig(
        model=ModelConfig(name=model, precision=precision),
        data=DataConfig(
            dataset="synthetic",
            image_size=32,
            synthetic_channels=3,
            synthetic_samples=max(4096, batch * 8),
            batch_size=batch,
        ),
        optim=OptimConfig(name="sgd", lr=0.01, momentum=0.9, clip_grad_norm=clip),
        cluster=ClusterConfig(
            num_workers=1,
            num_servers=servers,
            cpus_per_worker=2,
            server_threads=2,
            use_gpu="true",
            overlap_comm=overlap,
            push_thread=push_thread,
            metrics=False,
        ),
        consistency=ConsistencyConfig(codec=codec),
        recovery=RecoveryConfig(durability=durability),
        steps=steps,
        seed=0,
    )


def plain_pytorch(cfg: TrainConfig, warmup: int, fast: bool) -> float:
    """The single-GPU loop a user would write; steady samples/s (one sync at each end)."""
    torch.use_deterministic_algorithms(not fast)
    torch.backends.cudnn.benchmark = fast
    data = load_dataset(cfg.data, cfg.seed)
    x_all, y_all = data.train_x.cuda(), data.train_y.cuda()
    model = initial_model(cfg, data).cuda().train()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum)
    b, n = cfg.data.batch_size, len(y_all)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.model.precision)
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.model.precision == "fp16")
    t_warm = None
    for step in range(cfg.steps):
        if step == warmup:
            torch.cuda.synchronize()
            t_warm = time.perf_counter()
        lo = (step * b) % (n - b)
        opt.zero_grad()
        with torch.autocast("cuda", dtype=amp or torch.float32, enabled=amp is not None):
            loss = torch.nn.functional.cross_entropy(model(x_all[lo : lo + b]), y_all[lo : lo + b])
        scaler.scale(loss).backward()
        if cfg.optim.clip_grad_norm is not None:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad_norm)
        scaler.step(opt)
        scaler.update()
    torch.cuda.synchronize()
    samples_per_s = (cfg.steps - warmup) * b / (time.perf_counter() - t_warm)
    deterministic(tf32=False)
    return samples_per_s


def push_costs(numel: int, repeats: int = 10) -> dict:
    """Milliseconds to get one gradient of ``numel`` floats from the GPU into a push: the
    device-to-host copy (pageable, pinned), and each codec with error feedback encoding on the host
    (numpy, after the copy; CPU workers) vs on the device (GPU workers: only the payload and the
    residual are copied)."""
    from raytrain_ft.compression import ErrorFeedback, parse_codec

    g = torch.randn(numel, device="cuda")
    pinned = torch.empty(numel, pin_memory=True)

    def ms(fn):
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t) * 1000)
        return statistics.median(times)

    out = {
        "numel": numel,
        "d2h_pageable_ms": ms(lambda: g.cpu()),
        "d2h_pinned_ms": ms(lambda: pinned.copy_(g)),
    }
    for spec in ("fp16", "topk:0.01", "onebit"):
        host = ErrorFeedback(parse_codec(spec), numel)
        dev = ErrorFeedback(parse_codec(spec), numel, g.device)

        def on_host(host=host):
            pinned.copy_(g)
            host.encode(pinned.numpy())
            host.residual_host()

        def on_device(dev=dev):
            dev.encode(g)
            dev.residual_host()

        out[f"{spec}_host_ms"] = ms(on_host)
        out[f"{spec}_device_ms"] = ms(on_device)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--no-push-costs", action="store_true", help="skip the per-push cost table")
    ap.add_argument("--output", required=True)
    ap.add_argument(
        "--only", nargs="*", default=None, help="names of the PS variants to run (default all)"
    )
    args = ap.parse_args()
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    deterministic(tf32=False)
    ray.init(num_gpus=1, include_dashboard=False, logging_level="WARNING")
    variants = {
        "resnet18_b128_overlap": ("resnet18", 128, {}),
        "resnet18_b128_strict": ("resnet18", 128, {"durability": "strict"}),
        "resnet18_b128_s1": ("resnet18", 128, {"servers": 1}),
        "resnet18_b128_s4": ("resnet18", 128, {"servers": 4}),
        "resnet18_b128_auto": ("resnet18", 128, {"servers": "auto"}),
        "resnet18_b128_overlap_hook": ("resnet18", 128, {"push_thread": "false"}),
        "resnet18_b128_no_overlap": ("resnet18", 128, {"overlap": False}),
        "resnet18_b128_bf16": ("resnet18", 128, {"precision": "bf16"}),
        "resnet18_b128_fp16": ("resnet18", 128, {"precision": "fp16"}),
        "resnet18_b128_clip": ("resnet18", 128, {"clip": 1.0}),
        "resnet18_b128_fp16codec": ("resnet18", 128, {"codec": "fp16"}),
        "resnet18_b128_topk": ("resnet18", 128, {"codec": "topk:0.01"}),
        "resnet50_b64_overlap": ("resnet50", 64, {}),
    }
    if args.only:
        variants = {k: v for k, v in variants.items() if k in args.only}
    report = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "cpus": os.cpu_count(),
        "results": [],
    }
    try:
        if not args.no_push_costs:
            report["push_costs_resnet18"] = push_costs(11_173_962)
            print(json.dumps(report["push_costs_resnet18"]), flush=True)
        warmup = 5
        for name, (model, batch, kw) in variants.items():
            cfg = make_config(model, batch, args.steps, **kw)
            plain, fast, ps, workers = [], [], [], []
            for r in range(args.repeats):
                plain.append(plain_pytorch(cfg, warmup, fast=False))
                if r == 0:
                    fast.append(plain_pytorch(cfg, warmup, fast=True))
                res = Trainer(cfg).fit()
                ps.append(res.steady_samples_per_sec)
                workers.append(
                    {
                        k: res.workers[0].get(k)
                        for k in ("device", "device_name", "compute_s", "wait_s", "gpu_compute_s")
                    }
                    | {"params_sha256": res.params_sha256}
                    | ({"server_plan": res.server_plan} if res.server_plan else {})
                )
                print(
                    f"{name} r{r}: plain {plain[-1]:.0f} ps {ps[-1]:.0f} {workers[-1]}", flush=True
                )
            row = {
                "name": name,
                "plain_deterministic": plain,
                "plain_fast_defaults": fast,
                "ps": ps,
                "workers": workers,
                "ratio_ps_over_plain": statistics.median(ps) / statistics.median(plain),
            }
            report["results"].append(row)
            print(f"{name}: ratio {row['ratio_ps_over_plain']:.3f}", flush=True)
            with open(args.output, "w") as fh:
                json.dump(report, fh, indent=2)
    finally:
        ray.shutdown()
        with open(args.output, "w") as fh:
            json.dump(report, fh, indent=2)


if __name__ == "__main__":
    main()
