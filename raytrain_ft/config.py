"""Typed run configuration: dataclasses, validation, YAML and CLI-flag loading.

Every leaf field of every sub-config is also a CLI flag: ``data.batch_size``
is ``--batch-size``, ``optim.name`` is ``--optimizer`` (see ``FLAG_ALIASES``).
Leaf names are unique across sub-configs so a flag maps to one field.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import errno
import functools
import math
import numbers
import operator
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin

from raytrain_ft.consistency import Mode, MomentumCorrection, StalenessLr
from raytrain_ft.errors import ConfigError

# Closed choices are Literal types: check_field_types refuses any other value, listing these.
Precision = Literal["fp32", "bf16", "fp16"]
Optimizer = Literal["sgd", "rmsprop", "adagrad", "adam"]
Schedule = Literal["constant", "step", "cosine"]
UseGpu = Literal["auto", "true", "false"]
RecoveryMode = Literal["replica", "checkpoint", "none"]
InnerOptimizer = Literal["sgd", "adamw"]
CodecResidual = Literal["local", "replicated"]
RECOVERY_MODES: tuple[str, ...] = get_args(RecoveryMode)

# Open choices: a built-in name, or the user's own as MODULE:ATTR.
MODELS = ("mlp", "cnn", "resnet18", "resnet50")
LOSSES = ("cross_entropy", "mse")
DATASETS = ("digits", "synthetic", "cifar10", "mnist", "parquet")


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(name, f"must be > 0, got {value!r}")


def _non_negative(name: str, value: float) -> None:
    if value < 0:
        raise ConfigError(name, f"must be >= 0, got {value!r}")


def _shown(value: Any) -> str:
    """``value`` for a message; a boolean where a word was expected (``True``: a YAML file's
    unquoted yes, no, on, off, true or false, read as one) says so."""
    if isinstance(value, bool) or value in ("True", "False"):
        return (
            f"{value!r} (a YAML file reads an unquoted yes, no, on, off, true or false as a "
            "boolean: quote the word)"
        )
    return repr(value)


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(
            name, f"unknown value {_shown(value)}; choose one of {', '.join(choices)}"
        )


def _open_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """A built-in name, or the user's own as MODULE:ATTR (a dotted name was likely meant as one)."""
    if ":" in value or value in choices:
        return
    module, dot, attr = value.rpartition(".")
    meant = f" ({module}:{attr}?)" if dot and module and attr.isidentifier() else ""
    raise ConfigError(
        name,
        f"unknown value {_shown(value)}; choose one of {', '.join(choices)}, or your own as "
        f"MODULE:ATTR{meant}",
    )


def _at_most(name: str, value: float, limit: float, why: str) -> None:
    if value > limit:
        shown = f"{int(limit):,}" if float(limit).is_integer() else f"{limit:g}"
        raise ConfigError(name, f"must be at most {shown}, got {value!r}: {why}")


FLOAT32_MAX = 3.4028234663852886e38


def _float32(name: str, value: float | None) -> None:
    """A setting the shards or workers compute with in float32 (a larger one overflows there)."""
    if value is not None and abs(value) > FLOAT32_MAX:
        raise ConfigError(
            name,
            f"must be at most 3.4e38 in size (it is used in float32 arithmetic), got {value!r}",
        )


_UNION_TYPES = (typing.Union, types.UnionType)
_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


def _split_optional(hint: Any) -> tuple[Any, bool]:
    """(the type inside ``X | None``, whether None is allowed); other hints as they are. A union of
    several types (``int | Literal["auto"]``) stays a union."""
    if get_origin(hint) in _UNION_TYPES:
        args = get_args(hint)
        inner = tuple(a for a in args if a is not type(None))
        return functools.reduce(operator.or_, inner), type(None) in args
    return hint, False


def _describe(hint: Any) -> str:
    """What a value of ``hint`` is, for a message ("an integer or auto")."""
    if get_origin(hint) in _UNION_TYPES:
        return " or ".join(_describe(a) for a in get_args(hint))
    if get_origin(hint) is Literal:
        return " | ".join(map(str, get_args(hint)))
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint))
    )


