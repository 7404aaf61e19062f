"""Your own model, loss, data and metrics: through the Python API and the CLI, with the guarantees
the built-in models have (same seed, same hash; a kill changes nothing), BatchNorm-style float
buffers, an integer buffer, a frozen parameter and one the forward never uses."""

import dataclasses
import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from examples import diabetes, sequence
from raytrain_ft import cli
from raytrain_ft.config import (
    ChaosConfig,
    ClusterConfig,
    DataConfig,
    ModelConfig,
    OptimConfig,
    RecoveryConfig,
    TrainConfig,
)
from raytrain_ft.task import Task, evaluate
from raytrain_ft.trainer import Trainer


def _cfg(steps, data=None, **kw):
    return TrainConfig(
        data=data or DataConfig(batch_size=16),
        cluster=ClusterConfig(num_workers=2, num_servers=1),
        recovery=RecoveryConfig(snapshot_interval=10, num_spares=0),
        steps=steps,
        seed=3,
        **kw,
    )


def test_diabetes_from_ray_datasets_beats_the_mean_exports_and_kills_change_nothing(
    ray_local, tmp_path, capfd
):
    """Ray Datasets as train_data and eval_data through the Python API: each rank trains on its own
    equal part (read by that rank alone), the run beats predicting the mean, the exported state
    dict scores the reported eval_loss, and a primary, a worker and the supervisor killed mid-run
    (no spare) change no bit."""
    import ray

    from raytrain_ft.data import part_tensors, split_ray_dataset

    train, held_out = diabetes.ray_data()
    torch_train, torch_eval = diabetes.data()
    cfg = _cfg(300, optim=OptimConfig(lr=0.02, momentum=0.9))
    parts = [part_tensors(p, cfg.data) for p in split_ray_dataset(train, 2)]
    n = len(torch_train) // 2
    assert [len(p) for p in parts] == [n, n]  # equal parts, in the dataset's row order
    assert torch.equal(torch.cat([p.tensors[0] for p in parts]), torch_train.tensors[0][: 2 * n])

    def fit(kill=None):
        cfg.chaos.kill = kill
        return Trainer(
            cfg,
            model=diabetes.model,
            loss="mse",
            train_data=train,
            eval_data=held_out,
            metrics=diabetes.metrics,
        ).fit()

    result = fit()
    assert isinstance(train, ray.data.Dataset)
    mean_mse = float(
        ((torch_eval.tensors[1] - torch_train.tensors[1].mean()) ** 2).mean()
    )  # predicting the training mean
    assert result.eval_loss < 0.75 * mean_mse, (result.eval_loss, mean_mse)
    assert (
        result.eval_metrics["eval_r2"] > 0.25 and result.eval_accuracy != result.eval_accuracy
    )  # NaN: not a classifier
    summary = result.to_dict()  # the summary the CLI writes: strict JSON, null for no accuracy
    assert summary["eval_accuracy"] is None and summary["eval_loss"] == result.eval_loss
    json.dumps(summary, allow_nan=False)
    # the exported state dict, loaded into a fresh instance of the user's model, scores the reported
    # eval_loss
    path = tmp_path / "model.pt"
    torch.save(result.state_dict(), path)
    fresh = diabetes.model()
    fresh.load_state_dict(torch.load(path, weights_only=True))
    task, _, _ = Task.build(
        cfg, model=diabetes.model, loss="mse", train_data=torch_train, eval_data=torch_eval
    )
    assert evaluate(task, fresh, torch_eval)["eval_loss"] == pytest.approx(
        result.eval_loss, rel=1e-6
    )
    # the supervisor too: Ray restarts it from the same constructor arguments, which hold no
    # object refs (the restarted supervisor reads the data's refs from the run's RefKeeper), so
    # Ray has no restart to warn about (it logs one line per process where such arguments do)
    killed = fit("worker:1@step=100,server:0@step=150,supervisor@step=200")
    assert sorted(e["role"] for e in killed.recoveries) == ["server", "supervisor", "worker"], (
        killed.recoveries
    )
    assert killed.params_sha256 == result.params_sha256
    assert "has constructor arguments in the object store" not in capfd.readouterr().err


def test_a_ray_dataset_without_the_named_columns_is_refused_naming_the_flag(ray_local):
    from raytrain_ft.errors import ConfigError

    train, held_out = diabetes.ray_data()
    with pytest.raises(ConfigError, match=r"no column 'features' \(its columns: x, y\); name the "):
        Trainer(
            _cfg(10, data=DataConfig(batch_size=16, x_columns="features")),
            model=diabetes.model,
            loss="mse",
            train_data=train,
        ).fit()


