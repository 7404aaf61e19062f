"""What a run trains: the model, the loss, the data and the metrics -- the built-in ones or the
user's own.

A ``Task`` is built once on the driver (``Task.build``) from the config and
whatever the Python API was given, checked there with one forward pass and
one loss on two training samples (so a model whose output does not fit the
loss fails before any actor starts), and sent to every process that needs
it. Each piece travels by Ray's pickling: a module-level function or class
is sent by reference (its module must be importable on the workers: the
working directory locally, ``PYTHONPATH`` or a job's ``working_dir``); a
lambda or a closure defined in a script is sent by value.

Data never travels through a call: a *factory* (an import string, or a
zero-argument callable returning ``(train, eval)``) is called by each process
itself, so a dataset that reads its files lazily stays lazy; a Dataset object
given to the Python API is put into Ray's object store once and fetched by
every worker. Batches are the same pure function of ``(seed, epoch, rank,
step)`` as always: rank r owns ``perm[r::W]``.

A Ray Dataset (given to the Python API, or returned by a factory, which is
then called once, on the driver, once the run's Ray is up) is split there
into one equal part per rank in its row order; each worker reads only its
own part into memory and shuffles within it by the same pure function.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import importlib
import inspect
import json
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parameter import is_lazy
from torch.utils.data import Dataset, TensorDataset

from raytrain_ft.config import DataConfig, flag_of, parse_json
from raytrain_ft.data import (
    batch_of,
    check_ray_columns,
    checked_steps_per_epoch,
    is_ray_dataset,
    map_tensors,
    materialized,
    ray_dataset_tensors,
)
from raytrain_ft.errors import ConfigError, RaytrainFTError
from raytrain_ft.rng import seeded

BUILTIN_LOSSES = ("cross_entropy", "mse")

BATCH_CHECKED = 64
"""``Task.check`` also runs the model and loss on a batch of the workers' size, up to this many
samples."""


def is_import_string(text: str | None) -> bool:
    return bool(text) and ":" in text and not text.startswith(("topk:",))


def dataset_factory(spec: str) -> Callable:
    """``--dataset MODULE:ATTR``: the function making (train, eval), imported and checked callable
    (before Ray starts; calling it may need Ray)."""
    factory = resolve(spec, "data.dataset")
    if not callable(factory):
        raise ConfigError(
            "data.dataset",
            f"{spec!r} is not callable; give a zero-argument function returning (train, eval)",
        )
    return factory


def resolve(spec: str, flag: str) -> Any:
    """``MODULE:ATTR`` (ATTR may be dotted) -> the object; the working directory is importable, as
    for uvicorn."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(flag, f"{spec!r} is not MODULE:ATTR (e.g. mypackage.models:build)")
    if module_name.endswith(".py") or "/" in module_name or os.sep in module_name:
        name = os.path.splitext(os.path.basename(module_name))[0] or "mymodule"
        raise ConfigError(
            flag,
            f"{spec!r} names a file; give the module's import name ({name}:{attr}), run from the "
            "directory that holds it or add that directory to PYTHONPATH",
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(
            flag,
            f"cannot import module {module_name!r} of {spec!r} ({e}); run from the directory that "
            "holds it, or add it to "
            "PYTHONPATH",
        ) from None
    except Exception as e:  # noqa: BLE001 -- the user's module raised while it was imported
        raise ConfigError(
            flag, f"importing {module_name!r} raised {type(e).__name__}: {e}"
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(flag, f"module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def loss_spec(config, loss=None) -> tuple:
    """The run's loss and the setting that names it in messages: the Python API's ``loss=``
    (``loss``) where given, else the config's ``model.loss``."""
    return (loss, "loss") if loss is not None else (config.model.loss, "model.loss")


def loss_function(spec: str | Callable, flag: str = "model.loss") -> Callable:
    return _no_parameters(_loss_of(spec, flag), flag)


def _loss_of(spec: str | Callable, flag: str) -> Callable:
    if not isinstance(spec, str) and not callable(spec):
        raise ConfigError(
            flag,
            f"got {type(spec).__name__}; give a function (output, target) -> scalar tensor, an "
            "nn.Module loss, cross_entropy, mse or MODULE:ATTR",
        )
    if isinstance(spec, type):
        return _loss_instance(spec, flag)
    if callable(spec):
        return spec
    if spec == "cross_entropy":
        return F.cross_entropy
    if spec == "mse":
        return mse
    if is_import_string(spec):
        fn = resolve(spec, flag)
        if isinstance(fn, type):
            return _loss_instance(fn, flag)
        if not callable(fn):
            raise ConfigError(
                flag, f"{spec!r} is not callable; give a function (output, target) -> scalar tensor"
            )
        return fn
    raise ConfigError(flag, f"unknown loss {spec!r}; choose cross_entropy, mse, or MODULE:ATTR")


def _no_parameters(loss: Callable, flag: str) -> Callable:
    """``loss``, unless it is a module with trainable parameters: only the model's parameters
    live on the shards, so the loss's would never be trained."""
    if isinstance(loss, torch.nn.Module):
        names = [n for n, p in loss.named_parameters() if p.requires_grad]
        if names:
            raise ConfigError(
                flag,
                f"the loss module has trainable parameters ({', '.join(names[:4])}) that no "
                "update would train: only the model's parameters are trained; move them into the "
                "model (its forward can return what the loss needs), or freeze them "
                "(requires_grad=False)",
            )
    return loss


def _loss_instance(cls: type, flag: str) -> Callable:
    """A loss given as a class (``torch.nn:CrossEntropyLoss``): one made with no arguments."""
    if not issubclass(cls, torch.nn.Module):
        raise ConfigError(
            flag,
            f"{cls.__name__} is a class, not a loss; give a function (output, target) -> scalar "
            "tensor, or an nn.Module loss class that takes no arguments",
        )
    try:
        return cls()
    except Exception as e:  # noqa: BLE001 -- the user's class
        raise ConfigError(
            flag, f"making {cls.__name__}() raised {type(e).__name__}: {e}; give a function"
        ) from None


def is_cross_entropy(loss_fn: Callable) -> bool:
    """Whether ``loss_fn`` takes class logits against class indices (eval accuracy is reported)."""
    return loss_fn is F.cross_entropy or isinstance(loss_fn, torch.nn.CrossEntropyLoss)


def correct(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample hits (a bool tensor) of class logits [N, C] against class indices [N] or class
    probabilities [N, C] (one-hot or soft targets, which cross_entropy takes as well)."""
    if target.dim() == output.dim() and target.is_floating_point():
        target = target.argmax(1)
    return output.argmax(1) == target


def mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error, with a [N, 1] output taken against a [N] target."""
    if output.shape != target.shape:
        if output.numel() != target.numel():
            raise ValueError(
                f"output {list(output.shape)} and target {list(target.shape)} hold different "
                "numbers of values"
            )
        output = output.reshape(target.shape)
    return F.mse_loss(output, target.to(output.dtype))


@dataclass(frozen=True)
class DataSource:
    """Where a process gets the (train, eval) datasets: by calling ``factory``, or from Ray's object
    store (``ref``: Dataset objects the driver put there once; ``objects`` until Ray has
    started), or -- a Ray Dataset -- ``parts``: one equal part per rank, split on the driver
    (``ray_train`` until then), each read into memory only by its rank."""

    factory: Callable[[], tuple] | None = None
    ref: Any = None
    objects: tuple | None = None
    ray_train: Any = None
    parts: tuple | None = None
    data_config: Any = None
    """The DataConfig naming a Ray Dataset's columns."""

    def get(self) -> tuple[Dataset, Dataset | None]:
        if self.factory is not None:
            out = self.factory()
            return tuple(out) if isinstance(out, (tuple, list)) else (out, None)
        if self.objects is not None:
            return self.objects
        import ray

        return ray.get(self.ref)

    @property
    def presplit(self) -> bool:
        """Whether a rank's training data is its own part (``train_for``) rather than the whole
        set it takes ``perm[rank::W]`` of."""
        return self.parts is not None

    def train_for(self, rank: int) -> Dataset:
        """The training data worker ``rank`` reads its batches from."""
        if self.parts is not None:
            from raytrain_ft.data import part_tensors

            return part_tensors(self.parts[rank], self.data_config)
        return self.get()[0]


@dataclass(frozen=True)
class Task:
    """The model factory, loss, data and metrics of a run (picklable: it is sent to every
    worker)."""

    model: Callable[[], torch.nn.Module]
    loss: Callable
    data: DataSource
    metrics: Callable | None = None
    classification: bool = True
    """Whether the output is class logits [N, C] for integer targets (eval_accuracy is reported
    then)."""
    num_train: int = 0
    layout: tuple | None = None
    """The model's parameters and buffers (name, shape, dtype) as the driver built it: every process
    must build the same (``build_model`` compares)."""
    data_print: str | None = None
    """A dataset factory's training set as the driver got it (``data_print``): every process that
    calls the factory must get the same (``train_for`` compares)."""
    model_field: str = "model.name"
    """The setting messages about the model name: ``model`` where the Python API's ``model=`` gave
    it, else ``model.name`` (``--model``)."""
    loss_field: str = "model.loss"
    """Likewise for the loss: ``loss`` (the Python API's ``loss=``) or ``model.loss``."""

    def train_for(self, rank: int) -> Dataset:
        """The training data worker ``rank`` reads its batches from; a factory's must be the
        driver's (an unseeded shuffle or split gave every process another one, silently: ranks'
        partitions overlapped and the driver evaluated on samples the workers trained on)."""
        train = self.data.train_for(rank)
        if self.data_print is not None and data_print(train) != self.data_print:
            raise ConfigError(
                "data.dataset",
                f"the training set the dataset factory returned in this process ({len(train):,} "
                "samples) differs from the one it returned on the driver; the factory must return "
                "the same data in every process: seed its shuffle or split (random_state=0, a "
                "seeded generator), not from the time or an unseeded random",
            )
        return train

    def placed(self, num_workers: int) -> Task:
        """The task as the workers get it: Dataset objects of the Python API put into Ray's object
        store once; a Ray Dataset split into one part per rank."""
        if self.data.ray_train is not None:
            from raytrain_ft.data import split_ray_dataset

            parts = tuple(split_ray_dataset(self.data.ray_train, num_workers))
            return dataclasses.replace(
                self, data=DataSource(parts=parts, data_config=self.data.data_config)
            )
        if self.data.objects is None:
            return self
        import ray

        try:
            ref = ray.put(self.data.objects)
        except Exception as e:  # noqa: BLE001 -- named where it is a dataset Ray cannot pickle
            for name, part in zip(("train_data", "eval_data"), self.data.objects):
                check_sendable(name, part)
            raise e from None
        return dataclasses.replace(self, data=DataSource(ref=ref))

    def check_sendable(self) -> None:
        """The model factory, loss and metrics travel to the workers by Ray's pickling: one that
        cannot be pickled fails here, naming its field."""
        for field, obj in (
            (self.model_field, self.model),
            (self.loss_field, self.loss),
            ("metrics", self.metrics),
        ):
            check_sendable(field, obj)

    def build_model(self, seed: int) -> torch.nn.Module:
        """The model every copy starts from: built right after seeding, so every process gets the
        same values (torch's, NumPy's and Python's generators are seeded)."""
        with seeded(seed):
            model = self.model()
        if not isinstance(model, torch.nn.Module):
            raise ConfigError(
                self.model_field,
                f"the model factory returned {type(model).__name__}, not a torch.nn.Module",
            )
        mine, driver = (model_layout(model), self.layout) if self.layout is not None else ((), ())
        if mine != driver:
            first = next(
                (
                    f"{a[0]!r} {a[2]} {list(a[1])} here, {b[0]!r} {b[2]} {list(b[1])} on the driver"
                    if a[:3] != b[:3]
                    else f"{a[0]!r} holds other values here than on the driver"
                    for a, b in zip(mine, driver)
                    if a != b
                ),
                f"{len(mine)} parameters and buffers here, {len(driver)} on the driver",
            )
            raise ConfigError(
                self.model_field,
                f"the model built in this process differs from the driver's ({first}); the model "
                "factory must build the same model in every process (from its arguments and "
                "the generators it is given seeded (torch's, NumPy's, Python's random), not from "
                "the host, the time or a generator of its own)",
            )
        return model

    @classmethod
    def build(
        cls, config, model=None, loss=None, train_data=None, eval_data=None, metrics=None
    ) -> tuple[Task, Dataset, Dataset | None]:
        """(task, train, eval) from the config's names (built-in or ``MODULE:ATTR``) and the Python
        API's objects, which win; checked with one forward pass and one loss."""
        from raytrain_ft.data import load_dataset

        mc, dc = config.model, config.data
        for name, given in (("train_data", train_data), ("eval_data", eval_data)):
            wrong = None if given is None else _not_a_dataset(given, f"{name}=TensorDataset(x, y)")
            if wrong is not None:
                raise ConfigError(name, f"got {wrong[0]}; {wrong[1]}")
        refuse_overridden(config, model=model, loss=loss, train_data=train_data)
        if eval_data is not None and train_data is None:
            raise ConfigError(
                "eval_data",
                "given without train_data, it would be ignored (the config's dataset brings its "
                "own eval set); give train_data too",
            )
        num_train = None
        builtin = None  # the built-in data, when the config names them
        columns_used = False  # whether a Ray Dataset's columns are read (--x-columns, --y-column)
        if train_data is not None:
            columns_used = is_ray_dataset(train_data) or is_ray_dataset(eval_data)
            if is_ray_dataset(train_data):
                data, train, evaluation, num_train = _ray_data(train_data, eval_data, dc)
            else:
                data = DataSource(objects=(train_data, _eval_set(eval_data, dc)))
                train, evaluation = train_data, data.objects[1]
        elif is_import_string(dc.dataset):
            data = DataSource(factory=dataset_factory(dc.dataset))
            train, evaluation = _call_factory(data, "data.dataset", dc.dataset)
            columns_used = is_ray_dataset(train) or is_ray_dataset(evaluation)
            if is_ray_dataset(train):  # made once, here, and split: not made again per worker
                data, train, evaluation, num_train = _ray_data(train, evaluation, dc)
            else:
                evaluation = _eval_set(evaluation, dc)
        else:
            builtin = load_dataset(dc, config.seed)
            data = DataSource(factory=functools.partial(_builtin_data, dc, config.seed))
            train, evaluation = (
                TensorDataset(builtin.train_x, builtin.train_y),
                TensorDataset(builtin.eval_x, builtin.eval_y),
            )
        loss_named, loss_field = loss_spec(config, loss)
        model_field = "model" if model is not None else "model.name"
        fields = {"model_field": model_field, "loss_field": loss_field}
        model = model_builder(config, model, train_data)
        if model is None:  # a built-in model sized by the built-in data
            model = functools.partial(_builtin_model, mc, builtin.in_shape, builtin.num_classes)
        defaults = DataConfig()
        named = [
            (flag, value)
            for flag, value, default in (
                ("data.x_columns", dc.x_columns, defaults.x_columns),
                ("data.y_column", dc.y_column, defaults.y_column),
            )
            if value != default
        ]
        if named and not columns_used:
            flag, value = named[0]
            raise ConfigError(
                flag,
                f"{value!r} names a Ray Dataset's column, but the data is no Ray Dataset, so it "
                f"would be ignored; drop {flag_of(flag)}",
            )
        loss_fn = loss_function(loss_named, loss_field)
        if metrics is not None and not callable(metrics):
            raise ConfigError(
                "metrics",
                f"got {type(metrics).__name__}; give a function (output, target) -> dict[str, "
                "float]",
            )
        # the user's data is named as given: the Python API's objects, or the dataset factory
        api = train_data is not None
        train_field, eval_field = ("train_data", "eval_data") if api else ("data.dataset",) * 2
        if evaluation is not None and builtin is None and len(evaluation) == 0:
            # given, but it would evaluate nothing: the summary's eval loss would be NaN
            raise ConfigError(
                eval_field,
                "the eval set holds 0 samples, so nothing would be evaluated (the run's eval_loss "
                "would be NaN); give it samples, or give no eval set",
            )
        if builtin is None:  # a NaN trains to a NaN loss, which the run could only call divergence
            for which, ds, field in (
                ("training", train, train_field),
                ("eval", evaluation, eval_field),
            ):
                where = _not_finite_at(ds)
                if where is not None:
                    raise ConfigError(
                        field,
                        f"the {which} set's {where} holds a NaN or infinite value; give finite "
                        "numbers (drop or fill such samples)",
                    )
        if evaluation is None or len(evaluation) == 0:  # nothing would be evaluated
            ignored = [("metrics", metrics is not None), ("eval_every_s", config.eval_every_s > 0)]
            for field, given in ignored:
                if given:
                    raise ConfigError(
                        field,
                        "given, but the run has no eval set to evaluate, so it would be ignored; "
                        "give eval data (eval_data=, or a dataset factory returning (train, eval))",
                    )
        task = cls(
            model,
            loss_fn,
            data,
            metrics,
            classification=is_cross_entropy(loss_fn),
            num_train=len(train) if num_train is None else num_train,
            **fields,
        )
        # the built-in data are split here: too few training samples is --eval-fraction's doing
        split = builtin is not None and dc.eval_fraction
        if split and not (config.cluster.simulate_compute_ms and config.steps is not None):
            checked_steps_per_epoch(
                len(train),
                config.cluster.num_workers,
                dc.batch_size,
                (dc.eval_fraction, len(train) + len(evaluation)),
            )
        layout = task.check(
            train,
            config.seed,
            held_out=split or None,
            evaluation=evaluation,
            batch_size=dc.batch_size,
            fields=(train_field, eval_field),
        )
        task.check_sendable()
        made_here = data.factory is not None  # every worker calls the factory again
        return (
            dataclasses.replace(
                task, layout=layout, data_print=data_print(train) if made_here else None
            ),
            train,
            evaluation,
        )

    def check(
        self,
        train: Dataset,
        seed: int,
        held_out: float | None = None,
        evaluation: Dataset | None = None,
        batch_size: int = 2,
        fields: tuple[str, str] = ("data.dataset", "data.dataset"),
    ) -> tuple:
        """One forward, loss and gradient on two training samples (and a forward on one where each
        worker's batch is one sample), and an evaluation of two eval samples: a model, loss,
        metrics or dataset that do not fit each other fails here, on the driver, with the flag to
        fix, not after training. Returns the model's layout (``model_layout``)."""
        if len(train) < 2:
            field, why = fields[0], ""
            if held_out:
                field, why = "data.eval_fraction", f" after --eval-fraction {held_out} held out"
            raise ConfigError(
                field, f"the training set has {len(train)} samples{why}; it needs at least 2"
            )
        first = None if isinstance(train, TensorDataset) else _first_sample(train)
        if isinstance(train, TensorDataset) and len(train.tensors) < 2:
            first = train[0][0]
        if isinstance(first, (torch.Tensor, np.ndarray)):  # it would unpack into rows
            raise ConfigError(
                fields[0],
                f"a sample is one {'tensor' if isinstance(first, torch.Tensor) else 'array'} "
                f"({describe(first)}), not an (x, y) pair; "
                "return (x, y) from the dataset's __getitem__, or give TensorDataset(x, y)",
            )
        if isinstance(first, collections.abc.Mapping):  # it would unpack into its keys
            raise ConfigError(
                fields[0],
                f"a sample is a {type(first).__name__} (keys {', '.join(map(repr, first))}); a "
                "sample must be an (x, y) pair: return e.g. (sample['x'], sample['y']) from the "
                "dataset's __getitem__ (x itself may be a dict of tensors)",
            )
        try:
            x, y = batch_of(train, [0, 1])
        except Exception as e:  # noqa: BLE001 -- the user's dataset raised
            raise ConfigError(
                fields[0],
                f"reading samples 0 and 1 raised {type(e).__name__}: {e}; a sample must be an (x, "
                "y) pair",
            ) from None
        try:
            model = self.build_model(seed)
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001
            raise ConfigError(
                self.model_field, f"building the model raised {type(e).__name__}: {e}"
            ) from None
        if any(is_lazy(t) for t in [*model.parameters(), *model.buffers()]):
            raise ConfigError(
                self.model_field,
                "the model has lazy modules (nn.LazyLinear, nn.LazyConv2d, ...): their parameters "
                "exist only after a first forward, and every process must start from the same "
                "values; give their input sizes (nn.Linear, nn.Conv2d)",
            )
        if not any(p.requires_grad for p in model.parameters()):
            empty = not list(model.parameters()) and not list(model.buffers())
            what = "parameters or buffers" if empty else "trainable parameters"
            raise ConfigError(self.model_field, f"the model has no {what} to train")
        layout = model_layout(model)
        other = [
            (name, t.dtype)
            for name, t in [*model.named_parameters(), *model.named_buffers()]
            if (t.is_floating_point() or t.is_complex()) and t.dtype != torch.float32
        ]
        if other:
            name, dtype = other[0]
            raise ConfigError(
                self.model_field,
                f"{len(other)} of the model's parameters and buffers are not float32 ({name!r} is "
                f"{dtype}); the servers keep and update float32 values: build the model in "
                "float32 and give --precision bf16 or fp16 for lower-precision compute",
            )
        for name, b in model.named_buffers():
            if b.dtype == torch.bool or b.is_floating_point() or not b.numel():
                continue
            largest = int(b.abs().max())
            if largest > 2**24:
                raise ConfigError(
                    self.model_field,
                    f"the buffer {name!r} holds integers beyond 2**24 ({largest}), "
                    "which the float32 values the shards keep cannot carry exactly; keep such "
                    "constants in a plain attribute, not a buffer",
                )
        try:
            out = model(x)
        except Exception as e:  # noqa: BLE001
            doubles: list[str] = []
            map_tensors(x, lambda t: t.dtype == torch.float64 and doubles.append(describe(t)))
            if doubles:
                raise ConfigError(
                    fields[0],
                    f"the samples are float64 ({doubles[0]}) and the model float32 "
                    f"({type(e).__name__}: {e}); give float32 samples (.float(), "
                    "np.float32)",
                ) from None
            raise ConfigError(
                self.model_field,
                f"the model cannot take a batch of the dataset ({describe(x)}): "
                f"{type(e).__name__}: {e}",
            ) from None
        if (
            self.classification
            and isinstance(out, torch.Tensor)
            and out.dim() == 2
            and out.shape[1] == 1
        ):  # every sample "of class 0", loss 0
            raise ConfigError(
                self.loss_field,
                f"cross_entropy needs a logit per class (2 or more), the model gives one value "
                f"per sample ({describe(out)}); give the model's last layer one output per class, "
                "or use --loss mse for a regression",
            )
        try:
            with warnings.catch_warnings(record=True) as said:
                warnings.simplefilter("always")
                value = self.loss(out, y)
        except Exception as e:  # noqa: BLE001
            raise ConfigError(
                self.loss_field,
                f"the loss cannot take the model's output {describe(out)} and the targets "
                f"{describe(y)}: "
                f"{type(e).__name__}: {e}",
            ) from None
        broadcast = [w for w in said if "broadcast" in str(w.message)]
        if broadcast:  # torch's own word that the values would be wrong
            raise ConfigError(
                self.loss_field,
                f"the model's output {describe(out)} and the targets {describe(y)} differ in "
                f"shape, so the loss would compare broadcast values ({broadcast[0].message}); "
                "make the model's output the targets' shape (e.g. .squeeze(-1)) or the targets "
                "the output's",
            )
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise ConfigError(
                self.loss_field, f"the loss must return a scalar tensor, got {describe(value)}"
            )
        if self.classification and (not isinstance(out, torch.Tensor) or out.dim() != 2):
            raise ConfigError(
                self.loss_field,
                f"cross_entropy needs class logits [N, C], the model gives {describe(out)}; use "
                "--loss mse or your own",
            )
        if not value.requires_grad:
            raise ConfigError(
                self.loss_field,
                "the loss has no gradient to train on (computed from .item(), from a detached "
                "tensor, or under torch.no_grad)",
            )
        if not bool(torch.isfinite(value.detach())):
            raise ConfigError(
                self.loss_field,
                f"the loss of the model's output on training samples 0-1 is {value.item()} at the "
                "initial parameters: its gradient would turn every parameter into nan; check the "
                "loss function and the samples (nan or inf values)",
            )
        n = min(batch_size, len(train), BATCH_CHECKED)
        if n != 2:  # shapes can fit at 2 samples only (an output [2, 2] against targets [2])
            try:
                xn, yn = batch_of(train, list(range(n)))
                with torch.no_grad():  # shapes only: no graph of a whole batch kept
                    self.loss(model(xn), yn)
            except Exception as e:  # noqa: BLE001 -- the user's model or loss
                if n == 1:
                    raise ConfigError(
                        "data.batch_size",
                        "the model and loss take a batch of 2 samples but not the batch of 1 "
                        f"sample each worker trains on ({type(e).__name__}: "
                        f"{str(e).strip()[:200]}); give --batch-size 2 or more",
                    ) from None
                raise ConfigError(
                    self.loss_field,
                    f"the model and loss take samples 0-1 but not a batch of samples 0-{n - 1} "
                    f"(each worker's batch is {batch_size}): {type(e).__name__}: "
                    f"{str(e).strip()[:200]}",
                ) from None
        if evaluation is not None and len(evaluation) > 0:
            first = torch.utils.data.Subset(evaluation, list(range(min(2, len(evaluation)))))
            try:
                evaluate(self, model, first)
            except ConfigError as e:  # the user's eval set, model, loss or metrics
                if e.field == "metrics":
                    raise
                raise ConfigError(
                    fields[1],
                    f"the eval set does not fit the model and loss ({e.message}); the training "
                    "set does",
                ) from None
        return layout


_BUILTIN_DATA_FIELDS = (
    "dataset",
    "data_path",
    "image_size",
    "eval_fraction",
    "synthetic_samples",
    "synthetic_channels",
    "image_column",
    "label_column",
    "image_shape",
)
"""DataConfig fields only the config's own dataset reads (the Python API's train_data wins)."""


def refuse_overridden(config, **given) -> None:
    """ConfigError for a config setting the Python API's ``model=``, ``loss=`` or ``train_data=``
    would make ignored (a setting counts where it differs from its default)."""
    from raytrain_ft.config import ModelConfig

    overridden = {
        "train_data": [(f"data.{f}", f, config.data, DataConfig()) for f in _BUILTIN_DATA_FIELDS],
        "model": [
            (f"model.{f}", f, config.model, ModelConfig()) for f in ("name", "small_input_stem")
        ],
        "loss": [("model.loss", "loss", config.model, ModelConfig())],
    }
    for arg, fields in overridden.items():
        if given.get(arg) is None:
            continue
        for field, name, section, default in fields:
            value = getattr(section, name)
            if value != getattr(default, name):
                raise ConfigError(
                    field,
                    f"{value!r} would be ignored: the {arg}= given to the Trainer takes its place; "
                    f"drop one of them",
                )


def data_print(ds: Dataset) -> str:
    """A fingerprint of a dataset: its length and up to 8 samples spread over it (read with the
    generators seeded)."""
    import hashlib

    import numpy as np

    n = len(ds)
    h = hashlib.sha256(str(n).encode())
    if n:
        indices = sorted({int(i) for i in np.linspace(0, n - 1, num=min(n, 8))})
        with seeded(0):  # samples a dataset draws (augmentation) draw alike in every process
            batch = batch_of(ds, indices)
        for part in batch:
            map_tensors(part, lambda t: h.update(t.detach().cpu().float().numpy().tobytes()))
    return h.hexdigest()


def model_layout(model: torch.nn.Module) -> tuple:
    """(name, shape, dtype, digest of the values) of every parameter and buffer, in order."""
    return tuple(
        (name, tuple(t.shape), str(t.dtype).removeprefix("torch."), _digest(t))
        for name, t in [*model.named_parameters(), *model.named_buffers()]
    )


def _digest(t: torch.Tensor) -> str:
    """A hash of a tensor's bytes: copies that hold other values differ."""
    import hashlib

    raw = t.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy()
    return hashlib.blake2b(raw, digest_size=8).hexdigest()


def describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} {list(x.shape)}"
    if isinstance(x, np.ndarray):
        return f"{x.dtype} {list(x.shape)}"
    if isinstance(x, dict):
        return "{" + ", ".join(f"{k}: {describe(v)}" for k, v in x.items()) + "}"
    return type(x).__name__


_PROTOCOL_CODE = tuple(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), d) + os.sep
    for d in ("actors", "protocol")
)


def _raised_by_the_protocol(error: BaseException, tb) -> bool:
    """Whether ``error`` came out of the project's own hooks (the shard installs forward runs, the
    pushes backward runs) or Ray, rather than the user's model or loss; ``tb`` starts at the frame
    that called them."""
    if isinstance(error, RaytrainFTError) or type(error).__module__.split(".")[0] == "ray":
        return True
    tb = tb.tb_next if tb is not None else None
    while tb is not None:
        if os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_PROTOCOL_CODE):
            return True
        tb = tb.tb_next
    return False


