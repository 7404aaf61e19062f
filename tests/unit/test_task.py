"""Your own model, loss and data: resolved and checked on the driver before anything starts (no
Ray)."""

import re

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from raytrain_ft.config import DataConfig, ModelConfig, TrainConfig
from raytrain_ft.errors import ClusterError, ConfigError
from raytrain_ft.params import FlatModel, flatten_state, load_flat_state
from raytrain_ft.task import Task, batch_of, model_layout, resolve


def linear():
    return nn.Linear(4, 3)


def regressor():
    return nn.Linear(4, 1)


def data(n=16):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(
        torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)
    ), None


def raising_data():
    raise RuntimeError("no such bucket")


def cfg(**model):
    return TrainConfig(
        model=ModelConfig(**model), data=DataConfig(dataset="tests.unit.test_task:data")
    )


def api_cfg(**model):
    """A config for the Python API's own data (train_data=): it names no dataset."""
    return TrainConfig(model=ModelConfig(**model))


def sized(width: int, depth: int = 1):
    return nn.Sequential(*[nn.Linear(4, width)] + [nn.Linear(width, width)] * (depth - 1))


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ('{"width": 3, "detph": 2}', "unexpected keyword argument 'detph'"),
        ('{"depth": 2}', "missing a required argument: 'width'"),
    ],
)
def test_model_kwargs_the_builder_cannot_take_name_the_kwargs(kwargs, needle):
    """A misspelt or missing argument is --model-kwargs' fault, not the model's: named so, with
    the builder's signature (it read "model.name: building the model raised TypeError")."""
    with pytest.raises(ConfigError) as e:
        Task.build(cfg(name="tests.unit.test_task:sized", kwargs=kwargs))
    assert e.value.field == "model.kwargs", str(e.value)
    assert needle in str(e.value) and "(width: int, depth: int = 1)" in str(e.value), str(e.value)


def test_an_import_string_names_a_factory_and_its_kwargs_are_applied():
    config = cfg(name="torch.nn:Linear", kwargs='{"in_features": 4, "out_features": 3}')
    task, train, _ = Task.build(config)
    model = task.build_model(seed=config.seed)
    assert isinstance(model, nn.Linear) and model.out_features == 3 and len(train) == 16
    assert torch.equal(
        task.build_model(seed=config.seed).weight, model.weight
    )  # seeded: every copy starts the same


@pytest.mark.parametrize(
    "spec, field, needle",
    [
        ("nosuchmodule_xyz:f", "model.name", "cannot import module 'nosuchmodule_xyz'"),
        ("torch.nn:NoSuchThing", "model.name", "has no attribute 'NoSuchThing'"),
        (":f", "model.name", "is not MODULE:ATTR"),
        ("torch:pi", "model.name", "is not callable"),
    ],
)
def test_bad_model_import_strings_name_the_flag(spec, field, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        Task.build(cfg(name=spec))
    assert e.value.field == field


def test_a_dataset_factory_that_raises_names_the_flag():
    c = TrainConfig(
        model=ModelConfig(name="tests.unit.test_task:linear"),
        data=DataConfig(dataset="tests.unit.test_task:raising_data"),
    )
    with pytest.raises(ConfigError, match="raised RuntimeError: no such bucket") as e:
        Task.build(c)
    assert e.value.field == "data.dataset"


def test_a_model_whose_output_does_not_fit_the_loss_fails_before_training():
    with pytest.raises(
        ConfigError, match="cross_entropy needs class logits|cannot take the model's output"
    ) as e:
        Task.build(
            TrainConfig(
                model=ModelConfig(name="tests.unit.test_task:linear", loss="mse"),
                data=DataConfig(dataset="tests.unit.test_task:data"),
            )
        )
    assert e.value.field == "model.loss"
    with pytest.raises(ConfigError, match="must return a scalar tensor"):
        Task.build(cfg(name="tests.unit.test_task:linear"), loss=lambda out, y: out)
    # one output per sample against class targets: cross_entropy would take it while the first
    # samples are all of class 0, and then fail on a later batch blaming the batch
    with pytest.raises(ConfigError, match=r"cross_entropy needs a logit per class") as e:
        Task.build(cfg(name="tests.unit.test_task:regressor"))
    assert e.value.field == "model.loss" and "use model.loss='mse' for a regression" in str(e.value)


def test_a_loss_without_a_gradient_fails_before_training():
    def detached(out, y):
        return torch.tensor(nn.functional.cross_entropy(out, y).item())

    with pytest.raises(ConfigError, match="the loss has no gradient to train on") as e:
        Task.build(cfg(name="tests.unit.test_task:linear"), loss=detached)
    assert e.value.field == "loss"  # the Python API's loss= gave it


def lazy():
    return nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.Linear(8, 3))