def test_a_transformer_through_the_cli_with_import_strings(ray_local, tmp_path, capsys):
    out = tmp_path / "run.json"
    rc = cli.main(
        [
            "train",
            "--quiet",
            "--model",
            "examples.sequence:model",
            "--dataset",
            "examples.sequence:data",
            "--steps",
            "150",
            "--batch-size",
            "32",
            "--optimizer",
            "adam",
            "--lr",
            "0.003",
            "--num-workers",
            "2",
            "--num-servers",
            "2",
            "--num-spares",
            "0",
            "--output-json",
            str(out),
        ]
    )
    assert rc == 0, capsys.readouterr().err[-2000:]
    summary = json.loads(out.read_text())
    assert (
        summary["eval_accuracy"] > 0.9
        and summary["config"]["model"]["name"] == "examples.sequence:model"
    )
    assert isinstance(sequence.model(), nn.TransformerEncoder.__mro__[1])  # an nn.Module


class Odd(nn.Module):
    """BatchNorm (float buffers + an integer one), dropout, a frozen parameter, and a parameter
    the forward never uses."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1)
        )
        self.frozen = nn.Parameter(torch.full((1,), 0.5), requires_grad=False)
        self.unused = nn.Parameter(torch.zeros(4))

    def forward(self, x):
        return self.body(x) * self.frozen


class OneWeight(nn.Module):
    """One trainable value (digits' first 10 pixels, scaled): fewer values than shards."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return x.flatten(1)[:, :10] * self.w


class Jittered(torch.utils.data.Dataset):
    """Training samples with noise drawn in ``__getitem__`` from torch's, NumPy's and Python's
    global generators (augmentation)."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        numpy_noise = torch.from_numpy(np.random.standard_normal(x.shape).astype(np.float32))
        return x + 0.01 * torch.randn_like(x) + 0.01 * numpy_noise + 0.01 * random.random(), y


def odd_data():
    train, held_out = diabetes.data()
    return Jittered(train), held_out


@pytest.mark.chaos
def test_odd_user_model_same_hash_with_ranks_sharing_a_process_and_a_server_and_that_process_killed(
    ray_local,
):
    """A model with BatchNorm (float statistics and an integer counter), dropout, a frozen
    parameter and an unused one, trained on samples its dataset jitters with torch's, NumPy's and
    Python's generators, 3 workers. Killed run: ranks 0 and 1 share a process (each with its own
    thread, model and data; rank 2 alone), pre-aggregated -- rank 0 pushes the sum of both ranks'
    gradients and BatchNorm statistics, rank 1 takes its parameters and counters -- and shard 0's
    primary, then the shared process, are SIGKILLed mid-run: both ranks are re-created in one new
    process and resume at one step. It ends bitwise equal to the clean run with a process per rank
    (with 3 ranks both sum (g0 + g1) + g2): dropout and the jitter draw per (seed, rank, step),
    whichever thread or process draws them and whenever."""
    steps = 30
    cfg = TrainConfig(
        model=ModelConfig(name="tests.integration.test_user_models:Odd", loss="mse"),
        data=DataConfig(dataset="tests.integration.test_user_models:odd_data", batch_size=16),
        cluster=ClusterConfig(num_workers=3, num_servers=2),
        recovery=RecoveryConfig(snapshot_interval=5, num_spares=0),
        optim=OptimConfig(lr=0.02, momentum=0.9, weight_decay=1e-4),
        steps=steps,
        seed=5,
    )
    clean = Trainer(cfg).fit()
    killed = Trainer(
        dataclasses.replace(
            cfg,
            cluster=dataclasses.replace(cfg.cluster, ranks_per_process=2),
            chaos=ChaosConfig(kill="server:0@step=8,worker:1@step=16"),
        )
    ).fit()
    assert [k["kill"] for k in killed.kills] == ["server:0@step=8", "worker:1@step=16"]
    assert sorted((e["role"], e["index"]) for e in killed.recoveries) == [
        ("server", 0),
        ("worker", 0),
        ("worker", 1),
    ]
    processes = [w["process"] for w in killed.workers]
    assert processes[0] == processes[1] != processes[2]
    assert killed.preaggregated and not clean.preaggregated
    assert [w["bytes_pushed"] > 0 for w in killed.workers] == [True, False, True]
    assert killed.params_sha256 == clean.params_sha256
    assert killed.updates_applied == killed.updates_acknowledged == steps * 2
    # BatchNorm's step counters: every rank counted every step, the shards averaged them; the
    # integer buffer travels with the shards (as a float)
    tracked = {k: v for k, v in killed.state_dict().items() if k.endswith("num_batches_tracked")}
    assert tracked and all(int(v) == steps for v in tracked.values())
    assert int(killed.model.body[1].num_batches_tracked) == steps
    assert (
        float(killed.model.frozen) == 0.5 and torch.count_nonzero(killed.model.unused) == 0
    )  # weight decay of 0 stays 0


def test_bf16_trains_the_main_job(ray_local):
    cfg = TrainConfig(
        model=ModelConfig(name="cnn", precision="bf16"),
        data=DataConfig(image_size=8, batch_size=16),
        cluster=ClusterConfig(num_workers=2, num_servers=2),
        recovery=RecoveryConfig(num_spares=0),
        steps=120,
        seed=3,
    )
    result = Trainer(cfg).fit()
    assert result.eval_accuracy > 0.85 and result.final_loss == result.final_loss


def loud_mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE in units 10,000 times smaller: at GradScaler's initial scale (2**16) the fp16 backward
    overflows, so the first updates are skipped while the scale comes down until it fits."""
    return 1e4 * torch.nn.functional.mse_loss(output.squeeze(-1), target)


