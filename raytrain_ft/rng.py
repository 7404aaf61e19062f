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
import random
import threading

import numpy as np
import torch

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
