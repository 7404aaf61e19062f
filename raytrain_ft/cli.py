"""Command line: ``raytrain-ft train [--config FILE] [--flags] [--output-json PATH]``.

Exit codes: 0 success, 2 bad input (config, flags, data files, cluster
address), 1 a failure during training.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys

from raytrain_ft import config as config_mod
from raytrain_ft.errors import ClusterError, ConfigError, DataError, RaytrainFTError

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


class ProgressBar:
    """One status line: redrawn in place on a terminal, a line every ~10% otherwise."""

    def __init__(self, stream=sys.stderr, width: int = 30):
        self.stream = stream
        self.width = width
        self.tty = stream.isatty()
        self._last_decile = -1

    def __call__(self, p) -> None:
        frac = p.step / p.total_steps if p.total_steps else 1.0
        filled = int(frac * self.width)
        loss = "-" if math.isnan(p.loss) else f"{p.loss:.4f}"
        line = f"[{'#' * filled}{'.' * (self.width - filled)}] step {p.step}/{p.total_steps} loss {loss} {p.samples_per_sec:,.0f} samples/s {p.elapsed_s:.0f}s"
        if self.tty:
            self.stream.write("\r" + line)
            if p.step >= p.total_steps:
                self.stream.write("\n")
        else:
            decile = int(frac * 10)
            if decile == self._last_decile:
                return
            self._last_decile = decile
            self.stream.write(line + "\n")
        self.stream.flush()


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("config (each overrides the YAML file)")
    for flag, (typ, help_text, default) in config_mod.cli_fields().items():
        dashed = "--" + flag.replace("_", "-")
        metavar = {bool: "BOOL", int: "N", float: "X"}.get(typ, "VALUE")
        # default=SUPPRESS: only flags given on the command line override the file
        extra = {"action": "append"} if flag in config_mod.REPEATABLE_FLAGS else {}
        group.add_argument(dashed, dest=flag, default=argparse.SUPPRESS, metavar=metavar, help=f"{help_text} (default: {default})", **extra)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raytrain-ft", description="Fault-tolerant parameter-server training on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="run a training job (embedded local Ray unless --address is given)")
    train.add_argument("--config", help="YAML file with model/data/optim/cluster sections")
    train.add_argument("--output-json", help="write the JSON summary here")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_config_flags(train)
    chaos = sub.add_parser("chaos", help="kill actors of a running run on a schedule (fault injection)")
    chaos.add_argument("--address", default="auto", help="Ray cluster address (default: auto, the cluster this machine is part of)")
    chaos.add_argument("--run-id", help="the run to attack (default: the only active run)")
    chaos.add_argument("--kill", action="append", default=[], help="ROLE[:INDEX]@step=N or @time=S, ROLE server|replica|worker|supervisor (repeatable)")
    chaos.add_argument("--random", action="store_true", help="random kills: exponential gaps with mean --mtbf-s over --duration-s")
    chaos.add_argument("--mtbf-s", type=float, default=10.0, help="random mode: mean seconds between kills")
    chaos.add_argument("--duration-s", type=float, default=60.0, help="random mode: length of the schedule")
    chaos.add_argument("--roles", default="server,replica,worker,supervisor", help="random mode: roles to pick from")
    chaos.add_argument("--seed", type=int, default=0, help="random mode: schedule seed")
    chaos.add_argument("--min-gap-s", type=float, default=1.0, help="random mode: least seconds between kills (replicas survive one failure at a time)")
    chaos.add_argument("--overlap", action="store_true", help="fire kills when due even if the previous one is not recovered yet (default: wait for its recovery)")
    return parser


def _train(args: argparse.Namespace) -> int:
    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config", "output_json", "quiet")}
    cfg = config_mod.load(args.config, overrides)
    from raytrain_ft.trainer import Trainer

    progress = None if args.quiet else ProgressBar()
    result = Trainer(cfg, on_progress=progress).fit()
    summary = result.to_dict()
    if args.output_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
        with open(args.output_json, "w") as fh:
            json.dump(summary, fh, indent=2)
    brief = {k: summary[k] for k in ("steps_completed", "samples_per_sec", "train_time_s", "final_loss", "eval_accuracy", "params_sha256", "updates_applied", "updates_acknowledged")}
    print(
        f"done: {brief['steps_completed']} steps, eval accuracy {brief['eval_accuracy']:.4f}, "
        f"final loss {brief['final_loss']:.4f}, {brief['samples_per_sec']:,.0f} samples/s over {brief['train_time_s']:.1f}s"
    )
    print(json.dumps(brief))
    return 0


def _chaos(args: argparse.Namespace) -> int:
    from raytrain_ft.recovery.faults import parse_kills, random_schedule

    kills = parse_kills(args.kill, "--kill")
    if not args.random and not kills:
        raise ConfigError("--kill", "give at least one --kill, or --random")
    import ray

    from raytrain_ft.recovery.chaos import find_supervisor, run_schedule
    from raytrain_ft.trainer import check_reachable

    check_reachable(args.address)
    try:
        ray.init(address=args.address, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError) as e:
        raise ClusterError(f"could not connect to Ray at {args.address!r}: {e}; check --address") from e
    try:
        run_id, supervisor = find_supervisor(args.run_id)
        if args.random:
            status = ray.get(supervisor.status.remote())
            sizes = {"server": len(status.epochs), "replica": len(status.epochs), "worker": len(status.workers), "supervisor": 1}
            kills += random_schedule(args.seed, args.mtbf_s, args.duration_s, [r.strip() for r in args.roles.split(",")], sizes, args.min_gap_s)
        print(f"chaos against {run_id}: {len(kills)} kills scheduled", flush=True)
        fired = run_schedule(supervisor, kills, on_fire=lambda r: print(json.dumps(r), flush=True), one_at_a_time=not args.overlap)
        print(f"fired {len(fired)} of {len(kills)} kills (the run ended first)" if len(fired) < len(kills) else f"fired {len(fired)} kills")
    finally:
        ray.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            return _train(args)
        if args.command == "chaos":
            return _chaos(args)
    except (ConfigError, DataError, ClusterError) as e:
        print(f"raytrain-ft: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RaytrainFTError as e:
        print(f"raytrain-ft: training failed: {e}", file=sys.stderr)
        return EXIT_FAILED
    parser.error(f"unknown command {args.command!r}")
    return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