def test_a_model_with_lazy_modules_is_refused_before_training():
    with pytest.raises(ConfigError, match="lazy modules") as e:
        Task.build(cfg(name="tests.unit.test_task:lazy"))
    assert e.value.field == "model.name"


def frozen():
    model = linear()
    model.requires_grad_(False)
    return model


def test_a_model_with_nothing_to_train_is_named_not_its_loss():
    with pytest.raises(ConfigError, match="the model has no trainable parameters to train") as e:
        Task.build(cfg(name="tests.unit.test_task:frozen"))
    assert e.value.field == "model.name"


def test_a_loss_given_as_a_class_or_an_instance_is_made_and_reports_accuracy():
    for loss in ("torch.nn:CrossEntropyLoss", nn.CrossEntropyLoss, nn.CrossEntropyLoss()):
        if isinstance(loss, str):
            task, _, _ = Task.build(cfg(name="tests.unit.test_task:linear", loss=loss))
        else:
            task, _, _ = Task.build(cfg(name="tests.unit.test_task:linear"), loss=loss)
        assert isinstance(task.loss, nn.CrossEntropyLoss) and task.classification
    with pytest.raises(ConfigError, match="is a class, not a loss") as e:
        Task.build(cfg(name="tests.unit.test_task:linear"), loss=dict)
    assert e.value.field == "loss"


def wide_eval_data():
    train, _ = data()
    return train, TensorDataset(torch.randn(8, 5), torch.randint(0, 3, (8,)))


def test_an_eval_set_that_does_not_fit_the_model_fails_before_training():
    c = TrainConfig(
        model=ModelConfig(name="tests.unit.test_task:linear"),
        data=DataConfig(dataset="tests.unit.test_task:wide_eval_data"),
    )
    with pytest.raises(ConfigError, match="the eval set does not fit the model") as e:
        Task.build(c)
    assert e.value.field == "data.dataset" and "mat1 and mat2" in str(e.value)
    for metrics, said in (
        (lambda out, y: 1.0, "it returned float, not a dict"),
        # a name the run reports itself would be added into it
        (lambda out, y: {"eval_accuracy": 0.5}, "it names eval_accuracy, which the run reports"),
    ):
        with pytest.raises(ConfigError, match=f"eval samples 0-1: .*{said}") as e:
            Task.build(
                api_cfg(name="tests.unit.test_task:linear"),
                train_data=data()[0],
                eval_data=data()[0],
                metrics=metrics,
            )
        assert e.value.field == "metrics"


def test_an_eval_set_failing_beyond_its_first_samples_names_them():
    """evaluate (after training, and every --eval-every-s) names the eval samples whose batch
    raised: the driver then keeps the training result and reports this line."""
    from raytrain_ft.task import evaluate

    x, y = torch.randn(700, 4), torch.randint(0, 3, (700,))
    y[600] = 7  # out of range, in the second batch of 512
    task, _, _ = Task.build(api_cfg(name="tests.unit.test_task:linear"), train_data=data()[0])
    with pytest.raises(ConfigError) as e:
        evaluate(task, task.build_model(0), TensorDataset(x, y))
    assert e.value.field == "data.dataset"
    assert str(e.value).startswith("data.dataset: eval samples 512-699: IndexError: Target 7")


def test_builtin_models_are_for_builtin_data():
    with pytest.raises(ConfigError, match="sized for the built-in datasets") as e:
        Task.build(
            TrainConfig(
                model=ModelConfig(name="cnn"), data=DataConfig(dataset="tests.unit.test_task:data")
            )
        )
    assert e.value.field == "model.name"


def test_python_api_objects_win_and_are_checked():
    train, _ = data()
    task, _, _ = Task.build(TrainConfig(), model=linear, train_data=train)
    assert task.data.objects[0] is train and task.classification
    with pytest.raises(ConfigError, match="map-style torch Dataset") as e:
        Task.build(TrainConfig(), model=linear, train_data=[1, 2, 3][0])
    assert e.value.field == "train_data"


