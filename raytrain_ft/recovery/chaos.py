"""Fault injection against a running run: kill servers, replica holders, workers, spares, the
supervisor or a node.

Kills are real: SIGKILL of the actor's process (``ray.kill`` when it runs on
another machine), Ray's restart-triggering kill for the supervisor, or
``Cluster.remove_node`` for a simulated node. ``@step``/``@time`` kills fire
from the driver (``ChaosRunner``) or ``raytrain-ft chaos`` (``run_schedule``);
the others fire from inside the run through a ``FaultHook`` the actors are
given, on the protocol's own events (``Note`` effects): ``@snapshot`` when a
server sends or receives its N-th snapshot, ``@recovery`` while the
supervisor's N-th server recovery is in progress, ``@rereplication`` while its
N-th re-replication is. The actors hold no fault-injection code of their own.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time

from raytrain_ft.recovery.faults import KillSpec

logger = logging.getLogger(__name__)


def fault_key(run_id: str) -> str:
    """Internal-KV prefix under which kills fired inside the run are recorded (they survive the
    killed process)."""
    return f"raytrain_ft/{run_id}/kill/"


def _put_record(run_id: str, spec: str, how: str, target: str, overwrite: bool) -> bool:
    """Write a kill's record; whether one was there already."""
    from ray.experimental import internal_kv

    record = {"kill": spec, "at": time.time(), "how": how, "target": target}
    return internal_kv._internal_kv_put(
        f"{fault_key(run_id)}{spec}", json.dumps(record).encode(), overwrite=overwrite
    )


def record_kill(run_id: str, spec: str, how: str, target: str = "") -> None:
    _put_record(run_id, spec, how, target, overwrite=True)


FIRING = "firing at"
"""How a kill the supervisor fires on another process is recorded while it fires (claimed)."""


def claim_kill(run_id: str, spec: str, how: str, target: str = "") -> bool:
    """Record ``spec`` as fired unless a record of it is there already; whether this call
    recorded it. Atomic in the GCS: of the processes that reach a kill's event -- a server and
    the one that replaced it, a supervisor and its restarted incarnation -- exactly one fires it."""
    return not _put_record(run_id, spec, how, target, overwrite=False)


def kills_recorded(run_id: str) -> list[dict]:
    from ray.experimental import internal_kv

    return [
        json.loads(internal_kv._internal_kv_get(key))
        for key in internal_kv._internal_kv_list(fault_key(run_id))
    ]


class FaultHook:
    """Kills that fire on protocol events inside the run. A server's hook kills its own process
    (SIGKILL); the supervisor's calls ``kill(role, index, replacement)`` for the target. Every
    process that may reach a kill's event carries it (every server carries every ``@snapshot``
    kill: ``server:I`` fires in whichever server sends shard I's N-th snapshot first, the slot's
    first actor or the spare that replaced it); ``claim`` makes each kill fire once across them
    all, and across a supervisor's restarts."""

    def __init__(self, run_id: str, kills: tuple[KillSpec, ...], kill=None, claim=None, die=None):
        self.run_id = run_id
        self.pending = list(kills)
        self.kill = kill
        self.claim = claim or claim_kill
        self.die = die or (lambda: os.kill(os.getpid(), signal.SIGKILL))

    def on_note(self, note, who: str = "") -> None:
        """``who``: the process's own name (a server's: its target when it kills itself)."""
        f = note.fields
        for k in list(self.pending):
            if not self._matches(k, note.event, f):
                continue
            self.pending.remove(k)
            on_itself = self.kill is None or k.role == "supervisor"
            how = f"SIGKILL of itself at {note.event}" if on_itself else f"{FIRING} {note.event}"
            if not self.claim(
                self.run_id, str(k), how, who if on_itself else ""
            ):  # recorded first: the process may go
                logger.info("fault injection: %s fired already in another process", k)
                continue
            if on_itself:
                logger.info("fault injection: %s -- dying at %s %s", k, note.event, f)
                self.die()
                return
            how, target = self.kill(k, f)
            record_kill(self.run_id, str(k), how, target)
            logger.info("fault injection: killed %s (%s) at %s %s", k, target, note.event, f)

    @staticmethod
    def _matches(k: KillSpec, event: str, f: dict) -> bool:
        n = int(k.value)
        if k.trigger == "snapshot":
            return (
                event == "snapshot_sent"
                and k.role == "server"
                and f.get("shard") == k.index
                and f.get("n") == n
            ) or (
                event == "snapshot_received"
                and k.role == "replica"
                and f.get("shard") == k.index
                and f.get("n") == n
            )
        if k.trigger == "recovery":
            return event == "recovery_started" and f.get("n") == n
        if k.trigger == "rereplication":
            return event == "rereplication_started" and f.get("n") == n
        return False


