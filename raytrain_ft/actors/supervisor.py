"""Supervisor: membership, routing table and failure handling for one run.

A threaded Ray actor. A monitor thread probes every server and worker each
``health_check_interval_s`` (or at once when a worker reports a failed call),
turns the answers into a ``ClusterStatus`` and runs one iteration of the pure
state machine in ``recovery/policy.py``; this class only carries out what it
decides. Workers never route through the supervisor: they ask it for a new
route only after a server died (``route_after``).

Every actor it creates is named ``{run_id}/...`` in the ``raytrain_ft``
namespace and detached, so a supervisor crash kills none of them. When Ray
restarts the supervisor (``max_restarts``), ``__init__`` rebuilds the tables
from the live named actors (who holds which shard at which epoch) and reads
its recovery events back from Ray's internal KV; training goes on meanwhile.

Can lose: the recovery in progress when it dies (the restarted supervisor
sees the same dead slot, or an unreplicated shard, and finishes the job).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import traceback
import uuid
import warnings
from dataclasses import dataclass

import numpy as np

from raytrain_ft.actors import NAMESPACE
from raytrain_ft.actors.metrics import SUPERVISOR_METRICS, Recorder
from raytrain_ft.config import TrainConfig
from raytrain_ft.errors import TrainingError
from raytrain_ft.params import ShardRange
from raytrain_ft.recovery.checkpoint import latest_common_step, shard_checkpoint_path
from raytrain_ft.recovery.faults import KillSpec
from raytrain_ft.recovery.policy import (
    ClusterStatus,
    Limits,
    SupervisorCore,
    SupervisorState,
    WorkerView,
    num_slots,
    primary_shard,
    replica_shards,
    replica_slot,
    slot_nodes,
)

logger = logging.getLogger(__name__)
events_logger = logging.getLogger("raytrain_ft.recovery.events")

ROUTE_TIMEOUT_ENV_VAR = "RAYTRAIN_FT_ROUTE_TIMEOUT_S"
DEFAULT_ROUTE_TIMEOUT_S = 300.0
PROBE_TIMEOUT_S = 2.0


@dataclass(frozen=True, slots=True)
class Targets:
    """Who plays each role right now: (handle, NODE_IP:PID) per server slot and per worker rank."""

    num_shards: int
    slots: tuple
    workers: tuple

    def lookup(self, role: str, index: int) -> tuple:
        if role == "server":
            return self.slots[index]
        if role == "replica":
            return self.slots[replica_slot(index, self.num_shards)]
        if role == "worker":
            return self.workers[index]
        raise ValueError(f"no actor plays role {role!r}")


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


def kill_process(handle, process: str | None) -> str:
    """Kill an actor for real: SIGKILL its process (``NODE_IP:PID``) when it runs on this host and is a Ray
    actor process, else ``ray.kill`` (also a forced kill). Never signals a process of another host."""
    import signal

    import ray

    ip, _, pid = (process or "").rpartition(":")
    if pid.isdigit() and ip == ray.util.get_node_ip_address():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                is_actor = fh.read().startswith(b"ray::")
            if is_actor:
                os.kill(int(pid), signal.SIGKILL)
                return "SIGKILL"
        except (FileNotFoundError, ProcessLookupError):
            pass
    from raytrain_ft.actors.worker import actor_of

    ray.kill(actor_of(handle), no_restart=True)
    return "ray.kill"


class Supervisor:
    def __init__(self, run_id: str, config: TrainConfig, ranges: list[ShardRange], total_steps: int, init_flat: np.ndarray,
                 node_ids: list[str], kills: tuple[KillSpec, ...] = (), device: str = "cpu", checkpoint_dir: str | None = None):
        import ray

        self.run_id, self.cfg, self.ranges, self.total_steps = run_id, config, ranges, total_steps
        self.init_flat, self.node_ids, self.device, self.checkpoint_dir = init_flat, node_ids, device, checkpoint_dir
        self.k = len(ranges)
        self.w = config.cluster.num_workers
        self.replica_mode = config.recovery.recovery == "replica"
        self.lock = threading.RLock()
        self.route_changed = threading.Condition(self.lock)
        self.wake = threading.Event()
        self.slots: list = [None] * num_slots(self.k)
        self.slot_desc: list = [None] * len(self.slots)
        self.epochs = [0] * self.k
        self.workers: list = [None] * self.w
        self.worker_pids: list[str | None] = [None] * self.w
        self._hosts: dict[int, tuple] = {}
        """ranks_per_process > 1: per group of ranks, (its WorkerHost actor, the ranks it was given)."""
        self.worker_status: list = [None] * self.w
        self.worker_restarts = [0] * self.w
        self.pending_workers: dict[int, tuple] = {}
        self.spares: list[tuple] = []  # (handle, ready_ref, node_id)
        self.server_replacements = 0
        self.recoveries_started = 0
        self.all_kills = tuple(kills)
        self.kills = [k for k in kills if k.trigger == "recovery"]
        self.kills_fired: list[dict] = []
        self.events: list[dict] = []
        self.started_at = time.time()
        self.restarts = 0
        rc = config.recovery
        self.core = SupervisorCore(self, Limits(rc.num_spares, rc.max_worker_restarts, rc.max_server_replacements, rc.recovery != "none"))
        self.core.events = self.events
        self.metrics = Recorder(run_id, SUPERVISOR_METRICS if config.cluster.metrics else ())
        self._monitor: threading.Thread | None = None
        self._self_handle = ray.get_runtime_context().current_actor
        with warnings.catch_warnings():  # the property reads a deprecated attribute internally
            warnings.simplefilter("ignore")
            reconstructed = ray.get_runtime_context().was_current_actor_reconstructed
        if reconstructed:
            t0 = time.time()
            self._rebuild()
            self.restarts += 1
            self._record({"role": "supervisor", "index": 0, "detected_at": t0, "serving_at": time.time(), "replayed": 0,
                          "bytes_moved": 0, "source": "rebuilt from live actors + internal KV"})
            self._start_monitor()

    # --- actor creation ----------------------------------------------------------

    def _options(self, kind: str, node_id: str | None, **resources) -> dict:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        opts = dict(name=f"{self.run_id}/{kind}-{uuid.uuid4().hex[:8]}", namespace=NAMESPACE, lifetime="detached", max_restarts=0, **resources)
        if node_id:
            # hard affinity: soft affinity does not place zero-CPU actors (measured); the node is alive when chosen
            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id, soft=False)
        return opts

    def _new_server(self, slot: int | None, shard: int | None, node_id: str | None, faults: dict | None = None):
        import ray

        from raytrain_ft.actors.server import ParameterServer

        cc, rc = self.cfg.cluster, self.cfg.recovery
        cls = ray.remote(ParameterServer).options(**self._options("server", node_id, num_cpus=0))
        return cls.remote(
            slot, self.ranges[shard] if shard is not None else None, self.cfg.optim, self.total_steps, self.w, cc.server_threads,
            rc.snapshot_interval, rc.recovery, self.checkpoint_dir, rc.checkpoint_interval, faults, self._fault_key, rc.fold_log, self.cfg.rule(),
            self.run_id, self.cfg.cluster.metrics,
        )

    def _new_worker(self, rank: int):
        import ray

        from raytrain_ft.actors.worker import RankHandle, Worker, WorkerHost

        gpu = 1 if self.device != "cpu" else 0
        with self.lock:
            routing = [(self.slots[i], self.epochs[i]) for i in range(self.k)]
        args = (self.cfg, self.ranges, routing, self._self_handle, self.device, self.run_id)
        per_process = self.cfg.cluster.ranks_per_process
        if per_process == 1:
            cls = ray.remote(Worker).options(**self._options(f"worker-{rank}", None, num_cpus=self.cfg.cluster.cpus_per_worker, num_gpus=gpu))
            return cls.remote(rank, *args)
        group = rank // per_process
        host, ranks = self._hosts.get(group, (None, set()))
        if host is None or rank in ranks:  # the group's first rank, or a restart after its process died: a new process
            host, ranks = ray.remote(WorkerHost).options(**self._options(f"workers-{group}", None, num_cpus=self.cfg.cluster.cpus_per_worker)).remote(), set()
            self._hosts[group] = (host, ranks)
        ranks.add(rank)
        host.add.remote(rank, *args)  # runs before any later call to the rank (one caller, calls in order)
        return RankHandle(host, rank)

    @property
    def _fault_key(self) -> str:
        return f"raytrain_ft/{self.run_id}/kill/"

    def _server_faults(self, slot: int, kills: tuple[KillSpec, ...]) -> dict:
        """The @snapshot kills a slot's first actor carries out itself (replacements carry none)."""
        out = {}
        for k in kills:
            if k.trigger != "snapshot":
                continue
            if k.role == "server" and k.index == primary_shard(slot, self.k):
                out[("snapshot_send", int(k.value))] = str(k)
            if k.role == "replica" and replica_slot(k.index, self.k) == slot:
                out[("snapshot_receive", k.index, int(k.value))] = str(k)
        return out

    # --- start ---------------------------------------------------------------------

    def start(self) -> int:
        """Create and load every server, replicate every shard, start spares and workers. Returns slots created."""
        import ray

        from raytrain_ft.trainer import wait_ready

        nodes = slot_nodes(len(self.slots), self.node_ids)
        shared = [j for j in range(len(nodes)) if len(nodes) > 1 and nodes[j] == nodes[(j + 1) % len(nodes)]]
        if shared:
            logger.warning("[supervisor] %d servers on %d nodes: slots %s share a node with their ring neighbour, so losing "
                           "that node loses a shard; use an even number of servers or 3+ nodes", len(nodes), len(self.node_ids), shared)
        self.slots = [
            self._new_server(j, primary_shard(j, self.k), nodes[j] if nodes else None, self._server_faults(j, self.all_kills))
            for j in range(len(self.slots))
        ]
        wait_ready([s.ready.remote() for s in self.slots], f"{len(self.slots)} parameter servers", self.slots)
        start_step = 0
        resume = self.cfg.recovery.resume_from
        if resume:  # after a whole-cluster loss: the newest step every shard has on disk
            start_step = latest_common_step(resume, self.k)
            ray.get([self.slots[i].restore_checkpoint.remote(i, r, shard_checkpoint_path(resume, i, start_step), 0) for i, r in enumerate(self.ranges)])
            logger.warning("[supervisor] resumed from %s at step %d", resume, start_step)
        else:
            ray.get([self.slots[i].load.remote(self.init_flat[r.start : r.end]) for i, r in enumerate(self.ranges)])
        if self.replica_mode:
            ray.get([self.slots[i].set_replica.remote(self.slots[replica_slot(i, self.k)]) for i in range(self.k)])
        self.slot_desc = ray.get([s.describe.remote() for s in self.slots])
        for _ in range(self.cfg.recovery.num_spares):
            self.add_spare()
        self.workers = [self._new_worker(r) for r in range(self.w)]
        asks = f"{self.cfg.cluster.cpus_per_worker} CPU" + (", 1 GPU" if self.device != "cpu" else "")
        self.worker_pids = wait_ready([w.ready.remote() for w in self.workers], f"{self.w} workers ({asks} each)", self.workers + self.slots)
        ray.get([w.start.remote(start_step, self.total_steps) for w in self.workers])
        self.started_at = time.time()
        self._persist()
        self._start_monitor()
        return len(self.slots)

    def _start_monitor(self) -> None:
        self.core.state = SupervisorState.RUNNING
        self._monitor = threading.Thread(target=self._monitor_loop, name="supervisor-monitor", daemon=True)
        self._monitor.start()

    def _monitor_loop(self) -> None:
        interval = self.cfg.recovery.health_check_interval_s
        while self.core.state not in (SupervisorState.DONE, SupervisorState.FAILED):
            try:
                previous, nxt = self.core.advance(time.time())
            except Exception:
                self.core.failure = f"supervisor bug: {traceback.format_exc()}"
                self.core.state = SupervisorState.FAILED
                logger.error("[supervisor] %s", self.core.failure)
                break
            if nxt is not previous:
                logger.info("[supervisor] %s -> %s: %s", previous.value, nxt.value, self.core.history[-1][2] if self.core.history else "")
            if nxt is SupervisorState.FAILED:
                logger.error("[supervisor] run failed: %s", self.core.failure)
            self.wake.wait(interval)
            self.wake.clear()
        with self.route_changed:
            self.route_changed.notify_all()

    # --- ClusterOps: probe ---------------------------------------------------------------

    def probe(self) -> ClusterStatus:
        import ray

        self._promote_ready_workers()
        with self.lock:
            slots, workers = list(self.slots), list(self.workers)
        slot_refs = [s.describe.remote() if s is not None else None for s in slots]
        worker_refs = [w.poll_status.remote() if w is not None and r not in self.pending_workers else None for r, w in enumerate(workers)]
        live = [r for r in slot_refs + worker_refs if r is not None]
        ray.wait(live, num_returns=len(live), timeout=PROBE_TIMEOUT_S)
        slots_alive = []
        for j, ref in enumerate(slot_refs):
            desc = self._answer(ref)
            slots_alive.append(desc is not False and ref is not None)
            if desc:
                self.slot_desc[j] = desc
        views = []
        for r, ref in enumerate(worker_refs):
            if r in self.pending_workers:
                views.append(WorkerView(r, True, restarts=self.worker_restarts[r]))
                continue
            status = self._answer(ref) if ref is not None else False
            if status:
                self.worker_status[r] = status
            alive = status is not False
            last = self.worker_status[r]
            done = bool(last and last.done and not last.error)
            error = last.error if status and last else None
            views.append(WorkerView(r, alive, done, error, self.worker_restarts[r]))
        self.spares = [s for s in self.spares if self._answer(s[1], peek=True) is not False]
        return ClusterStatus(self.k, tuple(slots_alive), tuple(views), len(self.spares), self.server_replacements, self._unreplicated(slots_alive))

    @staticmethod
    def _answer(ref, peek: bool = False):
        """The value of a finished probe; False if the actor is dead; None if it has not answered yet."""
        import ray

        if ref is None:
            return None
        ready, _ = ray.wait([ref], timeout=0)
        if not ready:
            return None
        try:
            return ray.get(ref)
        except ray.exceptions.RayError:  # died, unschedulable (its node is gone), or its reply was lost
            return False

    def _unreplicated(self, slots_alive: list[bool]) -> tuple[int, ...]:
        """Shards whose primary and holder are alive but the holder lacks the replica (I4)."""
        if not self.replica_mode:
            return ()
        out = []
        for shard in range(self.k):
            holder = replica_slot(shard, self.k)
            desc = self.slot_desc[holder]
            if slots_alive[shard] and slots_alive[holder] and desc and shard not in desc.replica_shards:
                out.append(shard)
        return tuple(out)

    # --- ClusterOps: actions -----------------------------------------------------------------

    def _alive_nodes(self) -> list[str]:
        import ray

        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        return [n for n in self.node_ids if n in alive]

    def add_spare(self) -> None:
        nodes = self._alive_nodes()
        node = nodes[(len(self.spares) + self.server_replacements) % len(nodes)] if nodes else None
        handle = self._new_server(None, None, node)
        self.spares.append((handle, handle.ready.remote(), node))

    def _take_spare(self, avoid_nodes: set):
        """A warm spare, preferably on a node none of the slot's peers use (a fresh actor if none is left)."""
        import ray

        from raytrain_ft.trainer import wait_ready

        ranked = sorted(self.spares, key=lambda s: (s[2] in avoid_nodes, not ray.wait([s[1]], timeout=0)[0]))
        for spare in ranked:
            self.spares.remove(spare)
            try:
                ray.get(spare[1], timeout=PROBE_TIMEOUT_S * 5)
                return spare[0]
            except ray.exceptions.RayError:  # RayActorError, GetTimeoutError, unschedulable
                continue
        handle = self._new_server(None, None, None)
        wait_ready([handle.ready.remote()], "a replacement parameter server", [handle])
        return handle

    def replace_server(self, slot: int, now: float) -> dict | None:
        if not self.replica_mode:
            return self._rollback_to_checkpoint(slot, now)
        import ray

        self.recoveries_started += 1
        self.server_replacements += 1
        shard = primary_shard(slot, self.k)
        peers = [replica_slot(shard, self.k)] if shard is not None else []
        peers += [replica_slot(s, self.k) for s in replica_shards(slot, self.k)] + list(replica_shards(slot, self.k))
        avoid = {self.slot_desc[p].node_id for p in peers if self.slot_desc[p] is not None}
        stats, new = None, None
        for _ in range(5):  # the spare itself may die mid-recovery
            new = self._take_spare(avoid)
            holder = self.slots[replica_slot(shard, self.k)] if shard is not None else None
            if holder is not None:
                ref = new.recover_primary.remote(slot, self.ranges[shard], holder, self.epochs[shard] + 1)
            else:
                ref = new.assign_slot.remote(slot)
            self._fire_recovery_kills(self.recoveries_started, shard, new)
            try:
                stats = ray.get(ref)
                break
            except ray.exceptions.RayActorError as e:
                if holder is not None and self._answer_get(holder.ready.remote(), PROBE_TIMEOUT_S) is None:
                    return None  # the holder died too: the next probe sees the shard is lost
                logger.warning("[supervisor] replacement for slot %d died during recovery (%s); trying another spare", slot, type(e).__name__)
                new = None
        if new is None:
            raise TrainingError(f"could not rebuild server slot {slot}: every replacement died during recovery")
        with self.route_changed:
            self.slots[slot] = new
            self.slot_desc[slot] = ray.get(new.describe.remote())
            if shard is not None:
                self.epochs[shard] += 1
            self.route_changed.notify_all()
        serving_at = time.time()
        reached = max((st.step for st in self.worker_status if st is not None), default=0)
        rereplicated = []
        for held in replica_shards(slot, self.k):
            try:
                ray.get(self.slots[held].set_replica.remote(new))
                rereplicated.append(held)
            except ray.exceptions.RayActorError:
                pass  # that primary died as well; its own replacement re-replicates it
        rereplicated_at = time.time()
        self._persist()
        return self._record({
            "role": "server" if shard is not None else "replica", "index": shard if shard is not None else slot, "slot": slot,
            "detected_at": now, "serving_at": serving_at, "replicated_at": rereplicated_at,
            "replayed": stats.replayed if stats else 0, "bytes_moved": stats.bytes_moved if stats else 0,
            "replay_s": round(stats.seconds, 4) if stats else 0.0, "step": stats.step if stats else None,
            "epoch": self.epochs[shard] if shard is not None else None, "rereplicated": rereplicated, "source": "replica",
            "steps_lost": max(0, reached - stats.step) if stats else 0,
        })

    def rereplicate(self, shard: int) -> None:
        import ray

        holder = self.slots[replica_slot(shard, self.k)]
        ray.get(self.slots[shard].set_replica.remote(holder))
        logger.info("[supervisor] shard %d re-replicated to slot %d", shard, replica_slot(shard, self.k))

    def restart_worker(self, rank: int, now: float, count: bool = True) -> dict | None:
        if count:
            self.worker_restarts[rank] += 1
        handle = self._new_worker(rank)
        self.pending_workers[rank] = (handle, handle.ready.remote(), now)
        logger.warning("[supervisor] worker %d is dead; restarting it (restart %d)", rank, self.worker_restarts[rank])
        return None  # recorded once the new worker trains (_promote_ready_workers)

    def _promote_ready_workers(self) -> None:
        """Start restarted workers whose process is up, at the step the shards are at."""
        import ray

        for rank, (handle, ready_ref, detected_at) in list(self.pending_workers.items()):
            answer = self._answer(ready_ref)
            if answer is None:
                continue
            del self.pending_workers[rank]
            if answer is False:
                self.workers[rank] = handle  # died while starting: the next probe restarts it again
                continue
            start_step = self._resume_step(rank)
            ray.get(handle.start.remote(start_step, self.total_steps))
            with self.lock:
                self.workers[rank] = handle
                self.worker_status[rank] = None
            self._record({"role": "worker", "index": rank, "detected_at": detected_at, "serving_at": time.time(), "replayed": 0,
                          "bytes_moved": 0, "step": start_step, "source": "restart"})

    def _resume_step(self, rank: int) -> int:
        """Where a restarted rank goes on: the first step some shard has not applied from it (sync: the shards'
        step; other modes: the rank's own clock)."""
        import ray

        return min(d.clocks[rank] for d in ray.get([self.slots[i].describe.remote() for i in range(self.k)]))

    def _rollback_to_checkpoint(self, slot: int, now: float) -> dict:
        """Baseline: replace the lost server from its file, rewind every shard to that step, restart all workers."""
        import ray

        self.recoveries_started += 1
        self.server_replacements += 1
        step = latest_common_step(self.checkpoint_dir, self.k)
        if step is None:
            raise TrainingError(f"no complete checkpoint in {self.checkpoint_dir}; cannot restart server slot {slot}")
        lost_at = max((s.step for s in self.worker_status if s is not None), default=step)
        for rank, w in enumerate(self.workers):  # the whole run goes back to `step`
            if w is not None:
                kill_process(w, self.worker_status[rank].process if self.worker_status[rank] else self.worker_pids[rank])
        new = self._take_spare(set())
        refs, moved = [], 0
        for shard in range(self.k):
            target = new if shard == slot else self.slots[shard]
            refs.append(target.restore_checkpoint.remote(shard, self.ranges[shard], shard_checkpoint_path(self.checkpoint_dir, shard, step), self.epochs[shard] + 1))
        stats = ray.get(refs)
        moved = sum(s.bytes_moved for s in stats)
        with self.route_changed:
            self.slots[slot] = new
            self.slot_desc[slot] = ray.get(new.describe.remote())
            self.epochs = [e + 1 for e in self.epochs]
            self.route_changed.notify_all()
        serving_at = time.time()
        for rank in range(self.w):
            self.restart_worker(rank, now, count=False)
        return self._record({"role": "server", "index": slot, "slot": slot, "detected_at": now, "serving_at": serving_at,
                             "replayed": 0, "bytes_moved": moved, "step": step, "steps_lost": max(0, lost_at - step), "source": "checkpoint"})

    # --- events, kills, persistence --------------------------------------------------------------

    def _record(self, event: dict) -> dict:
        event["detected_s"] = round(event["detected_at"] - self.started_at, 4)
        event["serving_s"] = round(event["serving_at"] - self.started_at, 4)
        event["duration_s"] = round(event["serving_at"] - event["detected_at"], 4)
        self.events.append(event)
        tags = {"role": event["role"], "source": event["source"].split()[0]}
        self.metrics.inc("recoveries", 1, tags)
        self.metrics.observe("recovery_duration_seconds", event["duration_s"], tags)
        events_logger.warning(
            "recovered %s %s in %.3fs (%s, replayed %d, %d bytes moved)", event["role"], event["index"], event["duration_s"],
            event["source"], event["replayed"], event["bytes_moved"],
            extra={"run_id": self.run_id, "shard": event["index"], "step": event.get("step"), "decision": event["source"]},
        )
        self._persist()
        return event

    def _fire_recovery_kills(self, n: int, shard: int | None, replacement) -> None:
        for k in [k for k in self.kills if int(k.value) == n]:
            self.kills.remove(k)
            if k.role == "server" and k.index == shard:
                handle, process, what = replacement, None, "the replacement being rebuilt"
            else:
                handle, process = self.target(k.role, k.index)
                what = "a peer"
            how = kill_process(handle, process)
            self.kills_fired.append({"kill": str(k), "at": time.time(), "how": how, "target": what})
            logger.warning("[supervisor] fault injection: killed %s (%s) during recovery %d", k, what, n)

    def _persist(self) -> None:
        from ray.experimental import internal_kv

        blob = json.dumps({"events": self.events, "restarts": self.restarts, "worker_restarts": self.worker_restarts,
                           "server_replacements": self.server_replacements, "started_at": self.started_at,
                           "recoveries_started": self.recoveries_started, "kills_fired": self.kills_fired})
        internal_kv._internal_kv_put(f"raytrain_ft/{self.run_id}/supervisor", blob.encode(), overwrite=True)

    def _rebuild(self) -> None:
        """After a restart: find the live actors of this run and who holds what."""
        import ray
        from ray.experimental import internal_kv

        blob = internal_kv._internal_kv_get(f"raytrain_ft/{self.run_id}/supervisor")
        if blob:
            saved = json.loads(blob)
            self.events[:] = saved["events"]
            self.restarts = saved["restarts"]
            self.worker_restarts = saved["worker_restarts"]
            self.server_replacements = saved["server_replacements"]
            self.started_at = saved["started_at"]
            self.recoveries_started = saved["recoveries_started"]
            self.kills_fired = saved["kills_fired"]
            fired = {f["kill"] for f in self.kills_fired}
            self.kills = [k for k in self.kills if str(k) not in fired]
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["namespace"] == NAMESPACE and a["name"].startswith(f"{self.run_id}/")]
        servers, workers = [], []
        for name in names:
            try:
                handle = ray.get_actor(name, namespace=NAMESPACE)
            except ValueError:
                continue
            kind = name.split("/", 1)[1]
            if kind.startswith("server-"):
                servers.append(handle)
            elif kind.startswith("worker-"):
                workers.append((int(kind.split("-")[1]), handle))
        descs = [self._answer_get(h.describe.remote()) for h in servers]
        best: dict[int, tuple] = {}
        for handle, desc in zip(servers, descs):
            if not desc:
                continue
            if desc.slot is None:
                self.spares.append((handle, handle.ready.remote(), desc.node_id))
                continue
            epoch = desc.epoch
            if desc.slot not in best or epoch > best[desc.slot][1].epoch:
                best[desc.slot] = (handle, desc)
        for slot, (handle, desc) in best.items():
            self.slots[slot], self.slot_desc[slot] = handle, desc
            if desc.shard is not None:
                self.epochs[desc.shard] = desc.epoch
        statuses = [(rank, h, self._answer_get(h.poll_status.remote())) for rank, h in workers]
        for rank, handle, status in sorted(statuses, key=lambda t: t[2].started_at if t[2] else 0):
            if status:
                self.workers[rank], self.worker_status[rank] = handle, status
        for rank in range(self.w):
            if self.workers[rank] is None:  # no live worker of this rank: the first probe restarts it
                self.workers[rank] = next((h for r, h in workers if r == rank), None)
        logger.warning("[supervisor] restarted: rebuilt %d slots, %d workers, %d spares from live actors",
                       sum(s is not None for s in self.slots), sum(s is not None for s in self.worker_status), len(self.spares))

    @staticmethod
    def _answer_get(ref, timeout_s: float = PROBE_TIMEOUT_S * 5):
        """The value of ``ref``, or None if its actor is dead or silent for ``timeout_s``."""
        import ray

        try:
            return ray.get(ref, timeout=timeout_s)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return None

    # --- calls from workers and the driver ---------------------------------------------------------

    def route_after(self, shard: int, epoch: int) -> tuple:
        """The server of ``shard`` once its epoch is past ``epoch`` (a worker's call to the old one failed)."""
        timeout_s = float(os.environ.get(ROUTE_TIMEOUT_ENV_VAR, DEFAULT_ROUTE_TIMEOUT_S))
        self.wake.set()  # probe now instead of at the next interval
        deadline = time.time() + timeout_s
        with self.route_changed:
            while self.epochs[shard] <= epoch:
                if self.core.state is SupervisorState.FAILED:
                    raise TrainingError(f"shard {shard} cannot be rebuilt: {self.core.failure}")
                left = deadline - time.time()
                if left <= 0:
                    raise TrainingError(f"shard {shard} was not rebuilt within {timeout_s:.0f}s; raise {ROUTE_TIMEOUT_ENV_VAR} or see the supervisor's log")
                self.route_changed.wait(min(left, 1.0))
            return self.slots[shard], self.epochs[shard]

    def status(self) -> SupervisorStatus:
        steps = tuple(d.step if d is not None else -1 for d in self.slot_desc[: self.k])
        return SupervisorStatus(self.core.state.value, tuple(self.worker_status), tuple(self.events), self.core.failure,
                                self.restarts, tuple(self.epochs), steps, self.targets())

    def targets(self) -> Targets:
        workers = tuple((w, s.process if s is not None else None) for w, s in zip(self.workers, self.worker_status))
        slots = tuple((h, d.process if d is not None else None) for h, d in zip(self.slots, self.slot_desc))
        return Targets(self.k, slots, workers)

    def target(self, role: str, index: int) -> tuple:
        """(handle, NODE_IP:PID) of what a kill spec names right now."""
        return self.targets().lookup(role, index)

    def kills_done(self) -> list[dict]:
        """Kills fired by the supervisor (@recovery) and by servers on themselves (@snapshot)."""
        from ray.experimental import internal_kv

        inside = [json.loads(internal_kv._internal_kv_get(key)) for key in internal_kv._internal_kv_list(self._fault_key)]
        return list(self.kills_fired) + inside

    def final(self) -> dict:
        """Final parameters, server stats, step times, and an I4 check: each replica replayed equals its primary."""
        import ray

        from raytrain_ft.recovery.replay import replay

        primaries = self.slots[: self.k]
        params = [values for values, _, _ in ray.get([p.pull.remote() for p in primaries])]
        stats = ray.get([p.stats.remote() for p in primaries])
        replicas_match = []
        if self.replica_mode:
            for shard in range(self.k):
                snapshot, entries = ray.get(self.slots[replica_slot(shard, self.k)].export_replica.remote(shard))
                rebuilt = replay(snapshot, entries, self.ranges[shard], self.cfg.optim, self.total_steps)
                replicas_match.append(bool(np.array_equal(rebuilt.state.params_copy(), params[shard])))
        times = []
        for w in self.workers:
            try:
                times.append(ray.get(w.step_end_times.remote(), timeout=PROBE_TIMEOUT_S * 5))
            except Exception:
                times.append([])
        return {"params": np.concatenate(params), "stats": stats, "step_end_times": times, "replicas_match": replicas_match}



def kill_run_actors(run_id: str) -> int:
    """Kill every actor of the run but the supervisor, and drop the run's entries in Ray's internal KV."""
    import ray
    from ray.experimental import internal_kv

    internal_kv._internal_kv_del(f"raytrain_ft/{run_id}/", del_by_prefix=True)
    n = 0
    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["namespace"] == NAMESPACE and a["name"].startswith(f"{run_id}/") and not a["name"].endswith("/supervisor"):
            try:
                ray.kill(ray.get_actor(a["name"], namespace=NAMESPACE), no_restart=True)
                n += 1
            except ValueError:
                pass
    return n
