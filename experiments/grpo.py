"""GRPO on the bundled sorting task: from the main job's SFT policy to a higher exact-sort rate.

1. SFT exactly as the main job (:mod:`jaxpref.recipes.demo`) trains it, or the SFT folder
   ``sft_checkpoint`` (e.g. ``runs/demo/sft/hf``).
2. GRPO (:mod:`jaxpref.recipes.online`): each step samples 8 completions for each of 16 prompts from
   the current policy and scores them with the exact checker
   :func:`~jaxpref.train.rewards.sorting_exact` (1 for exactly the sorted digits, else 0): a
   verifiable reward, with no reward model and no preference data.
3. Evaluation on the main job's held-out prompts, before and after: the exact-sort rate of
   samples (T=1) and of greedy completions, the mean hidden reward (partial credit per position)
   and GRPO's win rate over SFT (same prompt, same sample slot, same key; ties count half).

Everything lands in ``runs/grpo_demo/`` (the SFT and GRPO runs, ``results.json``).
Run: ``python -m experiments.grpo [--set grpo.train.steps=300 --set grpo.grpo.loss_type=grpo ...]``.
The other online algorithms run the same way: ``--set grpo.algorithm=online_dpo
--set grpo.rollout.num_generations=2``, or ``--set grpo.algorithm=ppo``.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time

import jax
import numpy as np

from jaxpref.data.synthetic import SortingTask, hidden_reward, prompts, sft_rows, write_jsonl
from jaxpref.models import CausalLMWithValueHead, Decoder, from_pretrained
from jaxpref.overrides import config_from_argv, to_dict
from jaxpref.recipes.common import build_mesh, build_policy, build_tokenizer, replace_run, sample_completions
from jaxpref.recipes.configs import (
    DemoConfig,
    ModelConfig,
    OnlineRunConfig,
    OnlineTrainConfig,
    OptimizerConfig,
    PromptDataConfig,
    RolloutConfig,
    RunConfig,
)
from jaxpref.recipes.offline import train_run
from jaxpref.recipes.online import build_algorithm, run_online


@dataclasses.dataclass(frozen=True)
class GRPODemoConfig:
    """The main job's SFT stage, then GRPO on the exact sorting checker."""

    name: str = "grpo_demo"
    runs_dir: str = "runs"
    seed: int = 0
    sft_examples: int = 3000
    # An SFT model folder to start from (e.g. runs/demo/sft/hf); None trains one as the main job does.
    sft_checkpoint: str | None = None
    train_prompts: int = 4096
    eval_prompts: int = 512
    samples_per_eval_prompt: int = 4
    model: ModelConfig = ModelConfig()
    sft: RunConfig = DemoConfig().sft
    grpo: OnlineRunConfig = OnlineRunConfig(
        name="grpo",
        data=PromptDataConfig(batch_size=16, max_prompt_length=16, bucket=8),
        rollout=RolloutConfig(max_new_tokens=8, reward_funcs=("sorting_exact",)),
        optimizer=OptimizerConfig(learning_rate=1e-4, warmup_steps=10),
        train=OnlineTrainConfig(steps=200, checkpoint_every=200),
    )


def sft_folder(config: GRPODemoConfig, mesh, tokenizer, run_dir: pathlib.Path) -> pathlib.Path:
    """The SFT policy's folder: ``config.sft_checkpoint``, or a new one trained as the main job trains it."""
    if config.sft_checkpoint is not None:
        return pathlib.Path(config.sft_checkpoint)
    rows = sft_rows(SortingTask(), config.sft_examples, seed=config.seed)
    sft_file = write_jsonl(run_dir / "sft.jsonl", rows)
    sft_config = replace_run(config.sft, runs_dir=str(run_dir), data__train_files=(str(sft_file),))
    train_run(sft_config, build_policy(config.model, tokenizer, mesh), tokenizer, mesh)
    return sft_config.run_dir / "hf"


def hidden_rewards(model, tokenizer, eval_prompts, rng, max_new_tokens) -> dict[str, np.ndarray]:
    """The hidden reward of one sampled (T=1) and one greedy completion per prompt."""
    rewards = {}
    for name, temperature in (("sampled", 1.0), ("greedy", 0.0)):
        completions = sample_completions(
            model, tokenizer, eval_prompts, rng=rng, max_new_tokens=max_new_tokens, temperature=temperature
        )
        rewards[name] = np.array(
            [hidden_reward(p, c) for p, c in zip(eval_prompts, completions, strict=True)]
        )
    return rewards


