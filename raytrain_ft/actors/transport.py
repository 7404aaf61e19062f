"""How protocol messages travel between the run's Ray actors.

- Every actor of a run is a detached named actor; a protocol ``Address`` is its
  name. ``Directory`` resolves names to handles (cached); a name Ray no longer
  knows is a dead actor. Ranks that share a process (``ranks_per_process``)
  are found through Ray's internal KV (name -> the host actor).
- Every actor takes protocol messages through one method, ``deliver(msg)``;
  ``send`` puts a dense array of up to ``PARTS_MAX_BYTES`` (a push, a batch of
  commands) inside the call in parts of at most ``INLINE_BYTES`` instead of
  the object store (``deliver_parts``), and ``unpack`` reassembles it;
  ``send_split`` also asks for the reply's parameters in ``reply_parts`` inline
  returns of at most ``INLINE_BYTES`` (``deliver_split``, ``split_reply``,
  ``join_reply``): a shard of up to ``PARTS_MAX_BYTES`` answers without the
  object store too.
- ``failure_of`` turns Ray's errors into the protocol's ``Failure``s: a dead
  actor, an unreachable one, or an answer lost with its node (the object
  store of a removed node is gone: every ``ray.get`` must expect it).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np

from raytrain_ft.actors import INLINE_BYTES, NAMESPACE, PARTS_MAX_BYTES, inline_parts
from raytrain_ft.protocol.messages import Append, Failure, Push, PushReply, StartFailed

logger = logging.getLogger(__name__)


def host_key(run_id: str, name: str) -> str:
    """Internal-KV key of a rank that shares a process; its value is ``HOST_ACTOR_NAME#RANK``."""
    return f"raytrain_ft/{run_id}/host/{name}"


