"""``jaxpref <subcommand>``: builds a config from defaults and ``--set`` overrides, runs an experiment.

::

    jaxpref demo                                   # the bundled pipeline: SFT -> pairs -> DPO -> eval
    jaxpref sft --data sft.jsonl --model /models/Qwen3-0.6B
    jaxpref dpo --data prefs.jsonl --model runs/sft/hf --objective ipo --set objective.beta=0.5
    jaxpref dpo --data prefs.jsonl --model runs/sft/hf --objective "sigmoid + 0.2*sft"   # RPO: DPO + NLL
    jaxpref dpo --data prefs.jsonl --model runs/sft/hf --set lora.rank=16 --set lora.targets='q_proj|v_proj'
    jaxpref kto --data unpaired.jsonl --model runs/sft/hf
    jaxpref listwise --data ranked.jsonl --model runs/sft/hf --objective lipo_lambda   # K responses, scores
    jaxpref tdpo --data prefs.jsonl --model runs/sft/hf --objective tdpo2             # token-level KL
    jaxpref reward --data prefs.jsonl --model /models/Qwen3-0.6B
    jaxpref reward --data prefs.jsonl --objective gpm --eval bench.jsonl   # General Preference Model
    jaxpref reward-eval --model runs/reward/hf --data bench.jsonl         # RewardBench-style evaluation
    jaxpref grpo --data prompts.jsonl --model runs/sft/hf --set rollout.reward_funcs='["my.rewards:exact"]'
    jaxpref rloo --data prompts.jsonl --model runs/sft/hf --set rollout.reward_model=runs/reward/hf
    jaxpref online-dpo --data prompts.jsonl --model runs/sft/hf       # 2 samples, the better one chosen
    jaxpref ppo --data prompts.jsonl --model runs/sft/hf              # value head, GAE, clipped losses
    jaxpref diffusion                              # image denoisers on the bundled shapes task: every method
    jaxpref diffusion-dpo --set dpo.steps=400      # one method (diffusion-kto, flow-dpo, draft alike)

Every run writes ``runs/<name>/``: the resolved ``config.json``, the prepared data and its bad-row
report, orbax checkpoints (rerunning the same command resumes), metrics (JSONL, TensorBoard,
``curves.png``) and the trained weights in Hugging Face layout under ``hf/``. Multi-host (TPU pod
slices, multi-node GPU): run the same command on every host with ``--distributed``. The configs and
runners are :mod:`jaxpref.recipes`; a bad setting is a one-line error before anything is built.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

_TRAINING = ("sft", "dpo", "kto", "listwise", "tdpo", "reward")
# Image generators on the shapes task (jaxpref/recipes/diffusion.py): subcommand -> its method there.
_DIFFUSION = {"diffusion-dpo": "dpo", "diffusion-kto": "kto", "flow-dpo": "flow-dpo", "draft": "draft"}
# The --objective subcommands -> the train-step family whose objectives they train.
_OBJECTIVE_FAMILIES = {
    "dpo": "pairwise", "kto": "unpaired", "listwise": "listwise", "tdpo": "token_level", "reward": "reward",
}  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    from jaxpref.overrides import add_override_argument
    from jaxpref.recipes.configs import ONLINE_SUBCOMMAND_CONFIGS
    from jaxpref.recipes.objectives import GPM, family_objectives

    parser = argparse.ArgumentParser(prog="jaxpref", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    add_override_argument(common)
    common.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() first (multi-host TPU pods, multi-node GPU)",
    )
    commands.add_parser("demo", parents=[common], help="the bundled end-to-end pipeline (make demo)")
    objectives = {command: list(family_objectives(family)) for command, family in _OBJECTIVE_FAMILIES.items()}
    objectives["reward"].append(GPM)  # gpm_loss on preference embeddings (jaxpref/recipes/reward.py), alone
    for name in (*_TRAINING, *ONLINE_SUBCOMMAND_CONFIGS):
        sub = commands.add_parser(name, parents=[common], help=f"train with {name}")
        sub.add_argument("--data", nargs="+", help="local JSONL or Parquet files (data.train_files)")
        sub.add_argument("--model", help="local Hugging Face checkpoint folder (model.checkpoint)")
        sub.add_argument("--name", help="run name: the run is written to runs/<name> (name)")
        sub.add_argument("--steps", type=int, help="training steps (train.steps)")
        if name in objectives:
            sub.add_argument(
                "--objective",
                metavar="OBJECTIVE",
                help=f"one of {', '.join(objectives[name])}, or a weighted sum of them written "
                "'NAME + WEIGHT*NAME ...', e.g. dpo's 'sigmoid + 0.2*sft' (objective.name)",
            )
    commands.choices["reward"].add_argument(
        "--eval",
        nargs="+",
        help="RewardBench-layout files to evaluate the trained model on (reward.eval_files)",
    )
    evaluate = commands.add_parser(
        "reward-eval", parents=[common], help="evaluate a reward model on RewardBench-layout files"
    )
    evaluate.add_argument("--model", required=True, help="the reward model's folder, e.g. runs/reward/hf")
    evaluate.add_argument(
        "--data",
        nargs="+",
        help="JSONL or Parquet files: prompt, chosen, rejected, subset (reward.eval_files)",
    )
    evaluate.add_argument("--name", help="results go to runs/<name> (name)")
    diffusion = commands.add_parser(
        "diffusion", parents=[common], help="pretrain image denoisers, then fine-tune them on preferences"
    )
    diffusion.add_argument(
        "--method", nargs="+", help="fine-tunings to run: dpo, kto, flow-dpo, draft (methods; default all)"
    )
    for name, method in _DIFFUSION.items():
        sub = commands.add_parser(
            name, parents=[common], help=f"`jaxpref diffusion --method {method}`: its generator, then {name}"
        )
        sub.set_defaults(method=[method])
    for name in ("diffusion", *_DIFFUSION):
        commands.choices[name].add_argument(
            "--name", help="run folder runs/<name> (name); stages already trained there are resumed"
        )
    return parser


def _shortcuts(args: argparse.Namespace) -> list[str]:
    """The convenience flags as ``--set`` assignments (explicit ``--set`` ones come after and win)."""
    # `reward-eval --data` names the files to evaluate on; `reward --eval` adds them to a training run.
    eval_files = args.data if args.command == "reward-eval" else getattr(args, "eval", None)
    train_files = None if args.command == "reward-eval" else getattr(args, "data", None)
    pairs = {
        "data.train_files": json.dumps(train_files) if train_files else None,
        "reward.eval_files": json.dumps(eval_files) if eval_files else None,
        "model.checkpoint": getattr(args, "model", None),
        "name": getattr(args, "name", None),
        "train.steps": getattr(args, "steps", None),
        "objective.name": getattr(args, "objective", None),
    }
    return [f"{key}={value}" for key, value in pairs.items() if value is not None]


def _no_check(config: Any) -> None:
    """For configs whose runners check what they use as they start."""


def _command(
    args: argparse.Namespace,
) -> tuple[Any, list[str], Callable[[Any], object], Callable[[Any], object]]:
    """The subcommand's starting config, its overrides, a check of the parsed config that builds
    nothing (a ValueError for a bad setting), and its runner (jaxpref.recipes)."""
    from jaxpref.recipes import configs
    from jaxpref.recipes.offline import run_objective

    if args.command == "demo":
        from jaxpref.recipes.demo import run_demo

        return configs.DemoConfig(), args.overrides, lambda config: run_objective(config.dpo), run_demo
    if args.command == "diffusion" or args.command in _DIFFUSION:
        from jaxpref.recipes.diffusion import DiffusionExperimentConfig, run_diffusion

        shortcuts = [f"methods={json.dumps(args.method)}"] if args.method else []
        shortcuts += [f"name={args.name}"] if args.name else []
        return DiffusionExperimentConfig(), [*shortcuts, *args.overrides], _no_check, run_diffusion
    overrides = [*_shortcuts(args), *args.overrides]
    if args.command in configs.ONLINE_SUBCOMMAND_CONFIGS:
        from jaxpref.recipes.online import build_algorithm, run_online_command

        return configs.ONLINE_SUBCOMMAND_CONFIGS[args.command], overrides, build_algorithm, run_online_command
    start = configs.SUBCOMMAND_CONFIGS[args.command]
    if args.command == "reward":
        from jaxpref.recipes.reward import reward_objective, run_reward

        return start, overrides, reward_objective, run_reward
    if args.command == "reward-eval":
        from jaxpref.recipes.reward_eval import run_reward_eval

        return start, overrides, _no_check, run_reward_eval
    from jaxpref.recipes.offline import run_offline

    return start, overrides, run_objective, run_offline


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.distributed:
        import jax

        jax.distributed.initialize()  # reads the cluster from the TPU / SLURM / env settings
    from jaxpref.overrides import apply_overrides

    start, overrides, check, run = _command(args)
    try:
        config = apply_overrides(start, overrides)
        check(config)
    except ValueError as error:  # a bad setting: one line, before any model is built or data prepared
        parser.exit(2, f"jaxpref {args.command}: error: {error}\n")
    run(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