def _typed(value: Any, hint: Any, name: str) -> Any:
    """``value`` as the annotated type ``hint`` (ints and floats normalised), or ConfigError naming
    the field."""
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(name, f"expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
        if (
            isinstance(value, numbers.Real)
            and not isinstance(value, bool)
            and math.isfinite(value)
            and float(value).is_integer()
        ):
            return int(value)
        raise ConfigError(name, f"expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            value = float(value)
            if not math.isfinite(value):
                raise ConfigError(name, f"must be a finite number, got {value!r}")
            return value
        raise ConfigError(name, f"expected a number, got {value!r}")
    if get_origin(hint) is Literal:
        _choice(name, value, get_args(hint))
        return value
    if get_origin(hint) in _UNION_TYPES:
        for member in get_args(hint):
            try:
                return _typed(value, member, name)
            except ConfigError:
                continue
        raise ConfigError(name, f"expected {_describe(hint)}, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(name, f"expected a string, got {_shown(value)}")
    if isinstance(hint, type):
        if isinstance(value, hint):
            return value
        raise ConfigError(name, f"expected a {hint.__name__}, got {value!r}")
    return value


def check_field_types(obj: Any, section: str | None = None) -> None:
    """Check (and normalise) every field of the dataclass ``obj`` against its annotation, naming a
    bad one as ``section.field``: int fields take integers (not bools, not fractions), float fields
    finite numbers, bool fields bools, str fields strings; ``X | None`` also takes None."""
    cls = type(obj)
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{section}.{f.name}" if section else f.name
        hint, optional = _split_optional(hints[f.name])
        value = getattr(obj, f.name)
        if value is None:
            if optional:
                continue
            raise ConfigError(name, "needs a value, got None")
        typed = _typed(value, hint, name)
        if typed is not value:
            setattr(obj, f.name, typed)


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    name: str = "cnn"
    """Model: mlp | cnn | resnet18 | resnet50, or your own as MODULE:ATTR (a zero-argument function
    or class returning an nn.Module, importable from the working directory or PYTHONPATH)."""
    kwargs: str | None = None
    """With MODULE:ATTR: keyword arguments for it, as a JSON object (flag --model-kwargs)."""
    loss: str = "cross_entropy"
    """cross_entropy (class logits [N, C] against integer targets; eval_accuracy is reported) | mse
    | MODULE:ATTR (a function (output, target) -> scalar tensor, or an nn.Module loss class made
    with no arguments)."""
    precision: Precision = "fp32"
    """fp32 | bf16 | fp16: workers compute forward and backward under autocast (CPU or GPU); the
    shards keep float32 parameters and optimizer state. fp16 scales the loss (GradScaler's rule:
    halve the scale at an overflow, whose update every shard skips; double it after 2000 steps
    without one)."""
    small_input_stem: bool = True
    """ResNets only: 3x3 stride-1 first conv and no max-pool, for 32x32 inputs."""

    def __post_init__(self) -> None:
        check_field_types(self, "model")
        _open_choice("model.name", self.name, MODELS)
        if self.kwargs is not None and ":" not in self.name:
            raise ConfigError(
                "model.kwargs",
                "keyword arguments are for your own model (--model MODULE:ATTR, or "
                f"ModelConfig(name='MODULE:ATTR')), not the built-in {self.name!r}; with "
                "Trainer(model=build), bind them in what you pass: "
                "model=functools.partial(build, ...)",
            )
        _open_choice("model.loss", self.loss, LOSSES)
        refuse_ignored(
            self,
            "model",
            "--model",
            self.name,
            ((("small_input_stem",), ("resnet18", "resnet50")),),
        )


@dataclass(kw_only=True, slots=True)
class DataConfig:
    dataset: str = "digits"
    """digits (offline, sklearn) | synthetic | cifar10 | mnist | parquet, or your own as
    MODULE:ATTR (a zero-argument function returning (train, eval) torch Datasets)."""
    data_path: str | None = None
    """Root directory for cifar10/mnist (torchvision layout) or a Parquet file/directory (digits and
    synthetic read no files: an error there)."""
    image_size: int = 16
    """digits/synthetic: side length the 8x8 digits are upsampled to (synthetic images use it
    too)."""
    batch_size: int = 32
    """Per-worker batch size."""
    eval_fraction: float = 0.2
    """Fraction held out for evaluation (digits, synthetic, parquet); cifar10/mnist use their test
    split."""
    synthetic_samples: int = 4096
    """Number of samples the synthetic dataset generates."""
    synthetic_channels: int = 1
    """Image channels of the synthetic dataset (3 mimics CIFAR-10 shapes)."""
    image_column: str = "image"
    """Parquet: column of flattened float images (list<float>)."""
    label_column: str = "label"
    """Parquet: column of integer class labels."""
    image_shape: str | None = None
    """Parquet only: C,H,W of the images when the file's metadata does not record it."""
    x_columns: str = "x"
    """A Ray Dataset given as training or eval data: its column of model inputs (several, comma
    separated, make x a dict of tensors keyed by column)."""
    y_column: str = "y"
    """A Ray Dataset given as training or eval data: its column of targets."""
    prefetch_batches: int = 2
    """Batches each worker prepares ahead in a background thread (0 disables)."""

    @classmethod
    def images(
        cls, dataset: str, image_size: int, channels: int, samples: int, **kw: Any
    ) -> DataConfig:
        """Images of one shape from digits or synthetic data, for code that picks either: the
        synthetic dataset's settings go only where the dataset is synthetic (digits would refuse
        them, as it ignores them)."""
        if dataset == "synthetic":
            kw.update(synthetic_channels=channels, synthetic_samples=samples)
        return cls(dataset=dataset, image_size=image_size, **kw)

    def __post_init__(self) -> None:
        check_field_types(self, "data")
        _open_choice("data.dataset", self.dataset, DATASETS)
        _positive("data.batch_size", self.batch_size)
        _positive("data.image_size", self.image_size)
        _positive("data.synthetic_samples", self.synthetic_samples)
        _positive("data.synthetic_channels", self.synthetic_channels)
        _non_negative("data.prefetch_batches", self.prefetch_batches)
        if not 0.0 < self.eval_fraction < 1.0:
            raise ConfigError(
                "data.eval_fraction", f"must be in (0, 1), got {self.eval_fraction!r}"
            )
        for name, value in (("data.x_columns", self.x_columns), ("data.y_column", self.y_column)):
            if not value.replace(",", "").strip():
                raise ConfigError(name, "names no column; give the Ray Dataset's column name(s)")
        if self.dataset == "parquet" and not self.data_path:
            raise ConfigError("data.data_path", "dataset 'parquet' needs --data-path FILE_OR_DIR")
        if self.data_path and self.dataset in ("digits", "synthetic"):
            raise ConfigError(
                "data.data_path",
                f"dataset {self.dataset!r} reads no files, so {self.data_path!r} would be ignored; "
                "drop --data-path, or choose --dataset parquet, cifar10 or mnist",
            )
        if self.image_shape is not None:
            if self.dataset != "parquet":
                raise ConfigError(
                    "data.image_shape",
                    f"only Parquet data takes an image shape (dataset {self.dataset!r} knows its "
                    "own); "
                    "drop --image-shape or use --dataset parquet",
                )
            parse_image_shape(self.image_shape)
        refuse_ignored(
            self,
            "data",
            "--dataset",
            self.dataset,
            (
                (("image_size",), ("digits", "synthetic")),
                (("eval_fraction",), ("digits", "synthetic", "parquet")),
                (("synthetic_samples", "synthetic_channels"), ("synthetic",)),
                (("image_column", "label_column"), ("parquet",)),
            ),
        )


def _defaults(section) -> dict[str, Any]:
    """A config section's field defaults, by field name."""
    return {f.name: f.default for f in dataclasses.fields(section)}


# The fields a command line named ("optim.momentum"), while from_dict builds its config: a flag
# given its default value is set all the same. A YAML file or a dict (the Python API, a submitted
# job's whole config) names fields it need not set, so there a field is set when it differs from
# its default.
_FLAGS_GIVEN: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar(
    "flags_given", default=frozenset()
)


def is_set(section, prefix: str, name: str) -> bool:
    """Whether the user set ``prefix.name``: a flag named it, or it differs from its default."""
    return (
        f"{prefix}.{name}" in _FLAGS_GIVEN.get()
        or getattr(section, name) != _defaults(section)[name]
    )


@contextlib.contextmanager
def _flags_given(flags) -> Any:
    leaves = _leaf_fields()
    names = {f"{leaves[f][0]}.{leaves[f][1].name}" for f in flags if f in leaves and leaves[f][0]}
    token = _FLAGS_GIVEN.set(frozenset(names))
    try:
        yield
    finally:
        _FLAGS_GIVEN.reset(token)


def refuse_ignored(section, prefix: str, flag: str, chosen: str, rules) -> None:
    """A setting the chosen value of ``flag`` would ignore is refused, not dropped. ``rules``:
    (field names of ``section``, the choices that use them); a field counts as set when a flag
    named it or it differs from its default (``is_set``)."""
    for names, used_by in rules:
        for name in names:
            if chosen not in used_by and is_set(section, prefix, name):
                raise ConfigError(
                    f"{prefix}.{name}" if prefix else name,
                    f"applies to {flag} {' or '.join(used_by)}, not {chosen}, which would ignore "
                    f"it; drop {flag_of(name)}",
                )


def parse_json(text: str, name: str, error: type = ConfigError) -> Any:
    """JSON given as ``name`` (a flag, field or file); a key given twice (the last would win
    silently) or nesting too deep is refused as the syntax errors are."""

    def unique(pairs: list) -> dict:
        out: dict = {}
        for key, value in pairs:
            if key in out:
                raise error(name, f"key {key!r} is given twice; keep one")
            out[key] = value
        return out

    import json

    try:
        return json.loads(text, object_pairs_hook=unique)
    except json.JSONDecodeError as e:
        raise error(name, f"is not JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise error(name, "is nested too deeply for a JSON object of settings") from None


def flag_of(field: str) -> str:
    """The CLI flag of a field named like its flag (``data.x_columns`` -> ``--x-columns``)."""
    return "--" + field.rsplit(".", 1)[-1].replace("_", "-")


def parse_image_shape(text: str) -> tuple[int, int, int]:
    try:
        dims = tuple(int(x) for x in text.split(","))
    except ValueError:
        dims = ()
    if len(dims) != 3 or min(dims) <= 0:
        raise ConfigError("data.image_shape", f"must be C,H,W with positive integers, got {text!r}")
    return dims  # type: ignore[return-value]


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    name: Optimizer = "sgd"
    """Server-side optimizer: sgd | rmsprop | adagrad | adam."""
    lr: float = 0.05
    """Base learning rate."""
    momentum: float = 0.9
    """sgd/rmsprop momentum, in [0, 1)."""
    nesterov: bool = False
    """sgd: Nesterov momentum (needs momentum > 0)."""
    weight_decay: float = 0.0
    """L2 penalty added to the gradient (torch.optim semantics)."""
    beta1: float = 0.9
    """adam: first-moment decay."""
    beta2: float = 0.999
    """adam: second-moment decay."""
    alpha: float = 0.99
    """rmsprop: smoothing constant."""
    eps: float = 1e-8
    """adam/rmsprop: denominator epsilon (adagrad uses 1e-10 unless set here)."""
    schedule: Schedule = "constant"
    """LR schedule: constant | step | cosine."""
    warmup_steps: int = 0
    """Linear warm-up from lr/warmup_steps to lr over this many steps."""
    step_size: int = 30
    """step schedule: multiply lr by gamma every step_size steps."""
    gamma: float = 0.1
    """step schedule factor."""
    min_lr: float = 0.0
    """cosine schedule: final lr (at most lr)."""
    clip_grad_norm: float | None = None
    """Clip the gradient of every update to this global L2 norm (over all shards' parameters, as
    torch.nn.utils.clip_grad_norm_): sync and mixed clip the averaged gradient of the step (a
    second round with the shards), async and ssp each push, local_sgd each inner step (not the
    round's push). Refused with backup workers. Off when not set."""

    def __post_init__(self) -> None:
        check_field_types(self, "optim")
        if self.clip_grad_norm is not None:
            _positive("optim.clip_grad_norm", self.clip_grad_norm)
        _positive("optim.lr", self.lr)
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError("optim.momentum", f"must be in [0, 1), got {self.momentum!r}")
        _non_negative("optim.weight_decay", self.weight_decay)
        _non_negative("optim.warmup_steps", self.warmup_steps)
        _positive("optim.step_size", self.step_size)
        _positive("optim.eps", self.eps)
        _positive("optim.gamma", self.gamma)
        _non_negative("optim.min_lr", self.min_lr)
        for name in ("lr", "weight_decay", "eps", "gamma", "min_lr", "clip_grad_norm"):
            _float32(f"optim.{name}", getattr(self, name))
        if self.schedule == "cosine" and self.min_lr > self.lr:
            raise ConfigError(
                "optim.min_lr",
                f"the cosine schedule anneals from --lr {self.lr!r} down to --min-lr; got "
                f"{self.min_lr!r}, above it",
            )
        if self.nesterov and (self.momentum <= 0 or self.name != "sgd"):
            raise ConfigError("optim.nesterov", "needs --optimizer sgd and --momentum > 0")
        for name, value in (
            ("optim.beta1", self.beta1),
            ("optim.beta2", self.beta2),
            ("optim.alpha", self.alpha),
        ):
            if not 0.0 <= value < 1.0:
                raise ConfigError(name, f"must be in [0, 1), got {value!r}")
        # a setting the chosen optimizer or schedule would ignore is refused, not dropped
        refuse_ignored(
            self,
            "optim",
            "--optimizer",
            self.name,
            (
                (("momentum",), ("sgd", "rmsprop")),
                (("beta1", "beta2"), ("adam",)),
                (("alpha",), ("rmsprop",)),
                (("eps",), ("rmsprop", "adagrad", "adam")),
            ),
        )
        refuse_ignored(
            self,
            "optim",
            "--schedule",
            self.schedule,
            ((("step_size", "gamma"), ("step",)), (("min_lr",), ("cosine",))),
        )


def check_schedule(optim: OptimConfig, total_steps: int) -> None:
    """ConfigError for an LR schedule the run is too short for: a warm-up longer than the run
    (``--lr`` never reached) or a step schedule whose first decay comes after the last step (it
    would change nothing, like a setting ignored)."""
    if optim.warmup_steps > total_steps:
        raise ConfigError(
            "optim.warmup_steps",
            f"a warm-up of {optim.warmup_steps} steps is longer than this run's {total_steps} "
            f"steps, so the lr would never reach --lr {optim.lr!r}; use --warmup-steps "
            f"{total_steps} or fewer, or train longer (--steps / --epochs)",
        )
    first_decay = optim.warmup_steps + optim.step_size
    if optim.schedule == "step" and first_decay >= total_steps:
        room = total_steps - 1 - optim.warmup_steps
        fix = f"use --step-size {room} or less" if room >= 1 else "use fewer --warmup-steps"
        raise ConfigError(
            "optim.step_size",
            f"the step schedule first lowers the lr at step {first_decay} (--warmup-steps "
            f"{optim.warmup_steps} + --step-size {optim.step_size}) and this run has "
            f"{total_steps} steps, so it would never; {fix}, train longer, or use --schedule "
            "constant",
        )


@dataclass(kw_only=True, slots=True)
class ClusterConfig:
    num_workers: int = 2
    """Worker actors; each trains on its own data partition."""
    num_servers: int | Literal["auto"] = 2
    """Parameter-server shard actors; the flat parameter vector is split into this many key
    ranges. auto: at the start, time a shard-shaped call for 1, 2, 3, 4, 6, 8, 12 and 16 shards on
    the cluster and the shards' update, and take the fewest servers within 5% of the best predicted
    exchange (raytrain_ft.sharding.choose_num_servers; the summary's server_plan says why)."""
    cpus_per_worker: int = 1
    """Ray CPUs (and torch threads) per worker."""
    server_threads: int = 1
    """torch threads per parameter server for the optimizer step (servers reserve no Ray CPUs: in
    sync mode they work while workers wait)."""
    overlap_comm: bool = False
    """Push a shard as soon as backward has finished its gradients, and wait for a shard's new
    parameters only when the forward pass first needs them (same results; off by default: on a
    2-core CPU machine it measured 0.88-1.01x, see README)."""
    push_thread: UseGpu = "auto"
    """With --overlap-comm: true (push each shard from a thread of the worker's own while backward
    goes on; backward's hook only queues the shard) | false (push from backward's hook) | auto
    (true on GPU workers, where the hook records a CUDA event and the thread copies on a side
    stream; false on CPU workers)."""
    use_gpu: UseGpu = "auto"
    """auto (a GPU per worker when the cluster has them; on a GPU torch cannot use, the CPU) | true
    (wait for GPUs, e.g. from an autoscaler) | false."""
    simulate_compute_ms: float = 0.0
    """Benchmarks (flag --simulate-compute MS): workers skip data, forward and backward; each step
    waits MS milliseconds (at most 3,600,000, an hour) and pushes a gradient of the model's true
    size (fixed small values), so scaling to many workers and servers can be studied on a few cores.
    0 trains for real."""
    ranks_per_process: int = 1
    """Host this many worker ranks in one process (as one process per node drives the node's GPUs):
    each rank has its own training thread, model copy, data, device (GPU i of the process's GPUs;
    the process asks for this many GPUs and CPUs) and, without pre-aggregation, its own exchange
    and calls; with --simulate-compute it fits 64 ranks in memory (each torch process is ~0.3 GB).
    Killing the process kills all its ranks; they are restarted and resume."""
    preaggregate: UseGpu = "auto"
    """With --ranks-per-process above 1: true (the ranks of a process sum their gradients, in rank
    order, and send one push per shard for all of them, as the GPUs of one node would; sync mode
    without backup workers, or mixed mode with --group-size equal to --ranks-per-process -- a
    node's ranks synchronous, the servers asynchronous; not with gradient clipping, lossy codecs,
    fp16 or delay compensation) | false (one push per rank) | auto (true where it applies). The
    ranks of a process are summed first either way, so both give the same bits."""
    tf32: bool = False
    """GPU workers: let convolutions and matmuls use TF32 (faster on Ampere/Hopper, other bits than
    the CPU; off keeps runs bitwise reproducible, see raytrain_ft/device.py)."""
    metrics: bool = True
    """Record the run's metrics (steps, samples/s, exchange latency, staleness, recoveries, replica
    lag) on Ray's Prometheus endpoint."""
    address: str | None = None
    """Ray cluster address: HOST:PORT of the head's GCS (6379 by default), ray://HOST:10001 (Ray
    Client), or auto (the one Ray instance on this machine); checked before ray.init (reachable,
    Ray, takes the token). Empty starts an embedded local Ray for the run."""
    local_nodes: int = 1
    """Embedded local Ray only: simulate this many nodes on this machine (ray.cluster_utils.Cluster,
    fast node-death detection) so node kills can be tested."""
    keep_warm_s: float = 30.0
    """Where Ray outlives the run (the driver had started or joined it before: a notebook, a sweep,
    tests): keep the server and worker processes of a run that ended well this many seconds for
    the next run of the same driver, which takes them instead of starting processes (~3
    CPU-seconds each); 0 ends them with the run. Resting workers hold their Ray CPUs (and GPUs):
    ``raytrain_ft.end_warm_processes()`` ends them at once; the driver ends them at exit."""

    def __post_init__(self) -> None:
        for name in ("use_gpu", "push_thread", "preaggregate"):  # True means "true"; any case
            if isinstance(getattr(self, name), (bool, str)):
                setattr(self, name, str(getattr(self, name)).lower())
        check_field_types(self, "cluster")
        _positive("cluster.num_workers", self.num_workers)
        if self.num_servers != "auto":
            _positive("cluster.num_servers", self.num_servers)
        _positive("cluster.cpus_per_worker", self.cpus_per_worker)
        _positive("cluster.server_threads", self.server_threads)
        _positive("cluster.local_nodes", self.local_nodes)
        _non_negative("cluster.simulate_compute_ms", self.simulate_compute_ms)
        _at_most(
            "cluster.simulate_compute_ms",
            self.simulate_compute_ms,
            MAX_SIMULATED_STEP_MS,
            "a simulated step waits at most an hour",
        )
        _positive("cluster.ranks_per_process", self.ranks_per_process)
        if self.ranks_per_process > self.num_workers:
            raise ConfigError(
                "cluster.ranks_per_process",
                f"{self.ranks_per_process} ranks per process, but the run has "
                f"{self.num_workers} workers (ranks); give --ranks-per-process at most "
                f"{self.num_workers}, or more --num-workers",
            )
        _non_negative("cluster.keep_warm_s", self.keep_warm_s)
        _at_most("cluster.keep_warm_s", self.keep_warm_s, 3600.0, "keep processes at most an hour")
        if self.push_thread != "auto" and not self.overlap_comm:
            raise ConfigError(
                "cluster.push_thread",
                "chooses who sends shards during backward, which only --overlap-comm true does: "
                "set --overlap-comm true too, or leave --push-thread auto",
            )
        if self.local_nodes > 1 and self.address:
            raise ConfigError(
                "cluster.local_nodes",
                "simulated nodes need the embedded local Ray; drop --address or --local-nodes",
            )


RECOVERY_MODES = ("replica", "checkpoint", "none")
MIN_PROBE_INTERVAL_S = 0.01
MAX_SIMULATED_STEP_MS = 3_600_000.0
"""Longest simulated step (``--simulate-compute``) and straggler delay (``--slow-workers``): one
hour."""
MAX_SPARES = 16
"""Most warm spare servers a run keeps (``--num-spares``)."""


@dataclass(kw_only=True, slots=True)
class RecoveryConfig:
    mode: RecoveryMode = "replica"
    """replica: rebuild a lost server from its peer's snapshot + command log (no files) |
    checkpoint: the baseline that restarts the run from the last checkpoint files | none: no
    replication, a lost server fails the run (measures replication's cost)."""
    snapshot_interval: int | Literal["auto"] = 50
    """Updates between the snapshots a primary sends its replica holder (each truncates the command
    log), or auto: each primary picks it by Young's rule from the snapshot and replay costs it
    measures and the failure rate (recovery.expected_mtbf_s, or the failovers its shard has seen),
    re-evaluated as the run goes (recovery.policy.SnapshotPolicy)."""
    durability: str = "auto"
    """auto (the default): pipelined where it applies (sync, replica recovery, no backup workers,
    no global clipping), else strict | strict: a worker's push is answered once its update is
    logged by the holder (no acknowledged update is ever lost) | pipelined (sync): answered once
    applied, with the updates before it logged; the worker keeps the push until its next answer
    (which waits for the log) and sends it again to a rebuilt primary, so nothing is lost and the
    holder's round trip overlaps the next step's compute | relaxed:K: answered once applied, with
    at most K updates of a shard not yet logged -- a primary's death loses at most K acknowledged
    updates (counted in the summary's updates_lost); async only."""
    expected_mtbf_s: float = 3600.0
    """snapshot_interval auto: the mean time between server failures to plan for (failovers seen
    in the run raise the rate)."""
    fold_log: bool = True
    """Replica holders apply logged commands once acknowledged (a recovery then moves one state, not
    the log since the last snapshot)."""
    num_spares: int = 1
    """Warm spare server actors kept started, so a recovery does not wait for a process start (at
    most 16; with 0, a replacement is started when a server dies)."""
    health_check_interval_s: float = 0.2
    """Seconds between the supervisor's liveness probes (failed calls reported by workers are acted
    on at once)."""
    suspect_after_s: float = 10.0
    """Seconds a server may leave probes unanswered (alive but unreachable) before it is replaced as
    if dead; the replica it is rebuilt from is fenced first, so a suspected server that was alive
    after all changes nothing."""
    max_worker_restarts: int = 3
    """Restarts allowed per worker rank before the run fails."""
    max_server_replacements: int = 100
    """Server replacements allowed per run before it fails."""
    checkpoint_interval: int = 20
    """Steps between checkpoint files (recovery=checkpoint, or any mode with checkpoint_dir set)."""
    checkpoint_dir: str | None = None
    """Directory for checkpoint files every checkpoint_interval steps (created, and checked writable
    before Ray starts, for a local run). recovery=checkpoint restarts from them (a temporary
    directory when empty); with recovery=replica they are only for a whole-cluster loss (see
    resume_from): recovery never reads them."""
    resume_from: str | None = None
    """Start from the newest step every shard has a checkpoint file for in this directory (after
    losing the whole cluster)."""

    def __post_init__(self) -> None:
        check_field_types(self, "recovery")
        if self.snapshot_interval != "auto":
            _positive("recovery.snapshot_interval", self.snapshot_interval)
        _positive("recovery.expected_mtbf_s", self.expected_mtbf_s)
        from raytrain_ft.recovery.policy import unlogged_allowed

        try:
            unlogged_allowed(self.durability)
        except ValueError as e:
            raise ConfigError("recovery.durability", str(e)) from None
        _non_negative("recovery.num_spares", self.num_spares)
        _at_most(
            "recovery.num_spares",
            self.num_spares,
            MAX_SPARES,
            "each spare is a server process kept running for the whole run, a recovery takes one "
            "and a new one is started "
            "after it, so more spares only hold memory",
        )
        _positive("recovery.health_check_interval_s", self.health_check_interval_s)
        _positive("recovery.suspect_after_s", self.suspect_after_s)
        if self.health_check_interval_s < MIN_PROBE_INTERVAL_S:
            raise ConfigError(
                "recovery.health_check_interval_s",
                f"must be at least {MIN_PROBE_INTERVAL_S} s, got {self.health_check_interval_s}: "
                "the supervisor probes every process this often",
            )
        if self.suspect_after_s < self.health_check_interval_s:
            raise ConfigError(
                "recovery.suspect_after_s",
                f"must be at least the health-check interval ({self.health_check_interval_s} s), "
                f"got {self.suspect_after_s}: a process is suspected after probes it did not "
                "answer",
            )
        _non_negative("recovery.max_worker_restarts", self.max_worker_restarts)
        _non_negative("recovery.max_server_replacements", self.max_server_replacements)
        _positive("recovery.checkpoint_interval", self.checkpoint_interval)
        if (
            self.mode != "checkpoint"
            and self.checkpoint_dir is None
            and is_set(self, "recovery", "checkpoint_interval")
        ):
            raise ConfigError(
                "recovery.checkpoint_interval",
                f"writes checkpoint files into --checkpoint-dir, and none is given (--recovery "
                f"{self.mode} writes none without it); add --checkpoint-dir or drop "
                "--checkpoint-interval",
            )
        refuse_ignored(
            self,
            "recovery",
            "--recovery",
            self.mode,
            (
                (
                    (
                        "snapshot_interval",
                        "expected_mtbf_s",
                        "fold_log",
                        "durability",
                        "max_server_replacements",
                    ),
                    ("replica",),
                ),
            ),
        )
        if self.mode == "none" and self.num_spares != 0 and is_set(self, "recovery", "num_spares"):
            raise ConfigError(
                "recovery.num_spares",
                "spares replace lost servers, and --recovery none replaces none (a lost server "
                "fails the run); drop --num-spares",
            )
        if self.snapshot_interval != "auto" and is_set(self, "recovery", "expected_mtbf_s"):
            raise ConfigError(
                "recovery.expected_mtbf_s",
                "plans the snapshot interval of --snapshot-interval auto; a fixed interval "
                f"({self.snapshot_interval}) would ignore it; drop --expected-mtbf-s or set "
                "--snapshot-interval auto",
            )


@dataclass(kw_only=True, slots=True)
class ChaosConfig:
    """Fault injection: real kills and stragglers, for chaos tests and recovery studies."""

    kill: str | None = None
    """ROLE[:INDEX]@step=N or @time=S (also @recovery=N, @rereplication=N, @snapshot=N, counted
    from 1); ROLE is server|replica|worker|spare|supervisor|node; repeat the flag or separate by
    commas (each kill once; a step below the run's last)."""
    one_kill_at_a_time: bool = False
    """Hold each @step/@time kill until the previous one has been recovered (random schedules:
    replicas survive one failure at a time)."""
    slow_workers: str | None = None
    """RANK:MS makes worker RANK a straggler, MS milliseconds (at most an hour) slower per step
    (comma-separated for several, each rank once)."""

    def __post_init__(self) -> None:
        from raytrain_ft.recovery.faults import parse_kills, parse_slow

        check_field_types(self, "chaos")
        parse_kills(self.kill)
        parse_slow(self.slow_workers)
        if self.one_kill_at_a_time and not self.kill:
            raise ConfigError(
                "chaos.one_kill_at_a_time",
                "holds each --kill until the previous one is recovered, and no --kill is given; "
                "add --kill or drop --one-kill-at-a-time",
            )


@dataclass(kw_only=True, slots=True)
class ConsistencyConfig:
    staleness: int = 2
    """ssp: steps a worker may run ahead of the slowest worker (0 = lock-step)."""
    group_size: int = 2
    """mixed: consecutive ranks that average their gradients synchronously before the group's update
    (e.g. the workers of one node); num_workers must be a multiple of it."""
    backup_workers: int = 0
    """sync: a step closes after the first num_workers - backup_workers gradients; late ones are
    dropped (stragglers stop holding everyone up)."""
    n_push: int = 1
    """async (Downpour): push the gradients accumulated over this many steps."""
    n_fetch: int = 1
    """async (Downpour): fetch fresh parameters every this many steps (the model stays fixed in
    between)."""
    staleness_lr: StalenessLr = "none"
    """async/ssp: none | inverse (divide the learning rate by the update's staleness when it is
    above 1)."""
    delay_compensation: float = 0.0
    """async/ssp/mixed: DC-ASGD strength, 0 = off (a stale gradient is corrected by the change of
    the parameters since it was computed, g + strength * g*g/sqrt(mean g*g) * (w_now - w_then))."""
    momentum_correction: MomentumCorrection = "dana"
    """async/ssp/mixed with SGD momentum: dana (each update stream -- a rank, a mixed group -- keeps
    its own momentum buffer at the shard, and workers compute on the look-ahead parameters; see
    consistency.Rule.momentum_stream) | none (one buffer, momentum on every update) | auto (each
    update's momentum chosen so that, with the momentum asynchrony itself adds, it remembers as
    many samples as sync's, at the same step per gradient; see consistency.Rule.momentum). Sync and
    local_sgd have one stream: nothing to correct."""
    local_steps: int = 8
    """local_sgd: local optimizer steps per round (one push per round)."""
    inner_optimizer: InnerOptimizer = "sgd"
    """local_sgd: the optimizer of the local steps, sgd (plain) | adamw; fresh at every round."""
    inner_lr: float | None = None
    """local_sgd: learning rate of the local steps (default: --lr)."""
    codec: str = "none"
    """Push compression, with error feedback on the worker: none | fp16 | topk:RATIO (e.g.
    topk:0.01) | onebit (sign + scale)."""
    codec_residual: CodecResidual = "local"
    """Lossy codecs: local (the error-feedback residual stays on the worker; a restarted worker
    starts from a zero residual, losing what compression had held back) | replicated (each push
    also carries the residual, a dense float32 copy of its part -- more bytes than no codec -- kept
    with the shard, so a restarted worker resumes with exactly its residual and a sync run with
    worker kills ends bitwise equal to the run without)."""

    def __post_init__(self) -> None:
        check_field_types(self, "consistency")
        _non_negative("consistency.staleness", self.staleness)
        _positive("consistency.group_size", self.group_size)
        _non_negative("consistency.backup_workers", self.backup_workers)
        _positive("consistency.n_push", self.n_push)
        _positive("consistency.n_fetch", self.n_fetch)
        _non_negative("consistency.delay_compensation", self.delay_compensation)
        _positive("consistency.local_steps", self.local_steps)
        if self.inner_lr is not None:
            _positive("consistency.inner_lr", self.inner_lr)
        _float32("consistency.inner_lr", self.inner_lr)
        _float32("consistency.delay_compensation", self.delay_compensation)
        from raytrain_ft.compression import parse_codec

        try:
            parse_codec(self.codec)
        except ValueError as e:
            raise ConfigError("consistency.codec", str(e)) from None


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    consistency: ConsistencyConfig = field(default_factory=ConsistencyConfig)
    chaos: ChaosConfig = field(default_factory=ChaosConfig)
    mode: Mode = "sync"
    """Consistency mode: sync (BSP: every step averages all workers in rank order) | async
    (Downpour: updates applied on arrival) | ssp (async, at most --staleness steps ahead of the
    slowest) | mixed (groups of --group-size average synchronously, groups update asynchronously)
    | local_sgd (rounds of --local-steps local steps, one push per round: local SGD / DiLoCo)."""
    epochs: int = 5
    """Passes over each worker's partition; with steps set, it must stay at its default (it would
    be ignored)."""
    steps: int | None = None
    """Training steps per worker; overrides epochs."""
    seed: int = 0
    """Seeds model init, data split, partitions and batch order (0 <= seed < 2**64)."""
    log_every_s: float = 1.0
    """Seconds between progress updates from the driver."""
    eval_every_s: float = 0.0
    """Evaluate the shards' current parameters on the eval data every this many seconds while the
    run trains (on the driver); each result is a row of the summary's eval_history with eval_loss /
    eval_accuracy (time to accuracy). 0: only the final evaluation."""

    def __post_init__(self) -> None:
        check_field_types(self)
        self._check_consistency()
        _positive("epochs", self.epochs)
        if self.steps is not None:
            _positive("steps", self.steps)
            if self.epochs != _defaults(TrainConfig)["epochs"]:  # it would be ignored
                raise ConfigError(
                    "epochs",
                    f"not used: steps is {self.steps} too (a run's length in steps per worker, "
                    "which overrides epochs); give one of them",
                )
        if not 0 <= self.seed < 2**64:
            raise ConfigError("seed", f"must be in [0, 2**64), got {self.seed!r}")
        _positive("log_every_s", self.log_every_s)
        _non_negative("eval_every_s", self.eval_every_s)

    def _check_consistency(self) -> None:
        c, w = self.consistency, self.cluster.num_workers
        from raytrain_ft.recovery.faults import parse_slow

        parse_slow(self.chaos.slow_workers, w)
        if c.delay_compensation and self.mode in ("sync", "local_sgd"):
            raise ConfigError(
                "consistency.delay_compensation",
                f"corrects stale gradients of --mode async, ssp or mixed; {self.mode} has none",
            )
        # a setting the chosen mode would ignore is refused, not silently dropped
        refuse_ignored(
            c,
            "consistency",
            "--mode",
            self.mode,
            (
                (("local_steps", "inner_optimizer", "inner_lr"), ("local_sgd",)),
                (("staleness",), ("ssp",)),
                (("group_size",), ("mixed",)),
                (("staleness_lr",), ("async", "ssp")),
                (("momentum_correction",), ("async", "ssp", "mixed")),
            ),
        )
        if self.mode == "local_sgd" and (
            self.cluster.overlap_comm or self.cluster.simulate_compute_ms
        ):
            raise ConfigError(
                "cluster.overlap_comm"
                if self.cluster.overlap_comm
                else "cluster.simulate_compute_ms",
                "local_sgd pushes once per round, after its local steps: use --overlap-comm false "
                "and real compute",
            )
        from raytrain_ft.compression import parse_codec

        if c.codec_residual != "local" and parse_codec(c.codec).lossless:
            raise ConfigError(
                "consistency.codec_residual",
                "--codec-residual applies to lossy codecs (fp16, topk:RATIO, onebit); "
                f"--codec {c.codec} keeps no residual",
            )
        if self.cluster.tf32 and self.cluster.use_gpu == "false":
            raise ConfigError(
                "cluster.tf32", "--tf32 applies to GPU workers; --use-gpu false trains on the CPU"
            )
        if c.backup_workers and self.optim.clip_grad_norm is not None:
            raise ConfigError(
                "optim.clip_grad_norm",
                "global clipping needs the norm of the averaged gradient, and with backup workers "
                "which gradients form a step is only known once it is applied; drop "
                "--backup-workers or --clip-grad-norm",
            )
        if c.backup_workers and self.mode != "sync":
            raise ConfigError(
                "consistency.backup_workers", "backup workers apply to --mode sync only"
            )
        if c.backup_workers >= w:
            raise ConfigError(
                "consistency.backup_workers",
                f"must be below --num-workers ({w}): at least one gradient closes a step",
            )
        if c.backup_workers and self.cluster.overlap_comm:
            raise ConfigError(
                "cluster.overlap_comm",
                "a worker late for a step jumps to the shards' step after each step; use "
                "--overlap-comm false with backup workers",
            )
        if (c.n_push > 1 or c.n_fetch > 1) and self.mode != "async":
            raise ConfigError(
                "consistency.n_push" if c.n_push > 1 else "consistency.n_fetch",
                "n_push / n_fetch above 1 need --mode async (Downpour)",
            )
        if (c.n_push > 1 or c.n_fetch > 1) and self.cluster.overlap_comm:
            raise ConfigError(
                "cluster.overlap_comm",
                "overlap pushes every step from backward; use --overlap-comm false with n_push / "
                "n_fetch above 1",
            )
        if self.cluster.preaggregate == "true":
            why = self._no_preaggregation()
            if why:
                raise ConfigError(
                    "cluster.preaggregate", f"{why}; use --preaggregate auto or false"
                )
        if self.cluster.simulate_compute_ms:  # workers load no data and run no forward/backward
            if self.model.precision != "fp32":
                raise ConfigError(
                    "model.precision",
                    "a simulated step (--simulate-compute) runs no forward or backward to compute "
                    f"in {self.model.precision}; drop --precision",
                )
            if is_set(self.data, "data", "prefetch_batches"):
                raise ConfigError(
                    "data.prefetch_batches",
                    "a simulated step (--simulate-compute) reads no batches; drop "
                    "--prefetch-batches",
                )
        if self.cluster.simulate_compute_ms and self.cluster.overlap_comm:
            raise ConfigError(
                "cluster.overlap_comm",
                "a simulated step runs no forward/backward to overlap with; use --overlap-comm "
                "false with --simulate-compute",
            )
        if self.mode != "sync" and (
            self.recovery.mode == "checkpoint" or self.recovery.resume_from
        ):
            raise ConfigError(
                "recovery.resume_from" if self.recovery.resume_from else "recovery.mode",
                "checkpoint restarts and --resume-from need --mode sync (async modes recover from "
                "replicas)",
            )
        if self.cluster.num_servers == "auto" and self.recovery.resume_from:
            raise ConfigError(
                "cluster.num_servers",
                "--resume-from needs the shard count of the run it resumes; set --num-servers to "
                "the config.cluster.num_servers of its summary",
            )
        if self.recovery.durability == "pipelined" and not self._pipelining_applies():
            raise ConfigError(
                "recovery.durability",
                "pipelined needs --mode sync and --recovery replica, without --backup-workers or "
                "--clip-grad-norm (a rebuilt primary must make the same update again from the same "
                "pushes)",
            )
        if self.recovery.durability.startswith("relaxed") and (
            self.mode != "async" or self.recovery.mode != "replica"
        ):
            raise ConfigError(
                "recovery.durability",
                "relaxed durability needs --mode async and --recovery replica (sync keeps every "
                "acknowledged update; in ssp and mixed a lost update leaves its sender's clock "
                "behind for good, and the others wait for it)",
            )
        if self.mode == "mixed" and w % c.group_size:
            sizes = [min(c.group_size, w - first) for first in range(0, w, c.group_size)]
            raise ConfigError(
                "consistency.group_size",
                f"{w} workers in groups of {c.group_size} would make groups of "
                f"{', '.join(map(str, sizes))} "
                "(the last one smaller, its gradients weighing more); make --num-workers a "
                "multiple of --group-size",
            )

    @property
    def pipelined(self) -> bool:
        """Whether pushes may be answered before their update is logged (``--durability
        pipelined``, or ``auto`` where pipelining applies)."""
        d = self.recovery.durability
        return d == "pipelined" or (d == "auto" and self._pipelining_applies())

    def _pipelining_applies(self) -> bool:
        """A rebuilt primary can make an unlogged update again from the kept pushes: sync with
        replicas, no backup workers (which pushes closed a step depends on arrival), no global
        clipping (its factor comes from a second round)."""
        return (
            self.mode == "sync"
            and self.recovery.mode == "replica"
            and not self.consistency.backup_workers
            and self.optim.clip_grad_norm is None
        )

    def _no_preaggregation(self) -> str | None:
        """Why the ranks of a process cannot send one push for all of them (None: they can)."""
        from raytrain_ft.compression import parse_codec

        if self.cluster.ranks_per_process == 1:
            return (
                "pre-aggregation sums the ranks of one process: it needs --ranks-per-process "
                "above 1"
            )
        if self.mode == "mixed" and self.consistency.group_size != self.cluster.ranks_per_process:
            return (
                "mixed mode pre-aggregates when its groups are the processes: set --group-size "
                f"to --ranks-per-process ({self.cluster.ranks_per_process})"
            )
        if self.mode not in ("sync", "mixed"):
            return (
                "a pre-aggregated push is one update's share of several ranks: --mode "
                f"{self.mode} applies each rank's push on its own"
            )
        if self.consistency.delay_compensation:
            return "delay compensation corrects each rank's gradient by its own square"
        if self.consistency.backup_workers:
            return "with backup workers a step closes on the first pushes in, rank by rank"
        if self.optim.clip_grad_norm is not None:
            return "global clipping probes every rank's push"
        if not parse_codec(self.consistency.codec).lossless:
            return f"--codec {self.consistency.codec} keeps an error-feedback residual per rank"
        if self.model.precision == "fp16":
            return "fp16 loss scaling skips updates per rank's overflow"
        if self.cluster.overlap_comm:
            return "--overlap-comm pushes each rank's shards during its own backward"
        return None

    @property
    def preaggregates(self) -> bool:
        """Whether the ranks of a process send one push per shard for all of them."""
        return self.cluster.preaggregate != "false" and self._no_preaggregation() is None

    def rule(self):
        """The consistency rule servers apply (``raytrain_ft.consistency.Rule``)."""
        from raytrain_ft.consistency import Rule

        c = self.consistency
        return Rule(
            self.mode,
            self.cluster.num_workers,
            c.backup_workers,
            c.group_size,
            c.staleness,
            c.staleness_lr,
            momentum_correction=c.momentum_correction,
            delay_compensation=c.delay_compensation,
            # sync (and mixed whose groups are the processes) sums the ranks of a process first,
            # pre-aggregated or not: the same bits
            sum_group=self.cluster.ranks_per_process
            if (self.mode == "sync" and not c.backup_workers)
            or (self.mode == "mixed" and c.group_size == self.cluster.ranks_per_process)
            else 1,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- loading -----------------------------------------------------------------

SUBCONFIGS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "cluster": ClusterConfig,
    "recovery": RecoveryConfig,
    "consistency": ConsistencyConfig,
    "chaos": ChaosConfig,
}

FLAG_ALIASES: dict[str, str] = {
    "model.name": "model",
    "model.kwargs": "model_kwargs",
    "optim.name": "optimizer",
    "recovery.mode": "recovery",
}
"""Dotted field -> flag name where the leaf name alone would be ambiguous or unnatural."""
JSON_FIELDS = ("model.kwargs",)
"""Fields holding a JSON object: a YAML mapping is taken too."""
LIST_FIELDS = ("chaos.kill", "chaos.slow_workers", "data.x_columns", "data.image_shape")
"""Fields whose value is a comma-separated list: a YAML list is taken too (joined with commas)."""
REPEATABLE_FLAGS = ("kill",)
"""Flags that may be given several times (joined with commas)."""
RENAMED: dict[str, str] = {
    "recovery.recovery": "recovery.mode",
    "recovery.kill": "chaos.kill",
    "recovery.slow_workers": "chaos.slow_workers",
    "recovery.one_kill_at_a_time": "chaos.one_kill_at_a_time",
}
"""Config-file keys of earlier releases -> where the setting lives now (named in the error)."""
SHORTHANDS: dict[str, str] = {"model": "name", "recovery": "mode"}
"""Sections a config file may give as one word: ``model: cnn`` is ``model: {name: cnn}``."""


def _leaf_fields() -> dict[str, tuple[str | None, dataclasses.Field]]:
    """Flag name (underscored) -> (sub-config key or None, field)."""
    out: dict[str, tuple[str | None, dataclasses.Field]] = {}
    for sub, cls in SUBCONFIGS.items():
        for f in dataclasses.fields(cls):
            name = FLAG_ALIASES.get(f"{sub}.{f.name}", f.name)
            out[name] = (sub, f)
    for f in dataclasses.fields(TrainConfig):
        if f.name not in SUBCONFIGS:
            out[f.name] = (None, f)
    return out


@functools.cache
def flag_fields() -> dict[str, tuple[str, dict[str, str]]]:
    """CLI flag name (``batch-size``) -> (its config field, ``data.batch_size``; the words it
    takes as values, each as Python writes it: ``'sgd'``, ``True``), for messages read outside
    the CLI (``errors.in_readers_terms``)."""
    out = {}
    for flag, (sub, f) in _leaf_fields().items():
        hint = typing.get_type_hints(SUBCONFIGS[sub] if sub else TrainConfig)[f.name]
        words = {"auto", "true", "false"}
        for t in (hint, *get_args(hint)):
            if get_origin(t) is Literal:
                words.update(str(a) for a in get_args(t))
        # str fields whose values are names (the built-in choices)
        words.update(
            {"model.name": MODELS, "model.loss": LOSSES, "data.dataset": DATASETS}.get(
                f"{sub}.{f.name}", ()
            )
        )
        if hint is bool:  # a Python reader writes True
            words = {"true": "True", "false": "False"}
        else:
            words = {w: repr(w) for w in words}
        out[flag.replace("_", "-")] = (f"{sub}.{f.name}" if sub else f.name, words)
    return out


@functools.cache
def field_docs() -> dict[str, str]:
    """Flag name -> the docstring under its field (read from source once per process: parsing the
    config classes' source is most of a CLI call's start-up). Callers do not mutate it."""
    import ast
    import inspect

    docs: dict[tuple[type, str], str] = {}
    for cls in (*SUBCONFIGS.values(), TrainConfig):
        body = ast.parse(inspect.getsource(cls)).body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
            ):
                docs[(cls, node.target.id)] = " ".join(str(nxt.value.value).split())  # type: ignore[attr-defined]
    return {
        flag: docs.get((SUBCONFIGS[sub] if sub else TrainConfig, f.name), "")
        for flag, (sub, f) in _leaf_fields().items()
    }


def field_type(f: dataclasses.Field, owner: type) -> Any:
    """The type a flag or YAML value of ``f`` is read as (a Literal as str; a union as itself)."""
    hint, _ = _split_optional(_hints(owner)[f.name])
    return str if get_origin(hint) is Literal else hint


def is_optional(f: dataclasses.Field, owner: type) -> bool:
    """Whether the field may be unset (``X | None``): only those take an empty value, ``none`` or
    ``null`` as unset."""
    return _split_optional(_hints(owner)[f.name])[1]


def coerce(text: Any, typ: type, name: str, optional: bool = True) -> Any:
    """A YAML or flag value as the field's type. A value that means "unset" (empty, ``none``,
    ``null``, YAML ``~``) unsets an optional field; a string field that is not optional keeps the
    word the user typed (``--recovery none``)."""
    unset = text is None or (isinstance(text, str) and text.strip().lower() in ("none", "null", ""))
    if unset and optional:
        return None
    if unset and typ is not str:
        raise ConfigError(name, f"needs a value, got {text!r}")
    if text is None:
        raise ConfigError(name, "needs a value")
    if isinstance(text, dict) and name in JSON_FIELDS:  # YAML's own mapping for a JSON field
        import json

        try:
            return json.dumps(text, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ConfigError(
                name,
                f"holds a value JSON cannot carry ({e}); give numbers, strings, true/false, null, "
                "lists and mappings (no YAML !!set, !!binary, dates with a time or .nan)",
            ) from None
    if get_origin(typ) in _UNION_TYPES:  # int | Literal["auto"]: the word, else the number
        for member in get_args(typ):
            if get_origin(member) is Literal and str(text).strip() in map(str, get_args(member)):
                return str(text).strip()
        numeric = [m for m in get_args(typ) if m in (int, float)]
        if numeric:
            try:
                return coerce(text, numeric[0], name, optional)
            except ConfigError:
                pass
        raise ConfigError(name, f"expected {_describe(typ)}, got {text!r}")
    if isinstance(text, (list, tuple)):
        if typ is not str or name not in LIST_FIELDS:
            raise ConfigError(name, f"expected one value, got a list {text!r}")
        if not all(isinstance(t, (str, int, float)) for t in text):
            raise ConfigError(name, f"expected a list of plain values, got {text!r}")
        return ",".join(str(t) for t in text) or None
    if typ is bool:
        if isinstance(text, bool):
            return text
        low = str(text).lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(name, f"expected true/false, got {text!r}")
    if typ in (int, float):
        if isinstance(text, bool):
            raise ConfigError(name, f"expected a number, got {text!r}")
        if isinstance(text, (int, float)):
            return (
                text  # a YAML/JSON number: the config's own checks judge it, as for the Python API
            )
        try:
            value = typ(text) if typ is float else int(str(text), 10)
        except (TypeError, ValueError):
            raise ConfigError(
                name, f"expected {'an integer' if typ is int else 'a number'}, got {text!r}"
            ) from None
        return value
    return str(text)


def _misplaced(key: str) -> str | None:
    """For a key under the wrong section: where it belongs (None when no section has it)."""
    homes = [
        sub for sub, cls in SUBCONFIGS.items() if key in {f.name for f in dataclasses.fields(cls)}
    ]
    if key in {f.name for f in dataclasses.fields(TrainConfig)} and key not in SUBCONFIGS:
        homes.append("the top level")
    if not homes:
        return None
    where = " or ".join(h if h == "the top level" else f"the {h} section" for h in homes)
    return f"unknown key here; it belongs in {where}"


def _unknown_key(key: str, names) -> str:
    """Why ``key`` is refused in a section with ``names``: where it belongs, or the closest name."""
    import difflib

    close = difflib.get_close_matches(str(key).replace("-", "_").lower(), list(names), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return _misplaced(key) or f"unknown key{hint}; known keys: {', '.join(names)}"


def from_dict(raw: dict[str, Any] | None, source: str = "config") -> TrainConfig:
    """Build a TrainConfig from nested dicts (as in a YAML file); unknown keys are errors."""
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(source, "top level must be a mapping of config sections")
    raw = dict(raw or {})
    kwargs: dict[str, Any] = {}
    for sub, cls in SUBCONFIGS.items():
        section = raw.pop(sub, None)
        if section is None:  # absent, or `cluster:` with nothing under it
            section = {}
        if isinstance(section, str) and sub in SHORTHANDS:  # model: cnn, recovery: none
            section = {SHORTHANDS[sub]: section}
        if not isinstance(section, dict):
            raise ConfigError(sub, f"must be a mapping, got {type(section).__name__}")
        names = {f.name: f for f in dataclasses.fields(cls)}
        sub_kwargs = {}
        for key, value in section.items():
            if key not in names:
                if f"{sub}.{key}" in RENAMED:
                    raise ConfigError(
                        f"{sub}.{key}", f"renamed: write it as {RENAMED[f'{sub}.{key}']}"
                    )
                raise ConfigError(f"{sub}.{key}", _unknown_key(key, names))
            sub_kwargs[key] = coerce(
                value, field_type(names[key], cls), f"{sub}.{key}", is_optional(names[key], cls)
            )
        kwargs[sub] = cls(**sub_kwargs)
    top = {f.name: f for f in dataclasses.fields(TrainConfig) if f.name not in SUBCONFIGS}
    for key, value in raw.items():
        if key not in top:
            raise ConfigError(key, _unknown_key(key, [*SUBCONFIGS, *top]))
        kwargs[key] = coerce(
            value, field_type(top[key], TrainConfig), key, is_optional(top[key], TrainConfig)
        )
    return TrainConfig(**kwargs)


@functools.cache
def _unique_key_loader():
    """A YAML SafeLoader that refuses a key given twice in one mapping (the last one would win
    silently)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def construct_mapping(loader, node, deep=False):
        seen: set = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)):
                continue  # an unhashable key: refused later as a key that is no name
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} is given twice; keep one", key_node.start_mark
                )
            seen.add(key)
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    # YAML 1.1 reads `1:20` as 80 (base 60) and `010` as 8 (octal): here they stay text, which a
    # number field refuses or reads as written (010 -> 10); it reads `1e-1` as text (a float needs
    # a dot there), here a number, as JSON and Python read it; and `2024-01-01` as a date, which no
    # field or JSON holds: here text
    numbers = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
    dropped = (*numbers, "tag:yaml.org,2002:timestamp")
    Loader.yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag not in dropped]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    Loader.add_implicit_resolver(
        numbers[0],
        re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
        list("-+0123456789"),
    )
    Loader.add_implicit_resolver(
        numbers[1],
        re.compile(
            r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
            r"|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"
            r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
        ),
        list("-+0123456789."),
    )
    return Loader


def load_yaml(path: str) -> dict[str, Any]:
    import yaml

    if os.path.isdir(path):
        raise ConfigError("--config", f"{path!r} is a directory; give the YAML file in it")
    if not os.path.exists(path):
        raise ConfigError("--config", f"file {path!r} does not exist")
    if not os.path.isfile(path):  # a FIFO or a device would be read until it ends, or for ever
        raise ConfigError("--config", f"{path!r} is not a regular file; give the YAML file")
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except UnicodeDecodeError as e:
        raise ConfigError(
            "--config",
            f"{path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); save "
            "it as UTF-8",
        ) from None
    except OSError as e:
        raise ConfigError("--config", f"cannot read {path!r} ({e.strerror})") from None
    try:
        data = yaml.load(text, Loader=_unique_key_loader())  # noqa: S506 -- a SafeLoader subclass
    except RecursionError:
        raise ConfigError(
            "--config", f"{path} is nested too deeply; config sections hold plain values"
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(
            "--config", f"{path} is not valid YAML{where}: {getattr(e, 'problem', e)}"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            "--config", f"{path} must hold a mapping of config sections, got {type(data).__name__}"
        )
    return data


def merge_overrides(
    raw: dict[str, Any], overrides: dict[str, Any], source: str = "config"
) -> dict[str, Any]:
    """Apply flat flag overrides (flag name -> value) onto nested dicts."""
    if not isinstance(raw, dict):
        raise ConfigError(source, f"must be a mapping of config sections, got {type(raw).__name__}")
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    leaves = _leaf_fields()
    for flag, value in overrides.items():
        if flag not in leaves:
            raise ConfigError(flag, "unknown option")
        sub, f = leaves[flag]
        if sub is None:
            out[f.name] = value
        else:
            section = out.setdefault(sub, {})
            if section is None:  # `optim: ~` is an empty section, as it is without flags
                section = out[sub] = {}
            if isinstance(section, str) and sub in SHORTHANDS:
                section = out[sub] = {SHORTHANDS[sub]: section}
            if not isinstance(section, dict):
                raise ConfigError(
                    f"{source}: {sub}", f"must be a mapping, got {type(section).__name__}"
                )
            section[f.name] = value
    return out


def load(config_path: str | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A YAML file's config with ``overrides`` (flag names, ``{"lr": 0.1}``) applied; a ``steps``
    override sets the run's length over the file's ``epochs``, as ``--steps`` does."""
    raw = load_yaml(config_path) if config_path else {}
    overrides = overrides or {}
    if "steps" in overrides and "epochs" in raw:
        raw = {k: v for k, v in raw.items() if k != "epochs"}
    return from_dict(merge_overrides(raw, overrides), source=config_path or "config")


def check_again(cfg: TrainConfig) -> None:
    """Check ``cfg`` as if it were built now: the Python API may have changed fields since
    (``cfg.optim.lr = ...``, ``cfg.recovery = RecoveryConfig(...)``), which no check saw."""
    if not isinstance(cfg, TrainConfig):
        raise ConfigError(
            "config",
            f"got {type(cfg).__name__}; give a raytrain_ft.TrainConfig (TrainConfig(...), or "
            "raytrain_ft.config.load(path) of a YAML file)",
        )
    parts = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            parts[f.name] = dataclasses.replace(value)
    dataclasses.replace(cfg, **parts)


def from_command_line(
    raw: dict[str, Any] | None, flags: dict[str, Any], source: str = "config"
) -> TrainConfig:
    """The config of a YAML file's or JSON object's sections (``raw``) and the flags given on the
    command line (flag name -> value): a setting the run would ignore is refused when a flag gave
    it, even at its default value (``--optimizer adam --momentum 0.9``)."""
    if isinstance(raw, dict) and "steps" in flags and "epochs" in raw:  # the flag sets the length
        raw = {k: v for k, v in raw.items() if k != "epochs"}
    with _flags_given(flags):
        cfg = from_dict(merge_overrides(raw or {}, flags, source), source=source)
        defaults = _defaults(cfg.data)
        if ":" not in cfg.data.dataset and (  # a built-in dataset: no Ray Dataset's columns to
            cfg.data.x_columns == defaults["x_columns"]  # name (a value other than the default
            and cfg.data.y_column == defaults["y_column"]  # is refused where the data is known)
        ):
            refuse_ignored(
                cfg.data,
                "data",
                "--dataset",
                cfg.data.dataset,
                ((("x_columns", "y_column"), ("MODULE:ATTR returning Ray Datasets",)),),
            )
    for prefix, name in PYTHON_API_ONLY:
        if is_set(getattr(cfg, prefix), prefix, name):
            raise ConfigError(
                f"{prefix}.{name}",
                "applies where Ray outlives a run (the Python API in a driver that started or "
                f"joined Ray); a command runs one run in its own session: drop it from {source}",
            )
    return cfg


PYTHON_API_ONLY = (("cluster", "keep_warm_s"),)
"""Fields with no command-line flag: they act only across the runs of one driver."""


# --- output paths ----------------------------------------------------------------


def check_writable_dir(path: str, name: str, flag: str | None = None) -> None:
    """Create directory ``path`` if needed and write (and remove) a probe file in it; ConfigError
    naming ``name`` (a field or flag; ``flag``: the flag to fix, when ``name`` is a field) when that
    fails -- checked before a run starts, not when its first file is due."""
    import tempfile

    fix = f"give a writable directory as {flag or name}"
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(name, f"{path!r} is a file, not a directory; {fix}")
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".raytrain-ft-write-test-", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        why = e.strerror or str(e)
        ancestor = os.path.abspath(path)
        while not os.path.exists(ancestor) and os.path.dirname(ancestor) != ancestor:
            ancestor = os.path.dirname(ancestor)
        if e.errno == errno.ENOENT and os.path.isdir(ancestor):  # /proc makes no files, says ENOENT
            why = f"the file system of {ancestor!r} creates no files or directories there"
        raise ConfigError(name, f"cannot write to {path!r} ({why}); {fix}") from None


def check_writable_file(path: str, name: str, create_parent: bool = True) -> None:
    """``path`` can be written (its directory created when ``create_parent``), without changing an
    existing file (a new one is created and removed again: that checks the name too)."""
    if not path:
        raise ConfigError(name, "needs a file path")
    if os.path.isdir(path):
        raise ConfigError(name, f"{path!r} is a directory; give a file path")
    parent = os.path.dirname(os.path.abspath(path))
    if not create_parent and not os.path.isdir(parent):
        what = "is a file, not a directory" if os.path.exists(parent) else "does not exist"
        raise ConfigError(
            name, f"directory {parent!r} {what}; create it or give a path in an existing directory"
        )
    try:
        check_writable_dir(parent, name)
    except ConfigError as e:
        raise ConfigError(
            name,
            f"cannot write {path!r}: {e.message.split('; ')[0]}; give a path in a writable "
            "directory",
        ) from None
    if os.path.exists(path):
        if not os.access(path, os.W_OK):
            raise ConfigError(name, f"{path!r} exists and is not writable; give another path")
        return
    try:  # the name itself (too long, a character the file system refuses): create it, remove it
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
        os.unlink(path)
    except OSError as e:
        raise ConfigError(
            name, f"cannot create {path!r}: {e.strerror}; give another path"
        ) from None


EXTRA_FLAG_NAMES = {"simulate_compute_ms": "simulate_compute"}
"""A second name for a flag: ``--simulate-compute MS`` sets ``cluster.simulate_compute_ms``."""


def cli_fields() -> dict[str, tuple[type, str, Any]]:
    """Flag name -> (type, help, default) for every leaf field."""
    docs = field_docs()
    out = {}
    defaults = TrainConfig()
    for flag, (sub, f) in _leaf_fields().items():
        if (sub, f.name) in PYTHON_API_ONLY:
            continue
        owner = SUBCONFIGS[sub] if sub else TrainConfig
        default = getattr(getattr(defaults, sub) if sub else defaults, f.name)
        out[flag] = (field_type(f, owner), docs.get(flag, ""), default)
    return out
