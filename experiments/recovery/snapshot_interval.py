"""Replication cost and recovery time vs ``snapshot_interval`` (with and without log folding).

A primary sends its replica holder every update's command and, every
``snapshot_interval`` updates, a full snapshot of its shard (parameters +
optimizer state) that truncates the log. Folding (``fold_log``, default on):
the holder applies each logged command once it is acknowledged, so a recovery
moves one state and replays nothing; without folding a recovery replays up to
``snapshot_interval`` commands on top of the last snapshot.

For each interval and fold setting, alternating with ``--recovery none`` inside
every repeat (CNN, digits, 2 workers x 2 shards):
  overhead    1 - steady samples/s ÷ recovery none   (no kills)
  recovery    SIGKILL server:0 at --kill-step: kill -> serving, commands replayed, bytes moved
  replica     bytes sent to holders per update

    python experiments/recovery/snapshot_interval.py --intervals 5,20,50,200 --repeats 3

``auto`` among the intervals runs ``--snapshot-interval auto`` (each primary picks its interval by
Young's rule from what it measures; the summary records what it chose). ``--folds on`` limits the
runs to folded logs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from experiments.recovery.run import measure_kill  # noqa: E402
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


def make_config(steps: int, recovery: RecoveryConfig, kill: str = "") -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(name="cnn"),
        data=DataConfig(dataset="digits", image_size=16, batch_size=32),
        optim=OptimConfig(name="sgd", lr=0.01, momentum=0.9),
        cluster=ClusterConfig(num_workers=2, num_servers=2, use_gpu="false"),
        recovery=recovery,
        chaos=ChaosConfig(kill=kill),
        steps=steps,
        seed=0,
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--intervals", default="5,20,50,200")
    ap.add_argument("--steps", type=int, default=300, help="steps of the throughput runs")
    ap.add_argument("--kill-steps", type=int, default=160, help="steps of the kill runs")
    ap.add_argument(
        "--kill-step",
        type=int,
        default=149,
        help="kill step: late in a snapshot period for the usual intervals",
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--folds", choices=("both", "on", "off"), default="both")
    ap.add_argument(
        "--output",
        default=os.path.join(
            os.path.dirname(os.path.abspath(__file__)),
            "results_snapshot_interval_x86-2core_202611.json",
        ),
    )
    args = ap.parse_args()
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, logging_level="WARNING")
    intervals = [i if i == "auto" else int(i) for i in args.intervals.split(",")]
    folds = {"both": (True, False), "on": (True,), "off": (False,)}[args.folds]
    settings = [(n, fold) for fold in folds for n in intervals]
    chosen: dict[str, list] = {}
    tput: dict[str, list] = {"none": []}
    kills: dict[str, list] = {}
    replica_bytes: dict[str, list] = {}
    try:
        for rep in range(args.repeats):
            r = Trainer(make_config(args.steps, RecoveryConfig(mode="none"))).fit()
            tput["none"].append(r.steady_samples_per_sec)
            print(f"rep {rep} none: {r.steady_samples_per_sec:.0f} samples/s", flush=True)
            for n, fold in settings:
                name = f"{'fold' if fold else 'nofold'}-{n}"
                rc = RecoveryConfig(snapshot_interval=n, fold_log=fold)
                r = Trainer(make_config(args.steps, rc)).fit()
                tput.setdefault(name, []).append(r.steady_samples_per_sec)
                chosen.setdefault(name, []).append(
                    [(s["snapshot_interval"], s["snapshots_sent"]) for s in r.servers]
                )
                replica_bytes.setdefault(name, []).append(
                    sum(s["replica_bytes_sent"] for s in r.servers) / max(1, r.updates_applied)
                )
                k = Trainer(
                    make_config(args.kill_steps, rc, kill=f"server:0@step={args.kill_step}")
                ).fit()
                row = measure_kill(k)
                kills.setdefault(name, []).append(row)
                print(
                    f"rep {rep} {name}: {r.steady_samples_per_sec:.0f} samples/s, kill->serving "
                    f"{row['kill_to_serving_s']:.3f}s, "
                    f"replayed {row['replayed']}, moved {row['bytes_moved'] / 1e6:.2f} MB",
                    flush=True,
                )
    finally:
        ray.shutdown()
    none = statistics.median(tput["none"])
    table = []
    for n, fold in settings:
        name = f"{'fold' if fold else 'nofold'}-{n}"
        table.append(
            {
                "snapshot_interval": n,
                "fold_log": fold,
                "samples_per_sec": statistics.median(tput[name]),
                "ratio_vs_none": statistics.median(tput[name]) / none,
                "ratio_vs_none_per_repeat": [t / u for t, u in zip(tput[name], tput["none"])],
                "replica_bytes_per_update": statistics.median(replica_bytes[name]),
                "kill_to_serving_s": statistics.median(r["kill_to_serving_s"] for r in kills[name]),
                "detect_to_serving_s": statistics.median(
                    r["detect_to_serving_s"] for r in kills[name]
                ),
                "replayed": statistics.median(r["replayed"] for r in kills[name]),
                "bytes_moved": statistics.median(r["bytes_moved"] for r in kills[name]),
                "steps_lost": max(r["steps_lost"] for r in kills[name]),
                "chosen_interval_and_snapshots_per_shard": chosen[name],
            }
        )
        print(json.dumps(table[-1]), flush=True)
    with open(args.output, "w") as fh:
        json.dump(
            {
                "args": vars(args),
                "none_samples_per_sec": tput["none"],
                "table": table,
                "kills": kills,
                "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            },
            fh,
            indent=2,
        )
    print(f"wrote {args.output}")
    plot(table, args.output[: -len(".json")] + ".png")


def plot(table: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for fold in (True, False):
        rows = sorted(
            (r for r in table if r["fold_log"] == fold and r["snapshot_interval"] != "auto"),
            key=lambda r: r["snapshot_interval"],
        )
        if not rows:
            continue
        x = [r["snapshot_interval"] for r in rows]
        label = "fold_log on" if fold else "fold_log off"
        a.plot(x, [100 * (1 - r["ratio_vs_none"]) for r in rows], marker="o", label=label)
        b.plot(x, [r["detect_to_serving_s"] * 1000 for r in rows], marker="o", label=label)
    for r in table:
        if r["snapshot_interval"] == "auto":
            label = f"auto ({'fold' if r['fold_log'] else 'no fold'})"
            a.axhline(100 * (1 - r["ratio_vs_none"]), linestyle="--", linewidth=1, label=label)
            b.axhline(r["detect_to_serving_s"] * 1000, linestyle="--", linewidth=1, label=label)
    a.axhline(3, color="grey", linestyle=":", linewidth=1)
    for ax, ylabel in (
        (a, "throughput cost vs no replication (%)"),
        (b, "recovery: detection -> serving (ms)"),
    ):
        ax.set_xscale("log")
        ax.set_xlabel("snapshot_interval (updates)")
        ax.set_ylabel(ylabel)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
