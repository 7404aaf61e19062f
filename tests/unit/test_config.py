import os

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
        ({"snapshot_interval": "often"}, "recovery.snapshot_interval"),
        ({"snapshot_interval": "0"}, "recovery.snapshot_interval"),
        ({"expected_mtbf_s": "0"}, "recovery.expected_mtbf_s"),
        ({"durability": "relaxed"}, "recovery.durability"),
        ({"durability": "relaxed:2"}, "recovery.durability"),  # sync keeps strict
        ({"durability": "relaxed:2", "mode": "async", "recovery": "none"}, "recovery.durability"),
        ({"durability": "relaxed:2", "mode": "mixed", "num_workers": "4"}, "recovery.durability"),
        ({"durability": "relaxed:1", "mode": "ssp"}, "recovery.durability"),
        ({"durability": "pipelined", "mode": "async"}, "recovery.durability"),
        ({"durability": "pipelined", "recovery": "none"}, "recovery.durability"),
        (
            {"durability": "pipelined", "backup_workers": "1", "num_workers": "3"},
            "recovery.durability",
        ),
        ({"durability": "pipelined", "clip_grad_norm": "1.0"}, "recovery.durability"),
        ({"momentum_correction": "half"}, "consistency.momentum_correction"),
        ({"local_steps": "4"}, "consistency.local_steps"),
        ({"inner_optimizer": "adamw"}, "consistency.inner_optimizer"),
        ({"inner_lr": "0.05"}, "consistency.inner_lr"),
        # a setting the optimizer or schedule would ignore (the user's flag is named)
        ({"optimizer": "adam", "momentum": "0.5"}, "optim.momentum"),
        ({"optimizer": "sgd", "beta2": "0.9"}, "optim.beta2"),
        ({"optimizer": "adam", "alpha": "0.9"}, "optim.alpha"),
        ({"schedule": "constant", "step_size": "5"}, "optim.step_size"),
        ({"schedule": "step", "min_lr": "0.01"}, "optim.min_lr"),
        # probes: a process suspected before it could miss one, or probes without pause
        ({"suspect_after_s": "1e-9"}, "recovery.suspect_after_s"),
        ({"health_check_interval_s": "0.001"}, "recovery.health_check_interval_s"),
        ({"mode": "async", "resume_from": "/tmp"}, "recovery.resume_from"),
        # checkpoint files every 3 steps, into no directory
        ({"checkpoint_interval": "3"}, "recovery.checkpoint_interval"),
        ({"mode": "local_sgd", "local_steps": "0"}, "consistency.local_steps"),
        ({"mode": "local_sgd", "inner_lr": "0"}, "consistency.inner_lr"),
        ({"mode": "local_sgd", "inner_optimizer": "lion"}, "consistency.inner_optimizer"),
        ({"mode": "local_sgd", "overlap_comm": "true"}, "cluster.overlap_comm"),
        ({"mode": "local_sgd", "delay_compensation": "1"}, "consistency.delay_compensation"),
        ({"mode": "local_sgd", "recovery": "checkpoint"}, "recovery.mode"),
        ({"mode": "async", "recovery": "checkpoint"}, "recovery.mode"),
        ({"slow_workers": "5:100"}, "chaos.slow_workers"),
        ({"slow_workers": "1"}, "chaos.slow_workers"),
        ({"simulate_compute_ms": "-5"}, "cluster.simulate_compute_ms"),
        ({"simulate_compute_ms": "50", "overlap_comm": "true"}, "cluster.overlap_comm"),
        (
            {"ranks_per_process": "2", "preaggregate": "true", "overlap_comm": "true"},
            "cluster.preaggregate",
        ),
        ({"ranks_per_process": "0", "simulate_compute_ms": "50"}, "cluster.ranks_per_process"),
        ({"ranks_per_process": "3", "num_workers": "2"}, "cluster.ranks_per_process"),
        # settings the dataset, model, recovery mode or overlap would ignore
        ({"dataset": "cifar10", "data_path": "/d", "image_size": "32"}, "data.image_size"),
        ({"synthetic_samples": "100"}, "data.synthetic_samples"),
        (
            {"dataset": "mnist", "data_path": "/d", "synthetic_channels": "3"},
            "data.synthetic_channels",
        ),
        ({"dataset": "synthetic", "image_column": "pixels"}, "data.image_column"),
        ({"label_column": "y"}, "data.label_column"),
        ({"small_input_stem": "false"}, "model.small_input_stem"),
        ({"model": "mod:make", "small_input_stem": "false"}, "model.small_input_stem"),
        ({"push_thread": "false"}, "cluster.push_thread"),
        ({"push_thread": "true"}, "cluster.push_thread"),
        ({"recovery": "none", "snapshot_interval": "10"}, "recovery.snapshot_interval"),
        ({"recovery": "checkpoint", "snapshot_interval": "auto"}, "recovery.snapshot_interval"),
        ({"recovery": "none", "durability": "strict"}, "recovery.durability"),
        ({"recovery": "checkpoint", "fold_log": "false"}, "recovery.fold_log"),
        ({"recovery": "none", "expected_mtbf_s": "60"}, "recovery.expected_mtbf_s"),
        ({"expected_mtbf_s": "60"}, "recovery.expected_mtbf_s"),  # a fixed interval plans nothing
        ({"recovery": "none", "num_spares": "2"}, "recovery.num_spares"),
        ({"one_kill_at_a_time": "true"}, "chaos.one_kill_at_a_time"),
        ({"eps": "1e-6"}, "optim.eps"),  # sgd has no denominator
        ({"dataset": "cifar10", "data_path": "/d", "eval_fraction": "0.1"}, "data.eval_fraction"),
        (
            {"recovery": "checkpoint", "max_server_replacements": "5"},
            "recovery.max_server_replacements",
        ),
    ],
)
def test_bad_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError) as e:
        C.load(None, overrides)
    assert e.value.field == field
    assert field in str(e.value)


