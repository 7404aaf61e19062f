"""Worker: the Ray actor that runs the training loop for one rank."""

from __future__ import annotations

import logging
import threading
import time
import traceback
import warnings

import numpy as np
import torch

from raytrain_ft.actors import (
    NAMESPACE,
    process_address,
    watch_supervisor,
)
from raytrain_ft.actors.metrics import WORKER_METRICS, Recorder
from raytrain_ft.actors.worker_entry import WorkerStatus
from raytrain_ft.compression import Codec, ErrorFeedback, NoCodec, parse_codec
from raytrain_ft.config import TrainConfig
from raytrain_ft.consistency import sum_in_rank_order
from raytrain_ft.data import BatchStream, dataset_on_device
from raytrain_ft.device import choose_device, deterministic, device_name
from raytrain_ft.errors import RaytrainFTError
from raytrain_ft.optim import clip_in_place
from raytrain_ft.params import FlatModel, ShardRange, overlapping_shards
from raytrain_ft.recovery.faults import parse_slow
from raytrain_ft.rng import COMPUTE, drawn_for, shared_draws
from raytrain_ft.task import Task, correct, describe, to_device, user_code

logger = logging.getLogger(__name__)

SIMULATED_GRAD_SCALE = 1e-4
"""--simulate-compute: size of the fixed gradient values (small, so the parameters stay finite over
long runs)."""
MAX_REROUTES = 20
"""Consecutive failed calls to one shard a worker tolerates (each waits for a rebuilt server)."""

# Arrays from the object store are read-only views; we only ever copy out of them.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


class _NoBatches:
    """--simulate-compute: a simulated step reads no data."""

    def close(self) -> None:
        pass


def _placement() -> tuple[str, tuple]:
    """(node id, GPU ids) Ray gave this process; empty outside Ray."""
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id(), tuple(ray.get_gpu_ids())
    except ImportError:
        pass
    return "", ()


