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
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from raytrain_ft.config import TrainConfig
from raytrain_ft.data import Dataset, check_source, checked_steps_per_epoch, load_dataset
from raytrain_ft.errors import ClusterError, TrainingError
from raytrain_ft.models import build_model
from raytrain_ft.params import flatten_state, load_flat_state, params_sha256, shard_ranges

logger = logging.getLogger(__name__)

ACTOR_START_TIMEOUT_ENV_VAR = "RAYTRAIN_FT_ACTOR_START_TIMEOUT_S"
DEFAULT_ACTOR_START_TIMEOUT_S = 180.0


@dataclass(frozen=True, slots=True)
class Progress:
    step: int
    total_steps: int
    loss: float
    samples_per_sec: float
    elapsed_s: float


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
    eval_loss: float
    params_sha256: str
    updates_applied: int
    updates_acknowledged: int
    num_params: int
    recoveries: list[dict[str, Any]] = field(default_factory=list)
    workers: list[dict[str, Any]] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    final_params: np.ndarray | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("final_params")
        return d


def total_steps_for(config: TrainConfig, num_train: int) -> int:
    spe = checked_steps_per_epoch(num_train, config.cluster.num_workers, config.data.batch_size)
    return config.steps if config.steps is not None else config.epochs * spe


def initial_model(config: TrainConfig, data: Dataset) -> torch.nn.Module:
    torch.manual_seed(config.seed)
    return build_model(config.model, data.in_shape, data.num_classes)


