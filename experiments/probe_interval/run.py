"""Throughput and supervisor CPU of 1 worker + 1 shard (replicated, a spare) with the supervisor's
probes every 0.2 s (the default) and every 1.0 s, side by side.

The supervisor probes every server, spare and worker process each ``health_check_interval_s``;
this measures what that costs a short-step run on this machine: the runs alternate (default, slow,
default, ...) so drift hits both, and each run's ``cpu_per_step`` says where the CPU went.

    python experiments/probe_interval/run.py --repeats 3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "throughput_vs_pytorch"))

from run import make_config  # noqa: E402  (the throughput experiment's config)

from raytrain_ft.trainer import Trainer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--intervals", default="0.2,1.0", help="probe intervals (s), comma-separated")
    ap.add_argument(
        "--output", default="experiments/probe_interval/results_cnn_x86-2core_202611.json"
    )
    args = ap.parse_args()
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    base = make_config("cnn", 32, args.steps, 2)
    intervals = [float(x) for x in args.intervals.split(",")]
    runs: dict[float, list] = {i: [] for i in intervals}
    try:
        for r in range(args.repeats):
            for interval in intervals:
                cfg = dataclasses.replace(
                    base,
                    recovery=dataclasses.replace(base.recovery, health_check_interval_s=interval),
                )
                res = Trainer(cfg).fit()
                runs[interval].append(
                    {
                        "samples_per_sec": res.steady_samples_per_sec,
                        "cpu_per_step": res.cpu_per_step,
                    }
                )
                print(
                    f"repeat {r} probe every {interval} s: {res.steady_samples_per_sec:.1f} "
                    f"samples/s, cpu per step {res.cpu_per_step}",
                    flush=True,
                )
    finally:
        ray.shutdown()
    rows = []
    for interval, rs in runs.items():
        rows.append(
            {
                "health_check_interval_s": interval,
                "samples_per_sec": [r["samples_per_sec"] for r in rs],
                "median_samples_per_sec": statistics.median(r["samples_per_sec"] for r in rs),
                "supervisor_cpu_ms_per_step": [
                    round(1000 * r["cpu_per_step"]["supervisor_s"], 2) for r in rs
                ],
                "server_cpu_ms_per_step": [
                    round(1000 * r["cpu_per_step"]["server_s"], 2) for r in rs
                ],
                "runs": rs,
            }
        )
    base_median = rows[0]["median_samples_per_sec"]
    for row in rows:
        row["ratio_to_first"] = row["median_samples_per_sec"] / base_median
        print(
            f"probe every {row['health_check_interval_s']} s: median "
            f"{row['median_samples_per_sec']:.1f} samples/s ({row['ratio_to_first']:.3f}x), "
            f"supervisor ms/step {row['supervisor_cpu_ms_per_step']}",
            flush=True,
        )
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as fh:
        json.dump(
            {
                "machine": f"{platform.machine()} {os.cpu_count()} cores",
                "steps": args.steps,
                "results": rows,
            },
            fh,
            indent=2,
        )
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
