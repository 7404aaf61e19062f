"""raytrain-ft: fault-tolerant parameter-server training for PyTorch on Ray.

Importing the package does not import Ray; ``Trainer`` and ``TrainResult``
load the Ray-facing driver on first use.
"""

from raytrain_ft.config import (
    ChaosConfig,
    ClusterConfig,
    ConsistencyConfig,
    DataConfig,
    ModelConfig,
    OptimConfig,
    RecoveryConfig,
    TrainConfig,
)

__version__ = "0.1.0"

__all__ = [
    "ChaosConfig",
    "ClusterConfig",
    "ConsistencyConfig",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "RecoveryConfig",
    "TrainConfig",
    "Trainer",
    "TrainResult",
]


def __getattr__(name):
    if name in ("Trainer", "TrainResult"):
        from raytrain_ft import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'raytrain_ft' has no attribute {name!r}")
