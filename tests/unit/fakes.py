"""In-process stand-ins for Ray actor handles (no Ray runtime)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace


class InProcessHandle:
    """``handle.method.remote(*args)`` schedules the object's coroutine method as an asyncio task."""

    def __init__(self, obj):
        self._obj = obj
        # === Test methods ===
        self.dead = False

    def __getattr__(self, name):
        method = getattr(self._obj, name)

        def remote(*args, **kwargs):
            if self.dead:
                return asyncio.ensure_future(_raise_actor_died())
            return asyncio.ensure_future(method(*args, **kwargs))

        return SimpleNamespace(remote=remote)


async def _raise_actor_died():
    import ray

    raise ray.exceptions.RayActorError()