class user_code:  # noqa: N801 -- used as a context manager
    """Run the user's model or loss (``doing()`` says what, for the message, built only on a
    failure): what it raises becomes one ConfigError line naming ``field``, the original chained
    for the log; what the project's own hooks or Ray raise passes through."""

    __slots__ = ("field", "doing")

    def __init__(self, field: str, doing: Callable[[], str]):
        self.field, self.doing = field, doing

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, tb) -> bool:
        if error is None or not isinstance(error, Exception):
            return False
        if _raised_by_the_protocol(error, tb):
            return False
        raise ConfigError(self.field, f"{self.doing()} raised {_said(error)}") from error


def to_device(x, device):
    return map_tensors(x, lambda t: t.to(device, non_blocking=True))


@torch.no_grad()
def evaluate(
    task: Task, model: torch.nn.Module, dataset: Dataset | None, batch_size: int = 512
) -> dict[str, float]:
    """eval_loss (mean over samples), eval_accuracy where the task is classification, and the user's
    metrics (each a mean over samples of the per-batch values, weighted by batch size)."""
    if dataset is None or len(dataset) == 0:
        return {}
    model.eval()
    n = len(dataset)
    totals: dict[str, float] = {}
    for start in range(0, n, batch_size):
        idx = list(range(start, min(n, start + batch_size)))
        k = len(idx)
        where = f"eval samples {idx[0]}-{idx[-1]}"
        try:
            x, y = batch_of(dataset, idx)
            out = model(x)
            totals["eval_loss"] = totals.get("eval_loss", 0.0) + float(task.loss(out, y)) * k
            if task.classification:
                totals["eval_accuracy"] = totals.get("eval_accuracy", 0.0) + float(
                    correct(out, y).sum()
                )
        except Exception as e:  # noqa: BLE001 -- the user's eval set, model or loss
            raise ConfigError("data.dataset", f"{where}: {_said(e)}") from e
        if task.metrics is not None:
            for name, value in _metrics_of(task.metrics, out, y, where).items():
                totals[name] = totals.get(name, 0.0) + value * k
    return {name: value / n for name, value in totals.items()}


