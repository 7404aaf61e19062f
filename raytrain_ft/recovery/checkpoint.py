"""Shard checkpoint files: the baseline ``recovery=checkpoint`` restarts from them (replica recovery
never reads them).

Checkpoints are coordinated by step: every shard writes ``shard-{i}-step-{s}.pt``
at the same steps, so the run can roll back to the newest step every shard
has on disk. Files are written to a temporary name and renamed, so a crash
never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import os
import re

import numpy as np
import torch

_NAME = re.compile(r"shard-(\d+)-step-(\d+)\.pt$")


def shard_checkpoint_path(directory: str, shard: int, step: int) -> str:
    return os.path.join(directory, f"shard-{shard}-step-{step}.pt")


def save_shard_checkpoint(
    directory: str,
    shard: int,
    step: int,
    params: np.ndarray,
    optimizer_state: dict,
    skipped: dict | None = None,
) -> str:
    os.makedirs(directory, exist_ok=True)
    path = shard_checkpoint_path(directory, shard, step)
    tmp = path + ".tmp"
    torch.save(
        {
            "shard": shard,
            "step": step,
            "params": torch.from_numpy(np.array(params, copy=True)),
            "optimizer_state": optimizer_state,
            # fp16: per rank, the steps whose updates were skipped (what its loss scale follows)
            "skipped": {int(r): [int(t) for t in steps] for r, steps in (skipped or {}).items()},
        },
        tmp,
    )
    os.replace(tmp, path)
    return path


def load_shard_checkpoint(path: str) -> tuple[np.ndarray, int, dict, int, dict]:
    """(params, step, optimizer state, file bytes, skipped steps per rank)."""
    blob = torch.load(path, weights_only=True)
    return (
        blob["params"].numpy(),
        int(blob["step"]),
        blob["optimizer_state"],
        os.path.getsize(path),
        blob.get("skipped", {}),
    )


def shards_by_step(directory: str) -> dict[int, set[int]]:
    """{step: the shards with a checkpoint file of it} in ``directory`` (empty when none)."""
    steps: dict[int, set[int]] = {}
    if os.path.isdir(directory):
        for name in os.listdir(directory):
            m = _NAME.match(name)
            if m:
                steps.setdefault(int(m.group(2)), set()).add(int(m.group(1)))
    return steps


def latest_common_step(directory: str, num_shards: int) -> int | None:
    """Newest step for which every shard has a checkpoint file (None when there is none)."""
    steps = shards_by_step(directory)
    common = [s for s, shards in steps.items() if shards == set(range(num_shards))]
    return max(common) if common else None
