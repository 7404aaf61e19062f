"""The random numbers a step draws, as a pure function of ``(seed, rank, step)``.

A model that draws while it trains (dropout, stochastic depth, ``torch.randn`` in forward) or a
dataset that draws in ``__getitem__`` (augmentation with torch, NumPy or Python's ``random``)
reads the process's global generators. A worker reseeds them from ``(seed, rank, step, purpose)``
before each step's forward and backward and before each batch of a dataset that runs user code,
so a run repeats bit for bit and a restarted rank draws what the lost one drew at the same step.

The generators are global to the process, and a process runs a prefetch thread beside each
training thread (and, with ``--ranks-per-process``, several ranks' threads): whoever draws holds
``_LOCK`` from the reseeding to its last draw. That block must not wait for another rank of the
process (the worker installs the shards' answers before it enters, where ranks share a process).
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading

import numpy as np
import torch

logger = logging.getLogger(__name__)

COMPUTE = 0xC0DE
"""Purpose of a step's forward and backward."""
DATA = 0xDA7A
"""Purpose of a batch built by the user's dataset."""

_LOCK = threading.RLock()


def step_seed(seed: int, rank: int, step: int, purpose: int) -> int:
    """A 63-bit seed for ``(seed, rank, step, purpose)``; distinct tuples give unrelated seeds."""
    state = np.random.SeedSequence([seed, rank, step, purpose]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) | (int(state[1]) >> 1)


def seed_all(seed: int) -> None:
    """Seed torch's generators (CPU and every CUDA device), NumPy's global one and Python's."""
    torch.manual_seed(seed)
    np.random.seed(seed & 0xFFFF_FFFF)
    random.seed(seed)


@contextlib.contextmanager
def seeded(seed: int):
    """Hold the process's generators, seeded with ``seed`` (``seed_all``), for the block."""
    with _LOCK:
        seed_all(seed)
        yield


def drawn_for(seed: int, rank: int, step: int, purpose: int):
    """Hold the process's generators, seeded for ``(seed, rank, step, purpose)``, for the block."""
    return seeded(step_seed(seed, rank, step, purpose))


PROBE_EVERY = 64
"""Ranks sharing a process whose model drew nothing so far compute side by side; every this
many steps a rank's step is computed alone again, to see whether the model draws now."""


def _states() -> tuple:
    """What the process's generators hold now (compared, not used)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
    numpy_state = np.random.get_state()
    return (
        torch.get_rng_state(),
        cuda,
        numpy_state[1].tobytes() + bytes(str(numpy_state[2:]), "ascii"),
        random.getstate(),
    )


def _same(a: tuple, b: tuple) -> bool:
    return (
        torch.equal(a[0], b[0])
        and len(a[1]) == len(b[1])
        and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))
        and a[2:] == b[2:]
    )


class SharedDraws:
    """Ranks sharing a process (``--ranks-per-process``): whether their steps must hold the
    generators one at a time. Only a model that draws needs it; holding them costs the ranks'
    parallel compute. So a rank's steps are computed alone (held, reseeded, and watched for
    draws) until one is seen to draw nothing; then the ranks compute side by side, without
    touching the generators, and every ``PROBE_EVERY``-th step is computed alone and watched
    again. A model seen drawing is held for the rest of the run (and a warning says when it began
    to draw after steps computed side by side, which may not repeat bit for bit)."""

    def __init__(self) -> None:
        self.draws: bool | None = None
        """None: not known yet; False: no draw seen; True: a step drew."""
        self.began_late: tuple[int, int] | None = None
        """(rank, step) of a draw first seen after steps computed side by side."""

    @contextlib.contextmanager
    def step(self, seed: int, rank: int, step: int):
        if self.draws is False and step % PROBE_EVERY:
            yield  # side by side: nothing drawn, nothing to hold
            return
        with drawn_for(seed, rank, step, COMPUTE):
            before = _states()
            yield
            drew = not _same(before, _states())
        if drew and self.draws is False:
            self.began_late = (rank, step)
            logger.warning(
                "[worker/%d] the model drew random numbers at step %d and at none of the steps "
                "checked before; the ranks of this process compute one at a time from now on "
                "(steps since step %d, computed side by side, may not repeat bit for bit)",
                rank,
                step,
                step - PROBE_EVERY,
            )
        self.draws = bool(self.draws) or drew


_SHARED: dict[str, SharedDraws] = {}


def shared_draws(run_id: str) -> SharedDraws:
    """The one ``SharedDraws`` of this process for run ``run_id`` (its ranks share it)."""
    return _SHARED.setdefault(run_id, SharedDraws())
