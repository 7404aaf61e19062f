"""Command line ``raytrain-ft``:

    train   [--config FILE] [--flags] [--output-json PATH]
            run here (embedded Ray) or on --address
    submit  [--address URL] [--config FILE] [--flags] [--follow]
            run as a Ray job on a running cluster
    status|logs|stop JOB_ID [--address URL]
            manage a submitted job
    chaos   --kill ROLE[:INDEX]@step=N ...
            kill actors of a running run
    report  RUN.json [--output PNG]
            plot a run's summary with its recoveries
    simulate [--schedules N] [--seed S] [--mode M] [--inject-bug B] [--holdups] [--replay SEED]
            explore the recovery protocol without Ray

Exit codes: 0 success, 2 bad input (config, flags, data files, cluster
address, auth), 1 a failure during training or of a job.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import warnings

from raytrain_ft import config as config_mod
from raytrain_ft.errors import (
    ClusterError,
    ConfigError,
    DataError,
    DivergedWarning,
    JobError,
    KillsNotFiredWarning,
    RaytrainFTError,
    cli_surface,
)
from raytrain_ft.jobs import DEFAULT_ADDRESS, SUMMARY_MARKER, check_auth_mode
from raytrain_ft.recovery.faults import ROLES, never_fired
from raytrain_ft.report import is_a_terminal, progress_line, recovery_line, server_plan_line

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


class ProgressBar:
    """One status line (redrawn in place on a terminal; otherwise -- logs, a Ray job -- a line every
    10% of the run or every ``every_s``) and a line per recovery."""

    def __init__(self, stream=sys.stderr, width: int = 30, every_s: float = 10.0):
        self.stream = stream
        self.every_s = every_s
        self._last_line_s = 0.0
        self.width = width
        self.tty = is_a_terminal(stream)
        self._last_decile = -1
        self._recoveries_printed: set = set()
        self._finished = False

    def __call__(self, p) -> None:
        # a recovery gets its line even after the bar is drawn (the run's end may report one);
        # recoveries come in the order they started, each once it is over: one that started
        # first and ended later comes before others already printed
        for event in p.recoveries:
            key = (event.get("role"), event.get("index"), event.get("detected_at"))
            if key not in self._recoveries_printed:
                self._recoveries_printed.add(key)
                self.stream.write(("\r\033[K" if self.tty else "") + recovery_line(event) + "\n")
        if self._finished:
            self.stream.flush()
            return
        line = progress_line(
            p.step,
            p.total_steps,
            p.loss,
            p.accuracy,
            p.samples_per_sec,
            p.elapsed_s,
            self.width,
            p.unit,
        )
        finished = p.step >= p.total_steps
        if self.tty:
            self.stream.write("\r\033[K" + line + ("\n" if finished else ""))
        else:
            decile = int(p.step / p.total_steps * 10) if p.total_steps else 10
            if (
                decile != self._last_decile
                or finished
                or p.elapsed_s - self._last_line_s >= self.every_s
            ):
                self._last_decile, self._last_line_s = decile, p.elapsed_s
                self.stream.write(line + "\n")
        self._finished = finished
        self.stream.flush()


def _add_config_flags(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    group = parser.add_argument_group("config (each overrides the YAML file)")
    for flag, (typ, help_text, default) in config_mod.cli_fields().items():
        if flag in exclude:
            continue
        dashed = [
            "--" + name.replace("_", "-")
            for name in (flag, config_mod.EXTRA_FLAG_NAMES.get(flag))
            if name
        ]
        metavar = {bool: "BOOL", int: "N", float: "X"}.get(typ, "VALUE")
        # default=SUPPRESS: only flags given on the command line override the file
        extra = {"action": "append"} if flag in config_mod.REPEATABLE_FLAGS else {}
        group.add_argument(
            *dashed,
            dest=flag,
            default=argparse.SUPPRESS,
            metavar=metavar,
            # argparse formats help with %: a docstring's "5%" must not read as a format
            help=f"{help_text} (default: {default})".replace("%", "%%"),
            **extra,
        )


def _add_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        dest="dashboard",
        help="the cluster's dashboard, http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS, "
        f"RAY_ADDRESS or {DEFAULT_ADDRESS})",
    )


class _Parser(argparse.ArgumentParser):
    """argparse with one error line (the usage block is what --help is for) and no abbreviated
    flags (``--sched 3`` is refused naming ``--schedules``, not read as it)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


