import pytest

from raytrain_ft import config as C
from raytrain_ft.errors import ConfigError, DataError


def test_defaults_validate():
    cfg = C.TrainConfig()
    assert cfg.mode == "sync" and cfg.cluster.num_servers == 2


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"model": "vgg"}, "model.name"),
        ({"optimizer": "adamx"}, "optim.name"),
        ({"mode": "gossip"}, "mode"),
        ({"num_servers": "0"}, "cluster.num_servers"),
        ({"num_workers": "-1"}, "cluster.num_workers"),
        ({"batch_size": "0"}, "data.batch_size"),
        ({"lr": "0"}, "optim.lr"),
        ({"steps": "0"}, "steps"),
        ({"batch_size": "abc"}, "data.batch_size"),
        ({"nesterov": "true", "momentum": "0"}, "optim.nesterov"),
        ({"dataset": "parquet"}, "data.data_path"),
        ({"eval_fraction": "1.5"}, "data.eval_fraction"),
        ({"image_shape": "3,x,4", "dataset": "parquet", "data_path": "a"}, "data.image_shape"),
        ({"backup_workers": "1", "mode": "async"}, "consistency.backup_workers"),
        ({"backup_workers": "2", "num_workers": "2"}, "consistency.backup_workers"),
        ({"n_push": "2"}, "consistency.n_push"),
        ({"n_fetch": "2", "mode": "async", "overlap_comm": "true"}, "cluster.overlap_comm"),
        ({"codec": "topk:5"}, "consistency.codec"),
        ({"staleness": "-1"}, "consistency.staleness"),
        ({"staleness_lr": "sqrt"}, "consistency.staleness_lr"),
        ({"mode": "async", "recovery": "checkpoint"}, "recovery.recovery"),
        ({"slow_workers": "5:100"}, "recovery.slow_workers"),
        ({"slow_workers": "1"}, "recovery.slow_workers"),
        ({"simulate_compute_ms": "-5"}, "cluster.simulate_compute_ms"),
        ({"simulate_compute_ms": "50", "overlap_comm": "true"}, "cluster.overlap_comm"),
        ({"ranks_per_process": "4"}, "cluster.ranks_per_process"),
        ({"ranks_per_process": "0", "simulate_compute_ms": "50"}, "cluster.ranks_per_process"),
    ],
)
def test_bad_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError) as e:
        C.load(None, overrides)
    assert e.value.field == field
    assert field in str(e.value)


def test_yaml_and_flag_override(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("model: {name: mlp}\noptim: {name: adam, lr: 0.001}\ncluster: {num_workers: 3}\nsteps: 7\n")
    cfg = C.load(str(p), {"num_workers": "4", "seed": "9"})
    assert cfg.model.name == "mlp"
    assert cfg.optim.name == "adam" and cfg.optim.lr == 0.001
    assert cfg.cluster.num_workers == 4 and cfg.seed == 9 and cfg.steps == 7


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        C.load(str(bad))
    with pytest.raises(ConfigError, match="does not exist"):
        C.load(str(tmp_path / "missing.yaml"))
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("optim: {learning_rate: 0.1}\n")
    with pytest.raises(ConfigError) as e:
        C.load(str(unknown))
    assert e.value.field == "optim.learning_rate"
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        C.load(str(listy))


def test_every_leaf_field_has_a_flag_and_doc():
    fields = C.cli_fields()
    for name in ("model", "optimizer", "num_workers", "num_servers", "batch_size", "lr", "mode", "seed", "steps", "data_path"):
        assert name in fields
    assert all(help_text for _, help_text, _ in fields.values())


def test_round_trip_through_dict():
    cfg = C.load(None, {"model": "resnet18", "lr": "0.1", "use_gpu": "False"})
    again = C.from_dict(cfg.to_dict())
    assert again == cfg and again.cluster.use_gpu == "false"


def test_docs_belong_to_their_own_field():
    assert C.field_docs()['model'].startswith('Model architecture') and C.field_docs()['optimizer'].startswith('Server-side optimizer')


def test_simulate_compute_flag_and_its_alias():
    from raytrain_ft.cli import build_parser

    for flag in ("--simulate-compute", "--simulate-compute-ms"):
        args = build_parser().parse_args(["train", flag, "25"])
        assert C.load(None, {k: v for k, v in vars(args).items() if k == "simulate_compute_ms"}).cluster.simulate_compute_ms == 25.0


def test_simulated_steps_need_no_data_per_worker():
    from raytrain_ft.trainer import total_steps_for

    many = C.TrainConfig(cluster=C.ClusterConfig(num_workers=64), steps=30)
    with pytest.raises(DataError, match="cannot fill one batch"):
        total_steps_for(many, num_train=1438)
    simulated = C.TrainConfig(cluster=C.ClusterConfig(num_workers=64, simulate_compute_ms=100), steps=30)
    assert total_steps_for(simulated, num_train=1438) == 30
