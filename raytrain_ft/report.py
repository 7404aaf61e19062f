"""Human-facing output of a run: the progress line, the recovery line, and the PNG report of a JSON
summary.

Pure (no Ray); matplotlib is needed only by ``render_png`` (``pip install 'raytrain-ft[plot]'``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any

from raytrain_ft.errors import ConfigError, DataError


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def progress_line(
    step: int,
    total_steps: int,
    loss: float,
    accuracy: float,
    samples_per_sec: float,
    elapsed_s: float,
    width: int = 30,
    unit: str = "step",
) -> str:
    frac = step / total_steps if total_steps else 1.0
    filled = min(width, int(frac * width))
    return (
        f"[{'#' * filled}{'.' * (width - filled)}] {unit} {step}/{total_steps} loss "
        f"{_num(loss, '.4f')} "
        f"acc {_num(accuracy, '.3f')} {samples_per_sec:,.0f} samples/s {elapsed_s:.0f}s"
    )


def _what_happened(event: dict[str, Any]) -> str:
    """What happened to the replaced actor (``RecoveryEvent.cause``), as a verb phrase."""
    cause = event.get("cause", "died")
    if cause == "silent":
        fate = "its process was killed" if event["role"] == "worker" else "killed and fenced"
        return f"stopped answering for {event.get('silent_s') or 0:.1f}s (suspected: {fate})"
    if cause == "deposed":
        return "was deposed (a newer copy of its shard serves)"
    if cause == "rollback":
        return "was stopped for the rollback to a checkpoint"
    if cause == "process":
        return "was re-created with its process (another rank of it was lost)"
    return "died"


def recovery_line(event: dict[str, Any]) -> str:
    """One line saying what failed and how the run survived it."""
    role, index, took = event["role"], event["index"], event.get("duration_s", 0.0)
    source, happened = event.get("source", ""), _what_happened(event)
    if role == "replica":  # a slot that only held replicas (one shard: a dedicated holder)
        shards = " and ".join(f"shard {s}'s" for s in event.get("rereplicated") or ()) or "its"
        sent, seen = event.get("replicated_at"), event.get("detected_at")
        head = f"recovered: replica holder (server slot {index}) {happened}; a spare took its place"
        if sent is None or seen is None:  # the line comes as the spare takes over
            return f"{head}, and the replicas it held are being sent to it again"
        return f"{head}, and {shards} replica was sent to it again after {sent - seen:.3f}s"
    if source == "replica":
        detail = f"rebuilt from its peer's replica, {event.get('replayed', 0)} commands replayed"
        detail += f", {event.get('steps_lost', 0)} steps lost"
        if event.get("updates_lost"):  # relaxed durability: acknowledged updates it lacked
            detail += f", {event['updates_lost']} acknowledged updates lost"
        return (
            f"recovered: parameter server {index} {happened}; {detail}; serving again after "
            f"{took:.3f}s"
        )
    if source == "checkpoint":
        return (
            f"recovered: parameter server {index} {happened}; all shards rolled back to the "
            f"checkpoint of step {event.get('step')} "
            f"({event.get('steps_lost', 0)} steps lost); serving again after {took:.3f}s"
        )
    if role == "worker":
        step = event.get("step")
        return f"recovered: worker {index} {happened}; restarted at step {step} after {took:.3f}s"
    if role == "supervisor":
        return "recovered: the supervisor died; Ray restarted it and it read its registry back"
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
    for k in summary.get("kills") or []:  # null: none (check_summary accepts it)
        at = k.get("at")
        if at is not None:
            out.append(Marker(at - t0, at - t0, "kill", str(k.get("kill", "kill"))))
    for e in summary.get("recoveries") or []:
        if "detected_at" in e and "serving_at" in e:
            out.append(
                Marker(
                    e["detected_at"] - t0,
                    e["serving_at"] - t0,
                    "recovery",
                    f"{e['role']} {e['index']} ({e.get('source', '')}, "
                    f"{e.get('duration_s', 0):.2f}s)",
                )
            )
    return sorted(out, key=lambda m: m.t_s)


WRITE_IT = "write it with `raytrain-ft train --output-json` (this version or later)"


def _is_num(x: Any, optional: bool = False) -> bool:
    if x is None:
        return optional
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_time(x: Any, optional: bool = False) -> bool:
    """A number of seconds the report places on its time axis: finite (a loss may be NaN)."""
    return _is_num(x, optional) and (x is None or math.isfinite(x))


def _entries(path: str, summary: dict, key: str, what: str) -> list:
    entries = summary.get(key, [])
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise DataError(
            path, f"'{key}' is {json.dumps(entries)[:60]}, not a list of {what}; {WRITE_IT}"
        )
    return entries


def _bad(path: str, where: str, entry: Any, need: str) -> DataError:
    return DataError(path, f"{where} is {json.dumps(entry)[:80]}: {need}; {WRITE_IT}")


def check_summary(path: str, summary: Any) -> dict[str, Any]:
    """The parts of a run summary the report reads, checked: one DataError naming the file and the
    first bad entry."""
    if not isinstance(summary, dict) or not summary.get("history"):
        raise DataError(path, f"holds no 'history' of the run; {WRITE_IT}")
    for i, h in enumerate(_entries(path, summary, "history", "points")):
        if not (
            isinstance(h, dict)
            and _is_time(h.get("t"))
            and all(k in h and _is_num(h[k], optional=True) for k in ("loss", "accuracy"))
        ):
            raise _bad(
                path,
                f"history[{i}]",
                h,
                "each point needs t (a finite number), loss and accuracy (numbers or null)",
            )
    for i, e in enumerate(_entries(path, summary, "eval_history", "evaluations")):
        if not (
            isinstance(e, dict) and _is_time(e.get("t")) and _is_num(e.get("eval_accuracy"), True)
        ):
            raise _bad(
                path,
                f"eval_history[{i}]",
                e,
                "each evaluation needs t (a finite number) and eval_accuracy (a number or null)",
            )
    for i, k in enumerate(_entries(path, summary, "kills", "kills")):
        if not (isinstance(k, dict) and _is_time(k.get("at"), optional=True)):
            raise _bad(
                path, f"kills[{i}]", k, "each kill needs at (a finite time in seconds, or null)"
            )
    for i, e in enumerate(_entries(path, summary, "recoveries", "recoveries")):
        ok = isinstance(e, dict) and _is_time(e.get("duration_s", 0.0))
        if ok and ("detected_at" in e or "serving_at" in e):
            ok = (
                _is_time(e.get("detected_at"))
                and _is_time(e.get("serving_at"))
                and "role" in e
                and "index" in e
            )
        if not ok:
            raise _bad(
                path,
                f"recoveries[{i}]",
                e,
                "each recovery needs role, index, detected_at and serving_at (times in seconds)",
            )
    if not _is_time(summary.get("started_at"), optional=True):
        raise _bad(path, "'started_at'", summary["started_at"], "it must be a finite number")
    if not _is_num(summary.get("eval_accuracy"), optional=True):
        raise _bad(path, "'eval_accuracy'", summary["eval_accuracy"], "it must be a number")
    cfg = summary.get("config", {})
    if not isinstance(cfg, dict) or not all(
        isinstance(cfg.get(k, {}), dict) for k in ("model", "cluster")
    ):
        raise _bad(
            path,
            "'config'",
            cfg,
            "it must be the run's config (an object with model and cluster sections)",
        )
    return summary


def load_summary(path: str) -> dict[str, Any]:
    if os.path.isdir(path):
        raise DataError(path, "is a directory; pass the file written by --output-json")
    if os.path.exists(path) and not os.path.isfile(path):  # a FIFO would be read for ever
        raise DataError(path, "is not a regular file; pass the file written by --output-json")
    try:
        with open(path, encoding="utf-8") as fh:
            summary = json.load(fh)
    except OSError as e:
        raise DataError(
            path,
            f"cannot read the run summary ({e.strerror}); pass the file written by --output-json",
        ) from None
    except UnicodeDecodeError:
        raise DataError(
            path, "is not UTF-8 text; pass the JSON file written by --output-json"
        ) from None
    except RecursionError:
        raise DataError(
            path, "is nested too deeply for a run summary; pass the file written by --output-json"
        ) from None
    except json.JSONDecodeError as e:
        raise DataError(
            path,
            f"is not JSON ({e.msg} at line {e.lineno}); pass the file written by --output-json",
        ) from None
    return check_summary(path, summary)


def _draw_evals(ax, history: list, key: str, where: str) -> None:
    """``--eval-every-s``: the held-out ``key`` of the shards' parameters while training."""
    rows = [e for e in history if _is_num(e.get(key))]
    if rows:
        ax.plot(
            [e["t"] for e in rows],
            [e[key] for e in rows],
            color="tab:purple",
            marker=".",
            label=key.replace("_", " "),
        )
        ax.legend(fontsize=8, loc=where)