def run_grpo_demo(config: GRPODemoConfig) -> dict[str, float]:
    """SFT (or ``sft_checkpoint``), the held-out evaluation, the online run, the evaluation again.

    Returns (and writes to ``results.json``) ``sft_*`` and ``<algorithm>_*`` exact-sort rates
    (sampled and greedy) and mean hidden rewards, ``<algorithm>_win_rate`` over SFT, and the
    seconds each stage took.
    """
    mesh = build_mesh(config.sft.mesh)
    tokenizer = build_tokenizer(config.model)
    run_dir = pathlib.Path(config.runs_dir) / config.name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(to_dict(config), indent=2))
    task = SortingTask()
    max_new_tokens = config.grpo.rollout.max_new_tokens
    rng = jax.random.fold_in(jax.random.key(config.seed), 2)

    start = time.perf_counter()
    folder = sft_folder(config, mesh, tokenizer, run_dir)
    sft_seconds = time.perf_counter() - start
    # PPO trains a value head on the SFT backbone; the sampler and the evaluation use the decoder.
    value_head = build_algorithm(config.grpo).uses_values
    policy = from_pretrained(folder, model_class=CausalLMWithValueHead if value_head else Decoder)
    decoder = policy.model if value_head else policy
    # The main job's held-out prompts, each repeated for several sample slots.
    eval_prompts = prompts(task, config.eval_prompts, seed=config.seed + 2)
    repeated = [p for p in eval_prompts for _ in range(config.samples_per_eval_prompt)]
    before = hidden_rewards(decoder, tokenizer, repeated, rng, max_new_tokens)

    start = time.perf_counter()
    train_prompts = prompts(task, config.train_prompts, seed=config.seed + 1)
    grpo_config = replace_run(config.grpo, runs_dir=str(run_dir))
    run_online(grpo_config, policy, tokenizer, mesh, rows=train_prompts)  # updates `decoder` too
    online_seconds = time.perf_counter() - start
    after = hidden_rewards(decoder, tokenizer, repeated, rng, max_new_tokens)

    algorithm = config.grpo.algorithm
    wins = float(np.mean(after["sampled"] > before["sampled"]))
    ties = float(np.mean(after["sampled"] == before["sampled"]))
    results = {}
    for stage, rewards in (("sft", before), (algorithm, after)):
        results[f"{stage}_exact_sort_rate"] = float(np.mean(rewards["sampled"] == 1.0))
        results[f"{stage}_greedy_exact_sort_rate"] = float(np.mean(rewards["greedy"] == 1.0))
        results[f"{stage}_hidden_reward"] = float(rewards["sampled"].mean())
    results[f"{algorithm}_win_rate"] = wins + 0.5 * ties
    results.update(sft_seconds=sft_seconds, online_seconds=online_seconds)
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    print_table(results, config)
    return results


LABELS = {"grpo": "GRPO", "online_dpo": "online DPO", "ppo": "PPO"}


def print_table(results: dict[str, float], config: GRPODemoConfig) -> None:
    algorithm = config.grpo.algorithm
    label = LABELS.get(algorithm, algorithm)
    samples = config.eval_prompts * config.samples_per_eval_prompt
    print(f"\nHeld-out evaluation: {config.eval_prompts} prompts x {config.samples_per_eval_prompt} samples")
    print(f"{'':<32}{'SFT':>8}{label:>12}")
    rows = (
        ("exactly sorted (T=1)", "exact_sort_rate", "%"),
        ("exactly sorted (greedy)", "greedy_exact_sort_rate", "%"),
        ("hidden reward (mean, T=1)", "hidden_reward", "f"),
    )
    for name, key, kind in rows:
        before, after = results[f"sft_{key}"], results[f"{algorithm}_{key}"]
        print(
            f"{name:<32}"
            + (f"{before:>8.1%}{after:>12.1%}" if kind == "%" else f"{before:>8.3f}{after:>12.3f}")
        )
    win_rate = results[f"{algorithm}_win_rate"]
    print(f"{label + ' win rate over SFT':<32}{win_rate:>20.1%}  (ties count half; {samples} pairs)")
    print(f"(SFT {results['sft_seconds']:.0f} s, {label} {results['online_seconds']:.0f} s)")


def main(argv=None) -> dict[str, float]:
    description = "SFT -> GRPO on the bundled sorting task, with an exact checker."
    return run_grpo_demo(config_from_argv(GRPODemoConfig(), description, argv))


if __name__ == "__main__":
    main()
