"""Kill specs, random schedules and checkpoint files (pure)."""

import re

import numpy as np
import pytest
import torch

from raytrain_ft.errors import ConfigError
from raytrain_ft.recovery.checkpoint import (
    latest_common_step,
    load_shard_checkpoint,
    save_shard_checkpoint,
)
from raytrain_ft.recovery.faults import (
    KillSpec,
    check_targets,
    parse_kill,
    parse_kills,
    random_schedule,
)


@pytest.mark.parametrize(
    "text, spec",
    [
        ("server:1@step=40", KillSpec("server", 1, "step", 40)),
        ("worker@time=2.5", KillSpec("worker", 0, "time", 2.5)),
        ("replica:0@snapshot=2", KillSpec("replica", 0, "snapshot", 2)),
        ("server:2@recovery=1", KillSpec("server", 2, "recovery", 1)),
        ("node:2@step=10", KillSpec("node", 2, "step", 10)),
        ("supervisor@step=5", KillSpec("supervisor", 0, "step", 5)),
        ("supervisor@recovery=1", KillSpec("supervisor", 0, "recovery", 1)),
        ("spare:0@rereplication=2", KillSpec("spare", 0, "rereplication", 2)),
    ],
)
def test_parse_kill(text, spec):
    assert parse_kill(text) == spec
    assert parse_kill(str(spec)) == spec