def steady_throughput(step_end_times: list[list[float]], batch_size: int, warmup_steps: int) -> float:
    """Samples/s of all workers together, from the end of step ``warmup_steps`` to the last step."""
    usable = [t for t in step_end_times if len(t) > warmup_steps + 1]
    if not usable:
        return 0.0
    start = min(t[warmup_steps] for t in usable)
    end = max(t[-1] for t in usable)
    samples = sum((len(t) - 1 - warmup_steps) * batch_size for t in usable)
    return samples / (end - start) if end > start else 0.0


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` on ``x`` [N, C, H, W] / ``y`` [N]."""
    model.eval()
    correct, loss_sum = 0, 0.0
    for i in range(0, len(y), batch_size):
        logits = model(x[i : i + batch_size])
        loss_sum += float(torch.nn.functional.cross_entropy(logits, y[i : i + batch_size], reduction="sum"))
        correct += int((logits.argmax(1) == y[i : i + batch_size]).sum())
    return correct / len(y), loss_sum / len(y)


@contextlib.contextmanager
def ray_session(config: TrainConfig):
    """Join the running Ray (tests, jobs), connect to ``cluster.address``, or start an embedded local Ray.

    Only a Ray instance started here is shut down here.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    cc = config.cluster
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
    if cc.address:
        check_reachable(cc.address)
        kwargs["address"] = cc.address
    else:
        needed = cc.num_workers * cc.cpus_per_worker
        kwargs.update(num_cpus=max(os.cpu_count() or 1, needed), include_dashboard=False)
    try:
        ray.init(**kwargs)
    except (ConnectionError, ValueError, RuntimeError, OSError) as e:
        if cc.address:
            raise ClusterError(f"could not connect to Ray at {cc.address!r}: {e}; check --address (or leave it empty for a local run)") from e
        raise ClusterError(f"could not start a local Ray: {e}; if the path is too long, set RAY_TMPDIR to a short directory such as /tmp/ray") from e
    try:
        yield
    finally:
        ray.shutdown()


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast (instead of Ray's minutes of retries) when ``host:port`` accepts no TCP connection."""
    import socket

    if address == "auto":
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise ClusterError(f"cluster.address {address!r} is not HOST:PORT (or ray://HOST:PORT, or auto)")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        raise ClusterError(f"cluster.address {address!r} is unreachable ({e}); start the cluster (`ray up cluster.yaml`) or fix --address") from None


def _wait_ready(refs: list, what: str, handles: list) -> list:
    import ray

    timeout_s = float(os.environ.get(ACTOR_START_TIMEOUT_ENV_VAR, DEFAULT_ACTOR_START_TIMEOUT_S))
    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError as e:
        for h in handles:
            ray.kill(h)
        raise ClusterError(
            f"{what} did not start within {timeout_s:.0f}s; the cluster may lack the resources they ask for "
            f"(see `ray status`), or raise {ACTOR_START_TIMEOUT_ENV_VAR}"
        ) from e
    except ray.exceptions.RayActorError as e:
        for h in handles:
            ray.kill(h)
        raise ClusterError(f"{what} failed to start: {e}") from e


class Trainer:
    def __init__(self, config: TrainConfig, on_progress: Callable[[Progress], None] | None = None):
        self.config = config
        self.on_progress = on_progress

    def fit(self) -> TrainResult:
        cfg = self.config
        wall_start = time.time()
        check_source(cfg.data)
        data = load_dataset(cfg.data, cfg.seed)
        model = initial_model(cfg, data)
        init_flat = flatten_state(model)
        num_params = sum(p.numel() for p in model.parameters())
        ranges = shard_ranges(init_flat.numel(), cfg.cluster.num_servers, num_params)
        total_steps = total_steps_for(cfg, len(data.train_y))
        with ray_session(cfg):
            run = _Run(cfg, ranges, total_steps, init_flat.numpy())
            try:
                run.start()
                statuses, train_time_s = run.wait(self.on_progress)
                step_times = run.step_end_times()
                final = run.final_params()
                stats = run.server_stats()
            finally:
                run.shutdown()
        load_flat_state(model, torch.from_numpy(final))
        acc, eval_loss = evaluate(model, data.eval_x, data.eval_y)
        samples = sum(s.samples for s in statuses)
        # an update counts as acknowledged once any worker received the shard's reply for it
        acked = [max(s.acked_per_shard[i] for s in statuses) for i in range(len(ranges))]
        warmup = min(5, total_steps // 4)
        steady = steady_throughput(step_times, cfg.data.batch_size, warmup)
        return TrainResult(
            steps_completed=min(s.step for s in statuses),
            total_steps=total_steps,
            samples_per_sec=samples / train_time_s if train_time_s > 0 else 0.0,
            steady_samples_per_sec=steady,
            warmup_steps_excluded=warmup,
            train_time_s=train_time_s,
            wall_time_s=time.time() - wall_start,
            final_loss=float(np.mean([s.last_loss for s in statuses])),
            eval_accuracy=acc,
            eval_loss=eval_loss,
            params_sha256=params_sha256(torch.from_numpy(final)),
            updates_applied=sum(st.updates_applied for st in stats),
            updates_acknowledged=sum(acked),
            num_params=num_params,
            workers=[
                {"rank": s.rank, "steps": s.step, "samples": s.samples, "compute_s": round(s.compute_s, 3), "wait_s": round(s.wait_s, 3), "device": s.device}
                for s in statuses
            ],
            devices=sorted({s.device for s in statuses}),
            config=cfg.to_dict(),
            final_params=final,
        )


class _Run:
    """The actors of one training run (driver side)."""

    def __init__(self, cfg: TrainConfig, ranges, total_steps: int, init_flat: np.ndarray):
        self.cfg, self.ranges, self.total_steps, self.init_flat = cfg, ranges, total_steps, init_flat
        self.servers: list = []
        self.workers: list = []

    def _use_gpu(self) -> bool:
        import ray

        mode = self.cfg.cluster.use_gpu
        if mode == "false":
            return False
        have = ray.cluster_resources().get("GPU", 0)
        if mode == "true" and have < self.cfg.cluster.num_workers:
            raise ClusterError(
                f"cluster.use_gpu=true asks for {self.cfg.cluster.num_workers} GPUs, the cluster has {have:g}; "
                "add GPU nodes or set --use-gpu auto"
            )
        return have >= self.cfg.cluster.num_workers

    def start(self) -> None:
        import ray

        from raytrain_ft.actors.server import ParameterServer
        from raytrain_ft.actors.worker import Worker

        cfg = self.cfg
        server_cls = ray.remote(num_cpus=0, max_restarts=0)(ParameterServer)
        self.servers = [server_cls.remote(r, cfg.optim, self.total_steps, cfg.cluster.num_workers, cfg.cluster.server_threads) for r in self.ranges]
        _wait_ready([s.ready.remote() for s in self.servers], f"{len(self.servers)} parameter servers", self.servers)
        ray.get([s.load.remote(self.init_flat[r.start : r.end]) for s, r in zip(self.servers, self.ranges)])
        gpu = self._use_gpu()
        worker_cls = ray.remote(num_cpus=cfg.cluster.cpus_per_worker, num_gpus=1 if gpu else 0, max_restarts=0)(Worker)
        device = "cuda" if gpu else "cpu"
        self.workers = [worker_cls.remote(rank, cfg, self.ranges, self.servers, device) for rank in range(cfg.cluster.num_workers)]
        _wait_ready([w.ready.remote() for w in self.workers], f"{len(self.workers)} workers", self.workers + self.servers)
        ray.get([w.start.remote(0, self.total_steps) for w in self.workers])

    def wait(self, on_progress) -> tuple[list, float]:
        import ray

        cfg = self.cfg
        t_start = time.time()
        while True:
            try:
                statuses = ray.get([w.poll_status.remote() for w in self.workers])
            except ray.exceptions.RayActorError as e:
                raise TrainingError(f"a worker died: {e}") from e
            errors = [s.error for s in statuses if s.error]
            if errors:
                raise TrainingError(errors[0])
            now = time.time()
            if on_progress is not None:
                samples = sum(s.samples for s in statuses)
                elapsed = now - min(s.started_at for s in statuses)
                losses = [s.last_loss for s in statuses if s.samples]
                on_progress(
                    Progress(
                        step=min(s.step for s in statuses),
                        total_steps=self.total_steps,
                        loss=float(np.mean(losses)) if losses else float("nan"),
                        samples_per_sec=samples / elapsed if elapsed > 0 else 0.0,
                        elapsed_s=now - t_start,
                    )
                )
            if all(s.done for s in statuses):
                started = min(s.started_at for s in statuses)
                finished = max(s.finished_at for s in statuses)
                return statuses, finished - started
            time.sleep(min(cfg.log_every_s, 0.2) if now - t_start < 2 else cfg.log_every_s)

    def final_params(self) -> np.ndarray:
        import ray

        return np.concatenate(ray.get([s.pull.remote() for s in self.servers]))

    def step_end_times(self) -> list[list[float]]:
        import ray

        return ray.get([w.step_end_times.remote() for w in self.workers])

    def server_stats(self) -> list:
        import ray

        return ray.get([s.stats.remote() for s in self.servers])

    def shutdown(self) -> None:
        import ray

        for h in self.workers + self.servers:
            with contextlib.suppress(Exception):
                ray.kill(h)
