"""A small transformer (``nn.TransformerEncoder``) on a sequence task: name the largest token of a
sequence.

Sequences of 10 tokens from a vocabulary of 16, generated from a seed (no download); the label is
the largest token, so the model must attend over the whole sequence. From the repository's root:

    raytrain-ft train --model examples.sequence:model --dataset examples.sequence:data \\
        --steps 300 --batch-size 32 --optimizer adam --lr 0.003 --num-workers 2 --num-servers 2
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

VOCAB, LENGTH = 16, 10


class MaxToken(Dataset):
    """``n`` sequences [LENGTH] int64 and their largest token (a class in [0, VOCAB))."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(0, VOCAB, (n, LENGTH), generator=g)
        self.y = self.x.max(dim=1).values

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def data() -> tuple[Dataset, Dataset]:
    return MaxToken(4096, seed=1), MaxToken(1024, seed=2)


class TinyTransformer(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.position = nn.Parameter(torch.zeros(LENGTH, dim))
        layer = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [N, LENGTH] int64 -> [N, VOCAB]
        h = self.encoder(self.embed(x) + self.position)
        return self.head(h.mean(dim=1))


def model() -> nn.Module:
    return TinyTransformer()
