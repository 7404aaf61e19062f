"""Where a worker computes, and the flags that make a GPU compute the same bits every time (no Ray).

I2 -- a sync run with failures ends bitwise equal to the run without -- needs a restarted worker to
recompute a step with exactly the bits it had sent. On a GPU that takes, before the first CUDA
call of the process:

- ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (cuBLAS's deterministic workspace; without it deterministic
  mode raises at the first matmul), ``torch.use_deterministic_algorithms(True)``,
  ``cudnn.deterministic = True``, ``cudnn.benchmark = False`` (autotuning picks kernels by timing:
  another kernel, other bits);
- TF32 set explicitly (off by default: Ampere/Hopper convolutions and matmuls otherwise round inputs
  to 10 bits of mantissa, and results differ from the CPU reference and between cards).

It also needs the same device kind on every restart: a rank restarted on another GPU model, or on
the CPU under ``--use-gpu auto``, computes other bits. The summary records each rank's device name.
"""

from __future__ import annotations

import os

CUBLAS_WORKSPACE_ENV_VAR = "CUBLAS_WORKSPACE_CONFIG"
NOSET_CUDA_ENV_VAR = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"


def deterministic(tf32: bool = False) -> dict:
    """Set the process's deterministic-compute flags (call before the first CUDA call); returns what
    was set."""
    import torch

    os.environ.setdefault(CUBLAS_WORKSPACE_ENV_VAR, ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=False)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    return {
        "cublas_workspace": os.environ[CUBLAS_WORKSPACE_ENV_VAR],
        "deterministic_algorithms": True,
        "cudnn_benchmark": False,
        "tf32": tf32,
    }


def choose_device(
    requested: str,
    use_gpu: str,
    cuda_available: bool,
    gpu_ids,
    noset_visible: bool | None = None,
    index: int = 0,
) -> tuple[str, str | None]:
    """(device to train on, warning or None) for a worker the supervisor asked to use ``requested``
    ("cpu" or "cuda"), given the GPUs Ray assigned to this process (``ray.get_gpu_ids()``).

    - No GPU assigned (e.g. a process hosting several simulated ranks asks for none): the CPU, never
      a GPU Ray gave to another worker.
    - Ray narrows ``CUDA_VISIBLE_DEVICES`` to the assigned GPU, which torch then sees as ``cuda:0``;
      with ``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES`` set every GPU stays visible and the
      assigned id is the index.
    - A worker placed on a GPU its torch cannot use fails with ``use_gpu: true`` and falls back to
      the CPU with a warning under ``auto``.
    - Ranks sharing a process (``ranks_per_process``) take the process's GPUs in turn: the rank
      at ``index`` in its process trains on its ``index``-th GPU.
    """
    from raytrain_ft.errors import ClusterError

    if requested == "cpu":
        return "cpu", None
    gpu_ids = list(gpu_ids)
    if not gpu_ids:
        return "cpu", "no GPU was assigned to this process; training on the CPU"
    if not cuda_available:
        import torch

        why = (
            f"Ray assigned GPU {gpu_ids} to this worker "
            f"but torch {torch.__version__} sees no CUDA device"
        )
        if use_gpu == "true":
            raise ClusterError(
                f"{why}; install a CUDA build of torch on the GPU nodes, or set --use-gpu auto to "
                "train on their CPUs"
            )
        return "cpu", f"{why}; training on the CPU (use_gpu=auto)"
    if noset_visible is None:
        noset_visible = os.environ.get(NOSET_CUDA_ENV_VAR, "") not in ("", "0")
    i = index % len(gpu_ids)
    return (f"cuda:{int(gpu_ids[i])}" if noset_visible else f"cuda:{i}"), None


def device_name(device: str) -> str:
    """A human name of the device kind (the GPU model, or "cpu")."""
    if not device.startswith("cuda"):
        return "cpu"
    import torch

    return torch.cuda.get_device_name(torch.device(device))
