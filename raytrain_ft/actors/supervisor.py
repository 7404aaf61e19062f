"""Supervisor: the Ray actor hosting the run's ``SupervisorProtocol``.

An async actor. It delivers the protocol's messages (probes, operations,
route requests from workers), carries out its effects -- ``Persist`` to Ray's
internal KV *before* anything else the same step does, ``Create``/``Kill``
through ``ActorGroup``, timers on the event loop -- and answers the driver.
Every actor it creates is named ``{run_id}/...`` in the ``raytrain_ft``
namespace and detached, so its death kills none of them. When Ray restarts it
(``max_restarts``) ``__init__`` reads the registry back from the KV and the
protocol goes on from there; training continues meanwhile.

Can lose: nothing it acts on -- the registry is written before every action;
only the answers of probes and calls in flight when it died, which it asks
again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import sys
import time
import warnings
from dataclasses import dataclass

import numpy as np

from raytrain_ft.actors import NAMESPACE, process_address
from raytrain_ft.actors.group import ActorGroup, GroupSpec
from raytrain_ft.actors.metrics import SUPERVISOR_METRICS, Recorder
from raytrain_ft.actors.transport import Directory, failure_of, send
from raytrain_ft.protocol.messages import (
    Call,
    Create,
    Exported,
    Failure,
    InspectReplica,
    Kill,
    Note,
    Persist,
    Reply,
    Timer,
)
from raytrain_ft.protocol.supervisor import (
    RunPhase,
    SupervisorProtocol,
    SupervisorSpec,
    replica_slot,
)
from raytrain_ft.recovery.chaos import FaultHook, kills_recorded

logger = logging.getLogger(__name__)
events_logger = logging.getLogger("raytrain_ft.recovery.events")

PROBE_TIMEOUT_S = 2.0


def registry_key(run_id: str) -> str:
    return f"raytrain_ft/{run_id}/registry"


@dataclass(frozen=True, slots=True)
class Targets:
    """Who plays each role now: (actor name, NODE_IP:PID) per server slot, worker rank and spare."""

    run_id: str
    num_shards: int
    slots: tuple
    workers: tuple
    spares: tuple = ()
    num_spares: int = 0
    """Warm spares the run keeps (``spare:I`` kills name one below it)."""
    recovery: str = "replica"
    """The run's recovery mode (only ``replica`` has replica holders)."""

    def lookup(self, role: str, index: int) -> tuple:
        if role == "server":
            return self.slots[index]
        if role == "replica":
            return self.slots[replica_slot(index, self.num_shards)]
        if role == "worker":
            return self.workers[index]
        if role == "spare":
            return self.spares[index] if index < len(self.spares) else (None, None)
        raise ValueError(f"no actor plays role {role!r}")


def one_cut(parts: list[dict[int, np.ndarray]]) -> tuple[np.ndarray, int]:
    """The whole parameter vector from every shard's ``ServerProtocol.recent_params`` (in shard
    order), and its updates: shards read a moment apart may be an update apart, so the newest count
    every shard still holds is taken; with none in common (asynchronous modes keep only the current
    values), each shard's newest values and the fewest of their counts."""
    common = set.intersection(*(set(p) for p in parts))
    if common:
        k = max(common)
        return np.concatenate([p[k] for p in parts]), k
    return np.concatenate([p[max(p)] for p in parts]), min(max(p) for p in parts)


@dataclass(frozen=True, slots=True)
class SupervisorStatus:
    state: str
    workers: tuple
    """Latest ``WorkerStatus`` per rank (None before a rank's first answer)."""
    events: tuple[dict, ...]
    failure: str | None
    restarts: int
    """Times the supervisor itself was restarted."""
    epochs: tuple[int, ...]
    shard_steps: tuple[int, ...]
    targets: Targets
    cpu_s: float = 0.0
    """CPU seconds of the supervisor's process since it (or its latest restart) started."""
    failed_starting: bool = False
    """The failure is an actor's constructor that raised (a setting to fix), not a failed step."""
    process: str = ""
    """NODE_IP:PID of the supervisor's process."""


@dataclass(frozen=True, slots=True)
class SupervisorArgs:
    """Everything a supervisor (and a restarted one) is built from: small values only, so Ray keeps
    them in the actor's creation task instead of the object store."""

    run_id: str
    config: object
    ranges: tuple
    total_steps: int
    node_ids: tuple
    kills: tuple
    device: str
    checkpoint_dir: str | None
    task: object
    """``task.Task``, sealed (``transport.Sealed``): handed to the workers and servers unopened;
    without its object refs where ``refs_keeper`` holds them."""
    start_step: int = 0
    refs_keeper: str | None = None
    """Ray name of the run's ``transport.RefKeeper``, holding the refs of ``task`` (None: it holds
    none)."""


