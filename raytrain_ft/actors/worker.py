"""Worker: the Ray actor that runs the training loop for one rank."""

from __future__ import annotations

import logging
import threading
import time
import traceback
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from raytrain_ft.config import TrainConfig
from raytrain_ft.data import BatchStream, load_dataset
from raytrain_ft.models import build_model
from raytrain_ft.params import FlatModel, ShardRange

logger = logging.getLogger(__name__)

# Arrays from the object store are read-only views; we only ever copy out of them.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    rank: int
    step: int
    """Steps completed (parameters for ``step`` are in place)."""
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


class Worker:
    """Trains one rank: forward/backward on its own partition, one push_pull per shard per step.

    Can lose: its model copy and its position; both come back from the
    servers (parameters) and the pure batch order (data) when restarted.
    """

    def __init__(self, rank: int, config: TrainConfig, shards: list[ShardRange], server_handles: list, device: str = "cpu"):
        torch.set_num_threads(config.cluster.cpus_per_worker)
        self.rank = rank
        self.config = config
        self.shards = shards
        self.servers = server_handles
        self.device = torch.device(device)
        data = load_dataset(config.data, config.seed)
        self.train_x, self.train_y = data.train_x, data.train_y
        torch.manual_seed(config.seed)
        self.model = build_model(config.model, data.in_shape, data.num_classes).to(self.device)
        self.flat = FlatModel(self.model, self.device)
        self.loss_fn = torch.nn.CrossEntropyLoss()
        # host staging buffer for pushes (the object store lives in host memory)
        self._host_grad = self.flat.flat_grad if self.device.type == "cpu" else torch.zeros(self.flat.numel, pin_memory=True)
        self._thread: threading.Thread | None = None
        self._step = 0
        self._end_step = 0
        self._last_loss = float("nan")
        self._samples = 0
        self._compute_s = 0.0
        self._wait_s = 0.0
        self._started_at = time.time()
        self._finished_at: float | None = None
        self._error: str | None = None
        self._step_end_times: list[float] = []
        self._acked = [0] * len(shards)

    def ready(self) -> str:
        return str(self.device)

    def start(self, start_step: int, end_step: int) -> bool:
        """Begin training steps ``[start_step, end_step)`` in a background thread."""
        if self._thread is not None and self._thread.is_alive():
            return False
        self._step, self._end_step = start_step, end_step
        self._thread = threading.Thread(target=self._run_guarded, name=f"train-{self.rank}", daemon=True)
        self._thread.start()
        return True

    def poll_status(self) -> WorkerStatus:
        done = self._finished_at is not None
        return WorkerStatus(
            self.rank, self._step, self._end_step, self._last_loss, self._samples, self._compute_s, self._wait_s,
            self._started_at, self._finished_at, done, self._error, str(self.device), tuple(self._acked),
        )

    def step_end_times(self) -> list[float]:
        """Wall-clock time at which each step of this run finished (for steady-state throughput)."""
        return list(self._step_end_times)

    # --- training loop ---------------------------------------------------------

    def _run_guarded(self) -> None:
        try:
            self._run()
        except Exception:
            self._error = f"worker {self.rank} failed at step {self._step}:\n{traceback.format_exc()}"
            logger.error("[worker/%d step=%d] %s", self.rank, self._step, self._error)
        finally:
            self._finished_at = time.time()

    def _run(self) -> None:
        import ray

        cfg = self.config
        # OpenMP thread counts are per thread: set them in the thread that computes
        torch.set_num_threads(cfg.cluster.cpus_per_worker)
        self._started_at = time.time()
        self._pull_all()
        stream = BatchStream(
            self.train_x, self.train_y, seed=cfg.seed, rank=self.rank, num_workers=cfg.cluster.num_workers,
            batch_size=cfg.data.batch_size, start_step=self._step, end_step=self._end_step,
            prefetch=cfg.data.prefetch_batches,
        )
        self.model.train()
        try:
            while self._step < self._end_step:
                t0 = time.perf_counter()
                x, y = stream.next()
                loss = self._compute(x, y)
                t1 = time.perf_counter()
                replies = ray.get(self._push_pull(self._step))
                self._install(replies)
                for i in range(len(replies)):  # each reply acknowledges the shard's update of this step
                    self._acked[i] = self._step + 1
                self._wait_s += time.perf_counter() - t1
                self._compute_s += t1 - t0
                self._last_loss = loss
                self._samples += len(y)
                self._step += 1
                self._step_end_times.append(time.time())
        finally:
            stream.close()

    def _compute(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Forward/backward into the flat gradient buffer; stage buffers for the push."""
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        self.flat.zero_grad()
        loss = self.loss_fn(self.model(x), y)  # [N, classes] vs [N]
        loss.backward()
        self.flat.stage_buffers()
        if self._host_grad is not self.flat.flat_grad:
            self._host_grad.copy_(self.flat.flat_grad)
        return float(loss.detach())

    def _push_pull(self, step: int) -> list:
        """One call per shard, all in flight at once."""
        g = self._host_grad.numpy()
        return [h.push_pull.remote(self.rank, step, g[s.start : s.end]) for h, s in zip(self.servers, self.shards)]

    def _pull_all(self) -> None:
        import ray

        self._install(ray.get([h.pull.remote() for h in self.servers]))

    def _install(self, replies: list[np.ndarray]) -> None:
        for s, values in zip(self.shards, replies):
            self.flat.flat[s.start : s.end].copy_(torch.from_numpy(values), non_blocking=True)
