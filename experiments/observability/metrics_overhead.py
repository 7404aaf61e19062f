"""What recording the run's Prometheus metrics costs: the same run with ``cluster.metrics`` on and
off, side by side.

One local Ray with its metrics agent exporting on a private port; runs alternate
on/off; each repeat's ratio (on / off) of steady samples/s, then the median. At
the end the endpoint is scraped to confirm the "on" runs' metrics arrived. Also
timed: one recording call in a Ray worker process (microseconds), and what a
worker's step records (2 counters, 1 gauge, one latency per shard).

    python experiments/observability/metrics_overhead.py --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
import urllib.request

from raytrain_ft.actors.metrics import prometheus_name
from raytrain_ft.config import ClusterConfig, DataConfig, ModelConfig, TrainConfig
from raytrain_ft.trainer import Trainer


def _time_calls_impl(n: int = 20000) -> dict[str, float]:
    from raytrain_ft.actors.metrics import WORKER_METRICS, Recorder

    rec = Recorder("bench", WORKER_METRICS)
    assert rec.enabled
    out = {}
    for name, call in (
        ("inc", lambda: rec.inc("steps")),
        ("set", lambda: rec.set("samples_per_second", 1.0)),
        ("observe", lambda: rec.observe("exchange_latency_seconds", 0.003, {"op": "push_pull"})),
    ):
        t0 = time.perf_counter()
        for _ in range(n):
            call()
        out[name] = (time.perf_counter() - t0) / n * 1e6
    return out


def make_config(metrics: bool, workers: int, steps: int) -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(name="cnn"),
        data=DataConfig(dataset="digits", batch_size=32),
        cluster=ClusterConfig(num_workers=workers, num_servers=2, use_gpu="false", metrics=metrics),
        steps=steps,
        seed=0,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--hardware", default="x86-2core")
    args = ap.parse_args()
    import ray

    global _time_calls
    _time_calls = ray.remote(_time_calls_impl)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(
        num_cpus=max(os.cpu_count() or 1, args.workers),
        include_dashboard=True,
        _metrics_export_port=port,
        logging_level="WARNING",
        _system_config={"metrics_report_interval_ms": 1000},
    )
    runs = []
    try:
        for repeat in range(args.repeats):
            for metrics in (True, False) if repeat % 2 == 0 else (False, True):
                r = Trainer(make_config(metrics, args.workers, args.steps)).fit()
                runs.append(
                    {
                        "metrics": metrics,
                        "repeat": repeat,
                        "steady_samples_per_sec": r.steady_samples_per_sec,
                        "run_id": r.run_id,
                        "params_sha256": r.params_sha256,
                    }
                )
                print(
                    f"metrics={'on ' if metrics else 'off'} repeat={repeat} "
                    f"{r.steady_samples_per_sec:,.0f} samples/s",
                    flush=True,
                )
        per_call_us = ray.get(_time_calls.remote())
        time.sleep(3)  # one more export interval, so the last run's values are on the endpoint
        text = (
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        )
    finally:
        ray.shutdown()
    on_ids = {r["run_id"] for r in runs if r["metrics"]}
    off_ids = {r["run_id"] for r in runs if not r["metrics"]}
    steps_lines = [line for line in text.splitlines() if line.startswith(prometheus_name("steps"))]
    exported = {rid for rid in on_ids if any(f'run_id="{rid}"' in line for line in steps_lines)}
    leaked = {rid for rid in off_ids if any(f'run_id="{rid}"' in line for line in steps_lines)}
    on = [r for r in runs if r["metrics"]]
    off = [r for r in runs if not r["metrics"]]
    ratios = [
        a["steady_samples_per_sec"] / b["steady_samples_per_sec"]
        for a, b in zip(
            sorted(on, key=lambda r: r["repeat"]), sorted(off, key=lambda r: r["repeat"])
        )
    ]
    summary = {
        "steady_samples_per_sec_on": statistics.median(r["steady_samples_per_sec"] for r in on),
        "steady_samples_per_sec_off": statistics.median(r["steady_samples_per_sec"] for r in off),
        "ratio_on_vs_off_per_repeat": ratios,
        "ratio_on_vs_off_median": statistics.median(ratios),
        "same_params_on_and_off": len({r["params_sha256"] for r in runs}) == 1,
        "per_call_us": per_call_us,
        "per_worker_step_us_2_shards": 2 * per_call_us["inc"]
        + per_call_us["set"]
        + 2 * per_call_us["observe"],
        "runs_with_metrics_on_the_endpoint": f"{len(exported)}/{len(on_ids)}",
        "runs_without_metrics_on_the_endpoint": f"{len(leaked)}/{len(off_ids)}",
    }
    print(json.dumps(summary, indent=2))
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(
        here, f"results_metrics_overhead_{args.hardware}_{time.strftime('%Y%m')}.json"
    )
    with open(path, "w") as fh:
        json.dump({"args": vars(args), "runs": runs, "summary": summary}, fh, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