@pytest.mark.parametrize(
    "overrides",
    [
        {
            "image_size": "32",
            "synthetic_samples": "100",
            "synthetic_channels": "3",
            "dataset": "synthetic",
        },
        {
            "dataset": "parquet",
            "data_path": "/d.parquet",
            "image_column": "px",
            "label_column": "y",
        },
        {"model": "resnet18", "small_input_stem": "false"},
        {"overlap_comm": "true", "push_thread": "false"},
        {"snapshot_interval": "auto", "expected_mtbf_s": "60", "fold_log": "false"},
        {"durability": "strict", "num_spares": "3"},
        {"recovery": "none", "num_spares": "0"},  # what none does anyway
        {"recovery": "checkpoint", "num_spares": "2"},  # a restart takes a spare too
        {"kill": "server:0@step=3", "one_kill_at_a_time": "true"},
        {"optimizer": "adagrad", "eps": "1e-6"},
        {"eval_fraction": "0.1"},
        {"max_server_replacements": "5"},
    ],
)
def test_the_same_settings_where_they_apply_are_taken(overrides):
    C.load(None, overrides)


def test_yaml_and_flag_override(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text(
        "model: {name: mlp}\noptim: {name: adam, lr: 0.001}\ncluster: {num_workers: 3}\nsteps: 7\n"
    )
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
    for name in (
        "model",
        "optimizer",
        "num_workers",
        "num_servers",
        "batch_size",
        "lr",
        "mode",
        "seed",
        "steps",
        "data_path",
    ):
        assert name in fields
    assert all(help_text for _, help_text, _ in fields.values())


def test_round_trip_through_dict():
    cfg = C.load(None, {"model": "resnet18", "lr": "0.1", "use_gpu": "False"})
    again = C.from_dict(cfg.to_dict())
    assert again == cfg and again.cluster.use_gpu == "false"


def test_docs_belong_to_their_own_field():
    assert C.field_docs()["model"].startswith("Model: mlp") and C.field_docs()[
        "optimizer"
    ].startswith("Server-side optimizer")


def test_simulate_compute_flag_and_its_alias():
    from raytrain_ft.cli import build_parser

    for flag in ("--simulate-compute", "--simulate-compute-ms"):
        args = build_parser().parse_args(["train", flag, "25"])
        assert (
            C.load(
                None, {k: v for k, v in vars(args).items() if k == "simulate_compute_ms"}
            ).cluster.simulate_compute_ms
            == 25.0
        )


def test_simulated_steps_need_no_data_per_worker():
    from raytrain_ft.trainer import total_steps_for

    many = C.TrainConfig(cluster=C.ClusterConfig(num_workers=64), steps=30)
    with pytest.raises(DataError, match="cannot fill one batch"):
        total_steps_for(many, num_train=1438)
    simulated = C.TrainConfig(
        cluster=C.ClusterConfig(num_workers=64, simulate_compute_ms=100), steps=30
    )
    assert total_steps_for(simulated, num_train=1438) == 30


@pytest.mark.parametrize(
    "optim, total, field, fix",
    [
        ({"warmup_steps": 101}, 100, "optim.warmup_steps", "use optim.warmup_steps=100 or fewer"),
        ({"schedule": "step"}, 30, "optim.step_size", "use optim.step_size=29 or less"),
        ({"schedule": "step", "step_size": 5, "warmup_steps": 25}, 30, "optim.step_size", "4 or"),
        ({"schedule": "step", "step_size": 1, "warmup_steps": 29}, 30, "optim.step_size", "fewer"),
    ],
    ids=["warmup-past-the-end", "no-decay", "no-decay-after-warmup", "warmup-leaves-no-room"],
)
def test_a_schedule_the_run_is_too_short_for_is_refused(optim, total, field, fix):
    with pytest.raises(ConfigError) as e:
        C.check_schedule(C.OptimConfig(**optim), total)
    assert e.value.field == field and fix in str(e.value), str(e.value)


@pytest.mark.parametrize(
    "optim, total",
    [
        ({"warmup_steps": 100}, 100),  # --lr reached at the last step
        ({"schedule": "step"}, 31),  # one decay, at step 30
        ({"schedule": "step", "step_size": 4, "warmup_steps": 25}, 30),
        ({"schedule": "cosine", "warmup_steps": 10}, 10),
    ],
)
def test_a_schedule_that_takes_effect_within_the_run_is_accepted(optim, total):
    C.check_schedule(C.OptimConfig(**optim), total)


# --- every field checked on construction: types (Python API), finiteness and ranges (CLI, YAML,
# Python alike) ---


@pytest.mark.parametrize(
    "build, field",
    [
        (lambda: C.TrainConfig(model="cnn"), "model"),
        (lambda: C.TrainConfig(cluster={"num_workers": 2}), "cluster"),
        (lambda: C.ClusterConfig(num_workers=2.5), "cluster.num_workers"),
        (lambda: C.ClusterConfig(num_workers="4"), "cluster.num_workers"),
        (lambda: C.ClusterConfig(num_workers=None), "cluster.num_workers"),
        (lambda: C.DataConfig(batch_size=True), "data.batch_size"),
        (lambda: C.DataConfig(eval_fraction="0.2"), "data.eval_fraction"),
        (lambda: C.DataConfig(data_path=3), "data.data_path"),
        (lambda: C.OptimConfig(lr=True), "optim.lr"),
        (lambda: C.OptimConfig(nesterov=1), "optim.nesterov"),
        (lambda: C.ModelConfig(name=None), "model.name"),
        (lambda: C.RecoveryConfig(fold_log="yes"), "recovery.fold_log"),
        (lambda: C.ConsistencyConfig(staleness=1.5), "consistency.staleness"),
        (lambda: C.TrainConfig(steps="10"), "steps"),
        (lambda: C.TrainConfig(seed=0.5), "seed"),
    ],
)
def test_python_api_checks_types_on_construction(build, field):
    with pytest.raises(ConfigError) as e:
        build()
    assert e.value.field == field and str(e.value).startswith(f"{field}: ")


def test_python_api_normalises_numbers_it_accepts():
    import numpy as np

    c = C.ClusterConfig(num_workers=np.int64(3), num_servers=4.0, simulate_compute_ms=5)
    assert type(c.num_workers) is int and c.num_servers == 4 and type(c.num_servers) is int
    assert type(c.simulate_compute_ms) is float and c.simulate_compute_ms == 5.0
    assert C.OptimConfig(lr=1).lr == 1.0 and C.TrainConfig(steps=None).steps is None
    assert C.ClusterConfig(use_gpu=False).use_gpu == "false"


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"lr": "nan"}, "optim.lr"),
        ({"lr": "inf"}, "optim.lr"),
        ({"momentum": "nan"}, "optim.momentum"),
        ({"momentum": "5"}, "optim.momentum"),
        ({"momentum": "1"}, "optim.momentum"),
        ({"weight_decay": "nan"}, "optim.weight_decay"),
        ({"weight_decay": "-0.1"}, "optim.weight_decay"),
        ({"gamma": "0"}, "optim.gamma"),
        ({"min_lr": "-1"}, "optim.min_lr"),
        ({"schedule": "cosine", "lr": "0.01", "min_lr": "0.1"}, "optim.min_lr"),
        ({"eps": "inf"}, "optim.eps"),
        ({"log_every_s": "nan"}, "log_every_s"),
        ({"health_check_interval_s": "inf"}, "recovery.health_check_interval_s"),
        ({"suspect_after_s": "nan"}, "recovery.suspect_after_s"),
        ({"eval_fraction": "nan"}, "data.eval_fraction"),
        ({"simulate_compute_ms": "inf"}, "cluster.simulate_compute_ms"),
        ({"simulate_compute_ms": "3600001"}, "cluster.simulate_compute_ms"),
        ({"num_spares": "1000"}, "recovery.num_spares"),
        ({"seed": "-1"}, "seed"),
        ({"dataset": "digits", "data_path": "/data"}, "data.data_path"),
        ({"dataset": "synthetic", "data_path": "/data"}, "data.data_path"),
        ({"dataset": "digits", "image_shape": "1,8,8"}, "data.image_shape"),
        ({"mode": "mixed", "num_workers": "4", "group_size": "3"}, "consistency.group_size"),
        ({"mode": "mixed", "num_workers": "2", "group_size": "4"}, "consistency.group_size"),
    ],
)
def test_floats_are_finite_and_in_range_and_settings_consistent(overrides, field):
    with pytest.raises(ConfigError) as e:
        C.load(None, overrides)
    assert e.value.field == field


