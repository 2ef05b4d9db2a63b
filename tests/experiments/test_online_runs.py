"""Online runs from the command line: `jaxpref grpo` (run folder, resume, reward functions by name),
and the online subcommands' configs (rloo is GRPO with leave-one-out advantages; every algorithm
section is its algorithm, with the library's defaults)."""

import dataclasses
import json

from jaxpref.cli import main
from jaxpref.data.synthetic import SortingTask, prompts, write_jsonl
from jaxpref.recipes.configs import ONLINE_SUBCOMMAND_CONFIGS
from jaxpref.recipes.online import build_algorithm
from jaxpref.train.online import GRPO, PPO, OnlineDPO


def test_subcommand_configs_build_their_algorithms_with_the_library_defaults():
    grpo_config, rloo_config = (ONLINE_SUBCOMMAND_CONFIGS[name] for name in ("grpo", "rloo"))
    assert rloo_config.grpo == dataclasses.replace(grpo_config.grpo, advantage="rloo")
    assert build_algorithm(grpo_config) == GRPO()
    assert build_algorithm(rloo_config) == GRPO(advantage="rloo")
    assert build_algorithm(ONLINE_SUBCOMMAND_CONFIGS["online-dpo"]) == OnlineDPO()
    assert build_algorithm(ONLINE_SUBCOMMAND_CONFIGS["ppo"]) == PPO()
    assert ONLINE_SUBCOMMAND_CONFIGS["online-dpo"].rollout.num_generations == 2


def test_grpo_subcommand_writes_its_run_and_resumes(tmp_path, capsys):
    prompts_file = write_jsonl(
        tmp_path / "prompts.jsonl", [{"prompt": p} for p in prompts(SortingTask(), 32, 0)]
    )
    argv = [
        "grpo",
        f"--data={prompts_file}",
        "--steps=3",
        f"--set=runs_dir={tmp_path}",
        "--set=data.batch_size=4",
        "--set=rollout.num_generations=4",
        "--set=rollout.max_new_tokens=8",
        '--set=rollout.reward_funcs=["sorting_exact", "jaxpref.train.rewards:sorting_partial"]',
        "--set=rollout.reward_weights=[1.0, 0.5]",
        "--set=grpo.epsilon_high=0.28",
        "--set=train.checkpoint_every=2",
        "--set=train.progress=false",
    ]
    assert main(argv) == 0
    run_dir = tmp_path / "grpo"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["grpo"]["loss_hparams"] == {"epsilon_high": 0.28}
    lines = [json.loads(line) for line in (run_dir / "metrics" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3]
    assert {"rewards/sorting_exact/mean", "rewards/sorting_partial/mean"} <= set(lines[-1])
    assert (run_dir / "hf" / "config.json").exists() and (run_dir / "metrics" / "curves.png").exists()
    assert "grpo finished" in capsys.readouterr().out
    assert main(argv) == 0  # resumes from the last checkpoint: nothing left to train
    assert len((run_dir / "metrics" / "metrics.jsonl").read_text().splitlines()) == 3
