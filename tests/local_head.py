"""A real Ray head started with ``ray start --head`` for tests: free ports, a private temp dir, and
a shutdown that stops only the processes it started (never a global ``ray stop``)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

RAY_BIN = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports: every socket stays bound until all are chosen (ports taken one
    at a time can repeat, and Ray refuses two components on one port)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(n):
            s = stack.enter_context(socket.socket())
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
        return ports


def wait_for(condition, timeout_s: float, what: str, interval_s: float = 0.25):
    """Poll ``condition()`` until it returns something truthy; that value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(interval_s)


def _pids_with(marker: str) -> list[int]:
    """Processes whose command line or environment names ``marker`` (our private temp dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            blob = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker.encode() in blob:
            pids.append(int(entry.name))
    return pids


class LocalHead:
    """``ray start --head --block`` in its own session, with the dashboard (job API) and a metrics
    port."""

    def __init__(
        self,
        num_cpus: int = 4,
        env: dict | None = None,
        system_config: dict | None = None,
        autoscaling_config: str | None = None,
        gcs_port: int | None = None,
    ):
        self.temp_dir = tempfile.mkdtemp(
            prefix="rth-", dir="/tmp"
        )  # short: socket paths have a length limit
        ports = [p for p in free_ports(10) if p != gcs_port][:9]  # distinct, gcs_port too
        self.gcs_port = gcs_port or ports.pop()
        self.dashboard_port = ports.pop()
        self.metrics_port = ports.pop()
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        self.gcs_address = f"127.0.0.1:{self.gcs_port}"
        env = {**os.environ, **(env or {})}
        env["RAY_TMPDIR"] = self.temp_dir
        env["PATH"] = (
            str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
        )  # the job's `python` is this venv's
        env.pop("RAY_ADDRESS", None)
        self.env = env
        cmd = [
            RAY_BIN,
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={self.gcs_port}",
            f"--num-cpus={num_cpus}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--metrics-export-port={self.metrics_port}",
            f"--dashboard-agent-listen-port={ports.pop()}",
            f"--dashboard-agent-grpc-port={ports.pop()}",
            f"--runtime-env-agent-port={ports.pop()}",
            f"--ray-client-server-port={ports.pop()}",
            f"--node-manager-port={ports.pop()}",
            f"--object-manager-port={ports.pop()}",
            f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
        ]
        if system_config:
            cmd.append("--system-config=" + json.dumps(system_config, separators=(",", ":")))
        if autoscaling_config:
            cmd.append(f"--autoscaling-config={autoscaling_config}")
        self.log_path = os.path.join(self.temp_dir, "ray-start.log")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            cmd, env=env, start_new_session=True, stdout=self._log, stderr=subprocess.STDOUT
        )
        try:
            wait_for(self._dashboard_answers, 120, "the head's dashboard")
        except BaseException:
            self.shutdown()
            raise

    def _dashboard_answers(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(
                "`ray start --head` exited with "
                f"{self.proc.returncode}:\n{Path(self.log_path).read_text()[-3000:]}"
            )
        try:
            urllib.request.urlopen(self.dashboard_url + "/api/version", timeout=2)
            return True
        except urllib.error.HTTPError as e:
            return e.code in (401, 403)  # up, and asking for a token
        except OSError:
            return False

    def scrape(self) -> str:
        """The head's Prometheus endpoint (what the node's metrics agent exports)."""
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5
        ) as r:
            return r.read().decode()

    def shutdown(self) -> None:
        """SIGTERM to the head's session (`ray start --block` tears its node down), then SIGKILL
        what is left of it."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=2)  # a test head holds nothing to keep: kill what is left
        for _ in range(3):
            leftovers = _pids_with(self.temp_dir)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            for pid in leftovers:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            if not leftovers:
                break
            time.sleep(0.5)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        self._log.close()
        import shutil

        shutil.rmtree(self.temp_dir, ignore_errors=True)


def parse_prometheus(text: str) -> dict[str, list[tuple[dict, float]]]:
    """{series name: [(labels, value)]} from Prometheus text exposition."""
    out: dict[str, list[tuple[dict, float]]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, _, labels = head.partition("{")
        parsed = {}
        for part in labels.rstrip("}").split(","):
            if "=" in part:
                k, _, v = part.partition("=")
                parsed[k.strip()] = v.strip().strip('"')
        with contextlib.suppress(ValueError):
            out.setdefault(name, []).append((parsed, float(value)))
    return out
