"""Models: an MLP, a small CNN, and torchvision ResNet-18/50 with a small-input stem option."""

from __future__ import annotations

import torch
from torch import nn

from raytrain_ft.config import ModelConfig


class MLP(nn.Module):
    def __init__(self, in_shape: tuple[int, int, int], num_classes: int, hidden: int = 128):
        super().__init__()
        c, h, w = in_shape
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c * h * w, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [N, C, H, W]
        return self.net(x)


class SmallCNN(nn.Module):
    """Two conv blocks and two linear layers; no BatchNorm, so it is batch-size independent."""

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int, width: int = 32):
        super().__init__()
        c, h, w = in_shape
        self.features = nn.Sequential(
            nn.Conv2d(c, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        flat = 2 * width * (h // 4) * (w // 4)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(flat, 128), nn.ReLU(), nn.Linear(128, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [N, C, H, W] -> [N, classes]
        return self.head(self.features(x))


def _resnet(
    name: str, in_shape: tuple[int, int, int], num_classes: int, small_input_stem: bool
) -> nn.Module:
    import torchvision

    model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    c = in_shape[0]
    if small_input_stem:
        model.conv1 = nn.Conv2d(c, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif c != 3:
        model.conv1 = nn.Conv2d(c, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def build_model(cfg: ModelConfig, in_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """Build the configured model; callers seed torch first for a reproducible init."""
    if cfg.name == "mlp":
        return MLP(in_shape, num_classes)
    if cfg.name == "cnn":
        if in_shape[1] < 4 or in_shape[2] < 4:
            raise ValueError(f"model.name: cnn needs images of at least 4x4, got {in_shape}")
        return SmallCNN(in_shape, num_classes)
    if cfg.name in ("resnet18", "resnet50"):
        return _resnet(cfg.name, in_shape, num_classes, cfg.small_input_stem)
    raise ValueError(f"model.name: unknown model {cfg.name!r}")
