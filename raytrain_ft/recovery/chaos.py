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

    def __init__(self, kills: list[KillSpec], supervisor_handle, cluster=None, worker_nodes: list | None = None):
        self.pending = [k for k in kills if k.trigger in ("step", "time")]
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

    def tick(self, step: int) -> None:
        elapsed = time.time() - self.started_at
        for k in list(self.pending):
            due = step >= k.value if k.trigger == "step" else elapsed >= k.value
            if due:
                self.pending.remove(k)
                self.fire(k, step)

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
            handle, pid = targets.lookup(k.role, k.index)
            how = kill_process(handle, pid)
        record = {"kill": str(k), "at": at, "step": step, "how": how}
        self.fired.append(record)
        logger.warning("[chaos] killed %s at step %s (%s)", k, step, how)
        return record
