"""bf16 (and fp16) against fp32: eval accuracy and throughput of the main job (CNN on digits 16x16,
2 workers x 2 shards, 5 epochs), runs alternating, medians over repeats. Workers compute forward and
backward under autocast (fp16 with loss scaling); the shards keep float32 parameters and optimizer
state.

    python experiments/precision/run.py --repeats 3
    python experiments/precision/run.py --repeats 3 --precisions fp32,bf16,fp16 \
        --output experiments/precision/results_fp16_x86-2core_202611.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

from raytrain_ft.config import ClusterConfig, DataConfig, ModelConfig, TrainConfig
from raytrain_ft.trainer import Trainer


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument(
        "--precisions", default="fp32,bf16", help="comma-separated, fp32 first (the baseline)"
    )
    ap.add_argument(
        "--output", default=os.path.join(os.path.dirname(__file__), "results_x86-2core_202611.json")
    )
    args = ap.parse_args()
    precisions = args.precisions.split(",")
    if precisions[0] != "fp32":
        ap.error("--precisions must start with fp32 (the baseline of the ratios)")
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    runs = []
    try:
        for repeat in range(args.repeats):
            for precision in precisions:
                cfg = TrainConfig(
                    model=ModelConfig(name="cnn", precision=precision),
                    data=DataConfig(dataset="digits", batch_size=32),
                    cluster=ClusterConfig(num_workers=2, num_servers=2),
                    epochs=args.epochs,
                    seed=repeat,
                )
                r = Trainer(cfg).fit()
                row = {
                    "precision": precision,
                    "repeat": repeat,
                    "eval_accuracy": r.eval_accuracy,
                    "eval_loss": r.eval_loss,
                    "steady_samples_per_sec": r.steady_samples_per_sec,
                }
                runs.append(row)
                print(json.dumps(row), flush=True)
    finally:
        ray.shutdown()
    summary = {}
    for p in precisions:
        rs = [r for r in runs if r["precision"] == p]
        summary[p] = {
            k: statistics.median(r[k] for r in rs)
            for k in ("eval_accuracy", "eval_loss", "steady_samples_per_sec")
        }
    base = {r["repeat"]: r for r in runs if r["precision"] == "fp32"}
    for p in precisions[1:]:
        ratios = [
            r["steady_samples_per_sec"] / base[r["repeat"]]["steady_samples_per_sec"]
            for r in runs
            if r["precision"] == p
        ]
        summary[f"{p}_over_fp32_throughput_median"] = statistics.median(ratios)
        summary[f"accuracy_points_{p}_minus_fp32"] = 100 * (
            summary[p]["eval_accuracy"] - summary["fp32"]["eval_accuracy"]
        )
    with open(args.output, "w") as fh:
        json.dump({"runs": runs, "summary": summary}, fh, indent=1)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