class Worker:
    """Trains one rank: forward/backward on its own partition, one push_pull per shard per step
    (async with ``n_push``/``n_fetch``: gradients accumulate over ``n_push`` steps, parameters are
    fetched every ``n_fetch`` steps and stay fixed in between, as in Downpour).

    Can lose: its model copy and its position; both come back when the
    supervisor restarts the rank: parameters as of the shards' step (a shard
    keeps the step before too, for a worker that died mid-step) and the batch
    order, a pure function of (seed, epoch, rank, step).
    """

    def __init__(
        self,
        name: str,
        rank: int,
        config: TrainConfig,
        task: Task,
        shards: list[ShardRange],
        routes: tuple,
        device: str = "cpu",
        run_id: str = "",
        group: GroupSum | None = None,
        local_index: int = 0,
    ):
        torch.set_num_threads(config.cluster.cpus_per_worker)
        self.name, self.rank = name, rank
        self.group = group
        """Pre-aggregation: the ranks of this process that send one push for all of them."""
        self._shares_process = config.cluster.ranks_per_process > 1
        """Other ranks' training threads may run in this process (``rng``'s lock is theirs too)."""
        self._shared_draws = shared_draws(run_id) if self._shares_process else None
        self.config = config
        self.node_id, self.gpu_ids = _placement()
        device, warning = choose_device(
            device,
            config.cluster.use_gpu,
            torch.cuda.is_available(),
            self.gpu_ids,
            index=local_index,
        )
        if warning:
            logger.warning("[worker/%d] %s", rank, warning)
        if config.model.precision == "fp16" and device == "cpu" and rank == 0:
            logger.warning(
                "[worker/0] --precision fp16 on the CPU: CPUs without fp16 arithmetic emulate it "
                "(a CNN step took 67x as long as fp32 on this project's test machine); use "
                "--precision bf16 on CPUs"
            )
        if device != "cpu":  # before the first CUDA call of the process
            deterministic(tf32=config.cluster.tf32)
        self.device = torch.device(device)
        self.device_name = device_name(device)
        self.metrics = Recorder(run_id, WORKER_METRICS if config.cluster.metrics else ())
        watch_supervisor(run_id, NAMESPACE)
        self.run_id = run_id
        self.task = task
        self._simulate_s = config.cluster.simulate_compute_ms / 1000.0
        self.train = (
            task.train_for(rank) if not self._simulate_s else None
        )  # a simulated step reads no data
        # a GPU worker keeps its data on the device when it fits, else builds batches pinned
        self.train, on_device = dataset_on_device(self.train, self.device)
        self._pin_batches = self.device.type == "cuda" and not on_device
        self.model = task.build_model(config.seed).to(self.device)
        self.flat = FlatModel(self.model, self.device)
        self.loss_fn = task.loss
        # bf16/fp16 compute under autocast; parameters and gradients stay float32 (fp16 with loss
        # scaling: amp.py)
        self._amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            config.model.precision, torch.bfloat16
        )
        self._autocast = config.model.precision != "fp32"
        self._fp16 = config.model.precision == "fp16"
        # host staging buffer for pushes (the object store lives in host memory)
        self._host_grad = (
            self.flat.flat_grad
            if self.device.type == "cpu"
            else torch.zeros(self.flat.numel, pin_memory=True)
        )
        self._thread: threading.Thread | None = None
        self._step = 0
        self._end_step = 0
        self._last_loss = float("nan")
        self._last_accuracy = float("nan")
        self._samples = 0
        self._compute_s = 0.0
        self._wait_s = 0.0
        self._started_at = time.time()
        self._finished_at: float | None = None
        self._error: str | None = None
        self._step_end_times: list[tuple[int, float]] = []
        self._skipped = 0
        self._cpu_at_start: float | None = None
        self._compute_cpu_s = 0.0
        self._gpu_compute_s = 0.0
        self._clipped_local = 0
        self._slow_s = parse_slow(config.chaos.slow_workers).get(rank, 0.0)
        if self._simulate_s:  # a fixed gradient of the true size stands in for backward
            gen = torch.Generator().manual_seed(config.seed * 1000 + rank)
            self.flat.flat_grad.copy_(
                torch.randn(self.flat.numel, generator=gen) * SIMULATED_GRAD_SCALE
            )
        self.sim_grad = self.flat.flat_grad.cpu().numpy() if self._simulate_s else None
        """--simulate-compute: the fixed gradient in host memory (what pre-aggregation sums)."""
        self.rule = config.rule()
        self.exchange = ShardExchange(
            rank,
            name,
            self.model,
            self.flat,
            shards,
            routes,
            self._host_grad,
            config.cluster.overlap_comm,
            run_id,
            parse_codec(config.consistency.codec),
            self.metrics,
            config.cluster.push_thread,
            config.consistency.codec_residual == "replicated",
            # local_sgd clips its inner steps (below), not the round's push
            config.optim.clip_grad_norm if config.mode != "local_sgd" else None,
            config.mode in ("sync", "mixed"),
            self._fp16,
        )

    def ready(self) -> str:
        return process_address()

    def deliver(self, msg):
        """The supervisor's messages: ``Start`` (train from a step) and ``PollStatus``."""
        from raytrain_ft.protocol.messages import PollStatus, Start

        if isinstance(msg, Start):
            return self.start(msg.step, msg.end_step, msg.routes)
        if isinstance(msg, PollStatus):
            return self.poll_status()
        raise TypeError(f"a worker does not handle {type(msg).__name__}")

    def start(self, start_step: int, end_step: int, routes: tuple = ()) -> bool:
        """Begin training steps ``[start_step, end_step)`` in a background thread (a second start is
        ignored)."""
        if self._thread is not None:
            return False
        self.exchange.set_routes(routes)
        self._cpu_at_start = time.process_time()
        self._step, self._end_step = start_step, end_step
        # pipelined: every step's push but the last may be answered before the log
        self.exchange.pipeline_until = end_step - 1 if self.config.pipelined else 0
        self._thread = threading.Thread(
            target=self._run_guarded, name=f"train-{self.rank}", daemon=True
        )
        self._thread.start()
        return True

    @property
    def finished(self) -> bool:
        """It started, and its training thread has ended."""
        return self._thread is not None and not self._thread.is_alive()

    def close(self) -> None:
        """This rank's run ended: release its thread and files (``actors/warm.py``)."""
        self.exchange.close()
        self.metrics.retire()

    def poll_status(self) -> WorkerStatus:
        done = self._finished_at is not None
        return WorkerStatus(
            self.rank,
            self._step,
            self._end_step,
            self._last_loss,
            self._samples,
            self._compute_s,
            self._wait_s,
            self._started_at,
            self._finished_at,
            done,
            self._error,
            str(self.device),
            tuple(self.exchange.acked),
            process_address(),
            self.exchange.reroutes,
            self.exchange.bytes_pushed,
            self.exchange.bytes_pulled,
            self._skipped,
            self._last_accuracy,
            self.node_id,
            self.gpu_ids,
            self._thread is not None,
            self.exchange.residual_bytes,
            self.device_name,
            time.process_time() - self._cpu_at_start if self._cpu_at_start is not None else 0.0,
            self._compute_cpu_s,
            self._gpu_compute_s if self.device.type == "cuda" else None,
            self.exchange.push_thread,
            self.exchange.clipped_updates + self._clipped_local,
            len(self.exchange.skipped_steps),
            self.exchange.next_loss_scale(self._step) if self._fp16 else None,
            self.exchange.proto.early_answers,
        )

    def step_end_times(self) -> list[tuple[int, float]]:
        """(step, wall-clock time it finished) for every step this worker ran (throughput, recovery
        timelines)."""
        return list(self._step_end_times)

    # --- training loop ---------------------------------------------------------

    def _run_guarded(self) -> None:
        try:
            self._run_rounds() if self.config.mode == "local_sgd" else self._run()
        except Exception as e:
            # an error of the project's own names what to fix in one line (its traceback goes to
            # a file, not the console); anything else needs its traceback (the supervisor's
            # reason for failing the run names the rank and the step)
            trace, own = traceback.format_exc(), isinstance(e, RaytrainFTError)
            path = write_traceback(f"{self.run_id}-worker-{self.rank}", trace) if own else None
            if path is not None:
                self._error = f"{e} (its traceback: {path})"
            else:
                self._error = str(e) if own else trace
                logger.error("[worker/%d step=%d] %s", self.rank, self._step, trace)
            if self.group is not None:  # the process's other ranks stop waiting for this one
                self.group.fail(f"rank {self.rank} of this process failed")
        finally:
            self._finished_at = time.time()
            if self.group is not None:
                self.group.leave(self.rank)

    def _stream(self, start_step: int, end_step: int | None = None) -> BatchStream | _NoBatches:
        """This rank's batches ``[start_step, end_step)`` (batch indices; default: to the run's
        end)."""
        cfg = self.config
        if self._simulate_s:
            return _NoBatches()
        return BatchStream(
            self.train,
            seed=cfg.seed,
            rank=self.rank,
            num_workers=cfg.cluster.num_workers,
            batch_size=cfg.data.batch_size,
            start_step=start_step,
            end_step=self._end_step if end_step is None else end_step,
            prefetch=cfg.data.prefetch_batches,
            presplit=self.task.data.presplit,
            pin_memory=self._pin_batches,
        )

    def _run(self) -> None:
        cfg, c = self.config, self.config.consistency
        # OpenMP thread counts are per thread: set them in the thread that computes
        torch.set_num_threads(cfg.cluster.cpus_per_worker)
        self._started_at = time.time()
        stream = self._stream(self._step)
        self.model.train()
        # plain sync resumes on exactly its step's parameters; other modes take the newest
        self.exchange.pull_all(
            self._step if self.rule.exact_resume else None, resume_step=self._step
        )
        downpour = cfg.mode == "async"
        try:
            while self._step < self._end_step:
                t0 = time.perf_counter()
                wait_before = self.exchange.wait_s
                last = self._step == self._end_step - 1
                push = not downpour or (self._step + 1) % c.n_push == 0 or last
                fetch = not downpour or (self._step + 1) % c.n_fetch == 0 or last
                if self._simulate_s:
                    loss, samples = self._simulated_step(push, fetch), cfg.data.batch_size
                else:
                    x, y = stream.next()
                    samples = len(y)
                    if self._slow_s:
                        time.sleep(
                            self._slow_s
                        )  # an injected straggler: extra compute time per step
                    loss = self._step_once(x, y, push, fetch)
                if push and not self.exchange.overlap:
                    self.exchange.install_all()
                if fetch and not push:
                    self.exchange.pull_all(None)
                    self.exchange.install_all()
                self._step_done(t0, wait_before, loss, samples)
                behind = self._behind()
                if (
                    behind
                ):  # backup workers closed steps without this rank: go on at the shards' step
                    self._skipped += behind
                    self._step += behind
                    stream.close()
                    stream = self._stream(self._step)
            wait_before = self.exchange.wait_s
            self.exchange.install_all()
            self._wait_s += self.exchange.wait_s - wait_before
        finally:
            stream.close()

    def _run_rounds(self) -> None:
        """local_sgd: each step is a round of ``local_steps`` steps of a local optimizer on this
        rank's batches, then one push per shard of the round's pseudo-gradient; the answers carry
        the next round's parameters (the shards' optimizer is the outer one, as in DiLoCo).

        The pseudo-gradient is sent in gradient units, ``(start - end) / inner_lr``: the sum of the
        round's steps. A server optimizer of plain SGD at ``--lr`` equal to the inner rate then
        averages the workers' models (local SGD); with momentum it is DiLoCo's outer momentum.
        The inner optimizer starts fresh every round and a round's batches are a pure function
        of (seed, epoch, rank, step), so a restarted rank redoes its round bit for bit: sync's
        guarantees hold per round.
        """
        from raytrain_ft.consistency import round_span
        from raytrain_ft.trainer import total_local_steps

        cfg, c = self.config, self.config.consistency
        torch.set_num_threads(cfg.cluster.cpus_per_worker)
        self._started_at = time.time()
        total = total_local_steps(cfg, len(self.train))
        stream = self._stream(round_span(self._step, c.local_steps, total).start, total)
        self.model.train()
        self.exchange.pull_all(self._step, resume_step=self._step)
        inner_lr = c.inner_lr if c.inner_lr is not None else cfg.optim.lr
        n = self.flat.num_params
        trained = [p for p in self.flat.params if p.requires_grad]
        try:
            while self._step < self._end_step:
                t0 = time.perf_counter()
                wait_before = self.exchange.wait_s
                start = self.flat.flat[:n].clone()
                inner = (
                    torch.optim.AdamW(trained, lr=inner_lr, weight_decay=0.0)
                    if c.inner_optimizer == "adamw"
                    else torch.optim.SGD(trained, lr=inner_lr)
                )
                # fp16: a fresh scaler per round, like the inner optimizer (a restarted rank
                # redoes its round bit for bit)
                scaler = torch.amp.GradScaler(self.device.type, enabled=self._fp16)
                samples = 0
                for local_step in round_span(self._step, c.local_steps, total):
                    x, y = stream.next()
                    if self._slow_s:
                        time.sleep(self._slow_s)
                    loss = self._local_step(x, y, inner, scaler, local_step)
                    samples += len(y)
                torch.sub(start, self.flat.flat[:n], out=self.flat.flat_grad[:n])
                self.flat.flat_grad[:n].div_(inner_lr)
                self.flat.stage_buffers(self.task.model_field)
                self.exchange.begin_step(self._step)
                self.exchange.push_remaining()
                self.exchange.install_all()
                self._step_done(t0, wait_before, loss, samples)
        finally:
            stream.close()

    def _local_step(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        inner: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        local_step: int,
    ) -> float:
        """local_sgd: one forward/backward and one step of the round's local optimizer
        (``local_step``: the batch's index, what its draws are seeded for)."""
        cpu0 = time.thread_time()
        x, y = to_device(x, self.device), to_device(y, self.device)
        self.flat.zero_grad()
        clock = _GpuClock(self.device)
        with self._draws(local_step):
            with torch.autocast(self.device.type, dtype=self._amp_dtype, enabled=self._autocast):
                out, loss = self._forward(x, y)
            with user_code(self.task.model_field, lambda: f"backward of step {self._step}'s loss"):
                scaler.scale(loss).backward()
        scaler.unscale_(inner)
        if self.config.optim.clip_grad_norm is not None:
            self._clipped_local += clip_in_place(
                self.flat.flat_grad[: self.flat.num_params], self.config.optim.clip_grad_norm
            )
        scaler.step(inner)
        scaler.update()
        clock.stop()
        self._compute_cpu_s += time.thread_time() - cpu0
        return self._loss_and_accuracy(loss, out, y, clock)

    def _step_done(self, t0: float, wait_before: float, loss: float, samples: int) -> None:
        """Account a finished step (or local_sgd round) begun at ``t0`` and move to the next."""
        wait = self.exchange.wait_s - wait_before
        self._wait_s += wait
        self._compute_s += time.perf_counter() - t0 - wait
        self._last_loss = loss
        self._samples += samples
        self._step_end_times.append((self._step, time.time()))
        self._record_step(samples)
        self._step += 1

    def _record_step(self, samples: int, window: int = 20) -> None:
        if not self.metrics.enabled:
            return
        self.metrics.inc("steps")
        self.metrics.inc("samples", samples)
        times = self._step_end_times[-window:]
        if len(times) > 1 and times[-1][1] > times[0][1]:
            self.metrics.set(
                "samples_per_second", (len(times) - 1) * samples / (times[-1][1] - times[0][1])
            )

    def _behind(self) -> int:
        """Sync with backup workers: steps the shards have closed beyond this rank's next step."""
        if not self.config.consistency.backup_workers or self._step >= self._end_step:
            return 0
        return max(0, min(min(self.exchange.versions), self._end_step) - self._step)

    def _simulated_step(self, push: bool, fetch: bool) -> float:
        """--simulate-compute: the step's compute is a sleep; the fixed gradient in the flat buffer
        is pushed as is."""
        self.exchange.begin_step(self._step, push, fetch)
        time.sleep(self._simulate_s + self._slow_s)
        self._push_step()
        return float("nan")

    def _push_step(self) -> None:
        """Send this step's gradient: the process's one push for all its ranks (pre-aggregation)
        or this rank's own."""
        if self.group is not None:
            self.group.exchange(self)
        else:
            self.exchange.push_remaining()

    def host_gradient(self) -> np.ndarray:
        """This step's whole gradient (and staged buffers) in host memory, what pre-aggregation
        sums: the fixed one of a simulated step, else the gradient buffer's."""
        if self.sim_grad is not None:
            return self.sim_grad
        return self.exchange.host_range(0, self.flat.numel)

    def _step_once(
        self, x: torch.Tensor, y: torch.Tensor, push: bool = True, fetch: bool = True
    ) -> float:
        """Forward/backward into the flat gradient buffer; ``push``: send every shard this step
        (else the gradient keeps accumulating in the buffer, Downpour's n_push); ``fetch``: ask for
        parameters back."""
        cpu0 = time.thread_time()
        x, y = to_device(x, self.device), to_device(y, self.device)
        if self.exchange.pushed_last:
            self.flat.zero_grad()
        self.exchange.begin_step(self._step, push, fetch)
        if self._shares_process:  # nothing waited for in the block below: another rank may hold
            self.exchange.install_all()  # the answer's other half and wait for the generators
        clock = _GpuClock(self.device)
        # dropout and the like draw from generators seeded for (seed, rank, step)
        with self._draws(self._step):
            # forward installs shards as it needs them; bf16 computes under autocast, parameters
            # and gradients stay float32
            with torch.autocast(self.device.type, dtype=self._amp_dtype, enabled=self._autocast):
                out, loss = self._forward(x, y)
            # Buffers are final after forward; they travel in the gradient slot. With overlap,
            # post-accumulate hooks push the shards whose gradients are complete during backward.
            self.flat.stage_buffers(self.task.model_field)
            scale = self.exchange.loss_scale() if self._fp16 else 1.0
            # with overlap, the pushes its hooks send count as compute here
            with user_code(self.task.model_field, lambda: f"backward of step {self._step}'s loss"):
                (loss * scale if scale != 1.0 else loss).backward()
        clock.stop()
        self._compute_cpu_s += time.thread_time() - cpu0
        self._push_step()
        return self._loss_and_accuracy(loss, out, y, clock)

    def _draws(self, step: int):
        """The block of ``step``'s forward and backward: its draws from generators seeded for
        ``(seed, rank, step)``, held alone (``rng``; ranks sharing a process whose model draws
        nothing compute side by side)."""
        if self._shared_draws is None:
            return drawn_for(self.config.seed, self.rank, step, COMPUTE)
        return self._shared_draws.step(self.config.seed, self.rank, step)

    def _forward(self, x, y) -> tuple:
        """The model's output and loss on a batch; what the user's model or loss raise is one line
        naming the field (``user_code``)."""
        with user_code(
            self.task.model_field,
            lambda: f"the model's forward on step {self._step}'s batch ({describe(x)})",
        ):
            out = self.model(x)
        with user_code(
            self.task.loss_field,
            lambda: f"the loss on the model's output {describe(out)} and the targets {describe(y)}",
        ):
            loss = self.loss_fn(out, y)
        return out, loss

    def _loss_and_accuracy(
        self, loss: torch.Tensor, out: torch.Tensor, y: torch.Tensor, clock: _GpuClock
    ) -> float:
        """The step's loss (returned) and batch accuracy (kept, classification only); reading them
        waits for the device, so the step's GPU time (``clock``) is known then too."""
        if not self.task.classification:
            loss_value = float(loss.detach())
        else:
            # one device-to-host copy for both numbers (each float() of a GPU tensor waits for the
            # device)
            loss_value, self._last_accuracy = torch.stack(
                [loss.detach().float(), correct(out.detach(), y).float().mean()]
            ).tolist()
        self._gpu_compute_s += clock.seconds()
        return loss_value


