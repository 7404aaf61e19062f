"""Run metrics on Ray's Prometheus endpoint, through ``ray.util.metrics``.

Every node's metrics agent serves what the actors on it record at
``http://NODE:METRICS_EXPORT_PORT/metrics`` (Ray adds the ``ray_`` prefix;
counters also get ``_total``). Tags stay low-cardinality: the run id, and the
shard for server metrics (a handful of values) -- never a step or a rank.

Recording is a no-op outside a Ray worker (the actors built in-process by the
unit tests).
"""

from __future__ import annotations

from dataclasses import dataclass

PREFIX = "raytrain_ft_"

LATENCY_BOUNDARIES_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
STALENESS_BOUNDARIES = (0.5, 1.5, 2.5, 4.5, 8.5, 16.5, 32.5, 64.5)
"""Staleness is a whole number of updates; bucket ``le=0.5`` counts the fresh ones."""
RECOVERY_BOUNDARIES_S = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


@dataclass(frozen=True, slots=True)
class MetricSpec:
    name: str
    kind: str
    """counter | gauge | histogram"""
    description: str
    tag_keys: tuple[str, ...] = ("run_id",)
    boundaries: tuple[float, ...] = ()


CATALOGUE: tuple[MetricSpec, ...] = (
    # workers
    MetricSpec("steps", "counter", "Training steps finished by all workers"),
    MetricSpec("samples", "counter", "Training samples processed by all workers"),
    MetricSpec(
        "samples_per_second",
        "gauge",
        "Samples/s of one worker over its last steps (sum over workers for the run)",
    ),
    MetricSpec(
        "exchange_latency_seconds",
        "histogram",
        "Round trip of one worker-shard exchange: op=push_pull (push a gradient, get parameters) "
        "or op=pull",
        ("run_id", "op"),
        LATENCY_BOUNDARIES_S,
    ),
    # servers
    MetricSpec("updates", "counter", "Updates a shard applied", ("run_id", "shard")),
    MetricSpec(
        "staleness",
        "histogram",
        "Shard updates between the parameters a gradient was computed on and its application",
        ("run_id", "shard"),
        STALENESS_BOUNDARIES,
    ),
    MetricSpec(
        "replica_lag_seq",
        "gauge",
        "Updates a shard applied that its replica holder has not logged yet",
        ("run_id", "shard"),
    ),
    # supervisor
    MetricSpec(
        "recoveries",
        "counter",
        "Failures survived, by role (server, worker) and source (replica, checkpoint, restart)",
        ("run_id", "role", "source"),
    ),
    MetricSpec(
        "recovery_duration_seconds",
        "histogram",
        "From a failure noticed to the role serving again",
        ("run_id", "role", "source"),
        RECOVERY_BOUNDARIES_S,
    ),
)

SPECS = {s.name: s for s in CATALOGUE}


def prometheus_name(name: str) -> str:
    """The series name a scrape shows for catalogue metric ``name`` (histograms add
    _bucket/_sum/_count)."""
    spec = SPECS[name]
    full = "ray_" + PREFIX + name
    return full + "_total" if spec.kind == "counter" and not full.endswith("_total") else full


class Recorder:
    """The catalogue metrics one actor records, all tagged with ``run_id``."""

    def __init__(self, run_id: str, names: tuple[str, ...]):
        self.run_id = run_id
        self._metrics: dict = {}
        self._gauge_series: set[tuple[str, tuple]] = set()
        """(gauge, tags) of every gauge value set: ``retire`` zeroes them."""
        try:
            import ray
            from ray.util import metrics as ray_metrics
        except ImportError:
            return
        if not ray.is_initialized():
            return
        kinds = {
            "counter": ray_metrics.Counter,
            "gauge": ray_metrics.Gauge,
            "histogram": ray_metrics.Histogram,
        }
        for name in names:
            spec = SPECS[name]
            kwargs = {"boundaries": list(spec.boundaries)} if spec.kind == "histogram" else {}
            metric = kinds[spec.kind](
                PREFIX + name, description=spec.description, tag_keys=spec.tag_keys, **kwargs
            )
            metric.set_default_tags({"run_id": run_id})
            self._metrics[name] = metric

    @property
    def enabled(self) -> bool:
        return bool(self._metrics)

    def inc(self, name: str, value: float = 1.0, tags: dict | None = None) -> None:
        m = self._metrics.get(name)
        if m is not None and value > 0:
            m.inc(value, tags=tags)

    def set(self, name: str, value: float, tags: dict | None = None) -> None:
        m = self._metrics.get(name)
        if m is not None:
            m.set(value, tags=tags)
            self._gauge_series.add((name, tuple(sorted((tags or {}).items()))))

    def retire(self) -> None:
        """The actor's incarnation ended but its process lives on (kept warm for the next run):
        every gauge it set reads 0 -- the run no longer trains, nothing waits to be logged --
        instead of its last value for as long as the process lives."""
        for name, tags in self._gauge_series:
            self._metrics[name].set(0.0, tags=dict(tags) or None)
        self._gauge_series.clear()

    def observe(self, name: str, value: float, tags: dict | None = None) -> None:
        m = self._metrics.get(name)
        if m is not None:
            m.observe(value, tags=tags)


WORKER_METRICS = ("steps", "samples", "samples_per_second", "exchange_latency_seconds")
SERVER_METRICS = ("updates", "staleness", "replica_lag_seq")
SUPERVISOR_METRICS = ("recoveries", "recovery_duration_seconds")
