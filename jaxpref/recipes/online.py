"""Online runs (``jaxpref grpo|rloo|online-dpo|ppo``): prompts in, a policy trained on its own scored samples.

:func:`run_online` trains a policy with :func:`jaxpref.train.online.build_online_step` and the
algorithm ``config.algorithm`` (``grpo``, ``online_dpo`` or ``ppo``, set by the section of the same
name) on the prompts of ``config.data.train_files`` (JSONL or Parquet with a ``"prompt"`` column;
the other columns go to the reward functions), scoring completions with
``config.rollout.reward_funcs`` (bundled names or ``"package.module:function"``) and, with
``config.rollout.reward_model``, a trained :class:`~jaxpref.models.heads.RewardModel` (an ensemble's
heads aggregated by ``config.rollout.reward_ensemble_method``) and, with
``config.rollout.preference_model``, Pref-GRPO's win rates judged by a pairwise preference model
(:mod:`jaxpref.train.preference_rewards`). PPO's policy
is a :class:`~jaxpref.models.heads.CausalLMWithValueHead` (a causal-LM checkpoint gives its
backbone; the value head starts fresh). ``runs/<name>/`` gets ``config.json``, ``checkpoints/``
(rerunning resumes), ``metrics/`` (JSONL, TensorBoard, ``curves.png``) and ``hf/``, as every run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from flax import nnx
from jax.sharding import Mesh

from jaxpref.data.prompts import PromptBatches
from jaxpref.data.rows import read_records
from jaxpref.inference.reward import load_reward_model
from jaxpref.models import CausalLMWithValueHead, Decoder
from jaxpref.models.sampling import SamplingConfig
from jaxpref.recipes.common import (
    build_mesh,
    build_policy,
    build_tokenizer,
    make_optimizer,
    print_summary,
    read_metrics,
    train_and_export,
)
from jaxpref.recipes.configs import OnlineRunConfig
from jaxpref.recipes.run_folder import write_config
from jaxpref.train.online import GRPO, ONLINE_ALGORITHMS, PPO, OnlineDPO, OnlineStep, build_online_step
from jaxpref.train.preference_rewards import PREFERENCE_REWARD_NAME, load_win_rate_reward
from jaxpref.train.rewards import RewardFn, resolve_reward_fn, reward_model_reward

PLOT_KEYS = ("reward", "loss", "entropy", "completions/mean_length")


def read_prompt_rows(files: Sequence[str]) -> list[dict[str, Any]]:
    """Every record of local JSONL / Parquet ``files``, in order."""
    if not files:
        raise ValueError(
            "`data.train_files` is empty: pass local JSONL or Parquet files with a 'prompt' column."
        )
    return [record for path in files for _, record in read_records(path)]


def build_algorithm(config: OnlineRunConfig) -> GRPO | OnlineDPO | PPO:
    """The algorithm named by ``config.algorithm`` (:data:`~jaxpref.train.online.ONLINE_ALGORITHMS`),
    from the config section of the same name."""
    if config.algorithm not in ONLINE_ALGORITHMS or not hasattr(config, config.algorithm):
        raise ValueError(f"`algorithm`={config.algorithm!r} must be one of {sorted(ONLINE_ALGORITHMS)}.")
    return ONLINE_ALGORITHMS[config.algorithm](**dataclasses.asdict(getattr(config, config.algorithm)))


def build_reward_fns(config: OnlineRunConfig, mesh: Mesh) -> tuple[dict[str, RewardFn], dict[str, float]]:
    """The run's reward functions by name (then the reward model, as ``"reward_model"``, and the
    preference model's win rates, as ``"preference_win_rate"``) and weights."""
    rollout = config.rollout
    fns = {name.rpartition(":")[2]: resolve_reward_fn(name) for name in rollout.reward_funcs}
    if rollout.reward_model is not None:
        fns["reward_model"] = reward_model_reward(
            load_reward_model(rollout.reward_model, mesh=mesh),
            ensemble_method=rollout.reward_ensemble_method,
            uncertainty_coefficient=rollout.reward_uncertainty_coefficient,
        )
    if rollout.preference_model is not None:  # Pref-GRPO: win rates within each prompt's group
        fns[PREFERENCE_REWARD_NAME] = load_win_rate_reward(
            rollout.preference_model, rollout.num_generations, mesh=mesh
        )
    weights = rollout.reward_weights
    if weights and len(weights) != len(fns):
        raise ValueError(
            f"`rollout.reward_weights` has {len(weights)} weight(s) for {len(fns)} reward function(s) "
            f"{list(fns)}."
        )
    return fns, dict(zip(fns, weights))


def build_run_step(config: OnlineRunConfig, model: nnx.Module, tokenizer, mesh: Mesh) -> OnlineStep:
    """The online step of ``config``: its algorithm, sampling, rewards and optimizer."""
    rollout = config.rollout
    reward_fns, reward_weights = build_reward_fns(config, mesh)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = SamplingConfig(
        max_new_tokens=rollout.max_new_tokens,
        temperature=rollout.temperature,
        top_k=rollout.top_k,
        top_p=rollout.top_p,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad_id,
    )
    return build_online_step(
        model,
        make_optimizer(config.optimizer, config.train.schedule_length * rollout.num_iterations),
        mesh,
        algorithm=build_algorithm(config),
        reward_fns=reward_fns,
        reward_weights=reward_weights,
        sampling=sampling,
        num_generations=rollout.num_generations,
        num_iterations=rollout.num_iterations,
        mask_truncated_completions=rollout.mask_truncated_completions,
        tokenizer=tokenizer,
        chunk_size=config.train.chunk_size,
    )


def run_online(
    config: OnlineRunConfig,
    model: nnx.Module,
    tokenizer,
    mesh: Mesh,
    rows: Sequence[str | Mapping[str, Any]] | None = None,
) -> nnx.Module:
    """Trains ``model`` in place on ``rows`` (default: read from ``config.data.train_files``) and
    writes the run folder; an interrupted run resumes from its latest checkpoint."""
    run_dir = config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(config)
    rows = read_prompt_rows(config.data.train_files) if rows is None else rows
    step = build_run_step(config, model, tokenizer, mesh)
    batches = PromptBatches(
        rows,
        tokenizer,
        config.data.batch_size,
        max_prompt_length=config.data.max_prompt_length,
        bucket=config.data.bucket,
        seed=config.data.seed,
    )
    train_and_export(config, step, batches, model, tokenizer, plot_keys=PLOT_KEYS)
    return model


def run_online_command(config: OnlineRunConfig) -> dict[str, float]:
    """``jaxpref grpo|rloo|online-dpo|ppo``: builds the policy and tokenizer, trains, prints a summary."""
    mesh = build_mesh(config.mesh)
    tokenizer = build_tokenizer(config.model)
    model_class = CausalLMWithValueHead if build_algorithm(config).uses_values else Decoder
    policy = build_policy(config.model, tokenizer, mesh, model_class=model_class, lora=config.lora)
    run_online(config, policy, tokenizer, mesh)
    last = read_metrics(config.run_dir)[-1]
    print_summary(
        config,
        f"{config.train.steps} steps of {config.algorithm} on the prompts of {', '.join(config.data.train_files)}, "
        f"from {config.model.checkpoint or 'a fresh tiny decoder'}",
        last,
        ("reward", "reward_std", "kl", "completions/mean_length", "loss"),
    )
    return last