LIVE_RUN_ROLES = tuple(r for r in ROLES if r != "node")
"""What `raytrain-ft chaos` can kill in a running job (node kills need simulated nodes)."""
RANDOM_DEFAULTS = {
    "mtbf_s": 10.0,
    "duration_s": 60.0,
    "roles": "server,replica,worker,supervisor",
    "seed": 0,
    "min_gap_s": 1.0,
}
"""``raytrain-ft chaos --random``: its settings' defaults (given without --random, they are
refused)."""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="raytrain-ft", description="Fault-tolerant parameter-server training on Ray."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train", help="run a training job (embedded local Ray unless --address is given)"
    )
    train.add_argument("--config", help="YAML file with model/data/optim/cluster sections")
    train.add_argument(
        "--config-json",
        help="the whole config as one JSON object (what `submit` passes to the job)",
    )
    train.add_argument("--output-json", help="write the JSON summary here")
    train.add_argument(
        "--save-model",
        metavar="PATH",
        help="torch.save the trained model's state dict here (load it into a fresh instance of the "
        "model)",
    )
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.add_argument(
        "--emit-summary",
        action="store_true",
        help=f"print the JSON summary on one line after {SUMMARY_MARKER.strip()} (read back by "
        "`submit`)",
    )
    _add_config_flags(train)
    submit = sub.add_parser(
        "submit", help="submit a training run to a running Ray cluster as a Ray job"
    )
    _add_address(submit)
    submit.add_argument("--config", help="YAML file with model/data/optim/cluster sections")
    submit.add_argument(
        "--runtime-env-json",
        help='Ray runtime_env as JSON, e.g. \'{"pip": ["raytrain-ft"]}\' when the nodes lack this '
        "package",
    )
    submit.add_argument("--job-id", help="submission id (default: Ray picks one)")
    submit.add_argument(
        "--follow",
        action="store_true",
        help="stream the job's logs until it ends, then print its summary; exit 0 only if it "
        "succeeded",
    )
    _add_config_flags(
        submit, exclude=("address", "local_nodes")
    )  # a job joins the cluster it is submitted to
    for name, text in (
        ("status", "show a submitted job's status"),
        ("logs", "print a submitted job's logs"),
        ("stop", "stop a submitted job"),
    ):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("job_id", help="the id `raytrain-ft submit` printed")
        _add_address(cmd)
        if name == "logs":
            cmd.add_argument(
                "--follow", "-f", action="store_true", help="keep streaming until the job ends"
            )
        if name == "stop":
            cmd.add_argument(
                "--no-wait",
                action="store_true",
                help="return at once instead of waiting until the job has stopped",
            )
    report = sub.add_parser(
        "report",
        help="render a run's JSON summary as a PNG (loss/accuracy over time, recoveries marked)",
    )
    report.add_argument("summary", help="the file written by `train --output-json`")
    report.add_argument("--output", "-o", help="PNG path (default: the summary's path with .png)")
    sim = sub.add_parser(
        "simulate",
        help="explore the recovery protocol in a deterministic simulation (no Ray): seeded "
        "schedules with "
        "crashes, node loss, false suspicion, supervisor restarts; exit 0 iff no violation",
    )
    sim.add_argument(
        "--schedules",
        type=int,
        default=None,
        help="schedules to run (default: 1000; --long: 20000)",
    )
    sim.add_argument(
        "--seed", type=int, default=0, help="seed of the first schedule's seed sequence"
    )
    sim.add_argument(
        "--mode", default="all", help="sync | async | ssp | mixed | all (default: all, in turn)"
    )
    sim.add_argument(
        "--inject-bug",
        action="append",
        default=[],
        metavar="NAME",
        help="switch on a known protocol bug the checker must catch: ack-before-log, no-fencing, "
        "double-apply, per-shard-clip, partial-skip, durable-too-soon, ungrouped-mean, "
        "relaxed-overrun, volatile-epochs, lost-pending-start, per-rank-start, lone-restart, "
        "eager-retire, last-holder-only, answering-only-abandon, no-held-up-grace",
    )
    sim.add_argument(
        "--holdups",
        action="store_true",
        help="the faults include the supervisor held up (paused, or starved of CPU) for 120-500 ms "
        "right after it sent a probe round; no one whose answer waited for it may be replaced as "
        "silent (on with --inject-bug no-held-up-grace)",
    )
    sim.add_argument(
        "--replay",
        type=int,
        metavar="SEED",
        help="run one schedule (a seed a violation printed) again, with its trace",
    )
    sim.add_argument(
        "--processes",
        type=int,
        default=os.cpu_count() or 1,
        help="processes to spread schedules over (default: all cores)",
    )
    sim.add_argument(
        "--long",
        action="store_true",
        help="explore longer: 20000 schedules unless --schedules is given",
    )
    sim.add_argument(
        "--all-violations",
        action="store_true",
        help="go on after the first violation (count them all)",
    )
    chaos = sub.add_parser(
        "chaos", help="kill actors of a running run on a schedule (fault injection)"
    )
    chaos.add_argument(
        "--address",
        default="auto",
        help="Ray cluster address (default: auto, the cluster this machine is part of)",
    )
    chaos.add_argument("--run-id", help="the run to attack (default: the only active run)")
    chaos.add_argument(
        "--wait-s",
        type=float,
        default=120.0,
        help="wait this long for the run to appear (a job just submitted is still starting)",
    )
    chaos.add_argument(
        "--kill",
        action="append",
        default=[],
        help=f"ROLE[:INDEX]@step=N or @time=S, ROLE {'|'.join(LIVE_RUN_ROLES)} (repeatable)",
    )
    chaos.add_argument(
        "--random",
        action="store_true",
        help="random kills: exponential gaps with mean --mtbf-s over --duration-s",
    )
    chaos.add_argument(
        "--mtbf-s",
        type=float,
        default=RANDOM_DEFAULTS["mtbf_s"],
        help="random mode: mean seconds between kills",
    )
    chaos.add_argument(
        "--duration-s",
        type=float,
        default=RANDOM_DEFAULTS["duration_s"],
        help="random mode: length of the schedule",
    )
    chaos.add_argument(
        "--roles",
        default=RANDOM_DEFAULTS["roles"],
        help="random mode: comma-separated roles to pick from: "
        f"{', '.join(LIVE_RUN_ROLES)} (default: %(default)s)",
    )
    chaos.add_argument(
        "--seed", type=int, default=RANDOM_DEFAULTS["seed"], help="random mode: schedule seed"
    )
    chaos.add_argument(
        "--min-gap-s",
        type=float,
        default=RANDOM_DEFAULTS["min_gap_s"],
        help="random mode: least seconds between kills (replicas survive one failure at a time)",
    )
    chaos.add_argument(
        "--overlap",
        action="store_true",
        help="fire kills when due even if the previous one is not recovered yet (default: wait for "
        "its recovery)",
    )
    return parser


