"""Regression on scikit-learn's bundled diabetes data (442 patients, 10 features): a small MLP
trained with MSE.

From the repository's root:

    raytrain-ft train --model examples.diabetes:model --dataset examples.diabetes:data --loss mse \\
        --steps 300 --batch-size 16 --lr 0.02 --num-workers 2 --num-servers 1

``eval_loss`` is the mean squared error on held-out patients, in units of the target's variance:
predicting the mean scores 1.0. The summary also reports ``eval_r2`` (``metrics`` below).

The same data as Ray Datasets (columns ``x`` and ``y``; each worker then reads only its part):

    raytrain-ft train --model examples.diabetes:model --dataset examples.diabetes:ray_data ...
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset


def data(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """(train, eval): standardized features and target, 80/20 split."""
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    x = (x - x.mean(0)) / x.std(0)
    y = (y - y.mean()) / y.std()
    order = np.random.default_rng(seed).permutation(len(y))
    cut = int(0.8 * len(y))

    def part(idx):
        return TensorDataset(
            torch.tensor(x[idx], dtype=torch.float32), torch.tensor(y[idx], dtype=torch.float32)
        )

    return part(order[:cut]), part(order[cut:])


def ray_data(seed: int = 0):
    """(train, eval) as Ray Datasets of rows ``{"x": 10 features, "y": target}``."""
    import ray

    def rows(part):
        x, y = part.tensors
        return ray.data.from_items([{"x": a, "y": b} for a, b in zip(x.numpy(), y.numpy())])

    train, held_out = data(seed)
    return rows(train), rows(held_out)


def model(hidden: int = 32) -> nn.Module:
    return nn.Sequential(nn.Linear(10, hidden), nn.ReLU(), nn.Linear(hidden, 1))


def metrics(output: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """R^2 of the batch (1 - residual variance / target variance)."""
    pred = output.reshape(target.shape)
    return {
        "eval_r2": float(1 - ((pred - target) ** 2).sum() / ((target - target.mean()) ** 2).sum())
    }
