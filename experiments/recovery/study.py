"""Recovery study: a failure at a fixed step, recovered four ways, on one timeline.

Same model, data, global batch, 2 workers, SGD + momentum, same step count:
  replica            raytrain-ft: SIGKILL server:0; rebuilt from its peer's snapshot + command log
  replica-worker     raytrain-ft: SIGKILL worker:1; restarted, resumes at the shards' step
  checkpoint-N       raytrain-ft --recovery checkpoint, a checkpoint every N steps: SIGKILL
                     server:0, every shard rewinds to the last checkpoint, every worker restarts
  raytrain-ddp-N     Ray Train TorchTrainer + DDP (gloo), a checkpoint every N steps,
                     FailureConfig(max_failures=1): SIGKILL rank 1; Ray Train restarts the worker
                     group from the latest checkpoint

Reported per method (medians over repeats):
  first_step_s    kill -> the next step completes (the run makes progress again)
  regained_s      kill -> the run is past the step it had reached when killed
  steps_lost      steps computed twice
  wall_s          the whole run (time to the final step and its accuracy), and eval_accuracy
A timeline PNG (steps vs seconds since the kill) shows one run of each method.

    python experiments/recovery/study.py --steps 200 --kill-step 100 --intervals 10,25,50 \
        --repeats 3
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from experiments.peers import ray_train_ddp  # noqa: E402
from experiments.recovery.run import global_step_times, measure_kill  # noqa: E402
from raytrain_ft.config import (
    ChaosConfig,
    ClusterConfig,
    DataConfig,
    ModelConfig,
    OptimConfig,
    RecoveryConfig,
    TrainConfig,
)  # noqa: E402
from raytrain_ft.trainer import Trainer  # noqa: E402


def make_config(model: str, steps: int, batch: int) -> TrainConfig:
    synthetic = model.startswith("resnet")
    return TrainConfig(
        model=ModelConfig(name=model),
        data=DataConfig.images(
            "synthetic" if synthetic else "digits",
            32 if synthetic else 8,
            3,
            2048,
            batch_size=batch,
        ),
        optim=OptimConfig(name="sgd", lr=0.05, momentum=0.9, weight_decay=0.0),
        cluster=ClusterConfig(num_workers=2, num_servers=2, use_gpu="false"),
        steps=steps,
        seed=0,
        log_every_s=0.1,
    )


def ours(cfg: TrainConfig, kill: str, recovery: str, interval: int) -> dict:
    ckpt = tempfile.mkdtemp(prefix="rtft-ckpt-") if recovery == "checkpoint" else None
    cfg = dataclasses.replace(
        cfg,
        recovery=RecoveryConfig(
            mode=recovery,
            checkpoint_interval=(interval or 20) if ckpt else 20,
            checkpoint_dir=ckpt,
        ),
        chaos=ChaosConfig(kill=kill),
    )
    t0 = time.time()
    result = Trainer(cfg).fit()
    (k,) = result.kills
    if kill.startswith("server"):
        row = measure_kill(result)
    else:  # a worker restart: the same measures from the step times
        g = global_step_times(result)
        after = [t for t in g.values() if t > k["at"]]
        # the restarted rank's times start at its resume step: the first step at or past the kill
        # every rank finished
        reached = min(s for s in g if s >= k["step"])
        row = {
            "first_step_s": min(after) - k["at"],
            "regained_s": g[reached] - k["at"],
            "steps_lost": 0,
        }
    row.update(
        wall_s=time.time() - t0,
        eval_accuracy=result.eval_accuracy,
        updates_applied=result.updates_applied,
        updates_acknowledged=result.updates_acknowledged,
        kill_at=k["at"],
        timeline=[(p["t"] + result.started_at - k["at"], p["step"]) for p in result.history],
    )
    return row


def ray_train(cfg: TrainConfig, storage: str, kill_step: int, interval: int) -> dict:
    t0 = time.time()
    out = ray_train_ddp.fit(
        cfg, storage, checkpoint_every=interval, max_failures=1, kill_rank=1, kill_step=kill_step
    )
    kill_at = out["kill"]["killed_at"]
    first_after = [t for s, t in out["timeline"] if t > kill_at]
    redo = {s: t for s, t in out["timeline"] if t > kill_at}
    return {
        "first_step_s": min(first_after) - kill_at,
        "regained_s": redo[kill_step] - kill_at,
        "steps_lost": kill_step - out["start"],
        "restart_to_first_step_s": min(first_after) - out["restored_at"]
        if out.get("restored_at")
        else None,
        "wall_s": time.time() - t0,
        "eval_accuracy": out["eval_accuracy"],
        "kill_at": kill_at,
        "timeline": [(t - kill_at, s + 1) for s, t in out["timeline"]],
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--kill-step", type=int, default=100)
    ap.add_argument(
        "--intervals",
        default="10,25,50",
        help="checkpoint intervals (steps) for both checkpoint baselines",
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--output",
        default=os.path.join(
            os.path.dirname(os.path.abspath(__file__)), "results_study_x86-2core_202611.json"
        ),
    )
    args = ap.parse_args()
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, logging_level="WARNING")
    cfg = make_config(args.model, args.steps, args.batch_size)
    intervals = [int(i) for i in args.intervals.split(",")]
    storage = tempfile.mkdtemp(prefix="raytrain-ddp-")
    methods = {
        "replica": lambda: ours(cfg, f"server:0@step={args.kill_step}", "replica", 0),
        "replica-worker": lambda: ours(cfg, f"worker:1@step={args.kill_step}", "replica", 0),
    }
    for n in intervals:
        methods[f"checkpoint-{n}"] = lambda n=n: ours(
            cfg, f"server:0@step={args.kill_step}", "checkpoint", n
        )
        methods[f"raytrain-ddp-{n}"] = lambda n=n: ray_train(cfg, storage, args.kill_step, n)
    runs: dict[str, list] = {m: [] for m in methods}
    try:
        for rep in range(args.repeats):
            for name, run in methods.items():
                row = run()
                runs[name].append(row)
                print(
                    f"rep {rep} {name:16s} first step {row['first_step_s']:.3f}s  regained "
                    f"{row['regained_s']:.3f}s  lost {row['steps_lost']}  "
                    f"wall {row['wall_s']:.1f}s  acc {row['eval_accuracy']:.3f}",
                    flush=True,
                )
    finally:
        ray.shutdown()
    keys = ("first_step_s", "regained_s", "steps_lost", "wall_s", "eval_accuracy")
    summary = {
        m: {k: statistics.median(r[k] for r in rows) for k in keys} for m, rows in runs.items()
    }
    for s in summary.values():
        s["regained_vs_replica"] = s["regained_s"] / summary["replica"]["regained_s"]
    print(json.dumps(summary, indent=2))
    with open(args.output, "w") as fh:
        json.dump(
            {
                "args": vars(args),
                "summary": summary,
                "runs": runs,
                "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            },
            fh,
            indent=2,
        )
    print(f"wrote {args.output}")
    plot(runs, args, args.output[: -len(".json")] + ".png")


def plot(runs: dict, args, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, rows in runs.items():
        pts = sorted(rows[0]["timeline"])
        style = (
            "-" if name.startswith("replica") else ("--" if name.startswith("checkpoint") else ":")
        )
        ax.plot(
            [t for t, _ in pts],
            [s for _, s in pts],
            style,
            label=name,
            linewidth=1.4,
            drawstyle="steps-post",
        )
    ax.axvline(0, color="red", linewidth=1)
    ax.text(0.1, args.kill_step * 0.3, "kill", color="red")
    ax.set_xlim(-3, 16)
    ax.set_ylim(args.kill_step - 60, args.kill_step + 60)
    ax.set_xlabel("seconds since the kill")
    ax.set_ylabel("step reached")
    ax.set_title(f"{args.model}, 2 workers, kill at step {args.kill_step} (first repeat)")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
