"""GPU workers (skipped without CUDA): the deterministic flags make a GPU run reproducible, and
kills change nothing.

Each run is the CLI in its own process (its own embedded Ray, which sees the machine's GPUs; the CPU
tests' Ray is started with num_gpus=0). Run alone with ``python -m pytest tests/gpu -m gpu -q``."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

BASE = [
    "--model",
    "cnn",
    "--dataset",
    "digits",
    "--image-size",
    "16",
    "--batch-size",
    "32",
    "--seed",
    "3",
    "--num-workers",
    "1",
    "--num-servers",
    "2",
    "--use-gpu",
    "true",
    "--snapshot-interval",
    "10",
    "--metrics",  # runs with a minimal Ray too (no metrics agent)
    "false",
]


def _train(tmp_path, *extra, steps: int = 60) -> dict:
    """One `raytrain-ft train` run: BASE, `--steps`, `extra` (the CLI refuses repeated flags)."""
    out = tmp_path / f"run-{len(list(tmp_path.iterdir()))}.json"
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "raytrain_ft.cli",
            "train",
            "--quiet",
            "--output-json",
            str(out),
            *BASE,
            "--steps",
            str(steps),
            *extra,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_a_gpu_run_is_reproducible_and_records_its_device(tmp_path):
    a, b = _train(tmp_path), _train(tmp_path)
    assert a["params_sha256"] == b["params_sha256"]
    (worker,) = a["workers"]
    assert (
        worker["device"].startswith("cuda") and worker["device_name"] != "cpu" and worker["gpu_ids"]
    )
    assert a["config"]["cluster"]["tf32"] is False


def test_a_worker_and_a_server_kill_on_a_gpu_leave_the_hash_unchanged(tmp_path):
    clean = _train(tmp_path)
    killed = _train(tmp_path, "--kill", "server:0@step=15", "--kill", "worker:0@step=30")
    assert sorted(e["role"] for e in killed["recoveries"]) == ["server", "worker"], killed[
        "recoveries"
    ]
    assert killed["params_sha256"] == clean["params_sha256"]
    assert {w["device_name"] for w in killed["workers"]} == {clean["workers"][0]["device_name"]}


def test_gpu_sync_matches_a_single_process_gpu_reference(tmp_path):
    """One GPU worker with the deterministic flags equals plain PyTorch on the same GPU with the
    same flags (the shards apply SGD on the CPU: equal to float tolerance, not bitwise)."""
    from raytrain_ft.config import DataConfig, ModelConfig, OptimConfig, TrainConfig
    from raytrain_ft.data import global_step_indices, load_dataset
    from raytrain_ft.device import deterministic
    from raytrain_ft.params import flatten_state
    from raytrain_ft.trainer import initial_model

    saved = tmp_path / "model.pt"
    _train(tmp_path, "--save-model", str(saved), steps=20)
    deterministic(tf32=False)
    cfg = TrainConfig(
        model=ModelConfig(name="cnn"),
        data=DataConfig(dataset="digits", image_size=16, batch_size=32),
        optim=OptimConfig(name="sgd", lr=0.05, momentum=0.9),
        steps=20,
        seed=3,
    )
    data = load_dataset(cfg.data, cfg.seed)
    model = initial_model(cfg, data).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, foreach=False)
    for step in range(20):
        idx = torch.from_numpy(global_step_indices(len(data.train_y), cfg.seed, 0, 1, 32, step))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(
            model(data.train_x[idx].cuda()), data.train_y[idx].cuda()
        ).backward()
        opt.step()
    trained = initial_model(cfg, data)
    trained.load_state_dict(torch.load(saved, weights_only=True))
    torch.testing.assert_close(
        flatten_state(trained), flatten_state(model.cpu()), rtol=1e-4, atol=1e-5
    )


def test_overlap_and_a_device_codec_on_a_gpu_keep_the_hash_through_kills(tmp_path):
    """Overlap on a GPU pushes from the push thread (a CUDA event per shard, copies on a side
    stream) and top-k encodes on the device with its residual there: a worker and a server kill
    still leave the hash unchanged, and the GPU's compute time is measured with CUDA events."""
    extra = ("--overlap-comm", "true", "--codec", "topk:0.05", "--codec-residual", "replicated")
    clean = _train(tmp_path, *extra)
    killed = _train(tmp_path, *extra, "--kill", "server:0@step=15", "--kill", "worker:0@step=30")
    assert sorted(e["role"] for e in killed["recoveries"]) == ["server", "worker"], killed[
        "recoveries"
    ]
    assert killed["params_sha256"] == clean["params_sha256"]
    (worker,) = clean["workers"]
    assert 0 < worker["gpu_compute_s"] <= worker["compute_s"] + worker["wait_s"]
    assert worker["residual_bytes"] > 0


