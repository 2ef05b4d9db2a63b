"""Run folders that cannot lie: one run per folder (its fingerprint), one writer at a time (its lock),
config files and --print-config, and errors a user can cause as one line."""

import json
import os
import socket
import string
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxpref.cli import main
from jaxpref.data.synthetic import SortingTask, sft_rows, write_jsonl
from jaxpref.overrides import apply_overrides
from jaxpref.recipes.configs import SUBCOMMAND_CONFIGS, RunConfig
from jaxpref.recipes.run_folder import LOCK, RunFolderError, RunFolderLocked, open_run_folder, write_config


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    rows = sft_rows(SortingTask(corruption_rate=0.0), 32, seed=0)
    pairs = [
        {"prompt": r["prompt"], "chosen": r["completion"], "rejected": r["completion"][::-1] + "0"}
        for r in rows
    ]
    folder = tmp_path_factory.mktemp("data")
    return write_jsonl(folder / "pairs.jsonl", pairs), write_jsonl(folder / "other.jsonl", pairs[:-1])


def refused(argv, capsys) -> str:
    """The one error line of a run that must stop with exit status 2."""
    with pytest.raises(SystemExit) as exit:
        main(argv)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("jaxpref ")]
    return line


def trained(config):
    """``config``'s run folder as a finished run leaves it, without the training (which has its tests)."""
    with open_run_folder(config) as folder:
        write_config(config)
        (folder.path / "checkpoints" / str(config.train.steps)).mkdir(parents=True)
    return folder.path


def test_a_rerun_continues_only_the_same_run(pairs, tmp_path, capsys):
    data, other = pairs
    argv = ["dpo", f"--data={data}", f"--set=runs_dir={tmp_path}", "--set=data.batch_size=8", "--steps=3"]
    same = [f"runs_dir={tmp_path}", "data.batch_size=8", f"data.train_files={data}", "train.steps=3"]
    run_dir = trained(apply_overrides(SUBCOMMAND_CONFIGS["dpo"], same))  # what `main(argv)` trains
    config, record = (run_dir / "config.json").read_bytes(), (run_dir / "run.json").read_bytes()

    assert main(argv) == 0  # not "resumed from step 3" with a re-export
    assert capsys.readouterr().out == f"run dpo already finished at step 3; nothing to do ({run_dir})\n"
    (tmp_path / "moved.jsonl").write_bytes(data.read_bytes())  # data files count by content
    assert main([*argv, f"--data={tmp_path / 'moved.jsonl'}"]) == 0
    assert "already finished" in capsys.readouterr().out

    line = refused([*argv, "--set=objective.beta=0.5", "--objective=ipo"], capsys)
    assert f"{run_dir} holds a different run (" in line
    assert 'objective.name: "sigmoid" -> "ipo"; objective.hparams.beta: (unset) -> 0.5' in line
    assert "a new --name" in line and "--overwrite" in line
    line = refused([*argv, f"--data={other}"], capsys)
    assert f'data.train_files: ["{data}"] (content ' in line and f'-> ["{other}"] (content ' in line
    line = refused([*argv, "--steps=2"], capsys)  # fewer steps than trained: never the 3-step model
    assert f"{run_dir} is trained to step 3; `train.steps`=2 cannot undo steps" in line
    assert (run_dir / "config.json").read_bytes() == config and (run_dir / "run.json").read_bytes() == record


def test_more_steps_keep_the_schedule_and_overwrite_starts_afresh(pairs, tmp_path, caplog):
    base = apply_overrides(
        SUBCOMMAND_CONFIGS["dpo"], [f"runs_dir={tmp_path}", f"data.train_files={pairs[0]}"]
    )
    run, more = (apply_overrides(base, [f"train.steps={steps}"]) for steps in (3, 5))
    run_dir = trained(run)
    assert json.loads((run_dir / "run.json").read_text())["finished"] == {"step": 3, "steps": 3}
    with open_run_folder(more) as folder:  # on to step 5, on the first run's 3-step schedule
        assert folder.finished_step is None and folder.config.train.schedule_steps == 3
        assert folder.config.train.schedule_length == 3 and folder.config.train.steps == 5
    assert "training on to step 5 on its 3-step learning-rate schedule" in caplog.text
    with pytest.raises(
        RunFolderError, match=r"train.schedule_steps: 3 -> 5"
    ):  # another schedule: another run
        with open_run_folder(apply_overrides(more, ["train.schedule_steps=5"])):
            pass
    with open_run_folder(apply_overrides(more, ["objective.beta=0.5"]), overwrite=True) as folder:
        assert (
            sorted(os.listdir(folder.path)) == ["run.json", LOCK]
            and folder.config.train.schedule_steps is None
        )