def server_hook(run_id: str, kills) -> FaultHook | None:
    """The hook every server of the run carries: the ``@snapshot`` kills (each matches the shard
    it names on the event; ``FaultHook`` fires it once)."""
    mine = tuple(k for k in kills if k.trigger == "snapshot")
    return FaultHook(run_id, mine) if mine else None


INSIDE_LOOK_S = 0.5
"""How often the driver looks for kills fired inside the run (one read of Ray's internal KV)."""


class ChaosRunner:
    """Fires due ``@step``/``@time`` kills; ``tick()`` is called from the driver's polling loop."""

    def __init__(
        self,
        kills: list[KillSpec],
        supervisor_handle,
        cluster=None,
        worker_nodes: list | None = None,
        one_at_a_time: bool = False,
        heal_timeout_s: float = 60.0,
        run_id: str = "",
    ):
        self.pending = [k for k in kills if k.trigger in ("step", "time")]
        self.one_at_a_time = one_at_a_time
        """Hold a due kill until the previous one shows up as a recovery event (or
        ``heal_timeout_s`` passed)."""
        self.heal_timeout_s = heal_timeout_s
        self._awaiting: tuple[int, float] | None = None  # (events count at the last kill, deadline)
        self.supervisor = supervisor_handle
        self.run_id = run_id
        self.targets = None
        """Latest ``Targets`` from the supervisor (kills work while the supervisor itself
        restarts)."""
        self.cluster = cluster
        self.worker_nodes = worker_nodes or []
        self.fired: list[dict] = []
        self.started_at = time.time()
        self._directory = None
        self._waiting: dict[KillSpec, object] = {}
        """Due kills whose role had no live actor, each with the ``Targets`` it was looked up in
        (it is looked up again once the supervisor reports new ones)."""
        self._killed: set[str] = set()
        self._supervisor_restarts_killed: int | None = None
        """Ray's restart count of the supervisor incarnation the last supervisor kill hit."""
        self._inside = {str(k) for k in kills if k.trigger not in ("step", "time")}
        """Kills that fire inside the run (``FaultHook``), not yet told: the driver says each
        once its record appears, in the same line as its own kills'."""
        self._next_look = 0.0

    def _supervisor_incarnation(self) -> tuple[str, int] | None:
        """The supervisor actor's state in Ray's GCS (ALIVE, RESTARTING, ...) and its restart
        count; None where Ray cannot say."""
        try:
            from ray._private import state as ray_state

            info = ray_state.actors(actor_id=self.supervisor._actor_id.hex())
            return info["State"], int(info["NumRestarts"])
        except Exception:  # noqa: BLE001 -- no answer: the kill goes ahead as before
            return None

    @property
    def done(self) -> bool:
        return not self.pending

    @property
    def waits_for_step(self) -> bool:
        """A ``@step`` kill is still to fire (the driver then reads the workers' steps directly)."""
        return any(k.trigger == "step" for k in self.pending)

    def tell_inside(self, final: bool = False, records: list[dict] | None = None) -> None:
        """Say each kill fired inside the run once its record appears (looked for every
        INSIDE_LOOK_S; ``final``: at the run's end, whatever the time, from ``records`` when the
        caller has just read them)."""
        now = time.time()
        if not self._inside or (not final and now < self._next_look):
            return
        self._next_look = now + INSIDE_LOOK_S
        if records is None:
            try:
                records = kills_recorded(self.run_id)
            except Exception:  # noqa: BLE001 -- the GCS did not answer: asked again next time
                return
        for r in sorted(records, key=lambda r: r["at"]):
            if r["how"].startswith(FIRING) and not final:
                continue  # claimed, not fired yet: its record is written again once it has
            if r["kill"] in self._inside:
                self._inside.discard(r["kill"])
                target = f" ({r['target']})" if r.get("target") else ""
                logger.info("[chaos] killed %s%s (%s)", r["kill"], target, r["how"])

    def tick(self, step: int, events: int = 0) -> None:
        """Fire what is due at ``step`` / now; ``events`` is the run's recovery-event count (for
        one_at_a_time). Say the kills fired inside the run since the last look."""
        self.tell_inside()
        elapsed = time.time() - self.started_at
        if self._awaiting is not None:
            count, deadline = self._awaiting
            if events <= count and time.time() < deadline:
                return
            self._awaiting = None
        for k in list(self.pending):
            due = step >= k.value if k.trigger == "step" else elapsed >= k.value
            if k in self._waiting and self._waiting[k] is self.targets:
                continue  # still no live target: nothing new to look it up in
            if due and self.fire(k, step) is not None:
                self.pending.remove(k)
                if self.one_at_a_time:
                    self._awaiting = (events, time.time() + self.heal_timeout_s)
                    return

    def fire(self, k: KillSpec, step: int | None = None) -> dict | None:
        """Kill ``k``'s target now; None (nothing done) while no live actor plays its role -- a
        spare being made after the last one was taken, a slot whose server is being replaced --
        so a due kill waits for the role's next actor instead of hitting nobody. A kill whose role
        stays empty until the run ends never fires (the CLI reports it)."""
        from raytrain_ft.actors.group import kill_process
        from raytrain_ft.actors.transport import Directory

        at = time.time()
        target = ""
        if k.role == "supervisor":
            import ray

            # a kill hits a live incarnation: while Ray restarts the one the last kill hit, a
            # second kill (two kills a second apart) would land on no process and count as fired
            now = self._supervisor_incarnation()
            killed_before = self._supervisor_restarts_killed
            if now is not None and (
                now[0] != "ALIVE" or (killed_before is not None and now[1] <= killed_before)
            ):
                if k not in self._waiting:
                    self._waiting[k] = "restarting"  # never the targets: asked again each tick
                    logger.warning(
                        "[chaos] %s is due at step %s; the supervisor is restarting: it waits for "
                        "the next incarnation",
                        k,
                        step,
                    )
                return None
            ray.kill(self.supervisor, no_restart=False)  # Ray restarts it (max_restarts)
            self._supervisor_restarts_killed = now[1] if now is not None else None
            how = "ray.kill(no_restart=False)"
        elif k.role == "node":
            node = self.worker_nodes[k.index - 1]
            self.cluster.remove_node(node, allow_graceful=False)
            how = "cluster.remove_node"
        else:
            if self.targets is None:
                import ray

                self.targets = ray.get(self.supervisor.targets.remote())
            targets = self.targets
            name, process = targets.lookup(k.role, k.index)
            self._directory = self._directory or Directory(targets.run_id)
            handle = self._directory.handle(name) if name and name not in self._killed else None
            if handle is None:
                if k not in self._waiting:
                    self._waiting[k] = targets
                    logger.warning(
                        "[chaos] %s is due at step %s; no live %s %d now: it waits for the next",
                        k,
                        step,
                        k.role,
                        k.index,
                    )
                return None
            how = kill_process(handle, process)
            target = name
            self._killed.add(name)  # targets may name it until the supervisor notices
        record = {"kill": str(k), "at": at, "step": step, "how": how, "target": target}
        self.fired.append(record)
        logger.info(  # an event the user asked for: the CLI shows it, a Python API run logs it
            "[chaos] killed %s%s at step %s (%s)", k, f" ({target})" if target else "", step, how
        )
        return record