def render_png(summary: dict[str, Any], path: str, flag: str = "--output") -> None:
    """Loss and training accuracy over time, with kills (red lines) and recoveries (shaded, from
    noticed to serving). ``flag`` names where ``path`` came from in an error."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DataError(
            path, "rendering needs matplotlib: pip install 'raytrain-ft[plot]'"
        ) from None
    hist = summary["history"]
    t = [h["t"] for h in hist]
    dot = "." if len(hist) < 3 else None  # a line of one point draws nothing
    history = summary.get("eval_history") or []
    accuracy = [math.nan if h["accuracy"] is None else h["accuracy"] for h in hist]
    drawn_accuracy = any(_is_num(e.get("eval_accuracy")) for e in history) or not all(
        math.isnan(a) for a in accuracy
    )  # not in a regression
    fig, axes = plt.subplots(
        2 if drawn_accuracy else 1, 1, sharex=True, figsize=(9, 6 if drawn_accuracy else 3.6)
    )
    ax_loss, ax_acc = (axes[0], axes[1]) if drawn_accuracy else (axes, None)
    ax_loss.plot(
        t,
        [math.nan if h["loss"] is None else h["loss"] for h in hist],
        color="tab:blue",
        marker=dot,
        label="training loss",
    )
    ax_loss.set_ylabel("loss")
    _draw_evals(ax_loss, history, "eval_loss", "upper right")
    if ax_acc is not None:
        ax_acc.plot(t, accuracy, color="tab:green", marker=dot)
        ax_acc.set_ylabel("training accuracy")
        _draw_evals(ax_acc, history, "eval_accuracy", "lower right")
    (ax_acc or ax_loss).set_xlabel("seconds since the workers started")
    for m in markers(summary):
        for ax in [a for a in (ax_loss, ax_acc) if a is not None]:
            if m.kind == "kill":
                ax.axvline(m.t_s, color="tab:red", linestyle="--", linewidth=1)
            else:
                ax.axvspan(m.t_s, max(m.end_s, m.t_s + 0.02), color="tab:orange", alpha=0.35)
        if m.kind == "recovery":
            ax_loss.annotate(
                m.label,
                (m.end_s, 1.0),
                xycoords=("data", "axes fraction"),
                fontsize=7,
                rotation=90,
                va="top",
                ha="left",
            )
    cfg = summary.get("config", {})
    mode = cfg.get("mode", "?")
    cluster = cfg.get("cluster", {})
    acc = summary.get("eval_accuracy")
    score = (
        f"eval accuracy {_num(acc, '.4f')}"
        if acc is not None or summary.get("eval_loss") is None
        else f"eval loss {_num(summary['eval_loss'], '.4f')}"
    )
    fig.suptitle(
        f"{summary.get('run_id', '')}: {cfg.get('model', {}).get('name', '?')}, {mode}, "
        f"{cluster.get('num_workers', '?')} workers x "
        f"{cluster.get('num_servers', '?')} servers; {score}; "
        f"{len(summary.get('recoveries') or [])} recoveries (shaded), kills dashed",
        fontsize=9,
    )
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110, format="png")
    except OSError as e:
        raise ConfigError(
            flag, f"cannot write {path!r} ({e.strerror or e}); give a writable path"
        ) from None
    finally:
        plt.close(fig)


def server_plan_line(plan: dict) -> str:
    """One line saying what ``--num-servers auto`` chose (a summary's ``server_plan``)."""
    rest = ", ".join(f"{s}: {ms:.2f} ms" for s, ms in plan["predicted_exchange_ms"].items())
    return (
        f"servers: --num-servers auto chose {plan['chosen']} (predicted exchange per step by "
        f"shard count: {rest})"
    )


def is_a_terminal(stream) -> bool:
    """Whether ``stream`` is a terminal (a replaced stream without ``isatty``, or a closed one, is
    not)."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
