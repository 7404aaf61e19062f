"""--num-servers auto: the choice from measured costs (pure), and what the config refuses."""

import dataclasses
import typing

import pytest

from raytrain_ft.config import ClusterConfig, RecoveryConfig, TrainConfig, coerce, from_dict
from raytrain_ft.errors import ConfigError
from raytrain_ft.recovery.faults import check_targets, parse_kills
from raytrain_ft.sharding import (
    AUTO_SERVER_CANDIDATES,
    ExchangeCosts,
    auto_server_candidates,
    choose_num_servers,
    predicted_exchange_s,
)

NS = 1e-9


def costs(num_values, workers, call_s, byte_s, cpus, update=0.3 * NS, add=0.1 * NS):
    """Calls that cost ``call_s`` plus ``byte_s`` per byte of a shard's push and reply; W at once
    take W times as long."""
    candidates = auto_server_candidates(num_values)
    rt = {s: call_s + 2 * 4 * (num_values / s) * byte_s for s in candidates}
    return ExchangeCosts(call_s, rt, {s: workers * t for s, t in rt.items()}, update, add, cpus)


def choose(num_values, workers, c, replicated=True, on_path=False):
    return choose_num_servers(
        num_values=num_values,
        num_workers=workers,
        costs=c,
        replicated=replicated,
        replica_on_path=on_path,
    )


def test_a_small_model_takes_one_server_a_large_one_on_many_cores_is_split():
    # the main job's CNN: a call's fixed cost dominates its 0.6 MB of values
    assert choose(151_306, 2, costs(151_306, 2, 1e-3, 0.5 * NS, cpus=16)).chosen == 1
    # ResNet-18: 45 MB each way per worker; 16 cores to spread the shards on
    plan = choose(11_173_962, 2, costs(11_173_962, 2, 1e-3, 0.5 * NS, cpus=16))
    assert plan.chosen >= 4, plan
    assert plan.predicted_s[plan.chosen] < plan.predicted_s[1] / 3


def test_without_cores_to_spread_on_more_servers_only_add_calls():
    # one CPU: every server's work adds up, and each adds W calls and a holder call
    plan = choose(11_173_962, 2, costs(11_173_962, 2, 1e-3, 0.5 * NS, cpus=1))
    assert plan.chosen == 1, plan
    assert list(plan.predicted_s.values()) == sorted(plan.predicted_s.values())


def test_the_prediction_is_one_servers_work_or_all_work_over_the_cpus():
    # 4 calls at once take 7 ms to one server of all the values, 3.5 ms to one of half of them
    c = ExchangeCosts(0.5e-3, {1: 2e-3, 2: 1e-3}, {1: 7e-3, 2: 3.5e-3}, 1 * NS, 1 * NS, cpus=2)
    n, w = 1_000_000, 4
    # one server: its 4 calls, 4 sums and one update of 1 M values; its holder's call and fold
    one = 7e-3 + n * (4 + 1) * NS
    holder = 2e-3 + n * NS
    kw = dict(num_values=n, num_workers=w, costs=c)
    assert predicted_exchange_s(1, replicated=False, replica_on_path=False, **kw) == one
    assert predicted_exchange_s(1, replicated=True, replica_on_path=True, **kw) == one + holder
    # pipelined: the holder's work competes for the CPUs, it is not on the step's path
    assert predicted_exchange_s(1, replicated=True, replica_on_path=False, **kw) == one
    # two servers on two CPUs: each does half the values with its own calls, after the worker
    # has issued its call to the other
    two = 3.5e-3 + n / 2 * 5 * NS
    got = predicted_exchange_s(2, replicated=False, replica_on_path=False, **kw)
    assert got == 0.5e-3 + two
    one_cpu = dataclasses.replace(c, cpus=1)
    got = predicted_exchange_s(
        2, replicated=False, replica_on_path=False, **kw | {"costs": one_cpu}
    )
    assert got == 2 * two


def test_more_servers_must_save_more_than_the_margin():
    def one_call(t1, t2):
        rt = {1: t1, 2: t2}
        return ExchangeCosts(0.0, rt, rt, 0.0, 0.0, cpus=8)

    # 2 servers predicted 4% faster than 1: not worth another process
    assert choose(1000, 1, one_call(1e-3, 0.96e-3), False).chosen == 1
    far = choose(1000, 1, one_call(1e-3, 0.9e-3), False)
    assert far.chosen == 2


def test_candidates_stop_at_the_models_size_and_the_plan_reads_back():
    assert auto_server_candidates(10**9) == list(AUTO_SERVER_CANDIDATES)
    assert auto_server_candidates(5) == [1, 2, 3, 4]
    plan = choose(5, 1, costs(5, 1, 1e-3, NS, cpus=2))
    d = plan.to_dict()
    assert d["chosen"] == plan.chosen == 1
    assert list(d["predicted_exchange_ms"]) == ["1", "2", "3", "4"]
    assert d["cpus"] == 2
    with pytest.raises(ValueError):
        choose(5, 1, ExchangeCosts(0.0, {}, {}, 0.0, 0.0, 1.0))


def test_auto_is_a_value_of_the_flag_and_of_the_yaml_and_bad_counts_still_fail():
    typ = typing.get_type_hints(ClusterConfig)["num_servers"]
    assert coerce("auto", typ, "cluster.num_servers") == "auto"
    assert coerce("3", typ, "cluster.num_servers") == 3
    assert from_dict({"cluster": {"num_servers": "auto"}}).cluster.num_servers == "auto"
    for bad in (0, -2):
        with pytest.raises(ConfigError, match="cluster.num_servers: must be > 0"):
            ClusterConfig(num_servers=bad)
    with pytest.raises(ConfigError, match="cluster.num_servers"):
        ClusterConfig(num_servers="some")


def test_auto_refuses_what_needs_the_count_before_the_run():
    with pytest.raises(ConfigError, match="recovery.resume_from needs the shard count"):
        TrainConfig(
            cluster=ClusterConfig(num_servers="auto"), recovery=RecoveryConfig(resume_from="/x")
        )
    check_targets(parse_kills("server:0@step=3,replica:0@step=4,worker:1@step=5"), "auto", 2, 1)
    for kill in ("server:1@step=3", "replica:2@step=3"):
        with pytest.raises(ConfigError, match="cluster.num_servers='auto' picks the shard count"):
            check_targets(parse_kills(kill), "auto", 2, 1)
