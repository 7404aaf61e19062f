"""Shared fixtures. Ray instances started here use a private temp dir and are always shut down."""

import os
import shutil
import tempfile

import pytest

SECOND_STREAM = (
    "tests/unit/",
    "tests/sim/",
    "tests/integration/test_cli.py",
    "tests/integration/test_jobs.py",
    "tests/chaos/test_chaos.py::test_kill_a_node_of_three",
)
"""Tests that use no Ray of this session (``ray_local``): the unit tests and the simulator start
none, the CLI and job tests start their own (in a subprocess, or a head of their own). The node
test's run is a CLI subprocess with its own 3-node cluster too (its fault-free baseline's hash is
read from the other stream, ``RUN_LAST``; it takes ~45 s off the longer stream). With ``-n
2`` (pyproject's addopts) they run in one pytest worker while the other runs every test on the
session's Ray, one after another as without xdist. Spreading the Ray tests over both workers
(xdist's default) measured no gain on two cores; these streams share them better: the second
stream's CPU fits beside the first's process starts and waits."""


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist (the test extras install it)
def pytest_xdist_make_scheduler(config, log):
    """Two streams of tests (``SECOND_STREAM`` and the rest), not xdist's test-by-test spread."""
    from xdist.scheduler import LoadScopeScheduling

    class TwoStreams(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "second" if nodeid.startswith(SECOND_STREAM) else "session-ray"

    return TwoStreams(config, log)


RUN_LAST = ("tests/chaos/test_chaos.py::test_kill_a_node_of_three",)
"""Tests run after every other of their stream: the node test reads the baseline hash the other
stream's chaos tests computed at their start (it needs no Ray of this stream then)."""


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.nodeid.startswith(RUN_LAST))  # stable: the rest keep order


# Ray 2.60 enables token auth by default; the local test clusters opt out explicitly.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def ray_tmpdir():
    # short path: Ray's socket paths must stay under the OS limit
    d = tempfile.mkdtemp(prefix="rtft-", dir="/tmp")
    os.environ["RAY_TMPDIR"] = d
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def ledger_dir(ray_tmpdir):
    """Where workers write their ledgers of acknowledged pushes (I1 is checked against them)."""
    from raytrain_ft.actors.worker import LEDGER_DIR_ENV_VAR

    d = os.path.join(ray_tmpdir, "ledgers")
    os.makedirs(d, exist_ok=True)
    os.environ[LEDGER_DIR_ENV_VAR] = d  # Ray's workers inherit the driver's environment
    return d


@pytest.fixture(scope="session")
def ray_local(ray_tmpdir, ledger_dir):
    """One small local Ray for the integration tests of the session."""
    import ray

    # num_gpus=0: the CPU tests compare with CPU references; on a machine with GPUs, use_gpu=auto
    # would take them
    ray.init(
        num_cpus=4,
        num_gpus=0,
        include_dashboard=False,
        _temp_dir=ray_tmpdir,
        logging_level="WARNING",
    )
    try:
        yield ray
    finally:
        ray.shutdown()
