"""jaxpref/recipes/diffusion.py without training (the steps and samplers it runs have their own tests):
the CLI wiring, the check on methods, the stage lookup and the results table."""

import pytest

import jaxpref.recipes.diffusion
from jaxpref.cli import main
from jaxpref.recipes.diffusion import METHODS, DiffusionExperimentConfig, markdown_table, run_diffusion


def test_cli_passes_methods_and_overrides_to_the_experiment(tmp_path):
    # An unknown method fails before anything is trained, after the CLI built the config (--debug:
    # the error itself, not its one line).
    with pytest.raises(ValueError, match="methods"):
        main(["diffusion", "--method", "dpo", "sft", "--name", "x", f"--set=runs_dir={tmp_path}", "--debug"])
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "command, method",
    [("diffusion-dpo", "dpo"), ("diffusion-kto", "kto"), ("flow-dpo", "flow-dpo"), ("draft", "draft")],
)
def test_each_method_has_its_subcommand(monkeypatch, command, method):
    configs = []
    monkeypatch.setattr(jaxpref.recipes.diffusion, "run_diffusion", configs.append)
    assert main([command, "--name", "mine", "--set", f"{method.replace('-', '_')}.steps=7"]) == 0
    (config,) = configs
    assert config.methods == (method,) and config.name == "mine" and config.stage(method).steps == 7


def test_methods_must_be_known_and_stages_are_found_by_method_name():
    with pytest.raises(ValueError, match="methods"):
        run_diffusion(DiffusionExperimentConfig(methods=()))
    config = DiffusionExperimentConfig()
    assert {method: config.stage(method) for method in METHODS}["flow-dpo"] is config.flow_dpo
    assert config.sampler("ddpm").method == "ddim" and config.sampler("flow").method == "euler"
    assert config.prediction("ddpm") == "v_prediction" and config.prediction("flow") == "velocity"


def test_markdown_table_has_a_row_per_model():
    metrics = dict(
        hidden_reward=0.5, colour=0.1, shape=0.2, centred=0.3, size=0.4, diversity=0.25, seconds=12.3
    )
    table = markdown_table({"pretrained ddpm": metrics, "dpo": {**metrics, "hidden_reward": 0.75}})
    lines = table.splitlines()
    assert lines[0] == "| model | hidden reward | colour | shape | centred | size | diversity | seconds |"
    assert lines[2] == "| pretrained ddpm | 0.500 | 0.100 | 0.200 | 0.300 | 0.400 | 0.250 | 12 |"
    assert lines[3].startswith("| dpo | 0.750 |") and len(lines) == 4