class _GpuClock:
    """Device time of a stretch of work from CUDA events (started at construction); 0 on the
    CPU."""

    def __init__(self, device: torch.device):
        self._events = None
        if device.type == "cuda":
            self._events = (
                torch.cuda.Event(enable_timing=True),
                torch.cuda.Event(enable_timing=True),
            )
            self._events[0].record()

    def stop(self) -> None:
        if self._events:
            self._events[1].record()

    def seconds(self) -> float:
        """Once the device has passed ``stop`` (e.g. after reading a result of the work)."""
        return self._events[0].elapsed_time(self._events[1]) / 1000.0 if self._events else 0.0


class _Sender:
    """Pushes shards from a thread of its own while backward goes on (``overlap_comm``).

    Backward's hook only records a CUDA event on the stream that computed the gradient and queues
    the shard; this thread waits for that event on a side stream, copies the shard's gradient to
    pinned host memory (or encodes it on the device and copies the payload) and makes the Ray
    call, so the GPU keeps computing meanwhile. The training thread ``drain``s the queue after
    backward, before it touches the protocol again: the protocol is never used by two threads at
    once."""

    def __init__(self, push, device: torch.device):
        import queue

        self._push = push
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        threading.Thread(target=self._loop, name="shard-sender", daemon=True).start()

    def submit(self, i: int) -> None:
        event = None
        if self._stream is not None:
            event = torch.cuda.Event()
            event.record()  # on the stream backward computes on
        self._queue.put((i, event))

    def close(self) -> None:
        """End the thread (after what is queued)."""
        self._queue.put(None)

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                self._queue.task_done()
                return
            i, event = item
            try:
                if self._error is not None:
                    continue
                if self._stream is None:
                    self._push(i)
                    continue
                self._stream.wait_event(event)
                with torch.cuda.stream(self._stream):
                    self._push(i)
            except BaseException as error:  # noqa: BLE001 -- raised again by drain
                self._error = error
            finally:
                self._queue.task_done()

    def drain(self) -> None:
        """Wait until every queued shard is sent; raise what a send raised."""
        self._queue.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise error


