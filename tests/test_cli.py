"""The `jaxpref` console script: subcommands, --set overrides, run folders."""

import json
import subprocess
import sys
import types

import numpy as np
import pytest

from jaxpref.cli import main
from jaxpref.recipes.common import DeadRunWatch
from jaxpref.data.synthetic import SortingTask, sft_rows, write_jsonl
from jaxpref.overrides import apply_overrides
from jaxpref.recipes.configs import SUBCOMMAND_CONFIGS

TINY = [
    "--steps=3",
    "--set=data.batch_size=8",
    "--set=data.max_length=32",
    "--set=train.progress=false",
    "--set=train.checkpoint_every=2",
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    rows = sft_rows(SortingTask(corruption_rate=0.0), 64, seed=0)
    rng = np.random.default_rng(0)
    pairs = [
        {"prompt": r["prompt"], "chosen": r["completion"], "rejected": r["completion"][::-1] + "0"}
        for r in rows
    ]
    unpaired = [
        {"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
        for p in pairs
        for side in ("chosen", "rejected")
        if rng.random() < 0.5 or side == "chosen"
    ]
    ranked = [
        {"prompt": p["prompt"], "responses": [p["chosen"], p["rejected"], p["chosen"][:-1] + "9"][: 2 + i % 2],
         "scores": [1.0, 0.0, 0.5][: 2 + i % 2]}
        for i, p in enumerate(pairs)
    ]  # fmt: skip
    return {
        "sft": write_jsonl(folder / "sft.jsonl", rows),
        "dpo": write_jsonl(folder / "pairs.jsonl", pairs),
        "kto": write_jsonl(folder / "unpaired.jsonl", unpaired),
        "listwise": write_jsonl(folder / "ranked.jsonl", ranked),
        "tdpo": write_jsonl(folder / "pairs.jsonl", pairs),
    }


# dpo trains RPO, a sum from the command line: beta goes to the one term that takes it.
@pytest.mark.parametrize(
    "command,extra",
    [
        ("sft", []),
        ("dpo", ["--objective=sigmoid + 0.2*sft", "--set=objective.beta=0.5"]),
        ("kto", []),
        ("listwise", ["--objective=lipo_lambda"]),  # ragged lists of 2 and 3 responses
        ("tdpo", []),
    ],
)
def test_training_subcommands_write_their_run(command, extra, files, tmp_path, capsys):
    argv = [command, f"--data={files[command]}", f"--set=runs_dir={tmp_path}", *TINY, *extra]
    assert main(argv) == 0
    run_dir = tmp_path / command
    config = json.loads((run_dir / "config.json").read_text())
    assert config["train"]["steps"] == 3
    lines = (run_dir / "metrics" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    if command == "dpo":
        assert config["objective"] == {"name": "sigmoid + 0.2*sft", "hparams": {"beta": 0.5}}
        for metrics in map(json.loads, lines):
            expected = metrics["loss/sigmoid"] + 0.2 * metrics["loss/sft"]
            np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)
    assert (run_dir / "hf" / "config.json").exists() and (run_dir / "metrics" / "curves.png").exists()
    assert f"{command} finished" in capsys.readouterr().out
    # Rerunning the same command finds the run finished: nothing to train, nothing rewritten.
    assert main(argv) == 0
    assert capsys.readouterr().out == f"run {command} already finished at step 3; nothing to do ({run_dir})\n"
    assert len((run_dir / "metrics" / "metrics.jsonl").read_text().splitlines()) == 3


def test_overrides_are_typed_and_checked():
    config = apply_overrides(
        SUBCOMMAND_CONFIGS["dpo"],
        ["objective.beta=0.2", "train.steps=7", "data.prefix_sharing=false", "model.checkpoint=none"],
    )
    assert config.objective.hparams == {"beta": 0.2} and config.train.steps == 7
    assert config.data.prefix_sharing is False and config.model.checkpoint is None
    assert apply_overrides(config, ['data.train_files=["a.jsonl"]']).data.train_files == ("a.jsonl",)
    with pytest.raises(ValueError, match="train.stepz"):
        apply_overrides(config, ["train.stepz=1"])
    with pytest.raises(ValueError, match="train.steps"):
        apply_overrides(config, ["train.steps=many"])
    with pytest.raises(ValueError, match="field.subfield=value"):
        apply_overrides(config, ["train.steps"])


@pytest.mark.parametrize(
    "command,setting,message",
    [
        (
            "dpo",
            "--objective=sigmoid + nope",
            "'nope' in objective 'sigmoid + nope' is not a known objective",
        ),
        ("dpo", "--objective=sigmoid + x*sft", "Weight 'x' of 'sft'"),
        (
            "kto",
            "--objective=sigmoid",
            "'sigmoid' in objective 'sigmoid' is not a known objective; use one of [",
        ),
        ("dpo", "--set=objective.beta=abc", "`beta`='abc' of objective 'sigmoid' must be a number"),
        (
            "dpo",
            "--set=objective.gamma=1",
            "No term of objective 'sigmoid' accepts hyperparameter(s) ['gamma']",
        ),
        ("grpo", "--set=grpo.loss_type=nope", "`grpo.loss_type`='nope' must be one of"),
        ("dpo", "--steps=0", "`train.steps`=0 must be an integer >= 1."),
        (
            "dpo",
            "--set=optimizer.learning_rate=inf",
            "`optimizer.learning_rate`=inf must be a finite number > 0.",
        ),
    ],
)
def test_a_bad_setting_is_one_line_before_anything_is_built(command, setting, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        main([command, "--data=missing.jsonl", f"--set=runs_dir={tmp_path}", setting])
    assert exit.value.code == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith(f"jaxpref {command}: error: ") and message in last
    assert not any(tmp_path.iterdir())


def test_a_30_step_run_prints_under_30_lines(files, tmp_path):
    # A subprocess: the command's own logging set-up, stdout and stderr not terminals (lines, no bar).
    argv = ["dpo", f"--data={files['dpo']}", "--steps=30", f"--set=runs_dir={tmp_path}", *TINY[1:3]]
    result = subprocess.run([sys.executable, "-m", "jaxpref.cli", *argv], capture_output=True, text=True)
    lines = (result.stdout + result.stderr).splitlines()
    assert result.returncode == 0 and len(lines) < 30, "\n".join(lines)
    assert "dpo finished: 30 steps" in result.stdout and "step 30/30 (100%)" in result.stderr
    assert not any("absl" in line or "orbax" in line for line in lines), "\n".join(lines)


def test_a_dead_run_is_flagged_once(caplog):
    written = []
    watch = DeadRunWatch(
        types.SimpleNamespace(write=lambda *a: written.append(a), flush=lambda: "flushed"), 4, 1e6
    )
    for step in range(1, 10):
        watch.write(step, {"loss": 0.5 if step > 2 else float(step), "grad_norm": 0.1})
    assert len(written) == 9 and watch.flush() == "flushed"  # a metrics writer still
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning.startswith("DEAD RUN? At step 6 the loss stayed at 0.5 for 4 steps in a row")
    assert "optimizer.learning_rate=1e+06" in warning


def test_help_lists_the_objectives(capsys):
    with pytest.raises(SystemExit):
        main(["dpo", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the help text
    assert "one of alphapo, aot," in out and "simpo, slic" in out and "'sigmoid + 0.2*sft'" in out


def test_dry_run_prints_the_topology_and_builds_nothing(tmp_path, capsys):
    argv = ["dpo", "--dry-run", f"--set=runs_dir={tmp_path}", "--set=mesh.fsdp=2", "--set=mesh.tensor=2"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "mesh: data=2 x fsdp=2 x tensor=2 (8 devices, 1 process(es))"
    assert lines[1].startswith("process 0: cpu:0 at (0, 0, 0); cpu:1 at (0, 0, 1);") and lines[1].count(" at ") == 8
    assert lines[2] == "batch: 32 examples per host (data.batch_size) -> 32 global, split over data x fsdp = 4 ways"
    assert not (tmp_path / "dpo").exists()
