"""Does ``--num-servers auto`` pick the shard count that trains fastest here?

For each setting, fixed shard counts and ``auto`` run in turn in every repeat (the order rotates),
sync, default durability; steady samples/s (warm-up steps excluded), medians of the repeats. The
report says which count auto chose each time, which fixed count measured fastest, and auto's
median as a fraction of the fastest fixed count's.

    python experiments/scaling/auto_servers.py --settings cnn,resnet18,cnn_sim8 --repeats 3 \
        --output experiments/scaling/results_auto_servers_x86-2core_202611.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

from raytrain_ft.config import ClusterConfig, DataConfig, ModelConfig, OptimConfig, TrainConfig
from raytrain_ft.trainer import Trainer

SETTINGS = {
    # name: model, dataset, image size, channels, workers, steps, simulated ms, ranks per process
    "cnn": ("cnn", "digits", 16, 1, 2, 200, 0.0, 1),
    "resnet18": ("resnet18", "synthetic", 32, 3, 2, 14, 0.0, 1),
    "cnn_sim8": ("cnn", "digits", 16, 1, 8, 60, 50.0, 4),
}


def make_config(setting: str, servers) -> TrainConfig:
    model, dataset, size, channels, workers, steps, sim_ms, per_process = SETTINGS[setting]
    return TrainConfig(
        model=ModelConfig(name=model),
        data=DataConfig.images(dataset, size, channels, 2048, batch_size=32),
        optim=OptimConfig(name="sgd", lr=0.01, momentum=0.9),
        cluster=ClusterConfig(
            num_workers=workers,
            num_servers=servers,
            use_gpu="false",
            simulate_compute_ms=sim_ms,
            ranks_per_process=per_process,
            metrics=False,
        ),
        steps=steps,
        seed=0,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--settings", default="cnn,resnet18,cnn_sim8")
    ap.add_argument("--servers", default="1,2,4", help="fixed shard counts to run beside auto")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--output", required=True)
    args = ap.parse_args()
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cores = os.cpu_count() or 1
    ray.init(num_cpus=cores, include_dashboard=False, logging_level="WARNING")
    choices = [int(s) for s in args.servers.split(",")] + ["auto"]
    report = {"cores": cores, "ray": ray.__version__, "settings": {}}
    try:
        for setting in args.settings.split(","):
            runs = {str(c): [] for c in choices}
            chosen, hashes = [], set()
            for r in range(args.repeats):
                order = choices[r % len(choices) :] + choices[: r % len(choices)]
                for c in order:
                    res = Trainer(make_config(setting, c)).fit()
                    runs[str(c)].append(res.steady_samples_per_sec)
                    hashes.add(res.params_sha256)
                    if c == "auto":
                        chosen.append(res.server_plan["chosen"])
                        plan = res.server_plan
                    print(
                        f"{setting} r{r} servers={c}: {res.steady_samples_per_sec:.1f} samples/s"
                        + (f" (chose {chosen[-1]})" if c == "auto" else ""),
                        flush=True,
                    )
            medians = {c: statistics.median(v) for c, v in runs.items()}
            fixed = {c: m for c, m in medians.items() if c != "auto"}
            best = max(fixed, key=fixed.get)
            row = {
                "samples_per_s": runs,
                "median": medians,
                "auto_chose": chosen,
                "last_plan": plan,
                "fastest_fixed": int(best),
                "auto_over_fastest_fixed": medians["auto"] / fixed[best],
                "same_hash_for_every_count": len(hashes) == 1,
            }
            report["settings"][setting] = row
            print(
                f"{setting}: medians {medians}; auto chose {chosen}; fastest fixed {best}; "
                f"auto / fastest {row['auto_over_fastest_fixed']:.3f}",
                flush=True,
            )
            with open(args.output, "w") as fh:
                json.dump(report, fh, indent=2)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
