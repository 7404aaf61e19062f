"""Ray actors: thin wrappers around the pure modules."""

NAMESPACE = "raytrain_ft"
"""Ray namespace of every named actor of a run (names start with the run id)."""


def process_address() -> str:
    """This actor's process as ``NODE_IP:PID`` (a kill by signal is only sent on the same host)."""
    import os

    import ray

    return f"{ray.util.get_node_ip_address()}:{os.getpid()}"


ORPHAN_CHECK_ENV_VAR = "RAYTRAIN_FT_ORPHAN_CHECK_S"
DEFAULT_ORPHAN_CHECK_S = 5.0


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

    def loop() -> None:
        misses = 0
        while True:
            time.sleep(interval_s)
            try:
                ray.get_actor(f"{run_id}/supervisor", namespace=namespace)
                misses = 0
            except ValueError:
                misses += 1
                if misses >= misses_to_exit:
                    logging.getLogger(__name__).warning("[%s] the run's supervisor is gone (its driver ended); exiting", run_id)
                    os._exit(0)
            except Exception:  # noqa: BLE001 -- the GCS unreachable for a moment: ask again next time
                pass

    threading.Thread(target=loop, name="orphan-watch", daemon=True).start()
