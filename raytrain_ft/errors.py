"""One exception hierarchy for the project; every message says what to change."""

from __future__ import annotations


class RaytrainFTError(Exception):
    """Root of every error the project raises on purpose.

    Example: any failure the CLI reports with exit code 2 or 1 derives from it.
    """


class ConfigError(RaytrainFTError, ValueError):
    """A config field (or CLI flag, or YAML key) holds a value the run cannot use.

    Example: ``--num-servers 0`` or ``optim.name: adamx`` in a YAML file.
    """

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")

    def __reduce__(self):
        return (type(self), (self.field, self.message))


class DataError(RaytrainFTError):
    """A data file or directory is missing, unreadable or has the wrong shape.

    Example: ``--data-path runs/train.parquet`` names a file that does not exist.
    """

    def __init__(self, path: str, message: str):
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}")

    def __reduce__(self):
        return (type(self), (self.path, self.message))


class ClusterError(RaytrainFTError):
    """Ray could not be reached or an actor group could not start.

    Example: ``--address ray://10.0.0.5:10001`` points at no running cluster.
    """


class TrainingError(RaytrainFTError):
    """A worker or server failed during training and the run cannot go on.

    Example: a worker raised inside the model's forward pass.
    """


class JobError(RaytrainFTError):
    """A submitted job failed, timed out, or cannot be found.

    Example: ``raytrain-ft status raysubmit_123`` names a job the cluster does not know.
    """