class Supervisor:
    def __init__(self, args: SupervisorArgs):
        import ray
        from ray.experimental import internal_kv

        from raytrain_ft.actors.group import ServerRun
        from raytrain_ft.protocol.spec import ServerSpec
        from raytrain_ft.recovery.policy import unlogged_allowed

        self._cpu_at_start = time.process_time()
        from raytrain_ft.recovery.chaos import server_hook

        if args.refs_keeper is not None:  # the task's refs, kept out of the constructor's args
            keeper = ray.get_actor(args.refs_keeper, namespace=NAMESPACE)
            # a future, not ray.get: this is an async actor (Ray warns of a blocking get in one),
            # though no call is served before its constructor returns
            refs = tuple(keeper.refs.remote().future().result())
            args = dataclasses.replace(args, task=dataclasses.replace(args.task, refs=refs))
        self.args = args
        cfg, rc = args.config, args.config.recovery
        self.run_id = args.run_id
        k, w = len(args.ranges), cfg.cluster.num_workers
        self.spec = SupervisorSpec(
            k,
            w,
            args.total_steps,
            rc.mode,
            start_step=args.start_step,
            resume_step=args.start_step if rc.resume_from else None,
            num_spares=rc.num_spares if rc.mode != "none" else 0,
            max_worker_restarts=rc.max_worker_restarts,
            max_server_replacements=rc.max_server_replacements,
            probe_interval_s=rc.health_check_interval_s,
            probe_timeout_s=PROBE_TIMEOUT_S,
            suspect_after_s=rc.suspect_after_s,
            start_timeout_s=actor_start_timeout_s(),
            op_timeout_s=rc.suspect_after_s * 6,
            node_ids=args.node_ids,
            process_ranks=cfg.cluster.ranks_per_process if cfg.preaggregates else 1,
        )
        server_spec = ServerSpec(
            cfg.optim,
            args.total_steps,
            w,
            cfg.rule(),
            rc.snapshot_interval,
            replicate=rc.mode == "replica",
            fold=rc.fold_log,
            checkpoint_interval=rc.checkpoint_interval if args.checkpoint_dir else 0,
            expected_mtbf_s=rc.expected_mtbf_s,
            unlogged=unlogged_allowed(rc.durability),
            pipelined=cfg.pipelined,
        )
        server_run = ServerRun(
            self.run_id,
            args.checkpoint_dir,
            rc.resume_from,
            cfg.cluster.metrics,
            task=args.task,
            seed=cfg.seed,
            faults=server_hook(self.run_id, args.kills),
        )
        self.directory = Directory(self.run_id)
        self.group = ActorGroup(
            GroupSpec(
                self.run_id,
                cfg,
                args.task,
                args.ranges,
                server_spec,
                server_run,
                args.device,
            ),
            self.directory,
        )
        self.faults = FaultHook(
            self.run_id,
            tuple(x for x in args.kills if x.trigger in ("recovery", "rereplication")),
            kill=self._fault_kill,
        )
        self.metrics = Recorder(self.run_id, SUPERVISOR_METRICS if cfg.cluster.metrics else ())
        with warnings.catch_warnings():  # the property reads a deprecated attribute internally
            warnings.simplefilter("ignore")
            reconstructed = ray.get_runtime_context().was_current_actor_reconstructed
        saved = internal_kv._internal_kv_get(registry_key(self.run_id))
        name_prefix = f"{self.run_id}/"
        if reconstructed and saved is not None:
            self.proto = SupervisorProtocol.restore(
                self.spec,
                list(args.ranges),
                self._params_of,
                saved.decode(),
                time.time(),
                key=registry_key(self.run_id),
                name_prefix=name_prefix,
            )
            fired = {r["kill"] for r in kills_recorded(self.run_id)}
            self.faults.pending = [x for x in self.faults.pending if str(x) not in fired]
            logger.warning(
                "[supervisor] restarted: registry read back (%d slots, %d workers)",
                len(self.proto.reg.slots),
                w,
            )
        else:
            self.proto = SupervisorProtocol(
                self.spec,
                list(args.ranges),
                self._params_of,
                now=time.time(),
                key=registry_key(self.run_id),
                name_prefix=name_prefix,
            )
        self.started_at = self.proto.reg.started_at
        self._rids = itertools.count(1)
        self._answers: dict[int, asyncio.Future] = {}
        self._running = False
        self._changed: asyncio.Event | None = None
        self._events_seen = len(self.proto.reg.events)

    # --- the loop
    # ----------------------------------------------------------------------------------------

    def _ensure_running(self) -> None:
        if self._running:
            return
        self._running = True
        self._changed = asyncio.Event()
        self._perform(self.proto.on_start(time.time()))
        asyncio.get_running_loop().create_task(self._heartbeat())

    async def _heartbeat(self) -> None:
        """A probe round at least every few intervals, whatever happened to the protocol's own
        timers: the protocol starts one only when no round started for 5 intervals (its timers
        are lost), so this never adds a second chain of rounds."""
        while self.proto.phase not in (RunPhase.DONE, RunPhase.FAILED):
            await asyncio.sleep(self.spec.probe_interval_s * 5)
            self._guarded(self.proto.on_timer, "heartbeat")

    async def start(self) -> str:
        """Wait until every worker trains (or the run failed while starting). Returns the phase."""
        self._ensure_running()
        while self.proto.phase is RunPhase.STARTING:
            self._changed.clear()
            await self._changed.wait()
        return self.proto.phase.value

    async def deliver(self, msg):
        """Route requests from workers."""
        self._ensure_running()
        rid = next(self._rids)
        answer = self._answers[rid] = asyncio.get_running_loop().create_future()
        self._perform(self.proto.on_request(rid, msg, time.time()))
        return await answer

    def _perform(self, effects: list) -> None:
        from ray.experimental import internal_kv

        loop = asyncio.get_running_loop()
        for e in effects:
            if isinstance(e, Persist):
                internal_kv._internal_kv_put(e.key, e.value.encode(), overwrite=True)
            elif isinstance(e, Reply):
                fut = self._answers.pop(e.rid, None)
                if fut is not None and not fut.done():
                    fut.set_result(e.value)
            elif isinstance(e, Call):
                loop.create_task(self._call(e))
            elif isinstance(e, Timer):
                loop.call_later(e.delay_s, self._guarded, self.proto.on_timer, e.token)
            elif isinstance(e, Create):
                self.group.create(e)
            elif isinstance(e, Kill):
                logger.info("[supervisor] killing %s: %s", e.name, e.reason)
                self.group.kill(e.name)
            elif isinstance(e, Note):
                self._note(e)
        self._record_events()
        if self._changed is not None:
            self._changed.set()

    def _guarded(self, handler, *args) -> None:
        """Run a protocol handler outside a method call (a timer, an answer) and carry out its
        effects; a bug in either ends the run with its traceback instead of leaving the loop
        silently without its next step."""
        try:
            self._perform(handler(*args, time.time()))
        except Exception:  # noqa: BLE001 -- reported as the run's failure
            import traceback

            reason = f"supervisor bug: {traceback.format_exc()}"
            logger.error("[supervisor] %s", reason)
            self.proto.reg.phase, self.proto.reg.failure = RunPhase.FAILED, reason
            if self._changed is not None:
                self._changed.set()

    async def _call(self, e: Call) -> None:
        handle = self.directory.handle(e.dst)
        if handle is None:
            self._guarded(self.proto.on_failure, e.cid, Failure.DEAD)
            return
        try:
            value = await send(handle, e.msg)
        except Exception as error:  # noqa: BLE001 -- Ray's errors become the protocol's failures
            failure = failure_of(error)
            if failure is None:
                failure = (
                    Failure.UNAVAILABLE
                )  # the callee raised (e.g. a hosted rank not added yet): ask again later
            if failure is Failure.DEAD:
                self.directory.forget(e.dst)
            value = failure
        if isinstance(value, Failure):
            self._guarded(self.proto.on_failure, e.cid, value)
        else:
            self._guarded(self.proto.on_reply, e.cid, value)

    def _note(self, e: Note) -> None:
        if e.event in (
            "run_failed",
            "run_done",
            "recovered",
            "rereplicated",
            "recovery_started",
            "recovery_abandoned",
            "retiring",
        ):
            logger.info("[supervisor] %s %s", e.event, e.fields)
        elif e.event == "spare_lost":  # no recovery: it served nothing; the user should know
            logger.warning(
                "[supervisor] %s; a new warm spare is started in its place (it served nothing)",
                e.fields["reason"],
            )
        self.faults.on_note(e)

    def _record_events(self) -> None:
        """Log and count each recovery once it is over (serving again)."""
        events = self.proto.reg.events
        while self._events_seen < len(events) and events[self._events_seen].serving_at is not None:
            ev = events[self._events_seen]
            self._events_seen += 1
            d = event_dict(ev, self.started_at)
            tags = {"role": d["role"], "source": d["source"]}
            self.metrics.inc("recoveries", 1, tags)
            self.metrics.observe("recovery_duration_seconds", d["duration_s"], tags)
            events_logger.info(
                "recovered %s %s in %.3fs (%s, replayed %d, %d bytes moved)",
                d["role"],
                d["index"],
                d["duration_s"],
                d["source"],
                d["replayed"],
                d["bytes_moved"],
                extra={
                    "run_id": self.run_id,
                    "shard": d["index"],
                    "step": d.get("step"),
                    "decision": d["source"],
                },
            )

    def _fault_kill(self, k, fields: dict) -> tuple[str, str]:
        """@recovery / @rereplication kills: ``server:i`` for the shard being rebuilt names its
        replacement."""
        from raytrain_ft.actors.group import kill_process

        if k.role == "server" and fields.get("shard") == k.index and "spare" in fields:
            name, process = fields["spare"], None
        else:
            name, process = self.targets().lookup(k.role, k.index)
        handle = self.directory.handle(name) if name else None
        if handle is None:
            return "already gone", name or ""
        return kill_process(handle, process), name

    @staticmethod
    def _params_of(shard: int) -> None:
        """A shard's initial values: left to the server that loads them (it builds the model from
        the task; the supervisor never imports torch or the user's model code)."""
        return None

    # --- what the driver reads
    # ---------------------------------------------------------------------------

    async def status(self) -> SupervisorStatus:
        self._ensure_running()
        reg, view = self.proto.reg, self.proto.view
        workers = tuple(
            _status(self.proto.latest.get(w.actor)) if w.actor else None for w in reg.workers
        )
        steps = tuple(
            (
                view.describe(reg.slots[i].actor).seq
                if view is not None and view.describe(reg.slots[i].actor)
                else -1
            )
            for i in range(self.spec.num_shards)
        )
        done = [event_dict(e, self.started_at) for e in reg.events if e.serving_at is not None]
        return SupervisorStatus(
            reg.phase.value,
            workers,
            tuple(done),
            reg.failure,
            reg.restarts,
            self.proto.epochs(),
            steps,
            self.targets(),
            time.process_time() - self._cpu_at_start,
            self.proto.failed_starting,
            process_address(),
        )

    def targets(self) -> Targets:
        reg, view = self.proto.reg, self.proto.view

        def process(name):
            a = view.answers.get(name) if view is not None and name else None
            return getattr(a, "process", None)

        return Targets(
            self.run_id,
            self.spec.num_shards,
            tuple((s.actor, process(s.actor)) for s in reg.slots),
            tuple((w.actor, process(w.actor)) for w in reg.workers),
            tuple((n, process(n)) for n in reg.spares),
            self.spec.num_spares,
            self.spec.recovery,
        )

    async def kills_done(self) -> list[dict]:
        return kills_recorded(self.run_id)

    async def params_now(self):
        """(The whole parameter vector as the shards' primaries hold it now, its updates:
        ``one_cut``), or None while a slot has no primary to ask (a recovery): a periodic
        evaluation skips that moment."""
        reg, k = self.proto.reg, self.spec.num_shards
        names = [reg.slots[i].actor for i in range(k)]
        handles = [self.directory.handle(n) if n else None for n in names]
        if any(h is None for h in handles):
            return None
        try:
            parts = await asyncio.wait_for(
                asyncio.gather(*[h.params_now.remote() for h in handles]), PROBE_TIMEOUT_S * 5
            )
        except Exception:  # noqa: BLE001 -- a primary lost meanwhile: no evaluation this time
            return None
        if any(p is None for p in parts):
            return None
        return one_cut(parts)

    async def final(self) -> FinalNames:
        """Who holds the run's end state: the driver reads it from them (``read_final``), so the
        parameters and optimizer state (torch tensors) never pass through this process."""
        reg, k = self.proto.reg, self.spec.num_shards
        return FinalNames(
            tuple(reg.slots[i].actor for i in range(k)),
            tuple(reg.slots[replica_slot(i, k)].actor for i in range(k))
            if self.spec.recovery == "replica"
            else (),
            tuple(w.actor for w in reg.workers),
            "torch" in sys.modules,
        )


