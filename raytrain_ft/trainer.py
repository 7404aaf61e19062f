"""Driver API: ``Trainer(config).fit() -> TrainResult``.

The driver starts (or joins) Ray, creates the shard and worker actors, hands
the initial parameters to the shards and then only polls: it is not on the
per-step path. At the end it pulls the final parameters from the shards,
hashes them and evaluates them on the held-out split.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import re
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from raytrain_ft.config import TrainConfig, check_again, check_schedule, flag_of, is_set
from raytrain_ft.consistency import local_rounds, merge_histograms
from raytrain_ft.data import Dataset, check_source, checked_steps_per_epoch
from raytrain_ft.errors import (
    ClusterError,
    ConfigError,
    DivergedWarning,
    KillsNotFiredWarning,
    TrainingError,
)
from raytrain_ft.models import build_model
from raytrain_ft.params import (
    flatten_state,
    load_flat_state,
    num_trainable,
    params_sha256,
    shard_ranges,
)
from raytrain_ft.recovery.faults import KillSpec, check_kills_of, check_steps, never_fired
from raytrain_ft.report import is_a_terminal
from raytrain_ft.sharding import ServerPlan, choose_num_servers

logger = logging.getLogger(__name__)

RAY_ADDRESS_ENV_VAR = "RAY_ADDRESS"
SUPERVISOR_MAX_RESTARTS = 100
"""Ray restarts a killed supervisor this many times per run (each restart rebuilds its tables)."""


@dataclass(frozen=True, slots=True)
class Progress:
    step: int
    total_steps: int
    loss: float
    samples_per_sec: float
    elapsed_s: float
    accuracy: float = float("nan")
    """Mean accuracy of the workers' last training batches."""
    recoveries: tuple = ()
    """Every recovery event so far (the supervisor's records, oldest first)."""
    unit: str = "step"
    """What ``step`` counts: "round" in local_sgd (a push every ``local_steps`` local steps)."""

    def point(self) -> dict:
        """One row of the run's history (JSON)."""

        def num(x: float):
            return None if math.isnan(x) else round(x, 5)

        return {
            "t": round(self.elapsed_s, 3),
            "step": self.step,
            "loss": num(self.loss),
            "accuracy": num(self.accuracy),
            "samples_per_sec": round(self.samples_per_sec, 1),
        }


@dataclass
class TrainResult:
    steps_completed: int
    total_steps: int
    samples_per_sec: float
    steady_samples_per_sec: float
    """Samples/s after the first ``warmup_steps_excluded`` steps (benchmarks use this)."""
    warmup_steps_excluded: int
    train_time_s: float
    wall_time_s: float
    final_loss: float
    eval_accuracy: float
    """Classification runs (cross_entropy) only; NaN otherwise."""
    eval_loss: float
    params_sha256: str
    updates_applied: int
    updates_acknowledged: int
    num_params: int
    recoveries: list[dict[str, Any]] = field(default_factory=list)
    workers: list[dict[str, Any]] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    servers: list[dict[str, Any]] = field(default_factory=list)
    """Per shard: updates applied, duplicates answered, time waiting for the replica holder, bytes
    replicated."""
    kills: list[dict[str, Any]] = field(default_factory=list)
    """Faults injected: spec, wall-clock time, step, how (SIGKILL, ray.kill, remove_node)."""
    replicas_match: list[bool] = field(default_factory=list)
    """Per shard: its replica (snapshot + log, replayed) equals the primary at the end (I4)."""
    supervisor_restarts: int = 0
    supervisor_imported_torch: bool = False
    """Whether the supervisor's process (its last incarnation) loaded torch. It need not: the task
    reaches the workers and servers sealed and the end state is read by the driver, so the
    supervisor starts (and restarts) without torch's ~2 s import and stays small."""
    run_id: str = ""
    staleness_histogram: dict[int, int] = field(default_factory=dict)
    """{staleness: updates} over all shards: shard updates between a gradient's parameters and its
    application (sync: all 0; the stalest push of an aggregated update counts)."""
    bytes_pushed: int = 0
    """Gradient bytes all workers sent (after compression)."""
    bytes_pulled: int = 0
    """Parameter bytes all workers received."""
    clock_traces: list[tuple] = field(default_factory=list, repr=False)
    """SSP, per shard: (rank, clock, slowest clock) each time the shard let a rank start its next
    step (not in the JSON summary)."""
    started_at: float = 0.0
    """Wall-clock time (epoch s) the driver started waiting on the workers: t=0 of ``history``."""
    history: list[dict[str, Any]] = field(default_factory=list, repr=False)
    """Progress over the run: {t (s since start), step, loss, accuracy (training batches),
    samples_per_sec}, about every ``log_every_s`` (``raytrain-ft report`` plots it with the
    recoveries)."""
    eval_history: list[dict[str, Any]] = field(default_factory=list, repr=False)
    """``eval_every_s``: {t, step, eval_loss, eval_accuracy (classification)} of the shards'
    parameters as they were at t (seconds on the history's axis), oldest first."""
    step_times: list[list[tuple[int, float]]] = field(default_factory=list, repr=False)
    """Per rank: (step, time it finished) from the rank's final worker (not in the JSON summary)."""
    applied_counts: list[dict[str, str]] = field(default_factory=list, repr=False)
    """Per shard, per rank: how many times each step's push went into an update, one digit per step
    ("1111..."): the shards' own record, which chaos tests check against the workers' ledgers of
    acknowledged pushes."""
    eval_metrics: dict[str, float] = field(default_factory=dict)
    """The user's ``metrics`` on the eval set (each a mean over samples)."""
    eval_error: str | None = None
    """Evaluating the eval set (or the user's metrics) raised after training: its one line (the eval
    numbers are then missing; the training result stands)."""
    updates_lost: int = 0
    """Updates whose pushes were acknowledged and that no shard holds at the end: 0 with strict
    durability (I1); with relaxed:K at most K per primary lost (``updates_lost_in``)."""
    cpu_per_step: dict[str, float] = field(default_factory=dict)
    """CPU seconds per step, per process of each role (``cpu_per_step``): a worker's compute
    (forward/backward on its training thread, per rank) and everything else in its process (data
    prefetch, pushes and their serialization, Ray's threads; once for the ranks sharing a
    process), a server process, the supervisor. On a real cluster,
    where servers have their own cores, ``worker_other_s`` is what communication costs a
    worker."""
    preaggregated: bool = False
    """Whether the ranks of each process sent one push per shard for all of them
    (``cluster.preaggregate`` as it resolved)."""
    server_plan: dict | None = None
    """With ``--num-servers auto``: the shard count chosen, the exchange predicted per step for
    each candidate, and the costs measured to predict it (``ServerPlan.to_dict``)."""
    final_params: np.ndarray | None = field(default=None, repr=False)
    model: Any = field(default=None, repr=False)
    """The trained ``nn.Module`` (the run's model with the final parameters), on the CPU."""

    def state_dict(self) -> dict[str, Any]:
        """The trained module's state dict under its own parameter names: ``torch.save`` it and load
        it into a fresh instance of the model (``model.load_state_dict``)."""
        return self.model.state_dict()

    def to_dict(self) -> dict[str, Any]:
        """The run's summary, as the CLI writes it (``--output-json``): strict JSON values, so an
        accuracy a regression has none of (NaN here) is None."""
        model, self.model = self.model, None
        try:
            d = dataclasses.asdict(self)
        finally:
            self.model = model
        d.pop("model")
        d.pop("final_params")
        d.pop("step_times")
        d.pop("clock_traces")
        return json_safe(d)


