"""Node loss, repeated: the three settings that once failed about half the time (a reply that lived
on the lost node), each run on three simulated nodes with node 1 removed at step 20, judged like the
chaos matrix (I1 from the ledgers, I2 against the same setting without the kill, I4).

    # 12 runs: sync 2x2, sync 3x3, ssp 3x3 in turn
    python experiments/chaos_matrix/node_loss.py --rounds 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from raytrain_ft.actors.worker import LEDGER_DIR_ENV_VAR
from raytrain_ft.recovery.ledger import exactly_once_violations, read_ledgers

SETTINGS = {"sync 2x2": ("sync", 2, 2), "sync 3x3": ("sync", 3, 3), "ssp 3x3": ("ssp", 3, 3)}
STEPS = 60


def train(mode: str, workers: int, servers: int, kill: str | None, workdir: str) -> dict:
    out = os.path.join(workdir, f"run-{time.time_ns()}.json")
    cmd = [
        sys.executable,
        "-m",
        "raytrain_ft.cli",
        "train",
        "--quiet",
        "--local-nodes",
        "3",
        "--mode",
        mode,
        "--num-workers",
        str(workers),
        "--num-servers",
        str(servers),
        "--steps",
        str(STEPS),
        "--image-size",
        "8",
        "--batch-size",
        "16",
        "--seed",
        "3",
        "--output-json",
        out,
    ] + (["--kill", kill] if kill else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError((proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1])
    with open(out) as fh:
        return json.load(fh)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument(
        "--output",
        default=os.path.join(os.path.dirname(__file__), "results_node_loss_x86-2core_202611.json"),
    )
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    workdir = tempfile.mkdtemp(prefix="node-loss-")
    os.environ[LEDGER_DIR_ENV_VAR] = os.path.join(workdir, "ledgers")
    os.makedirs(os.environ[LEDGER_DIR_ENV_VAR])
    baselines = {
        name: train(mode, w, k, None, workdir)["params_sha256"]
        for name, (mode, w, k) in SETTINGS.items()
        if mode == "sync"
    }
    runs = []
    for rnd in range(args.rounds):
        for name, (mode, w, k) in SETTINGS.items():
            t0 = time.time()
            try:
                s = train(mode, w, k, "node:1@step=20", workdir)
                problems = exactly_once_violations(
                    s["applied_counts"],
                    read_ledgers(os.environ[LEDGER_DIR_ENV_VAR], s["run_id"]),
                    w,
                    STEPS,
                )
                if name in baselines and s["params_sha256"] != baselines[name]:
                    problems.append("params_sha256 differs from the run without the kill")
                if s["replicas_match"] != [True] * k or s["steps_completed"] != STEPS:
                    problems.append(
                        f"replicas_match {s['replicas_match']}, {s['steps_completed']} steps"
                    )
                if not any(e["role"] == "server" for e in s["recoveries"]):
                    problems.append("no server was lost with the node")
            except Exception as e:  # noqa: BLE001
                problems = [f"run failed: {e}"]
            row = {
                "setting": name,
                "round": rnd,
                "ok": not problems,
                "problems": problems,
                "seconds": round(time.time() - t0, 1),
            }
            runs.append(row)
            print(json.dumps(row), flush=True)
    with open(args.output, "w") as fh:
        json.dump(
            {"runs": runs, "passed": sum(r["ok"] for r in runs), "total": len(runs)}, fh, indent=1
        )
    print(f"{sum(r['ok'] for r in runs)} of {len(runs)} runs passed")


if __name__ == "__main__":
    main()
