"""A synchronous in-memory bus for protocol state machines: no Ray, no clock, FIFO delivery.

``send`` puts a test's request on the bus and runs to quiescence. A ``Call`` reaches its callee as
``on_request`` with a fresh rid; the callee's ``Reply`` goes back to the incarnation that called as
``on_reply(cid, value)``; a call to a name not on the bus, or dead, gets ``on_failure(cid,
Failure.DEAD)``. ``Fold`` runs ``fold(shard)`` at once; ``Timer`` and ``Note`` are collected
(``fire`` a timer); ``Persist`` goes to ``kv``; ``Create`` adds ``create(effect)`` when a factory is
given; ``Kill`` kills."""

from __future__ import annotations

import itertools
from collections import deque

from raytrain_ft.protocol.messages import (
    Call,
    Create,
    Failure,
    Fold,
    Kill,
    Note,
    Persist,
    Reply,
    Timer,
)


class Bus:
    def __init__(self, create=None):
        self.procs, self.create = {}, create
        self.replies: dict = {}  # rid -> answer, for requests the test sent
        self.timers: list = []  # (name, token)
        self.notes: list = []  # (name, Note)
        self.kv: dict = {}
        self.handled: list = []  # (name, effects) of every handler call, in order
        self._queue, self._rids = deque(), itertools.count(1)
        # rid -> (callee, caller name, caller object, cid); caller None: the test
        self._asked: dict = {}
        # === Test methods ===
        self.dead: set = set()
        self.held: dict = {}  # name -> messages kept from it

    def add(self, name: str, obj) -> None:
        self.procs[name] = obj
        self.dead.discard(name)

    def send(self, dst: str, msg, run: bool = True) -> int:
        rid = next(self._rids)
        self._asked[rid] = (dst, None, None, None)
        self._queue.append((dst, "request", rid, msg, None))
        if run:
            self.run()
        return rid

    def ask(self, dst: str, msg):
        """Send; the answer (None while there is none)."""
        return self.replies.get(self.send(dst, msg))

    def run(self) -> None:
        while self._queue:
            item = self._queue.popleft()
            if item[0] in self.held:
                self.held[item[0]].append(item)
            else:
                self._deliver(*item)

    def perform(self, name: str, effects: list) -> None:
        """Carry out ``effects`` as if ``name`` had returned them (e.g. ``on_start``'s), then
        run."""
        self._perform(name, self.procs[name], effects)
        self.run()

    def fire(self, name: str, token) -> bool:
        """Deliver every copy of timer ``token`` collected for ``name`` (each set timer fires once,
        as in the actors); False if none was set."""
        copies = self.timers.count((name, token))
        self.timers = [t for t in self.timers if t != (name, token)]
        for _ in range(copies):
            if name not in self.dead:
                self.perform(name, self.procs[name].on_timer(token))
        return copies > 0

    def _deliver(self, dst, kind, key, value, obj) -> None:
        p = self.procs.get(dst)
        alive = p is not None and dst not in self.dead
        if kind == "request":
            if alive:
                self._perform(dst, p, p.on_request(key, value))
            else:
                self._answer(key, Failure.DEAD)
        elif alive and p is obj:
            self._perform(
                dst,
                p,
                p.on_failure(key, value) if isinstance(value, Failure) else p.on_reply(key, value),
            )

    def _answer(self, rid: int, value) -> None:
        callee, caller, obj, cid = self._asked.pop(rid, (None,) * 4)
        if callee is not None and caller is None:
            self.replies[rid] = value
        elif callee is not None:
            self._queue.append((caller, "reply", cid, value, obj))

    def _perform(self, name: str, obj, effects: list) -> None:
        self.handled.append((name, effects))
        for e in effects:
            if isinstance(e, Reply) and self._asked.get(e.rid, (None,))[0] == name:
                self._answer(e.rid, e.value)
            elif isinstance(e, Call):
                rid = next(self._rids)
                self._asked[rid] = (e.dst, name, obj, e.cid)
                self._queue.append((e.dst, "request", rid, e.msg, None))
            elif isinstance(e, Fold):
                obj.fold(e.shard)
            elif isinstance(e, Timer):
                self.timers.append((name, e.token))
            elif isinstance(e, Note):
                self.notes.append((name, e))
            elif isinstance(e, Persist):
                self.kv[e.key] = e.value
            elif isinstance(e, Create) and self.create is not None:
                self.add(e.name, self.create(e))
            elif isinstance(e, Kill):
                self.kill(e.name)

    # === Test methods ===

    def kill(self, name: str) -> None:
        """``name`` dies: the calls it has not answered, and every later one, fail with DEAD."""
        self.dead.add(name)
        for rid in [r for r, a in self._asked.items() if a[0] == name]:
            self._answer(rid, Failure.DEAD)
        self.run()

    def hold(self, name: str) -> None:
        """Keep every message to ``name`` (requests and answers) until ``release``."""
        self.held.setdefault(name, [])

    def release(self, name: str, n: int | None = None) -> None:
        """Deliver the first ``n`` messages held for ``name`` and keep holding; or all of them, and
        stop."""
        items = self.held.pop(name) if n is None else self.held[name][:n]
        if n is not None:
            del self.held[name][:n]
        for item in items:  # older than anything queued since: delivered first
            self._deliver(*item)
        self.run()


def sync_primary_and_holder(
    optim, workers: int, values, num_params: int | None = None, pipelined: bool = False
):
    """A bus with the primary "p" of one sync shard holding ``values`` (float32, epoch 1) and its
    holder "h" (unfolded: the log keeps every command); (bus, shard range, spec)."""
    import numpy as np

    from raytrain_ft.consistency import Rule
    from raytrain_ft.protocol.messages import Load, SetReplica
    from raytrain_ft.protocol.server import ServerProtocol, ServerSpec
    from raytrain_ft.sharding import shard_ranges

    values = np.asarray(values, np.float32)
    shard = shard_ranges(values.size, 1, num_params=num_params)[0]
    spec = ServerSpec(
        optim,
        total_steps=100,
        num_workers=workers,
        rule=Rule("sync", workers),
        fold=False,
        pipelined=pipelined,
    )
    bus = Bus()
    for name in ("p", "h"):
        bus.add(name, ServerProtocol(name, spec))
    bus.ask("p", Load(shard, 1, values))
    bus.ask("p", SetReplica("h", 1))
    return bus, shard, spec