def test_one_writer_per_folder_and_stale_locks_are_taken_over(tmp_path, caplog):
    config = RunConfig(name="x", runs_dir=str(tmp_path))
    lock = tmp_path / "x" / LOCK
    with open_run_folder(config, identity=False):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with pytest.raises(RunFolderLocked, match=f"{tmp_path / 'x'} is in use by process {os.getpid()} on "):
            with open_run_folder(config, identity=False):
                pass
        assert lock.exists()  # the refused run leaves the live run's lock alone
    assert not (tmp_path / "x").exists()  # released, and the empty folder it made removed

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.parent.mkdir()
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with open_run_folder(config, identity=False):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert f"taking over {lock}: its run" in caplog.text and not lock.exists()


def test_a_locked_folder_stops_the_command_at_once(pairs, tmp_path, capsys):
    (tmp_path / "dpo").mkdir()
    (tmp_path / "dpo" / LOCK).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    line = refused(["dpo", f"--data={pairs[0]}", f"--set=runs_dir={tmp_path}"], capsys)
    assert f"jaxpref dpo: error: {tmp_path / 'dpo'} is in use by process {os.getpid()}" in line
    assert os.listdir(tmp_path / "dpo") == [LOCK]


def test_config_file_under_the_flags_and_print_config(tmp_path, capsys):
    (tmp_path / "run.yaml").write_text(
        "train:\n  steps: 7\n  progress: false\nobjective: {beta: 0.3}\ndata: {batch_size: 4}\n"
    )
    argv = ["dpo", f"--config={tmp_path / 'run.yaml'}", "--set=data.batch_size=8", "--print-config"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    config = json.loads(printed)
    assert config["train"]["steps"] == 7 and config["train"]["progress"] is False
    assert config["objective"]["hparams"] == {"beta": 0.3} and config["data"]["batch_size"] == 8
    (tmp_path / "printed.json").write_text(printed)  # the printed config reads back as a config file
    assert main(["dpo", f"--config={tmp_path / 'printed.json'}", "--print-config"]) == 0
    assert capsys.readouterr().out == printed

    (tmp_path / "bad.yaml").write_text("train: {steps: many}\n")
    assert refused(["dpo", f"--config={tmp_path / 'bad.yaml'}"], capsys) == (
        "jaxpref dpo: error: `train.steps` expects int, got 'many'."
    )


def test_user_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    argv = ["dpo", f"--data={tmp_path / 'missing.jsonl'}", f"--set=runs_dir={tmp_path}"]
    line = refused(argv, capsys)
    assert line == f"jaxpref dpo: error: `data.train_files`: {tmp_path / 'missing.jsonl'} does not exist."
    assert not any(tmp_path.iterdir())  # nothing written
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main([*argv, "--debug"])


_POSITIVE_INTS = ("train.steps", "data.batch_size", "train.grad_accum_steps", "train.checkpoint_every")
_NOT_INTS = st.one_of(
    st.integers(max_value=0).map(str),
    st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: x != int(x)).map(repr),
    st.text(string.ascii_letters, min_size=1),
)
_BAD_LEARNING_RATES = st.one_of(
    st.floats(max_value=0).map(repr),
    st.sampled_from(["nan", "inf", "-inf"]),
    st.text(string.ascii_letters, min_size=1),
)
_WORDS = st.text(string.ascii_letters + string.digits + "-_.", min_size=1)
_BAD_SETTINGS = st.one_of(
    st.tuples(st.sampled_from(_POSITIVE_INTS), _NOT_INTS),
    st.tuples(st.just("optimizer.learning_rate"), _BAD_LEARNING_RATES),
    st.tuples(
        st.just("data.layout"), _WORDS.filter(lambda w: w not in ("pairwise", "sft", "unpaired", "ranked"))
    ),
    st.tuples(st.just("train.reference"), _WORDS.filter(lambda w: w not in ("frozen", "cached", "none"))),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(setting=_BAD_SETTINGS)
def test_any_bad_value_is_one_line_naming_the_field(setting, tmp_path, capsys):
    key, value = setting
    line = refused(["dpo", "--data=x.jsonl", f"--set=runs_dir={tmp_path}", f"--set={key}={value}"], capsys)
    assert line.startswith("jaxpref dpo: error: ") and f"`{key}`" in line, line