@pytest.mark.parametrize(
    "text, message",
    [
        ("server:1", "expected ROLE"),
        ("disk:1@step=3", "unknown role 'disk'"),
        ("server:x@step=3", "not an integer"),
        ("server@when=3", "expected ROLE"),
        ("worker@snapshot=1", "server or replica only"),
        ("worker@snapshot=1", "server or replica only"),
        ("node:0@step=3", "head node"),
        ("server@step=-1", ">= 0"),
    ],
)
def test_bad_kill_names_the_problem(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_kill(text)


def test_kills_from_a_comma_list_and_targets_checked():
    kills = parse_kills("server:0@step=3, worker:1@time=1")
    assert len(kills) == 2
    check_targets(kills, num_shards=2, num_workers=2, num_nodes=1)
    with pytest.raises(ConfigError, match="index 2 does not exist"):
        check_targets(parse_kills("server:2@step=1"), 2, 2, 1)
    with pytest.raises(ConfigError, match="cluster.local_nodes=N"):
        check_targets(parse_kills("node:1@step=1"), 2, 2, 1)


def test_random_schedule_is_seeded_and_bounded():
    a = random_schedule(
        3,
        mtbf_s=2.0,
        duration_s=60,
        roles=["server", "worker", "node"],
        sizes={"server": 2, "worker": 4, "node": 3},
    )
    assert a == random_schedule(
        3, 2.0, 60, ["server", "worker", "node"], {"server": 2, "worker": 4, "node": 3}
    )
    assert 10 < len(a) < 60 and all(0 < k.value < 60 for k in a)
    assert all(k.index >= 1 for k in a if k.role == "node") and all(
        k.index < 2 for k in a if k.role == "server"
    )
    with pytest.raises(ConfigError, match="choose from"):
        random_schedule(0, 1.0, 10, ["disk"], {})
    spaced = random_schedule(1, 2.0, 100, ["server"], {"server": 2}, min_gap_s=1.0)
    gaps = [b.value - a.value for a, b in zip(spaced, spaced[1:])]
    assert min(gaps) >= 1.0 - 1e-3 and 35 < len(spaced) < 65
    with pytest.raises(ConfigError, match="--mtbf-s > --min-gap-s"):
        random_schedule(0, 1.0, 10, ["server"], {}, min_gap_s=1.0)


def test_checkpoint_round_trip_and_newest_common_step(tmp_path):
    params = np.arange(6, dtype=np.float32)
    state = {"step_count": 4, "state": {"momentum": torch.ones(6)}}
    path = save_shard_checkpoint(str(tmp_path), 0, 4, params, state, {1: [0, 2]})
    loaded, step, opt, nbytes, skipped = load_shard_checkpoint(path)
    assert (
        np.array_equal(loaded, params)
        and step == 4
        and torch.equal(opt["state"]["momentum"], torch.ones(6))
        and nbytes > 0
        and skipped == {1: [0, 2]}  # fp16: a rank restored from it keeps its loss scale
    )
    save_shard_checkpoint(str(tmp_path), 1, 4, params, state)
    save_shard_checkpoint(str(tmp_path), 0, 8, params, state)  # shard 1 has not written step 8 yet
    assert latest_common_step(str(tmp_path), 2) == 4
    assert latest_common_step(str(tmp_path / "missing"), 2) is None


@pytest.mark.parametrize(
    "text, message",
    [
        ("server:0@step=nan", "'nan' is not a finite number"),
        ("server:0@step=inf", "'inf' is not a finite number"),
        ("worker:1@time=inf", "'inf' is not a finite number"),
        ("server:0@step=2.5", "@step takes a whole number"),
        ("server:0@step=1e3", "@step takes a whole number, got '1e3'"),  # as --steps refuses it
        ("server:0@step=20.0", "@step takes a whole number"),
        ("server:0@recovery=0", "@recovery counts from 1"),
        ("replica:0@snapshot=0", "@snapshot counts from 1"),
    ],
)
def test_kill_values_are_finite_whole_and_counted_from_one(text, message):
    with pytest.raises(ConfigError, match=message) as e:
        parse_kill(text)
    assert e.value.field == "chaos.kill"


def test_a_kill_given_twice_or_after_the_run_is_an_error():
    from raytrain_ft.recovery.faults import check_steps

    for twice in ("server:0@step=3,server:0@step=3", ["server@step=3", "server:0@step=3"]):
        with pytest.raises(ConfigError, match="the same kill is given twice") as e:
            parse_kills(twice)
        assert e.value.field == "chaos.kill"
    assert (
        len(parse_kills(["server:0@step=3", "server:0@step=4,worker:1@step=3"])) == 3
    )  # repeated flag, comma lists
    for stray in ("server:0@step=3,", "server:0@step=3,,worker:0@step=4", ["server:0@step=3", " "]):
        with pytest.raises(ConfigError, match="an empty kill between commas"):
            parse_kills(stray)
    kills = parse_kills("server:0@step=9,worker:0@time=500,server:1@recovery=7")
    check_steps(kills, total_steps=10)  # @time and event counts cannot be known ahead
    with pytest.raises(
        ConfigError,
        match=r"chaos.kill: server:0@step=10: the run ends after step 10, so this kill would never "
        r"fire",
    ):
        check_steps(parse_kills("server:0@step=10"), total_steps=10)


def test_kill_errors_use_the_dotted_field_name():
    for bad in (
        lambda: parse_kill("server:1"),
        lambda: check_targets(parse_kills("server:2@step=1"), 2, 2, 1),
    ):
        with pytest.raises(ConfigError) as e:
            bad()
        assert e.value.field == "chaos.kill" and str(e.value).startswith("chaos.kill: ")
    with pytest.raises(ConfigError) as e:
        parse_kills("server:1", "--kill")  # the chaos command's own flag
    assert e.value.field == "--kill"


@pytest.mark.parametrize(
    "text, message",
    [
        ("0:nan", "MS a number from 0 to 3,600,000"),
        ("0:inf", "MS a number from 0 to 3,600,000"),
        ("0:-5", "MS a number from 0"),
        ("0:100,0:200", "rank 0 is given twice"),
    ],
)
def test_bad_slow_workers_name_the_field(text, message):
    from raytrain_ft.recovery.faults import parse_slow

    with pytest.raises(ConfigError, match=message) as e:
        parse_slow(text, 2)
    assert e.value.field == "chaos.slow_workers"


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        ({"mtbf_s": float("nan")}, "--mtbf-s"),
        ({"mtbf_s": float("inf")}, "--mtbf-s"),
        ({"duration_s": float("inf")}, "--duration-s"),
        ({"min_gap_s": float("nan")}, "--min-gap-s"),
    ],
)
def test_random_schedules_need_finite_times(kwargs, flag):
    args = {
        "seed": 0,
        "mtbf_s": 2.0,
        "duration_s": 10.0,
        "roles": ["server"],
        "sizes": {"server": 2},
        "min_gap_s": 0.0,
    } | kwargs
    with pytest.raises(ConfigError) as e:
        random_schedule(**args)
    assert e.value.field == flag


