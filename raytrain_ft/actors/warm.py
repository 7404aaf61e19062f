"""Warm server processes: the servers of a run that ended well, kept for the next run of the same
driver (as Ray Tune's ``reuse_actors`` keeps trainables between trials).

A server process costs ~3 CPU-seconds to start (Python, Ray's worker, ``import torch``), more
than a short run's updates. A driver that keeps its Ray up across runs (a notebook, a sweep, a
test session) hands the server processes of a finished run to a pool in Ray's internal KV
(``cluster.keep_warm_s``); the next run's supervisor claims one instead of starting a process.

- A claim is atomic: the claimer deletes the pool key, and only the one whose delete removed it
  owns the process. A process still resting ``keep_warm_s`` after its run ends itself (a claimer
  that took it a moment before finds it dead and takes another), and the driver ends the rest at
  exit.
- A claimed process takes the protocol name it is given (unique per incarnation, as a new process
  would) through an alias in the internal KV. Every call names the incarnation it is for: a call
  to an earlier incarnation -- a late message of the last run, a probe of a name that was retired
  -- raises ``Gone``, which callers read as that actor dead. A run's messages never reach another
  run's role.
- Servers and single-rank workers are kept (not processes hosting several ranks). A resting
  worker keeps the Ray CPUs (and GPUs) it was created with: a run takes only workers of its own
  kind (same CPUs and GPUs) and ends the others first, a run that reads Ray Datasets ends them all
  first (the split needs CPUs), and ``end_warm_processes()`` frees them at once.
"""

from __future__ import annotations

import contextlib
import logging
import threading

logger = logging.getLogger(__name__)

POOL_PREFIX = "raytrain_ft/warm/"

BECOME_WAIT_S = 30.0
"""How long a call for the name a warm process was claimed for waits for its ``become``, and how
long a claimed process waits for it before it ends."""


def worker_kind(num_cpus: float, num_gpus: float) -> str:
    """The pool kind of a worker process: only one that holds the same Ray resources is taken."""
    return f"worker-cpu{num_cpus:g}-gpu{num_gpus:g}"


def loaded_code_unchanged(started: float) -> bool:
    """Whether no module this process loaded has changed on disk since ``started`` (its start): a
    warm process must not serve a run with code the driver has since edited (a notebook)."""
    import os
    import sys

    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        try:
            if path and os.stat(path).st_mtime > started:
                return False
        except OSError:
            continue
    return True


