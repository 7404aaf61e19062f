"""End-to-end throughput with arrays sent inside the call in parts (the default up to 512 KiB) vs
another limit, alternated, each run in a fresh process with its own Ray (the limit is read when the
package is imported, in every process: ``RAYTRAIN_FT_PARTS_MAX_BYTES``).

    python experiments/transport/parts_limit.py --setting main --limits 524288,0 --repeats 3
    python experiments/transport/parts_limit.py --setting cnn32 --limits 524288,1048576 --repeats 3

``main``: the main job (digits CNN, 2 workers x 2 shards: 302 KB pushes, replies and commands);
``cnn32``: 1 worker x 1 shard of the 32x32x3 CNN (605 KB, the throughput_vs_pytorch setting).
Limit 0 sends every array above 96 KiB through the object store.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ONE_RUN = r"""
import json, os, sys
sys.path.insert(0, os.path.join({root!r}, "experiments", "throughput_vs_pytorch"))
import ray
from run import make_config
import raytrain_ft.actors as A
from raytrain_ft.config import ClusterConfig, DataConfig, ModelConfig, TrainConfig
from raytrain_ft.trainer import Trainer

ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
if {setting!r} == "main":
    cfg = TrainConfig(model=ModelConfig(name="cnn"), data=DataConfig(dataset="digits"),
                      cluster=ClusterConfig(num_workers=2, num_servers=2), steps={steps}, seed=0)
else:
    cfg = make_config("cnn", 32, {steps}, 2, 1, True)
r = Trainer(cfg).fit()
print(json.dumps({{"limit": A.PARTS_MAX_BYTES, "samples_per_s": r.steady_samples_per_sec,
                  "params_sha256": r.params_sha256, "cpu_per_step": r.to_dict()["cpu_per_step"]}}))
ray.shutdown()
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--setting", choices=["main", "cnn32"], default="main")
    ap.add_argument("--limits", default="524288,0", help="bytes, comma-separated; first: baseline")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
    code = ONE_RUN.format(root=root, setting=args.setting, steps=args.steps)
    limits = [int(x) for x in args.limits.split(",")]
    runs: dict[int, list] = {lim: [] for lim in limits}
    for _ in range(args.repeats):
        for lim in limits:
            env = dict(os.environ, RAYTRAIN_FT_PARTS_MAX_BYTES=str(lim))
            env.setdefault("RAY_AUTH_MODE", "disabled")
            out = subprocess.run(
                [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
            ).stdout
            row = json.loads(out.strip().splitlines()[-1])
            assert row["limit"] == lim, row
            runs[lim].append(row)
            print(f"limit {lim:>8}: {row['samples_per_s']:.0f} samples/s", flush=True)
    med = {lim: statistics.median(r["samples_per_s"] for r in rows) for lim, rows in runs.items()}
    hashes = {r["params_sha256"] for rows in runs.values() for r in rows}
    base = limits[0]
    for lim in limits[1:]:
        print(f"limit {lim} / {base}: {med[lim] / med[base]:.3f} (medians)")
    print(f"params_sha256 equal in every run: {len(hashes) == 1}")
    if args.output:
        with open(args.output, "w") as fh:
            json.dump(
                {"setting": args.setting, "steps": args.steps, "runs": runs, "medians": med},
                fh,
                indent=2,
            )
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
