"""Recovery from a killed parameter server: peer replica vs checkpoint restart, side by side; and
the throughput cost of replication (replica vs recovery=none, no kills).

For each model and repeat (runs alternate between methods):
  replica     -- kill server:0 at --kill-step; rebuilt from its peer's snapshot + command log
  checkpoint  -- same kill; baseline restarts from the last checkpoint (every --checkpoint-interval
  steps) none / replica without kills -- steady samples/s, for the replication overhead ratio

Reported per method (medians over repeats):
  kill_to_serving_s  -- kill until the lost shard answers again (replica: rebuilt server published;
                        checkpoint: the last restarted worker is back, since the run rolled back)
  first_step_s       -- kill until the next global step completes (every rank finished it)
  regained_s         -- kill until the run is past the step it had reached when killed
  steps_lost         -- steps that had to be recomputed

    python experiments/recovery/run.py --models cnn,resnet18 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from raytrain_ft.config import (
    ChaosConfig,
    ClusterConfig,
    DataConfig,
    ModelConfig,
    OptimConfig,
    RecoveryConfig,
    TrainConfig,
)
from raytrain_ft.trainer import Trainer

SETTINGS = {
    # model: (image size, channels, batch, steps with a kill, kill step, steps for throughput)
    "cnn": (16, 1, 32, 160, 80, 400),
    "resnet18": (32, 3, 16, 40, 20, 40),
}


def make_config(
    model: str,
    recovery: str,
    steps: int,
    kill: str | None,
    checkpoint_interval: int,
    checkpoint_dir: str | None,
) -> TrainConfig:
    size, channels, batch, *_ = SETTINGS[model]
    return TrainConfig(
        model=ModelConfig(name=model),
        data=DataConfig.images(
            "synthetic" if channels == 3 else "digits", size, channels, 2048, batch_size=batch
        ),
        optim=OptimConfig(name="sgd", lr=0.01, momentum=0.9),
        cluster=ClusterConfig(num_workers=2, num_servers=2, use_gpu="false"),
        recovery=RecoveryConfig(
            mode=recovery,
            # files only where a directory takes them (the replica runs write none)
            checkpoint_interval=checkpoint_interval
            if recovery == "checkpoint" or checkpoint_dir
            else 20,
            checkpoint_dir=checkpoint_dir,
        ),
        chaos=ChaosConfig(kill=kill),
        steps=steps,
        seed=0,
    )


def global_step_times(result) -> dict[int, float]:
    """Step -> time every rank had finished it (a restarted rank's redo overwrites the lost
    attempt)."""
    per_rank = [dict(times) for times in result.step_times]
    steps = set.intersection(*(set(d) for d in per_rank)) if per_rank else set()
    return {s: max(d[s] for d in per_rank) for s in sorted(steps)}


def measure_kill(result) -> dict:
    (kill,) = result.kills
    server = [e for e in result.recoveries if e["role"] == "server"]
    (event,) = server
    if event["source"] == "checkpoint":
        serving_at = max(e["serving_at"] for e in result.recoveries if e["role"] == "worker")
    else:
        serving_at = event["serving_at"]
    g = global_step_times(result)
    after = [t for t in g.values() if t > kill["at"]]
    # first step not completed by every rank at the kill; the driver's view (kill["step"]) may lag
    # by a poll, and a checkpoint restart overwrites the history it rolled back over, so take the
    # larger of the two
    before = [s for s, t in g.items() if t <= kill["at"]]
    reached = max(kill["step"], max(before) + 1 if before else 0)
    return {
        "kill_to_serving_s": serving_at - kill["at"],
        "detect_to_serving_s": event["duration_s"],
        "first_step_s": min(after) - kill["at"] if after else None,
        "regained_s": g[reached] - kill["at"] if reached in g else None,
        "steps_lost": event.get("steps_lost", 0),
        "replayed": event["replayed"],
        "bytes_moved": event["bytes_moved"],
        "sha256": result.params_sha256,
        "acked_eq_applied": result.updates_acknowledged == result.updates_applied,
    }


def median(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--models", default="cnn,resnet18")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--checkpoint-interval", type=int, default=20)
    ap.add_argument(
        "--output", default=os.path.join(os.path.dirname(__file__), "results_x86-2core_202611.json")
    )
    args = ap.parse_args()

    import tempfile

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, logging_level="WARNING")
    out: dict = {"args": vars(args), "models": {}}
    try:
        for model in args.models.split(","):
            _, _, _, steps, kill_step, tput_steps = SETTINGS[model]
            kill = f"server:0@step={kill_step}"
            runs: dict[str, list] = {
                "replica": [],
                "checkpoint": [],
                "tput_replica": [],
                "tput_none": [],
            }
            for rep in range(args.repeats):
                for method in ("replica", "checkpoint"):
                    ckpt = tempfile.mkdtemp(prefix="rtft-ckpt-") if method == "checkpoint" else None
                    result = Trainer(
                        make_config(model, method, steps, kill, args.checkpoint_interval, ckpt)
                    ).fit()
                    row = measure_kill(result)
                    runs[method].append(row)
                    print(
                        f"{model} rep {rep} {method}: "
                        + ", ".join(
                            f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                            for k, v in row.items()
                            if k != "sha256"
                        ),
                        flush=True,
                    )
                for method in ("replica", "none"):
                    result = Trainer(
                        make_config(model, method, tput_steps, None, args.checkpoint_interval, None)
                    ).fit()
                    runs[f"tput_{method}"].append(result.steady_samples_per_sec)
                    print(
                        f"{model} rep {rep} throughput {method}: "
                        f"{result.steady_samples_per_sec:.1f} samples/s",
                        flush=True,
                    )
            summary = {}
            for method in ("replica", "checkpoint"):
                summary[method] = {
                    k: median(runs[method], k)
                    for k in (
                        "kill_to_serving_s",
                        "detect_to_serving_s",
                        "first_step_s",
                        "regained_s",
                        "steps_lost",
                    )
                }
            summary["speedup_kill_to_serving"] = (
                summary["checkpoint"]["kill_to_serving_s"] / summary["replica"]["kill_to_serving_s"]
            )
            summary["speedup_regained"] = (
                summary["checkpoint"]["regained_s"] / summary["replica"]["regained_s"]
            )
            summary["throughput_replica_over_none"] = statistics.median(
                runs["tput_replica"]
            ) / statistics.median(runs["tput_none"])
            summary["same_hash_all_kill_runs"] = (
                len({r["sha256"] for r in runs["replica"] + runs["checkpoint"]}) == 1
            )
            out["models"][model] = {"summary": summary, "runs": runs}
            print(json.dumps({model: summary}, indent=2), flush=True)
    finally:
        ray.shutdown()
    out["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    with open(args.output, "w") as fh:
        json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
