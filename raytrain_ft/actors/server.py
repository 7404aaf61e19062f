"""ParameterServer: the Ray actor hosting one ``ServerProtocol`` (a shard's primary, replica holder,
or spare).

It only delivers messages and carries out effects; what a server decides
lives in ``protocol/server.py`` and is explored by the simulator.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time

import numpy as np

from raytrain_ft.actors import NAMESPACE, process_address, watch_supervisor
from raytrain_ft.actors.group import ServerRun
from raytrain_ft.actors.transport import Directory, failure_of, send, split_reply, unpack
from raytrain_ft.errors import ConfigError
from raytrain_ft.protocol.messages import (
    Call,
    Failure,
    Fold,
    Load,
    Note,
    RefusalKind,
    Refused,
    Reply,
    SaveCheckpoint,
    Timer,
)
from raytrain_ft.protocol.spec import ServerSpec

logger = logging.getLogger(__name__)


FLUSH_TIMEOUT_S = 10.0
"""At the end of a run, how long a primary waits for its holder to log its last updates."""


class ParameterServer:
    """A server process of the run.

    Can lose: everything it holds when its process dies. Nothing acknowledged
    is lost with it: its shard is rebuilt from the holder's log, and the
    replicas it held are sent again by their primaries (the supervisor names
    the new holder).
    """

    def __init__(self, name: str, spec: ServerSpec, run: ServerRun, warm: bool = False):
        import ray
        import torch

        torch.set_num_threads(1)
        from raytrain_ft.actors.warm import WarmLife

        self._life = WarmLife(name, "server" if warm else "", self._end_after)
        """Its incarnations and rests (``actors/warm.py``)."""
        self._node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
        self.proto = None
        self._become(name, spec, run)

    @property
    def name(self) -> str | None:
        """The incarnation this process serves (None while it rests)."""
        return self._life.name

    def _become(self, name: str, spec: ServerSpec, run: ServerRun) -> None:
        from raytrain_ft.actors.metrics import SERVER_METRICS, Recorder
        from raytrain_ft.protocol.server import ServerProtocol

        self._cpu_at_start = time.process_time()
        self.run = run
        self.proto = ServerProtocol(
            name, spec, clock=time.perf_counter, node=self._node, process=process_address()
        )
        self.directory = Directory(run.run_id)
        self.metrics = Recorder(run.run_id, SERVER_METRICS if run.metrics else ())
        self._rids = itertools.count(1)
        self._answers: dict[int, asyncio.Future] = {}
        watch_supervisor(run.run_id, NAMESPACE)
        self._life.name = name  # last: calls are answered once the whole role is built

    async def _addressed(self, to: str | None) -> None:
        """Refuse (``Gone``) a call for an incarnation this process is not. A call for the name it
        was just claimed for may overtake ``become`` (an async actor runs calls out of order): it
        waits for it."""
        from raytrain_ft.actors.warm import BECOME_WAIT_S, Gone, claimed_for

        life = self._life
        try:
            life.check(to)
        except Gone:
            if life.name is not None or not claimed_for(to, life.ray_name):
                raise
            deadline = time.monotonic() + BECOME_WAIT_S
            while life.name is None and life.failed is None and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            life.check(to)

    async def code_unchanged(self) -> bool:
        from raytrain_ft.actors.warm import loaded_code_unchanged

        return loaded_code_unchanged(self._life.started)

    async def become(self, name: str, spec: ServerSpec, run: ServerRun) -> str:
        """A resting warm process takes a new incarnation's name and role (``actors/warm.py``)."""
        self._life.becoming()
        try:
            self._become(name, spec, run)
        except Exception as error:  # calls for the name get it, as a constructor error; it ends
            self._life.become_failed(name, error)
            raise
        return process_address()

    async def rest(self, keep_s: float, *, to: str | None = None) -> str:
        """The run ended well: drop this incarnation (every later call to it raises ``Gone``), offer
        the process to the next run, and end it after ``keep_s`` unless claimed. Returns the Ray
        name of the process."""
        await self._addressed(to)
        return self._life.rest(keep_s, self._node, self._drop)

    def _drop(self, gone: str) -> None:
        from raytrain_ft.actors.warm import Gone

        self.metrics.retire()
        # nothing of the run stays referenced (its task's data, its metrics' tags)
        self.proto = self.run = self.directory = self.metrics = None
        for answer in self._answers.values():
            if not answer.done():
                answer.set_exception(Gone(f"{gone} is gone"))
        self._answers = {}

    def _end_after(self, delay_s: float, *args) -> None:
        """``WarmLife``'s timers run in the event loop: a ``become`` runs wholly before or wholly
        after one."""
        asyncio.get_running_loop().call_later(delay_s, self._life.rest_over, *args)

    async def ready(self, *, to: str | None = None) -> str:
        await self._addressed(to)
        return process_address()

    async def deliver(self, msg, *, to: str | None = None):
        """Every protocol message to this server comes here; the answer is the protocol's reply."""
        await self._addressed(to)
        if isinstance(msg, Load) and msg.params is None:
            try:
                msg = (
                    self._read_checkpoint(msg)
                    if msg.checkpoint_step is not None
                    else self._initial(msg)
                )
            except ConfigError as error:  # the run fails as if this server's constructor raised
                raise self._life.unfit(error) from None
        rid = next(self._rids)
        answer = self._answers[rid] = asyncio.get_running_loop().create_future()
        self._perform(self.proto.on_request(rid, msg))
        return await answer

    async def deliver_parts(self, msg, counts: tuple, *parts: np.ndarray, to: str | None = None):
        return await self.deliver(unpack(msg, counts, parts), to=to)

    async def deliver_split(
        self, msg, counts: tuple, n_out: int, *parts: np.ndarray, to: str | None = None
    ):
        """``deliver`` (of a message ``send_split`` may have put in parts) with the reply's
        parameters returned as ``n_out`` inline returns (the caller sets num_returns)."""
        reply = await self.deliver(unpack(msg, counts, parts) if counts else msg, to=to)
        return split_reply(reply, n_out)

    # --- carrying out effects
    # ------------------------------------------------------------------------

    def _perform(self, effects: list) -> None:
        loop = asyncio.get_running_loop()
        proto = self.proto
        for e in effects:
            if isinstance(e, Reply):
                fut = self._answers.pop(e.rid, None)
                if fut is not None and not fut.done():
                    fut.set_result(e.value)
            elif isinstance(e, Call):
                loop.create_task(self._call(e))
            elif isinstance(e, Timer):
                loop.call_later(e.delay_s, self._guarded, proto, proto.on_timer, e.token)
            elif isinstance(e, Fold):  # after the reply is on its way
                loop.call_soon(self._fold, proto, e.shard)
            elif isinstance(e, SaveCheckpoint):
                from raytrain_ft.recovery.checkpoint import save_shard_checkpoint

                save_shard_checkpoint(
                    self.run.checkpoint_dir, e.shard, e.step, e.params, e.optimizer_state, e.skipped
                )
            elif isinstance(e, Note):
                self._note(e)

    def _fold(self, proto, shard: int) -> None:
        if proto is self.proto:
            proto.fold(shard)

    def _guarded(self, proto, handler, *args) -> None:
        """Run a protocol handler outside a method call (a timer, an answer) and carry out its
        effects; a bug is logged with its traceback rather than lost in the event loop. Nothing
        runs for an incarnation this process no longer is (``proto`` is the one that asked)."""
        if proto is not self.proto:
            return
        try:
            self._perform(handler(*args))
        except Exception:  # noqa: BLE001
            logger.exception("[server %s] protocol bug", self.name)

    async def _call(self, e: Call) -> None:
        proto, directory = self.proto, self.directory
        handle = directory.handle(e.dst)
        if handle is None:
            self._guarded(proto, proto.on_failure, e.cid, Failure.DEAD)
            return
        try:
            value = await send(handle, e.msg)
        except Exception as error:  # noqa: BLE001 -- Ray's errors become the protocol's failures
            failure = failure_of(error)
            if failure is None:
                value = Refused(RefusalKind.FAILED, f"{e.dst} raised: {error}")
            else:
                if failure is Failure.DEAD:
                    directory.forget(e.dst)
                self._guarded(
                    proto,
                    proto.on_failure,
                    e.cid,
                    failure if isinstance(failure, Failure) else Failure.DEAD,
                )
                return
        self._guarded(proto, proto.on_reply, e.cid, value)

    def _note(self, e: Note) -> None:
        f = e.fields
        if e.event == "update" and self.metrics.enabled:
            tags = {"shard": str(f["shard"])}
            self.metrics.inc("updates", 1, tags)
            self.metrics.observe("staleness", f["staleness"], tags)
            p = self.proto.primary
            if p is not None:
                self.metrics.set("replica_lag_seq", p.state.seq - p.logged, tags)
        elif e.event in ("deposed", "primary_recovered", "replica_installed", "holder_lost"):
            logger.info("[server %s] %s %s", self.name, e.event, f)
        if self.run.faults is not None:
            self.run.faults.on_note(e, self.name)

    def _read_checkpoint(self, m: Load) -> Load:
        from raytrain_ft.recovery.checkpoint import load_shard_checkpoint, shard_checkpoint_path

        directory = self.run.resume_dir if m.resume else self.run.checkpoint_dir
        params, step, opt_state, _, skipped = load_shard_checkpoint(
            shard_checkpoint_path(directory, m.shard.index, m.checkpoint_step)
        )
        return dataclasses.replace(
            m, params=params, seq=step, optimizer_state=opt_state, skipped=skipped
        )

    def _initial(self, m: Load) -> Load:
        """The shard's values in the model the run starts from (built here from the task, as every
        process builds it: same seed, same values)."""
        from raytrain_ft.params import flatten_state

        model = self.run.task.open().build_model(self.run.seed)
        flat = flatten_state(model).numpy()
        return dataclasses.replace(m, params=flat[m.shard.start : m.shard.end].copy())

    # --- what the driver reads at the end
    # --------------------------------------------------------------

    async def params_now(self, *, to: str | None = None):
        """{updates: parameters} of the primary this server is (``ServerProtocol.recent_params``),
        or None if it is no primary."""
        await self._addressed(to)
        return self.proto.recent_params() if self.proto.primary is not None else None

    async def final(self, *, to: str | None = None) -> tuple:
        """(parameters, ShardStats, applied record, per-rank clocks, optimizer state) of the primary
        this server is."""
        await self._addressed(to)
        proto = self.proto
        p = proto.primary
        if p is None:
            raise RuntimeError(f"{self.name} is not a primary")
        # relaxed durability: the run may end with up to K acknowledged updates on their way to
        # the holder; let them be logged before the replica is compared (strict: nothing waits)
        deadline = time.monotonic() + FLUSH_TIMEOUT_S
        while p.logged < p.state.seq and p.holder is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        if proto is not self.proto:
            from raytrain_ft.actors.warm import Gone

            raise Gone(f"{proto.name} is gone")
        return (
            proto.params(),
            dataclasses.replace(proto.stats(), cpu_s=time.process_time() - self._cpu_at_start),
            p.state.applied_copy(),
            dict(p.state.clocks),
            p.state.optimizer.state_dict(),
        )
