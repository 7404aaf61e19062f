"""A worker's exchange with the shards: one outstanding call per shard, rerouted and resent until
answered.

Pure: the worker's training loop asks for a ``push`` or ``pull`` per shard and
carries out the ``Call`` effects; answers come back through ``on_reply`` /
``on_failure``; ``on_tick`` runs the watchdog. A call that fails -- the server
died, was deposed, is unreachable, or its reply was lost with its node --
makes the client ask the supervisor for the shard's route (``RouteAfter``) and
send the *same* message again: a push is idempotent by ``(rank, step)``, so a
resend to a rebuilt primary that already logged it is answered, never applied
twice. The watchdog asks the supervisor whether a call that is taking long
went to a primary that has since been replaced (a suspected, still-running
primary that will never answer), and resends it to the new one.

``ledger`` is the worker's own record of what the shards acknowledged: the
``(shard, rank, step)`` of every push answered, applied or dropped as late.
Checkers judge exactly-once delivery from it, never from the servers' counters.

``--durability pipelined`` (sync): a push marked ``early`` may be answered before the holder
logged its update (the worker computes the next step meanwhile), never before the updates ahead of
it. Such a push enters the ledger only when the shard's next answer comes (that answer waited for
it to be logged); until then the exchange keeps it, and the first call to a primary of a newer
epoch sends it again first, answered only once logged: a rebuilt primary that lacks the update
applies it again from the same pushes, to the same bits.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field

from raytrain_ft.protocol.messages import (
    Address,
    Call,
    Failure,
    Pull,
    Push,
    PushReply,
    RefusalKind,
    Refused,
    Route,
    RouteAfter,
)

DEFAULT_MAX_REROUTES = 20
"""Consecutive failed calls to one shard a worker tolerates (each waits for a route from the
supervisor)."""


def clip_factor_of(probe_replies, max_norm: float) -> float:
    """The factor of a globally clipped step from every shard's answer to its probe: the one a
    shard that already applied the update reports, else computed from the shards' squared norms
    (the same on every rank)."""
    from raytrain_ft.optim import clip_factor

    known = [r.clip_factor for r in probe_replies if r.clip_factor is not None]
    return known[0] if known else clip_factor([r.sq_norm for r in probe_replies], max_norm)


def process_blocked(
    members: tuple[int, ...], handed: dict, left, step: int, done: int
) -> str | None:
    """Pre-aggregation: why the ranks of a process can never push ``step`` as one (None: they
    can, or may yet). ``handed``: rank -> the step it handed in; ``left``: ranks whose training
    ended; ``done``: the last step the process pushed. A rank released from an earlier step is on
    its way to this one; one waiting for another step's push (or ahead of this one), or one that
    stopped, is not -- the supervisor starts a process's ranks at one step, so that is a bug,
    reported instead of waited on."""
    got = {r: handed.get(r) for r in members}
    if all(h == step for h in got.values()):
        return None
    stopped = sorted(r for r in left if r in got)
    apart = {r: h for r, h in got.items() if h is not None and h != step and h > done}
    if not stopped and not apart:
        return None
    return f"the ranks of this process cannot push as one at step {step}: " + (
        f"ranks {stopped} stopped" if stopped else f"ranks at steps {apart}"
    )


@dataclass(frozen=True, slots=True)
class Acked:
    shard: int
    rank: int
    step: int
    seq: int
    """seq + 1 of the update that holds the push (0: not reported -- an async repeat, or late)."""
    late: bool


@dataclass(slots=True)
class _Outstanding:
    msg: object
    cid: int | None
    """The call to the server (None while waiting for a route)."""
    sent_at: float
    attempts: int = 0
    route_cid: int | None = None
    checking: bool = False
    """The route request is a watchdog check (the call to the server stays outstanding)."""
    full: object = None
    """A clipped step's second phase: the message with the gradient, sent if the primary asks for
    it (RESEND)."""
    epoch: int = -1
    """The route epoch of the primary the call went to."""


@dataclass(frozen=True, slots=True)
class _Unlogged:
    """An early push answered before its update was logged (``--durability pipelined``)."""

    msg: Push
    acked: tuple[Acked, ...]
    """One per rank the push holds (a pre-aggregated push holds several)."""
    epoch: int
    """The epoch of the primary that answered: one of a newer epoch may lack the update."""


@dataclass(slots=True)
class ExchangeProtocol:
    rank: int
    routes: list[Route]
    supervisor: Address
    max_reroutes: int = DEFAULT_MAX_REROUTES
    watchdog_s: float = 5.0
    """Ask whether the route changed when a call has had no answer for this long."""
    results: dict[int, PushReply] = field(default_factory=dict)
    """Per shard: the answer to its last call (taken by ``take``)."""
    ledger: list[Acked] = field(default_factory=list)
    error: str | None = None
    """Why the exchange cannot go on (the worker fails with it)."""
    reroutes: int = 0
    early_answers: int = 0
    """Pushes answered before their update was logged (``--durability pipelined``)."""
    _out: dict[int, _Outstanding] = field(default_factory=dict)
    _probes: dict[int, Push] = field(default_factory=dict)
    """Per shard: the last first-phase push of a clipped step (its second phase is built from
    it)."""
    _unlogged: dict[int, _Unlogged] = field(default_factory=dict)
    """Per shard: the early push answered but not yet known to be logged."""
    _cids: dict[int, tuple[int, str]] = field(default_factory=dict)
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))

    # --- what the training loop asks for
    # ----------------------------------------------------------------

    def push(
        self,
        shard: int,
        step: int,
        payload,
        base_version: int | None,
        want_params: bool,
        now: float = 0.0,
        residual=None,
        probe: bool = False,
        overflow: bool = False,
        early: bool = False,
        ranks: tuple[int, ...] = (),
    ) -> list:
        """Push a gradient; ``probe``: the first phase of a globally clipped step (the answer is
        the shard's squared norm; ``finish`` sends the second); ``overflow``: fp16's gradient
        overflowed (no payload; the update is skipped); ``early``: may be answered before its
        update is logged (``--durability pipelined``); ``ranks``: pre-aggregated, the sum of
        these ranks' gradients, this rank first (each enters the ledger)."""
        msg = Push(
            self.rank,
            step,
            payload,
            base_version,
            want_params and not probe,
            residual,
            probe=probe,
            overflow=overflow,
            early=early and not probe,
            ranks=ranks,
        )
        if probe:
            self._probes[shard] = msg
        return self._send_new(shard, msg, now)

    def finish(self, shard: int, factor: float, want_params: bool, now: float = 0.0) -> list:
        """The second phase of a clipped step: apply it scaled by ``factor`` (the gradient travels
        again only if the primary was rebuilt since the probe and asks for it)."""
        probe = self._probes.pop(shard)
        full = dataclasses.replace(probe, probe=False, clip_factor=factor, want_params=want_params)
        effects = self._send_new(shard, dataclasses.replace(full, payload=None, residual=None), now)
        self._out[shard].full = full
        return effects

    def pull(
        self, shard: int, step: int | None, now: float = 0.0, resume_step: int | None = None
    ) -> list:
        """Parameters as of ``step`` (None: the newest); with ``resume_step`` also this rank's
        residual to resume with."""
        return self._send_new(
            shard, Pull(step, self.rank if resume_step is not None else None, resume_step), now
        )

    def pending(self, shard: int) -> bool:
        return shard in self._out

    def take(self, shard: int) -> PushReply | None:
        return self.results.pop(shard, None)

    def set_routes(self, routes) -> None:
        for r in routes:
            if r.epoch >= self.routes[r.shard].epoch:
                self.routes[r.shard] = r

    # --- answers
    # -----------------------------------------------------------------------------------------

    def on_reply(self, cid: int, value, now: float = 0.0) -> list:
        entry = self._cids.pop(cid, None)
        if entry is None:
            return []  # an abandoned call (resent elsewhere meanwhile)
        shard, kind = entry
        out = self._out.get(shard)
        if out is None:
            return []
        if kind == "route":
            return self._routed(shard, out, value, now)
        if kind == "unlogged" and isinstance(value, PushReply):
            # the early push sent again to a newer primary: answered once logged
            kept = self._unlogged.pop(shard)
            self.ledger += [dataclasses.replace(a, seq=value.acked) for a in kept.acked]
            return [self._send(shard, out, now)]
        if isinstance(value, PushReply):
            del self._out[shard]
            if out.route_cid is not None:
                self._cids.pop(out.route_cid, None)
            self.results[shard] = value
            kept = self._unlogged.pop(shard, None)
            if kept is not None:  # this answer waited until the kept push's update was logged
                self.ledger += kept.acked
            if isinstance(out.msg, Push) and not out.msg.probe:  # a probe acknowledges nothing
                acked = tuple(
                    Acked(shard, r, out.msg.step, value.acked, value.late)
                    for r in out.msg.ranks or (self.rank,)
                )
                if value.durable:
                    self.ledger += acked
                else:
                    self.early_answers += 1
                    self._unlogged[shard] = _Unlogged(out.msg, acked, out.epoch)
            return []
        if isinstance(value, Refused) and value.kind in (
            RefusalKind.NOT_PRIMARY,
            RefusalKind.FENCED,
        ):
            return self._reroute(shard, out, now, f"{value.kind.value}: {value.reason}")
        if isinstance(value, Refused) and value.kind is RefusalKind.RESEND and out.full is not None:
            out.msg, out.full = out.full, None
            return [self._send(shard, out, now)]
        reason = value.reason if isinstance(value, Refused) else repr(value)
        return self._fail(
            shard, f"shard {shard} refused {type(out.msg).__name__.lower()}: {reason}"
        )

    def on_failure(self, cid: int, failure: Failure, now: float = 0.0) -> list:
        entry = self._cids.pop(cid, None)
        if entry is None:
            return []
        shard, kind = entry
        out = self._out.get(shard)
        if out is None:
            return []
        if kind == "route":
            return self._fail(
                shard,
                f"the supervisor did not answer for the route of shard {shard} ({failure.value})",
            )
        return self._reroute(
            shard, out, now, f"server {self.routes[shard].address} {failure.value}"
        )

    def on_tick(self, now: float) -> list:
        """Watchdog: for calls outstanding longer than ``watchdog_s``, ask whether their primary was
        replaced."""
        effects = []
        for shard, out in self._out.items():
            if (
                out.cid is not None
                and out.route_cid is None
                and now - out.sent_at >= self.watchdog_s
            ):
                out.checking = True
                out.sent_at = now
                effects.append(self._ask_route(shard, out, failed=False))
        return effects

    # --- internals
    # ---------------------------------------------------------------------------------------

    def _send_new(self, shard: int, msg, now: float) -> list:
        if shard in self._out:
            raise RuntimeError(f"shard {shard} already has a call outstanding")
        self.results.pop(shard, None)
        out = self._out[shard] = _Outstanding(msg, None, now)
        return [self._send(shard, out, now)]

    def _send(self, shard: int, out: _Outstanding, now: float) -> Call:
        cid = next(self._ids)
        route = self.routes[shard]
        out.cid, out.sent_at, out.epoch = cid, now, route.epoch
        kept = self._unlogged.get(shard)
        if kept is not None and kept.epoch != route.epoch:
            # a newer primary may lack the kept push's update: it goes first, answered once logged
            self._cids[cid] = (shard, "unlogged")
            return Call(
                cid, route.address, dataclasses.replace(kept.msg, early=False, want_params=False)
            )
        self._cids[cid] = (shard, "server")
        return Call(cid, route.address, out.msg)

    def _ask_route(self, shard: int, out: _Outstanding, failed: bool) -> Call:
        cid = next(self._ids)
        self._cids[cid] = (shard, "route")
        out.route_cid = cid
        return Call(cid, self.supervisor, RouteAfter(shard, self.routes[shard].epoch, failed))

    def _reroute(self, shard: int, out: _Outstanding, now: float, why: str) -> list:
        out.attempts += 1
        if out.attempts > self.max_reroutes:
            return self._fail(
                shard,
                f"shard {shard} failed {self.max_reroutes} times in a row (last: {why}); giving up",
            )
        out.cid = None
        if out.route_cid is not None:  # a watchdog check in flight becomes the reroute
            out.checking = False
            return []
        return [self._ask_route(shard, out, failed=True)]

    def _routed(self, shard: int, out: _Outstanding, value, now: float) -> list:
        out.route_cid = None
        if not isinstance(value, Route):
            reason = value.reason if isinstance(value, Refused) else repr(value)
            return self._fail(shard, f"no route to shard {shard}: {reason}")
        moved = (
            value.epoch != self.routes[shard].epoch or value.address != self.routes[shard].address
        )
        if value.epoch >= self.routes[shard].epoch:
            self.routes[shard] = value
        if out.checking:
            out.checking = False
            if not moved:
                return []  # the primary is the same: keep waiting for its answer
            if out.cid is not None:
                self._cids.pop(out.cid, None)  # abandon the call to the replaced primary
        elif moved:
            self.reroutes += 1
        return [self._send(shard, out, now)]

    def _fail(self, shard: int, reason: str) -> list:
        self.error = self.error or reason
        self._out.pop(shard, None)
        return []