def process_started_at() -> float:
    """When this process started (seconds since the epoch, from Linux's ``/proc``, to about 10 ms;
    elsewhere now): a module it loaded before its actor was built counts too."""
    import os
    import time

    try:
        with open("/proc/self/stat") as fh:
            ticks = int(fh.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        with open("/proc/uptime") as fh:
            boot = time.time() - float(fh.read().split()[0])
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time()


class Gone(RuntimeError):
    """The call was for an incarnation this process no longer is (it rests, or serves another
    name): for the caller, that actor is dead."""


class BecomeFailed(RuntimeError):
    """Taking the new incarnation raised (its constructor's error, as a new process would have
    raised it): for the caller, that actor failed to start."""


def become_failure(error: BaseException) -> str:
    """The text a failed ``become`` answers later calls with (``failure_of`` reads it as a start
    failure and takes the project's own message out of it)."""
    return f"{type(error).__name__}: {error}"


def free_memory() -> None:
    """After a resting process dropped its incarnation: collect the reference cycles it left (a
    model and its hooks) and hand cached GPU memory back, so the next one finds the device as a new
    process would."""
    import gc
    import sys

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def check_addressed(current: str | None, to: str | None, ray_name: str) -> None:
    """Raise ``Gone`` unless the call is for the incarnation this process is now. ``to`` is the
    protocol name the caller addressed (None: the actor's Ray name, a handle found by name)."""
    wanted = ray_name if to is None else to
    if current is None or wanted != current:
        raise Gone(f"{wanted} is gone (this process is {current or 'resting'})")


class WarmLife:
    """One warm process's life, the same whatever runs its calls (the server's event loop, a
    worker's threads): the incarnation it serves, the error of a ``become`` that raised, its rests
    and whether an end-of-rest timer that fires still ends it. The actor serializes calls to it
    its own way and runs the timers: ``schedule(delay_s, rested_as, key, claimed)`` must call
    ``rest_over(rested_as, key, claimed)`` after ``delay_s`` (through the actor's own
    serialization)."""

    def __init__(self, ray_name: str, kind: str, schedule, exit=None):
        import os

        self.ray_name, self.kind = ray_name, kind
        """The name Ray knows the process by (its first incarnation's) and its pool kind ("": the
        process is never kept)."""
        self.started = process_started_at()
        self.name: str | None = None
        self.failed: tuple[str, str] | None = None
        """(name, error) of a ``become`` that raised: calls for that name get the error."""
        self._rests = 0
        self._schedule = schedule
        self._exit = exit or os._exit

    def check(self, to: str | None) -> None:
        """Raise unless the call is for the incarnation served now: ``BecomeFailed`` for the name
        whose ``become`` raised, ``Gone`` for any other."""
        wanted = self.ray_name if to is None else to
        if self.name is None and self.failed is not None and wanted == self.failed[0]:
            raise BecomeFailed(self.failed[1])
        check_addressed(self.name, to, self.ray_name)

    def becoming(self) -> None:
        """A claimer's ``become`` starts: a pending end of the rest is void."""
        if self.name is not None:
            raise RuntimeError(f"{self.ray_name} serves {self.name}: it is not resting")
        self._rests += 1

    def become_failed(self, name: str, error: BaseException) -> None:
        """Building the incarnation raised: calls for ``name`` get its error (as a new process's
        constructor error reaches the supervisor), and the process ends a while later."""
        self.failed = (name, become_failure(error))
        self._schedule(BECOME_WAIT_S, self._rests, "", True)

    def unfit(self, error: BaseException) -> BecomeFailed:
        """The incarnation served now found, after its constructor, that it cannot serve (the
        user's model factory built another model in this process): calls for it get ``error`` as
        a constructor's, and the process ends a while later. Returns the error to raise now."""
        name, self.name = self.name, None
        self.become_failed(name, error)
        return BecomeFailed(become_failure(error))

    def rest(self, keep_s: float, node: str, drop) -> str:
        """The run ended well: ``drop()`` lets the actor drop its incarnation (every later call to
        it raises ``Gone``); the process is offered to the next run and ends after ``keep_s`` unless
        claimed. Returns the Ray name."""
        from ray.experimental import internal_kv

        from raytrain_ft.actors import stop_watching

        if not self.kind:
            raise RuntimeError(f"{self.name} is not kept warm")
        if not stop_watching():
            raise RuntimeError(f"{self.name} is ending (its run's supervisor is gone)")
        drop(self.name)
        self.name, self.failed = None, None
        free_memory()  # the incarnation's model, buffers and hooks are reference cycles
        key = pool_key(self.kind, node, self.ray_name)
        internal_kv._internal_kv_put(key, b"")
        self._rests += 1
        self._schedule(keep_s, self._rests, key, False)
        return self.ray_name

    def rest_over(self, rested_as: int, key: str, claimed: bool) -> None:
        """An end-of-rest timer fired: nothing if the process serves again or rested again since;
        if a claimer took its key (its ``become`` is on the way) wait ``BECOME_WAIT_S`` more and end
        only if it never comes; else end the process."""
        if self.name is not None or self._rests != rested_as:
            return
        from ray.experimental import internal_kv

        if not claimed and internal_kv._internal_kv_del(key) != 1:
            self._schedule(BECOME_WAIT_S, rested_as, key, True)
            return
        logger.info("[%s] kept warm and unclaimed; exiting", self.ray_name)
        self._exit(0)


def alias_key(run_id: str, name: str) -> str:
    """Internal-KV key of a protocol name served by a warm process; its value is the process's Ray
    actor name."""
    return f"raytrain_ft/{run_id}/alias/{name}"


def claimed_for(to: str | None, ray_name: str) -> bool:
    """Whether a resting process (Ray name ``ray_name``) was claimed for protocol name ``to``: the
    alias of ``to`` (names start with their run's id) names it."""
    from ray.experimental import internal_kv

    if not to or "/" not in to:
        return False
    alias = internal_kv._internal_kv_get(alias_key(to.split("/", 1)[0], to))
    return alias is not None and alias.decode() == ray_name


def _job_prefix() -> str:
    import ray

    return f"{POOL_PREFIX}{ray.get_runtime_context().get_job_id()}/"


def pool_key(kind: str, node: str, actor_name: str) -> str:
    """The key a resting process is offered under (from inside that process)."""
    return f"{_job_prefix()}{kind}/{node}/{actor_name}"


def _parse(key: bytes) -> tuple[str, str, str]:
    """(kind, node, Ray name) of a pool key of this job."""
    kind, node, actor_name = key.decode()[len(_job_prefix()) :].split("/", 2)
    return kind, node, actor_name


def claim(kind: str, node: str | None = None) -> tuple[str, object] | None:
    """Take a resting process of ``kind`` (on ``node``, or any) from this job's pool: (its Ray name,
    its handle), or None when the pool has none."""
    import ray
    from ray.experimental import internal_kv

    from raytrain_ft.actors import NAMESPACE

    prefix = f"{_job_prefix()}{kind}/{node + '/' if node else ''}"
    for key in sorted(internal_kv._internal_kv_list(prefix)):
        if internal_kv._internal_kv_del(key) != 1:
            continue  # another claimer, or the process itself ending, was first
        actor_name = _parse(key)[2]
        try:
            return actor_name, ray.get_actor(actor_name, namespace=NAMESPACE)
        except ValueError:
            continue  # it died while resting
    return None


def end_resting(kind_prefix: str = "") -> int:
    """End every resting process of this job's pool (of the kinds starting with ``kind_prefix``):
    the driver calls it at exit, a user may call it to free the processes (and the CPUs resting
    workers hold) at once. Returns how many were ended."""
    import ray
    from ray.experimental import internal_kv

    if not ray.is_initialized():
        return 0
    ended = 0
    try:
        keys = internal_kv._internal_kv_list(_job_prefix() + kind_prefix)
    except Exception:  # noqa: BLE001 -- Ray is going down
        return 0
    from raytrain_ft.actors import NAMESPACE

    for key in keys:
        if internal_kv._internal_kv_del(key) != 1:
            continue
        try:
            ray.kill(ray.get_actor(_parse(key)[2], namespace=NAMESPACE), no_restart=True)
            ended += 1
        except ValueError:
            pass
    return ended


def prune_stale(worker_kind_needed: str | None, timeout_s: float = 10.0) -> int:
    """In the driver, before a run: end the resting processes that loaded code changed on disk
    since they started (a notebook's edited model module; the run's new processes would build
    another model than they) or that do not answer, and the resting workers of another kind than
    the run takes (``worker_kind_needed``; None: none), which would hold CPUs or GPUs its own
    workers need. Returns how many were ended."""
    import ray
    from ray.experimental import internal_kv

    from raytrain_ft.actors import NAMESPACE

    asked = {}
    ended = 0
    for key in internal_kv._internal_kv_list(_job_prefix()):
        kind = _parse(key)[0]
        if kind.startswith("worker-") and kind != worker_kind_needed:
            if internal_kv._internal_kv_del(key) == 1:
                with contextlib.suppress(Exception):
                    ray.kill(ray.get_actor(_parse(key)[2], namespace=NAMESPACE), no_restart=True)
                    ended += 1
            continue
        try:
            handle = ray.get_actor(_parse(key)[2], namespace=NAMESPACE)
        except ValueError:
            internal_kv._internal_kv_del(key)  # ended already
            continue
        asked[handle.code_unchanged.remote()] = (key, handle)
    answered = (
        set(ray.wait(list(asked), num_returns=len(asked), timeout=timeout_s)[0]) if asked else set()
    )
    for ref, (key, handle) in asked.items():
        try:
            fresh = ref in answered and ray.get(ref)
        except Exception:  # noqa: BLE001 -- dead: not to be taken
            fresh = False
        if not fresh and internal_kv._internal_kv_del(key) == 1:
            with contextlib.suppress(Exception):
                ray.kill(handle, no_restart=True)
            ended += 1
    return ended


_AT_EXIT = threading.Event()


def release_processes(run_id: str, names: list[str], keep_s: float, timeout_s: float = 10.0) -> set:
    """In the driver, after a run ended well and its supervisor was killed: tell each of the run's
    processes (``names``: their protocol names) to rest. Returns the Ray names of those that rest;
    the caller kills the others (processes hosting several ranks, ranks that did not finish)."""
    import atexit

    import ray

    from raytrain_ft.actors.transport import Directory

    directory = Directory(run_id)
    pending = {}
    for name in names:
        try:
            handle = directory.handle(name)
            if handle is not None and hasattr(handle, "rest"):  # a host of ranks has none
                pending[handle.rest.remote(keep_s)] = name
        except Exception as e:  # noqa: BLE001 -- not kept (killed by the caller)
            logger.debug("[warm] %s not kept: %s", name, e)
    rested: set = set()
    if not pending:
        return rested
    done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=timeout_s)
    for ref in done:
        try:
            rested.add(ray.get(ref))
        except Exception as e:  # noqa: BLE001 -- dead, or busy with something else: killed
            logger.debug("[warm] %s not kept: %s", pending[ref], e)
    if rested and not _AT_EXIT.is_set():
        _AT_EXIT.set()
        atexit.register(end_resting)
    return rested