def test_dict_inputs_batch_with_the_default_collate():
    class Dicts(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return {"a": torch.full((2,), float(i)), "b": torch.tensor(i)}, i % 2

    x, y = batch_of(Dicts(), [3, 1])
    assert x["a"].shape == (2, 2) and x["b"].tolist() == [3, 1] and y.tolist() == [1, 1]


class Odd(nn.Module):
    """A frozen parameter, an integer buffer, a float buffer and a parameter the forward never
    uses."""

    def __init__(self):
        super().__init__()
        self.used = nn.Linear(4, 3)
        self.frozen = nn.Parameter(torch.ones(3), requires_grad=False)
        self.unused = nn.Parameter(torch.zeros(5))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("scale", torch.ones(3))

    def forward(self, x):
        self.calls += 1
        return self.used(x) * self.frozen * self.scale


def test_frozen_parameters_stay_out_of_the_flat_vector_integer_buffers_travel_as_floats():
    m = Odd()
    flat = flatten_state(m)
    assert (
        flat.numel() == 4 * 3 + 3 + 5 + 3 + 1
    )  # used weight and bias, unused, the float buffer, calls; not frozen
    flat_model = FlatModel(Odd())
    assert flat_model.numel == flat.numel() and all(p.requires_grad for p in flat_model.params)
    out = flat_model.module(torch.randn(2, 4)).sum()
    out.backward()
    unused = next(i for i, p in enumerate(flat_model.params) if p.numel() == 5)
    a, b = flat_model.spans[unused]
    assert (
        flat_model.flat_grad[a:b].abs().sum() == 0 and flat_model.flat_grad.abs().sum() > 0
    )  # unused: a zero gradient
    assert int(flat_model.module.calls) == 1
    flat_model.stage_buffers()  # the integer buffer's value rides in the gradient slot, as a float
    assert flat_model.flat_grad[-1] == 1.0
    flat_model.flat[-1] = 7.0  # parameters installed from the shards
    flat_model.sync_int_buffers()
    assert int(flat_model.module.calls) == 7 and flat_model.module.calls.dtype == torch.long
    load_flat_state(m, flat + 1)
    assert (
        torch.equal(m.frozen, torch.ones(3))
        and int(m.calls) == 1
        and torch.equal(m.scale, torch.full((3,), 2.0))
    )


def test_resolve_finds_modules_in_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "my_model_mod.py").write_text("def build():\n    return 7\n")
    monkeypatch.chdir(tmp_path)
    assert resolve("my_model_mod:build", "model.name")() == 7


def test_ray_dataset_columns_named_for_data_that_has_none_are_refused():
    """--x-columns / --y-column name a Ray Dataset's columns: with a torch Dataset they would be
    ignored, so they are refused naming the flag; an empty name is refused by the config."""
    c = TrainConfig(
        model=ModelConfig(name="tests.unit.test_task:linear"),
        data=DataConfig(dataset="tests.unit.test_task:data", y_column="label"),
    )
    with pytest.raises(ConfigError, match="would be ignored; drop data.y_column") as e:
        Task.build(c)
    assert e.value.field == "data.y_column"
    with pytest.raises(ConfigError, match="names no column") as e:
        DataConfig(x_columns=" , ")
    assert e.value.field == "data.x_columns"


def batchnorm():
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))


def test_a_batch_of_one_sample_that_the_model_cannot_train_on_names_the_batch_size():
    """BatchNorm needs 2 samples in training: --batch-size 1 is refused on the driver, not by every
    worker's first step."""
    Task.build(cfg(name="tests.unit.test_task:batchnorm"))  # the default batch size trains
    config = cfg(name="tests.unit.test_task:batchnorm")
    config.data.batch_size = 1
    with pytest.raises(ConfigError, match="give data.batch_size=2 or more") as e:
        Task.build(config)
    assert e.value.field == "data.batch_size"
    config = cfg(name="tests.unit.test_task:linear")
    config.data.batch_size = 1
    Task.build(config)  # a model without BatchNorm trains on single samples


def double():
    return nn.Linear(4, 3).double()


def double_data():
    g = torch.Generator().manual_seed(0)
    return TensorDataset(
        torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,))
    ), None


def test_float64_models_and_samples_are_refused_naming_what_to_change():
    """The shards keep float32: a float64 model would train on the driver and fail on every worker
    (its parameters become float32 views there)."""
    with pytest.raises(ConfigError, match="'weight' is torch.float64.*build the model in float32"):
        Task.build(cfg(name="tests.unit.test_task:double"))
    config = cfg(name="tests.unit.test_task:linear")
    config.data.dataset = "tests.unit.test_task:double_data"
    with pytest.raises(ConfigError, match="the samples are float64") as e:
        Task.build(config)
    assert e.value.field == "data.dataset"


_widths = iter([8, 16])


def growing():
    """A factory that builds another model each time it is called (as one reading the host or
    the clock would in each process)."""
    return nn.Sequential(nn.Linear(4, next(_widths, 32)), nn.Linear(next(_widths, 32), 3))