LEDGER_DIR_ENV_VAR = "RAYTRAIN_FT_LEDGER_DIR"
"""If set, every worker appends each push the shards acknowledged to ``DIR/RUN_ID.NAME.ledger``
(``shard rank step seq late``, one per line): the independent record the chaos tests check
exactly-once delivery against."""
WATCHDOG_S = 5.0
"""A call to a shard unanswered this long makes the worker ask the supervisor whether the shard
moved."""


def write_traceback(name: str, text: str) -> str | None:
    """Write ``text`` to ``raytrain_ft-NAME.traceback`` in this node's Ray log directory, beside the
    processes' own logs (not their output, which Ray copies to the driver's console); its path, or
    None when there is no such directory."""
    import os

    try:
        import ray._private.worker as ray_worker

        node = ray_worker._global_node
        if node is None:
            return None
        path = os.path.join(node.get_logs_dir_path(), f"raytrain_ft-{name}.traceback")
        with open(path, "a") as fh:
            fh.write(text + "\n")
        return path
    except Exception:  # noqa: BLE001 -- no log directory: the caller logs the traceback instead
        return None


def supervisor_name(run_id: str) -> str:
    return f"{run_id}/supervisor"


class ShardExchange:
    """A worker's traffic with the shards: the Ray side of ``protocol.exchange.ExchangeProtocol``.

    One ``push`` per shard per step (parameters come back in its answer). A
    failed call -- the server died, was deposed, is unreachable, its answer
    was lost with its node -- is rerouted and resent by the protocol; this
    class only sends, waits and installs.

    With ``overlap`` on, shard ``i`` is pushed from a post-accumulate-grad hook
    as soon as the last gradient in its key range is final (backward runs from
    the last layers, which sit in the last shards), and its reply is installed
    by a forward pre-hook of the first module that reads a tensor in its range.
    A gradient unscaled (fp16) or clipped on the worker (async, ssp) is pushed
    after backward instead; its replies are still installed by forward.
    The values every step computes with are the same as without overlap.
    Modules must read only their own parameters and buffers (true of the
    built-in models); a model that reads another module's tensors needs
    ``overlap_comm: false``.
    """

    def __init__(
        self,
        rank: int,
        name: str,
        model: torch.nn.Module,
        flat: FlatModel,
        shards: list[ShardRange],
        routes,
        host_grad: torch.Tensor,
        overlap: bool,
        run_id: str,
        codec: Codec | None = None,
        metrics: Recorder | None = None,
        push_thread: str = "false",
        replicate_residual: bool = False,
        clip: float | None = None,
        clip_rounds: bool = False,
        fp16: bool = False,
    ):
        import os

        from raytrain_ft.actors.transport import Directory
        from raytrain_ft.protocol.exchange import ExchangeProtocol

        self.rank, self.flat, self.shards = rank, flat, shards
        self.metrics = metrics
        self.proto = ExchangeProtocol(
            rank, list(routes), supervisor_name(run_id), watchdog_s=WATCHDOG_S
        )
        self.directory = Directory(run_id)
        codec = codec or NoCodec()
        # error feedback per shard, on the parameter part only (buffers are assigned, never
        # compressed)
        # on a GPU the encoding runs on the device too (only the payload is copied to the host)
        on_gpu = flat.device.type == "cuda"
        self.encoders = (
            [
                ErrorFeedback(codec, s.param_slice.stop, flat.device if on_gpu else None)
                for s in shards
            ]
            if not codec.lossless
            else None
        )
        self.replicate_residual = replicate_residual and self.encoders is not None
        """--codec-residual replicated: each push carries the residual, kept with the shard."""
        self.clip = clip
        """--clip-grad-norm: the global norm every update's gradient is clipped to."""
        self.pipeline_until = 0
        """--durability pipelined: pushes of steps before this one may be answered before their
        update is logged (0: none)."""
        self.clip_rounds = clip is not None and clip_rounds
        """Sync and mixed: the update averages several ranks' gradients, so its norm comes from the
        shards (pushes are probes, then a second round sends the factor)."""
        self.clip_local = clip is not None and not clip_rounds
        """Async and ssp: this rank's own gradient is the update, clipped here before it is
        pushed."""
        self.clipped_updates = 0
        self.fp16 = fp16
        """fp16 loss scaling: the loss is scaled by ``loss_scale()``, the gradient unscaled and
        checked before it is pushed; an overflow is pushed as such and its update skipped."""
        self.skipped_steps: tuple[int, ...] = ()
        """fp16: this rank's steps whose updates were skipped, as the shards' replies report them
        (the scale is a pure function of them). Replaced, never mutated: the actor's thread reads
        it while the training thread trains."""
        self._scale: float | None = None
        """fp16: the scale this step's loss was multiplied by (None: not scaled)."""
        self._overflow = False
        self.versions = [0] * len(shards)
        """Per shard: the seq of the parameters installed (the base a gradient is computed on)."""
        self.bytes_pushed = 0
        self.bytes_pulled = 0
        self.residual_bytes = 0
        """Bytes of error-feedback residuals sent with the pushes (lossy codecs)."""
        self.pushed_last = True
        self._want_params = True
        self.push_source: np.ndarray | None = None
        """Pre-aggregation: the sum of the process's ranks' gradients the next pushes send (None:
        this rank's own gradient)."""
        self.push_ranks: tuple[int, ...] = ()
        """The ranks ``push_source`` sums (the pushes count as each of theirs)."""
        self.host_grad = host_grad
        self.overlap = overlap
        self.acked = [0] * len(shards)
        self.wait_s = 0.0
        self._refs: dict = {}
        """ObjectRef of each call in flight -> its cid."""
        self._reply_pieces: dict = {}
        """First ObjectRef of a call answered in parts -> the refs of its parameters' parts."""
        self._asked = [False] * len(shards)
        """Shards with a call whose answer is not installed yet."""
        self._sent_at = [0.0] * len(shards)
        self._is_pull = [False] * len(shards)
        self._pushed = [True] * len(shards)
        self._step = 0
        self._ticked = time.time()
        ledger_dir = os.environ.get(LEDGER_DIR_ENV_VAR)
        self._ledger = (
            open(
                os.path.join(ledger_dir, f"{run_id}.{name.replace('/', '_')}.ledger"),
                "a",
                buffering=1,
            )
            if ledger_dir
            else None
        )
        self._ledger_seen = 0
        params = flat.params
        self._param_shards = [
            overlapping_shards(a, b, shards) for a, b in flat.spans[: len(params)]
        ]
        self._grads_per_shard = [0] * len(shards)
        for p, owners in zip(params, self._param_shards):
            if p.requires_grad:
                for i in owners:
                    self._grads_per_shard[i] += 1
        self._remaining = list(self._grads_per_shard)
        self._sender = (
            _Sender(self._push, flat.device)
            if overlap and (push_thread == "true" or (push_thread == "auto" and on_gpu))
            else None
        )
        if overlap:
            # forward installs each shard's answer as the first layer needing it runs (always: a
            # step's parameters must be in place before forward, never changed under backward)
            self._hook_modules(model)
        # a gradient clipped or unscaled here is pushed once all of it is known, after backward
        if overlap and not fp16 and not self.clip_local:
            for k, p in enumerate(params):
                if p.requires_grad:
                    p.register_post_accumulate_grad_hook(lambda _p, k=k: self._grad_ready(k))

    @property
    def reroutes(self) -> int:
        return self.proto.reroutes

    @property
    def push_thread(self) -> bool:
        return self._sender is not None

    def set_routes(self, routes) -> None:
        self.proto.set_routes(routes)

    def _hook_modules(self, model: torch.nn.Module) -> None:
        tensors = self.flat.params + [b for b in model.buffers() if b.is_floating_point()]
        span_of = {id(t): span for t, span in zip(tensors, self.flat.spans)}
        span_of.update({id(b): span for b, span in self.flat.int_buffers})
        for module in model.modules():
            own = [
                t
                for t in (*module._parameters.values(), *module._buffers.values())
                if t is not None and id(t) in span_of
            ]
            if own:
                needed = sorted(
                    {i for t in own for i in overlapping_shards(*span_of[id(t)], self.shards)}
                )
                module.register_forward_pre_hook(
                    lambda _m, _inputs, needed=needed: self._install(needed)
                )

    # --- step protocol -----------------------------------------------------------

    def begin_step(self, step: int, push: bool = True, want_params: bool = True) -> None:
        if self.pushed_last:  # a new gradient starts (Downpour accumulates until it pushes)
            self._scale = None
        self._step = step
        self._want_params = want_params
        self.pushed_last = push
        self._pushed = [not push] * len(self.shards)
        self._remaining = list(self._grads_per_shard)
        self._overflow = False

    def next_loss_scale(self, step: int) -> float:
        """fp16: the scale step ``step`` computes with, from the skipped steps known so far."""
        from raytrain_ft.amp import loss_scale

        return loss_scale(step, self.skipped_steps)

    def loss_scale(self) -> float:
        """fp16: the scale of this step's loss, from the skipped steps the shards reported up to
        the previous step (whose answers are installed first). A gradient accumulated over several
        steps (Downpour's n_push) keeps its first step's scale: it is unscaled once, when pushed."""
        if self._scale is None:
            self.install_all()
            self._scale = self.next_loss_scale(self._step)
        return self._scale

    def push_remaining(self) -> None:
        """Push every shard not yet pushed this step (all of them without overlap); with
        --clip-grad-norm, clip first (this rank's gradient is the update) or run the second round
        (the shards' norms give the factor)."""
        if self._sender is not None:
            self._sender.drain()
        grad = self.flat.flat_grad[: self.flat.num_params]
        if self._scale is not None and not all(self._pushed):  # fp16: unscale, as GradScaler
            grad.mul_(1.0 / self._scale)  # a power of two: exact
            self._overflow = not bool(torch.isfinite(grad).all())
        if self.clip_local and not self._overflow and not all(self._pushed):
            self.clipped_updates += clip_in_place(grad, self.clip)
        for i, done in enumerate(self._pushed):
            if not done:
                self._push(i)
        if self.clip_rounds and self.pushed_last:
            self._finish_clipped()

    def _finish_clipped(self) -> None:
        """Every shard answered the probe with the squared norm of its part of the update (or, when
        it already applied the update, its factor): send each the factor, computed the same way
        by every rank."""
        from raytrain_ft.protocol.exchange import clip_factor_of

        t0 = time.perf_counter()
        replies = [self._await(i) for i in range(len(self.shards))]
        self.wait_s += time.perf_counter() - t0
        factor = clip_factor_of(replies, self.clip)
        self.clipped_updates += factor < 1.0
        for i in range(len(self.shards)):
            self._ask(i, self.proto.finish(i, factor, self._want_params, time.time()))

    def pull_all(self, step: int | None, resume_step: int | None = None) -> None:
        """Fetch every shard's parameters as of ``step`` (a restarted worker resumes there), or the
        newest (None); with ``resume_step`` and a lossy codec, also the error-feedback residual this
        rank had before it."""
        # a rank restarting asks for what it resumes with: its residual, its skipped steps
        resume = resume_step if self.replicate_residual or self.fp16 else None
        for i in range(len(self.shards)):
            self._is_pull[i] = True
            self._ask(i, self.proto.pull(i, step, time.time(), resume))
        if not self.overlap:
            self.install_all()

    def install_all(self) -> None:
        self._install(range(len(self.shards)))

    # --- internals -----------------------------------------------------------------

    def _grad_ready(self, k: int) -> None:
        for i in self._param_shards[k]:
            self._remaining[i] -= 1
            if self._remaining[i] == 0 and not self._pushed[i]:
                self._sender.submit(i) if self._sender is not None else self._push(i)

    def host_range(self, start: int, end: int) -> np.ndarray:
        """The gradient's values ``[start, end)`` (a shard's, or all of them) in host memory (GPU:
        copied to the pinned staging buffer on the current stream, which is then waited for)."""
        if self.host_grad is not self.flat.flat_grad:
            self.host_grad[start:end].copy_(self.flat.flat_grad[start:end], non_blocking=True)
            torch.cuda.current_stream(self.flat.device).synchronize()
        return self.host_grad.numpy()[start:end]

    def _push(self, i: int) -> None:
        # with overlap, forward installs a shard's answer only where a module reading it runs: one
        # no module ran this step (unused, or used on some steps only) is installed now, before
        # its next call -- its values took no part in this step's forward
        self._install([i])
        s = self.shards[i]
        residual = None
        if self._overflow:  # fp16: nothing to send; the update is skipped, the residual unchanged
            grad = None
            if self.replicate_residual:
                residual = self.encoders[i].residual_host()
        elif self.encoders is not None:
            ps, bs = s.param_slice, s.buffer_slice
            encoder = self.encoders[i]
            grad = (
                self.flat.flat_grad[s.start : s.end]
                if encoder.device is not None  # encoded on the GPU
                else self.host_range(s.start, s.end)
            )
            grad = encoder.encode(grad[ps], grad[bs])
            if self.replicate_residual:  # kept with the shard: a restarted rank resumes with it
                residual = encoder.residual_host()
                self.residual_bytes += residual.nbytes
        elif self.push_source is not None:  # pre-aggregated; a copy, kept for a resend
            grad = self.push_source[s.start : s.end].copy()
        else:
            # a copy, kept for a resend: the gradient buffer is reused by the next step
            grad = self.host_range(s.start, s.end).copy()
        self.bytes_pushed += grad.nbytes if grad is not None else 0
        self._is_pull[i] = False
        self._ask(
            i,
            self.proto.push(
                i,
                self._step,
                grad,
                self.versions[i],
                self._want_params,
                time.time(),
                residual,
                probe=self.clip_rounds,
                overflow=self._overflow,
                early=self._step < self.pipeline_until,
                ranks=self.push_ranks,
            ),
        )
        self._pushed[i] = True

    def _ask(self, i: int, effects: list) -> None:
        self._asked[i] = True
        self._sent_at[i] = time.perf_counter()
        self._perform(effects)

    def _perform(self, effects: list) -> None:
        """Send the protocol's calls (large arrays go through the object store once, owned by this
        worker; a shard's parameters of up to PARTS_MAX_BYTES come back inline, in parts)."""
        from raytrain_ft.actors.transport import send, send_split
        from raytrain_ft.protocol.messages import Failure

        for e in effects:
            handle = self.directory.handle(e.dst)
            if handle is None:
                self._perform(self.proto.on_failure(e.cid, Failure.DEAD, time.time()))
                continue
            n_out = self._reply_parts(e)
            if n_out:
                first, *parts = send_split(handle, e.msg, n_out)
                self._refs[first] = e.cid
                self._reply_pieces[first] = parts
            else:
                self._refs[send(handle, e.msg)] = e.cid

    def _reply_parts(self, call) -> int:
        """Inline parts to ask for the parameters answering ``call`` in (0: none)."""
        from raytrain_ft.actors.transport import reply_parts
        from raytrain_ft.protocol.messages import Pull, Push

        msg = call.msg
        if not (isinstance(msg, Pull) or (isinstance(msg, Push) and msg.want_params)):
            return 0
        for i, route in enumerate(self.proto.routes):
            if route.address == call.dst:
                return reply_parts(4 * self.shards[i].size)
        return 0

    def _pump(self) -> None:
        """Wait for one answer (or the watchdog's period) and feed it to the protocol."""
        import ray

        from raytrain_ft.actors.transport import failure_of, join_reply
        from raytrain_ft.protocol.messages import Failure

        ready, _ = ray.wait(list(self._refs), num_returns=1, timeout=WATCHDOG_S)
        now = time.time()
        if not ready or now - self._ticked >= WATCHDOG_S:
            self._ticked = now
            self._perform(self.proto.on_tick(now))
        for ref in ready:
            cid = self._refs.pop(ref)
            pieces = self._reply_pieces.pop(ref, None)
            try:
                value = ray.get(ref)
                if pieces:
                    value = join_reply(value, ray.get(pieces))
            except Exception as error:  # noqa: BLE001 -- Ray's errors become the protocol's failures
                failure = failure_of(error)
                if failure is None:
                    raise
                if not isinstance(failure, Failure):
                    failure = Failure.DEAD
                self._perform(self.proto.on_failure(cid, failure, time.time()))
                continue
            self._perform(self.proto.on_reply(cid, value, time.time()))
        self._write_ledger()

    def close(self) -> None:
        """Release what the exchange holds in its process: the push thread, the ledger file (a warm
        worker process takes another rank next)."""
        if self._sender is not None:
            self._sender.close()
        if self._ledger is not None:
            self._ledger.close()
            self._ledger = None

    def _write_ledger(self) -> None:
        ledger = self.proto.ledger
        for a in ledger[self._ledger_seen :]:
            self.acked[a.shard] = max(self.acked[a.shard], a.seq)
            if self._ledger is not None:
                self._ledger.write(f"{a.shard} {a.rank} {a.step} {a.seq} {int(a.late)}\n")
        self._ledger_seen = len(ledger)

    def _await(self, i: int):
        """The answer to shard ``i``'s call (pumping answers until it is in)."""
        from raytrain_ft.errors import TrainingError

        while self.proto.pending(i) and self.proto.error is None:
            self._pump()
        if self.proto.error is not None:
            raise TrainingError(f"[worker/{self.rank} step={self._step}] {self.proto.error}")
        return self.proto.take(i)

    def _install(self, indices) -> None:
        for i in indices:
            if not self._asked[i]:
                continue
            t0 = time.perf_counter()
            reply = self._await(i)
            self._asked[i] = False
            if self.metrics is not None and self.metrics.enabled:
                op = "pull" if self._is_pull[i] else "push_pull"
                self.metrics.observe(
                    "exchange_latency_seconds", time.perf_counter() - self._sent_at[i], {"op": op}
                )
            if reply.skipped and not set(reply.skipped) <= set(self.skipped_steps):
                self.skipped_steps = tuple(sorted({*self.skipped_steps, *reply.skipped}))
            if reply.residual is not None and self.encoders is not None:
                self.encoders[i].set_residual(reply.residual)
            if reply.params is not None:
                s = self.shards[i]
                self.flat.flat[s.start : s.end].copy_(
                    torch.from_numpy(reply.params), non_blocking=True
                )
                if self.flat.int_buffers:
                    self.flat.sync_int_buffers(s.start, s.end)
                self.versions[i] = reply.seq
                self.bytes_pulled += reply.params.nbytes
            self.wait_s += time.perf_counter() - t0