def find_supervisor(run_id: str | None, wait_s: float = 0.0, poll_s: float = 0.5, on_wait=None):
    """The supervisor of ``run_id`` on the connected cluster (the only running run when None),
    waiting up to ``wait_s`` for it to appear (a job submitted a moment ago is still starting its
    actors); ``on_wait(text)`` is told once when it has to wait, and for what."""
    import ray

    from raytrain_ft.actors import NAMESPACE
    from raytrain_ft.errors import ClusterError

    deadline = time.monotonic() + wait_s
    while True:
        runs = sorted(
            a["name"].split("/")[0]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == NAMESPACE and a["name"].endswith("/supervisor")
        )
        found = (len(runs) == 1) if run_id is None else (run_id in runs)
        if found or (run_id is None and len(runs) > 1) or time.monotonic() >= deadline:
            break
        if on_wait is not None:
            which = f"run {run_id}" if run_id else "a run"
            on_wait(
                f"waiting up to {wait_s:g}s for {which} to start on this cluster (active: "
                f"{', '.join(runs) or 'none'})"
            )
            on_wait = None
        time.sleep(poll_s)
    if run_id is None:
        if len(runs) != 1:
            waited = f" after waiting {wait_s:.0f}s" if wait_s else ""
            raise ClusterError(
                f"{len(runs)} runs are active{waited} ({', '.join(runs) or 'none'}); name one with "
                "--run-id"
            )
        run_id = runs[0]
    if run_id not in runs:
        raise ClusterError(
            f"no active run {run_id!r} on this cluster (active: {', '.join(runs) or 'none'})"
        )
    return run_id, ray.get_actor(f"{run_id}/supervisor", namespace=NAMESPACE)