def test_a_process_that_builds_another_model_than_the_driver_is_refused():
    task, _, _ = Task.build(cfg(name="tests.unit.test_task:linear"))
    assert [entry[:3] for entry in task.layout] == [
        ("weight", (3, 4), "float32"),
        ("bias", (3,), "float32"),
    ]
    task.build_model(0)  # the same model: accepted
    odd = Task(growing, task.loss, task.data, layout=task.layout)
    with pytest.raises(ConfigError, match="differs from the driver's .*'0.weight'") as e:
        odd.build_model(0)
    assert e.value.field == "model.name"


def test_a_process_whose_model_holds_other_values_than_the_driver_is_refused():
    """Shapes alike, values not (a frozen projection drawn from a generator of the factory's own,
    or from the clock): each process would train another model than the driver evaluates."""
    import time

    def own_generator():
        model = nn.Linear(4, 3)
        gen = np.random.default_rng(time.perf_counter_ns())
        with torch.no_grad():
            model.weight.copy_(torch.from_numpy(gen.standard_normal((3, 4)).astype(np.float32)))
        model.weight.requires_grad_(False)
        return model

    task = Task(own_generator, None, None)
    task = Task(own_generator, None, None, layout=model_layout(task.build_model(0)))
    with pytest.raises(ConfigError, match="'weight' holds other values here than on the driver"):
        task.build_model(0)


def test_a_factory_drawing_from_numpy_or_python_random_builds_the_same_model_everywhere():
    """NumPy's and Python's global generators are seeded with torch's before the factory runs."""
    import random

    def drawn():
        model = nn.Linear(4, 3)
        with torch.no_grad():
            model.weight.copy_(torch.from_numpy(np.random.randn(3, 4).astype(np.float32)))
            model.bias.fill_(random.random())
        return model

    first = Task(drawn, None, None).build_model(0)
    task = Task(drawn, None, None, layout=model_layout(first))
    np.random.seed(1)
    random.seed(1)
    again = task.build_model(0)  # whatever the generators held before: the same values
    assert torch.equal(again.weight, first.weight) and torch.equal(again.bias, first.bias)


def test_one_hot_and_soft_targets_score_accuracy_as_class_indices_do():
    from raytrain_ft.task import correct, evaluate

    out = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0]])
    labels = torch.tensor([0, 2, 2])
    assert correct(out, labels).tolist() == [True, False, True]
    one_hot = nn.functional.one_hot(labels, 3).float()
    assert correct(out, one_hot).tolist() == [True, False, True]
    soft = one_hot * 0.8 + 0.2 / 3
    assert correct(out, soft).tolist() == [True, False, True]
    x = torch.randn(16, 4)
    y = torch.randint(0, 3, (16,))
    task, _, _ = Task.build(
        api_cfg(name="tests.unit.test_task:linear"), train_data=TensorDataset(x, y)
    )
    model = task.build_model(0)
    by_index = evaluate(task, model, TensorDataset(x, y))
    by_prob = evaluate(task, model, TensorDataset(x, nn.functional.one_hot(y, 3).float()))
    assert by_prob["eval_accuracy"] == by_index["eval_accuracy"]
    assert by_prob["eval_loss"] == pytest.approx(by_index["eval_loss"])


def test_what_the_users_model_or_loss_raises_is_one_line_naming_the_field():
    """On a worker: the user's exception becomes a ConfigError naming the flag (its own chained for
    the log); the project's errors and those raised through its own hooks pass through."""
    import os

    import raytrain_ft.actors as actors
    from raytrain_ft.errors import TrainingError
    from raytrain_ft.task import user_code

    # the worker's own code calls the user's (as _forward does), and the hooks it installed
    # (a shard install inside forward) may raise from within the user's call
    scope: dict = {"user_code": user_code}
    source = (
        "def worker_calls(fn):\n"
        "    with user_code('model.loss', lambda: 'the loss on step 3'):\n"
        "        return fn()\n"
        "def hook():\n"
        "    raise KeyError('shard 1')\n"
    )
    path = os.path.join(os.path.dirname(actors.__file__), "worker_under_test.py")
    exec(compile(source, path, "exec"), scope)
    with pytest.raises(ConfigError) as e:
        scope["worker_calls"](
            lambda: nn.functional.cross_entropy(torch.zeros(2, 3), torch.tensor([0, 7]))
        )
    assert e.value.field == "model.loss"
    assert str(e.value).startswith("model.loss: the loss on step 3 raised IndexError: Target 7")
    assert "\n" not in str(e.value) and isinstance(e.value.__cause__, IndexError)

    def users_forward():
        return scope["hook"]()

    with pytest.raises(KeyError):
        scope["worker_calls"](users_forward)

    def raises(error):
        raise error

    with pytest.raises(TrainingError):
        scope["worker_calls"](lambda: raises(TrainingError("shard 0 is lost")))