def test_fp16_with_loss_scaling_and_global_clipping_on_a_gpu_keep_the_hash_through_kills(tmp_path):
    """fp16 autocast on the GPU with loss scaling (unscale and the overflow check on the device)
    and global clipping (sync: the probes' second round, the norm from the shards), with overlap
    (forward installs the answers; the pushes wait for the unscaled gradient): reproducible, a
    worker and a server kill change no bit, and the run learns."""
    extra = ("--precision", "fp16", "--clip-grad-norm", "1.0", "--overlap-comm", "true")
    clean = _train(tmp_path, *extra)
    again = _train(tmp_path, *extra)
    assert again["params_sha256"] == clean["params_sha256"]
    killed = _train(tmp_path, *extra, "--kill", "server:0@step=15", "--kill", "worker:0@step=30")
    assert sorted(e["role"] for e in killed["recoveries"]) == ["server", "worker"], killed[
        "recoveries"
    ]
    assert killed["params_sha256"] == clean["params_sha256"]
    (worker,) = clean["workers"]
    assert worker["loss_scale"] is not None
    assert clean["eval_accuracy"] > 0.5, clean["eval_accuracy"]  # learns (chance: 0.1)


def test_gpu_batches_are_the_host_batches_from_device_data_or_pinned_memory():
    """A GPU worker's data: a dataset that fits is moved to the device once and batches are
    gathered there; one that does not is batched in pinned host memory. Either way each batch is
    the CPU's batch, bit for bit."""
    from torch.utils.data import TensorDataset

    from raytrain_ft.data import BatchStream, dataset_on_device

    gen = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(512, 3, 8, 8, generator=gen), torch.randint(0, 10, (512,)))
    moved, on_device = dataset_on_device(ds, "cuda:0")
    kept, not_moved = dataset_on_device(ds, "cuda:0", max_fraction=0.0)
    assert on_device and not not_moved and kept is ds
    kw = dict(seed=1, rank=1, num_workers=2, batch_size=32, start_step=0, end_step=20)
    streams = {
        "cpu": BatchStream(ds, **kw),
        "device": BatchStream(moved, **kw),
        "pinned": BatchStream(ds, pin_memory=True, **kw),
    }
    for _ in range(20):
        (xc, yc), (xd, yd), (xp, yp) = (streams[k].next() for k in ("cpu", "device", "pinned"))
        assert xd.is_cuda and xp.is_pinned() and yp.is_pinned()
        assert torch.equal(xd.cpu(), xc) and torch.equal(yd.cpu(), yc)
        assert torch.equal(xp, xc) and torch.equal(yp, yc)
    for s in streams.values():
        s.close()


def test_codecs_on_the_gpu_give_the_numpy_codecs_bits():
    """What a GPU worker pushes with a codec (encoded on the device, ties included) is what the
    numpy codec sends, bit for bit; so is the residual error feedback keeps on the device."""
    import numpy as np

    from raytrain_ft.compression import ErrorFeedback, decode_push, parse_codec

    rng = np.random.default_rng(0)
    for spec in ("fp16", "topk:0.01", "onebit"):
        host = ErrorFeedback(parse_codec(spec), 100_000)
        dev = ErrorFeedback(parse_codec(spec), 100_000, torch.device("cuda:0"))
        for _ in range(5):
            g = rng.standard_normal(100_000).astype(np.float32)
            g[::50] = 3.0  # ties at the top-k threshold
            a, b = host.encode(g), dev.encode(torch.from_numpy(g).cuda())
            for x, y in zip(a.arrays, b.arrays):
                assert np.array_equal(x.view(np.uint8), y.view(np.uint8)), spec
            assert np.array_equal(decode_push(a), decode_push(b))
            assert np.array_equal(host.residual, dev.residual_host()), spec
