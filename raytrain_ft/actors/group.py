"""The run's actors as a group: create servers and workers by the names the supervisor's protocol
chose, kill them.

The Ray counterpart of the ``Create`` and ``Kill`` effects (as Ray Train's
``WorkerGroup`` is for its controller): resources, placement, detached
lifetime, no Ray-level restarts (the supervisor replaces a dead actor with a
new one under a new name), and ranks that share a process.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass

from raytrain_ft.actors import NAMESPACE
from raytrain_ft.actors.transport import Directory, host_key
from raytrain_ft.protocol.messages import Create

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ServerRun:
    """What a server needs to know of its run besides the protocol's ``ServerSpec``."""

    run_id: str
    checkpoint_dir: str | None = None
    resume_dir: str | None = None
    """--resume-from: where the checkpoint files the run starts from are."""
    metrics: bool = True
    faults: object = None
    """A ``recovery.chaos.FaultHook`` (fault injection), or None."""
    task: object = None
    """The run's ``task.Task``, sealed (``transport.Sealed``): a ``Load`` without values starts the
    shard from the model the task builds at ``seed``."""
    seed: int = 0


@dataclass(frozen=True, slots=True)
class GroupSpec:
    run_id: str
    config: object
    """``TrainConfig``."""
    task: object
    """``task.Task``, sealed (``transport.Sealed``): what the workers train, opened in their own
    processes."""
    ranges: tuple
    server_spec: object
    """``protocol.server.ServerSpec``."""
    server_run: object
    """``actors.server.ServerRun``."""
    device: str = "cpu"


class ActorGroup:
    def __init__(self, spec: GroupSpec, directory: Directory):
        self.spec = spec
        self.directory = directory
        self._hosts: dict[int, tuple] = {}
        """ranks_per_process > 1: per group of ranks, (its host actor, the ranks it was given)."""
        self._named_hosts: dict[str, object] = {}
        """Pre-aggregation: processes by the name the supervisor gave them."""

    def _options(self, name: str, node_id: str | None, **resources) -> dict:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        opts = dict(
            name=name, namespace=NAMESPACE, lifetime="detached", max_restarts=0, **resources
        )
        if node_id:
            # hard affinity: soft affinity does not place zero-CPU actors (measured); the node is
            # alive when chosen
            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id, soft=False)
        return opts

    def create(self, e: Create) -> None:
        try:
            if e.kind == "server":
                self._create_server(e)
            else:
                self._create_worker(e)
        except ValueError as error:  # the name is taken: created before a supervisor restart
            logger.info("[supervisor] %s exists already (%s)", e.name, error)
        except Exception as error:  # noqa: BLE001 -- e.g. the node it was placed on is gone: the probe finds it missing
            logger.warning("[supervisor] could not create %s: %s", e.name, error)

    def _create_server(self, e: Create) -> None:
        import ray

        from raytrain_ft.actors.server import ParameterServer

        run = self.spec.server_run
        node = e.node if e.node in self._alive_nodes() else None
        if self._claim_warm(e, "server", node, (e.name, self.spec.server_spec, run)):
            return
        cls = ray.remote(ParameterServer).options(**self._options(e.name, node, num_cpus=0))
        self.directory.remember(e.name, cls.remote(e.name, self.spec.server_spec, run, True))

    def _claim_warm(self, e: Create, kind: str, node: str | None, become: tuple) -> bool:
        """Serve ``e.name`` from a resting process of ``kind`` of an earlier run of this driver
        (``actors/warm.py``), if there is one. The alias is written first, so a call for the name
        that overtakes ``become`` waits for it (a server: an async actor may run calls out of
        order; a worker runs the supervisor's calls in order). ``become`` is not waited for here:
        a process that ended meanwhile answers as dead and is recovered as a dead one; one the
        supervisor never finished claiming ends itself, still resting."""
        from ray.experimental import internal_kv

        from raytrain_ft.actors.transport import Addressed
        from raytrain_ft.actors.warm import alias_key, claim

        warm = claim(kind, node)
        if warm is None:
            return False
        actor_name, handle = warm
        internal_kv._internal_kv_put(alias_key(self.spec.run_id, e.name), actor_name.encode())
        handle.become.remote(*become)
        self.directory.remember(e.name, Addressed(handle, e.name))
        return True

    def _alive_nodes(self) -> set:
        import ray

        return {n["NodeID"] for n in ray.nodes() if n["Alive"]}

    def _create_worker(self, e: Create) -> None:
        import uuid

        import ray

        from raytrain_ft.actors.worker_entry import Worker, WorkerHost

        cfg = self.spec.config
        gpu = 1 if self.spec.device != "cpu" else 0
        args = (
            e.name,
            e.rank,
            cfg,
            self.spec.task,
            list(self.spec.ranges),
            e.routes,
            self.spec.device,
            self.spec.run_id,
        )
        per_process = cfg.cluster.ranks_per_process
        if per_process == 1:
            from raytrain_ft.actors.warm import worker_kind

            kind = worker_kind(cfg.cluster.cpus_per_worker, gpu)
            if self._claim_warm(e, kind, None, args):
                return
            cls = ray.remote(Worker).options(
                **self._options(e.name, None, num_cpus=cfg.cluster.cpus_per_worker, num_gpus=gpu)
            )
            self.directory.remember(e.name, cls.remote(*args, warm_kind=kind))
            return
        if e.host is not None:  # pre-aggregation: the supervisor named the process
            host_name = f"{e.host}-process"
            host = self._host(host_name, self._process_resources(e.rank))
            self._add_rank(host, host_name, e, args)
            return
        group = e.rank // per_process
        host, ranks, host_name = self._hosts.get(group, (None, set(), None))
        if (
            host is None or e.rank in ranks
        ):  # the group's first rank, or a restart after its process died: a new process
            host_name = f"{self.spec.run_id}/host{group}-{uuid.uuid4().hex[:8]}"
            host = (
                ray.remote(WorkerHost)
                .options(**self._options(host_name, None, **self._process_resources(e.rank)))
                .remote()
            )
            ranks = set()
            self._hosts[group] = (host, ranks, host_name)
        ranks.add(e.rank)
        self._add_rank(host, host_name, e, args)

    def _add_rank(self, host, host_name: str, e: Create, args: tuple) -> None:
        from ray.experimental import internal_kv

        from raytrain_ft.actors.worker_entry import RankHandle

        internal_kv._internal_kv_put(
            host_key(self.spec.run_id, e.name), f"{host_name}#{e.rank}".encode(), overwrite=True
        )
        host.add.remote(
            e.rank, *args
        )  # runs before any later call to the rank (one caller, calls in order)
        self.directory.remember(e.name, RankHandle(host, e.rank))

    def _process_resources(self, rank: int) -> dict:
        """What the process hosting ``rank`` asks Ray for: a worker's CPUs (and GPU) for each of
        its ranks (consecutive ranks, the last process holding the rest); simulated ranks only
        sleep and share one worker's CPUs."""
        cc = self.spec.config.cluster
        first = rank - rank % cc.ranks_per_process
        ranks = min(cc.ranks_per_process, cc.num_workers - first)
        if cc.simulate_compute_ms:
            return dict(num_cpus=cc.cpus_per_worker)
        gpu = 1 if self.spec.device != "cpu" else 0
        return dict(num_cpus=cc.cpus_per_worker * ranks, num_gpus=gpu * ranks)

    def _host(self, name: str, resources: dict):
        """The process named ``name``, created by the first rank the supervisor creates in it (a
        restarted supervisor re-creates a process whose ranks were not all created, under a new
        name, so a name is never looked up in Ray)."""
        import ray

        from raytrain_ft.actors.worker_entry import WorkerHost

        if name not in self._named_hosts:
            self._named_hosts[name] = (
                ray.remote(WorkerHost).options(**self._options(name, None, **resources)).remote()
            )
        return self._named_hosts[name]

    def kill(self, name: str) -> None:
        import ray

        from raytrain_ft.actors.worker_entry import RankHandle, actor_of

        handle = self.directory.handle(name)
        if isinstance(handle, RankHandle) and self.spec.config.preaggregates:
            # its process's ranks push as one and are re-created with it: the process goes
            handle = handle.host
        elif handle is None or isinstance(handle, RankHandle):
            # gone already; a hosted rank dies with its process (a kill would take its neighbours)
            return
        try:
            ray.kill(actor_of(handle), no_restart=True)
        except Exception:  # noqa: BLE001 -- dead already
            pass