def _said(e: BaseException) -> str:
    """An exception as one line: its type and its message's first line."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300]}" if lines else type(e).__name__


def _metrics_of(metrics: Callable, out, y, where: str) -> dict[str, float]:
    """The user's metrics of one eval batch as floats; ConfigError (field ``metrics``) for a
    function that raises, returns no mapping of numbers, or names a value the run reports itself."""
    try:
        values = metrics(out, y)
        if not isinstance(values, dict):
            raise TypeError(f"it returned {type(values).__name__}, not a dict[str, float]")
        taken = sorted(set(values) & {"eval_loss", "eval_accuracy"})
        if taken:
            raise ValueError(
                f"it names {', '.join(taken)}, which the run reports itself; name yours otherwise"
            )
        return {str(name): float(value) for name, value in values.items()}
    except Exception as e:  # noqa: BLE001 -- the user's function
        raise ConfigError("metrics", f"{where}: {_said(e)}") from None


def check_sendable(field: str, obj) -> None:
    """One line naming ``field`` where Ray cannot pickle ``obj`` to send it to the workers."""
    if obj is None:
        return
    from ray import cloudpickle

    try:
        cloudpickle.dumps(obj)
    except Exception as e:  # noqa: BLE001 -- whatever pickling raises
        raise ConfigError(
            field,
            f"cannot be sent to the workers: pickling it raised {type(e).__name__}: "
            f"{str(e).strip()[:200]}; keep locks, open files, sockets and threads out of what it "
            "holds or refers to (create them inside the factory or __getitem__), or name an "
            "importable MODULE:ATTR",
        ) from None


def _first_sample(ds):
    """The dataset's sample 0, or None when reading it raised (the check that reads two samples
    names that)."""
    try:
        return ds[0]
    except Exception:  # noqa: BLE001 -- the user's dataset
        return None


def _eval_set(evaluation, dc):
    """The eval set as the driver evaluates it: a Ray Dataset is read into memory here."""
    if evaluation is not None and is_ray_dataset(evaluation):
        check_ray_columns(evaluation, dc, "eval")
        return ray_dataset_tensors(evaluation, dc)
    return evaluation


def _ray_data(train, evaluation, dc) -> tuple[DataSource, Dataset, Dataset | None, int]:
    """A Ray Dataset as training data: its columns checked, executed once into the object store, two
    rows read for the driver's check, its rows counted (the steps per epoch); split per rank once
    Ray runs the job (``Task.placed``)."""
    check_ray_columns(train, dc, "training")
    train = materialized(train)
    sample = ray_dataset_tensors(train.limit(2), dc)
    return (
        DataSource(ray_train=train, data_config=dc),
        sample,
        _eval_set(evaluation, dc),
        train.count(),
    )


def _call_factory(data: DataSource, flag: str, spec: str) -> tuple:
    try:
        train, evaluation = data.get()
    except ValueError as e:
        raise ConfigError(flag, f"{spec!r} must return (train, eval) datasets: {e}") from None
    except Exception as e:  # noqa: BLE001 -- the user's factory raised
        raise ConfigError(flag, f"{spec!r} raised {type(e).__name__}: {e}") from None
    for which, given in (("training set", train), ("eval set", evaluation)):
        wrong = None if given is None else _not_a_dataset(given, "return TensorDataset(x, y)")
        if wrong is not None:
            raise ConfigError(flag, f"{spec!r} returned {wrong[0]} as the {which}; {wrong[1]}")
    return train, evaluation


def model_builder(config, model=None, train_data=None) -> Callable | None:
    """What builds the run's model -- the Python API's ``model`` or ``model.name``'s
    ``MODULE:ATTR``, with ``model.kwargs`` bound -- checked without the data (a built model, a
    missing module, arguments its signature refuses); None for a built-in model, which the
    built-in data size (refused with the user's own data). ``Task.build`` calls it, and so does a
    run whose dataset factory runs only in its Ray session, before that session starts."""
    mc, dc = config.model, config.data
    if isinstance(model, torch.nn.Module):
        kind = type(model)
        spelled = ("nn." if kind.__module__.startswith("torch.nn.") else "") + kind.__name__
        # the class itself where it builds with no argument; nn.Sequential takes its layers
        ways = f"model=lambda: {spelled}(...)"
        if _refused_call(kind, {}) is None:
            ways = f"model={spelled} or {ways}"
        raise ConfigError(
            "model",
            f"got a built {spelled}; give what builds it, a zero-argument function or class "
            f"({ways}): every process builds its own copy, from the seed",
        )
    if model is not None and not callable(model):
        raise ConfigError(
            "model",
            f"got {type(model).__name__}; give a zero-argument function or class returning an "
            "nn.Module (a name or MODULE:ATTR goes in ModelConfig(name=...))",
        )
    if model is None and is_import_string(mc.name):
        model = resolve(mc.name, "model.name")
        if isinstance(model, torch.nn.Module):
            raise ConfigError(
                "model.name",
                f"{mc.name!r} is a built {type(model).__name__}; name what builds it, a "
                "zero-argument function or class (every process builds its own copy, from the "
                "seed)",
            )
        if not callable(model):
            raise ConfigError(
                "model.name",
                f"{mc.name!r} is not callable; give a zero-argument function or class "
                "returning an nn.Module",
            )
    if model is not None and mc.kwargs:
        kwargs = parse_json(mc.kwargs, "model.kwargs")
        if not isinstance(kwargs, dict):
            raise ConfigError("model.kwargs", "must be a JSON object of keyword arguments")
        refused = _refused_call(model, kwargs)
        if refused is not None:  # a misspelt or missing argument: named before anything runs
            raise ConfigError(
                "model.kwargs",
                f"{mc.name} cannot be called with {json.dumps(kwargs)}: {refused}",
            )
        model = functools.partial(model, **kwargs)
    if model is None:  # a built-in model sized by the built-in data
        if train_data is not None or is_import_string(dc.dataset):
            raise ConfigError(
                "model.name",
                f"the built-in {mc.name!r} is sized for the built-in datasets; give your own "
                "model with your data",
            )
    return model


def _refused_call(builder, kwargs: dict) -> str | None:
    """Why ``builder(**kwargs)`` does not fit the builder's signature ("missing a required argument:
    'width'; its signature is (width: int, depth: int = 1)"); None where it fits, or where the
    builder has no readable signature (it is left to fail when called)."""
    try:
        signature = inspect.signature(builder)
    except (TypeError, ValueError):  # no signature to read
        return None
    try:
        signature.bind(**kwargs)
    except TypeError as e:
        return f"{e}; its signature is {signature}"
    return None


def _not_finite_at(ds) -> str | None:
    """Where a TensorDataset (data held in memory, checked whole at no cost worth naming) holds a
    NaN or an infinity first ("sample 3's x"); None where it holds none, or is another kind of
    dataset (read sample by sample, not checked here)."""
    if not isinstance(ds, TensorDataset):
        return None
    for i, t in enumerate(ds.tensors):
        if t.is_floating_point() and t.numel():
            bad = ~torch.isfinite(t.reshape(len(t), -1)).all(dim=1)
            if bool(bad.any()):
                part = ("x", "y")[i] if len(ds.tensors) == 2 else f"tensor {i}"
                return f"sample {int(bad.nonzero()[0])}'s {part}"
    return None


def _not_a_dataset(given, fix: str) -> tuple[str, str] | None:
    """(what ``given`` is, what to give instead) where it cannot be a dataset of (x, y) samples;
    None where it may be one. ``fix`` shows a TensorDataset built from tensors."""
    if is_ray_dataset(given):
        return None
    if isinstance(given, (torch.Tensor, np.ndarray)):  # its rows would be read as samples
        return (
            f"{'a tensor' if isinstance(given, torch.Tensor) else 'a NumPy array'} "
            f"({describe(given)})",
            f"give a Dataset of (x, y) samples: {fix}",
        )
    if isinstance(given, (tuple, list)) and any(
        isinstance(t, (torch.Tensor, np.ndarray)) and t.ndim > 0 for t in given
    ):  # read as a dataset of len(given) samples, each a whole array
        kind = "tensors" if all(isinstance(t, torch.Tensor) for t in given) else "arrays"
        return (
            f"a {type(given).__name__} of {len(given)} {kind}",
            f"give a Dataset of (x, y) samples: {fix}",
        )
    if not hasattr(given, "__len__") or not hasattr(given, "__getitem__"):
        return (
            type(given).__name__,
            "give a map-style torch Dataset of (x, y) pairs, or a ray.data.Dataset",
        )
    return None


def _builtin_data(dc, seed: int) -> tuple[TensorDataset, TensorDataset]:
    from raytrain_ft.data import load_dataset

    d = load_dataset(dc, seed)
    return TensorDataset(d.train_x, d.train_y), TensorDataset(d.eval_x, d.eval_y)


def _builtin_model(mc, in_shape: tuple, num_classes: int) -> torch.nn.Module:
    from raytrain_ft.models import build_model

    return build_model(mc, in_shape, num_classes)