def check_kills_against(status, kills: list[KillSpec], field: str = "--kill") -> None:
    """A ``ConfigError`` on ``field`` for a kill naming something the run of ``status`` (the
    supervisor's) lacks: ``spare:3`` with one spare, ``worker:9`` of 2."""
    from raytrain_ft.recovery.faults import check_targets

    t = status.targets
    check_targets(kills, t.num_shards, len(t.workers), 1, t.num_spares, field, t.recovery)


def run_schedule(
    supervisor_handle,
    kills: list[KillSpec],
    poll_s: float = 0.05,
    on_fire=None,
    one_at_a_time: bool = False,
    field: str = "--kill",
) -> list[dict]:
    """Fire ``@step``/``@time`` kills against a running run until all fired or the run ended.
    A kill naming something the run lacks (``spare:3`` with one spare, ``worker:9`` of 2) is a
    ``ConfigError`` on ``field`` once the run's first status is read."""
    import ray

    from raytrain_ft.recovery.faults import check_live_kills

    check_live_kills(kills, field)
    runner = ChaosRunner(kills, supervisor_handle, one_at_a_time=one_at_a_time)
    checked = False
    while not runner.done:
        try:
            status = ray.get(supervisor_handle.status.remote())
        except ray.exceptions.RayActorError:  # the run ended (its driver took the supervisor)
            break
        if status.state in ("done", "failed"):
            break
        if not checked:  # each kill names something this run has
            check_kills_against(status, kills, field)
            checked = True
        runner.targets = status.targets
        workers = [w for w in status.workers if w is not None]
        before = len(runner.fired)
        runner.tick(min((w.step for w in workers), default=0), len(status.events))
        if on_fire:
            for record in runner.fired[before:]:
                on_fire(record)
        time.sleep(poll_s)
    return runner.fired