class _ComplexParam(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 3)
        self.c = nn.Parameter(torch.zeros(3, dtype=torch.complex64))

    def forward(self, x):
        return self.l(x) + self.c.real


class _BigIntBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 3)
        self.register_buffer("prime", torch.tensor([2147483647, 5], dtype=torch.int64))
        self.register_buffer("mask", torch.tensor([True, False, True]))

    def forward(self, x):
        return self.l(x) * self.mask


def test_values_the_float32_shards_cannot_carry_are_refused():
    """A complex parameter would lose its imaginary part, an integer buffer beyond 2**24 its low
    bits (2147483647 came back 2147483648); a bool buffer travels exactly."""
    with pytest.raises(ConfigError, match="'c' is torch.complex64"):
        Task.build(api_cfg(), model=_ComplexParam, train_data=data()[0])
    with pytest.raises(ConfigError, match="'prime' holds integers beyond 2\\*\\*24") as e:
        Task.build(api_cfg(), model=_BigIntBuffer, train_data=data()[0])
    assert e.value.field == "model"  # the Python API's model= gave it


@pytest.mark.parametrize(
    "kwargs, field, needle",
    [
        (
            dict(model=linear()),
            "model",
            "got a built nn.Linear; give what builds it, a zero-argument function or class "
            "(model=lambda: nn.Linear(...))",
        ),
        (
            dict(model=_BigIntBuffer()),
            "model",
            "got a built _BigIntBuffer; give what builds it, a zero-argument function or class "
            "(model=_BigIntBuffer or model=lambda: _BigIntBuffer(...))",
        ),
        (dict(model=5), "model", "got int; give a zero-argument function or class"),
        (dict(model=linear, loss=5), "loss", "got int; give a function (output, target)"),
        (
            dict(model=linear, eval_data=(s for s in data()[0])),
            "eval_data",
            "got generator; give a map-style torch Dataset",
        ),
        (dict(model=linear, train_data=[1, 2, 3][0]), "train_data", "got int"),
    ],
)
def test_python_api_objects_of_the_wrong_kind_are_named(kwargs, field, needle):
    kwargs.setdefault("train_data", data()[0])
    with pytest.raises(ConfigError) as e:
        Task.build(api_cfg(), **kwargs)
    assert e.value.field == field and needle in str(e.value), str(e.value)


def test_an_eval_set_without_train_data_is_refused_not_ignored():
    with pytest.raises(ConfigError, match="given without train_data, it would be ignored") as e:
        Task.build(api_cfg(name="tests.unit.test_task:linear"), eval_data=data()[0])
    assert e.value.field == "eval_data"


def test_a_config_changed_after_it_was_built_is_checked_by_the_trainer():
    from raytrain_ft.trainer import Trainer

    with pytest.raises(ConfigError, match="config: got dict; give a raytrain_ft.TrainConfig"):
        Trainer({"steps": 5})
    for change, field in (
        (lambda c: setattr(c.optim, "lr", float("nan")), "optim.lr"),
        (lambda c: setattr(c, "mode", "bogus"), "mode"),
        (lambda c: setattr(c.data, "batch_size", 0), "data.batch_size"),
        (lambda c: setattr(c.cluster, "num_workers", 0), "cluster.num_workers"),
    ):
        config = TrainConfig()
        change(config)
        with pytest.raises(ConfigError) as e:
            Trainer(config)
        assert e.value.field == field
    Trainer(TrainConfig())  # unchanged: accepted


def test_a_ray_short_of_the_workers_cpus_is_named_at_once(capsys):
    """Without it, a Python API run on a Ray with 2 CPUs for 3 workers sat silent until the start
    timeout (180 s)."""
    from raytrain_ft.config import ClusterConfig
    from raytrain_ft.trainer import warn_if_short_of_cpus

    config = TrainConfig(cluster=ClusterConfig(num_workers=3, num_servers=1))
    assert warn_if_short_of_cpus(config, 4.0) is None
    said = warn_if_short_of_cpus(config, 2.0)
    assert said.startswith("raytrain-ft: warning: the run's 3 workers ask for 3 CPUs and this Ray")
    assert capsys.readouterr().err.strip() == said
    # a Ray this process started with ray.init(): nothing adds nodes to it, so no waiting 180 s
    with pytest.raises(ClusterError) as e:
        warn_if_short_of_cpus(config, 2.0, started_here=True)
    assert "no autoscaler adds nodes to it" in str(e.value)
    assert "cluster.num_workers" in str(e.value) and "ray.init(num_cpus=3)" in str(e.value)
    assert warn_if_short_of_cpus(config, 3.0, started_here=True) is None


