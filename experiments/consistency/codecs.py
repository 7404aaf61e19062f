"""Push codecs: bytes on the wire and eval accuracy vs uncompressed, sync mode, 4 workers, digits
CNN.

Each codec runs with error feedback (the worker keeps the residual). Two server
momentum settings show where sign compression holds and where it breaks.

    python experiments/consistency/codecs.py --epochs 10 --momentum 0.5,0.9
"""

from __future__ import annotations

import argparse
import json
import os
import time

from raytrain_ft.config import (
    ClusterConfig,
    ConsistencyConfig,
    DataConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
)
from raytrain_ft.trainer import Trainer

CODECS = ("none", "fp16", "topk:0.1", "topk:0.01", "onebit")


def make_config(codec: str, momentum: float, epochs: int) -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(name="cnn"),
        data=DataConfig(dataset="digits", batch_size=32),
        optim=OptimConfig(name="sgd", lr=0.1 if momentum <= 0.5 else 0.05, momentum=momentum),
        cluster=ClusterConfig(num_workers=4, num_servers=2, use_gpu="false"),
        consistency=ConsistencyConfig(codec=codec),
        epochs=epochs,
        seed=0,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--momentum", default="0.5,0.9")
    ap.add_argument("--hardware", default="x86-2core")
    args = ap.parse_args()
    import ray

    ray.init(num_cpus=max(os.cpu_count() or 1, 4), include_dashboard=False, logging_level="WARNING")
    rows = []
    try:
        for momentum in [float(m) for m in args.momentum.split(",")]:
            base = None
            for codec in CODECS:
                r = Trainer(make_config(codec, momentum, args.epochs)).fit()
                base = base or r
                row = {
                    "codec": codec,
                    "momentum": momentum,
                    "lr": make_config(codec, momentum, 1).optim.lr,
                    "eval_accuracy": r.eval_accuracy,
                    "accuracy_vs_none": r.eval_accuracy - base.eval_accuracy,
                    "bytes_pushed": r.bytes_pushed,
                    "bytes_ratio": r.bytes_pushed / base.bytes_pushed,
                    "samples_per_sec": r.samples_per_sec,
                }
                rows.append(row)
                print(
                    f"momentum={momentum} {codec:10s} acc={r.eval_accuracy:.4f} "
                    f"({row['accuracy_vs_none']:+.4f}) "
                    f"bytes={r.bytes_pushed:,} ({row['bytes_ratio']:.4f}x)",
                    flush=True,
                )
    finally:
        ray.shutdown()
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(here, f"results_codecs_{args.hardware}_{time.strftime('%Y%m')}.json")
    with open(path, "w") as fh:
        json.dump(
            {
                "machine": args.hardware,
                "epochs": args.epochs,
                "created": time.strftime("%Y-%m-%d %H:%M"),
                "rows": rows,
            },
            fh,
            indent=1,
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