def test_fp16_skips_overflowed_updates_on_every_shard_and_a_kill_changes_nothing(ray_local):
    """fp16 with loss scaling, sync: an update with an overflowed gradient is skipped by both
    shards; both ranks end with the same skipped steps and GradScaler's scale for them; the run
    learns; a primary and a worker killed mid-run (the restarted rank gets its skipped steps back
    from the shards, so its scale) give the same hash."""
    from raytrain_ft import amp

    def fit(kill=None, overlap=False):
        cfg = TrainConfig(
            model=ModelConfig(precision="fp16"),
            data=DataConfig(batch_size=16),
            optim=OptimConfig(lr=1e-6, momentum=0.9),  # 0.01 in the loss's usual units
            # overlap: forward installs each shard as a layer needs it, pushes wait for backward
            cluster=ClusterConfig(
                num_workers=2,
                num_servers=2,
                overlap_comm=overlap,
                push_thread="true" if overlap else "auto",
            ),
            recovery=RecoveryConfig(snapshot_interval=10, num_spares=1 if kill else 0),
            steps=30,
            seed=3,
        )
        cfg.chaos.kill = kill
        train, held_out = diabetes.data()
        return Trainer(
            cfg, model=diabetes.model, loss=loud_mse, train_data=train, eval_data=held_out
        ).fit()

    clean = fit()
    skipped = [w["skipped_updates"] for w in clean.workers]
    assert skipped[0] == skipped[1] > 0, clean.workers
    assert clean.updates_applied == 2 * 30  # a skipped update is still an update, applied once
    first = clean.workers[0]
    # the scale halved once per skipped step, from 2**16
    assert first["loss_scale"] == amp.INIT_SCALE * 0.5 ** skipped[0]
    assert clean.eval_loss < 1e4, clean.eval_loss  # below predicting the mean: it learned
    # with overlap (forward installs the answers, pushes wait for the unscaled gradient): the
    # same bits
    killed = fit("server:0@step=8,worker:1@step=22", overlap=True)
    # one recovery each (in either order: on a loaded machine the step-8 kill can land late)
    assert sorted(e["role"] for e in killed.recoveries) == ["server", "worker"], killed.recoveries
    assert killed.params_sha256 == clean.params_sha256
    assert [w["skipped_updates"] for w in killed.workers] == skipped


def _differs_in_servers():
    """A factory reading its process (as one reading the host or the clock would): servers build
    a wider model than the driver and the workers."""
    import ray

    width = 32 if "server" in (ray.get_runtime_context().get_actor_name() or "") else 16
    return nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 3))


def _labels_out_of_range_after(n: int):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 4, generator=g), torch.randint(0, 3, (64,), generator=g)
    y[n:] = 7  # beyond the samples the driver checks: a worker's first step meets them
    return torch.utils.data.TensorDataset(x, y)