@dataclass(frozen=True, slots=True)
class FinalNames:
    primaries: tuple
    """Per shard: the primary's actor name."""
    holders: tuple
    """Per shard: the actor holding its replica (empty without replicas)."""
    workers: tuple
    """Per rank: the worker's actor name (None: none)."""
    supervisor_imported_torch: bool = False
    """Whether torch was loaded in the supervisor's process (it should not be: see ``Sealed``)."""


def read_final(run_id: str, names: FinalNames, ranges, optim, total_steps: int) -> dict:
    """In the driver: final parameters, server stats, step times, the applied records, and I4 --
    each replica replayed equals its primary."""
    import ray

    from raytrain_ft.errors import TrainingError
    from raytrain_ft.recovery.replay import replay
    from raytrain_ft.shard import ShardStats

    directory = Directory(run_id)
    finals = _answers(directory, names.primaries, lambda h, i: h.final.remote())
    exports = _answers(directory, names.holders, lambda h, i: send(h, InspectReplica(i)))
    rebuilt = {
        i: replay(ex.snapshot, list(ex.entries), ranges[i], optim, total_steps).state
        for i, ex in enumerate(exports)
        if isinstance(ex, Exported)
    }
    gone = [i for i, f in enumerate(finals) if f is None]
    for i in gone:
        # the primary died after the run ended (before its state was read): its replica holds
        # every acknowledged update, as for a recovery
        if i not in rebuilt:
            raise TrainingError(
                f"shard {i} is lost after training ended: its primary {names.primaries[i]} died "
                "before the run's end state was read, and no replica of it could be read"
                + (f" (holder {names.holders[i]})" if names.holders else " (--recovery none)")
            )
        logger.warning(
            "[driver] the primary of shard %d (%s) died after training ended; its end state is "
            "rebuilt from its replica on %s",
            i,
            names.primaries[i],
            names.holders[i],
        )
        state = rebuilt[i]
        finals[i] = (
            state.params_copy(),
            ShardStats(i, state.seq, state.updates_applied, 0, ranges[i].size),
            state.applied_copy(),
            dict(state.clocks),
            state.optimizer.state_dict(),
        )
    params = [f[0] for f in finals]
    # I4: each replica replayed equals its primary (None: one of the two was gone at the end; a
    # replica its holder would not export does not match)
    replicas_match = [
        None
        if i in gone or exports[i] is None
        else i in rebuilt
        and bool(np.array_equal(rebuilt[i].params_copy(), params[i]))
        and rebuilt[i].applied_copy() == f[2]
        and rebuilt[i].clocks == f[3]
        and _same_state(rebuilt[i].optimizer.state_dict(), f[4])
        for i, f in zip(range(len(names.holders)), finals)
    ]
    times = []
    for name in names.workers:
        handle = directory.handle(name) if name else None
        try:
            times.append(ray.get(handle.step_end_times.remote(), timeout=PROBE_TIMEOUT_S * 5))
        except Exception:  # noqa: BLE001 -- a worker gone at the very end: no step times from it
            times.append([])
    return {
        "params": np.concatenate(params),
        "stats": [f[1] for f in finals],
        "applied": [f[2] for f in finals],
        "step_end_times": times,
        "replicas_match": replicas_match,
        "supervisor_imported_torch": names.supervisor_imported_torch,
    }


