"""Strict vs pipelined durability on the simulator's clock: where the holder's round trip is
latency (its own machine), not CPU shared with the workers as on the development machine.

The simulator runs the real protocol state machines with no compute cost of their own: a worker's
step takes ``compute_s`` (0.5-1.5x, random), every message 0.1-2 ms (3% of them 10x). A sync run
without faults, W workers x S shards, is timed in simulated seconds, start-up (about 80 ms of
creating and replicating servers) excluded by subtracting the time of a 1-step run; medians over
``--seeds`` schedules.

    python experiments/recovery/pipelined_sim.py \
        --output experiments/recovery/results_pipelined_sim.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import warnings

from raytrain_ft.sim.world import SimConfig, World


def seconds(workers: int, shards: int, steps: int, compute_s: float, pipelined: bool, seed: int):
    cfg = SimConfig(
        mode="sync",
        num_workers=workers,
        num_shards=shards,
        steps=steps,
        compute_s=compute_s,
        snapshot_interval=50,
        pipelined=pipelined,
    )
    outcome = World(cfg, seed, faults=False).run()
    assert outcome.finished
    return outcome.sim_time_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--compute-ms", default="2,10,100")
    ap.add_argument("--output")
    args = ap.parse_args()
    warnings.simplefilter("ignore", RuntimeWarning)  # the toy model's values may overflow
    rows = []
    for workers, shards in ((2, 2), (4, 2), (8, 4)):
        for ms in (float(x) for x in args.compute_ms.split(",")):
            per_step = {}
            for pipelined in (False, True):
                times = [
                    seconds(workers, shards, args.steps, ms / 1000, pipelined, seed)
                    - seconds(workers, shards, 1, ms / 1000, pipelined, seed)
                    for seed in range(args.seeds)
                ]
                per_step[pipelined] = statistics.median(times) / (args.steps - 1) * 1000
            row = {
                "workers": workers,
                "shards": shards,
                "compute_ms": ms,
                "strict_ms_per_step": round(per_step[False], 2),
                "pipelined_ms_per_step": round(per_step[True], 2),
                "speedup": round(per_step[False] / per_step[True], 3),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.output:
        with open(args.output, "w") as fh:
            json.dump({"args": vars(args), "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
