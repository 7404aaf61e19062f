"""fp16 loss scaling as a pure function of the steps that overflowed.

``torch.amp.GradScaler`` keeps a scale that halves at every step whose
gradients overflowed (the step is skipped) and doubles after
``GROWTH_INTERVAL`` steps in a row without one. Here the shards record the
steps of each rank whose update was skipped (replicated with the shard), and
every reply hands the rank that list, so its scale is recomputed from it: a
restarted rank resumes with exactly the scale it had, and in sync mode every
rank has the same scale (every shard skips an update when any of its pushes
overflowed).
"""

from __future__ import annotations

INIT_SCALE = 2.0**16
GROWTH_FACTOR = 2.0
BACKOFF_FACTOR = 0.5
GROWTH_INTERVAL = 2000
"""``torch.amp.GradScaler``'s defaults."""


def loss_scale(step: int, skipped) -> float:
    """The scale a rank's step ``step`` computes with, given the steps of it that were skipped
    (any order; only those before ``step`` count): GradScaler's update rule run over steps
    0 .. step-1, in O(len(skipped))."""
    scale, last = INIT_SCALE, -1
    for s in sorted(t for t in set(skipped or ()) if t < step):
        scale *= GROWTH_FACTOR ** ((s - last - 1) // GROWTH_INTERVAL) * BACKOFF_FACTOR
        last = s
    return scale * GROWTH_FACTOR ** ((step - last - 1) // GROWTH_INTERVAL)