def test_resume_from_says_what_is_wrong_with_the_directory(tmp_path):
    from raytrain_ft.errors import DataError
    from raytrain_ft.params import shard_ranges
    from raytrain_ft.trainer import check_resumable

    ranges = shard_ranges(12, 2, 12)
    with pytest.raises(
        DataError,
        match=r"missing: does not exist; recovery.resume_from takes the recovery.checkpoint_dir",
    ):
        check_resumable(str(tmp_path / "missing"), ranges)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match=r"file: is not a directory"):
        check_resumable(str(tmp_path / "file"), ranges)
    with pytest.raises(DataError, match=r"no step has a checkpoint file for each of the 2 shards"):
        check_resumable(str(tmp_path), ranges)
    (tmp_path / "shard-0-step-4.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "shard-1-step-4.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match=r"shard-0-step-4.pt: is not a readable checkpoint"):
        check_resumable(str(tmp_path), ranges)
    # written by 2 shards, resumed with 1: the count to give (it said no step had files)
    from raytrain_ft.errors import ConfigError

    with pytest.raises(
        ConfigError, match=r"written by 2 shards \(step 4, the newest\), this run has 1"
    ):
        check_resumable(str(tmp_path), shard_ranges(12, 1, 12))


def test_resuming_with_another_optimizer_than_the_checkpoints_is_refused(tmp_path):
    """Adam resumed from SGD's files would take SGD's step count with fresh moments (its bias
    correction wrong for the first updates)."""
    from raytrain_ft.config import OptimConfig
    from raytrain_ft.errors import ConfigError
    from raytrain_ft.optim import make_optimizer
    from raytrain_ft.params import shard_ranges
    from raytrain_ft.recovery.checkpoint import save_shard_checkpoint
    from raytrain_ft.trainer import check_resumable

    ranges = shard_ranges(12, 2, 12)
    sgd = make_optimizer(OptimConfig(name="sgd"), 6)
    for r in ranges:
        save_shard_checkpoint(str(tmp_path), r.index, 6, np.zeros(r.size), sgd.state_dict())
    assert check_resumable(str(tmp_path), ranges, "sgd") == 6
    with pytest.raises(ConfigError, match="hold sgd's state .*resume with optim.name='sgd'") as e:
        check_resumable(str(tmp_path), ranges, "adam")
    assert e.value.field == "optim.name"


