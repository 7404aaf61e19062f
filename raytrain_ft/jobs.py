"""Submit a training run to a running Ray cluster as a Ray job (Job Submission API).

    handle = submit(TrainConfig(...), address="http://127.0.0.1:8265")
    handle.wait()                  # SUCCEEDED | FAILED | STOPPED
    summary = handle.result()      # the run's JSON summary, read from the job's logs

The job's driver runs ``raytrain-ft train`` on the head node with the config
passed as JSON; it joins the cluster through ``RAY_ADDRESS`` and prints its
summary on one line that starts with ``SUMMARY_MARKER``.

Authentication: Ray token authentication is read the way Ray reads it --
``RAY_AUTH_TOKEN``, else the file named by ``RAY_AUTH_TOKEN_PATH``, else
``~/.ray/auth_token`` -- and sent as a bearer token on every request.

The same token code checks a Ray (GCS) address before ``train --address`` and
``chaos`` call ``ray.init``: ``check_ray_address`` resolves ``auto`` (refusing
to pick one of several local instances) and asks the address one cheap gRPC
question with the token ``ray.init`` would send, so a port that is not Ray, a
silent one, or a cluster that refuses the token ends in one line, in seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raytrain_ft.config import TrainConfig
from raytrain_ft.errors import ClusterError, ConfigError, JobError

SUMMARY_MARKER = "RAYTRAIN_FT_SUMMARY "
"""A job's driver prints its JSON summary on one line after this marker."""

ADDRESS_ENV_VARS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
"""Where the dashboard address is read from when none is given (as Ray's job CLI does)."""
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
"""The dashboard as ``ray dashboard cluster.yaml`` forwards it."""
TOKEN_ENV_VAR = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV_VAR = "RAY_AUTH_TOKEN_PATH"
AUTH_MODE_ENV_VAR = "RAY_AUTH_MODE"
RAY_ADDRESS_ENV_VAR = "RAY_ADDRESS"
GCS_PROBE_METHOD = "/ray.rpc.NodeInfoGcsService/GetClusterId"
"""The first call a Ray driver makes to the GCS (an empty request): the probe of
``check_ray_address``."""
TERMINAL_STATES = ("SUCCEEDED", "FAILED", "STOPPED")
NO_TOKEN_HINT = (
    f"set {TOKEN_ENV_VAR}, or {TOKEN_PATH_ENV_VAR} to a file holding it, or put it in "
    "~/.ray/auth_token "
    "(print the cluster's token on the head with `ray get-auth-token`)"
)


@dataclass(frozen=True, slots=True)
class Token:
    value: str
    source: str
    """Where it was found: the env var or the file."""


def find_token(
    environ: Mapping[str, str] | None = None, home: str | os.PathLike | None = None
) -> Token | None:
    """The Ray auth token, in Ray's order: ``RAY_AUTH_TOKEN``, the file ``RAY_AUTH_TOKEN_PATH``,
    ``~/.ray/auth_token``.

    A ``RAY_AUTH_TOKEN_PATH`` that cannot be read or is empty is an error (as in Ray), not a silent
    fallback."""
    environ = os.environ if environ is None else environ
    value = environ.get(TOKEN_ENV_VAR, "").strip()
    if value:
        return Token(value, TOKEN_ENV_VAR)
    path = environ.get(TOKEN_PATH_ENV_VAR)
    if path:
        try:
            value = Path(path).expanduser().read_text().strip()
        except OSError as e:
            raise ClusterError(
                f"{TOKEN_PATH_ENV_VAR}={path!r} cannot be read ({e.strerror}); point it at the "
                "file holding the cluster's token"
            ) from None
        if not value:
            raise ClusterError(
                f"{TOKEN_PATH_ENV_VAR}={path!r} is empty; put the cluster's token in it (`ray "
                "get-auth-token` on the head)"
            )
        return Token(value, path)
    default = Path(home if home is not None else Path.home()) / ".ray" / "auth_token"
    if default.is_file():
        value = default.read_text().strip()
        if value:
            return Token(value, str(default))
    return None