@pytest.mark.parametrize(
    "config, kwargs, field",
    [
        (cfg(), dict(train_data=data()[0]), "data.dataset"),
        (TrainConfig(data=DataConfig(image_size=8)), dict(train_data=data()[0]), "data.image_size"),
        (TrainConfig(model=ModelConfig(name="mlp")), dict(model=linear), "model.name"),
        (TrainConfig(model=ModelConfig(loss="mse")), dict(loss=nn.MSELoss()), "model.loss"),
    ],
)
def test_a_config_setting_the_python_apis_objects_override_is_refused(config, kwargs, field):
    """A setting that would be ignored is refused, here as on the command line."""
    kwargs.setdefault("train_data", data()[0])
    with pytest.raises(ConfigError, match="would be ignored: the .*= given to the Trainer") as e:
        Task.build(config, model=kwargs.pop("model", linear), **kwargs)
    assert e.value.field == field


BUILT = nn.Linear(4, 3)
"""A built model named by an import string (``--model tests.unit.test_task:BUILT``)."""


class _DictSamples(torch.utils.data.Dataset):
    """Samples as dicts, the layout of many libraries' datasets."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return {"x": torch.zeros(4), "y": torch.tensor(i % 3)}


def test_samples_the_project_would_misread_or_settings_it_would_ignore_are_named():
    # a dict sample unpacked into its keys: the model was blamed for the strings 'x' and 'y'
    with pytest.raises(ConfigError, match=r"a sample is a dict \(keys 'x', 'y'\); a sample must"):
        Task.build(api_cfg(), model=linear, train_data=_DictSamples())
    # an import string naming a built module: it was called as if it built one
    with pytest.raises(ConfigError, match="'tests.unit.test_task:BUILT' is a built Linear; name"):
        Task.build(cfg(name="tests.unit.test_task:BUILT"))
    # metrics, periodic evaluation: nothing to evaluate them on
    train = data()[0]
    with pytest.raises(ConfigError, match="no eval set to evaluate") as e:
        Task.build(api_cfg(), model=linear, train_data=train, metrics=lambda o, t: {"m": 1.0})
    assert e.value.field == "metrics"
    config = api_cfg()
    config.eval_every_s = 0.5
    with pytest.raises(ConfigError, match="no eval set to evaluate") as e:
        Task.build(config, model=linear, train_data=train)
    assert e.value.field == "eval_every_s"
    # with an eval set both are taken
    Task.build(config, model=linear, train_data=train, eval_data=train, metrics=lambda o, t: {})


def test_the_summary_records_what_the_python_api_gave_not_the_configs_defaults():
    import functools

    from raytrain_ft.trainer import described_config

    train = data()[0]
    parts = dict(
        model=functools.partial(linear), loss="mse", train_data=train, eval_data=None, metrics=None
    )
    d = described_config(api_cfg(), parts)
    assert d["model"]["name"] == "model=tests.unit.test_task:linear"
    assert d["model"]["loss"] == "loss=mse"
    assert d["data"]["dataset"] == "train_data=TensorDataset, 16 samples"
    assert "eval_fraction" not in d["data"] and "eval_data" not in d["data"]
    # a config run keeps its own names
    plain = described_config(cfg(name="torch.nn:Linear"), dict(model=None, loss=None))
    assert plain["model"]["name"] == "torch.nn:Linear" and plain["model"]["loss"] == "cross_entropy"


def _float_targets(n=16):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 4, generator=g), torch.randn(n, generator=g))


def two_outputs():
    return nn.Linear(4, 2)


def test_an_output_that_fits_the_targets_only_by_broadcasting_is_refused():
    """An output [N, 2] against targets [N]: at 2 samples torch's losses broadcast them (with a
    warning) and a plain expression silently; the workers' batch of 8 then failed on every
    worker, or a batch of 2 trained on the broadcast values."""
    config = api_cfg()
    config.data.batch_size = 8
    with pytest.raises(ConfigError, match=r"differ in shape, so the loss would compare") as e:
        Task.build(config, model=two_outputs, loss=nn.MSELoss(), train_data=_float_targets())
    assert e.value.field == "loss"

    def plain(out, y):
        return (out - y).pow(2).mean()

    with pytest.raises(
        ConfigError, match=r"not a batch of samples 0-7 \(each worker's batch is 8\)"
    ) as e:
        Task.build(config, model=two_outputs, loss=plain, train_data=_float_targets())
    assert e.value.field == "loss"
    # the same loss on outputs of the targets' shape is taken
    Task.build(
        config,
        model=regressor,
        loss=lambda o, y: (o.squeeze(-1) - y).pow(2).mean(),
        train_data=_float_targets(),
    )


def unseeded_split():
    """A split as ``train_test_split`` without ``random_state`` makes it: another in each call."""
    import numpy as np

    x, y = data(40)[0].tensors
    order = torch.from_numpy(np.random.default_rng().permutation(40))
    return TensorDataset(x[order[:30]], y[order[:30]]), TensorDataset(x[order[30:]], y[order[30:]])


def test_a_dataset_factory_that_returns_other_data_in_another_process_is_refused_there():
    task, train, _ = Task.build(
        TrainConfig(
            model=ModelConfig(name="tests.unit.test_task:linear"),
            data=DataConfig(dataset="tests.unit.test_task:unseeded_split", batch_size=4),
        )
    )
    with pytest.raises(ConfigError, match="differs from the one it returned on the driver") as e:
        task.train_for(0)  # as a worker calls it
    assert e.value.field == "data.dataset"
    # a factory returning the same data each time passes, and so do the Python API's objects
    same, _, _ = Task.build(cfg(name="tests.unit.test_task:linear"))
    assert same.data_print is not None and len(same.train_for(1)) == 16
    given, _, _ = Task.build(api_cfg(), model=linear, train_data=data()[0])
    assert given.data_print is None


def test_a_file_path_as_an_import_string_and_tensors_as_a_dataset_are_named():
    with pytest.raises(
        ConfigError,
        match=r"'./mymod.py:build' names a file; give the module's "
        r"import name \(mymod:build\)",
    ):
        Task.build(cfg(name="./mymod.py:build"))
    x, y = data()[0].tensors
    with pytest.raises(ConfigError, match=r"got a tuple of 2 tensors; .*=TensorDataset\(x, y\)"):
        Task.build(api_cfg(), model=linear, train_data=(x, y))
    # a dataset factory returning tensors or arrays, not datasets, is named the same way
    for factory, said in (
        ("tensors_not_datasets", "returned a tuple of 2 tensors as the training set"),
        ("arrays_as_eval_set", "returned a tuple of 2 arrays as the eval set"),
    ):
        with pytest.raises(ConfigError) as e:
            Task.build(
                TrainConfig(
                    model=ModelConfig(name="tests.unit.test_task:linear"),
                    data=DataConfig(dataset=f"tests.unit.test_task:{factory}"),
                )
            )
        assert e.value.field == "data.dataset" and said in str(e.value), str(e.value)
        assert "give a Dataset of (x, y) samples: return TensorDataset(x, y)" in str(e.value)


def tensors_not_datasets():
    train, evaluation = data()
    return train.tensors, evaluation


def arrays_as_eval_set():
    train, _ = data()
    x, y = train.tensors
    return train, (x.numpy(), y.numpy())


def data_with_empty_eval():
    train, _ = data()
    x, y = train.tensors
    return train, TensorDataset(x[:0], y[:0])


def test_an_eval_set_of_no_samples_is_refused_naming_where_it_came_from():
    """It would evaluate nothing: the run's eval_loss was NaN, silently."""
    train, _ = data()
    x, y = train.tensors
    with pytest.raises(ConfigError, match="the eval set holds 0 samples") as e:
        Task.build(api_cfg(), model=linear, train_data=train, eval_data=TensorDataset(x[:0], y[:0]))
    assert e.value.field == "eval_data"
    with pytest.raises(ConfigError, match="the eval set holds 0 samples") as e:
        Task.build(
            TrainConfig(
                model=ModelConfig(name="tests.unit.test_task:linear"),
                data=DataConfig(dataset="tests.unit.test_task:data_with_empty_eval"),
            )
        )
    assert e.value.field == "data.dataset"
    Task.build(api_cfg(), model=linear, train_data=train)  # no eval set at all: fine


