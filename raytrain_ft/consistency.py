"""Consistency rules: which pushes form one update, when a push is a repeat, when a worker may go
on.

Pure (no Ray): the server actor asks a ``Rule`` what to do with each arriving
push and keeps the answers' state in a ``PushBuffer`` and in the shard's
per-rank clocks; everything here is unit-tested in milliseconds.

- ``sync`` (BSP): step ``t`` of the shard is the mean of every rank's step-``t``
  gradient, summed in rank order. With ``backup_workers = b`` the step closes
  on the first ``num_workers - b`` pushes to arrive (still summed in rank
  order); later pushes for a closed step are answered and dropped.
- ``mixed``: ranks form groups of ``group_size`` consecutive ranks (a group
  per node when ranks are packed by node); a group's step ``t`` is the mean of
  its members' gradients (synchronous inside the group), and groups update the
  shard independently of each other (asynchronous across groups).
- ``async`` (Downpour): every push is one update, applied on arrival.
- ``ssp``: async updates, and a worker at clock ``c`` (steps it has pushed)
  may start its next step only when the slowest worker has reached
  ``c - staleness``. ``staleness = 0`` is lock-step.
- ``local_sgd``: sync over rounds. A worker's step is a round of
  ``local_steps`` local optimizer steps; it pushes the round's
  pseudo-gradient (see ``actors/worker.py``), and the shard applies the mean
  of every rank's, in rank order, with its optimizer as the outer one
  (DiLoCo). To the shards it is sync with a step per round.

Each update is one command in the shard's log, in the order the primary
applied it, so replay reproduces the order whatever the mode.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, get_args

import numpy as np

Mode = Literal["sync", "async", "ssp", "mixed", "local_sgd"]
MODES: tuple[str, ...] = get_args(Mode)
StalenessLr = Literal["none", "inverse"]
STALENESS_LR: tuple[str, ...] = get_args(StalenessLr)
MomentumCorrection = Literal["none", "auto", "dana"]
MOMENTUM_CORRECTION: tuple[str, ...] = get_args(MomentumCorrection)


class Verdict(enum.Enum):
    """What a server does with a push ``(rank, step)``."""

    ACCEPT = "accept"
    """New: buffer it (and apply the update it completes)."""
    REPEAT = "repeat"
    """Already applied (a resent push): answer, never apply twice."""
    LATE = "late"
    """Sync with backup workers: the step closed without it; answer and drop it."""
    AHEAD = "ahead"
    """Sync: a step the shard has not reached (a protocol error)."""


@dataclass(frozen=True, slots=True)
class Rule:
    mode: str = "sync"
    num_workers: int = 1
    backup_workers: int = 0
    """sync: a step closes after ``num_workers - backup_workers`` pushes."""
    group_size: int = 1
    """mixed: ranks per synchronous group (the last group may be smaller)."""
    staleness: int = 0
    """ssp: how many steps a worker may run ahead of the slowest."""
    staleness_lr: str = "none"
    """async/ssp: ``inverse`` divides the learning rate by the update's staleness (when > 1); see
    ``lr_scale``."""
    momentum_correction: str = "none"
    """async/ssp/mixed: ``auto`` gives each update the momentum that, with the momentum asynchrony
    itself adds, remembers as many samples as sync's, keeping the step per gradient; see
    ``momentum``. ``dana`` gives each update stream its own momentum buffer and hands workers
    look-ahead parameters; see ``momentum_stream``."""
    delay_compensation: float = 0.0
    """async/ssp/mixed: DC-ASGD's strength (0 = off); see ``DelayCompensation``."""
    sum_group: int = 1
    """Sync (and mixed, whose updates are one group's): an update sums its gradients in groups of
    this many consecutive ranks first (the ranks that share a process), then the groups' sums in
    order; see ``mean_in_rank_order``. A group may then send one push of its sum
    (pre-aggregation, ``Push.ranks``) and the update has the same bits as from its ranks' own
    pushes."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if not 0 <= self.backup_workers < self.num_workers:
            raise ValueError(
                f"backup_workers must be in [0, num_workers={self.num_workers}), got "
                f"{self.backup_workers}"
            )
        if self.backup_workers and self.mode != "sync":
            raise ValueError("backup_workers apply to sync mode only")
        if self.group_size < 1 or self.staleness < 0 or self.sum_group < 1:
            raise ValueError("group_size and sum_group must be >= 1 and staleness >= 0")
        if not 0 <= self.delay_compensation < float("inf"):
            raise ValueError(
                f"delay_compensation must be a finite number >= 0, got {self.delay_compensation}"
            )
        if self.delay_compensation and self.synchronous:
            raise ValueError("delay_compensation applies to async, ssp and mixed modes")
        if self.momentum_correction not in MOMENTUM_CORRECTION:
            raise ValueError(
                f"unknown momentum_correction {self.momentum_correction!r}; choose one of "
                f"{', '.join(MOMENTUM_CORRECTION)}"
            )
        if self.staleness_lr not in STALENESS_LR:
            raise ValueError(
                f"unknown staleness_lr {self.staleness_lr!r}; choose one of "
                f"{', '.join(STALENESS_LR)}"
            )

    @property
    def per_rank_clocks(self) -> bool:
        """Whether a push's repeat-check uses the rank's own clock (every mode but sync)."""
        return not self.synchronous

    @property
    def synchronous(self) -> bool:
        """Every rank's push of a step forms one update (sync, and local_sgd's rounds)."""
        return self.mode in ("sync", "local_sgd")

    @property
    def exact_resume(self) -> bool:
        """Whether a restarted worker pulls the parameters of exactly its step (plain sync only)."""
        return self.synchronous and self.backup_workers == 0

    def group(self, rank: int) -> tuple[int, ...]:
        """The ranks whose pushes of one step form the update that ``rank``'s push is part of."""
        if self.synchronous:
            return tuple(range(self.num_workers))
        if self.mode == "mixed":
            first = rank - rank % self.group_size
            return tuple(range(first, min(first + self.group_size, self.num_workers)))
        return (rank,)

    def sum_members(self, rank: int) -> tuple[int, ...]:
        """The ranks whose gradients one pre-aggregated push of ``rank``'s process sums
        (``sum_group`` consecutive ranks): sync without backup workers, and mixed when its groups
        are the processes (``group_size == sum_group``: a node's ranks synchronous, the servers
        asynchronous); () where pushes are per rank."""
        if self.sum_group == 1:
            return ()
        if self.mode == "mixed" and self.group_size == self.sum_group:
            return self.group(rank)
        if not self.synchronous or self.backup_workers:
            return ()
        first = rank - rank % self.sum_group
        return tuple(range(first, min(first + self.sum_group, self.num_workers)))

    def key(self, rank: int, step: int) -> tuple[int, int]:
        """Pushes with equal keys are aggregated into one update: (first rank of the group,
        step)."""
        return (self.group(rank)[0], step)

    def needed(self, rank: int) -> int:
        if self.synchronous:
            return self.num_workers - self.backup_workers
        return len(self.group(rank))

    def classify(self, rank: int, step: int, shard_step: int, clock: int) -> Verdict:
        """``shard_step``: updates the shard applied; ``clock``: the next step the shard expects
        from ``rank``."""
        if not self.per_rank_clocks:
            if step < shard_step:
                return Verdict.LATE if self.backup_workers else Verdict.REPEAT
            return Verdict.AHEAD if step > shard_step else Verdict.ACCEPT
        # async pushes may skip steps (n_push > 1 accumulates several); a mixed group moves together
        return Verdict.REPEAT if step < clock else Verdict.ACCEPT

    def lr_scale(self, pushes: int, staleness: int) -> float:
        """Learning-rate factor for an update aggregating ``pushes`` gradients computed
        ``staleness`` updates ago.

        The configured learning rate is per global step, i.e. per mean of
        ``num_workers`` gradients. An update built from ``pushes`` of them (one
        in async/ssp, a group in mixed) is that share of a global step, so it
        uses ``lr * pushes / num_workers``: every mode moves the parameters
        the same distance per sample, and modes compare at equal settings.
        ``staleness_lr = inverse`` further divides by the staleness (> 1).
        """
        if self.synchronous:
            return 1.0
        scale = pushes / self.num_workers
        if self.staleness_lr == "inverse" and self.mode in ("async", "ssp") and staleness > 1:
            scale /= staleness
        return scale

    @property
    def update_streams(self) -> int:
        """Updates of a shard that run concurrently: one per rank (async/ssp), one per group
        (mixed), one (sync)."""
        if self.mode in ("async", "ssp"):
            return self.num_workers
        if self.mode == "mixed":
            return -(-self.num_workers // self.group_size)
        return 1

    def momentum(self, momentum: float) -> tuple[float, float]:
        """The explicit momentum an update uses, and the learning-rate factor that goes with it.

        With ``n`` update streams (``update_streams``) a shard applies ``n``
        updates per global step, each of a share of the samples, and a
        gradient lands, in expectation, on parameters ``n - 1`` updates old:
        asynchrony acts as an implicit momentum of ``1 - 1/n`` (Mitliagkas et
        al., "Asynchrony begets momentum", 2016), a memory of ``n - 1``
        updates. Sync's momentum ``m`` remembers ``m / (1 - m)`` global steps,
        ``n * m / (1 - m)`` updates of an asynchronous mode. Applying ``m`` per
        update instead (``none``) shortens that memory ``n``-fold at the same
        step size, which on its own already makes training less stable (sync
        itself at a lower momentum and the same step diverges on some seeds).

        ``auto`` gives each update the explicit momentum whose memory, added
        to the implicit one, equals sync's in samples: ``n * m / (1 - m) - (n
        - 1)`` updates, i.e. ``corrected = M / (1 + M)`` for that memory ``M``
        (0 when it is not positive), and scales the learning rate by ``(1 -
        corrected) / (1 - m)`` so that each gradient still moves the
        parameters by ``lr * share / (1 - m)`` in total, as in sync. Sync, one
        stream, zero momentum and ``none`` keep the configured momentum and
        rate.
        """
        streams = self.update_streams
        if self.momentum_correction != "auto" or streams == 1 or momentum == 0:
            return momentum, 1.0
        memory = streams * momentum / (1.0 - momentum) - (streams - 1)
        corrected = memory / (1.0 + memory) if memory > 0 else 0.0
        return corrected, (1.0 - corrected) / (1.0 - momentum)

    def momentum_stream(self, rank: int) -> int:
        """The update stream whose own momentum buffer an update of ``rank``'s pushes uses, or -1
        for the shard's one buffer.

        ``dana`` (DANA-Zero, Hakimi et al., "Taming Momentum in a Distributed
        Asynchronous Environment", 2019): a shard keeps one SGD momentum
        buffer per update stream (a rank in async/ssp, a group in mixed) and
        answers pulls with the look-ahead ``w - lr * m * sum of the buffers``
        (``optim.SGD.lookahead``). Each stream's buffer then decays once per
        round of the streams, as sync's decays once per step, and a gradient
        is computed about where the parameters will be when it lands. With a
        fixed arrival order and a staleness of ``num_workers - 1`` (the worst
        case), plain momentum 0.9 loses most of what it learnt on the digits
        CNN and per-stream momentum with look-ahead matches sync
        (``experiments/consistency/async_defaults.py``). Costs a buffer per
        stream in the shard's state (and its snapshots). Sync, local_sgd and a
        single stream use the one buffer.
        """
        if self.momentum_correction != "dana" or self.update_streams == 1:
            return -1
        return self.group(rank)[0]


class DelayCompensation:
    """Delay-compensated asynchronous SGD (DC-ASGD-a, Zheng et al., ICML 2017) for one shard.

    A gradient ``g`` computed on parameters ``w_then`` arrives when the shard
    holds ``w_now``. Its first-order correction ``g + H (w_now - w_then)``
    needs the Hessian ``H``; DC-ASGD approximates it by ``lambda * g * g``
    (element-wise), with the adaptive ``lambda = strength / sqrt(mean_square)``
    where ``mean_square`` is an exponential average of ``g * g`` (decay 0.95)
    over every gradient the shard received. The shard keeps the parameters it
    handed out per version (``ServerProtocol``), the worker names the version
    it computed on, and the corrected gradient is what the update's command
    carries: replay applies it as it is. A rebuilt primary starts without
    past versions and with a fresh average, so pushes computed before it took
    over go uncorrected.
    """

    def __init__(self, strength: float, decay: float = 0.95, eps: float = 1e-7):
        self.strength, self.decay, self.eps = strength, decay, eps
        self.mean_square: np.ndarray | None = None

    def correct(self, grad: np.ndarray, now: np.ndarray, then: np.ndarray | None) -> np.ndarray:
        """``grad`` corrected for ``now - then`` (a new array; ``then`` None: not corrected)."""
        g = np.asarray(grad, dtype=np.float32)
        if self.mean_square is None:
            self.mean_square = np.zeros_like(g)
        self.mean_square *= np.float32(self.decay)
        self.mean_square += np.float32(1 - self.decay) * g * g
        if then is None:
            return g
        lam = np.float32(self.strength) / np.sqrt(self.mean_square + np.float32(self.eps))
        return g + lam * g * g * (now - then)


def local_rounds(total_local_steps: int, local_steps: int) -> int:
    """local_sgd: rounds (pushes per worker) for a run of ``total_local_steps`` local steps."""
    return -(-total_local_steps // local_steps)


def round_span(round_: int, local_steps: int, total_local_steps: int) -> range:
    """local_sgd: the local steps (batch indices) of round ``round_``; the last round may be
    shorter."""
    start = round_ * local_steps
    return range(start, min(start + local_steps, total_local_steps))


def sum_in_rank_order(grads) -> np.ndarray:
    """The sum of float32 arrays in the order given: ``(g0 + g1) + g2 + ...``, a new array (one
    array is returned as it is). The one summation order of the project: a worker that
    pre-aggregates the ranks of its process sums them with it too."""
    if len(grads) == 1:
        return grads[0]
    acc = np.add(grads[0], grads[1], dtype=np.float32)
    for g in grads[2:]:
        acc += g
    return acc


def mean_in_rank_order(
    grads: Mapping[int, np.ndarray],
    sum_group: int = 1,
    members: Mapping[int, tuple[int, ...]] | None = None,
) -> np.ndarray:
    """Mean of the pushes: the ranks' gradients summed in ascending rank order (bitwise
    reproducible for a given set of ranks).

    With ``sum_group = k`` the ranks ``[j*k, (j+1)*k)`` are summed first, in rank order, then
    the groups' sums in group order. A push keyed by rank ``r`` with ``members[r]`` (more than
    one rank) already holds the sum of its members' gradients, summed the same way (a
    pre-aggregated push): the mean is the same, bit for bit, as from the members' own pushes.
    ``k = 1`` is the plain rank order. A single push of a single rank is returned as it is (it
    may be a read-only view of the object store: callers only read the result).
    """
    if not grads:
        raise ValueError("cannot aggregate an empty set of pushes")
    members = members or {}
    count = sum(len(members.get(r, ())) or 1 for r in grads)
    groups: dict[int, list] = {}
    for r in sorted(grads):
        groups.setdefault(r // sum_group, []).append(grads[r])
    total = sum_in_rank_order([sum_in_rank_order(g) for _, g in sorted(groups.items())])
    if count == 1:
        return total
    if total is grads[min(grads)]:  # one pre-aggregated push: divide a copy, never the payload
        total = np.array(total, dtype=np.float32, copy=True)
    total /= np.float32(count)
    return total


@dataclass(slots=True)
class Pending:
    grads: dict[int, np.ndarray] = field(default_factory=dict)
    base_versions: dict[int, int] = field(default_factory=dict)
    residuals: dict[int, np.ndarray] = field(default_factory=dict)
    """Per rank: its codec's error-feedback residual after this push (lossy codecs; kept with the
    shard)."""
    members: dict[int, tuple[int, ...]] = field(default_factory=dict)
    """Per pre-aggregated push (keyed by its first rank): the ranks whose gradients it sums."""

    def ranks(self) -> list[int]:
        """Every rank whose gradient the pushes hold, in order."""
        return sorted(r for k in self.grads for r in self.members.get(k, (k,)))


class PushBuffer:
    """Pushes waiting for the rest of their update, keyed by ``Rule.key``."""

    def __init__(self, rule: Rule):
        self.rule = rule
        self.pending: dict[tuple[int, int], Pending] = {}
        self.replaced = 0
        """Pushes that replaced a waiting push of the same (rank, step) (a resend)."""

    def add(
        self,
        rank: int,
        step: int,
        grad: np.ndarray | None,
        base_version: int,
        residual: np.ndarray | None = None,
        members: tuple[int, ...] = (),
    ) -> tuple[tuple[int, int], Pending | None]:
        """Buffer a push (``grad`` None: fp16 overflowed, the update will be skipped;
        ``members``: the ranks a pre-aggregated push sums, ``rank`` first); returns its key and,
        when it completes the update, the pushes that form it."""
        key = self.rule.key(rank, step)
        p = self.pending.setdefault(key, Pending())
        if rank in p.grads:
            self.replaced += 1
        p.grads[rank] = grad
        p.base_versions[rank] = base_version
        if len(members) > 1:
            p.members[rank] = tuple(members)
        if residual is not None:
            p.residuals[rank] = residual
        if len(p.ranks()) < self.rule.needed(rank):
            return key, None
        del self.pending[key]
        return key, p

    def clear(self) -> None:
        self.pending.clear()


def slowest_clock(clocks: Mapping[int, int], num_workers: int) -> int:
    return min(clocks.get(r, 0) for r in range(num_workers))


def may_proceed(clocks: Mapping[int, int], rank: int, rule: Rule) -> bool:
    """SSP: ``rank`` at clock ``clocks[rank]`` may start its next step (other modes: always)."""
    if rule.mode != "ssp":
        return True
    return slowest_clock(clocks, rule.num_workers) >= clocks.get(rank, 0) - rule.staleness


def add_to_histogram(hist: dict[int, int], value: int) -> None:
    hist[value] = hist.get(value, 0) + 1


def merge_histograms(hists) -> dict[int, int]:
    out: dict[int, int] = {}
    for h in hists:
        for k, v in h.items():
            out[int(k)] = out.get(int(k), 0) + v
    return dict(sorted(out.items()))