def resolve_address(address: str | None, environ: Mapping[str, str] | None = None) -> str:
    """The dashboard's HTTP address: ``address``, else ``RAY_API_SERVER_ADDRESS``/``RAY_ADDRESS``
    (an http one), else the forwarded default."""
    environ = os.environ if environ is None else environ
    field = "--address"
    if not address:
        for var in ADDRESS_ENV_VARS:
            if environ.get(var, "").startswith(("http://", "https://")):
                address, field = environ[var], var
                break
        else:
            address = DEFAULT_ADDRESS
    if "://" not in address:
        address = "http://" + address
    if not address.startswith(("http://", "https://")):
        raise ConfigError(
            field,
            f"{address!r} is not the dashboard's HTTP address; give http://HEAD:8265 (the job API "
            "lives on the dashboard port)",
        )
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(address)
        _ = parts.port  # raises on a port that is no number or out of range
    except ValueError as e:
        raise ConfigError(field, f"{address!r}: {e}; give http://HEAD:8265") from None
    if not parts.hostname:
        raise ConfigError(field, f"{address!r} names no host; give http://HEAD:8265")
    return address.rstrip("/")


@contextlib.contextmanager
def _address_env_hidden():
    """Ray's job client takes RAY_API_SERVER_ADDRESS or RAY_ADDRESS over the address it is given:
    hidden while it is built, the client talks to the address resolved here (the flag's)."""
    saved = {var: os.environ.pop(var) for var in ADDRESS_ENV_VARS if var in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


# --- a Ray (GCS) address, for ray.init: train --address, chaos --------------------


@dataclass(frozen=True, slots=True)
class RayAuth:
    """What ``ray.init`` sends a cluster, decided as Ray 2.60 decides it."""

    mode: str | None
    """``RAY_AUTH_MODE`` as set (lower case), None when unset."""
    sent: Token | None
    """The token ``ray.init`` sends: with ``RAY_AUTH_MODE=token``, or with it unset for ``auto``
    (never for an explicit address); never with ``disabled``."""
    found: Token | None
    """The token found where Ray looks (``find_token``), sent or not."""
    auto: bool = False
    """The address is ``auto`` (Ray then sends a token it finds even with ``RAY_AUTH_MODE``
    unset)."""

    @property
    def needs_mode(self) -> bool:
        """A token put in place now would be sent only once ``RAY_AUTH_MODE=token`` is set."""
        return self.mode == "disabled" or (self.mode is None and not self.auto)


AUTH_MODES = ("token", "disabled")


def check_auth_mode(environ: Mapping[str, str] | None = None) -> None:
    """``RAY_AUTH_MODE``, when set, is a mode Ray 2.60 knows: it reads any other value (a typo of
    ``token``) as no authentication, without a word."""
    environ = os.environ if environ is None else environ
    raw = environ.get(AUTH_MODE_ENV_VAR)
    if raw is not None and raw.strip().lower() not in AUTH_MODES:
        raise ConfigError(
            AUTH_MODE_ENV_VAR,
            f"{raw!r} is not a mode Ray knows; set token (send a token) or disabled, or unset it "
            "(Ray runs without authentication for any other value)",
        )


def ray_auth(
    address: str | None,
    environ: Mapping[str, str] | None = None,
    home: str | os.PathLike | None = None,
) -> RayAuth:
    """What ``ray.init(address=address)`` will send; ClusterError (saying where to put it) when
    ``RAY_AUTH_MODE=token`` and no token is found, as ``ray.init`` would fail then."""
    environ = os.environ if environ is None else environ
    mode = environ.get(AUTH_MODE_ENV_VAR, "").strip().lower() or None
    try:
        found = find_token(environ, home)
    except ClusterError:
        if mode == "disabled":  # Ray does not look then
            found = None
        else:
            raise
    if mode == "token" and found is None:
        raise ClusterError(f"{AUTH_MODE_ENV_VAR}=token and no token was found: {NO_TOKEN_HINT}")
    auto = address in (None, "", "auto")
    sends = mode == "token" or (mode is None and auto)
    return RayAuth(mode, found if sends else None, found, auto)


def resolve_ray_address(
    address: str,
    field: str = "--address",
    environ: Mapping[str, str] | None = None,
    candidates=None,
) -> str:
    """``address``, with ``auto`` read as ``ray.init`` reads it (``RAY_ADDRESS``, else the Ray
    instance running on this machine) -- except that several local instances are an error listing
    them instead of a silent pick. ``candidates``: the local GCS addresses (default: Ray's own scan
    of this machine's raylet processes)."""
    if address != "auto":
        return address
    environ = os.environ if environ is None else environ
    env = environ.get(RAY_ADDRESS_ENV_VAR, "").strip()
    if env and env != "auto":
        return env
    from ray._private import services

    found = sorted(services.find_gcs_addresses() if candidates is None else candidates)
    if len(found) > 1:
        raise ClusterError(
            f"{field} auto: {len(found)} Ray instances run on this machine ({', '.join(found)}); "
            f"give the one to use as {_flag(field)} HOST:PORT"
        )
    if found:
        return found[0]
    latest = services.find_bootstrap_address(None) if candidates is None else None
    if latest:
        return latest
    raise ClusterError(
        f"{field} auto: no Ray instance runs on this machine; start one (`ray start --head`) or "
        f"give {_flag(field)} HOST:PORT"
    )


def probe_ray(
    address: str,
    field: str = "--address",
    timeout_s: float = 5.0,
    auth: RayAuth | None = None,
    environ: Mapping[str, str] | None = None,
) -> None:
    """Ask ``host:port`` (or ``ray://host:port``) one cheap gRPC question with the token
    ``ray.init`` would send (``auth``, default: for this explicit address); ClusterError with one
    line when it is not Ray (an HTTP server such as the dashboard, a silent port) or the cluster
    refuses the token. A listening port is assumed (``check_ray_address``
    tests that first)."""
    import grpc

    environ = os.environ if environ is None else environ
    if environ.get("RAY_USE_TLS", "0").strip().lower() in ("1", "true"):
        return  # a TLS cluster: ray.init's own handshake (with the TLS files) decides
    auth = auth if auth is not None else ray_auth(address, environ)
    client = address.startswith("ray://")
    target = address.split("://", 1)[-1].rstrip("/")
    metadata = [("authorization", f"Bearer {auth.sent.value}")] if auth.sent else None
    channel = grpc.insecure_channel(
        target, options=[("grpc.enable_http_proxy", 0)]
    )  # straight to the port, as Ray connects
    try:
        call = channel.unary_unary(
            GCS_PROBE_METHOD, request_serializer=lambda _: b"", response_deserializer=lambda b: b
        )
        call(None, timeout=timeout_s, metadata=metadata)
    except grpc.RpcError as e:
        code, details = e.code(), " ".join((e.details() or "").split())
        if code == grpc.StatusCode.UNAUTHENTICATED:
            raise token_error(target, auth.sent, auth) from None
        if code == grpc.StatusCode.UNIMPLEMENTED and client:
            return  # the Ray Client server speaks gRPC but serves no GCS calls: it is there
        which = (
            "the Ray Client server, ray://HEAD:10001 by default"
            if client
            else "Ray's GCS, HEAD:6379 by default (`ray status` on the head shows it)"
        )
        if "http1" in details.lower() or "Failed parsing HTTP/2" in details:
            raise ClusterError(
                f"{field} {address!r} is not Ray: it answers like an HTTP server (the dashboard?), "
                "not gRPC; give the address "
                f"of {which}; only `submit`, `status`, `logs` and `stop` take the dashboard's http://HEAD:8265"
            ) from None
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise ClusterError(
                f"{field} {address!r} accepts connections but nothing answered like Ray within "
                f"{timeout_s:g}s; "
                f"give the address of {which}"
            ) from None
        if code == grpc.StatusCode.UNIMPLEMENTED:
            raise ClusterError(
                f"{field} {address!r} speaks gRPC but is not Ray's GCS (another Ray port?); give "
                f"the address of {which}"
            ) from None
        raise ClusterError(
            f"{field} {address!r} does not answer like Ray ({details[:160] or code.name}); give "
            f"the address of {which}"
        ) from None
    finally:
        channel.close()


def _flag(field: str) -> str:
    return "--address" if field == "cluster.address" else field


@contextlib.contextmanager
def signal_handlers_kept() -> Iterator[None]:
    """Around ``ray.init``: the process's Python handler for SIGTERM stays the one that runs.
    ``ray.init`` sets a Python handler of its own (``sys.exit(15)``) and its core worker a
    C-level one (it prints a stack dump, "*** SIGTERM received ...", then calls the handler before
    it); put back in front, the CLI's handler unwinds the run -- its actors stopped, Ray shut down
    -- without the dump. A SIGTERM during ``ray.init`` itself (Ray's handler then raised
    ``SystemExit(15)``) goes to the process's handler too. Only in the main thread, and only a
    Python handler (a process that left SIGTERM at its default keeps Ray's)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.getsignal(signal.SIGTERM)
    try:
        yield
    except SystemExit as e:
        if callable(before) and e.code == signal.SIGTERM:
            before(signal.SIGTERM, None)  # the process's own way to end on SIGTERM
        raise
    finally:
        if callable(before):
            signal.signal(signal.SIGTERM, before)


def check_ray_address(address: str, field: str = "--address", timeout_s: float = 5.0) -> str:
    """Check -- in seconds, not Ray's minutes of retries and warnings -- that ``address``
    (``HOST:PORT``, ``ray://HOST:PORT`` or ``auto``, resolved as ``ray.init`` resolves it but
    refusing several local instances) accepts a TCP connection, answers
    like Ray and takes the token ``ray.init`` will send; returns ``address`` for ``ray.init``."""
    import socket

    target = resolve_ray_address(address, field)
    hostport = target.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if (
        not sep
        or not host
        or not port.isdigit()
        or ("://" in target and not target.startswith("ray://"))
    ):
        raise ClusterError(f"{field} {target!r} is not HOST:PORT (or ray://HOST:PORT, or auto)")
    if not 0 < int(port) < 65536:
        raise ClusterError(f"{field} {target!r}: port {int(port)} is out of range (1-65535)")
    shown = target if target == address else f"{address} ({target})"
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        raise ClusterError(
            f"{field} {shown!r} is unreachable ({e}); start the cluster (`ray up cluster.yaml`) or "
            f"fix {_flag(field)}"
        ) from None
    probe_ray(target, field, timeout_s, ray_auth(address))
    return address


def ray_init_error(e: Exception, address: str, hint: str) -> ClusterError:
    """One line for a failed ``ray.init(address=...)``: the token message when Ray refused the
    token, else Ray's reason."""
    from ray.exceptions import AuthenticationError

    if isinstance(e, AuthenticationError):
        try:
            auth = ray_auth(address)
        except ClusterError as no_token:
            return no_token
        return token_error(address, auth.sent, auth)
    reason = " ".join(str(e).split())
    return ClusterError(f"could not connect to Ray at {address!r}: {reason[:300]}; check {hint}")


def job_config(config: TrainConfig) -> dict[str, Any]:
    """The config a job runs: the same run, joining the cluster it is submitted to."""
    if config.cluster.local_nodes > 1:
        raise ConfigError(
            "cluster.local_nodes",
            "simulated nodes are for local runs; a submitted job trains on the cluster's own nodes "
            "(set it to 1)",
        )
    raw = config.to_dict()
    raw["cluster"]["address"] = (
        None  # the driver joins through RAY_ADDRESS, which the job supervisor sets
    )
    return raw


def entrypoint(config: TrainConfig, python: str = "python") -> str:
    """The shell command the job runs on the head node. ``exec``: the driver replaces the shell
    Ray starts the command in, so the job's stop signals the driver itself (a shell that forks it,
    as dash does, let a stop sent while the driver was being forked miss it: the job read STOPPED
    while the run trained on)."""
    config_json = json.dumps(job_config(config), separators=(",", ":"))
    return (
        f"exec {python} -m raytrain_ft.cli train --emit-summary --config-json "
        f"{shlex.quote(config_json)}"
    )


def parse_summary(logs: str) -> dict[str, Any] | None:
    """The last summary line in a job's logs, or None."""
    for line in reversed(logs.splitlines()):
        at = line.find(SUMMARY_MARKER)
        if at >= 0:
            return json.loads(line[at + len(SUMMARY_MARKER) :])
    return None


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    token = find_token()
    headers = {"Authorization": f"Bearer {token.value}"} if token else None
    try:
        with _address_env_hidden():
            return JobSubmissionClient(address, headers=headers)
    except Exception as e:  # noqa: BLE001 -- translated to one message naming what to fix
        raise _cluster_error(e, address, token) from None


def token_error(address: str, token: Token | None, auth: RayAuth | None = None) -> ClusterError:
    """The one line for a cluster that refused the client: no token, or not the cluster's (job
    commands, train, chaos). ``auth``: what ``ray.init`` sends (``ray_auth``), when it is Ray itself
    that connects."""
    if token is not None:
        return ClusterError(
            f"the Ray cluster at {address} rejected the token from {token.source}; use the "
            "cluster's token (`ray get-auth-token` on the head)"
        )
    if auth is not None and auth.found is not None:
        return ClusterError(
            f"the Ray cluster at {address} requires token authentication, and Ray sends the token "
            f"from {auth.found.source} "
            f"only with {AUTH_MODE_ENV_VAR}=token ({AUTH_MODE_ENV_VAR} is {auth.mode or 'unset'}): "
            f"set {AUTH_MODE_ENV_VAR}=token"
        )
    also = f", and set {AUTH_MODE_ENV_VAR}=token" if auth is not None and auth.needs_mode else ""
    return ClusterError(
        f"the Ray cluster at {address} requires token authentication and no token was found: "
        f"{NO_TOKEN_HINT}{also}"
    )


def _cluster_error(e: Exception, address: str, token: Token | None) -> ClusterError:
    from ray.exceptions import AuthenticationError

    if isinstance(e, AuthenticationError):
        return token_error(address, token)
    if isinstance(e, ConnectionError):
        return ClusterError(
            f"no Ray dashboard answers at {address} ({e}); start the cluster (`ray up "
            "cluster.yaml`) and forward its dashboard "
            "(`ray dashboard cluster.yaml`), or fix --address"
        )
    return ClusterError(f"the job API at {address} failed: {e}")


class JobHandle:
    """One submitted run: ``status()``, ``logs()``, ``tail()``, ``stop()``, ``wait()``,
    ``result()``."""

    def __init__(self, job_id: str, address: str, client=None):
        self.job_id = job_id
        self.address = address
        self._client = client or _client(address)

    def __repr__(self) -> str:
        return f"JobHandle({self.job_id!r}, {self.address!r})"

    def _call(self, method: str, *args):
        try:
            return getattr(self._client, method)(self.job_id, *args)
        except RuntimeError as e:
            if "does not exist" in str(e) or "404" in str(e):
                raise JobError(
                    f"no job {self.job_id!r} on the cluster at {self.address}; list them with `ray "
                    f"job list --address {self.address}`"
                ) from None
            raise _cluster_error(e, self.address, find_token()) from None
        except Exception as e:  # noqa: BLE001
            raise _cluster_error(e, self.address, find_token()) from None

    def status(self) -> str:
        """PENDING | RUNNING | STOPPED | SUCCEEDED | FAILED."""
        return str(self._call("get_job_status").value)

    def info(self) -> dict[str, Any]:
        info = self._call("get_job_info")
        return {
            "job_id": self.job_id,
            "status": str(info.status.value),
            "message": info.message,
            "entrypoint": info.entrypoint,
            "start_time_ms": info.start_time,
            "end_time_ms": info.end_time,
            "driver_exit_code": getattr(info, "driver_exit_code", None),
        }

    def logs(self) -> str:
        return self._call("get_job_logs")

    def tail(self) -> Iterator[str]:
        """Log chunks as the job writes them, until it ends."""
        import asyncio

        self.status()  # a job the cluster does not know: one line (the log stream says 404)
        loop = asyncio.new_event_loop()
        agen = self._client.tail_job_logs(self.job_id)
        interrupted = False
        try:
            while True:
                try:
                    yield loop.run_until_complete(agen.__anext__())
                except StopAsyncIteration:
                    return
                except BaseException:  # Ctrl-C, a stop signal: the generator is mid-step
                    interrupted = True
                    raise
        finally:
            if not interrupted:  # closing a generator interrupted mid-step raises RuntimeError
                loop.run_until_complete(agen.aclose())
            loop.close()

    def stop(self) -> bool:
        """Ask the job to stop (its driver gets SIGTERM, then SIGKILL); False if it had already
        ended."""
        return bool(self._call("stop_job"))

    def wait(self, timeout_s: float | None = None, poll_s: float = 1.0) -> str:
        """Block until the job ends; its final status. JobError after ``timeout_s``."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            status = self.status()
            if status in TERMINAL_STATES:
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise JobError(
                    f"job {self.job_id} is still {status} after {timeout_s:.0f}s; wait longer or "
                    f"stop it (`raytrain-ft stop {self.job_id}`)"
                )
            time.sleep(poll_s)

    def result(self, timeout_s: float | None = None) -> dict[str, Any]:
        """Wait for the job and return its JSON summary; JobError if it did not succeed."""
        status = self.wait(timeout_s)
        logs = self.logs()
        if status != "SUCCEEDED":
            tail = "\n".join(logs.strip().splitlines()[-15:])
            raise JobError(
                f"job {self.job_id} ended {status}: {self.info()['message']}\n--- last lines of "
                f"its log ---\n{tail}"
            )
        summary = parse_summary(logs)
        if summary is None:
            raise JobError(
                f"job {self.job_id} succeeded but printed no {SUMMARY_MARKER.strip()} line; was it "
                "submitted by raytrain_ft.jobs?"
            )
        return summary


def submit(
    config: TrainConfig,
    address: str | None = None,
    runtime_env: dict | None = None,
    *,
    job_id: str | None = None,
    metadata: dict[str, str] | None = None,
    entrypoint_num_cpus: float = 0,
) -> JobHandle:
    """Submit ``config`` as a Ray job to the cluster whose dashboard is at ``address`` (default:
    ``RAY_API_SERVER_ADDRESS``, ``RAY_ADDRESS`` or http://127.0.0.1:8265). ``runtime_env`` is Ray's
    (e.g. ``{"pip": [...]}`` or ``{"working_dir": "."}`` when the cluster's nodes lack this
    package)."""
    from raytrain_ft.recovery.faults import check_kills_of

    check_kills_of(config)  # here, not on the cluster after the job started
    address = resolve_address(address)
    client = _client(address)
    command = entrypoint(config)
    try:
        submitted = client.submit_job(
            entrypoint=command,
            runtime_env=runtime_env,
            submission_id=job_id,
            metadata=metadata,
            entrypoint_num_cpus=entrypoint_num_cpus,
        )
    except Exception as e:  # noqa: BLE001
        if job_id and "already exists" in str(e):  # the server's 500 carries its traceback
            raise JobError(
                f"a job with id {job_id!r} already exists on the cluster at {address}; give "
                "another --job-id, or none (Ray then makes one)"
            ) from None
        raise _cluster_error(e, address, find_token()) from None
    return JobHandle(submitted, address, client)


def attach(job_id: str, address: str | None = None) -> JobHandle:
    """A handle on a job submitted earlier."""
    return JobHandle(job_id, resolve_address(address))


def print_chunks(chunks: Iterator[str], stream=sys.stdout) -> int:
    """Write the chunks as they come; how many characters were written."""
    written = 0
    for chunk in chunks:
        stream.write(chunk)
        stream.flush()
        written += len(chunk)
    return written
