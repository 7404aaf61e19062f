"""Sync PS throughput with ``overlap_comm`` on vs off, side by side (alternating runs, medians).

python experiments/overlap_comm/run.py --model cnn --num-servers 2 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "throughput_vs_pytorch"))

from run import make_config  # noqa: E402

from raytrain_ft.trainer import Trainer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--num-servers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--output", default=None)
    args = ap.parse_args()

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(
        num_cpus=max(args.threads, os.cpu_count() or 1),
        include_dashboard=False,
        logging_level="WARNING",
    )
    runs: dict[str, list[float]] = {"on": [], "off": []}
    try:
        for _ in range(args.repeats):
            for key in ("on", "off"):
                cfg = make_config(
                    args.model,
                    args.batch_size,
                    args.steps,
                    args.threads,
                    args.num_servers,
                    key == "on",
                )
                runs[key].append(Trainer(cfg).fit().steady_samples_per_sec)
    finally:
        ray.shutdown()
    row = {
        **vars(args),
        "samples_per_sec": runs,
        "median_on": statistics.median(runs["on"]),
        "median_off": statistics.median(runs["off"]),
    }
    row["ratio_on_off"] = row["median_on"] / row["median_off"]
    print(
        f"{args.model} servers={args.num_servers} threads={args.threads}: overlap on "
        f"{row['median_on']:.1f}, off {row['median_off']:.1f} samples/s, ratio "
        f"{row['ratio_on_off']:.3f}"
    )
    out = args.output or os.path.join(
        os.path.dirname(__file__),
        f"results_{args.model}_s{args.num_servers}_t{args.threads}_x86-2core_202611.json",
    )
    with open(out, "w") as fh:
        json.dump(row, fh, indent=2)


if __name__ == "__main__":
    main()
