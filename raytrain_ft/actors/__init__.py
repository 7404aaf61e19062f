"""Ray actors: thin wrappers around the pure modules."""

import os

NAMESPACE = "raytrain_ft"
"""Ray namespace of every named actor of a run (names start with the run id)."""

INLINE_BYTES = 96 * 1024
"""Arrays up to this size travel inside a call: Ray inlines arguments under its 100 KiB
``max_direct_call_object_size`` instead of a round trip to the object store (py-spy: ``ray.put`` of
each ~76 KB push was ~40% of a worker's CPU with 16 ranks x 8 shards)."""
PARTS_MAX_BYTES = int(os.environ.get("RAYTRAIN_FT_PARTS_MAX_BYTES", 512 * 1024))
"""Arrays up to this size go inside the call as several parts of at most INLINE_BYTES (a 320 KB
array measured 1.9 ms in parts vs 2.3 ms through the object store; at 1.1 MB parts were slower, 3.9
vs 2.2 ms); larger ones go through the object store. The environment variable of the same name
sets it in every process of a Ray the driver starts (``experiments/transport/parts_limit.py``
measures the limit both ways)."""


def inline_parts(array):
    """``array`` as consecutive owned copies of at most INLINE_BYTES each, to pass as separate call
    arguments; None when it is above PARTS_MAX_BYTES."""
    import numpy as np

    if array.nbytes > PARTS_MAX_BYTES:
        return None
    return tuple(
        part.copy() for part in np.array_split(array, max(1, -(-array.nbytes // INLINE_BYTES)))
    )


def process_address() -> str:
    """This actor's process as ``NODE_IP:PID`` (a kill by signal is only sent on the same host)."""
    import os

    import ray

    return f"{ray.util.get_node_ip_address()}:{os.getpid()}"


ORPHAN_CHECK_ENV_VAR = "RAYTRAIN_FT_ORPHAN_CHECK_S"
DEFAULT_ORPHAN_CHECK_S = 5.0


_watched: list = [None]
"""The watch of the run this process serves now (a warm server process serves several in turn);
"exiting" once a watch decided to end the process."""
_watch_lock = __import__("threading").Lock()


def stop_watching() -> bool:
    """This process no longer serves a run (``actors/warm.py``): its watch ends. False when the
    watch has already decided to end the process (it must not be offered to another run)."""
    with _watch_lock:
        if _watched[0] == "exiting":
            return False
        _watched[0] = None
        return True


def watch_supervisor(run_id: str, namespace: str, misses_to_exit: int = 2) -> None:
    """End this (detached) actor's process once its run's supervisor is gone for good.

    Servers and workers are detached so that they outlive a supervisor restart;
    the supervisor is owned by the driver. When the driver dies (a stopped job,
    a killed ``raytrain-ft train``) Ray ends the supervisor and frees its name;
    without this watch the run's other actors would hold their CPUs and GPUs
    forever. A restarting supervisor keeps its name, so a restart is not mistaken
    for the end of the run.
    """
    import logging
    import os
    import threading
    import time

    import ray

    if not run_id or not ray.is_initialized():
        return
    interval_s = float(os.environ.get(ORPHAN_CHECK_ENV_VAR, DEFAULT_ORPHAN_CHECK_S))
    token = _watched[0] = object()  # a later watch (the next run's) ends this one
    # the run's actors are named in ``namespace`` (the runtime context's is the job's)
    me = (ray.get_runtime_context().get_actor_name(), namespace)

    def gcs_found_me() -> bool:
        """Whether the GCS finds this very actor by its name: Ray answers "not found" (ValueError)
        for every lookup error but a timeout, so a lookup of the supervisor that failed counts as
        its absence only where the same GCS found an actor known to exist."""
        if not me[0]:
            return True  # nothing to check against (the actors of a run are named)
        try:
            ray.get_actor(me[0], namespace=me[1])
            return True
        except Exception:  # noqa: BLE001 -- the GCS cannot say: no verdict this time
            return False

    def loop() -> None:
        misses = 0
        while True:
            time.sleep(interval_s)
            if _watched[0] is not token:
                return
            try:
                ray.get_actor(f"{run_id}/supervisor", namespace=namespace)
                misses = 0
            except ValueError:
                if not gcs_found_me():
                    continue
                misses += 1
                if misses < misses_to_exit:
                    continue
                with _watch_lock:  # against a rest offering this process meanwhile
                    if _watched[0] is not token:
                        return
                    _watched[0] = "exiting"
                logging.getLogger(__name__).warning(
                    "[%s] the run's supervisor is gone (its driver ended); exiting", run_id
                )
                os._exit(0)
            except Exception:  # noqa: BLE001 -- the GCS unreachable for a moment: ask again next time
                pass

    threading.Thread(target=loop, name="orphan-watch", daemon=True).start()
