"""``jaxpref <subcommand>``: builds a config from defaults and ``--set`` overrides, runs an experiment.

::

    jaxpref demo                                   # the bundled pipeline: SFT -> pairs -> DPO -> eval
    jaxpref sft --data sft.jsonl --model /models/Qwen3-0.6B
    jaxpref dpo --data prefs.jsonl --model runs/sft/hf --objective ipo --set objective.beta=0.5
    jaxpref dpo --data prefs.jsonl --model runs/sft/hf --set lora.rank=16 --set lora.targets='q_proj|v_proj'
    jaxpref kto --data unpaired.jsonl --model runs/sft/hf
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
slices, multi-node GPU): run the same command on every host with ``--distributed``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

_TRAINING = ("sft", "dpo", "kto", "reward")
# Sample, score with reward functions, update (experiments/online.py).
_ONLINE = ("grpo", "rloo", "online-dpo", "ppo")
# Image generators on the shapes task (experiments/diffusion.py): subcommand -> its method there.
_DIFFUSION = {"diffusion-dpo": "dpo", "diffusion-kto": "kto", "flow-dpo": "flow-dpo", "draft": "draft"}


def _parser() -> argparse.ArgumentParser:
    from experiments.configs import GPM
    from jaxpref.objectives import PAIRWISE, REWARD, UNPAIRED
    from jaxpref.overrides import add_override_argument

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
    # Objectives the train step can feed from a batch of sequences: not those needing token-level
    # inputs or per-pair extras (ld_dpo, wpo, mmpo) nor BCO's running state across steps.
    trainable = {"ref_chosen_logps", "ref_rejected_logps", "chosen_lengths", "rejected_lengths", "ref_logps"}
    objectives = {
        family: sorted(
            name for name, spec in registry.items() if set(spec.requires) <= trainable and name != "bco"
        )
        for family, registry in (("dpo", PAIRWISE), ("kto", UNPAIRED), ("reward", REWARD))
    }
    objectives["reward"].append(GPM)  # gpm_loss on preference embeddings (experiments/reward.py)
    for name in (*_TRAINING, *_ONLINE):
        sub = commands.add_parser(name, parents=[common], help=f"train with {name}")
        sub.add_argument("--data", nargs="+", help="local JSONL or Parquet files (data.train_files)")
        sub.add_argument("--model", help="local Hugging Face checkpoint folder (model.checkpoint)")
        sub.add_argument("--name", help="run name: the run is written to runs/<name> (name)")
        sub.add_argument("--steps", type=int, help="training steps (train.steps)")
        if name in objectives:
            sub.add_argument("--objective", choices=objectives[name], help="objective name (objective.name)")
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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.distributed:
        import jax

        jax.distributed.initialize()  # reads the cluster from the TPU / SLURM / env settings
    from experiments import configs
    from jaxpref.overrides import apply_overrides

    if args.command == "demo":
        from experiments.demo import run_demo

        run_demo(apply_overrides(configs.DemoConfig(), args.overrides))
        return 0
    if args.command == "diffusion" or args.command in _DIFFUSION:
        from experiments.diffusion import DiffusionExperimentConfig, run_diffusion

        shortcuts = [f"methods={json.dumps(args.method)}"] if args.method else []
        shortcuts += [f"name={args.name}"] if args.name else []
        run_diffusion(apply_overrides(DiffusionExperimentConfig(), [*shortcuts, *args.overrides]))
        return 0
    if args.command in _ONLINE:
        from experiments.online import run_online_command

        start = configs.ONLINE_SUBCOMMAND_CONFIGS[args.command]
        run_online_command(apply_overrides(start, [*_shortcuts(args), *args.overrides]))
        return 0
    config = apply_overrides(configs.SUBCOMMAND_CONFIGS[args.command], [*_shortcuts(args), *args.overrides])
    if args.command == "reward":
        from experiments.reward import run_reward

        run_reward(config)
        return 0
    if args.command == "reward-eval":
        from experiments.reward_eval import run_reward_eval

        run_reward_eval(config)
        return 0
    from experiments import pipeline

    mesh = pipeline.build_mesh(config.mesh)
    tokenizer = pipeline.build_tokenizer(config.model)
    model = pipeline.build_policy(config.model, tokenizer, mesh, lora=config.lora)
    pipeline.train_run(config, model, tokenizer, mesh)
    last = pipeline.read_metrics(config.run_dir)[-1]
    summary = ", ".join(
        f"{k}={v:.4g}" for k, v in last.items() if k in ("step", "loss", "rewards/accuracies")
    )
    print(f"{args.command} finished: {summary}; run written to {config.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
