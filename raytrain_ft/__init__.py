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
    "end_warm_processes",
]


def end_warm_processes() -> int:
    """End the server processes this driver keeps warm between runs (``cluster.keep_warm_s``) now,
    rather than when they time out or the driver exits. Returns how many were ended."""
    from raytrain_ft.actors.warm import end_resting

    return end_resting()


def __getattr__(name):
    if name in ("Trainer", "TrainResult"):
        from raytrain_ft import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'raytrain_ft' has no attribute {name!r}")
