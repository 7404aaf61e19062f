"""Every choice the README's flag table documents is accepted by the CLI exactly as written."""

import json
import os
import re

import pytest

from raytrain_ft import cli
from raytrain_ft import config as C
from raytrain_ft.errors import ConfigError

README = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")
VALUE_LESS = {
    "--kill",
    "--slow-workers",
    "--data-path",
    "--address",
    "--checkpoint-dir",
    "--resume-from",
}
"""Rows whose backticked words are not values of the flag (roles, paths, forms)."""


def documented_choices() -> list[tuple[str, str]]:
    with open(README) as fh:
        text = fh.read()
    table = text[text.index("| flag | meaning | default |") :]
    table = table[: table.index("\n\n")]
    out = []
    for row in table.splitlines()[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        flags = re.findall(r"`(--[a-z-]+)`", cells[0])
        if len(flags) != 1 or flags[0] in VALUE_LESS:
            continue
        for token in re.findall(r"`([^`]+)`", cells[1]):
            if re.fullmatch(r"[a-z0-9_]+(:[A-Z]+)?", token):
                out.append((flags[0], token.replace(":RATIO", ":0.01").replace(":K", ":4")))
    return out


def config_of(*argv: str):
    args = cli.build_parser().parse_args(["train", *argv])
    return cli._config(args)


def test_the_table_documents_choices():
    flags = {f for f, _ in documented_choices()}
    assert {
        "--model",
        "--dataset",
        "--mode",
        "--recovery",
        "--codec",
        "--use-gpu",
        "--staleness-lr",
    } <= flags


@pytest.mark.parametrize("flag, value", documented_choices())
def test_every_documented_choice_is_accepted(flag, value):
    extra = ("--data-path", "/tmp/x.parquet") if value == "parquet" else ()
    if value.startswith("relaxed:"):
        extra = ("--mode", "async")  # sync keeps strict durability
    if flag in ("--staleness-lr", "--momentum-correction"):
        extra = ("--mode", "async")  # sync has no stale gradients to correct
    if flag == "--codec-residual":
        extra = ("--codec", "fp16")  # a lossless codec keeps no residual
    if flag == "--preaggregate":  # the ranks of a process pre-aggregate
        extra = ("--simulate-compute", "10", "--ranks-per-process", "2")
    cfg = config_of(flag, value, *extra)
    assert value in str(cfg.to_dict()) or value in ("true", "false")


def test_recovery_none_keeps_the_word():
    assert config_of("--recovery", "none").recovery.mode == "none"
    assert config_of("--codec", "none").consistency.codec == "none"
    assert (
        config_of("--checkpoint-dir", "none").recovery.checkpoint_dir is None
    )  # optional: "none" unsets it


@pytest.mark.parametrize(
    "kill",
    [
        "server:0@step=3",
        "replica:1@time=2.5",
        "worker:1@recovery=1",
        "spare:0@rereplication=1",
        "supervisor@recovery=1",
        "node:1@step=4",
        "server:0@snapshot=2",
        "replica:0@snapshot=1",
    ],
)
def test_every_documented_kill_form_is_accepted(kill):
    assert config_of("--kill", kill).chaos.kill == kill


@pytest.mark.parametrize(
    "argv, said",
    [
        (["train", "--push-thred", "true"], "--push-thred (did you mean --push-thread?)"),
        (["train", "--modle", "cnn"], "--modle (did you mean --model?)"),
        (["train", "--lr=0.1", "--epocs", "2"], "--epocs (did you mean --epochs?)"),
        (["simulate", "--schedulez", "3"], "--schedulez (did you mean --schedules?)"),
        # no abbreviations: a prefix is refused naming the flag, not read as it
        (["simulate", "--sched", "3"], "--sched (did you mean --schedules?)"),
        (["train", "--st", "6"], "--st (did you mean --steps?)"),
        # another case, underscores or one dash: the flag as it is spelled
        (["train", "--STEPS", "6"], "--STEPS (did you mean --steps?)"),
        (["train", "--num_workers", "2"], "--num_workers (did you mean --num-workers?)"),
        (["chaos", "-run-id", "x"], "-run-id (did you mean --run-id?)"),
    ],
)
def test_a_misspelled_flag_gets_one_line_naming_the_flag_meant(argv, said, capsys):
    from raytrain_ft.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err == (
        f"raytrain-ft {argv[0]}: error: unrecognized arguments: {said} (see raytrain-ft "
        f"{argv[0]} --help)\n"
    )


@pytest.mark.parametrize(
    "argv, said",
    [
        (["train", "--lr"], "argument --lr: expected one argument"),
        (["train", "--steps", "6", "extra"], "unrecognized arguments: extra"),
        (["simulate", "--schedules", "x"], "argument --schedules: invalid int value: 'x'"),
        (["frobnicate"], "argument command: invalid choice"),
    ],
)
def test_an_argument_error_is_one_line_not_the_usage_block(argv, said, capsys):
    from raytrain_ft.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and said in err, err
    assert err.endswith("--help)\n") and not err.startswith("usage:")


@pytest.mark.parametrize("command", ["train", "submit", "simulate", "chaos"])
def test_help_prints(command, capsys):
    """Every flag's help is formatted by argparse (a docstring with a literal % once broke
    ``train --help``)."""
    with pytest.raises(SystemExit) as exit_:
        cli.build_parser().parse_args([command, "--help"])
    assert exit_.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_the_simulate_help_names_every_known_bad_variant():
    from raytrain_ft.sim.bugs import BUGS

    help_text = next(
        a.help
        for a in cli.build_parser()._subparsers._group_actions[0].choices["simulate"]._actions
        if "--inject-bug" in a.option_strings
    )
    assert all(name in help_text for name in BUGS)


def test_simulate_long_takes_schedules_however_it_is_written(capsys):
    """--long is 20,000 schedules unless --schedules says otherwise, as --schedules=N too."""
    from raytrain_ft.cli import main

    assert main(["simulate", "--long", "--schedules=3", "--processes", "1", "--mode", "sync"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["schedules"] == 3


def test_submit_checks_the_kills_before_it_contacts_the_cluster(capsys):
    """A kill of a rank the run does not have is refused here, not by the job on the cluster (the
    address is never tried: nothing listens there)."""
    from raytrain_ft.cli import main

    argv = ["submit", "--address", "http://127.0.0.1:1", "--kill", "worker:5@step=1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("raytrain-ft: error: chaos.kill: worker:5@step=1: the run has 2 worker")


def test_simulate_refuses_more_processes_than_cores(capsys):
    from raytrain_ft.cli import main

    cores = os.cpu_count() or 1
    assert main(["simulate", "--schedules", "5", "--processes", str(cores + 1)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--processes: this machine has {cores} cores" in err[0]


def test_an_embedded_ray_must_fit_in_this_machines_memory():
    """The processes a run starts on this machine are counted before Ray starts them; the field
    named is the role that takes the most memory."""
    from raytrain_ft.trainer import check_embedded_memory, embedded_processes

    cfg = C.TrainConfig()
    assert embedded_processes(cfg) == {"worker": 2, "server": 2, "spare": 1, "supervisor": 1}
    check_embedded_memory(cfg, 2.1)  # 6 processes of 0.3 GB and a node of 0.3 GB
    with pytest.raises(ConfigError, match="needs about 2 GB"):
        check_embedded_memory(cfg, 2.0)
    check_embedded_memory(cfg, None)  # not known: not checked
    shared = C.load(
        None, {"num_workers": "64", "ranks_per_process": "8", "simulate_compute_ms": "5"}
    )
    assert embedded_processes(shared)["worker"] == 8
    for overrides, field in (
        ({"num_workers": "1000", "simulate_compute_ms": "5"}, "cluster.num_workers"),
        ({"num_servers": "1000"}, "cluster.num_servers"),
        ({"local_nodes": "1000"}, "cluster.local_nodes"),
    ):
        with pytest.raises(ConfigError) as e:
            check_embedded_memory(C.load(None, overrides), 24.0)
        assert e.value.field == field and "24.0 GB is available" in str(e.value)
        # the count the message offers fits, one more does not
        room = int(re.search(rf"at most (\d+) {field} fit", str(e.value)).group(1))
        key = field.split(".")[1]
        check_embedded_memory(C.load(None, {**overrides, key: str(room)}), 24.0)
        with pytest.raises(ConfigError):
            check_embedded_memory(C.load(None, {**overrides, key: str(room + 1)}), 24.0)
    none = C.load(None, {"recovery": "none", "num_servers": "1"})
    assert embedded_processes(none) == {"worker": 2, "server": 1, "spare": 0, "supervisor": 1}


def test_a_single_value_flag_given_twice_is_refused(capsys):
    """argparse keeps the last and drops the other; --kill repeats."""
    from raytrain_ft.cli import main

    for argv, flag in (
        (["train", "--lr", "0.1", "--lr=-1"], "--lr"),
        (["train", "--config", "/nonexistent.yaml", "--config", "c.yaml"], "--config"),
        (["simulate", "--seed", "1", "--seed", "2"], "--seed"),
    ):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        assert (
            capsys.readouterr().err.strip()
            == f"raytrain-ft: error: {flag}: given twice; give it once"
        )


def test_simulate_replay_refuses_the_settings_it_would_ignore(capsys):
    from raytrain_ft.cli import main

    assert main(["simulate", "--replay", "5", "--mode", "sync", "--schedules", "10"]) == 2
    assert "--schedules: --replay runs the one schedule it names" in capsys.readouterr().err


def test_simulate_replay_says_which_protocol_paths_the_schedule_reached(capsys):
    from raytrain_ft.cli import main

    assert main(["simulate", "--replay", "5", "--mode", "sync"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["violations"] == [] and summary["reached"]["run_done"] == 1


def test_simulate_a_bug_only_holdups_show_turns_them_on_and_its_replay_fails_again(capsys):
    """``no-held-up-grace`` needs schedules that hold the supervisor up: injecting it turns them on
    (the summary says so), and the replay line it prints fails the same way."""
    from raytrain_ft.cli import main

    argv = ["simulate", "--inject-bug", "no-held-up-grace", "--schedules", "50", "--seed", "7"]
    assert main([*argv, "--processes", "1"]) == 1
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["holdups"] is True and summary["violation"][0]["kind"] == "held-up"
    assert main(summary["replay"].split()[1:]) == 1
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["holdups"] is True and again["violations"][0] == summary["violation"][0]


def test_chaos_random_schedules_that_cannot_run_are_refused_before_connecting(capsys):
    """Nothing listens at the address: each error comes before it is tried."""
    from raytrain_ft.cli import main

    for extra, needle in (
        (["--mtbf-s", "1e-9", "--min-gap-s", "0"], "--mtbf-s: --duration-s 60 at --mtbf-s 1e-09"),
        (["--duration-s", "0"], "--duration-s: must be > 0"),
        (["--roles", "node"], "--roles: node kills need the run's own cluster"),
    ):
        assert main(["chaos", "--address", "127.0.0.1:1", "--random", *extra]) == 2
        assert needle in capsys.readouterr().err


def test_submit_refuses_a_kill_past_the_runs_steps_before_contacting_the_cluster(capsys):
    from raytrain_ft.cli import main

    argv = [
        "submit",
        "--address",
        "http://127.0.0.1:1",
        "--steps",
        "2",
        "--kill",
        "server:0@step=3",
    ]
    assert main(argv) == 2
    assert "the run ends after step 2, so this kill would never fire" in capsys.readouterr().err


def test_an_empty_argument_of_any_command_is_refused(capsys):
    """An unset shell variable as a job id, an address or a file: one line naming it, not a
    fallback to a default or a call with an empty id."""
    from raytrain_ft.cli import main

    for argv, name in (
        (["status", ""], "job_id"),
        (["logs", "raysubmit_x", "--address", " "], "--address"),
        (["submit", "--address", ""], "--address"),
        (["report", ""], "summary"),
        (["train", "--config", ""], "--config"),
    ):
        assert main(argv) == 2, argv
        assert capsys.readouterr().err.strip() == (
            f"raytrain-ft: error: {name}: got an empty value (an unset variable?); give a value"
        )


def test_a_home_path_is_expanded_for_the_files_a_run_writes(tmp_path, monkeypatch):
    """`--output-json "~/x"` (quoted, or from YAML) means the home directory, not a directory
    named ~ here."""
    from raytrain_ft.cli import _home_expanded

    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = _home_expanded(C.load(None, {"checkpoint_dir": "~/ck", "resume_from": "~/ck"}))
    assert cfg.recovery.checkpoint_dir == cfg.recovery.resume_from == str(tmp_path / "ck")


@pytest.mark.parametrize(
    "argv, field",
    [
        (["--optimizer", "adam", "--momentum", "0.9"], "optim.momentum"),
        (["--mode", "sync", "--staleness", "2"], "consistency.staleness"),
        (["--recovery", "none", "--num-spares", "1"], "recovery.num_spares"),
        (["--recovery", "none", "--fold-log", "true"], "recovery.fold_log"),
        (["--snapshot-interval", "5", "--expected-mtbf-s", "3600"], "recovery.expected_mtbf_s"),
        (["--simulate-compute", "5", "--prefetch-batches", "2"], "data.prefetch_batches"),
    ],
)
def test_a_flag_the_run_would_ignore_is_refused_even_at_its_default_value(argv, field):
    # each value is the field's default: only the flag having been given makes it a setting
    with pytest.raises(ConfigError) as e:
        config_of(*argv)
    assert e.value.field == field


def test_a_config_dict_may_carry_defaults_the_run_ignores():
    # a submitted job carries its whole config, defaults included (momentum with adam): taken
    cfg = C.from_dict(C.TrainConfig(optim=C.OptimConfig(name="adam")).to_dict())
    assert cfg.optim.name == "adam"
    # and flags given alongside such a dict are judged as flags
    with pytest.raises(ConfigError, match="drop optim.momentum"):
        C.from_command_line(cfg.to_dict(), {"momentum": 0.9})


def test_simulate_refuses_a_bug_the_chosen_mode_cannot_show(capsys):
    from raytrain_ft.cli import main

    assert main(["simulate", "--inject-bug", "ungrouped-mean", "--mode", "async"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("raytrain-ft: error: --inject-bug: ungrouped-mean breaks pre-aggregation")
    assert err.endswith("use --mode sync or mixed (or all)")


def test_the_done_line_takes_a_run_without_an_eval_set_and_warns_of_a_diverged_one():
    brief = {
        "steps_completed": 5,
        "eval_accuracy": None,
        "final_loss": None,
        "samples_per_sec": 100.0,
        "train_time_s": 1.0,
    }
    warning, line = cli.done_lines(brief, {"eval_loss": None, "recoveries": []})
    assert line == "done: 5 steps, eval loss -, final loss -, 100 samples/s over 1.0s, 0 recoveries"
    assert "diverged" in warning and "--lr" in warning
    # simulated compute computes no loss: nothing diverged
    simulated = {
        "eval_loss": None,
        "recoveries": [],
        "config": {"cluster": {"simulate_compute_ms": 5}},
    }
    warning, line = cli.done_lines(brief, simulated)
    assert warning is None and "final loss -" in line
    brief.update(eval_accuracy=0.5, final_loss=0.25)
    warning, line = cli.done_lines(brief, {"eval_loss": 1.0, "recoveries": [{}]})
    assert warning is None and "eval accuracy 0.5000, final loss 0.2500" in line
    assert line.endswith(", 1 recovery")


def test_simulate_refuses_more_schedules_than_it_could_run(capsys):
    from raytrain_ft.cli import MAX_SCHEDULES, main

    assert main(["simulate", "--schedules", str(MAX_SCHEDULES + 1)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--schedules: 10,000,001 schedules would run for days" in err[0]


def test_epochs_and_steps_in_one_config_file_are_refused(tmp_path, capsys):
    from raytrain_ft.cli import main

    path = tmp_path / "run.yaml"
    path.write_text("epochs: 1\nsteps: 5\n")
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"epochs: not used: {path} sets steps: 5 too" in err[0], err
    # a config written out in full (as `submit` sends it) holds epochs at its default: not given
    from raytrain_ft import cli

    full = json.dumps({"epochs": 5, "steps": 3})
    assert cli._config(cli.build_parser().parse_args(["train", "--config-json", full])).steps == 3


def test_the_model_and_the_summary_through_a_symlink_are_one_file(tmp_path, capsys):
    """--save-model would overwrite the summary --output-json names through a symlink."""
    from raytrain_ft.cli import main

    target = tmp_path / "model.pt"
    target.touch()
    link = tmp_path / "run.json"
    link.symlink_to(target)
    assert main(["train", "--output-json", str(link), "--save-model", str(target)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--save-model: is the --output-json path: the model would" in err[0]


class _FakeSupervisor:
    """What ``chaos`` reads of a live run: its status, with a run of 2 workers and 2 shards."""

    def __init__(self):
        import types

        targets = types.SimpleNamespace(
            num_shards=2, workers=[None, None], num_spares=1, recovery="replica"
        )
        self.status = types.SimpleNamespace(
            remote=lambda: types.SimpleNamespace(targets=targets, epochs=[1, 1], workers=[0, 0])
        )


@pytest.fixture
def live_run(monkeypatch):
    """``chaos`` against a fake run: Ray's calls answer at once; the schedule fires what
    ``fired`` holds."""
    import types

    import ray

    from raytrain_ft import jobs
    from raytrain_ft.recovery import chaos

    fired: list = []
    monkeypatch.setattr(jobs, "check_ray_address", lambda address, field: address)
    monkeypatch.setattr(ray, "init", lambda **kw: None)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(ray, "get", lambda ref: ref)
    monkeypatch.setattr(
        ray, "get_runtime_context", lambda: types.SimpleNamespace(gcs_address="10.0.0.5:6379")
    )
    monkeypatch.setattr(
        chaos, "find_supervisor", lambda run_id, wait_s, **kw: ("r1", _FakeSupervisor())
    )
    monkeypatch.setattr(chaos, "run_schedule", lambda supervisor, kills, **kw: list(fired))
    return fired


def test_chaos_names_a_kill_the_run_lacks_before_saying_what_is_scheduled(live_run, capsys):
    assert cli.main(["chaos", "--address", "127.0.0.1:1", "--kill", "server:5@step=3"]) == 2
    out = capsys.readouterr()
    assert "scheduled" not in out.out
    assert "--kill: server:5@step=3: the run has 2 server(s), index 5 does not exist" in out.err


def test_chaos_whose_kills_never_fired_fails_and_names_them(live_run, capsys):
    argv = ["chaos", "--address", "127.0.0.1:1", "--kill", "worker:0@step=900"]
    assert cli.main(argv) == 1
    out = capsys.readouterr()
    # the line says which run, on which cluster: --address auto takes any Ray this machine runs
    assert out.out.startswith(
        "chaos against r1 (2 workers, 2 shards, 1 spare) on the Ray cluster at 10.0.0.5:6379: "
        "1 kill scheduled\n"
    )
    assert "fired 0 of 1 kill; the run ended before worker:0@step=900" in out.err
    live_run.append({"kill": "worker:0@step=900"})
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.endswith("fired 1 kill\n")
    assert cli.main(["chaos", "--kill", "worker:0@step=900"]) == 0
    assert "10.0.0.5:6379 (found by --address auto): 1 kill" in capsys.readouterr().out


def test_chaos_takes_either_a_kill_list_or_a_random_schedule(live_run, capsys):
    argv = ["chaos", "--address", "127.0.0.1:1", "--kill", "worker:0@step=9", "--random"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("raytrain-ft: error: --kill: a schedule is either the --kill list or ")
    assert len(err.strip().splitlines()) == 1


def test_a_local_sgd_run_counts_rounds_not_steps():
    from raytrain_ft.report import progress_line

    brief = {
        "steps_completed": 4,
        "eval_accuracy": 0.5,
        "final_loss": 0.25,
        "samples_per_sec": 100.0,
        "train_time_s": 1.0,
    }
    config = {"mode": "local_sgd", "consistency": {"local_steps": 8}}
    _, line = cli.done_lines(brief, {"recoveries": [], "config": config})
    assert line.startswith("done: 4 rounds of 8 local steps, eval accuracy 0.5000")
    _, line = cli.done_lines(brief, {"recoveries": [], "config": {"mode": "sync"}})
    assert line.startswith("done: 4 steps,")
    assert "] round 4/8 loss" in progress_line(4, 8, 0.5, 0.5, 1.0, 1.0, unit="round")


def test_a_yaml_boolean_where_a_word_belongs_says_to_quote_it():
    with pytest.raises(ConfigError, match="quote the word"):
        C.from_dict({"mode": True})
    with pytest.raises(ConfigError) as e:
        C.from_dict({"mode": "bogus"})
    assert "quote" not in str(e.value)


def test_messages_name_flags_on_the_command_line_and_config_fields_in_python(capsys):
    """One check, two readers: the CLI's user gave flags, the Python API's user gave fields."""
    with pytest.raises(ConfigError) as e:
        C.TrainConfig(optim=C.OptimConfig(name="adam", momentum=0.5))
    assert str(e.value) == (
        "optim.momentum: applies to optim.name='sgd' or 'rmsprop', not adam, which would ignore "
        "it; drop optim.momentum"
    )
    assert cli.main(["train", "--optimizer", "adam", "--momentum", "0.5"]) == 2
    assert capsys.readouterr().err.strip() == (
        "raytrain-ft: error: optim.momentum: applies to --optimizer sgd or rmsprop, not adam, "
        "which would ignore it; drop --momentum"
    )
    assert str(e.value).startswith("optim.momentum: applies to optim.name=")  # the CLI is done
    # values as Python writes them; flags of the CLI alone stay
    text = str(
        ConfigError(
            "x",
            "give --batch-size 2 or more, set --overlap-comm false, and an --eval-fraction; "
            "drop --output-json",
        )
    )
    assert text == (
        "x: give data.batch_size=2 or more, set cluster.overlap_comm=False, and a "
        "data.eval_fraction; drop --output-json"
    )


def test_the_run_length_given_twice_in_python_is_refused_and_a_steps_flag_overrides_a_file(
    tmp_path,
):
    """steps overrides epochs: an epochs other than its default beside steps would be ignored."""
    with pytest.raises(ConfigError) as e:
        C.TrainConfig(epochs=3, steps=5)
    assert str(e.value) == (
        "epochs: not used: steps is 5 too (a run's length in steps per worker, which overrides "
        "epochs); give one of them"
    )
    cfg = C.TrainConfig(steps=5)
    cfg.epochs = 3  # changed after it was built: checked again when a Trainer takes it
    with pytest.raises(ConfigError, match="epochs: not used: steps is 5 too"):
        C.check_again(cfg)
    # a --steps flag sets the length of a run whose file gives epochs
    path = tmp_path / "run.yaml"
    path.write_text("epochs: 3\n")
    cfg = cli._config(
        cli.build_parser().parse_args(["train", "--config", str(path), "--steps", "7"])
    )
    assert (cfg.steps, cfg.epochs) == (7, C.TrainConfig().epochs)


def test_chaos_says_once_that_it_waits_for_a_run_to_start(monkeypatch):
    """A named run not on the cluster yet (a job still starting): one line says what chaos waits
    for, and how long; the run found, its supervisor is returned."""
    import ray

    from raytrain_ft.actors import NAMESPACE
    from raytrain_ft.recovery.chaos import find_supervisor

    answers = [[], [{"name": "r0/supervisor", "namespace": NAMESPACE}]]
    answers.append(answers[1] + [{"name": "r9/supervisor", "namespace": NAMESPACE}])
    monkeypatch.setattr(ray.util, "list_named_actors", lambda all_namespaces: answers.pop(0))
    monkeypatch.setattr(ray, "get_actor", lambda name, namespace: ("handle", name))
    said: list = []
    got = find_supervisor("r9", wait_s=30, poll_s=0, on_wait=said.append)
    assert got == ("r9", ("handle", "r9/supervisor")) and not answers
    assert said == ["waiting up to 30s for run r9 to start on this cluster (active: none)"]


def test_a_stop_signal_ray_turned_into_a_system_error_is_still_the_stop():
    """SIGTERM while the driver waited in Ray's C code for the supervisor's start surfaced as
    "SystemError: ... returned a result with an exception set": a traceback, exit 1."""
    import signal

    from raytrain_ft.cli import Stopped, _stop_signal_of

    try:
        try:
            raise Stopped(signal.SIGTERM)
        except Stopped:
            raise SystemError("<built-in method __new__> returned a result with an exception set")  # noqa: B904 -- as Ray raises it
    except SystemError as e:
        wrapped = e
    assert _stop_signal_of(wrapped) == signal.SIGTERM
    assert _stop_signal_of(KeyboardInterrupt()) == signal.SIGINT
    assert _stop_signal_of(SystemError("another")) is None


def test_a_command_quoted_in_a_message_keeps_its_flags_in_python():
    """`ray job list --address URL` read "ray job list cluster.address URL" in the Python API."""
    from raytrain_ft.errors import JobError

    said = str(JobError("no job 'x'; list them with `ray job list --address http://h:8265`"))
    assert said.endswith("`ray job list --address http://h:8265`")
    assert str(JobError("fix --batch-size 0")) == "fix data.batch_size=0"