def _answers(directory: Directory, names: tuple, ask) -> list:
    """``ask(handle, i)`` of each named actor, gathered; None where the actor is gone (dead, or
    its process lost with a node) or answered with a failure."""
    import ray

    calls = [
        ask(handle, i) if (handle := directory.handle(name)) is not None else None
        for i, name in enumerate(names)
    ]
    out = []
    for call in calls:
        try:
            out.append(ray.get(call) if call is not None else None)
        except Exception as e:  # noqa: BLE001 -- Ray's errors of a gone actor; others raise
            if failure_of(e) is None:
                raise
            out.append(None)
    return out


def _status(answer):
    """A worker's probe answer, if it is a status (not a failure)."""
    return answer if hasattr(answer, "done") and hasattr(answer, "rank") else None


def _same_state(a: dict, b: dict) -> bool:
    if a["step_count"] != b["step_count"] or set(a["state"]) != set(b["state"]):
        return False
    return all(bool((a["state"][key] == b["state"][key]).all()) for key in a["state"])


def event_dict(e, started_at: float) -> dict:
    """A recovery event as the JSON summary reports it (times relative to the run's start)."""
    d = dataclasses.asdict(e)
    serving = e.serving_at if e.serving_at is not None else e.detected_at
    d.update(
        detected_s=round(e.detected_at - started_at, 4),
        serving_s=round(serving - started_at, 4),
        duration_s=round(serving - e.detected_at, 4),
    )
    return d


ACTOR_START_TIMEOUT_ENV_VAR = "RAYTRAIN_FT_ACTOR_START_TIMEOUT_S"
DEFAULT_ACTOR_START_TIMEOUT_S = 180.0


def actor_start_timeout_s() -> float:
    import os

    return float(os.environ.get(ACTOR_START_TIMEOUT_ENV_VAR, DEFAULT_ACTOR_START_TIMEOUT_S))