def test_a_due_kill_waits_for_a_live_target_and_never_hits_one_twice(monkeypatch):
    """A spare kill due while the last spare was just taken (its successor not made yet) waits
    for the next spare instead of recording a kill of nobody; a name already killed is not a
    target again while the supervisor's targets still list it."""
    from raytrain_ft.actors import group
    from raytrain_ft.actors.supervisor import Targets
    from raytrain_ft.recovery.chaos import ChaosRunner

    killed = []
    monkeypatch.setattr(
        group, "kill_process", lambda handle, process: killed.append(handle) or "SIGKILL"
    )

    class FakeDirectory:
        def handle(self, name):
            return None if name == "dead-spare" else name  # Ray knows every other listed name

    def targets(spares, workers=(("w0", "h:1"),)):
        return Targets("run", 1, slots=(("s0", "h:2"),), workers=workers, spares=spares)

    runner = ChaosRunner(parse_kills("spare:0@step=5,worker:0@step=6,worker:0@step=7"), None)
    runner._directory = FakeDirectory()
    runner.targets = targets(spares=())
    runner.tick(6)  # the spare kill is due, no spare exists; the worker kill fires
    assert [r["kill"] for r in runner.fired] == ["worker:0@step=6"] and killed == ["w0"]
    runner.tick(7)  # the second worker kill: w0 still listed (not noticed yet), not hit twice
    assert len(runner.fired) == 1 and not runner.done
    runner.targets = targets(spares=(("dead-spare", "h:5"),))  # listed, but Ray knows it dead
    runner.tick(7)
    assert len(runner.fired) == 1 and killed == ["w0"]
    runner.targets = targets(spares=(("spare-2", "h:3"),), workers=(("w0-b", "h:4"),))
    runner.tick(8)
    assert sorted(r["target"] for r in runner.fired) == ["spare-2", "w0", "w0-b"]
    assert killed == ["w0", "spare-2", "w0-b"] and runner.done
    assert all(r["how"] == "SIGKILL" for r in runner.fired)


def test_a_live_run_kill_naming_what_the_run_lacks_is_refused(monkeypatch):
    """`raytrain-ft chaos` against a run of 2 shards, 2 workers and 1 spare: `spare:1` and
    `worker:2` name nothing; they are refused naming --kill (before, a missing spare waited for
    the run's end and a missing worker raised an IndexError)."""
    import ray

    from raytrain_ft.actors.supervisor import Targets
    from raytrain_ft.recovery.chaos import run_schedule

    status = type(
        "Status",
        (),
        {
            "state": "running",
            "targets": Targets(
                "run",
                2,
                (("s0", None), ("s1", None)),
                (("w0", None),) * 2,
                (("sp", None),),
                num_spares=1,
            ),
            "workers": (),
            "events": (),
        },
    )()

    done = type("Status", (), {"state": "done"})()
    calls = []

    class Supervisor:
        class status:  # noqa: N801 -- stands for the actor method
            @staticmethod
            def remote():  # the run goes on for a few polls, then ends (no test hangs)
                calls.append(1)
                return status if len(calls) % 5 else done

    monkeypatch.setattr(ray, "get", lambda ref: ref)
    for kill, message in (
        ("spare:1@step=5", "the run has 1 spare(s), index 1 does not exist"),
        ("worker:2@step=5", "the run has 2 worker(s), index 2 does not exist"),
        ("replica:2@time=1", "the run has 2 replica(s), index 2 does not exist"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)) as raised:
            run_schedule(Supervisor, parse_kills(kill))
        assert raised.value.field == "--kill"


def test_a_supervisor_kill_waits_for_the_incarnation_after_the_last_kill(monkeypatch):
    """Two supervisor kills a second apart: the second waits while Ray restarts the supervisor
    (it would land on no process and count as fired), and fires at the next live incarnation."""
    import types

    import ray

    from raytrain_ft.recovery.chaos import ChaosRunner

    kills: list = []
    monkeypatch.setattr(ray, "kill", lambda handle, no_restart: kills.append(no_restart))
    runner = ChaosRunner(parse_kills("supervisor@step=20,supervisor@step=21"), None)
    state = {"now": ("ALIVE", 0)}
    monkeypatch.setattr(runner, "_supervisor_incarnation", lambda: state["now"])
    runner.tick(20)
    assert kills == [False] and len(runner.fired) == 1
    runner.tick(21)  # Ray's GCS has not seen the kill yet: still the incarnation killed
    state["now"] = ("RESTARTING", 1)
    runner.tick(22)
    state["now"] = ("ALIVE", 1)  # the next incarnation
    assert kills == [False] and len(runner.fired) == 1 and not runner.done
    runner.tick(23)
    assert kills == [False, False] and [r["step"] for r in runner.fired] == [20, 23]
    assert runner.done
    # where Ray cannot say, a kill goes ahead as before
    runner = ChaosRunner(parse_kills("supervisor@step=1"), types.SimpleNamespace())
    runner.tick(1)
    assert len(runner.fired) == 1


