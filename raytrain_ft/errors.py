"""One exception hierarchy for the project; every message says what to change."""

from __future__ import annotations

import contextlib
import re
import sys

_CLI = [False]
"""Whether the reader gave command-line flags (the CLI, a submitted job): messages name settings
by their flags there, and by their config fields everywhere else."""


@contextlib.contextmanager
def cli_surface():
    """While the CLI runs, its errors name settings as flags (``--batch-size``)."""
    before, _CLI[0] = _CLI[0], True
    try:
        yield
    finally:
        _CLI[0] = before


def _in_a_ray_worker() -> bool:
    """An actor's message reaches its reader through the driver, which puts it in the reader's
    terms: in a Ray worker process it keeps its flags."""
    if "ray" not in sys.modules:
        return False
    try:
        from ray._private.worker import WORKER_MODE, global_worker

        return global_worker.mode == WORKER_MODE
    except (ImportError, AttributeError):
        return False


_FLAG = re.compile(
    r"(\ban )?--([a-z][a-z0-9]*(?:-[a-z0-9]+)*)\b"  # the flag, and an article before it
    r"(?: (-?\d[\d,]*(?:\.\d+)?(?:e-?\d+)?|[A-Z][A-Z_:]*\b|[a-z][a-z0-9_]*\b))?"  # a value
    r"(?: or ([a-z][a-z0-9_]*)\b)?"  # and another
)


def in_readers_terms(text: str) -> str:
    """``text`` with each setting's flag named by its config field unless the reader is on the
    command line: ``--batch-size 2`` reads ``data.batch_size=2``, ``--optimizer sgd`` reads
    ``optim.name='sgd'``, ``--momentum`` reads ``optim.momentum``; flags of the CLI alone
    (``--output-json``) stay, and so does a command quoted in backticks (run as written)."""
    if "--" not in text or _CLI[0] or _in_a_ray_worker():
        return text
    from raytrain_ft.config import flag_fields

    fields = flag_fields()

    def named(m: re.Match) -> str:
        known = fields.get(m.group(2))
        if known is None:
            return m.group(0)
        field, words = known
        said = ("a " if m.group(1) else "") + field
        value, other = m.group(3), m.group(4)
        if value is None:
            return said
        rest = "" if other is None else f" or {words.get(other, other)}"
        if not value[0].islower():  # a number or a placeholder (N, HOST:PORT)
            return f"{said}={value}{rest}"
        if value in words:
            return f"{said}={words[value]}{rest}"
        return f"{said} {value}{rest}"  # the sentence goes on: not a value

    parts = text.split("`")  # odd parts are quoted commands
    return "`".join(p if i % 2 else _FLAG.sub(named, p) for i, p in enumerate(parts))


class RaytrainFTError(Exception):
    """Root of every error the project raises on purpose.

    Example: any failure the CLI reports with exit code 2 or 1 derives from it.
    """

    def __str__(self) -> str:
        return in_readers_terms(super().__str__())


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


class DivergedWarning(RuntimeWarning):
    """The training loss was not a finite number at the end of a run (``Trainer.fit``)."""


class KillsNotFiredWarning(UserWarning):
    """Kills a run was given (``chaos.kill``) that never fired: the run tested nothing for them."""


class JobError(RaytrainFTError):
    """A submitted job failed, timed out, or cannot be found.

    Example: ``raytrain-ft status raysubmit_123`` names a job the cluster does not know.
    """
