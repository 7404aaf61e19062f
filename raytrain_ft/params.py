"""Flat parameter layout and key-range sharding.

The model's state that servers hold is one contiguous float32 vector:

    [ parameters in named_parameters() order | float buffers in named_buffers() order ]

Parameters are optimized; float buffers (BatchNorm ``running_mean`` /
``running_var``) are *reconciled*: in each step every worker pushes its local
buffer values in the gradient slot, and the server sets the buffer to their
mean (in worker-rank order), so all workers start the next step with the same
running statistics. Integer buffers (``num_batches_tracked``) are local
counters that advance identically on every worker and are not shipped.

Each ``param`` / ``param.grad`` / float buffer of the model is a *view* into
one flat tensor, so a push or pull of a shard is one memcpy of a slice.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from raytrain_ft.sharding import ShardRange, shard_ranges  # noqa: E402,F401  (the layout's pure half)


class FlatModel:
    """Rebinds a module's parameters, grads and float buffers onto flat tensors.

    ``flat`` holds parameters, then float buffers, then integer buffers (as
    float32 copies: exact below 2**24); ``flat_grad`` has the same layout and
    holds gradients then (after ``stage_buffers()``) buffer values. Integer
    buffers (``num_batches_tracked``) cannot be views of a float vector: they
    are copied in before a step is pushed and out (``sync_int_buffers``) once
    parameters are installed, so a restarted worker and the exported model get
    the counters the shards hold.
    """

    def __init__(self, module: nn.Module, device: torch.device | str = "cpu"):
        self.module = module
        self.device = torch.device(device)
        params = trainable(module)
        buffers = [(name, b) for name, b in module.named_buffers() if b.is_floating_point()]
        named_ints = [(name, b) for name, b in module.named_buffers() if not b.is_floating_point()]
        int_buffers = [b for _, b in named_ints]
        self._bound: list[tuple[str, nn.Module, str, torch.Tensor]] = [
            (name, *_owner(module, name), b) for name, b in named_ints
        ]
        """(name, owning module, attribute, tensor) of every buffer in the flat vector: a forward
        that rebinds one instead of updating it in place is caught (``stage_buffers``)."""
        self.num_params = sum(p.numel() for p in params)
        self.num_buffer_values = sum(b.numel() for _, b in buffers) + sum(
            b.numel() for b in int_buffers
        )
        self.numel = self.num_params + self.num_buffer_values
        self.flat = torch.zeros(self.numel, dtype=torch.float32, device=self.device)
        self.flat_grad = torch.zeros(self.numel, dtype=torch.float32, device=self.device)
        self.spans: list[tuple[int, int]] = []
        """[start, end) of every parameter, then every float buffer, in the flat vector."""
        offset = 0
        for p in params:
            n = p.numel()
            self.spans.append((offset, offset + n))
            self.flat[offset : offset + n].copy_(p.detach().reshape(-1))
            p.data = self.flat[offset : offset + n].view_as(p)
            p.grad = self.flat_grad[offset : offset + n].view_as(p)
            offset += n
        for name, b in buffers:
            n = b.numel()
            self.spans.append((offset, offset + n))
            self.flat[offset : offset + n].copy_(b.detach().reshape(-1))
            owner, attr = _owner(module, name)
            # the buffer reads and writes the flat vector but keeps its own version counter, as
            # a parameter rebound with .data does: a plain view would share the flat vector's,
            # so installing any shard mid-forward (overlap) would "modify" every buffer autograd
            # saved (BatchNorm saves its running statistics) and backward would refuse
            view = self.flat[offset : offset + n].view_as(b)
            own = torch.empty(0, dtype=view.dtype, device=view.device)
            own.data = view
            owner._buffers[attr] = own
            self._bound.append((name, owner, attr, own))
            offset += n
        self.int_buffers = []
        """(integer buffer, [start, end) of its float32 copy in the flat vector)."""
        for b in int_buffers:
            n = b.numel()
            self.spans.append((offset, offset + n))
            self.flat[offset : offset + n].copy_(b.detach().reshape(-1))
            self.int_buffers.append((b, (offset, offset + n)))
            offset += n
        self._params = params
        self.params = params
        """The parameters in the flat vector, in its order (those with ``requires_grad``)."""
        self.buffers = [b for _, b in buffers]
        """The float buffers in the flat vector, in its order (as they were at construction)."""

    @property
    def buffer_view(self) -> torch.Tensor:
        return self.flat[self.num_params :]

    def zero_grad(self) -> None:
        self.flat_grad.zero_()
        # autograd accumulates in place into an existing .grad; a grad set to None would be
        # re-allocated outside the flat buffer and silently never pushed
        for p in self._params:
            if p.grad is None:
                raise RuntimeError(
                    "a parameter's .grad was detached from the flat buffer; do not call "
                    "zero_grad(set_to_none=True)"
                )

    def stage_buffers(self, field: str = "model.name") -> None:
        """Copy local buffer values (integer ones as float32) into the buffer part of ``flat_grad``
        for pushing; a buffer the forward replaced is a ConfigError on ``field`` (the setting that
        gave the model)."""
        for name, owner, attr, tensor in self._bound:
            if owner._buffers.get(attr) is not tensor:
                from raytrain_ft.errors import ConfigError

                now = owner._buffers.get(attr)
                shape = list(now.shape) if isinstance(now, torch.Tensor) else type(now).__name__
                raise ConfigError(
                    field,
                    f"the model's forward replaced its buffer {name!r} (now {shape}, was "
                    f"{list(tensor.shape)}) instead of updating it in place; the shards keep every "
                    "buffer at a fixed place and size, so the new value would be lost: update it "
                    "in place (buf.mul_(0.9).add_(x), buf.copy_(new)) at its size",
                )
        self.flat_grad[self.num_params :].copy_(self.buffer_view)
        for b, (
            start,
            end,
        ) in self.int_buffers:  # (not into ``flat``: its parameters are saved for backward)
            self.flat_grad[start:end].copy_(b.detach().reshape(-1))

    def sync_int_buffers(self, lo: int = 0, hi: int | None = None) -> None:
        """Set integer buffers from their float32 copies in ``flat`` (after parameters were
        installed), those within ``[lo, hi)`` only: with overlap a shard is installed mid-forward,
        and the counters of layers that already ran this step (in other shards) must keep their
        increments."""
        hi = self.numel if hi is None else hi
        for b, (start, end) in self.int_buffers:
            if start < hi and end > lo:
                b.copy_(self.flat[start:end].round().view_as(b).to(b.dtype))


def overlapping_shards(start: int, end: int, ranges: list[ShardRange]) -> list[int]:
    """Indices of the shards whose key range intersects ``[start, end)``."""
    return [r.index for r in ranges if r.start < end and start < r.end]


def _owner(module: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    *path, attr = dotted.split(".")
    for part in path:
        module = getattr(module, part)
    return module, attr


def trainable(module: nn.Module) -> list[nn.Parameter]:
    """The parameters the servers hold and optimize: those with ``requires_grad``. A frozen
    parameter stays where the seeded model put it, the same on every worker, and is not shipped."""
    return [p for _, p in module.named_parameters() if p.requires_grad]


def num_trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in trainable(module))


def _buffers_in_order(module: nn.Module) -> list[torch.Tensor]:
    """Float buffers, then integer buffers: the flat vector's order after the parameters."""
    named = [b for _, b in module.named_buffers()]
    return [b for b in named if b.is_floating_point()] + [
        b for b in named if not b.is_floating_point()
    ]


def flatten_state(module: nn.Module) -> torch.Tensor:
    """Flat float32 vector of a plain module in the same layout as ``FlatModel.flat``."""
    parts = [p.detach().reshape(-1).float().cpu() for p in trainable(module)]
    parts += [b.detach().reshape(-1).float().cpu() for b in _buffers_in_order(module)]
    return torch.cat(parts) if parts else torch.zeros(0)


def load_flat_state(module: nn.Module, flat: torch.Tensor) -> None:
    """Copy a flat vector (``flatten_state`` layout) into a plain module's parameters and
    buffers."""
    tensors = list(trainable(module)) + _buffers_in_order(module)
    needed = sum(t.numel() for t in tensors)
    if needed != flat.numel():
        raise ValueError(f"flat vector has {flat.numel()} values, model needs {needed}")
    offset = 0
    with torch.no_grad():
        for t in tensors:
            n = t.numel()
            values = flat[offset : offset + n].view_as(t)
            t.copy_(values if t.is_floating_point() else values.round().to(t.dtype))
            offset += n


def params_sha256(flat: torch.Tensor) -> str:
    """sha256 of the flat float32 vector's bytes (parameters and float buffers)."""
    data = flat.detach().to(torch.float32).cpu().contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()