def test_a_snapshot_kill_fires_once_in_whichever_server_reaches_it_first():
    """Every server carries every @snapshot kill; the claim (the GCS's put-if-absent in a run)
    lets exactly one process fire each. The slot's first actor never reaching its event (it was
    replaced before) must not keep the kill from firing in its replacement, and neither a
    replacement nor a restarted process fires a kill again."""
    from raytrain_ft.protocol.messages import Note
    from raytrain_ft.recovery.chaos import FaultHook, server_hook

    claimed: set[str] = set()  # the GCS's records of fired kills
    died: list[str] = []

    def put_if_absent(run_id, spec, how, target):
        fresh = spec not in claimed
        claimed.add(spec)
        return fresh

    def server(name):
        hook = server_hook("r", parse_kills("replica:0@snapshot=2,server:1@snapshot=1"))
        return FaultHook(
            "r", tuple(hook.pending), claim=put_if_absent, die=lambda: died.append(name)
        )

    first, replacement, later = server("holder-1"), server("holder-2"), server("holder-3")
    first.on_note(Note("snapshot_received", {"shard": 0, "n": 1, "seq": 5}))
    assert died == []  # its 1st snapshot of shard 0; then it is replaced
    replacement.on_note(Note("snapshot_received", {"shard": 1, "n": 2, "seq": 9}))
    assert died == []  # another shard's
    replacement.on_note(Note("snapshot_received", {"shard": 0, "n": 1, "seq": 12}))
    replacement.on_note(Note("snapshot_received", {"shard": 0, "n": 2, "seq": 20}))
    assert died == ["holder-2"]
    later.on_note(Note("snapshot_received", {"shard": 0, "n": 2, "seq": 30}))
    assert died == ["holder-2"]  # claimed already: never twice
    later.on_note(Note("snapshot_sent", {"shard": 1, "n": 1, "seq": 31}))
    assert died == ["holder-2", "holder-3"] and claimed == {
        "replica:0@snapshot=2",
        "server:1@snapshot=1",
    }


def test_a_supervisor_fired_kill_is_claimed_before_it_fires(monkeypatch):
    from raytrain_ft.protocol.messages import Note
    from raytrain_ft.recovery import chaos

    records, kills = [], []
    monkeypatch.setattr(chaos, "record_kill", lambda *a: records.append(a))
    taken = {"server:0@recovery=1"}  # an earlier incarnation fired it
    hook = chaos.FaultHook(
        "r",
        tuple(parse_kills("server:0@recovery=1,worker:1@recovery=2")),
        kill=lambda k, f: kills.append(str(k)) or ("SIGKILL", "worker-7"),
        claim=lambda run_id, spec, how, target: spec not in taken and not taken.add(spec),
    )
    hook.on_note(Note("recovery_started", {"n": 1, "shard": 0, "spare": "server-4"}))
    hook.on_note(Note("recovery_started", {"n": 2, "shard": 1, "spare": "server-5"}))
    assert kills == ["worker:1@recovery=2"]
    assert records == [("r", "worker:1@recovery=2", "SIGKILL", "worker-7")]


