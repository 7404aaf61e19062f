"""Server-side optimizers on flat float32 tensors, and learning-rate schedules.

Every optimizer here is element-wise, so a shard applies it to its own key
range and the result equals the whole-vector update. The formulas follow
``torch.optim`` (single-tensor, foreach=False) exactly; unit tests compare
them on identical inputs.

State is a dict of tensors plus a step counter so that a snapshot can carry it
and ``load_state`` can restore it bit for bit.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass

import torch

from raytrain_ft.config import OptimConfig


@dataclass(frozen=True, slots=True)
class HyperParams:
    """Hyper-parameters in force for one update (recorded with each command)."""

    lr: float
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    alpha: float = 0.99
    eps: float = 1e-8
    stream: int = -1
    """SGD with momentum: the update stream whose own momentum buffer this update uses (DANA, see
    ``SGD``); -1: the shard's one buffer."""


class FlatOptimizer(abc.ABC):
    """Base: ``step(param, grad, hp)`` updates ``param`` in place."""

    name = "base"

    def __init__(self, numel: int):
        self.numel = numel
        self.step_count = 0
        self.state: dict[str, torch.Tensor] = {}

    @abc.abstractmethod
    def step(self, param: torch.Tensor, grad: torch.Tensor, hp: HyperParams) -> None:
        """Apply one update to ``param`` (1-D float32) in place."""

    def state_dict(self) -> dict:
        return {
            "name": self.name,  # a resume with another optimizer is refused (check_resumable)
            "step_count": self.step_count,
            "state": {k: v.clone() for k, v in self.state.items()},
        }

    def load_state(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self.state = {k: v.clone() for k, v in state["state"].items()}

    def lookahead(self, param: torch.Tensor) -> torch.Tensor | None:
        """Parameters a worker should compute its next gradient on, if not ``param`` itself (None);
        see ``SGD.lookahead``."""
        return None

    def _buf(self, key: str, like: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        if key not in self.state:
            self.state[key] = torch.full_like(like, fill)
        return self.state[key]


def _with_weight_decay(
    grad: torch.Tensor, param: torch.Tensor, weight_decay: float
) -> torch.Tensor:
    """L2 penalty folded into the gradient, as torch.optim does (a new tensor; ``grad`` is only
    read)."""
    return grad.add(param, alpha=weight_decay) if weight_decay != 0 else grad


STREAM_BUFFER = "momentum_buffer."
"""SGD state key prefix of a stream's own momentum buffer (``HyperParams.stream``)."""
STREAM_SUM = "momentum_sum"
"""SGD state: the sum of the streams' buffers (kept as they change; what the look-ahead uses)."""
LOOKAHEAD = "lookahead_scale"
"""SGD state: lr * momentum of the last per-stream update (the look-ahead's step)."""


class SGD(FlatOptimizer):
    """torch.optim.SGD's formula; with ``hp.stream >= 0`` the update uses that stream's own momentum
    buffer (DANA: an asynchronous shard keeps one per update stream, so each stream's momentum
    remembers its own gradients as sync's remembers its steps' means)."""

    name = "sgd"

    def step(self, param, grad, hp):
        self.step_count += 1
        d_p = _with_weight_decay(grad, param, hp.weight_decay)
        if hp.momentum != 0:
            key = "momentum_buffer" if hp.stream < 0 else f"{STREAM_BUFFER}{hp.stream}"
            if key not in self.state:
                self.state[key] = d_p.clone().detach()
                buf = self.state[key]
                if hp.stream >= 0:
                    self._buf(STREAM_SUM, param).add_(buf)
            else:
                buf = self.state[key]
                if hp.stream >= 0:  # the sum moves by the buffer's change, (m - 1) * buf + d_p
                    self.state[STREAM_SUM].add_(buf, alpha=hp.momentum - 1.0).add_(d_p)
                buf.mul_(hp.momentum).add_(d_p)
            if hp.stream >= 0:
                self.state[LOOKAHEAD] = torch.tensor(hp.lr * hp.momentum, dtype=torch.float64)
            d_p = d_p.add(buf, alpha=hp.momentum) if hp.nesterov else buf
        param.add_(d_p, alpha=-hp.lr)

    def lookahead(self, param: torch.Tensor) -> torch.Tensor | None:
        """DANA-Zero's look-ahead (Hakimi et al., "Taming Momentum in a Distributed Asynchronous
        Environment", 2019): where ``param`` is heading if every update stream applies its momentum
        once more, ``param - lr * m * sum of the streams' buffers`` (lr and m of the last update);
        None without per-stream buffers. A worker computes its gradient there: by the time the
        gradient is applied the other streams have moved the parameters about that far, so the
        gradient is less stale than one computed on ``param``."""
        total = self.state.get(STREAM_SUM)
        if total is None:
            return None
        return param - float(self.state[LOOKAHEAD]) * total


class RMSProp(FlatOptimizer):
    name = "rmsprop"

    def step(self, param, grad, hp):
        self.step_count += 1
        grad = _with_weight_decay(grad, param, hp.weight_decay)
        square_avg = self._buf("square_avg", param)
        square_avg.mul_(hp.alpha).addcmul_(grad, grad, value=1 - hp.alpha)
        avg = square_avg.sqrt().add_(hp.eps)
        if hp.momentum > 0:
            buf = self._buf("momentum_buffer", param)
            buf.mul_(hp.momentum).addcdiv_(grad, avg)
            param.add_(buf, alpha=-hp.lr)
        else:
            param.addcdiv_(grad, avg, value=-hp.lr)


class Adagrad(FlatOptimizer):
    name = "adagrad"

    def step(self, param, grad, hp):
        self.step_count += 1
        grad = _with_weight_decay(grad, param, hp.weight_decay)
        state_sum = self._buf("sum", param)
        state_sum.addcmul_(grad, grad, value=1)
        std = state_sum.sqrt().add_(hp.eps)
        param.addcdiv_(grad, std, value=-hp.lr)


class Adam(FlatOptimizer):
    name = "adam"

    def step(self, param, grad, hp):
        self.step_count += 1
        step = self.step_count
        grad = _with_weight_decay(grad, param, hp.weight_decay)
        exp_avg = self._buf("exp_avg", param)
        exp_avg_sq = self._buf("exp_avg_sq", param)
        exp_avg.lerp_(grad, 1 - hp.beta1)
        exp_avg_sq.mul_(hp.beta2).addcmul_(grad, grad.conj(), value=1 - hp.beta2)
        bias_correction1 = 1 - hp.beta1**step
        bias_correction2 = 1 - hp.beta2**step
        step_size = hp.lr / bias_correction1
        bias_correction2_sqrt = math.sqrt(bias_correction2)
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(hp.eps)
        param.addcdiv_(exp_avg, denom, value=-step_size)


OPTIMIZERS: dict[str, type[FlatOptimizer]] = {c.name: c for c in (SGD, RMSProp, Adagrad, Adam)}

ADAGRAD_DEFAULT_EPS = 1e-10


def make_optimizer(cfg: OptimConfig, numel: int) -> FlatOptimizer:
    return OPTIMIZERS[cfg.name](numel)


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate in force for update number ``step`` (0-based), a pure function.

    Warm-up (``warmup_steps`` > 0) scales linearly from ``lr / warmup_steps`` up
    to ``lr``; after it the schedule runs on the steps since warm-up ended.
    """
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = step - cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "step":
        return cfg.lr * cfg.gamma ** (t // cfg.step_size)
    if cfg.schedule == "cosine":
        span = max(1, total_steps - cfg.warmup_steps)
        t = min(t, span)
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t / span)) / 2
    raise ValueError(f"optim.schedule: unknown schedule {cfg.schedule!r}")


def hyper_params(step: int, cfg: OptimConfig, total_steps: int) -> HyperParams:
    eps = cfg.eps
    if cfg.name == "adagrad" and cfg.eps == OptimConfig().eps:
        eps = ADAGRAD_DEFAULT_EPS
    momentum = cfg.momentum if cfg.name in ("sgd", "rmsprop") else 0.0
    return HyperParams(
        lr=lr_at(step, cfg, total_steps),
        momentum=momentum,
        nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay,
        beta1=cfg.beta1,
        beta2=cfg.beta2,
        alpha=cfg.alpha,
        eps=eps,
    )


# --- global gradient-norm clipping
# ------------------------------------------------------------------------

CLIP_EPS = 1e-6
"""Added to the norm before dividing, as ``torch.nn.utils.clip_grad_norm_`` does."""


def squared_norm(grad) -> float:
    """Squared L2 norm of a float32 vector (numpy array or torch tensor), accumulated in float64.

    Each square of a float32 is exact in float64 and numpy's pairwise sum adds them in an order
    fixed by the length alone, so the same values give the same bits on any process (a rebuilt
    primary answers exactly what its predecessor did). CUDA tensors are reduced on their device
    (deterministic for a given shape)."""
    import numpy as np

    if isinstance(grad, torch.Tensor):
        if grad.device.type != "cpu":
            return float(torch.sum(torch.square(grad.double())))
        grad = grad.numpy()
    return float(np.sum(np.square(grad, dtype=np.float64)))


def clip_factor(squared_norms, max_norm: float) -> float:
    """The factor every gradient of an update is multiplied by so that their global L2 norm is at
    most ``max_norm``: ``min(1, max_norm / (norm + 1e-6))`` as ``clip_grad_norm_`` computes it, the
    norm from the squared norms of the update's parts (one per shard) summed exactly, rounded to
    float32. A non-finite norm gives NaN: the update turns NaN, as ``clip_grad_norm_`` leaves the
    gradients."""
    import numpy as np

    total = math.fsum(squared_norms)
    if not math.isfinite(total):
        return float("nan")
    return float(np.float32(min(1.0, max_norm / (math.sqrt(total) + CLIP_EPS))))


def clip_in_place(grad: torch.Tensor, max_norm: float) -> bool:
    """Scale a whole gradient (one rank's, the update itself) to a global norm of at most
    ``max_norm``; True when it was scaled down."""
    factor = clip_factor([squared_norm(grad)], max_norm)
    if factor != 1.0:
        grad.mul_(factor)
    return factor < 1.0