def nan_in_eval_set():
    train, _ = data()
    x, y = train.tensors
    x = x.clone()
    x[5, 2] = float("nan")
    return train, TensorDataset(x, y)


def test_a_nan_or_infinity_in_data_held_in_memory_is_refused_naming_the_sample():
    """It trained to a NaN loss, and the run's end blamed divergence (lower --lr)."""
    train, _ = data()
    x, y = train.tensors
    for bad, part in ((float("nan"), "x"), (float("inf"), "x")):
        xb = x.clone()
        xb[3, 1] = bad
        with pytest.raises(ConfigError) as e:
            Task.build(api_cfg(), model=linear, train_data=TensorDataset(xb, y))
        assert e.value.field == "train_data"
        assert f"the training set's sample 3's {part} holds a NaN or infinite value" in str(e.value)
    yf = torch.randn(len(y))
    yf[7] = float("nan")
    with pytest.raises(ConfigError, match=r"training set's sample 7's y holds a NaN") as e:
        Task.build(api_cfg(loss="mse"), model=regressor, train_data=TensorDataset(x, yf))
    with pytest.raises(ConfigError, match=r"the eval set's sample 5's x holds a NaN") as e:
        Task.build(
            TrainConfig(
                model=ModelConfig(name="tests.unit.test_task:linear"),
                data=DataConfig(dataset="tests.unit.test_task:nan_in_eval_set"),
            )
        )
    assert e.value.field == "data.dataset"
    Task.build(api_cfg(), model=linear, train_data=train)  # finite: passes


