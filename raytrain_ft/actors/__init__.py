"""Ray actors: thin wrappers around the pure modules."""


def process_address() -> str:
    """This actor's process as ``NODE_IP:PID`` (a kill by signal is only sent on the same host)."""
    import os

    import ray

    return f"{ray.util.get_node_ip_address()}:{os.getpid()}"
