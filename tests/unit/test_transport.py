"""How messages travel (no Ray): pushes in inline parts, and replies whose parameters come back in
inline parts."""

import dataclasses
import time

import numpy as np
import pytest

from raytrain_ft.actors import INLINE_BYTES, PARTS_MAX_BYTES
from raytrain_ft.actors.transport import join_reply, reply_parts, split_reply, unpack
from raytrain_ft.protocol.messages import Push, PushReply


@pytest.mark.parametrize(
    "nbytes, parts",
    [
        (0, 0),
        (INLINE_BYTES, 0),  # inline as it is
        (INLINE_BYTES + 4, 2),
        (302_612, 4),  # a digits-CNN shard of two
        (PARTS_MAX_BYTES, -(-PARTS_MAX_BYTES // INLINE_BYTES)),
        (PARTS_MAX_BYTES + 4, 0),  # through the object store
    ],
)
def test_reply_parts_keep_every_part_inline(nbytes, parts):
    assert reply_parts(nbytes) == parts


def test_a_reply_split_into_parts_is_joined_back_bit_for_bit():
    params = np.random.default_rng(0).standard_normal(302_612 // 4).astype(np.float32)
    reply = PushReply(params, seq=7, acked=8)
    n = reply_parts(params.nbytes)
    bare, *pieces = split_reply(reply, n)
    assert bare.params is None and len(pieces) == n
    assert all(p.nbytes <= INLINE_BYTES for p in pieces)
    joined = join_reply(bare, pieces)
    assert joined.seq == 7 and joined.acked == 8 and np.array_equal(joined.params, params)


@pytest.mark.parametrize(
    "reply",
    [
        PushReply(None, seq=3, acked=0),  # no parameters asked for
        # larger than the parts were asked for: it goes whole (through the object store)
        PushReply(np.zeros(3 * INLINE_BYTES // 4, np.float32), seq=3, acked=4),
        "an answer of another kind",
    ],
    ids=["no-params", "too-large", "other"],
)
def test_a_reply_without_parameters_of_that_size_passes_whole(reply):
    first, *pieces = split_reply(reply, 2)
    assert first is reply and pieces == [None, None]
    assert join_reply(first, pieces) is reply


def test_a_push_in_parts_is_unpacked_whole():
    payload = np.arange(50_000, dtype=np.float32)
    push = Push(rank=1, step=2, payload=None)
    parts = np.array_split(payload, 3)
    assert np.array_equal(unpack(push, (3,), tuple(parts)).payload, payload)
    assert dataclasses.replace(push, payload=payload).step == 2


def test_a_sealed_value_is_unpickled_only_where_it_is_opened(tmp_path):
    """Passing a ``Sealed`` on (the supervisor) imports nothing its value needs; ``open`` returns
    the value. ``fractions`` stands for torch and the user's model module."""
    import pickle
    import subprocess
    import sys
    from fractions import Fraction

    from raytrain_ft.actors.transport import Sealed

    blob = tmp_path / "sealed.pkl"
    blob.write_bytes(pickle.dumps(Sealed.of({"x": Fraction(1, 3), "f": len})))
    code = (
        "import pickle, sys\n"
        f"s = pickle.loads(open({str(blob)!r}, 'rb').read())\n"
        "print('fractions' in sys.modules)\n"
        "v = s.open()\n"
        "print('fractions' in sys.modules, v['x'], v['f'] is len)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split("\n")
    assert out[:2] == ["False", "True 1/3 True"]


@pytest.mark.parametrize(
    "current, to, ray_name, answers",
    [
        ("run-b/server-0", "run-b/server-0", "run-a/server-3", True),  # addressed to what it is
        ("run-a/server-3", None, "run-a/server-3", True),  # its first incarnation, found by name
        ("run-b/server-0", None, "run-a/server-3", False),  # a late call of the earlier run
        ("run-b/server-0", "run-b/server-1", "run-a/server-3", False),  # another name
        (None, "run-b/server-0", "run-a/server-3", False),  # resting: no incarnation at all
        (None, None, "run-a/server-3", False),
    ],
)
def test_a_warm_process_answers_only_calls_for_the_incarnation_it_is(
    current, to, ray_name, answers
):
    from raytrain_ft.actors.warm import Gone, check_addressed

    if answers:
        check_addressed(current, to, ray_name)
    else:
        with pytest.raises(Gone):
            check_addressed(current, to, ray_name)


def test_a_warm_process_that_cannot_take_a_name_fails_its_start_as_a_new_process_would():
    """A constructor's ConfigError in a new process reaches the supervisor as a start failure with
    the project's own line; the same error in a warm process's ``become`` does too (not as a dead
    actor, which would be restarted again and again)."""
    from raytrain_ft.actors.transport import failure_of
    from raytrain_ft.actors.warm import BecomeFailed, Gone, become_failure
    from raytrain_ft.errors import ConfigError
    from raytrain_ft.protocol.messages import Failure, StartFailed

    class RayError(Exception):  # what ray.get raises: the actor's exception as its cause
        def __init__(self, cause):
            self.cause = cause

    text = become_failure(ConfigError("model.kwargs", "unknown argument 'depth'"))
    assert failure_of(RayError(BecomeFailed(text))) == StartFailed(
        "model.kwargs: unknown argument 'depth'"
    )
    assert failure_of(RayError(Gone("run-a/server-3 is gone"))) is Failure.DEAD
    assert failure_of(RayError(ValueError("a bug"))) is None  # re-raised by the caller


def test_a_warm_process_life_rests_is_claimed_serves_and_ends_only_when_unclaimed(monkeypatch):
    """``WarmLife`` alone (the server and the worker actor only run its timers): a rest offers the
    process and drops the incarnation; a timer that fires after a claimer took the key waits for
    the ``become`` instead of ending it; a timer of an earlier rest never ends a process that served
    and rested again since; a ``become`` that raised answers its name with the error and ends the
    process later; an unclaimed rest ends it."""
    from ray.experimental import internal_kv

    import raytrain_ft.actors
    from raytrain_ft.actors import warm
    from raytrain_ft.actors.warm import BECOME_WAIT_S, BecomeFailed, Gone, WarmLife

    pool: set[str] = set()
    monkeypatch.setattr(warm, "pool_key", lambda kind, node, name: f"{kind}/{node}/{name}")
    monkeypatch.setattr(raytrain_ft.actors, "stop_watching", lambda: True)
    monkeypatch.setattr(warm, "free_memory", lambda: None)
    monkeypatch.setattr(internal_kv, "_internal_kv_put", lambda key, value: pool.add(key))

    def delete(key):
        found = key in pool
        pool.discard(key)
        return int(found)

    monkeypatch.setattr(internal_kv, "_internal_kv_del", delete)
    timers, exits, dropped = [], [], []
    life = WarmLife("run-a/server-3", "server", lambda *timer: timers.append(timer), exits.append)
    life.name = "run-a/server-3"
    life.check(None)

    assert life.rest(30.0, "node", dropped.append) == "run-a/server-3"
    assert dropped == ["run-a/server-3"] and pool == {"server/node/run-a/server-3"}
    with pytest.raises(Gone):
        life.check("run-a/server-3")
    first = timers.pop()
    assert first == (30.0, 1, "server/node/run-a/server-3", False)

    # a claimer takes the key; the rest's timer fires before its become: wait, do not end
    assert delete("server/node/run-a/server-3") == 1
    life.rest_over(*first[1:])
    waiting = timers.pop()
    assert waiting == (BECOME_WAIT_S, 1, "server/node/run-a/server-3", True) and exits == []
    life.becoming()
    life.name = "run-b/server-0"
    life.rest_over(*waiting[1:])  # it serves: nothing
    assert exits == [] and timers == []
    with pytest.raises(RuntimeError, match="not resting"):
        life.becoming()

    # it rests again; the first rest's late timer must not end it (unclaimed now, not claimed then)
    life.rest(30.0, "node", dropped.append)
    second = timers.pop()
    life.rest_over(*waiting[1:])
    assert exits == [] and pool == {"server/node/run-a/server-3"}

    # claimed, and building the new incarnation raises
    delete("server/node/run-a/server-3")
    life.becoming()
    life.rest_over(*second[1:])  # the become in progress voided this rest's timer
    assert exits == [] and timers == []
    life.become_failed("run-c/server-0", ValueError("bad model"))
    with pytest.raises(BecomeFailed, match="ValueError: bad model"):
        life.check("run-c/server-0")
    with pytest.raises(Gone):
        life.check("run-b/server-0")
    ends = timers.pop()
    assert ends[0] == BECOME_WAIT_S and ends[3] is True
    life.rest_over(*ends[1:])
    assert exits == [0]

    # a process never claimed ends when its rest is over
    exits.clear()
    other = WarmLife(
        "run-a/worker-1", "worker-cpu1-gpu0", lambda *timer: timers.append(timer), exits.append
    )
    other.name = "run-a/worker-1"
    other.rest(5.0, "node", dropped.append)
    other.rest_over(*timers.pop()[1:])
    assert exits == [0] and "worker-cpu1-gpu0/node/run-a/worker-1" not in pool


def test_a_process_not_kept_warm_refuses_to_rest(monkeypatch):
    import raytrain_ft.actors
    from raytrain_ft.actors.warm import WarmLife

    monkeypatch.setattr(raytrain_ft.actors, "stop_watching", lambda: True)

    life = WarmLife("run-a/server-3", "", lambda *timer: None, lambda code: None)
    life.name = "run-a/server-3"
    with pytest.raises(RuntimeError, match="not kept warm"):
        life.rest(30.0, "node", lambda gone: None)
    life.check("run-a/server-3")  # still serving


def test_a_process_start_time_is_read_from_the_system():
    """The time edits to loaded modules are compared with: the process's own start (a module
    imported before the actor was built counts), not a moment later."""
    import subprocess
    import sys

    script = (
        "import time; t0 = time.time(); import torch; "
        "from raytrain_ft.actors.warm import process_started_at; "
        "print(t0 - process_started_at())"
    )
    ran_before_import = float(
        subprocess.run([sys.executable, "-c", script], capture_output=True, text=True).stdout
    )
    # the interpreter started before its first line ran (to /proc's 10 ms), and not long before
    assert -0.05 < ran_before_import < 10.0


def test_an_incarnation_unfit_after_its_constructor_answers_as_a_constructor_error(monkeypatch):
    """A server finds at its first Load that the user's factory built another model in its process:
    every later call to it -- by its protocol name or its Ray name -- gets the error as a
    constructor's (``failure_of`` reads a start failure), and the process ends later."""
    from raytrain_ft.actors.transport import failure_of
    from raytrain_ft.actors.warm import BECOME_WAIT_S, BecomeFailed, WarmLife
    from raytrain_ft.errors import ConfigError
    from raytrain_ft.protocol.messages import StartFailed

    timers, exits = [], []
    life = WarmLife("run-a/server-1", "", lambda *timer: timers.append(timer), exits.append)
    life.name = "run-a/server-1"
    raised = life.unfit(ConfigError("model.name", "the model built in this process differs"))
    assert isinstance(raised, BecomeFailed)
    for to in ("run-a/server-1", None):  # a fresh process is called by its Ray name
        with pytest.raises(BecomeFailed) as e:
            life.check(to)

        class RayError(Exception):
            cause = e.value

        assert failure_of(RayError()) == StartFailed(
            "model.name: the model built in this process differs"
        )
    (ends,) = timers
    assert ends[0] == BECOME_WAIT_S
    life.rest_over(*ends[1:])
    assert exits == [0]


def test_the_orphan_watch_ends_its_process_only_when_the_gcs_that_misses_the_supervisor_finds_it(
    monkeypatch,
):
    """The watch ends a server or worker process whose run's supervisor is gone. Ray answers "not
    found" for every GCS lookup error but a timeout, so while the GCS errs (the process's own
    actor not found either) nothing is concluded; once it finds this actor and still not the
    supervisor, two such misses end the process."""
    import threading
    import types

    import ray

    from raytrain_ft import actors

    state = {"gcs_errs": True, "asked": 0}
    ended = threading.Event()

    def get_actor(name, namespace):
        if name.endswith("/supervisor"):
            state["asked"] += 1
            raise ValueError(f"Failed to look up actor with name '{name}'")
        if state["gcs_errs"] or namespace != "raytrain_ft":  # the actors' namespace, not the job's
            raise ValueError(f"Failed to look up actor with name '{name}'")
        return object()

    release = threading.Event()

    def exit_(code):  # the process would end here; the watch's thread ends once released
        ended.set()
        release.wait(10)

    # the runtime context's namespace is the job's (an anonymous one), not the actors'
    context = types.SimpleNamespace(
        get_actor_name=lambda: "r1/worker-0", namespace="3f6c0ad8-job-namespace"
    )
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: context)
    monkeypatch.setattr(ray, "get_actor", get_actor)
    monkeypatch.setattr(actors.os, "_exit", exit_)
    monkeypatch.setenv(actors.ORPHAN_CHECK_ENV_VAR, "0.001")
    try:
        actors.watch_supervisor("r1", "raytrain_ft")
        deadline = time.monotonic() + 10
        while state["asked"] < 20 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert state["asked"] >= 20 and not ended.is_set()  # the GCS errs: no verdict
        state["gcs_errs"] = False
        assert ended.wait(10)  # the GCS answers and the supervisor is not there: gone
    finally:
        actors._watched[0] = None  # this process serves no run: the watch returns
        release.set()
        for t in threading.enumerate():
            if t.name == "orphan-watch":
                t.join(10)