def _json_flag(flag: str, text: str, what: str = "a JSON object") -> dict:
    """The JSON object a flag holds; ConfigError naming the flag for anything else."""
    value = config_mod.parse_json(text, flag)
    if not isinstance(value, dict):
        shown = "null" if value is None else type(value).__name__
        raise ConfigError(flag, f"must be {what} {{...}}, got {shown}")
    return value


def _config(args: argparse.Namespace):
    """The run config: the YAML file (or --config-json), then every config flag given on the command
    line."""
    fields = config_mod.cli_fields()
    if getattr(args, "config", None):  # a file on this machine, for train and submit alike
        args.config = os.path.expanduser(args.config)
    overrides = {k: v for k, v in vars(args).items() if k in fields}
    if getattr(args, "config_json", None):
        if args.config:
            raise ConfigError("--config-json", "give --config or --config-json, not both")
        raw = _json_flag("--config-json", args.config_json, "a JSON object of config sections")
    else:
        raw = config_mod.load_yaml(args.config) if args.config else {}
    # the run's length given twice, checked before the config is built (it refuses steps beside an
    # epochs other than its default too, in the reader's words rather than these): both in one
    # file, where epochs counts when it differs from its default (a config `submit` wrote out in
    # full holds the default beside the steps it runs); --epochs beside steps from anywhere
    given = raw if isinstance(raw, dict) else {}
    source = "--config-json" if getattr(args, "config_json", None) else args.config or "config"
    if (
        given.get("epochs") not in (None, config_mod.TrainConfig().epochs)
        and given.get("steps") is not None
        and not {"epochs", "steps"} & set(overrides)
    ):
        raise ConfigError(
            "epochs",
            f"not used: {source} sets steps: {given['steps']} too (a run's length in steps per "
            "worker, which overrides epochs); give one of them",
        )
    if "epochs" in overrides and (overrides.get("steps") or given.get("steps")) is not None:
        raise ConfigError(
            "--epochs",
            (
                "not used with --steps"
                if "steps" in overrides
                else f"not used: the config sets steps: {given['steps']}"
            )
            + " (a run's length in steps per worker, which overrides epochs); give one of them",
        )
    return config_mod.from_command_line(raw, overrides, source=source)


class Stopped(BaseException):
    """SIGTERM (a stopped Ray job, ``timeout``, ``kill``) or SIGINT (Ctrl-C): unwind, so that the
    run's actors are killed and Ray is shut down, then end with one line."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _exit_on_sigterm(signum, frame) -> None:
    raise Stopped(signum)


def _write_summary(summary: dict, path: str) -> None:
    """Write the JSON summary; if that fails after all (checked before training), print it so the
    run's result is not lost."""
    try:
        with open(path, "w") as fh:
            json.dump(summary, fh, indent=2)
    except OSError as e:
        print(json.dumps(summary))
        raise ConfigError(
            "--output-json",
            f"could not write {path!r} ({e.strerror or e}); the summary is printed above instead",
        ) from None