def test_the_driver_tells_each_kill_fired_inside_the_run_once(monkeypatch, caplog):
    """@snapshot / @recovery / @rereplication kills fire inside the run's processes; the driver
    says each in the same line as its own kills', once its record is there -- not while the
    supervisor has only claimed it (its target is not known yet), unless the run has ended."""
    import logging

    from raytrain_ft.recovery import chaos

    records: list[dict] = []
    monkeypatch.setattr(chaos, "kills_recorded", lambda run_id: list(records))
    monkeypatch.setattr(chaos, "INSIDE_LOOK_S", 0.0)
    kills = parse_kills("server:0@step=5,replica:0@snapshot=2,worker:1@recovery=1")
    runner = chaos.ChaosRunner(kills, supervisor_handle=None, run_id="r")

    def told() -> list[str]:
        lines = [r.getMessage() for r in caplog.records if r.name == chaos.__name__]
        caplog.clear()
        return lines

    with caplog.at_level(logging.INFO, logger=chaos.__name__):
        runner.tell_inside()
        assert told() == []
        records.append(
            {
                "kill": "replica:0@snapshot=2",
                "at": 2.0,
                "how": "SIGKILL of itself at snapshot_received",
                "target": "run-x/server-2",
            }
        )
        records.append(
            {
                "kill": "worker:1@recovery=1",
                "at": 3.0,
                "how": "firing at recovery_started",
                "target": "",
            }
        )
        runner.tell_inside()
        assert told() == [
            "[chaos] killed replica:0@snapshot=2 (run-x/server-2) (SIGKILL of itself at "
            "snapshot_received)"
        ]
        runner.tell_inside()
        assert told() == []  # once
        records[1] = {**records[1], "how": "SIGKILL", "target": "run-x/worker1-3"}
        runner.tell_inside()
        assert told() == ["[chaos] killed worker:1@recovery=1 (run-x/worker1-3) (SIGKILL)"]
        # a claim never completed (its supervisor died firing it) is told at the run's end
        runner = chaos.ChaosRunner(kills, supervisor_handle=None, run_id="r")
        records[:] = [{**records[1], "how": "firing at recovery_started", "target": ""}]
        runner.tell_inside()
        assert told() == []
        runner.tell_inside(final=True)
        assert told() == ["[chaos] killed worker:1@recovery=1 (firing at recovery_started)"]


def test_a_failed_run_tells_the_kills_fired_inside_it(monkeypatch, caplog):
    """A run that fails says the kills fired inside it before its failure's message, as a run
    that ended well does; a KV that does not answer leaves the failure's message alone."""
    import logging

    from raytrain_ft import trainer
    from raytrain_ft.recovery import chaos

    records = [{"kill": "replica:0@snapshot=2", "at": 2.0, "how": "SIGKILL", "target": "s-2"}]
    monkeypatch.setattr(chaos, "kills_recorded", lambda run_id: list(records))
    run = trainer._Run.__new__(trainer._Run)
    run.chaos = None
    run.tell_kills_of_a_failed_run()  # no kills asked for: nothing to tell
    run.chaos = chaos.ChaosRunner(parse_kills("replica:0@snapshot=2"), None, run_id="r")
    with caplog.at_level(logging.INFO, logger=chaos.__name__):
        run.tell_kills_of_a_failed_run()
    assert [r.getMessage() for r in caplog.records] == [
        "[chaos] killed replica:0@snapshot=2 (s-2) (SIGKILL)"
    ]

    def no_answer(run_id):
        raise ConnectionError("the GCS is gone")

    monkeypatch.setattr(chaos, "kills_recorded", no_answer)
    run.chaos = chaos.ChaosRunner(parse_kills("replica:0@snapshot=2"), None, run_id="r")
    run.tell_kills_of_a_failed_run()


def test_a_checkpoint_interval_as_long_as_the_run_is_refused():
    """It wrote step 0's files only: a restore or a resume started the run again, silently."""
    from raytrain_ft.config import RecoveryConfig, TrainConfig
    from raytrain_ft.errors import ConfigError
    from raytrain_ft.trainer import check_checkpoint_interval

    cfg = TrainConfig(recovery=RecoveryConfig(mode="checkpoint", checkpoint_interval=100), steps=40)
    with pytest.raises(ConfigError, match="100 steps between checkpoints, and the run has 40"):
        check_checkpoint_interval(cfg, 40)
    check_checkpoint_interval(cfg, 101)
    check_checkpoint_interval(
        TrainConfig(recovery=RecoveryConfig(mode="checkpoint")), 10
    )  # default
