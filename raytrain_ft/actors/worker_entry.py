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
    the run's ``Task``, sealed). A process created with ``warm_kind`` may rest after a run that
    ended well and serve a rank of the next run of the driver (``actors/warm.py``): every call
    names the incarnation it is for. Calls run one at a time, in the order each caller sent them
    (so the supervisor's ``become`` runs before its next call)."""

    def __init__(self, name, rank, config, task, *args, warm_kind: str = ""):
        import threading

        from raytrain_ft.actors.warm import WarmLife

        self._life = WarmLife(name, warm_kind, self._end_after)
        """Its incarnations and rests (``actors/warm.py``)."""
        self._lock = threading.Lock()
        """Between calls to ``_life``: ``become``, ``rest`` and the end-of-rest timers."""
        if warm_kind:
            import torch

            # a fresh process's global RNG state, for every later incarnation: user data code
            # that draws from it before the model is seeded gets the same numbers in both
            self._rng = torch.random.get_rng_state()
        from raytrain_ft.errors import RaytrainFTError

        try:
            self._become(name, rank, config, task, *args)
        except RaytrainFTError as e:  # a setting to fix: Ray logs its one line, not the frames
            raise e.with_traceback(None) from None

    @property
    def name(self) -> str | None:
        """The rank's incarnation this process serves (None while it rests)."""
        return self._life.name

    def _become(self, name, rank, config, task, *args) -> None:
        from raytrain_ft.actors.worker import Worker as Rank

        self._rank = Rank(name, rank, config, task.open(), *args)
        self._life.name = name  # last: calls are answered once the rank is built

    def _addressed(self, to: str | None) -> None:
        self._life.check(to)

    def become(self, name, rank, config, task, *args) -> str:
        """A resting process takes a rank of a new run (``actors/warm.py``). If building the rank
        raises, calls for ``name`` get that error (as a new process's constructor error reaches
        the supervisor) and the process ends a while later."""
        import torch

        with self._lock:
            self._life.becoming()
            torch.random.set_rng_state(self._rng)
            try:
                self._become(name, rank, config, task, *args)
            except Exception as error:
                self._life.become_failed(name, error)
                raise
        return process_address()

    def _end_after(self, delay_s: float, *args) -> None:
        import threading

        timer = threading.Timer(delay_s, self._rest_over, args)
        timer.daemon = True
        timer.start()

    def _rest_over(self, *args) -> None:
        with self._lock:
            self._life.rest_over(*args)

    def rest(self, keep_s: float, *, to: str | None = None) -> str:
        """The run ended well: drop this rank (every later call to it raises ``Gone``), offer the
        process to the next run, end it after ``keep_s`` unless claimed. Returns its Ray name."""
        import ray

        self._addressed(to)
        if self._life.kind and not self._rank.finished:
            raise RuntimeError(f"{self.name} has not finished training")
        with self._lock:
            return self._life.rest(
                keep_s, ray.get_runtime_context().get_node_id(), lambda _gone: self._drop()
            )

    def _drop(self) -> None:
        self._rank.close()
        self._rank = None

    def code_unchanged(self) -> bool:
        from raytrain_ft.actors.warm import loaded_code_unchanged

        return loaded_code_unchanged(self._life.started)

    def ready(self, *, to: str | None = None) -> str:
        self._addressed(to)
        return process_address()

    def deliver(self, msg, *, to: str | None = None):
        self._addressed(to)
        return self._rank.deliver(msg)

    def start(self, start_step: int, end_step: int, routes: tuple = (), *, to: str | None = None):
        self._addressed(to)
        return self._rank.start(start_step, end_step, routes)

    def poll_status(self, *, to: str | None = None) -> WorkerStatus:
        self._addressed(to)
        return self._rank.poll_status()

    def step_end_times(self, *, to: str | None = None) -> list[tuple[int, float]]:
        self._addressed(to)
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
