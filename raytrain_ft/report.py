"""Human-facing output of a run: the progress line, the recovery line, and the PNG report of a JSON summary.

Pure (no Ray); matplotlib is needed only by ``render_png`` (``pip install 'raytrain-ft[plot]'``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from raytrain_ft.errors import DataError


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def progress_line(step: int, total_steps: int, loss: float, accuracy: float, samples_per_sec: float, elapsed_s: float, width: int = 30) -> str:
    frac = step / total_steps if total_steps else 1.0
    filled = min(width, int(frac * width))
    return (f"[{'#' * filled}{'.' * (width - filled)}] step {step}/{total_steps} loss {_num(loss, '.4f')} "
            f"acc {_num(accuracy, '.3f')} {samples_per_sec:,.0f} samples/s {elapsed_s:.0f}s")


def recovery_line(event: dict[str, Any]) -> str:
    """One line saying what failed and how the run survived it."""
    role, index, took = event["role"], event["index"], event.get("duration_s", 0.0)
    source = event.get("source", "")
    if source == "replica":
        what = "replica holder" if role == "replica" else "parameter server"
        detail = f"rebuilt from its peer's replica, {event.get('replayed', 0)} commands replayed"
        if role == "server":
            detail += f", {event.get('steps_lost', 0)} steps lost"
        return f"recovered: {what} {index} died; {detail}; serving again after {took:.3f}s"
    if source == "checkpoint":
        return (f"recovered: parameter server {index} died; all shards rolled back to the checkpoint of step {event.get('step')} "
                f"({event.get('steps_lost', 0)} steps lost); serving again after {took:.3f}s")
    if role == "worker":
        return f"recovered: worker {index} died; restarted at step {event.get('step')} after {took:.3f}s"
    return f"recovered: {role} {index} ({source}) after {took:.3f}s"


@dataclass(frozen=True, slots=True)
class Marker:
    """An event on the report's time axis (seconds since the run started)."""

    t_s: float
    end_s: float
    kind: str
    """kill | recovery"""
    label: str


def markers(summary: dict[str, Any]) -> list[Marker]:
    """Kills and recoveries of a summary on the history's time axis (t=0 at ``started_at``)."""
    t0 = summary.get("started_at") or 0.0
    out = []
    for k in summary.get("kills", []):
        at = k.get("at")
        if at is not None:
            out.append(Marker(at - t0, at - t0, "kill", str(k.get("kill", "kill"))))
    for e in summary.get("recoveries", []):
        if "detected_at" in e and "serving_at" in e:
            out.append(Marker(e["detected_at"] - t0, e["serving_at"] - t0, "recovery",
                              f"{e['role']} {e['index']} ({e.get('source', '')}, {e.get('duration_s', 0):.2f}s)"))
    return sorted(out, key=lambda m: m.t_s)


def load_summary(path: str) -> dict[str, Any]:
    try:
        with open(path) as fh:
            summary = json.load(fh)
    except OSError as e:
        raise DataError(path, f"cannot read the run summary ({e.strerror}); pass the file written by --output-json") from None
    except json.JSONDecodeError as e:
        raise DataError(path, f"is not JSON ({e.msg} at line {e.lineno}); pass the file written by --output-json") from None
    if not isinstance(summary, dict) or not summary.get("history"):
        raise DataError(path, "holds no 'history' of the run; write it with `raytrain-ft train --output-json` (this version or later)")
    return summary


def render_png(summary: dict[str, Any], path: str) -> None:
    """Loss and training accuracy over time, with kills (red lines) and recoveries (shaded, from noticed to serving)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DataError(path, "rendering needs matplotlib: pip install 'raytrain-ft[plot]'") from None
    hist = summary["history"]
    t = [h["t"] for h in hist]
    fig, (ax_loss, ax_acc) = plt.subplots(2, 1, sharex=True, figsize=(9, 6))
    ax_loss.plot(t, [math.nan if h["loss"] is None else h["loss"] for h in hist], color="tab:blue")
    ax_loss.set_ylabel("training loss")
    ax_acc.plot(t, [math.nan if h["accuracy"] is None else h["accuracy"] for h in hist], color="tab:green")
    ax_acc.set_ylabel("training accuracy")
    ax_acc.set_xlabel("seconds since the workers started")
    for m in markers(summary):
        for ax in (ax_loss, ax_acc):
            if m.kind == "kill":
                ax.axvline(m.t_s, color="tab:red", linestyle="--", linewidth=1)
            else:
                ax.axvspan(m.t_s, max(m.end_s, m.t_s + 0.02), color="tab:orange", alpha=0.35)
        if m.kind == "recovery":
            ax_loss.annotate(m.label, (m.end_s, 1.0), xycoords=("data", "axes fraction"), fontsize=7, rotation=90, va="top", ha="left")
    cfg = summary.get("config", {})
    mode = cfg.get("mode", "?")
    cluster = cfg.get("cluster", {})
    acc = summary.get("eval_accuracy")
    fig.suptitle(f"{summary.get('run_id', '')}: {cfg.get('model', {}).get('name', '?')}, {mode}, {cluster.get('num_workers', '?')} workers x "
                 f"{cluster.get('num_servers', '?')} servers; eval accuracy {_num(acc, '.4f')}; "
                 f"{len(summary.get('recoveries', []))} recoveries (shaded), kills dashed", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