class Directory:
    """Actor handles by name."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self._handles: dict[str, object] = {}

    def remember(self, name: str, handle) -> None:
        self._handles[name] = handle

    def forget(self, name: str) -> None:
        self._handles.pop(name, None)

    def handle(self, name: str):
        """The handle of ``name``, or None when Ray knows no such actor (it died, or was never
        created)."""
        h = self._handles.get(name)
        if h is not None:
            return h
        import ray
        from ray.experimental import internal_kv

        try:
            h = ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            from raytrain_ft.actors.warm import alias_key

            alias = internal_kv._internal_kv_get(alias_key(self.run_id, name))
            if alias is not None:  # a warm process serves the name
                try:
                    h = Addressed(ray.get_actor(alias.decode(), namespace=NAMESPACE), name)
                except ValueError:
                    return None
                self._handles[name] = h
                return h
            host = internal_kv._internal_kv_get(host_key(self.run_id, name))
            if host is None:
                return None
            from raytrain_ft.actors.worker_entry import RankHandle

            host_name, _, rank = host.decode().rpartition("#")
            try:
                h = RankHandle(ray.get_actor(host_name, namespace=NAMESPACE), int(rank))
            except ValueError:
                return None
        self._handles[name] = h
        return h


@dataclass(frozen=True)
class Addressed:
    """The handle of a warm process serving ``name`` (``actors/warm.py``): every call names the
    incarnation it is for, so a call that arrives after the process moved on raises ``Gone``."""

    actor: object
    name: str

    def __getattr__(self, method: str):
        if method.startswith("__"):
            raise AttributeError(method)
        return _AddressedMethod(getattr(self.actor, method), self.name)


@dataclass(frozen=True)
class _AddressedMethod:
    method: object
    to: str

    def options(self, **options):
        return _AddressedMethod(self.method.options(**options), self.to)

    def remote(self, *args):
        return self.method.remote(*args, to=self.to)


@dataclass(frozen=True, slots=True)
class Sealed:
    """A value pickled where it was made and unpickled only where it is used: a process that only
    passes it on (the supervisor, with the run's ``Task``) never imports what unpickling it needs
    (torch, the user's model code). The Ray object refs inside travel beside the bytes, as Ray
    arguments, so Ray keeps counting them."""

    payload: bytes
    refs: tuple

    @classmethod
    def of(cls, value) -> Sealed:
        import io

        import ray
        from ray import cloudpickle

        refs: list = []

        class _Pickler(cloudpickle.Pickler):
            def persistent_id(self, obj):
                if isinstance(obj, ray.ObjectRef):
                    refs.append(obj)
                    return len(refs) - 1
                return None

        buf = io.BytesIO()
        _Pickler(buf, protocol=5).dump(value)
        return cls(buf.getvalue(), tuple(refs))

    def open(self):
        import io
        import pickle

        refs = self.refs

        class _Unpickler(pickle.Unpickler):
            def persistent_load(self, pid):
                return refs[pid]

        return _Unpickler(io.BytesIO(self.payload)).load()


class RefKeeper:
    """Holds the object refs of a run's sealed ``Task`` (its in-memory data) for the run's
    supervisor. Ray restarts a dead supervisor from its constructor's arguments, and does not pin
    refs among them for that (ray-project/ray#53727: it logs an error line at every such
    creation). So the supervisor is created without them and reads them here at each (re)start.
    This actor is never restarted: it lives where the driver is, as the refs' owner does, and ends
    with the run's other actors."""

    def __init__(self, refs: list):
        self._refs = refs  # nested in a list: Ray hands them over as refs, unresolved

    def refs(self) -> list:
        return self._refs


def reply_parts(nbytes: int) -> int:
    """Inline returns a reply carrying ``nbytes`` of parameters is split into: 0 (one return: it
    is inline anyway, or too large and goes through the object store) or 2+ parts of at most
    INLINE_BYTES."""
    if nbytes <= INLINE_BYTES or nbytes > PARTS_MAX_BYTES:
        return 0
    return -(-nbytes // INLINE_BYTES)


def _push_parts(msg):
    """(message without its payload, parts) for a push whose dense payload travels in parts;
    None otherwise."""
    if (
        isinstance(msg, Push)
        and isinstance(msg.payload, np.ndarray)
        and msg.payload.nbytes > INLINE_BYTES
    ):
        parts = inline_parts(msg.payload)
        if parts is not None:
            return dataclasses.replace(msg, payload=None), parts
    return None


def send_split(handle, msg, n_out: int) -> list:
    """``handle.deliver_split``: as ``send``, and the reply's parameters come back as ``n_out``
    inline returns; refs [reply, part, ...] (``join_reply`` puts them together)."""
    method = handle.deliver_split.options(num_returns=n_out + 1)
    split = _push_parts(msg)
    if split is not None:
        bare, parts = split
        return method.remote(bare, (len(parts),), n_out, *parts)
    return method.remote(msg, (), n_out)


def split_reply(reply, n_out: int) -> tuple:
    """The server side of ``send_split``: (reply without params, n_out pieces of them), or (reply,
    None, ...) when the reply has no parameters of that size."""
    params = getattr(reply, "params", None)
    if isinstance(reply, PushReply) and isinstance(params, np.ndarray):
        pieces = np.array_split(params, n_out)
        if all(p.nbytes <= INLINE_BYTES for p in pieces):
            return (dataclasses.replace(reply, params=None), *pieces)
    return (reply, *([None] * n_out))


def join_reply(reply, pieces: list):
    if pieces and pieces[0] is not None:
        return dataclasses.replace(reply, params=np.concatenate(pieces))
    return reply


def send(handle, msg):
    """Call ``handle.deliver(msg)``; dense arrays up to PARTS_MAX_BYTES go inside the call in
    parts."""
    split = _push_parts(msg)
    if split is not None:
        bare, parts = split
        return handle.deliver_parts.remote(bare, (len(parts),), *parts)
    if isinstance(msg, Append) and msg.snapshot is None and msg.commands:
        total = sum(c.update.nbytes for c in msg.commands)
        if INLINE_BYTES < total <= PARTS_MAX_BYTES:
            split = [inline_parts(c.update) for c in msg.commands]
            bare = dataclasses.replace(
                msg, commands=tuple(dataclasses.replace(c, update=None) for c in msg.commands)
            )
            return handle.deliver_parts.remote(
                bare, tuple(len(p) for p in split), *[a for p in split for a in p]
            )
    return handle.deliver.remote(msg)


def unpack(msg, counts: tuple, parts: tuple):
    """The message ``send`` split: its arrays joined again."""
    if isinstance(msg, Push):
        return dataclasses.replace(msg, payload=np.concatenate(parts))
    it = iter(parts)
    commands = tuple(
        dataclasses.replace(c, update=np.concatenate([next(it) for _ in range(n)]))
        for c, n in zip(msg.commands, counts)
    )
    return dataclasses.replace(msg, commands=commands)


def failure_of(error: BaseException):
    """The protocol's view of an error from ``ray.get`` of a call: a ``Failure``, a ``StartFailed``
    (the actor's constructor raised: a setting to fix, not a crash), or None (a bug: re-raise
    it)."""
    import ray

    e = ray.exceptions
    lost = tuple(
        getattr(e, n)
        for n in (
            "ObjectLostError",
            "ObjectReconstructionFailedError",
            "OwnerDiedError",
            "ObjectFetchTimedOutError",
            "ReferenceCountingAssertionError",
        )
        if hasattr(e, n)
    )
    if isinstance(error, lost):
        return Failure.LOST
    if isinstance(error, getattr(e, "ActorUnavailableError", ())) or isinstance(
        error, e.GetTimeoutError
    ):
        return Failure.UNAVAILABLE
    if isinstance(error, e.RayActorError):
        text = str(error)
        if "creation task" in text:
            return StartFailed(own_error_line(text))
        return Failure.DEAD
    if isinstance(error, e.RayTaskError) and isinstance(
        getattr(error, "cause", None), e.RayActorError
    ):
        return failure_of(error.cause)
    from raytrain_ft.actors.warm import BecomeFailed, Gone

    cause = getattr(error, "cause", None)
    if isinstance(error, Gone) or isinstance(cause, Gone):
        return Failure.DEAD  # the incarnation called for left its warm process
    if isinstance(cause, BecomeFailed):  # a warm process could not take it: as a constructor
        return StartFailed(own_error_line(str(cause)))
    return None


def own_error_line(text: str) -> str:
    """The project's own message inside a Ray error's text (an actor's __init__ raised it), else its
    last line."""
    for name in ("ClusterError", "ConfigError", "DataError"):
        marker = f"{name}: "
        if marker in text:
            return text.rsplit(marker, 1)[1].strip().splitlines()[0]
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else text