def json_safe(value):
    """The summary as strict JSON: NaN and infinities (an accuracy a regression has none of) become
    null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def lost_updates(applied: dict, cfg: TrainConfig, total_steps: int | None = None) -> dict:
    """Updates of one shard that were applied then lost, as {update key: (rank, step)}: holes in
    its applied record. Every rank's push steps below its last applied one went into an update
    (workers resend what was not answered; a restarted rank resumes at the shard's clock), so a
    push step left at 0 below it was answered and lost with a primary. With ``total_steps`` (a
    run that completed: every worker had each of its pushes answered, the last one at step
    ``total_steps - 1`` included) the push steps up to the end count too. One key per update (a
    mixed group's pushes are one)."""
    rule, n_push = cfg.rule(), cfg.consistency.n_push
    if rule.synchronous:  # sync is strict (and backup workers drop late pushes on purpose)
        return {}
    lost: dict = {}
    for rank, counts in sorted(applied.items()):
        last = max((s for s, c in enumerate(counts) if c), default=-1)
        for step in range(last if total_steps is None else total_steps):
            pushed = (step + 1) % n_push == 0 or step == (total_steps or 0) - 1
            if pushed and (step >= len(counts) or counts[step] == 0):
                lost.setdefault(rule.key(int(rank), step), (int(rank), step))
    return lost


def updates_lost_in(applied: dict, cfg: TrainConfig, total_steps: int | None = None) -> int:
    return len(lost_updates(applied, cfg, total_steps))


def updates_lost_by_recovery(
    applied: dict, cfg: TrainConfig, takeovers: list, total_steps: int | None = None
) -> list[int]:
    """Per server recovery of one shard (``takeovers``: each rebuilt state's [[rank, next step],
    ...], in the order they happened): the lost updates it caused. A hole at (rank, step) is the
    doing of the last rebuilt state that lacked the step (its clock for the rank at most the
    step): the step was acknowledged by the primary before it and never reached its log."""
    counts = [0] * len(takeovers)
    clocks = [dict((int(r), int(c)) for r, c in t) for t in takeovers]
    for rank, step in lost_updates(applied, cfg, total_steps).values():
        lacking = [i for i, c in enumerate(clocks) if c.get(rank, 0) <= step]
        if lacking:
            counts[lacking[-1]] += 1
    return counts


def with_updates_lost(
    events: list[dict], applied: list[dict], cfg: TrainConfig, total_steps: int | None = None
) -> list[dict]:
    """The recovery events, each server recovery with the updates it lost (``updates_lost``)."""
    for shard, shard_applied in enumerate(applied):
        mine = [
            e
            for e in events
            if e.get("role") == "server"
            and e.get("index") == shard
            and e.get("source") == "replica"
        ]
        lost = updates_lost_by_recovery(
            shard_applied, cfg, [e.get("takeover_clocks") or [] for e in mine], total_steps
        )
        for e, n in zip(mine, lost):
            e["updates_lost"] = n
    return events


def final_loss(statuses: list) -> float:
    """The mean of the ranks' last training losses, over the ranks that trained a step since they
    last started: a rank killed at the last step and restarted there trains none, and has no loss
    (NaN: a run that diverged). NaN where no rank trained."""
    trained = [s.last_loss for s in statuses if s.samples]
    return float(np.mean(trained)) if trained else math.nan


def cpu_per_step(workers: list, servers: list, supervisor_cpu_s: float) -> dict[str, float]:
    """CPU seconds per step of one process of each role, from the workers' statuses, the shards'
    stats and the supervisor's CPU (see ``TrainResult.cpu_per_step``)."""
    steps = max(1, max((w.step for w in workers), default=0))
    compute = [w.compute_cpu_s for w in workers]
    # ranks sharing a process (ranks_per_process) report its CPU each: count it once, less the
    # compute of all its ranks
    processes: dict[str, list] = {}
    for w in workers:
        processes.setdefault(w.process or f"rank {w.rank}", []).append(w)
    other = [
        max(0.0, max(w.cpu_s for w in ranks) - sum(w.compute_cpu_s for w in ranks))
        for ranks in processes.values()
    ]
    return {
        "worker_compute_s": round(sum(compute) / max(1, len(workers)) / steps, 6),
        "worker_other_s": round(sum(other) / max(1, len(processes)) / steps, 6),
        "server_s": round(sum(s.cpu_s for s in servers) / max(1, len(servers)) / steps, 6),
        "supervisor_s": round(supervisor_cpu_s / steps, 6),
    }


def total_local_steps(config: TrainConfig, num_train: int) -> int:
    """Batches each worker trains on: ``steps``, or ``epochs`` passes over its partition."""
    if config.cluster.simulate_compute_ms and config.steps is not None:
        return config.steps  # simulated steps read no data: any number of workers fits
    spe = checked_steps_per_epoch(num_train, config.cluster.num_workers, config.data.batch_size)
    return config.steps if config.steps is not None else config.epochs * spe


def described_config(cfg: TrainConfig, parts: dict) -> dict:
    """The run's config as the summary records it: what the Python API's ``model=``, ``loss=``,
    ``train_data=`` and ``eval_data=`` gave stands where the config's own model, loss and dataset
    would (they were not used)."""
    d = cfg.to_dict()
    for section, key, part in (
        ("model", "name", "model"),
        ("model", "loss", "loss"),
        ("data", "dataset", "train_data"),
    ):
        if parts.get(part) is not None:
            d[section][key] = f"{part}={described(parts[part])}"
    if parts.get("eval_data") is not None:
        d["data"]["eval_data"] = f"eval_data={described(parts['eval_data'])}"
    if parts.get("train_data") is not None:  # the config's split does not apply to them
        d["data"].pop("eval_fraction", None)
    return d


def described(obj) -> str:
    """``obj`` in a few words: a function or class by its import path, a dataset by its type and
    length, a loss by its name."""
    import functools

    if isinstance(obj, str):
        return obj
    target = obj.func if isinstance(obj, functools.partial) else obj
    name = getattr(target, "__qualname__", None)
    if name is not None and callable(target):
        return f"{getattr(target, '__module__', '?')}:{name}"
    try:
        size = f", {len(obj)} samples"
    except Exception:  # noqa: BLE001 -- a dataset without a length (a Ray Dataset counts lazily)
        size = ""
    return f"{type(obj).__name__}{size}"


def step_unit(mode: str) -> str:
    """What a run's steps count, for its output: rounds in local_sgd, else steps."""
    return "round" if mode == "local_sgd" else "step"


def total_steps_for(config: TrainConfig, num_train: int) -> int:
    """Steps of the run as the shards count them: one per batch, or per round in local_sgd."""
    total = total_local_steps(config, num_train)
    if config.mode == "local_sgd":
        return local_rounds(total, config.consistency.local_steps)
    return total


def build_initial_model(config: TrainConfig, in_shape: tuple, num_classes: int) -> torch.nn.Module:
    """The model every copy starts from: built right after seeding, so the driver, the supervisor
    and every worker get the same values."""
    torch.manual_seed(config.seed)
    return build_model(config.model, in_shape, num_classes)


def initial_model(config: TrainConfig, data: Dataset) -> torch.nn.Module:
    return build_initial_model(config, data.in_shape, data.num_classes)


def steady_throughput(
    step_end_times: list[list[tuple[int, float]]], batch_size: int, warmup_steps: int
) -> float:
    """Samples/s of all workers together, from the end of their ``warmup_steps``-th step to their
    last step."""
    usable = [[t for _, t in times] for times in step_end_times if len(times) > warmup_steps + 1]
    if not usable:
        return 0.0
    start = min(t[warmup_steps] for t in usable)
    end = max(t[-1] for t in usable)
    samples = sum((len(t) - 1 - warmup_steps) * batch_size for t in usable)
    return samples / (end - start) if end > start else 0.0


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512
) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` on ``x`` [N, C, H, W] / ``y`` [N]."""
    model.eval()
    correct, loss_sum = 0, 0.0
    for i in range(0, len(y), batch_size):
        logits = model(x[i : i + batch_size])
        loss_sum += float(
            torch.nn.functional.cross_entropy(logits, y[i : i + batch_size], reduction="sum")
        )
        correct += int((logits.argmax(1) == y[i : i + batch_size]).sum())
    return correct / len(y), loss_sum / len(y)


LOCAL_NODE_SYSTEM_CONFIG = {
    "health_check_period_ms": 500,
    "health_check_failure_threshold": 3,
    "health_check_timeout_ms": 500,
}
"""Simulated nodes: notice a removed node in ~2 s instead of Ray's default ~15 s."""


@dataclass
class Session:
    """The Ray the run uses; ``cluster``/``worker_nodes`` are set for simulated nodes
    (``--local-nodes``)."""

    cluster: Any = None
    worker_nodes: list = field(default_factory=list)
    embedded: bool = False
    """Ray was started here for this run (no autoscaler can add nodes to it)."""
    outlives_run: bool = False
    """Ray was up before the run (the driver started or joined it) and stays up after it: the
    run's server processes may be kept warm for the next (``cluster.keep_warm_s``)."""


@contextlib.contextmanager
def ray_session(config: TrainConfig):
    """Join the running Ray (tests, jobs), connect to ``cluster.address``, or start an embedded
    local Ray (``cluster.local_nodes`` simulated nodes). Only a Ray instance started here is shut
    down here."""
    import ray

    from raytrain_ft.config import check_writable_dir
    from raytrain_ft.jobs import check_auth_mode, ray_init_error, signal_handlers_kept

    cc = config.cluster
    # a run's own files are written on this machine unless it joins a cluster elsewhere: check them
    # before Ray starts
    if config.recovery.checkpoint_dir and not named_ray_address(config):
        check_writable_dir(
            config.recovery.checkpoint_dir, "recovery.checkpoint_dir", "--checkpoint-dir"
        )
    if ray.is_initialized():
        yield Session(outlives_run=True)
        return
    check_auth_mode()  # the Python API too: the CLI checks it for every command that reaches a Ray
    needed = cc.num_workers * cc.cpus_per_worker
    # an embedded Ray keeps Ray's default, token authentication (a token is generated once if none
    # exists); the line Ray prints about that default on every start is not the run's output (the
    # README says it)
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.ERROR
    )
    if cc.local_nodes > 1:
        from ray.cluster_utils import Cluster

        check_embedded_memory(config, available_memory())

        try:
            cluster = Cluster(
                initialize_head=True,
                head_node_args={
                    "num_cpus": needed,
                    "_system_config": LOCAL_NODE_SYSTEM_CONFIG,
                    "include_dashboard": False,  # nothing here reads it; its start costs CPU
                },
            )
            nodes = [cluster.add_node(num_cpus=needed) for _ in range(cc.local_nodes - 1)]
            cluster.wait_for_nodes()
            with signal_handlers_kept():
                ray.init(
                    address=cluster.address,
                    logging_level=logging.WARNING,
                    runtime_env=local_runtime_env(),
                )
        except (ConnectionError, ValueError, RuntimeError, OSError) as e:
            raise ClusterError(
                f"could not start {cc.local_nodes} simulated nodes: {e}; if the path is too long, "
                "set RAY_TMPDIR to a short directory such as /tmp/ray"
            ) from e
        try:
            yield Session(cluster, nodes, embedded=True)
        finally:
            shutdown_ray()
            cluster.shutdown()
        return
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
    # a Ray job's driver finds its cluster in RAY_ADDRESS (set by the job supervisor)
    address = named_ray_address(config)
    if address:
        address = check_reachable(
            address, field="cluster.address" if cc.address else RAY_ADDRESS_ENV_VAR
        )
        kwargs["address"] = address
    else:
        if cc.use_gpu == "true":  # no autoscaler adds GPUs to a Ray started here: say so before it
            check_gpus(cc.num_workers, local_gpus(), started_here=True)
        check_embedded_memory(config, available_memory())
        kwargs.update(
            num_cpus=max(os.cpu_count() or 1, needed),
            include_dashboard=False,
            runtime_env=local_runtime_env(),
        )
    try:
        with signal_handlers_kept():
            ray.init(**kwargs)
    except Exception as e:  # one line naming what to fix, not Ray's traceback
        if address:
            raise ray_init_error(
                e,
                address,
                f"--address or {RAY_ADDRESS_ENV_VAR} (or leave both empty for a local run)",
            ) from None
        raise ClusterError(
            f"could not start a local Ray: {e}; if the path is too long, set RAY_TMPDIR to a short "
            "directory such as /tmp/ray"
        ) from e
    try:
        yield Session(embedded=not address)
    finally:
        shutdown_ray()


RAY_DEATH_LINE = "A worker died or was killed while executing a task by an unexpected system error"
"""How Ray's driver starts the line it prints (from the raylet) for each worker process that died
on a signal: it names an OOM kill or ``ray stop --force`` as likely causes."""
RAYLET_ENDED_LINE = "Raylet is terminated"
"""How the raylet's message starts when a node's raylet ended (a node lost, ``--kill node:I``): a
list of possible causes and the last lines of its log; the run reports the roles it rebuilt."""
SUPERVISOR_RETRY_LINE = ("Task Supervisor.", "so the task will be retried")
"""How Ray's line starts, and what it says, for a call to the supervisor that met it dead and is
sent again to its next incarnation (the supervisor's calls are retried without limit): the run
reports the supervisor's restart in its own line."""
ABSL_MUTEX_TRACE = "] RAW: "
"""What marks abseil's mutex tracing (``[mutex.cc : 452] RAW: Lock blocking 0x55f4... @ ...``),
which a Ray worker process that loaded two copies of abseil sometimes prints at its start: lines
of addresses that say nothing to the run's reader."""


def survived_death(line: str) -> bool:
    """A raylet's line about a process of the run that died, which the run reports itself: Ray's
    line for a dead worker process, or a call to the supervisor retried after its death."""
    head, retried = SUPERVISOR_RETRY_LINE
    return line.startswith(RAY_DEATH_LINE) or (line.startswith(head) and retried in line)


NODE_LOST = re.compile(
    r"The node with node id: (?P<id>\w+) and address: (?P<address>\S+)(?: and node name: "
    r"\S+)? has been marked dead because the detector has missed too many heartbeats"
)
"""Ray's message (from the GCS, through the raylet) for a node it stopped hearing from: a list of
possible causes follows, the second on a line of its own (``NODE_LOST_CAUSES``)."""
NODE_LOST_CAUSES = "\t(2) raylet has lagging heartbeats"


def raylet_lines(lines: list) -> list:
    """The raylet's lines of a batch as the run reports them: none when a node's raylet ended
    (``RAYLET_ENDED_LINE``: its causes and 20 lines of its log), a node Ray stopped hearing from
    in one line of the run's, without Ray's list of causes; no line for a death the run reports
    itself (``survived_death``)."""
    if any(str(x).startswith(RAYLET_ENDED_LINE) for x in lines):
        return []
    out = []
    for x in lines:
        text = str(x)
        lost = NODE_LOST.match(text)
        if lost:
            out.append(
                f"node {lost['address']} ({lost['id'][:12]}) is lost: Ray stopped hearing from "
                "it; the run replaces the servers and workers it hosted"
            )
        elif not (survived_death(text) or text.startswith(NODE_LOST_CAUSES)):
            out.append(x)
    return out


def ray_noise(line) -> bool:
    """A line from Ray's processes the run does not pass on (``ray_lines_as_the_run_reports``)."""
    text = str(line)
    return text.startswith("[mutex.cc : ") and ABSL_MUTEX_TRACE in text


@contextlib.contextmanager
def ray_lines_as_the_run_reports(until_shutdown: bool = False):
    """While a run trains, Ray's lines from its processes as this run reports them:

    - drop Ray's line for each of the run's processes that died, and for each call to the
      supervisor Ray sent again to its next incarnation: the run reports every death it
      survived in a line of its own (``recovered: ...``, the summary's ``recoveries``), and a death
      it cannot survive fails it naming the actor, where Ray's line suggested an OOM kill on every
      kill of ``--kill``; likewise the raylet's message, and the 20 lines of its log it quotes,
      when a node's raylet ended (``--kill node:I``);
    - drop abseil's mutex tracing some Ray worker processes print (``ray_noise``);
    - no colour codes around a line's ``(Supervisor pid=...)`` prefix where the stream goes to a
      file or a pipe (a job's log, ``2> run.log``), unless ``RAY_COLOR_PREFIX`` says otherwise.

    Other lines pass; the driver prints them as before once the run ends. Ray prints through two
    paths, both changed here: its error listener looks its printer up as a module function at each
    message, and its log thread calls the handler ``ray.init`` registered with the stdstream
    dispatcher (the processes' own lines); the printer reads ``RAY_COLOR_PREFIX`` at each line.
    ``until_shutdown`` (a Ray the run started and shuts down): the dispatcher keeps the changed
    handler, which ``ray.shutdown`` removes, for the lines that come late (a restarted actor's
    line can come a second after the run's end)."""

    import ray._private.worker as ray_worker
    from ray._private import ray_logging

    printer = getattr(ray_worker, "print_to_stdstream", None)
    dispatcher = getattr(ray_logging, "global_worker_stdstream_dispatcher", None)
    if printer is None:  # another Ray: nothing to change
        yield
        return

    def reported_through(downstream):
        def as_reported(data, *args, **kwargs):
            lines = list(data.get("lines", ()))
            if data.get("pid") == "raylet":
                lines = raylet_lines(lines)
            lines = [x for x in lines if not ray_noise(x)]
            if not lines:
                return None
            data = {**data, "lines": lines}
            sink = sys.stderr if data.get("is_err") else sys.stdout
            with plain_unless_a_terminal(sink):
                return downstream(data, *args, **kwargs)

        return as_reported

    ours = reported_through(printer)
    ray_worker.print_to_stdstream = ours
    handlers = None
    if dispatcher is not None:
        with dispatcher._lock:
            handlers = list(dispatcher.handlers)
            dispatcher.handlers = [
                (name, reported_through(h) if name == "ray_print_logs" else h)
                for name, h in handlers
            ]
    try:
        yield
    finally:
        if ray_worker.print_to_stdstream is ours:
            ray_worker.print_to_stdstream = printer
        if handlers is not None and not until_shutdown:
            with dispatcher._lock:
                dispatcher.handlers = handlers


_COLOUR = threading.Lock()
"""Ray prints from two threads (its error listener, its log thread) and at ``ray.shutdown``."""


@contextlib.contextmanager
def plain_unless_a_terminal(sink):
    """Ray's printer without colour codes around a line's prefix while it prints to ``sink``,
    unless ``sink`` is a terminal or the user set ``RAY_COLOR_PREFIX`` (Ray reads it at each
    line)."""
    if "RAY_COLOR_PREFIX" in os.environ or is_a_terminal(sink):
        yield
        return
    with _COLOUR:
        os.environ["RAY_COLOR_PREFIX"] = "0"
        try:
            yield
        finally:
            os.environ.pop("RAY_COLOR_PREFIX", None)


def shutdown_ray() -> None:
    """``ray.shutdown()``, printing the lines Ray's deduplicator still holds as the run's other
    lines are printed: ``ray.shutdown`` flushes them through Ray's ``print_worker_logs``, not
    through the printers ``ray_lines_as_the_run_reports`` changed (a repeated line held back
    during the run kept its colour codes in a file)."""
    import ray
    import ray._private.worker as ray_worker

    printer = getattr(ray_worker, "print_worker_logs", None)
    if printer is None:  # another Ray
        ray.shutdown()
        return

    def plain(data, print_file, *args, **kwargs):
        with plain_unless_a_terminal(print_file):
            return printer(data, print_file, *args, **kwargs)

    ray_worker.print_worker_logs = plain
    try:
        ray.shutdown()
    finally:
        if ray_worker.print_worker_logs is plain:
            ray_worker.print_worker_logs = printer


def named_ray_address(config: TrainConfig) -> str:
    """The Ray the run is told to join: ``cluster.address``, else a job driver's
    ``RAY_ADDRESS``; "" when none is named."""
    return config.cluster.address or os.environ.get(RAY_ADDRESS_ENV_VAR, "")


def warn_if_short_of_cpus(
    config: TrainConfig, have: float, started_here: bool = False
) -> str | None:
    """A Ray the run did not start (the Python API's ``ray.init()``, an ``--address``) may lack the
    CPUs its workers ask for: say so at once (an autoscaler may still add them; else the start
    times out). A Ray this process started itself (``ray.init()`` without an address) gets no
    nodes from an autoscaler: refused at once. Returns the warning given."""
    from raytrain_ft.actors.supervisor import actor_start_timeout_s

    cc = config.cluster
    needed = cc.num_workers * cc.cpus_per_worker
    if have >= needed:
        return None
    if started_here:
        raise ClusterError(
            f"the run's {cc.num_workers} workers ask for {needed:g} CPUs and the Ray this process "
            f"started (ray.init()) has {have:g}, and no autoscaler adds nodes to it; lower "
            f"--num-workers or --cpus-per-worker, or start it with ray.init(num_cpus={needed:g})"
        )
    warning = (
        f"raytrain-ft: warning: the run's {cc.num_workers} workers ask for {needed:g} CPUs and "
        f"this Ray has {have:g}: they wait for an autoscaler to add nodes, and the run fails if "
        f"none starts within {actor_start_timeout_s():g} s; use fewer --num-workers or "
        "--cpus-per-worker, or ray.init(num_cpus=...)"
    )
    print(warning, file=sys.stderr, flush=True)
    return warning


def ray_started_here() -> bool:
    """Whether this process started the Ray it is connected to (``ray.init()`` without an address:
    it runs the head node) rather than joining one."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    return bool(getattr(node, "head", False))


def starts_its_own_ray(config: TrainConfig) -> bool:
    """Whether ``ray_session`` starts a Ray on this machine for the run (no Ray joined or named)."""
    import ray

    return not (ray.is_initialized() or named_ray_address(config))


PROCESS_GB = 0.3
"""Memory of one of the run's processes (a worker, server, spare or the supervisor: Python, Ray's
worker and torch), measured on this project's CPU runs."""
NODE_GB = 0.3
"""Memory of one simulated node's Ray daemons (raylet, agents; the head's GCS)."""


def embedded_processes(config: TrainConfig) -> dict[str, int]:
    """The processes a run starts, by role (servers: the fewest ``auto`` can choose)."""
    cc, rc = config.cluster, config.recovery
    servers = 1 if cc.num_servers == "auto" else cc.num_servers
    return {
        "worker": -(-cc.num_workers // cc.ranks_per_process),
        "server": servers,
        "spare": rc.num_spares if rc.mode != "none" else 0,
        "supervisor": 1,
    }


def check_embedded_memory(config: TrainConfig, available_gb: float | None) -> None:
    """A Ray started on this machine for the run must fit in its memory: the run's processes and
    the simulated nodes, at their measured size (``PROCESS_GB``, ``NODE_GB``). Without the check a
    run of thousands of workers or servers starts processes until the machine runs out."""
    if available_gb is None:
        return
    procs = embedded_processes(config)
    nodes = config.cluster.local_nodes

    def need_gb(p: dict[str, int], k: int) -> float:
        return sum(p.values()) * PROCESS_GB + k * NODE_GB

    need = need_gb(procs, nodes)
    if need <= available_gb:
        return
    counts = ", ".join(f"{n} {role}{'s' if n != 1 else ''}" for role, n in procs.items() if n)
    biggest = max(
        (procs["worker"] * PROCESS_GB, "cluster.num_workers"),
        (procs["server"] * PROCESS_GB, "cluster.num_servers"),
        (nodes * NODE_GB, "cluster.local_nodes"),
    )
    field = biggest[1]
    # the most of the named setting that fits with everything else as it is (judged as above)
    role = {"cluster.num_workers": "worker", "cluster.num_servers": "server"}.get(field)

    def fits(n: int) -> bool:
        return need_gb(*(({**procs, role: n}, nodes) if role else (procs, n))) <= available_gb

    per_gb = NODE_GB if role is None else PROCESS_GB
    room = max(0, int((available_gb - (need - biggest[0])) // per_gb) + 1)
    while room > 0 and not fits(room):
        room -= 1
    if field == "cluster.num_workers":
        room *= config.cluster.ranks_per_process
    fits = (
        f"at most {room} {flag_of(field)} fit with the rest as it is"
        if room >= 1
        else "the rest alone does not fit"
    )
    raise ConfigError(
        field,
        f"a Ray started on this machine for this run needs about {need:.0f} GB ({counts} of about "
        f"{PROCESS_GB} GB each, {nodes} simulated node{'s' if nodes != 1 else ''} of about "
        f"{NODE_GB} GB) and {available_gb:.1f} GB is available ({fits}); use fewer "
        "--num-workers, --num-servers or --local-nodes, host ranks together "
        "(--ranks-per-process), or run on a cluster (--address)",
    )


def available_memory() -> float | None:
    """GB of memory this machine can give new processes (Linux's MemAvailable; None elsewhere)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        return None
    return None


def local_gpus() -> float:
    """The GPUs a Ray started on this machine would find (Ray's own count: CUDA_VISIBLE_DEVICES
    honoured)."""
    try:
        from ray._private.accelerators import get_accelerator_manager_for_resource

        return float(
            get_accelerator_manager_for_resource("GPU").get_current_node_num_accelerators()
        )
    except Exception:  # Ray moved its helper: ask torch instead
        import torch

        return float(torch.cuda.device_count())


def check_gpus(num_workers: int, have: float, started_here: bool) -> None:
    """use_gpu=true: a Ray started here (the run's own, or the driver's ``ray.init()`` without an
    address) cannot get more GPUs (one line, exit 2); a cluster may (an autoscaler adds GPU nodes
    for the waiting workers), so it is told and waited for."""
    if have >= num_workers:
        return
    if started_here:
        raise ClusterError(
            f"cluster.use_gpu=true asks for {num_workers} GPUs, this machine has {have:g}; "
            "set --use-gpu auto or false, or run on a cluster with GPU nodes (--address); no "
            "autoscaler adds GPUs to a Ray started here"
        )
    logger.warning(
        "cluster.use_gpu=true: the workers ask for %d GPUs, the cluster has %g now; waiting for "
        "more (an autoscaler adds GPU nodes; otherwise the start times out)",
        num_workers,
        have,
    )


def local_runtime_env() -> dict:
    """A Ray started here runs its workers with the working directory importable, as the driver has
    it: a ``--model mymodule:build`` found here is found by the workers too."""
    path = os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH", "")) if p)
    return {"env_vars": {"PYTHONPATH": path}}


def check_checkpoint_interval(cfg: TrainConfig, total_steps: int) -> None:
    """A checkpoint interval given that is no shorter than the run writes no checkpoint but step
    0's: a restore (or a resume) would start the run again."""
    rc = cfg.recovery
    writes = rc.mode == "checkpoint" or rc.checkpoint_dir is not None
    if (
        writes
        and rc.checkpoint_interval >= total_steps
        and is_set(rc, "recovery", "checkpoint_interval")
    ):
        raise ConfigError(
            "recovery.checkpoint_interval",
            f"{rc.checkpoint_interval} steps between checkpoints, and the run has {total_steps}: "
            "no checkpoint but step 0's would be written; give --checkpoint-interval below "
            f"{total_steps}",
        )


def check_resumable(directory: str, ranges, optimizer: str | None = None) -> int:
    """The step a run resumes at from ``directory``; DataError when it holds no usable complete
    checkpoint."""
    from raytrain_ft.errors import DataError
    from raytrain_ft.recovery.checkpoint import (
        latest_common_step,
        load_shard_checkpoint,
        shard_checkpoint_path,
        shards_by_step,
    )

    if not os.path.exists(directory):
        raise DataError(
            directory,
            "does not exist; --resume-from takes the --checkpoint-dir of the run to resume",
        )
    if not os.path.isdir(directory):
        raise DataError(
            directory,
            "is not a directory; --resume-from takes the --checkpoint-dir of the run to resume",
        )
    step = latest_common_step(directory, len(ranges))
    if step is None:
        written = shards_by_step(directory)
        newest = max(written, default=None)
        if newest is not None and len(written[newest]) != len(ranges):
            raise ConfigError(
                "cluster.num_servers",
                f"the checkpoints in {directory} were written by {len(written[newest])} shards "
                f"(step {newest}, the newest), this run has {len(ranges)}; resume with "
                f"--num-servers {len(written[newest])}",
            )
        raise DataError(
            directory,
            f"no step has a checkpoint file for each of the {len(ranges)} shards; check "
            "--resume-from and --num-servers",
        )
    for r in ranges:
        path = shard_checkpoint_path(directory, r.index, step)
        try:
            params, _, opt_state, *_ = load_shard_checkpoint(path)
        except Exception as e:  # noqa: BLE001 -- torch raises several types for a damaged file
            raise DataError(
                path,
                f"is not a readable checkpoint ({type(e).__name__}); delete it to resume from an "
                "earlier step",
            ) from None
        written_by = opt_state.get("name") if isinstance(opt_state, dict) else None
        if optimizer is not None and written_by is not None and written_by != optimizer:
            raise ConfigError(
                "optim.name",
                f"the checkpoints in {directory} hold {written_by}'s state (step {step}); resume "
                f"with --optimizer {written_by} (its state would not fit {optimizer}'s), or train "
                "a new run",
            )
        if params.size != r.size:
            raise DataError(
                directory,
                f"shard {r.index} holds {params.size} values, this run's shard has {r.size}: "
                "the checkpoint was written for another model or --num-servers",
            )
    return step


def check_reachable(address: str, timeout_s: float = 5.0, field: str = "cluster.address") -> str:
    """The address to give ``ray.init`` (``auto`` resolved, refusing several local instances), after
    failing fast -- instead of Ray's minutes of retries and warnings -- when ``host:port`` accepts
    no TCP connection, is not Ray (the dashboard's HTTP port, a silent port) or refuses our token
    (``raytrain_ft.jobs.check_ray_address``)."""
    from raytrain_ft.jobs import check_ray_address

    return check_ray_address(address, field, timeout_s)


def _too_large(error: Exception) -> ConfigError:
    first = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    return ConfigError(
        "data",
        f"the data or the model does not fit in this machine's memory ({first[:160]}); use a "
        "smaller --image-size, --synthetic-samples, --synthetic-channels or model",
    )


class Trainer:
    """Train ``config``'s model on a Ray cluster. The built-in model, loss and data come from the
    config's names; the Python API may pass its own:

    - ``model``: a zero-argument callable returning an ``nn.Module`` (called on every process after
    seeding);
    - ``loss``: a callable ``(output, target) -> scalar tensor`` (default: the config's,
    cross_entropy);
    - ``train_data`` / ``eval_data``: map-style torch Datasets of ``(x, y)`` (x a tensor or a dict
    of tensors);
    - ``metrics``: a callable ``(output, target) -> dict[str, float]`` evaluated on ``eval_data``.
    """

    def __init__(
        self,
        config: TrainConfig,
        on_progress: Callable[[Progress], None] | None = None,
        *,
        model=None,
        loss=None,
        train_data=None,
        eval_data=None,
        metrics=None,
    ):
        check_again(config)  # fields changed since it was built were never checked
        self.config = config
        self.on_progress = on_progress
        self.parts = dict(
            model=model, loss=loss, train_data=train_data, eval_data=eval_data, metrics=metrics
        )

    def _prepare(self, kills) -> tuple:
        """The task (checked by ``Task.check``: a model with nothing to train is refused there), the
        eval set, the model, the shards (None while ``--num-servers auto`` has not chosen), the
        run's length and the step it starts at."""
        from raytrain_ft.task import Task

        cfg = self.config
        try:
            task, _, eval_data = Task.build(cfg, **self.parts)
            model = task.build_model(cfg.seed)
        except MemoryError as e:  # numpy's allocation failure is one
            raise _too_large(e) from None
        except RuntimeError as e:
            if "can't allocate memory" not in str(e) and "not enough memory" not in str(e):
                raise
            raise _too_large(e) from None
        total_steps = total_steps_for(cfg, task.num_train)
        check_steps(kills, total_steps)
        check_schedule(cfg.optim, total_steps)
        check_checkpoint_interval(cfg, total_steps)
        n = cfg.cluster.num_servers
        if starts_its_own_ray(cfg):  # before the shard count is judged against the model's size
            check_embedded_memory(cfg, available_memory())
        ranges = None if n == "auto" else self._shards(model, n)
        start_step = (
            check_resumable(cfg.recovery.resume_from, ranges, cfg.optim.name)
            if cfg.recovery.resume_from
            else 0
        )
        if start_step >= total_steps:
            raise ConfigError(
                "recovery.resume_from",
                f"the checkpoints there are at step {start_step} and this run has {total_steps} "
                "steps: nothing is left to train; train longer (--steps / --epochs) or resume from "
                "an earlier checkpoint",
            )
        return task, eval_data, model, ranges, total_steps, start_step

    @staticmethod
    def _shards(model, num_servers: int) -> list:
        return shard_ranges(flatten_state(model).numel(), num_servers, num_trainable(model))

    def _plan_servers(self, model, total_steps: int) -> ServerPlan:
        """``--num-servers auto``: measure and choose (the kills were checked against auto: only
        shard 0, which every count has)."""
        from raytrain_ft.actors.probe import measure_exchange_costs

        cfg = self.config
        num_values = flatten_state(model).numel()
        return choose_num_servers(
            num_values=num_values,
            num_workers=cfg.cluster.num_workers,
            costs=measure_exchange_costs(cfg, num_values, total_steps),
            replicated=cfg.recovery.mode == "replica",
            replica_on_path=cfg.recovery.mode == "replica" and not cfg.pipelined,
        )

    def fit(self) -> TrainResult:
        cfg = self.config
        wall_start = time.time()
        from raytrain_ft.task import (
            dataset_factory,
            evaluate,
            is_import_string,
            loss_function,
            loss_spec,
            model_builder,
        )

        kills = check_kills_of(cfg)
        server_plan = None
        prepared = None
        from raytrain_ft.data import is_ray_dataset

        if is_import_string(cfg.data.dataset) or any(
            is_ray_dataset(self.parts[k]) for k in ("train_data", "eval_data")
        ):
            # Ray Data needs CPUs to read and split: none held by resting warm workers
            from raytrain_ft.actors.warm import end_resting

            end_resting("worker-")
        if self.parts["train_data"] is None and is_import_string(cfg.data.dataset):
            # the factory may make Ray Datasets, which need Ray: it runs in the run's session
            # (a typo in the import string, and what the model and loss settings name, still fail
            # before Ray starts)
            dataset_factory(cfg.data.dataset)
            model_builder(cfg, self.parts["model"])
            loss_function(*loss_spec(cfg, self.parts["loss"]))
        else:
            if self.parts["train_data"] is None:
                check_source(cfg.data)
            prepared = self._prepare(kills)
        with ray_session(cfg) as session, ray_lines_as_the_run_reports(session.embedded):
            if prepared is None:
                prepared = self._prepare(kills)
            task, eval_data, model, ranges, total_steps, start_step = prepared
            if ranges is None:
                server_plan = self._plan_servers(model, total_steps)
                # this run's config says the count chosen (the Trainer's keeps auto)
                cfg = dataclasses.replace(
                    cfg, cluster=dataclasses.replace(cfg.cluster, num_servers=server_plan.chosen)
                )
                ranges = self._shards(model, server_plan.chosen)
            if start_step:
                logger.info(
                    "resuming from the checkpoints of step %d in %s: steps %d to %d left",
                    start_step,
                    cfg.recovery.resume_from,
                    start_step + 1,
                    total_steps,
                )
            run = _Run(
                cfg,
                ranges,
                total_steps,
                task.placed(cfg.cluster.num_workers),
                kills,
                session,
                start_step,
            )
            if cfg.eval_every_s:

                def evaluate_now(flat: np.ndarray) -> dict:
                    load_flat_state(model, torch.from_numpy(np.array(flat, dtype=np.float32)))
                    return evaluate(task, model, eval_data)

                run.evaluate = evaluate_now
            try:
                run.start()
                statuses, train_time_s = run.wait(self.on_progress)
                end = run.final()
                kills_fired = run.kills_fired()
                run.ended_well = True
            finally:
                if not run.ended_well:
                    run.tell_kills_of_a_failed_run()
                run.shutdown()
        final, stats, step_times = end["params"], end["stats"], end["step_end_times"]
        final = np.require(final, requirements="W")  # an object-store view is read-only
        load_flat_state(model, torch.from_numpy(final.copy()))
        eval_error = None
        try:
            scores = evaluate(task, model, eval_data)
        except ConfigError as e:  # the user's eval set or metrics: the training result stands
            scores, eval_error = {}, str(e)
        acc, eval_loss = (
            scores.pop("eval_accuracy", float("nan")),
            scores.pop("eval_loss", float("nan")),
        )
        samples = sum(s.samples for s in statuses)
        # an update counts as acknowledged once any worker received the shard's reply for it
        acked = [max(s.acked_per_shard[i] for s in statuses) for i in range(len(ranges))]
        warmup = min(5, total_steps // 4)
        steady = steady_throughput(step_times, cfg.data.batch_size, warmup)
        never = never_fired([str(k) for k in kills], kills_fired)
        if never:  # e.g. @recovery=N with fewer recoveries, @time=S past the run's end
            warnings.warn(
                f"{len(never)} kill(s) never fired (the run ended first, nothing triggered them, "
                "no live actor played the role from when they came due, or on_progress held up "
                f"the driver that fires them): {', '.join(never)}",
                KillsNotFiredWarning,
                stacklevel=2,
            )
        trained_loss = final_loss(statuses)
        trained = any(s.samples for s in statuses) and not cfg.cluster.simulate_compute_ms
        if trained and not math.isfinite(trained_loss):
            warnings.warn(
                f"the training loss is {trained_loss} at the end of the run (it diverged, or "
                "the loss is not a number): the parameters are not finite either; lower "
                "optim.lr, or clip with optim.clip_grad_norm",
                DivergedWarning,
                stacklevel=2,
            )
        return TrainResult(
            steps_completed=min(s.step for s in statuses),
            total_steps=total_steps,
            samples_per_sec=samples / train_time_s if train_time_s > 0 else 0.0,
            steady_samples_per_sec=steady,
            warmup_steps_excluded=warmup,
            train_time_s=train_time_s,
            wall_time_s=time.time() - wall_start,
            final_loss=trained_loss,
            eval_accuracy=acc,
            eval_loss=eval_loss,
            params_sha256=params_sha256(torch.from_numpy(final)),
            updates_applied=sum(st.updates_applied for st in stats),
            updates_acknowledged=sum(acked),
            servers=[
                {
                    "shard": st.index,
                    "updates_applied": st.updates_applied,
                    "duplicate_pushes": st.duplicate_pushes,
                    "late_pushes": st.late_pushes,
                    "clock_lead_max": st.clock_lead_max,
                    "replica_wait_s": round(st.replica_wait_s, 4),
                    "replica_bytes_sent": st.replica_bytes_sent,
                    "replica_appends": st.replica_appends,
                    "snapshot_interval": st.snapshot_interval,
                    "snapshots_sent": st.snapshots_sent,
                    "cpu_s": round(st.cpu_s, 3),
                    "checkpoint_files_read": st.checkpoint_files_read,
                }
                for st in stats
            ],
            staleness_histogram=merge_histograms(st.staleness_histogram or {} for st in stats),
            bytes_pushed=sum(s.bytes_pushed for s in statuses),
            bytes_pulled=sum(s.bytes_pulled for s in statuses),
            clock_traces=[list(st.clock_trace) for st in stats],
            num_params=num_trainable(model),
            workers=[
                {
                    "rank": s.rank,
                    "steps": s.step,
                    "samples": s.samples,
                    "compute_s": round(s.compute_s, 3),
                    "wait_s": round(s.wait_s, 3),
                    "cpu_s": round(s.cpu_s, 3),
                    "compute_cpu_s": round(s.compute_cpu_s, 3),
                    "gpu_compute_s": (
                        round(s.gpu_compute_s, 3) if s.gpu_compute_s is not None else None
                    ),
                    "device": s.device,
                    "device_name": s.device_name,
                    "push_thread": s.push_thread,
                    "clipped_updates": s.clipped_updates,
                    "skipped_updates": s.skipped_updates,
                    "loss_scale": s.loss_scale,
                    "early_answers": s.early_answers,
                    "reroutes": s.reroutes,
                    "bytes_pushed": s.bytes_pushed,
                    "residual_bytes": s.residual_bytes,
                    "bytes_pulled": s.bytes_pulled,
                    "skipped_steps": s.skipped_steps,
                    "node_id": s.node_id,
                    "gpu_ids": list(s.gpu_ids),
                    "process": s.process,
                }
                for s in statuses
            ],
            devices=sorted({s.device for s in statuses}),
            config=described_config(cfg, self.parts),
            kills=kills_fired,
            replicas_match=end["replicas_match"],
            supervisor_imported_torch=end["supervisor_imported_torch"],
            supervisor_restarts=run.status.restarts,
            cpu_per_step=cpu_per_step(statuses, stats, run.status.cpu_s),
            server_plan=server_plan.to_dict() if server_plan else None,
            preaggregated=cfg.preaggregates,
            recoveries=with_updates_lost(list(run.status.events), end["applied"], cfg, total_steps),
            run_id=run.run_id,
            started_at=run.started_at,
            history=run.history,
            eval_history=run.eval_history,
            step_times=step_times,
            applied_counts=[
                {
                    str(rank): "".join(str(min(c, 9)) for c in counts)
                    for rank, counts in sorted(a.items())
                }
                for a in end["applied"]
            ],
            final_params=final,
            eval_metrics=scores,
            eval_error=eval_error,
            updates_lost=sum(updates_lost_in(a, cfg, total_steps) for a in end["applied"]),
            model=model,
        )


class _Run:
    """The actors of one training run, seen from the driver: the supervisor and, through it,
    everything else."""

    def __init__(
        self,
        cfg: TrainConfig,
        ranges,
        total_steps: int,
        task,
        kills: list[KillSpec],
        session: Session,
        start_step: int = 0,
    ):
        import uuid

        self.cfg, self.ranges, self.total_steps, self.task = cfg, ranges, total_steps, task
        self.kills, self.session, self.start_step = kills, session, start_step
        self.run_id = f"run-{uuid.uuid4().hex[:10]}"
        self.supervisor = None
        self.keeper = None
        """The run's ``RefKeeper`` where its task holds object refs (in-memory data)."""
        self.chaos = None
        self.status = None
        self.history: list[dict] = []
        self.eval_history: list[dict] = []
        self.evaluate = None
        """``eval_every_s``: flat parameters -> scores (set by the trainer)."""
        self.started_at = 0.0
        self.ended_well = False
        self._directory = None
        self._latest: dict[int, object] = {}
        """Per rank: the newest status seen (a rank's last one stays after it finished)."""

    def _use_gpu(self) -> bool:
        import ray

        mode = self.cfg.cluster.use_gpu
        if mode == "false":
            return False
        have = ray.cluster_resources().get("GPU", 0)
        if mode == "true":
            check_gpus(
                self.cfg.cluster.num_workers,
                have,
                self.session.embedded or ray_started_here(),
            )
            return True
        return have >= self.cfg.cluster.num_workers

    def _node_ids(self) -> list[str]:
        """Nodes for the server slots (``recovery.policy.server_nodes``); empty on a single node."""
        import ray

        from raytrain_ft.recovery.policy import server_nodes

        head = ray.get_runtime_context().get_node_id()
        cpus = {n["NodeID"]: n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]}
        return server_nodes(head, cpus, [n.node_id for n in self.session.worker_nodes])

    def start(self) -> None:
        import tempfile

        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from raytrain_ft.actors import NAMESPACE
        from raytrain_ft.actors.supervisor import Supervisor, SupervisorArgs
        from raytrain_ft.actors.transport import RefKeeper, Sealed
        from raytrain_ft.recovery.chaos import ChaosRunner

        cfg = self.cfg
        checkpoint_dir = cfg.recovery.checkpoint_dir
        if cfg.recovery.mode == "checkpoint":
            checkpoint_dir = cfg.recovery.checkpoint_dir or tempfile.mkdtemp(
                prefix="raytrain_ft_ckpt_"
            )
        nodes = self._node_ids()
        if not self.session.embedded:
            warn_if_short_of_cpus(
                cfg, ray.cluster_resources().get("CPU", 0), started_here=ray_started_here()
            )
        device = "cuda" if self._use_gpu() else "cpu"
        if self.session.outlives_run:
            from raytrain_ft.actors.warm import prune_stale, worker_kind

            # warm processes with code edited since, workers of another kind: not taken
            cc = cfg.cluster
            prune_stale(
                worker_kind(cc.cpus_per_worker, int(device != "cpu"))
                if cc.ranks_per_process == 1
                else None
            )
        options = dict(
            name=f"{self.run_id}/supervisor",
            namespace=NAMESPACE,
            num_cpus=0,
            max_restarts=SUPERVISOR_MAX_RESTARTS,
            max_task_retries=-1,
            max_concurrency=1000,
        )
        if nodes:  # the supervisor stays beside the driver (the head of a `ray up` cluster)
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
                ray.get_runtime_context().get_node_id(), soft=False
            )
        task = Sealed.of(self.task)
        keeper = None
        if task.refs:  # in-memory data: its refs kept apart from the supervisor's arguments
            keeper = f"{self.run_id}/data-refs"
            placement = {k: v for k, v in options.items() if k == "scheduling_strategy"}
            self.keeper = (
                ray.remote(RefKeeper)
                .options(  # a handle kept: it lives while held
                    name=keeper, namespace=NAMESPACE, num_cpus=0, max_restarts=0, **placement
                )
                .remote(list(task.refs))
            )
            task = dataclasses.replace(task, refs=())
        args = SupervisorArgs(
            self.run_id,
            cfg,
            tuple(self.ranges),
            self.total_steps,
            tuple(nodes),
            tuple(self.kills),
            device,
            checkpoint_dir,
            task,
            self.start_step,
            keeper,
        )
        self.supervisor = ray.remote(Supervisor).options(**options).remote(args)
        phase = ray.get(self.supervisor.start.remote())
        if phase == "failed":
            # a constructor that raised names a setting to fix; a step that failed is the run's
            # failure, however soon after the start it came
            status = ray.get(self.supervisor.status.remote())
            error = ClusterError if status.failed_starting else TrainingError
            raise error(status.failure or "the run's actors failed to start")
        self.chaos = ChaosRunner(
            self.kills,
            self.supervisor,
            self.session.cluster,
            self.session.worker_nodes,
            cfg.chaos.one_kill_at_a_time,
            run_id=self.run_id,
        )

    def _poll(self, pending):
        """The supervisor's status, or -- while it restarts -- the step the live workers report."""
        import ray

        ready, _ = ray.wait([pending], timeout=0.05 if self.chaos.waits_for_step else 0.5)
        if ready:
            self.status = ray.get(pending)
            self.chaos.targets = self.status.targets
            return None, self._merge(self.status.workers)
        return pending, self._merge(self._ask_workers())

    def _merge(self, statuses) -> list:
        """Each rank's latest status, where a restarted rank not started yet (at step 0 until the
        supervisor tells it where to resume) keeps the status of its last started incarnation:
        the run's progress does not fall to step 0 while a worker restarts."""
        for s in statuses:
            if s is not None and (s.started or s.rank not in self._latest):
                self._latest[s.rank] = s
        return list(self._latest.values())

    def _ask_workers(self, timeout_s: float = 0.5) -> list:
        """The live workers' statuses, asked directly (not the supervisor's last probe round)."""
        import ray

        from raytrain_ft.actors.transport import Directory
        from raytrain_ft.protocol.messages import PollStatus

        if self.chaos.targets is None:
            return []
        self._directory = self._directory or Directory(self.run_id)
        handles = [self._directory.handle(name) for name, _ in self.chaos.targets.workers if name]
        refs = [h.deliver.remote(PollStatus()) for h in handles if h is not None]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        statuses = []
        for ref in done:
            with contextlib.suppress(ray.exceptions.RayError):
                statuses.append(ray.get(ref))
        return statuses

    def _chaos_step(self, step: int) -> int:
        """The step a ``@step`` kill is judged at: while one is pending, the workers' own (the
        supervisor's view is a probe round old: a fast run moved on several steps since)."""
        if not self.chaos.waits_for_step:
            return step
        fresh = self._ask_workers(timeout_s=0.2)
        if len(fresh) < self.cfg.cluster.num_workers:
            return step
        return max(step, min(s.step for s in fresh))

    def _periodic_eval(self, ref, asked_at: float, step: int, now: float, t_start: float):
        """``eval_every_s``: ask the supervisor for the parameters every so often and, once they
        come, evaluate them (never blocks the loop; a moment without a primary in every slot is
        skipped)."""
        import ray

        if ref is None:
            if now - asked_at >= self.cfg.eval_every_s:
                return self.supervisor.params_now.remote(), now
            return None, asked_at
        ready, _ = ray.wait([ref], timeout=0)
        if not ready:
            return ref, asked_at
        try:
            got = ray.get(ref)
        except ray.exceptions.RayError:  # the supervisor restarting: ask again next time
            got = None
        if got is not None:
            flat, updates = got
            try:
                scores = self.evaluate(flat)
            except ConfigError:  # the eval set fails: training goes on, the end reports it
                self.evaluate = None
                return None, asked_at
            # the step of the parameters evaluated: in sync modes their shards' updates (the
            # progress step is a probe round old, several steps on a fast run); else the progress
            if self.cfg.rule().synchronous:
                step = updates
            row = {"t": round(now - t_start, 3), "step": step, "updates": updates}
            row.update({k: round(float(v), 5) for k, v in scores.items()})
            self.eval_history.append(row)
        return None, asked_at

    def wait(self, on_progress) -> tuple[list, float]:
        cfg = self.cfg
        t_start = self.started_at = time.time()
        last_progress = 0.0
        pending = None
        eval_ref, eval_asked = None, t_start
        while True:
            if pending is None:
                pending = self.supervisor.status.remote()
            pending, statuses = self._poll(pending)
            step = (
                min((s.step for s in statuses), default=0)
                if len(statuses) == cfg.cluster.num_workers
                else 0
            )
            status = self.status
            if status is not None and pending is None:
                if status.state == "failed":
                    raise TrainingError(status.failure or "the supervisor gave up")
                if status.state == "done":
                    final = self._progress(
                        statuses, min(s.step for s in statuses), time.time(), t_start
                    )
                    self.history.append(final.point())
                    if on_progress is not None:
                        on_progress(final)
                    started = min(s.started_at for s in statuses)
                    finished = max(s.finished_at for s in statuses)
                    return statuses, max(finished - started, finished - t_start)
            # (with the supervisor slow to answer, ``step`` already is the workers' own)
            judged = step if pending is not None else self._chaos_step(step)
            self.chaos.tick(judged, len(status.events) if status is not None else 0)
            now = time.time()
            if self.evaluate is not None:
                eval_ref, eval_asked = self._periodic_eval(eval_ref, eval_asked, step, now, t_start)
            if statuses and now - last_progress >= min(
                cfg.log_every_s, 0.2 if now - t_start < 2 else cfg.log_every_s
            ):
                last_progress = now
                progress = self._progress(statuses, step, now, t_start)
                self.history.append(progress.point())
                if on_progress is not None:
                    on_progress(progress)
            # poll faster while kills wait for their step
            time.sleep(0.02 if not self.chaos.done else min(cfg.log_every_s, 0.1))

    def _progress(self, statuses: list, step: int, now: float, t_start: float) -> Progress:
        samples = sum(s.samples for s in statuses)
        elapsed = now - min(s.started_at for s in statuses)
        trained = [s for s in statuses if s.samples]
        return Progress(
            step=step,
            total_steps=self.total_steps,
            loss=float(np.mean([s.last_loss for s in trained])) if trained else float("nan"),
            samples_per_sec=samples / elapsed if elapsed > 0 else 0.0,
            elapsed_s=now - t_start,
            accuracy=float(np.mean([s.last_accuracy for s in trained]))
            if trained
            else float("nan"),
            recoveries=tuple(self.status.events) if self.status is not None else (),
            unit=step_unit(self.cfg.mode),
        )

    def final(self) -> dict:
        import ray

        from raytrain_ft.actors.supervisor import read_final

        names = ray.get(self.supervisor.final.remote())
        return read_final(self.run_id, names, self.ranges, self.cfg.optim, self.total_steps)

    def kills_fired(self) -> list[dict]:
        from raytrain_ft.recovery.chaos import kills_recorded

        inside = kills_recorded(self.run_id)
        if self.chaos is None:
            return inside
        self.chaos.tell_inside(final=True, records=inside)
        return sorted(self.chaos.fired + inside, key=lambda k: k["at"])

    def tell_kills_of_a_failed_run(self) -> None:
        """Say the kills fired inside a run that failed, as a run that ended well does: the
        failure may be theirs. Nothing where Ray's KV does not answer (the failure's own message
        follows)."""
        if self.chaos is None:
            return
        try:
            self.chaos.tell_inside(final=True)
        except Exception:  # noqa: BLE001 -- the run's failure is the message that matters
            logger.debug("kills fired inside the failed run not told", exc_info=True)

    def shutdown(self) -> None:
        """End the run's actors; after a run that ended well, in a Ray that outlives it, its
        servers rest instead, kept warm for the next run (``actors/warm.py``): the supervisor goes
        first, so nothing of this run creates or asks anything after."""
        import ray

        from raytrain_ft.actors.group import kill_run_actors, run_actor_names
        from raytrain_ft.actors.warm import release_processes

        keep: set = set()
        keep_s = self.cfg.cluster.keep_warm_s
        if self.ended_well and self.session.outlives_run and keep_s > 0:
            with contextlib.suppress(Exception):
                ray.kill(self.supervisor, no_restart=True)
            with contextlib.suppress(Exception):
                keep = release_processes(self.run_id, list(run_actor_names(self.run_id)), keep_s)
        with contextlib.suppress(Exception):
            kill_run_actors(self.run_id, keep)
        if self.supervisor is not None:
            with contextlib.suppress(Exception):
                ray.kill(self.supervisor, no_restart=True)