def test_the_same_check_answers_yaml_flags_and_python(tmp_path):
    yml = tmp_path / "run.yaml"
    yml.write_text("optim: {lr: .nan}\n")
    errors = []
    for build in (
        lambda: C.load(str(yml)),
        lambda: C.load(None, {"lr": "nan"}),
        lambda: C.OptimConfig(lr=float("nan")),
    ):
        with pytest.raises(ConfigError) as e:
            build()
        errors.append(str(e.value))
    assert errors == ["optim.lr: must be a finite number, got nan"] * 3


def test_messages_say_why_and_what_to_change():
    with pytest.raises(
        ConfigError,
        match=r"recovery.num_spares: must be at most 16, got 1000: each spare is a server process",
    ):
        C.RecoveryConfig(num_spares=1000)
    with pytest.raises(ConfigError, match=r"4 workers in groups of 3 would make groups of 3, 1"):
        C.load(None, {"mode": "mixed", "num_workers": "4", "group_size": "3"})
    assert (
        C.load(
            None, {"mode": "mixed", "num_workers": "6", "group_size": "3"}
        ).consistency.group_size
        == 3
    )
    assert (
        C.load(None, {"num_workers": "3"}).mode == "sync"
    )  # group_size only matters in mixed mode


def test_config_files_that_are_not_yaml_text(tmp_path):
    binary = tmp_path / "latin1.yaml"
    binary.write_bytes("optim: {name: sgd}  # caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"--config: .*latin1.yaml is not UTF-8 text \(byte 0xe9"):
        C.load(str(binary))
    with pytest.raises(ConfigError, match=r"--config: .* is a directory; give the YAML file in it"):
        C.load(str(tmp_path))
    with pytest.raises(ConfigError, match=r"--config: file .* does not exist"):
        C.load(str(tmp_path / "missing.yaml"))


def test_writable_paths_are_checked_before_a_run(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    C.check_writable_dir(
        str(tmp_path / "new" / "ckpt"), "recovery.checkpoint_dir", "--checkpoint-dir"
    )
    assert (tmp_path / "new" / "ckpt").is_dir() and not list(
        (tmp_path / "new" / "ckpt").iterdir()
    )  # the probe file is gone
    with pytest.raises(
        ConfigError,
        match=r"recovery.checkpoint_dir: .* is a file, not a directory; give a writable directory "
        r"as recovery.checkpoint_dir",
    ):
        C.check_writable_dir(str(a_file), "recovery.checkpoint_dir", "--checkpoint-dir")
    with pytest.raises(
        ConfigError, match=r"recovery.checkpoint_dir: cannot write to .*\(Not a directory\)"
    ):
        C.check_writable_dir(str(a_file / "ckpt"), "recovery.checkpoint_dir", "--checkpoint-dir")
    C.check_writable_file(str(tmp_path / "out" / "run.json"), "--output-json")
    assert not (tmp_path / "out" / "run.json").exists()
    with pytest.raises(ConfigError, match=r"--output-json: cannot write"):
        C.check_writable_file(str(a_file / "run.json"), "--output-json")
    with pytest.raises(ConfigError, match=r"--output-json: .* is a directory"):
        C.check_writable_file(str(tmp_path), "--output-json")
    with pytest.raises(ConfigError, match=r"--output: directory .* does not exist"):
        C.check_writable_file(
            str(tmp_path / "missing" / "run.png"), "--output", create_parent=False
        )


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_a_file_system_that_makes_no_files_is_named_not_reported_missing():
    # /proc answers "No such file or directory" to a new file or directory in a directory it has
    for path in ("/proc/raytrain-ft-ckpt", "/proc/a/b"):
        with pytest.raises(ConfigError, match=r"the file system of '/proc' creates no files"):
            C.check_writable_dir(path, "recovery.checkpoint_dir", "--checkpoint-dir")


@pytest.mark.parametrize(
    "build, field, choices",
    [
        (lambda: C.OptimConfig(name="sgdm"), "optim.name", "sgd, rmsprop, adagrad, adam"),
        (lambda: C.OptimConfig(schedule="linear"), "optim.schedule", "constant, step, cosine"),
        (lambda: C.RecoveryConfig(mode="raid"), "recovery.mode", "replica, checkpoint, none"),
        (
            lambda: C.ConsistencyConfig(staleness_lr="sqrt"),
            "consistency.staleness_lr",
            "none, inverse",
        ),
        (lambda: C.TrainConfig(mode="bsp"), "mode", "sync, async, ssp, mixed, local_sgd"),
        (lambda: C.ModelConfig(precision="fp8"), "model.precision", "fp32, bf16, fp16"),
        (lambda: C.ClusterConfig(use_gpu="maybe"), "cluster.use_gpu", "auto, true, false"),
        (lambda: C.TrainConfig(mode=1), "mode", "sync, async, ssp, mixed, local_sgd"),
    ],
)
def test_closed_choices_are_literal_types_checked_on_construction(build, field, choices):
    with pytest.raises(ConfigError) as e:
        build()
    assert e.value.field == field and str(e.value).endswith(f"choose one of {choices}")


def test_literal_choices_are_the_annotations():
    import typing

    from raytrain_ft.consistency import MODES

    assert typing.get_args(typing.get_type_hints(C.TrainConfig)["mode"]) == MODES
    assert typing.get_args(typing.get_type_hints(C.RecoveryConfig)["mode"]) == C.RECOVERY_MODES


def test_fault_injection_lives_in_its_own_section(tmp_path):
    cfg = C.load(
        None,
        {
            "kill": "server:0@step=3",
            "slow_workers": "1:50",
            "one_kill_at_a_time": "true",
            "recovery": "none",
        },
    )
    assert (cfg.chaos.kill, cfg.chaos.slow_workers, cfg.chaos.one_kill_at_a_time) == (
        "server:0@step=3",
        "1:50",
        True,
    )
    assert cfg.recovery.mode == "none"
    path = tmp_path / "c.yaml"
    path.write_text("recovery: checkpoint\nchaos: {kill: 'worker:1@step=4'}\n")
    cfg = C.load(str(path))
    assert cfg.recovery.mode == "checkpoint" and cfg.chaos.kill == "worker:1@step=4"


@pytest.mark.parametrize(
    "text, field, now",
    [
        ("recovery: {recovery: none}", "recovery.recovery", "recovery.mode"),
        ("recovery: {kill: 'server:0@step=3'}", "recovery.kill", "chaos.kill"),
        ("recovery: {slow_workers: '0:10'}", "recovery.slow_workers", "chaos.slow_workers"),
    ],
)
def test_renamed_keys_say_where_they_went(tmp_path, text, field, now):
    path = tmp_path / "c.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError) as e:
        C.load(str(path))
    assert e.value.field == field and f"renamed: write it as {now}" in str(e.value)


def test_the_servers_rule_carries_every_consistency_setting():
    cfg = C.load(
        None,
        {
            "mode": "ssp",
            "num_workers": "4",
            "staleness": "3",
            "staleness_lr": "inverse",
            "momentum_correction": "auto",
        },
    )
    rule = cfg.rule()
    assert (rule.mode, rule.num_workers, rule.staleness) == ("ssp", 4, 3)
    assert (rule.staleness_lr, rule.momentum_correction) == ("inverse", "auto")


def test_snapshot_interval_takes_a_number_or_auto_from_flags_yaml_and_python():
    assert C.load(None, {"snapshot_interval": "auto"}).recovery.snapshot_interval == "auto"
    assert C.load(None, {"snapshot_interval": "20"}).recovery.snapshot_interval == 20
    assert C.from_dict({"recovery": {"snapshot_interval": 7}}).recovery.snapshot_interval == 7
    assert C.RecoveryConfig(snapshot_interval="auto").snapshot_interval == "auto"
    for bad in ("x", 2.5, True):
        with pytest.raises(ConfigError, match="expected an integer or auto"):
            C.RecoveryConfig(snapshot_interval=bad)


@pytest.mark.parametrize(
    "raw, field, home",
    [
        (
            {"consistency": {"overlap_comm": True}},
            "consistency.overlap_comm",
            "the cluster section",
        ),
        ({"push_thread": "true"}, "push_thread", "the cluster section"),
        ({"cluster": {"epochs": 3}}, "cluster.epochs", "the top level"),
    ],
)
def test_a_key_in_the_wrong_section_says_where_it_belongs(raw, field, home):
    from raytrain_ft.config import from_dict

    with pytest.raises(ConfigError, match=f"it belongs in {home}") as e:
        from_dict(raw)
    assert e.value.field == field


def test_an_unknown_key_lists_the_known_ones():
    from raytrain_ft.config import from_dict

    with pytest.raises(ConfigError, match="unknown key; known keys: num_workers"):
        from_dict({"cluster": {"bogus": 1}})
    with pytest.raises(ConfigError, match=r"did you mean clip_grad_norm\?"):
        from_dict({"optim": {"clip-grad-norm": 0.5}})


@pytest.mark.parametrize(
    "text", ["cluster: 0\n", "cluster: []\n", "cluster: ''\n", "optim: false\n"]
)
def test_a_section_that_is_no_mapping_is_refused_even_when_falsy(text, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="must be a mapping"):
        C.load(str(path), {})


def test_a_section_with_nothing_under_it_is_the_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("cluster:\n")
    assert C.load(str(path), {}).cluster == C.ClusterConfig()


def test_a_yaml_list_is_taken_only_where_the_field_is_a_list(tmp_path):
    """Kills, stragglers, Ray Dataset columns and an image shape are comma-separated lists: a YAML
    list is joined. Anywhere else a list is refused (it was joined into one odd value)."""
    path = tmp_path / "c.yaml"
    path.write_text(
        "chaos: {kill: ['server:0@step=3', 'worker:1@step=4'], slow_workers: ['1:50']}\n"
        "data: {x_columns: [a, b]}\n"
    )
    cfg = C.load(str(path))
    assert (cfg.chaos.kill, cfg.chaos.slow_workers, cfg.data.x_columns) == (
        "server:0@step=3,worker:1@step=4",
        "1:50",
        "a,b",
    )
    for text, field in (
        ("model: {name: [cnn, mlp]}\n", "model.name"),
        ("consistency: {codec: [fp16]}\n", "consistency.codec"),
        ("recovery: {checkpoint_dir: [a, b]}\n", "recovery.checkpoint_dir"),
    ):
        path.write_text(text)
        with pytest.raises(ConfigError, match="expected one value, got a list") as e:
            C.load(str(path))
        assert e.value.field == field


def test_yaml_that_would_be_read_wrongly_is_refused(tmp_path):
    """A key given twice (the last one won silently), nesting past Python's recursion limit (a
    traceback), a FIFO (read for ever); an empty section still takes flags."""
    import os

    path = tmp_path / "c.yaml"
    for text, needle in (
        ("optim: {lr: 0.1}\noptim: {lr: 0.2}\n", "line 2: 'optim' is given twice"),
        ("optim:\n  lr: 0.1\n  lr: 0.2\n", "line 3: 'lr' is given twice"),
        ("optim: " + "[" * 1000 + "]" * 1000 + "\n", "nested too deeply"),
    ):
        path.write_text(text)
        with pytest.raises(ConfigError, match=needle):
            C.load(str(path))
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="is not a regular file"):
        C.load(str(fifo))
    path.write_text("optim: ~\n")
    assert C.load(str(path), {"lr": "0.1"}).optim.lr == 0.1
    path.write_text("model: {name: 'mod:make', kwargs: {hidden: 3}}\n")  # YAML's own mapping
    assert C.load(str(path)).model.kwargs == '{"hidden": 3}'
    path.write_text("data: {x_columns: [a, [b, c]]}\n")
    with pytest.raises(ConfigError, match="a list of plain values"):
        C.load(str(path))


def test_json_keys_given_twice_and_deep_nesting_are_refused():
    assert C.parse_json('{"a": {"b": 1}}', "--x") == {"a": {"b": 1}}
    with pytest.raises(ConfigError, match="--x: key 'a' is given twice"):
        C.parse_json('{"a": 1, "a": 2}', "--x")
    with pytest.raises(ConfigError, match="--x: is nested too deeply"):
        C.parse_json("[" * 100000 + "]" * 100000, "--x")
    with pytest.raises(ConfigError, match="--x: is not JSON"):
        C.parse_json("{", "--x")


def test_settings_past_float32_are_refused():
    for overrides, field in (
        ({"lr": "1e308"}, "optim.lr"),
        ({"weight_decay": "1e39"}, "optim.weight_decay"),
        ({"mode": "local_sgd", "inner_lr": "1e300"}, "consistency.inner_lr"),
    ):
        with pytest.raises(ConfigError) as e:
            C.load(None, overrides)
        assert e.value.field == field
    C.load(None, {"lr": "1e38"})


def test_yaml_numbers_read_as_written(tmp_path):
    """YAML 1.1 would read `1:20` as 80 (base 60) and `010` as 8 (octal)."""
    path = tmp_path / "c.yaml"
    path.write_text("steps: 010\nseed: 0x10\noptim: {lr: 0.5, weight_decay: .5e-3}\n")
    cfg = C.load(str(path))
    assert (cfg.steps, cfg.seed, cfg.optim.lr, cfg.optim.weight_decay) == (10, 16, 0.5, 0.0005)
    path.write_text("steps: 1:20\n")
    with pytest.raises(ConfigError) as e:
        C.load(str(path))
    assert e.value.field == "steps"


def test_yaml_exponents_without_a_dot_are_numbers_and_dates_stay_text(tmp_path):
    """YAML 1.1 reads `1e-1` as text and `2024-01-01` as a date: a model's keyword arguments got
    the string "1e-1", and a date failed the run with a raw JSON TypeError."""
    import json

    path = tmp_path / "c.yaml"
    path.write_text(
        "optim: {lr: 1e-3}\nmodel: {name: 'tests.unit.test_task:linear', "
        "kwargs: {dropout: 1e-1, scale: 2E+3, since: 2024-01-01}}\n"
    )
    cfg = C.load(str(path))
    assert cfg.optim.lr == 0.001
    assert json.loads(cfg.model.kwargs) == {"dropout": 0.1, "scale": 2000.0, "since": "2024-01-01"}


@pytest.mark.parametrize("value", [-1, float("nan"), float("inf"), 3601, "soon"])
def test_keep_warm_s_takes_seconds_up_to_an_hour(value):
    with pytest.raises(ConfigError, match=r"cluster\.keep_warm_s"):
        C.ClusterConfig(keep_warm_s=value)


def test_keep_warm_s_is_the_python_apis_alone():
    """A command runs one run in its own Ray session: nothing outlives it to be kept warm for, so
    the setting is refused there (no flag; a YAML file naming it is refused), not ignored."""
    assert "keep_warm_s" not in C.cli_fields()
    with pytest.raises(ConfigError, match=r"cluster\.keep_warm_s: applies where Ray outlives"):
        C.from_command_line({"cluster": {"keep_warm_s": 5}}, {}, source="run.yaml")
    assert C.from_command_line({"cluster": {"num_workers": 3}}, {}).cluster.keep_warm_s == 30.0
    assert C.ClusterConfig(keep_warm_s=0).keep_warm_s == 0.0  # the Python API may turn it off


@pytest.mark.parametrize(
    "text", ["a: !!set {x, y}", "a: !!binary aGVsbG8=", "a: .nan", "a: [1, {b: .inf}]"]
)
def test_model_kwargs_that_json_cannot_carry_are_refused_in_one_line(text):
    import yaml

    from raytrain_ft.config import coerce

    with pytest.raises(ConfigError, match="holds a value JSON cannot carry") as e:
        coerce(yaml.safe_load(text), str, "model.kwargs")
    assert e.value.field == "model.kwargs"
    assert (
        coerce(yaml.safe_load("a: [1, {b: 2.5}]"), str, "model.kwargs") == '{"a": [1, {"b": 2.5}]}'
    )


def test_an_unknown_model_loss_or_dataset_names_the_module_attr_form():
    """A user's own model, loss or dataset is MODULE:ATTR; a dotted path was most likely meant as
    one, and the message says which."""
    for make, field in (
        (lambda v: C.ModelConfig(name=v), "model.name"),
        (lambda v: C.ModelConfig(loss=v), "model.loss"),
        (lambda v: C.DataConfig(dataset=v), "data.dataset"),
    ):
        with pytest.raises(ConfigError) as e:
            make("mymod.build")
        assert e.value.field == field
        assert str(e.value).endswith("or your own as MODULE:ATTR (mymod:build?)"), str(e.value)
        with pytest.raises(ConfigError) as e:
            make("vgg")
        assert str(e.value).endswith("or your own as MODULE:ATTR"), str(e.value)
        make("mymod:build")  # the user's own: looked up when the run starts, not here


def test_load_takes_a_steps_override_over_the_files_epochs(tmp_path):
    """As --config run.yaml --steps 20 does: the override sets the run's length."""
    path = tmp_path / "run.yaml"
    path.write_text("epochs: 3\noptim:\n  lr: 0.1\n")
    cfg = C.load(str(path), {"steps": 30})
    assert cfg.steps == 30 and cfg.optim.lr == 0.1
    assert C.load(str(path)).epochs == 3


def test_ray_dataset_column_flags_with_a_built_in_dataset_are_refused_even_at_their_default():
    """--x-columns x trained on digits in silence (its value is the default); another value was
    refused."""
    for flags in (
        {"x_columns": "x"},
        {"y_column": "y"},
        {"x_columns": "x", "dataset": "synthetic"},
    ):
        with pytest.raises(ConfigError, match="returning Ray Datasets, not"):
            C.from_command_line({}, flags)
    assert C.from_command_line({}, {"x_columns": "a", "dataset": "mod:data"}).data.x_columns == "a"
