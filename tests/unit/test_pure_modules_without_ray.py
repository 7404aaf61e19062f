"""The pure modules must import and work with Ray unimportable."""

import subprocess
import sys

PURE_MODULES = [
    "raytrain_ft",
    "raytrain_ft.config",
    "raytrain_ft.errors",
    "raytrain_ft.params",
    "raytrain_ft.optim",
    "raytrain_ft.shard",
    "raytrain_ft.consistency",
    "raytrain_ft.compression",
    "raytrain_ft.models",
    "raytrain_ft.data",
    "raytrain_ft.cli",
    "raytrain_ft.jobs",
    "raytrain_ft.report",
    "raytrain_ft.actors.metrics",
    "raytrain_ft.recovery",
    "raytrain_ft.recovery.command_log",
    "raytrain_ft.recovery.replay",
    "raytrain_ft.recovery.policy",
    "raytrain_ft.recovery.faults",
    "raytrain_ft.recovery.checkpoint",
    "raytrain_ft.protocol.messages",
    "raytrain_ft.protocol.server",
    "raytrain_ft.protocol.exchange",
    "raytrain_ft.protocol.supervisor",
    "raytrain_ft.sim",
    "raytrain_ft.sim.world",
    "raytrain_ft.sim.checker",
    "raytrain_ft.sim.bugs",
]

SCRIPT = """
import sys
sys.modules["ray"] = None  # any `import ray` now raises ImportError
import importlib
for name in {modules!r}:
    importlib.import_module(name)
import torch
from raytrain_ft.config import TrainConfig
from raytrain_ft.params import shard_ranges
from raytrain_ft.optim import make_optimizer, hyper_params
cfg = TrainConfig()
opt = make_optimizer(cfg.optim, 4)
p = torch.zeros(4)
opt.step(p, torch.ones(4), hyper_params(0, cfg.optim, 10))
assert len(shard_ranges(10, 3)) == 3
from raytrain_ft.sim import explore
assert explore(8, 1).violations == 0  # the whole protocol runs without Ray
assert "ray" not in [m for m in sys.modules if sys.modules[m] is not None and m.split(".")[0] ==
"ray"]
print("ok")
"""


def test_pure_modules_import_without_ray():
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(modules=PURE_MODULES)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")