def kill_process(handle, process: str | None) -> str:
    """Kill an actor for real: SIGKILL its process (``NODE_IP:PID``) when it runs on this host and
    is a Ray actor process, else ``ray.kill`` (also a forced kill). Never signals a process of
    another host."""
    import ray

    from raytrain_ft.actors.worker_entry import actor_of

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
    ray.kill(actor_of(handle), no_restart=True)
    return "ray.kill"


def run_actor_names(run_id: str) -> dict[str, str]:
    """Every actor of the run but the supervisor: protocol name -> Ray name (a warm process serving
    a name of this run has the Ray name of its first incarnation, in an earlier run)."""
    import ray
    from ray.experimental import internal_kv

    from raytrain_ft.actors.warm import alias_key

    names = {
        a["name"]: a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == NAMESPACE
        and a["name"].startswith(f"{run_id}/")
        and not a["name"].endswith("/supervisor")
    }
    prefix = alias_key(run_id, "")
    for key in internal_kv._internal_kv_list(prefix):
        actor_name = internal_kv._internal_kv_get(key)
        if actor_name is not None:
            names[key.decode()[len(prefix) :]] = actor_name.decode()
    return names


def kill_run_actors(run_id: str, keep: set | frozenset = frozenset()) -> int:
    """Kill every actor of the run but the supervisor and the processes named in ``keep`` (Ray
    names: kept warm for the next run), and drop the run's entries in Ray's internal KV."""
    import ray
    from ray.experimental import internal_kv

    names = run_actor_names(run_id)
    internal_kv._internal_kv_del(f"raytrain_ft/{run_id}/", del_by_prefix=True)
    n = 0
    for actor_name in set(names.values()) - set(keep):
        try:
            ray.kill(ray.get_actor(actor_name, namespace=NAMESPACE), no_restart=True)
            n += 1
        except ValueError:
            pass
    return n