class GroupSum:
    """Pre-aggregation (``cluster.preaggregate``; sync, and mixed whose groups are the processes):
    the ranks of one process sum their gradients and send one push per shard for all of them, as
    the GPUs of one node would.

    Every rank's training thread hands in its step's gradient and waits; the group's first rank
    sums them in rank order (``consistency.sum_in_rank_order``, the order a shard sums the ranks
    of a process in anyway: the same bits as their own pushes), pushes the sum through its own
    exchange with the ranks it holds (exactly-once and replay count it as each of theirs),
    installs the answers and copies them into the others' models before they go on. The ranks
    die together (with their process) and come back together, so none waits for a rank that is
    gone for good; a rank that fails stops the others with it.
    """

    def __init__(self, members: tuple[int, ...]):
        self.members = members
        self._cond = threading.Condition()
        self._ranks: dict[int, Worker] = {}
        self._handed: dict[int, int] = {}
        """Rank -> the step whose gradient it handed in."""
        self._done = -1
        """The last step the first rank pushed and installed."""
        self._left: set[int] = set()
        self._error: str | None = None

    def join(self, worker: Worker) -> None:
        with self._cond:
            self._ranks[worker.rank] = worker

    def fail(self, reason: str) -> None:
        with self._cond:
            self._error = self._error or reason
            self._cond.notify_all()

    def exchange(self, worker: Worker) -> None:
        """Push step ``worker._step`` for the group (first rank) or wait for it (the others), then
        hold the parameters that step's answers carried."""
        step, lead = worker._step, self.members[0]
        with self._cond:
            self._handed[worker.rank] = step
            self._cond.notify_all()
            if worker.rank == lead:
                self._wait(worker, lambda: self._all_in(step))
                ranks = [self._ranks[r] for r in self.members]
        if worker.rank == lead:
            ex = worker.exchange
            ex.push_source = sum_in_rank_order([w.host_gradient() for w in ranks])
            ex.push_ranks = self.members if len(self.members) > 1 else ()
            try:
                ex.push_remaining()
                ex.install_all()
                # the others take the answers now: the first rank's next forward moves its
                # BatchNorm statistics in place (the others wait, so their models are free)
                for w in ranks[1:]:
                    w.flat.flat.copy_(worker.flat.flat)
                    if w.flat.int_buffers:
                        w.flat.sync_int_buffers()
                    w.exchange.versions = list(ex.versions)
            except Exception as error:
                self.fail(f"rank {lead} could not push for the group: {error}")
                raise
            with self._cond:
                self._done = step
                self._cond.notify_all()
            return
        with self._cond:
            self._wait(worker, lambda: self._done >= step)

    def _all_in(self, step: int) -> bool:
        """Whether every rank handed in ``step`` (the first rank's); ranks that never will stop
        the process with the reason (``protocol.exchange.process_blocked``)."""
        from raytrain_ft.protocol.exchange import process_blocked

        if all(self._handed.get(r) == step for r in self.members):
            return True
        why = process_blocked(self.members, self._handed, self._left, step, self._done)
        if why:
            self._error = self._error or why
            self._cond.notify_all()
        return False

    def leave(self, rank: int) -> None:
        """``rank``'s training thread ended (the first rank no longer waits for it)."""
        with self._cond:
            self._left.add(rank)
            self._cond.notify_all()

    def _wait(self, worker: Worker, ready) -> None:
        """Wait (holding the lock) until ``ready()``; the time counts as ``worker``'s exchange
        wait, not its compute."""
        from raytrain_ft.errors import TrainingError

        t0 = time.perf_counter()
        try:
            while self._error is None and not ready():
                self._cond.wait(timeout=1.0)
            if self._error is not None:
                raise TrainingError(f"pre-aggregation stopped: {self._error}")
        finally:
            worker.exchange.wait_s += time.perf_counter() - t0


class WorkerHost:
    """One process hosting several ranks (``cluster.ranks_per_process``): each rank is a full
    ``Worker`` with its own training thread, model copy, data and device; with pre-aggregation
    they push through one ``GroupSum``, else each has its own shard exchange and object-store
    traffic. Only the process (interpreter, torch, Ray core worker) is shared. Calls are executed
    one at a time, in the order sent."""

    def __init__(self) -> None:
        self.ranks: dict[int, Worker] = {}
        self.groups: dict[int, GroupSum] = {}

    def ready(self) -> str:
        return process_address()

    def add(self, rank: int, *args) -> str:
        config = args[2]
        group = None
        if config.preaggregates:
            members = config.rule().sum_members(rank)
            group = self.groups.setdefault(members[0], GroupSum(members))
        # a process holds consecutive ranks: the rank's place among them picks its GPU
        self.ranks[rank] = Worker(
            *args, group=group, local_index=rank % config.cluster.ranks_per_process
        )
        if group is not None:
            group.join(self.ranks[rank])
        return process_address()

    def call(self, rank: int, method: str, *args):
        if rank not in self.ranks:
            raise RuntimeError(f"this process hosts no rank {rank}")
        return getattr(self.ranks[rank], method)(*args)