def test_the_users_model_failing_on_a_worker_or_differing_on_a_server_fails_in_one_line(ray_local):
    """The user's model or loss raising inside a worker's step fails the run with one line naming
    the field and the step (a training failure, however soon after the start); a factory that builds
    another model in a server process fails it as a setting (it asked that server to load forever
    before)."""
    from raytrain_ft.errors import ClusterError, ConfigError, TrainingError

    cfg = _cfg(6)
    data = _labels_out_of_range_after(16)  # the driver checks a batch of samples 0-15
    with pytest.raises(TrainingError) as e:
        Trainer(cfg, model=lambda: nn.Linear(4, 3), train_data=data).fit()
    line = str(e.value)
    assert "\n" not in line, line
    assert line.startswith("worker ") and " failed at step 0: model.loss: the loss on the " in line
    assert "raised IndexError: Target 7 is out of bounds" in line
    # its traceback went to a file in Ray's log directory, not to the driver's console
    path = line.rsplit("(its traceback: ", 1)[1].rstrip(")")
    with open(path) as fh:
        assert "IndexError: Target 7 is out of bounds" in fh.read()
    # within the batch the driver checks, the same data fails before anything starts
    with pytest.raises(ConfigError, match="not a batch of samples 0-15"):
        Trainer(cfg, model=lambda: nn.Linear(4, 3), train_data=_labels_out_of_range_after(2)).fit()

    x, y = data.tensors
    fine = torch.utils.data.TensorDataset(x, y.clamp(max=2))
    with pytest.raises(ClusterError) as e:
        Trainer(cfg, model=_differs_in_servers, train_data=fine).fit()
    assert str(e.value).startswith(
        "server slot 0 failed to start: model: the model built in this process differs "
        "from the driver's ('0.weight' float32 [32, 4] here, '0.weight' float32 [16, 4] on the "
        "driver)"
    )


def test_gpus_asked_of_a_ray_the_driver_started_without_them_fail_at_once(ray_local):
    """``ray.init()`` in the driver (no address) starts a Ray no autoscaler adds GPU nodes to: a
    run asking for GPUs fails at once with one line instead of waiting for the start timeout."""
    import time

    import torch

    from raytrain_ft.errors import ClusterError

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    cfg = _cfg(5)
    cfg.cluster.use_gpu = "true"
    t0 = time.monotonic()
    with pytest.raises(ClusterError, match="asks for 2 GPUs, this machine has 0; set cluster.use"):
        Trainer(
            cfg, model=lambda: nn.Linear(10, 1), loss="mse", train_data=diabetes.data()[0]
        ).fit()
    assert time.monotonic() - t0 < 60


def test_a_run_that_diverges_warns_through_the_python_api(ray_local):
    """The CLI said so at the end; a Python API run ended with nan parameters in silence."""
    from raytrain_ft.errors import DivergedWarning

    cfg = _cfg(20, optim=OptimConfig(lr=1e6, momentum=0.0))
    with pytest.warns(DivergedWarning, match="the training loss is nan at the end of the run"):
        result = Trainer(
            cfg, model=lambda: nn.Linear(10, 1), loss="mse", train_data=diabetes.data()[0]
        ).fit()
    assert result.final_loss != result.final_loss  # nan


class _LockedSet(torch.utils.data.Dataset):
    """A dataset holding a lock: Ray cannot pickle it into its object store."""

    def __init__(self):
        import threading

        self.base, self.lock = diabetes.data()[0], threading.Lock()

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        return self.base[i]


def test_a_dataset_ray_cannot_pickle_is_named(ray_local):
    """Ray's own message is a 1,500-character serialization report naming neither argument."""
    from raytrain_ft.errors import ConfigError

    with pytest.raises(ConfigError, match="cannot be sent to the workers: pickling it raised") as e:
        Trainer(_cfg(5), model=lambda: nn.Linear(10, 1), loss="mse", train_data=_LockedSet()).fit()
    assert e.value.field == "train_data" and len(str(e.value)) < 600


def test_kills_that_never_fired_are_warned_of_through_the_python_api(ray_local):
    """Only the CLI said so: a run asked to kill, asserting the killed run's hash, could pass
    with nothing killed."""
    from raytrain_ft.errors import KillsNotFiredWarning

    cfg = _cfg(5, chaos=ChaosConfig(kill="worker:1@time=100"))
    with pytest.warns(KillsNotFiredWarning, match=r"1 kill\(s\) never fired .*: worker:1@time=100"):
        result = Trainer(
            cfg, model=lambda: nn.Linear(10, 1), loss="mse", train_data=diabetes.data()[0]
        ).fit()
    assert result.kills == [] and result.recoveries == []