def _home_expanded(cfg):
    """The run's local paths with a leading ``~`` expanded, as a shell would have (a quoted path,
    or one from YAML, is not): on the machine that runs the driver."""
    import dataclasses

    def expand(path: str | None) -> str | None:
        return os.path.expanduser(path) if path else path

    rc, dc = cfg.recovery, cfg.data
    return dataclasses.replace(
        cfg,
        recovery=dataclasses.replace(
            rc, checkpoint_dir=expand(rc.checkpoint_dir), resume_from=expand(rc.resume_from)
        ),
        data=dataclasses.replace(dc, data_path=expand(dc.data_path)),
    )


def _train(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    for name in ("output_json", "save_model"):
        if getattr(args, name):
            setattr(args, name, os.path.expanduser(getattr(args, name)))
    cfg = _home_expanded(_config(args))
    for flag, path, other, other_path, what in (
        ("--output-json", args.output_json, "--config", args.config, "file: the run would"),
        ("--save-model", args.save_model, "--config", args.config, "file: the run would"),
        (
            "--save-model",
            args.save_model,
            "--output-json",
            args.output_json,
            "path: the model would",
        ),
    ):
        # the same file, whatever the names (a symlink, a relative path)
        if path and other_path and os.path.realpath(path) == os.path.realpath(other_path):
            overwritten = "it" if other == "--config" else "the summary"
            raise ConfigError(flag, f"is the {other} {what} overwrite {overwritten}")
    for flag, path in (("--output-json", args.output_json), ("--save-model", args.save_model)):
        if path is not None:  # before training, not after it
            config_mod.check_writable_file(path, flag)
    # Before torch is imported and the data loaded (the run checks it again right before ray.init).
    if cfg.cluster.address:
        from raytrain_ft.jobs import check_ray_address

        check_ray_address(cfg.cluster.address, "cluster.address")
    from raytrain_ft.trainer import Trainer

    progress = None if args.quiet else ProgressBar()
    with warnings.catch_warnings():  # said below, with the flags to change
        warnings.simplefilter("ignore", DivergedWarning)
        warnings.simplefilter("ignore", KillsNotFiredWarning)
        result = Trainer(cfg, on_progress=progress).fit()
    summary = result.to_dict()
    if args.output_json:
        _write_summary(summary, args.output_json)
    if args.save_model:
        import torch

        torch.save(result.state_dict(), args.save_model)
    brief = {
        k: summary[k]
        for k in (
            "steps_completed",
            "samples_per_sec",
            "train_time_s",
            "final_loss",
            "eval_accuracy",
            "params_sha256",
            "updates_applied",
            "updates_acknowledged",
            "updates_lost",
        )
    }
    if args.quiet:  # no progress bar showed them
        for event in summary["recoveries"]:
            print(recovery_line(event))
    never = never_fired(_kill_texts(cfg.chaos.kill), summary["kills"])
    if never:  # e.g. @recovery=N with fewer recoveries, @time=S past the run's end
        print(
            f"raytrain-ft: warning: {len(never)} kill(s) never fired (the run ended first, "
            f"nothing triggered them, or no live actor played the role from when they came due): "
            f"{', '.join(never)}",
            file=sys.stderr,
        )
    warning, done = done_lines(brief, summary)
    if warning:
        print(warning, file=sys.stderr)
    if summary.get("server_plan"):
        print(server_plan_line(summary["server_plan"]))
    print(done)
    print(json.dumps(brief))
    if args.emit_summary:
        print(SUMMARY_MARKER + json.dumps(summary, separators=(",", ":")), flush=True)
    if summary.get("eval_error"):  # after the summary and the model are written
        print(
            f"raytrain-ft: error: {summary['eval_error']} (training finished; its summary and "
            "model were written without the eval numbers)",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    return 0


def done_lines(brief: dict, summary: dict) -> tuple[str | None, str]:
    """(a warning or None, the line) that end a train run's output; the summary holds null for a
    number that is not finite."""
    if brief["eval_accuracy"] is not None:
        accuracy = f"eval accuracy {brief['eval_accuracy']:.4f}"
    elif summary.get("eval_loss") is not None:
        accuracy = f"eval loss {summary['eval_loss']:.4f}"
    else:  # no eval set, or a loss that is not a finite number
        accuracy = "eval loss -"
    final_loss = brief["final_loss"]
    warning = None
    config = summary.get("config") or {}
    simulated = (config.get("cluster") or {}).get("simulate_compute_ms")  # computes no loss
    if final_loss is None and brief["steps_completed"] and not simulated:
        warning = (
            "raytrain-ft: warning: the training loss is not a finite number at the end (the run "
            "diverged); lower --lr, or clip with --clip-grad-norm"
        )
    final = "-" if final_loss is None else format(final_loss, ".4f")
    done = f"{brief['steps_completed']} steps"
    if config.get("mode") == "local_sgd":  # its steps are rounds of local steps
        h = config["consistency"]["local_steps"]
        done = f"{brief['steps_completed']} rounds of {h} local steps"
    return warning, (
        f"done: {done}, {accuracy}, final loss {final}, "
        f"{brief['samples_per_sec']:,.0f} samples/s over {brief['train_time_s']:.1f}s, "
        f"{len(summary['recoveries'])} recover{'y' if len(summary['recoveries']) == 1 else 'ies'}"
    )


def _kill_texts(kill) -> list[str]:
    from raytrain_ft.recovery.faults import parse_kills

    return [str(k) for k in parse_kills(kill)]


def _submit(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # --follow: one line, the job goes on
    from raytrain_ft import jobs

    cfg = _config(args)
    runtime_env = (
        _json_flag("--runtime-env-json", args.runtime_env_json, "a JSON object (a Ray runtime_env)")
        if args.runtime_env_json
        else None
    )
    handle = jobs.submit(cfg, address=args.dashboard, runtime_env=runtime_env, job_id=args.job_id)
    print(f"submitted {handle.job_id} to {handle.address}")
    if not args.follow:
        print(f"  follow:  raytrain-ft logs {handle.job_id} --follow --address {handle.address}")
        print(f"  status:  raytrain-ft status {handle.job_id} --address {handle.address}")
        print(f"  stop:    raytrain-ft stop {handle.job_id} --address {handle.address}")
        return 0
    logged = jobs.print_chunks(handle.tail())
    status = handle.wait()
    # a job that failed before its driver wrote a line (its runtime_env, say): Ray's reason
    message = handle.info()["message"] if status == "FAILED" and not logged else None
    print(f"job {handle.job_id}: {status}" + (f": {message.strip()}" if message else ""))
    return 0 if status == "SUCCEEDED" else EXIT_FAILED


def _job_command(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # logs --follow: one line, the job goes on
    from raytrain_ft import jobs

    handle = jobs.attach(args.job_id, args.dashboard)
    if args.command == "status":
        info = handle.info()
        print(
            f"{info['job_id']}: {info['status']}"
            + (f" ({info['message']})" if info["message"] else "")
        )
        return 0
    if args.command == "logs":
        if args.follow:
            jobs.print_chunks(handle.tail())
        else:
            sys.stdout.write(handle.logs())
        return 0
    stopped = handle.stop()
    if not stopped:
        print(f"{handle.job_id} had already ended: {handle.status()}")
        return 0
    print(
        f"{handle.job_id}: stop requested"
        if args.no_wait
        else f"{handle.job_id}: {handle.wait(timeout_s=120)}"
    )
    return 0


def _report(args: argparse.Namespace) -> int:
    from raytrain_ft.report import load_summary, render_png

    out = args.output or os.path.splitext(args.summary)[0] + ".png"
    flag = "--output" if args.output else f"--output (default {out!r})"
    if not out.lower().endswith(".png"):
        raise ConfigError(
            flag, f"the report is a PNG image; give a path ending in .png, not {out!r}"
        )
    summary = load_summary(args.summary)
    config_mod.check_writable_file(out, flag, create_parent=False)
    render_png(summary, out, flag)
    print(f"wrote {out}")
    return 0


MAX_SCHEDULES = 10_000_000
"""The most schedules one ``simulate`` runs (~1 day on 2 cores)."""


def _simulate(args: argparse.Namespace) -> int:
    import dataclasses

    from raytrain_ft.sim import MODES, explore, run_schedule
    from raytrain_ft.sim.bugs import BUGS, refuse_unshowable, with_holdups

    modes = MODES if args.mode == "all" else (args.mode,)
    if args.mode != "all" and args.mode not in MODES:
        raise ConfigError(
            "--mode", f"unknown mode {args.mode!r}; choose one of {', '.join(MODES)} or all"
        )
    for bug in args.inject_bug:
        if bug not in BUGS:
            raise ConfigError("--inject-bug", f"unknown bug {bug!r}; choose from {', '.join(BUGS)}")
    try:
        refuse_unshowable(args.inject_bug, modes)
    except ValueError as e:
        raise ConfigError("--inject-bug", str(e)) from None
    # a bug only hold-ups can show turns them on (run_schedule does): say so in the summary
    holdups = with_holdups(args.inject_bug, args.holdups)
    if args.schedules is None:
        args.schedules = 20000 if args.long else 1000
    if args.schedules <= 0 or args.processes <= 0:
        raise ConfigError("--schedules" if args.schedules <= 0 else "--processes", "must be > 0")
    if args.schedules > MAX_SCHEDULES:
        raise ConfigError(
            "--schedules",
            f"{args.schedules:,} schedules would run for days (20,000 take ~3 minutes on 2 cores); "
            f"give at most {MAX_SCHEDULES:,} and run another --seed for more",
        )
    cores = os.cpu_count() or 1
    if args.processes > cores:
        raise ConfigError(
            "--processes",
            f"this machine has {cores} cores and the schedules are pure computation: more "
            f"processes than cores only wait for them; use at most {cores}",
        )
    ignored = sorted(
        args.given & {"--schedules", "--seed", "--processes", "--all-violations", "--long"}
    )
    if args.replay is not None and ignored:
        raise ConfigError(
            ignored[0], f"--replay runs the one schedule it names; drop {', '.join(ignored)}"
        )
    if args.replay is not None:
        if len(modes) != 1:
            raise ConfigError(
                "--replay", "name the schedule's mode with --mode (the violation line printed it)"
            )
        r = run_schedule(
            args.replay, modes[0], tuple(args.inject_bug), trace=True, holdups=args.holdups
        )
        for line in r.trace:
            print(line)
        summary = {
            "replay": args.replay,
            "mode": r.mode,
            "holdups": holdups,
            "config": dataclasses.asdict(r.config),
            "faults": r.faults,
            "violations": [dataclasses.asdict(v) for v in r.violations],
            "reached": dict(sorted(r.coverage.items())),
        }
        print(json.dumps(summary))
        return EXIT_FAILED if r.violations else 0
    ex = explore(
        args.schedules,
        args.seed,
        modes,
        tuple(args.inject_bug),
        stop_at_first=not args.all_violations,
        processes=args.processes,
        holdups=args.holdups,
    )
    summary = {
        "schedules": ex.schedules,
        "modes": list(modes),
        "seed": args.seed,
        "injected_bugs": args.inject_bug,
        "holdups": holdups,
        "faults": ex.faults,
        "crashes": ex.crashes,
        "events": ex.events,
        "violations": ex.violations,
        "seconds": round(ex.seconds, 2),
        "schedules_reaching": dict(sorted(ex.coverage.items())),
    }
    if ex.first_violation is not None:
        v = ex.first_violation
        replay = run_schedule(
            v.seed, v.mode, tuple(args.inject_bug), trace=True, holdups=args.holdups
        )
        summary.update(
            failing_seed=v.seed,
            failing_mode=v.mode,
            config=dataclasses.asdict(v.config),
            faults_injected=v.faults,
            violation=[dataclasses.asdict(x) for x in v.violations[:5]],
            trace=replay.trace[-200:],
            replay=f"raytrain-ft simulate --replay {v.seed} --mode {v.mode}"
            + "".join(f" --inject-bug {b}" for b in args.inject_bug)
            + (" --holdups" if args.holdups else ""),
        )
        print(
            f"violation in schedule {v.seed} ({v.mode}): {v.violations[0].kind}: "
            f"{v.violations[0].detail}",
            file=sys.stderr,
        )
    print(
        f"{ex.schedules} schedules, {ex.faults} faults ({ex.crashes} crashes), {ex.violations} "
        f"violations, {ex.seconds:.1f}s",
        file=sys.stderr,
    )
    print(json.dumps(summary))
    return EXIT_FAILED if ex.violations else 0


def _chaos(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    from raytrain_ft.recovery.faults import check_live_kills, parse_kills, random_schedule

    kills = parse_kills(args.kill, "--kill")
    if not args.random and not kills:
        raise ConfigError("--kill", "give at least one --kill, or --random")
    if args.random and kills:
        raise ConfigError(
            "--kill", "a schedule is either the --kill list or --random; run chaos once for each"
        )
    check_live_kills(kills, "--kill")  # before connecting, not after
    if not args.random:  # the random schedule's own settings would be ignored
        for dest, default in RANDOM_DEFAULTS.items():
            if getattr(args, dest) != default:
                raise ConfigError(
                    "--" + dest.replace("_", "-"),
                    "applies to --random schedules only; add --random or drop it",
                )
    for flag, value, low in (
        ("--wait-s", args.wait_s, 0.0),
        ("--mtbf-s", args.mtbf_s, 0.0),
        ("--duration-s", args.duration_s, 0.0),
        ("--min-gap-s", args.min_gap_s, 0.0),
    ):
        if not math.isfinite(value) or value < low:
            raise ConfigError(flag, f"must be a finite number >= {low:g}, got {value!r}")
    if args.random:  # the schedule's parameters, checked before connecting
        roles = [r.strip() for r in args.roles.split(",")]
        random_schedule(args.seed, args.mtbf_s, args.duration_s, roles, {}, args.min_gap_s)
        if args.duration_s <= 0:
            raise ConfigError("--duration-s", "must be > 0: the schedule's kills fall inside it")
        if "node" in roles:
            raise ConfigError(
                "--roles",
                "node kills need the run's own cluster of simulated nodes: give them to "
                f"`raytrain-ft train --kill node:I@...`; choose from {', '.join(LIVE_RUN_ROLES)}",
            )
    from raytrain_ft.jobs import check_ray_address, ray_init_error, signal_handlers_kept

    address = check_ray_address(args.address, "--address")
    import ray

    from raytrain_ft.recovery.chaos import check_kills_against, find_supervisor, run_schedule

    try:
        with signal_handlers_kept():
            ray.init(address=address, logging_level=logging.WARNING)
    except Exception as e:  # noqa: BLE001 -- one line naming what to fix
        raise ray_init_error(e, address, "--address") from None
    try:
        run_id, supervisor = find_supervisor(
            args.run_id, args.wait_s, on_wait=lambda text: print(text, flush=True)
        )
        try:
            status = ray.get(supervisor.status.remote())
        except ray.exceptions.RayActorError:
            raise ClusterError(f"run {run_id} ended before its first status was read") from None
        check_kills_against(status, kills)  # before saying what is scheduled
        if args.random:
            sizes = {
                "server": len(status.epochs),
                "replica": len(status.epochs),
                "worker": len(status.workers),
                "supervisor": 1,
            }
            kills += random_schedule(
                args.seed,
                args.mtbf_s,
                args.duration_s,
                [r.strip() for r in args.roles.split(",")],
                sizes,
                args.min_gap_s,
            )
        # which cluster and run: --address auto takes any Ray this machine runs
        print(
            f"chaos against {run_id} ({_run_shape(status)}) on the Ray cluster at "
            f"{ray.get_runtime_context().gcs_address}"
            + (" (found by --address auto)" if args.address == "auto" else "")
            + f": {_count(len(kills), 'kill')} scheduled",
            flush=True,
        )
        fired = run_schedule(
            supervisor,
            kills,
            on_fire=lambda r: print(json.dumps(r), flush=True),
            one_at_a_time=not args.overlap,
        )
        never = never_fired([str(k) for k in kills], fired)
    finally:
        ray.shutdown()
    if never and not args.random:  # the kills asked for did not happen: not a success
        print(
            f"raytrain-ft: error: fired {len(fired)} of {_count(len(kills), 'kill')}; the run "
            f"ended before {', '.join(never)} (give an earlier @step or @time)",
            file=sys.stderr,
        )
        return EXIT_FAILED
    print(
        f"fired {len(fired)} of {_count(len(kills), 'kill')} (the run ended first: "
        f"{', '.join(never)})"
        if never
        else f"fired {_count(len(fired), 'kill')}"
    )
    return 0


def _stop_signal_of(error: BaseException) -> int | None:
    """The signal that stopped the command, where ``error`` is its doing: ``Stopped``, Ctrl-C, or
    a ``SystemError`` Ray's C code turned one raised inside it into (the cause or context keeps
    it); None for any other error."""
    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, Stopped):
            return error.signum
        if isinstance(error, KeyboardInterrupt):
            return signal.SIGINT
        error, seen = error.__cause__ or error.__context__, seen + 1
    return None


def _what_goes_on(args: argparse.Namespace) -> str:
    """What a command stopped by a signal leaves behind, for the line that says it stopped."""
    if args.command == "train":  # its actors end with the driver (killed, or the orphan watch)
        return " (the run's actors are stopped with it)"
    if args.command == "chaos":
        return "; the run it attacked goes on"
    if args.command in ("submit", "logs", "status"):
        job = getattr(args, "job_id", None) or "JOB_ID"
        return f"; a submitted job goes on (raytrain-ft stop {job} ends it)"
    return ""


def _count(n: int, noun: str) -> str:
    """``1 kill``, ``2 kills``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _run_shape(status) -> str:
    """What a run's supervisor status says of its size, for the line naming the run attacked."""
    t = status.targets
    shape = f"{_count(len(t.workers), 'worker')}, {_count(t.num_shards, 'shard')}"
    return shape + (f", {_count(t.num_spares, 'spare')}" if t.num_spares else "")


def _flags_given(parser: argparse.ArgumentParser, command: str, argv: list[str]) -> list[str]:
    """The flags on the command line, each by its first name; a single-value flag given twice is
    refused (argparse keeps the last and drops the other silently; ``--kill`` repeats)."""
    sub = parser._subparsers._group_actions[0].choices.get(command)  # type: ignore[union-attr]
    if sub is None:
        return []
    by_string = {s: a for a in sub._actions for s in a.option_strings}
    seen: dict[str, str] = {}
    for token in argv:
        if token == "--":
            break
        action = by_string.get(token.split("=", 1)[0])
        if action is None:
            continue
        name = action.option_strings[0]
        if name in seen and isinstance(action, argparse._StoreAction):
            parser.exit(
                EXIT_BAD_INPUT,
                f"raytrain-ft: error: {token.split('=', 1)[0]}: given twice; give it once\n",
            )
        seen[name] = token
    return list(seen)


def _empty_argument(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str | None:
    """What to say of a flag or argument given an empty value (an unset shell variable): a config
    field (``none`` unsets those), a job id, an address, a path."""
    sub = parser._subparsers._group_actions[0].choices.get(args.command)  # type: ignore[union-attr]
    fields = config_mod.cli_fields()
    for action in sub._actions if sub is not None else ():
        value = getattr(args, action.dest, None)
        if any(
            isinstance(v, str) and not v.strip()
            for v in (value if isinstance(value, list) else [value])
        ):
            name = action.option_strings[0] if action.option_strings else action.dest
            unset = ", or none to unset" if action.dest in fields else ""
            return f"{name}: got an empty value (an unset variable?); give a value{unset}"
    return None


def _unknown_arguments(parser: argparse.ArgumentParser, command: str, unknown: list) -> None:
    """Exit 2 with the subcommand's usage, naming each unknown flag and its closest known one."""
    import difflib

    subparser = next(
        a for a in parser._actions if isinstance(a, argparse._SubParsersAction)
    ).choices[command]
    known = [o for a in subparser._actions for o in a.option_strings if o.startswith("--")]
    hints = []
    for arg in unknown:
        flag = arg.split("=", 1)[0]
        if not flag.startswith("-"):
            continue
        # --STEPS, --num_workers, -steps: the flag as it is spelled here
        spelled = "--" + flag.lstrip("-").lower().replace("_", "-")
        swapped = [k for k in known if sorted(k) == sorted(spelled)]  # --modle: --model
        close = (
            [spelled]
            if spelled in known
            else swapped or difflib.get_close_matches(spelled, known, n=1)
        )
        hints.append(f"{flag} (did you mean {close[0]}?)" if close else flag)
    subparser.error(f"unrecognized arguments: {', '.join(hints) or ' '.join(unknown)}")


class _CliLogLine(logging.Formatter):
    """A logged line as the CLI's own lines read (``raytrain-ft: warning: ...``, where it printed
    ``2026-11-28 19:15:51,123 WARNING raytrain_ft.recovery.chaos: ...``); another library's names
    that library; on a terminal it first clears the progress bar's line, redrawn at the next
    step."""

    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        ours = record.name == "raytrain_ft" or record.name.startswith("raytrain_ft.")
        source = "" if ours else f"({record.name}) "
        clear = "\r\033[K" if self.tty else ""
        return f"{clear}raytrain-ft: {level}{source}{super().format(record)}"


def _log_lines_as_the_cli_speaks() -> None:
    """What this project logs in this process (a chaos kill, a warning) and other libraries'
    warnings and errors, on stderr in the CLI's own words."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_CliLogLine(tty=is_a_terminal(sys.stderr)))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    logging.getLogger("raytrain_ft").setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    with cli_surface():
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    _log_lines_as_the_cli_speaks()
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # the subcommand's own usage, and the flag the user probably meant
        _unknown_arguments(parser, args.command, unknown)
    given = _flags_given(parser, args.command, sys.argv[1:] if argv is None else argv)
    args.given = set(given)
    empty = _empty_argument(parser, args)
    if empty:
        print(f"raytrain-ft: error: {empty}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        if args.command not in ("simulate", "report"):  # the commands that start or reach a Ray
            check_auth_mode()
        if args.command == "train":
            return _train(args)
        if args.command == "chaos":
            return _chaos(args)
        if args.command == "submit":
            return _submit(args)
        if args.command in ("status", "logs", "stop"):
            return _job_command(args)
        if args.command == "report":
            return _report(args)
        if args.command == "simulate":
            return _simulate(args)
    except (ConfigError, DataError, ClusterError) as e:
        print(f"raytrain-ft: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except JobError as e:
        print(f"raytrain-ft: {e}", file=sys.stderr)
        return EXIT_FAILED
    except RaytrainFTError as e:
        print(f"raytrain-ft: training failed: {e}", file=sys.stderr)
        return EXIT_FAILED
    except (KeyboardInterrupt, Stopped, SystemError) as e:  # a second signal while unwinding too
        stopped = _stop_signal_of(e)
        if stopped is None:  # a SystemError of something else
            raise
        signum = stopped
        print(f"raytrain-ft: stopped by {signal.Signals(signum).name}{_what_goes_on(args)}",
              file=sys.stderr)  # fmt: skip
        return 128 + signum
    parser.error(f"unknown command {args.command!r}")
    return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
