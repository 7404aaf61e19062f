"""Chaos matrix: real kills of every role, at every kind of moment, in every consistency mode,
repeated.

Cells are (what is killed, when, mode):
  when = step           the role is killed once the slowest worker reaches step 20
         recovery       server:0 dies at step 20; the role is killed while that recovery is in
                        progress
         rereplication  server:1 dies at step 20; the role is killed while the replica it held is
                        rebuilt
         snapshot       a primary right after sending / a holder right after receiving its 2nd
                        snapshot
  plus the double failures that once broke the run (a worker restart under a supervisor kill, a
  shard recovered twice around a supervisor restart).
Roles: server (a primary), replica (the holder of shard 0's replica), worker, supervisor, spare,
node (one of three simulated nodes: its servers and workers die together). Modes: sync, async, ssp,
mixed (4 workers in two groups of 2; the others run 3 workers), sync with a backup worker, sync with
a top-k codec (its residual replicated), sync with overlap (pushes from the push thread).

Every run is judged on its own records: it finishes; every kill fired once on a live target; I1 from
the workers' ledgers against the shards' applied records (every (rank, step) applied exactly once);
I2 the failure-free run's params_sha256 (sync modes without backup workers); I3 no checkpoint file
read; I4 every replica, replayed, equals its primary. A cell passes a repeat only if all hold.

    python experiments/chaos_matrix/run.py --repeats 5     # the whole matrix (~4 h on 2 cores)
    python experiments/chaos_matrix/run.py --repeats 1 --when step --modes sync
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
from raytrain_ft.config import (
    ChaosConfig,
    ClusterConfig,
    ConsistencyConfig,
    DataConfig,
    ModelConfig,
    OptimConfig,
    RecoveryConfig,
    TrainConfig,
)
from raytrain_ft.recovery.faults import parse_kills
from raytrain_ft.recovery.ledger import exactly_once_violations, read_ledgers

STEPS, WORKERS, SERVERS = 60, 3, 2
MODES = {
    "sync": dict(mode="sync"),
    "async": dict(mode="async"),
    "ssp": dict(mode="ssp", staleness=1),
    "mixed": dict(mode="mixed", group_size=2, workers=4),  # two groups of 2 (groups must be equal)
    "backup": dict(mode="sync", backup_workers=1),
    # the residual travels with each push so that a restarted worker resumes with it (I2)
    "topk": dict(mode="sync", codec="topk:0.05", codec_residual="replicated"),
    # pushes from the push thread during backward, as on a GPU
    "overlap": dict(mode="sync", overlap=True),
}
CELLS = {
    # (when, role): kills
    ("step", "server"): "server:0@step=20",
    ("step", "replica"): "replica:0@step=20",
    ("step", "worker"): "worker:1@step=20",
    ("step", "supervisor"): "supervisor@step=20",
    ("step", "spare"): "spare:0@step=20",
    ("step", "node"): "node:1@step=20",
    ("recovery", "server"): "server:0@step=20,server:0@recovery=1",
    ("recovery", "worker"): "server:0@step=20,worker:1@recovery=1",
    ("recovery", "supervisor"): "server:0@step=20,supervisor@recovery=1",
    ("recovery", "spare"): "server:0@step=20,spare:0@recovery=1",
    ("rereplication", "worker"): "server:1@step=20,worker:1@rereplication=1",
    ("rereplication", "supervisor"): "server:1@step=20,supervisor@rereplication=1",
    ("rereplication", "spare"): "server:1@step=20,spare:0@rereplication=1",
    ("snapshot", "server"): "server:0@snapshot=2",
    ("snapshot", "replica"): "replica:0@snapshot=2",
    ("double", "worker+supervisor"): "worker:1@step=15,supervisor@step=16",
    ("double", "server+supervisor+server"): "server:0@step=15,supervisor@step=35,server:0@step=35",
}


def config(mode: str, kill: str | None) -> TrainConfig:
    m = dict(MODES[mode])
    return TrainConfig(
        model=ModelConfig(name="cnn"),
        data=DataConfig(dataset="digits", image_size=8, batch_size=16),
        optim=OptimConfig(name="sgd", lr=0.05, momentum=0.9),
        cluster=ClusterConfig(
            num_workers=m.get("workers", WORKERS),
            num_servers=SERVERS,
            local_nodes=3 if kill and "node" in kill else 1,
            overlap_comm=m.get("overlap", False),
            push_thread="true" if m.get("overlap") else "auto",
        ),
        recovery=RecoveryConfig(snapshot_interval=10, num_spares=2),
        chaos=ChaosConfig(kill=kill),
        consistency=ConsistencyConfig(
            staleness=m.get("staleness", 2),
            group_size=m.get("group_size", 2),
            backup_workers=m.get("backup_workers", 0),
            codec=m.get("codec", "none"),
            codec_residual=m.get("codec_residual", "local"),
        ),
        mode=m["mode"],
        steps=STEPS,
        seed=3,
    )


def run_one(cfg: TrainConfig, subprocess_run: bool, workdir: str) -> dict:
    """The run's JSON summary (a separate process for simulated nodes: they need their own Ray)."""
    if not subprocess_run:
        from raytrain_ft.trainer import Trainer

        return Trainer(cfg).fit().to_dict()
    out = os.path.join(workdir, f"run-{time.time_ns()}.json")
    cmd = [
        sys.executable,
        "-m",
        "raytrain_ft.cli",
        "train",
        "--quiet",
        "--config-json",
        json.dumps(cfg.to_dict()),
        "--output-json",
        out,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(
            proc.stderr.strip().splitlines()[-1]
            if proc.stderr.strip()
            else f"exit {proc.returncode}"
        )
    with open(out) as fh:
        return json.load(fh)


def judge(
    summary: dict, kills: str, baseline: str | None, every_step: bool, ledger_dir: str
) -> list[str]:
    problems = []
    fired = sorted(k["kill"] for k in summary["kills"])
    if fired != sorted(str(k) for k in parse_kills(kills)):
        problems.append(f"kills fired {fired}")
    if any(k.get("how") == "already gone" for k in summary["kills"]):
        problems.append("a kill found its target gone")
    if summary["steps_completed"] != STEPS:
        problems.append(f"{summary['steps_completed']} steps")
    problems += exactly_once_violations(
        summary["applied_counts"],
        read_ledgers(ledger_dir, summary["run_id"]),
        len(summary["workers"]),
        STEPS,
        every_step,
    )
    if baseline is not None and summary["params_sha256"] != baseline:
        problems.append("params_sha256 differs from the failure-free run")
    if any(s["checkpoint_files_read"] for s in summary["servers"]):
        problems.append("a checkpoint file was read")
    if summary["replicas_match"] != [True] * SERVERS:
        problems.append(f"replicas_match {summary['replicas_match']}")
    return problems


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--when", default="step,recovery,rereplication,snapshot,double")
    ap.add_argument(
        "--output", default=os.path.join(os.path.dirname(__file__), "results_x86-2core_202611.json")
    )
    args = ap.parse_args()
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    workdir = tempfile.mkdtemp(prefix="chaos-matrix-")
    ledger_dir = os.path.join(workdir, "ledgers")
    os.makedirs(ledger_dir)
    os.environ[LEDGER_DIR_ENV_VAR] = ledger_dir
    ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    modes, whens = args.modes.split(","), args.when.split(",")
    results, baselines = [], {}
    try:
        for mode in modes:
            plain_sync = MODES[mode]["mode"] == "sync" and not MODES[mode].get("backup_workers")
            if plain_sync:
                baselines[mode] = run_one(config(mode, None), False, workdir)["params_sha256"]
            for (when, role), kills in CELLS.items():
                if when not in whens or (when == "double" and mode != "sync"):
                    continue
                for repeat in range(args.repeats):
                    t0 = time.time()
                    try:
                        summary = run_one(config(mode, kills), role == "node", workdir)
                        problems = judge(
                            summary,
                            kills,
                            baselines.get(mode),
                            not MODES[mode].get("backup_workers"),
                            ledger_dir,
                        )
                    except Exception as e:  # noqa: BLE001 -- a failed run is a failed repeat, with its reason
                        problems = [f"run failed: {e}"[:400]]
                    row = {
                        "mode": mode,
                        "workers": MODES[mode].get("workers", WORKERS),
                        "when": when,
                        "role": role,
                        "kills": kills,
                        "repeat": repeat,
                        "ok": not problems,
                        "problems": problems,
                        "seconds": round(time.time() - t0, 1),
                    }
                    results.append(row)
                    print(json.dumps(row), flush=True)
                    with open(args.output, "w") as fh:
                        json.dump(
                            {
                                "steps": STEPS,
                                "workers": WORKERS,
                                "servers": SERVERS,
                                "runs": results,
                            },
                            fh,
                            indent=1,
                        )
    finally:
        ray.shutdown()
    print(table(results))


def table(results: list[dict]) -> str:
    """Pass rates: a row per (when, role), a column per mode."""
    modes = list(dict.fromkeys(r["mode"] for r in results))
    cells = list(dict.fromkeys((r["when"], r["role"]) for r in results))
    lines = ["| when | role | " + " | ".join(modes) + " |", "|---|---|" + "---|" * len(modes)]
    for when, role in cells:
        row = []
        for mode in modes:
            rs = [r for r in results if (r["when"], r["role"], r["mode"]) == (when, role, mode)]
            row.append(f"{sum(r['ok'] for r in rs)}/{len(rs)}" if rs else "")
        lines.append(f"| {when} | {role} | " + " | ".join(row) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