class _OnlyInputs(torch.utils.data.Dataset):
    """Samples without targets: one tensor each."""

    def __len__(self):
        return 16

    def __getitem__(self, i):
        return torch.full((4,), float(i))


@pytest.mark.parametrize(
    "train, needle",
    [
        (_OnlyInputs(), "a sample is one tensor (torch.float32 [4]), not an (x, y) pair"),
        (TensorDataset(torch.randn(16, 4)), "a sample is one tensor (torch.float32 [4])"),
        (torch.randn(16, 4), "train_data: got a tensor (torch.float32 [16, 4]); give a Dataset"),
        (np.zeros((16, 4)), "train_data: got a NumPy array (float64 [16, 4]); give a Dataset"),
    ],
)
def test_samples_without_targets_are_named_as_the_datasets_fault_not_the_losses(train, needle):
    """Two one-tensor samples stack into a [2, 4] batch that unpacks into (x, y): the check blamed
    the loss for the shapes that gave."""
    with pytest.raises(ConfigError, match=re.escape(needle)) as e:
        Task.build(api_cfg(), model=linear, train_data=train)
    assert e.value.field in ("data.dataset", "train_data")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_loss_that_is_not_finite_at_the_start_is_refused(bad):
    """Trained on, it turned every parameter into nan without a word."""

    def loss(out, y):
        return out.sum() * 0.0 + bad

    with pytest.raises(
        ConfigError, match="the loss of the model's output on training samples"
    ) as e:
        Task.build(api_cfg(), model=linear, loss=loss, train_data=data()[0])
    assert e.value.field == "loss"


def test_a_model_or_metrics_ray_cannot_pickle_is_named_before_anything_starts():
    """A factory or metrics function referring to a lock failed in Ray's pickling with a
    message naming neither."""
    import threading

    lock = threading.Lock()

    def locked_model():
        with lock:
            return linear()

    with pytest.raises(ConfigError, match="cannot be sent to the workers: pickling it raised") as e:
        Task.build(api_cfg(), model=locked_model, train_data=data()[0])
    assert e.value.field == "model" and "lock" in e.value.message

    def locked_metrics(out, y):
        with lock:
            return {"n": float(len(y))}

    with pytest.raises(ConfigError, match="cannot be sent to the workers") as e:
        Task.build(
            api_cfg(),
            model=linear,
            train_data=data()[0],
            eval_data=data()[0],
            metrics=locked_metrics,
        )
    assert e.value.field == "metrics"


class _LearnedVarianceLoss(nn.Module):
    """A loss with a parameter of its own (a learned log-variance)."""

    def __init__(self):
        super().__init__()
        self.logvar = nn.Parameter(torch.zeros(()))

    def forward(self, out, y):
        return ((out.float().mean(1) - y.float()) ** 2 * torch.exp(-self.logvar)).mean()


def test_a_loss_with_trainable_parameters_is_refused():
    """Its parameters stayed at their initial values without a word: only the model's are
    sharded and updated."""
    for loss in (_LearnedVarianceLoss(), _LearnedVarianceLoss):
        with pytest.raises(
            ConfigError, match=r"trainable parameters \(logvar\) that no update"
        ) as e:
            Task.build(api_cfg(), model=linear, loss=loss, train_data=data()[0])
        assert e.value.field == "loss"
    frozen = _LearnedVarianceLoss().requires_grad_(False)  # a constant: fine
    Task.build(api_cfg(), model=linear, loss=frozen, train_data=data()[0])


def test_the_python_apis_datasets_are_named_as_given():
    """train_data= and eval_data= mistakes name those arguments, not the config's data.dataset."""
    train, _ = data()
    wide = TensorDataset(torch.randn(8, 5), torch.randint(0, 3, (8,)))
    with pytest.raises(ConfigError, match="the eval set does not fit the model") as e:
        Task.build(api_cfg(), model=linear, train_data=train, eval_data=wide)
    assert e.value.field == "eval_data"
    with pytest.raises(ConfigError, match="the samples are float64") as e:
        Task.build(
            api_cfg(),
            model=linear,
            train_data=TensorDataset(train.tensors[0].double(), train.tensors[1]),
        )
    assert e.value.field == "train_data"
