"""Fault injection against a running run: kill servers, replica holders, workers, the supervisor or a node.

Kills are real: SIGKILL of the actor's process (``ray.kill`` when it runs on
another machine), Ray's restart-triggering kill for the supervisor, or
``Cluster.remove_node`` for a simulated node. ``@step``/``@time`` kills fire
from here; ``@recovery`` kills fire inside the supervisor and ``@snapshot``
kills inside the server (see ``recovery/faults.py``).
"""

from __future__ import annotations

import logging
import time

from raytrain_ft.recovery.faults import KillSpec

logger = logging.getLogger(__name__)


class ChaosRunner:
    """Fires due ``@step``/``@time`` kills; ``tick()`` is called from the driver's polling loop."""

    def __init__(self, kills: list[KillSpec], supervisor_handle, cluster=None, worker_nodes: list | None = None,
                 one_at_a_time: bool = False, heal_timeout_s: float = 60.0):
        self.pending = [k for k in kills if k.trigger in ("step", "time")]
        self.one_at_a_time = one_at_a_time
        """Hold a due kill until the previous one shows up as a recovery event (or ``heal_timeout_s`` passed)."""
        self.heal_timeout_s = heal_timeout_s
        self._awaiting: tuple[int, float] | None = None  # (events count at the last kill, deadline)
        self.supervisor = supervisor_handle
        self.targets = None
        """Latest ``Targets`` from the supervisor (kills work while the supervisor itself restarts)."""
        self.cluster = cluster
        self.worker_nodes = worker_nodes or []
        self.fired: list[dict] = []
        self.started_at = time.time()

    @property
    def done(self) -> bool:
        return not self.pending

    def tick(self, step: int, events: int = 0) -> None:
        """Fire what is due at ``step`` / now; ``events`` is the run's recovery-event count (for one_at_a_time)."""
        elapsed = time.time() - self.started_at
        if self._awaiting is not None:
            count, deadline = self._awaiting
            if events <= count and time.time() < deadline:
                return
            self._awaiting = None
        for k in list(self.pending):
            due = step >= k.value if k.trigger == "step" else elapsed >= k.value
            if due:
                self.pending.remove(k)
                self.fire(k, step)
                if self.one_at_a_time:
                    self._awaiting = (events, time.time() + self.heal_timeout_s)
                    return

    def fire(self, k: KillSpec, step: int | None = None) -> dict:
        import ray

        from raytrain_ft.actors.supervisor import kill_process

        at = time.time()
        if k.role == "supervisor":
            ray.kill(self.supervisor, no_restart=False)  # Ray restarts it (max_restarts)
            how = "ray.kill(no_restart=False)"
        elif k.role == "node":
            node = self.worker_nodes[k.index - 1]
            self.cluster.remove_node(node, allow_graceful=False)
            how = "cluster.remove_node"
        else:
            targets = self.targets or ray.get(self.supervisor.targets.remote())
            handle, process = targets.lookup(k.role, k.index)
            how = kill_process(handle, process)
        record = {"kill": str(k), "at": at, "step": step, "how": how}
        self.fired.append(record)
        logger.warning("[chaos] killed %s at step %s (%s)", k, step, how)
        return record


def find_supervisor(run_id: str | None, wait_s: float = 0.0, poll_s: float = 0.5):
    """The supervisor of ``run_id`` on the connected cluster (the only running run when None), waiting up to
    ``wait_s`` for it to appear (a job submitted a moment ago is still starting its actors)."""
    import ray

    from raytrain_ft.actors.supervisor import NAMESPACE
    from raytrain_ft.errors import ClusterError

    deadline = time.monotonic() + wait_s
    while True:
        runs = sorted(a["name"].split("/")[0] for a in ray.util.list_named_actors(all_namespaces=True)
                      if a["namespace"] == NAMESPACE and a["name"].endswith("/supervisor"))
        found = (len(runs) == 1) if run_id is None else (run_id in runs)
        if found or (run_id is None and len(runs) > 1) or time.monotonic() >= deadline:
            break
        time.sleep(poll_s)
    if run_id is None:
        if len(runs) != 1:
            waited = f" after waiting {wait_s:.0f}s" if wait_s else ""
            raise ClusterError(f"{len(runs)} runs are active{waited} ({', '.join(runs) or 'none'}); name one with --run-id")
        run_id = runs[0]
    if run_id not in runs:
        raise ClusterError(f"no active run {run_id!r} on this cluster (active: {', '.join(runs) or 'none'})")
    return run_id, ray.get_actor(f"{run_id}/supervisor", namespace=NAMESPACE)


def run_schedule(supervisor_handle, kills: list[KillSpec], poll_s: float = 0.05, on_fire=None, one_at_a_time: bool = False) -> list[dict]:
    """Fire ``@step``/``@time`` kills against a running run until all fired or the run ended."""
    import ray

    from raytrain_ft.errors import ConfigError

    unsupported = [str(k) for k in kills if k.trigger not in ("step", "time") or k.role == "node"]
    if unsupported:
        raise ConfigError("kill", f"{', '.join(unsupported)}: against a running run only server/replica/worker/supervisor kills "
                                  "@step or @time work; give node/@recovery/@snapshot kills to `raytrain-ft train --kill`")
    runner = ChaosRunner(kills, supervisor_handle, one_at_a_time=one_at_a_time)
    while not runner.done:
        status = ray.get(supervisor_handle.status.remote())
        if status.state in ("done", "failed"):
            break
        runner.targets = status.targets
        workers = [w for w in status.workers if w is not None]
        before = len(runner.fired)
        runner.tick(min((w.step for w in workers), default=0), len(status.events))
        if on_fire:
            for record in runner.fired[before:]:
                on_fire(record)
        time.sleep(poll_s)
    return runner.fired
