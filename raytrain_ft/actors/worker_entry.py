"""The Ray actors of the workers, as the supervisor creates them: ``Worker`` (one rank) and
``WorkerHost`` (several ranks in one process), and what the supervisor reads of them
(``WorkerStatus``, ``RankHandle``).

This module imports neither torch nor the user's model code: creating an actor imports its class's
module in the creating process, and the supervisor is such a process. Each actor builds its
training side (``actors/worker.py``) in its own process, from the run's ``Task`` handed over sealed
(``transport.Sealed``).
"""

from __future__ import annotations

from dataclasses import dataclass

from raytrain_ft.actors import process_address


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    rank: int
    step: int
    """Steps whose gradients every shard has been sent (the run's position)."""
    end_step: int
    last_loss: float
    samples: int
    compute_s: float
    """Seconds in data + forward/backward."""
    wait_s: float
    """Seconds in push_pull round trips (waiting for the slowest worker included)."""
    started_at: float
    finished_at: float | None
    done: bool
    error: str | None
    device: str
    acked_per_shard: tuple[int, ...]
    """Per shard: how many updates (steps) the shard has acknowledged to this worker."""
    process: str
    """NODE_IP:PID of the worker's process."""
    reroutes: int
    """Calls resent to a rebuilt server after the old one died."""
    bytes_pushed: int = 0
    """Bytes of gradients sent (after compression)."""
    bytes_pulled: int = 0
    """Bytes of parameters received."""
    skipped_steps: int = 0
    """Sync with backup workers: steps this rank skipped because the shards closed them without
    it."""
    last_accuracy: float = float("nan")
    """Accuracy on the rank's last training batch."""
    node_id: str = ""
    gpu_ids: tuple = ()
    """GPUs Ray assigned to the worker (it trains on them when torch sees CUDA)."""
    started: bool = False
    """It was told where to start (a restarted rank that was not started yet is not training)."""
    residual_bytes: int = 0
    """Bytes of error-feedback residuals sent with the pushes (lossy codecs keep them with the
    shards)."""
    device_name: str = "cpu"
    """The device kind (GPU model): I2 needs every incarnation of a rank on the same kind."""
    cpu_s: float = 0.0
    """CPU seconds of the worker's process since it was told to start: every thread (data
    prefetch, pushes and their serialization, Ray's own threads) and the compute."""
    compute_cpu_s: float = 0.0
    """CPU seconds of the training thread in forward/backward (and local optimizer steps)."""
    gpu_compute_s: float | None = None
    """GPU workers: seconds the device spent from the start of forward to the end of backward,
    summed over steps (CUDA events; ``compute_s`` is wall time on the host)."""
    push_thread: bool = False
    """Pushes go from the push thread during backward (``--push-thread`` as it resolved here)."""
    clipped_updates: int = 0
    """--clip-grad-norm: updates this rank's gradient went into that were scaled down (factor below
    1)."""
    skipped_updates: int = 0
    """fp16: updates of this rank skipped for an overflow (its own or, in sync, any rank's)."""
    loss_scale: float | None = None
    """fp16: the loss scale of the rank's next step (None: no loss scaling)."""
    early_answers: int = 0
    """--durability pipelined: pushes answered before their update was logged (acknowledged with
    the shard's next answer)."""


class Worker:
    """One rank's actor: ``actors.worker.Worker`` built in this process (the ``task`` argument is
    the run's ``Task``, sealed)."""

    def __init__(self, name, rank, config, task, *args, **kwargs):
        from raytrain_ft.actors.worker import Worker as Rank

        self._rank = Rank(name, rank, config, task.open(), *args, **kwargs)

    def ready(self) -> str:
        return process_address()

    def deliver(self, msg):
        return self._rank.deliver(msg)

    def start(self, start_step: int, end_step: int, routes: tuple = ()) -> bool:
        return self._rank.start(start_step, end_step, routes)

    def poll_status(self) -> WorkerStatus:
        return self._rank.poll_status()

    def step_end_times(self) -> list[tuple[int, float]]:
        return self._rank.step_end_times()


class WorkerHost:
    """One process hosting several ranks (``cluster.ranks_per_process``):
    ``actors.worker.WorkerHost`` built in this process."""

    def __init__(self) -> None:
        from raytrain_ft.actors.worker import WorkerHost as Host

        self._host = Host()

    def ready(self) -> str:
        return process_address()

    def add(self, rank: int, name, rank_again, config, task, *args) -> str:
        return self._host.add(rank, name, rank_again, config, task.open(), *args)

    def call(self, rank: int, method: str, *args):
        return self._host.call(rank, method, *args)


@dataclass(frozen=True)
class RankHandle:
    """Stands for one rank of a ``WorkerHost`` where a worker's actor handle is expected:
    ``handle.poll_status.remote()`` becomes ``host.call.remote(rank, "poll_status")``."""

    host: object
    rank: int

    def __getattr__(self, method: str):
        if method.startswith("__"):
            raise AttributeError(method)
        return _RankMethod(self.host, self.rank, method)


@dataclass(frozen=True)
class _RankMethod:
    host: object
    rank: int
    method: str

    def remote(self, *args):
        return self.host.call.remote(self.rank, self.method, *args)


def actor_of(handle):
    """The Ray actor behind a handle (the host process of a ``RankHandle``, the warm process of an
    ``Addressed``)."""
    from raytrain_ft.actors.transport import Addressed

    if isinstance(handle, Addressed):
        return handle.actor
    return handle.host if isinstance(handle, RankHandle) else handle
