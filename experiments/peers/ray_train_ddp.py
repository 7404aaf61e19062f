"""Ray Train's way to train the same model: ``TorchTrainer`` + DDP over gloo, checkpoints,
``FailureConfig``.

Used side by side with this project by ``experiments/peers/run.py`` (throughput) and
``experiments/recovery/study.py`` (restart after a killed worker). The loop is the one Ray
Train's guide gives: ``prepare_model`` (DDP), each rank reads its own partition (the same
``BatchStream`` partition this project's worker of that rank reads), SGD + momentum, and,
with ``checkpoint_every``, a checkpoint of model + optimizer + step through
``ray.train.report`` from rank 0; after a failure ``ray.train.get_checkpoint()`` resumes it.

A kill (``kill_rank`` at ``kill_step``) is a real SIGKILL of that rank's process, once per
run (a marker file remembers it fired); its wall-clock time is written first.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time


def train_loop(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch
    from torch.utils.data import TensorDataset

    from raytrain_ft.config import from_dict
    from raytrain_ft.data import BatchStream, load_dataset
    from raytrain_ft.trainer import evaluate, initial_model

    cfg = from_dict(loop_config["config"])
    torch.set_num_threads(cfg.cluster.cpus_per_worker)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    data = load_dataset(cfg.data, cfg.seed)
    model = ray.train.torch.prepare_model(initial_model(cfg, data))
    opt = torch.optim.SGD(
        model.parameters(),
        lr=cfg.optim.lr,
        momentum=cfg.optim.momentum,
        weight_decay=cfg.optim.weight_decay,
    )
    start = 0
    checkpoint = ray.train.get_checkpoint()
    restored_at = time.time()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, "state.pt"), weights_only=True)
        model.module.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        start = state["step"]
    stream = BatchStream(
        TensorDataset(data.train_x, data.train_y),
        seed=cfg.seed,
        rank=rank,
        num_workers=world,
        batch_size=cfg.data.batch_size,
        start_step=start,
        end_step=cfg.steps,
        prefetch=cfg.data.prefetch_batches,
    )
    every, times = loop_config.get("checkpoint_every") or 0, []
    kill_rank, kill_step, marker = (
        loop_config.get("kill_rank"),
        loop_config.get("kill_step"),
        loop_config.get("kill_marker"),
    )
    timeline = (
        open(loop_config["timeline"], "a") if rank == 0 and loop_config.get("timeline") else None
    )  # every attempt's steps
    eval_every, evals, eval_s = loop_config.get("eval_every") or 0, [], 0.0
    model.train()
    began = time.time()
    for step in range(start, cfg.steps):
        if rank == kill_rank and step == kill_step and marker and not os.path.exists(marker):
            with open(marker, "w") as fh:
                json.dump({"killed_at": time.time(), "step": step}, fh)
            os.kill(os.getpid(), signal.SIGKILL)
        x, y = stream.next()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        times.append((step, time.time()))
        if eval_every and rank == 0 and (step + 1) % eval_every == 0:
            # time to accuracy: rank 0 evaluates; its clock leaves the evaluation out
            t_eval = time.time()
            acc, loss = evaluate(model.module, data.eval_x, data.eval_y)
            model.train()
            evals.append((step + 1, t_eval - began - eval_s, acc, loss))
            eval_s += time.time() - t_eval
        if timeline:
            timeline.write(f"{step} {times[-1][1]}\n")
            timeline.flush()
        if every and (step + 1) % every == 0 and step + 1 < cfg.steps:
            if rank == 0:
                with tempfile.TemporaryDirectory() as d:
                    torch.save(
                        {
                            "model": model.module.state_dict(),
                            "optim": opt.state_dict(),
                            "step": step + 1,
                        },
                        os.path.join(d, "state.pt"),
                    )
                    ray.train.report(
                        {"step": step + 1}, checkpoint=ray.train.Checkpoint.from_directory(d)
                    )
            else:
                ray.train.report({"step": step + 1})
    stream.close()
    if timeline:
        timeline.close()
    # evaluation on the held-out split, as the project's trainer does at the end
    acc, _ = evaluate(model.module, data.eval_x, data.eval_y)
    if (
        rank == 0
    ):  # Ray Train keeps metrics only with checkpoints: the driver reads rank 0's summary file
        with open(loop_config["summary"], "w") as fh:
            json.dump(
                {
                    "step": cfg.steps,
                    "times": times,
                    "start": start,
                    "restored_at": restored_at if checkpoint else None,
                    "eval_accuracy": acc,
                    "evals": evals,
                },
                fh,
            )


def fit(
    config,
    storage_path: str,
    checkpoint_every: int = 0,
    max_failures: int = 0,
    kill_rank: int | None = None,
    kill_step: int | None = None,
    eval_every: int = 0,
) -> dict:
    """Run ``config`` (a ``TrainConfig``: model, data, optimizer, steps, workers, threads) under Ray
    Train. Returns rank 0's step end times of the last attempt (``times``) and of every attempt
    (``timeline``), where the last attempt started, the kill record, the evaluation accuracy and the
    wall time."""
    import sys

    from ray import cloudpickle
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cloudpickle.register_pickle_by_value(
        sys.modules[__name__]
    )  # Ray Train's workers need not find this script's module

    os.makedirs(storage_path, exist_ok=True)
    tag = time.time_ns()
    marker = os.path.join(storage_path, f"kill-{tag}.json") if kill_step is not None else None
    timeline = os.path.join(storage_path, f"timeline-{tag}.txt")
    summary = os.path.join(storage_path, f"summary-{tag}.json")
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "config": config.to_dict(),
            "checkpoint_every": checkpoint_every,
            "kill_rank": kill_rank,
            "kill_step": kill_step,
            "kill_marker": marker,
            "timeline": timeline,
            "summary": summary,
            "eval_every": eval_every,
        },
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(
            num_workers=config.cluster.num_workers,
            use_gpu=False,
            resources_per_worker={"CPU": config.cluster.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=f"ddp-{tag}",
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    t0 = time.time()
    trainer.fit()
    with open(summary) as fh:
        out = json.load(fh)
    out["wall_s"] = time.time() - t0
    out["started_at"] = t0
    with open(timeline) as fh:
        out["timeline"] = [(int(a), float(b)) for a, b in (line.split() for line in fh)]
    if marker and os.path.exists(marker):
        with open(marker) as fh:
            out["kill"] = json.load(fh)
    return out
