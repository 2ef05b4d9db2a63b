"""The main job: the full preference pipeline on the bundled sorting task, end to end.

1. SFT data: prompts of digits with imperfect sorted demonstrations (:mod:`jaxpref.data.synthetic`).
2. SFT: a tiny Llama-style decoder learns to imitate them (token-mean NLL).
3. Preference pairs: the SFT policy samples two completions per prompt; the hidden reward picks
   the chosen one (pairs with equal reward are counted and left out).
4. Reference log-probs of the SFT policy, precomputed once and cached on disk.
5. DPO from the SFT policy against that reference.
6. Evaluation on held-out prompts: the hidden reward of SFT and DPO samples, the win rate of DPO
   over SFT (same prompt, same sample slot; ties count half), and the preference accuracy of
   DPO's implicit reward on held-out pairs labelled by the hidden reward.

Every stage writes to ``runs/demo/`` (datasets, checkpoints, metrics, plots, HF weights, results).
Run: ``jaxpref demo [--set dpo.train.steps=200 ...]`` (``make demo``).
"""

from __future__ import annotations

import json

import jax
import numpy as np

from jaxpref.data import TokenizeOptions, make_loader, prepare_dataset
from jaxpref.data.synthetic import SortingTask, hidden_reward, prompts, sft_rows, write_jsonl
from jaxpref.models import from_pretrained
from jaxpref.overrides import to_dict
from jaxpref.recipes.common import build_mesh, build_policy, build_tokenizer, replace_run, sample_completions
from jaxpref.recipes.configs import DemoConfig
from jaxpref.recipes.offline import run_objective, train_run
from jaxpref.train.reference import compute_reference_logps


def label_pairs(task_prompts, first, second) -> tuple[list[dict[str, str]], int]:
    """Preference rows from two samples per prompt, chosen by the hidden reward; ties are skipped."""
    rows, ties = [], 0
    for prompt, a, b in zip(task_prompts, first, second, strict=True):
        reward_a, reward_b = hidden_reward(prompt, a), hidden_reward(prompt, b)
        if reward_a == reward_b:
            ties += 1
            continue
        chosen, rejected = (a, b) if reward_a > reward_b else (b, a)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows, ties


def sample_pairs(model, tokenizer, task_prompts, rng, max_new_tokens):
    first = sample_completions(
        model, tokenizer, task_prompts, rng=jax.random.fold_in(rng, 0), max_new_tokens=max_new_tokens
    )
    second = sample_completions(
        model, tokenizer, task_prompts, rng=jax.random.fold_in(rng, 1), max_new_tokens=max_new_tokens
    )
    return label_pairs(task_prompts, first, second)


def preference_accuracy(policy, reference, tokenizer, pairs_file, run_dir, mesh, max_length) -> float:
    """Share of held-out pairs whose implicit reward log(pi/pi_ref) ranks chosen above rejected."""
    source, _ = prepare_dataset(
        [str(pairs_file)],
        "pairwise",
        run_dir / "eval_data",
        tokenizer,
        options=TokenizeOptions(max_length=max_length),
    )
    batches = lambda: iter(make_loader(source, 64, shuffle=False, drop_remainder=False))  # noqa: E731
    policy_logps = compute_reference_logps(policy, batches(), mesh=mesh).values
    reference_logps = compute_reference_logps(reference, batches(), mesh=mesh).values
    chosen = policy_logps["ref_chosen_logps"] - reference_logps["ref_chosen_logps"]
    rejected = policy_logps["ref_rejected_logps"] - reference_logps["ref_rejected_logps"]
    return float(np.mean(chosen > rejected))


def evaluate(sft_model, dpo_model, tokenizer, eval_prompts, rng, samples, max_new_tokens) -> dict[str, float]:
    """Hidden reward of both policies' samples, and DPO's win rate over SFT slot by slot."""
    repeated = [p for p in eval_prompts for _ in range(samples)]
    rewards = {}
    for name, model in (("sft", sft_model), ("dpo", dpo_model)):
        # The same key for both: any difference comes from the policies, not the draw.
        completions = sample_completions(model, tokenizer, repeated, rng=rng, max_new_tokens=max_new_tokens)
        rewards[name] = np.array([hidden_reward(p, c) for p, c in zip(repeated, completions, strict=True)])
    wins = float(np.mean(rewards["dpo"] > rewards["sft"]))
    ties = float(np.mean(rewards["dpo"] == rewards["sft"]))
    return {
        "sft_hidden_reward": float(rewards["sft"].mean()),
        "dpo_hidden_reward": float(rewards["dpo"].mean()),
        "sft_exact_sort_rate": float(np.mean(rewards["sft"] == 1.0)),
        "dpo_exact_sort_rate": float(np.mean(rewards["dpo"] == 1.0)),
        "dpo_win_rate": wins + 0.5 * ties,
        "dpo_wins": wins,
        "ties": ties,
    }


def run_demo(config: DemoConfig) -> dict[str, float]:
    loss = run_objective(config.dpo)  # a bad DPO objective setting fails now, not after SFT
    mesh = build_mesh(config.sft.mesh)
    tokenizer = build_tokenizer(config.model)
    run_dir = config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(to_dict(config), indent=2))
    task = SortingTask()
    max_new_tokens = task.max_digits + 2  # the digits, EOS, one spare
    rng = jax.random.key(config.seed)

    sft_file = write_jsonl(run_dir / "sft.jsonl", sft_rows(task, config.sft_examples, seed=config.seed))
    sft_config = replace_run(config.sft, runs_dir=str(run_dir), data__train_files=(str(sft_file),))
    policy = train_run(sft_config, build_policy(config.model, tokenizer, mesh), tokenizer, mesh)
    sft_model = from_pretrained(sft_config.run_dir / "hf")

    train_prompts = prompts(task, config.pair_prompts, seed=config.seed + 1)
    pairs, ties = sample_pairs(
        sft_model, tokenizer, train_prompts, jax.random.fold_in(rng, 1), max_new_tokens
    )
    print(
        f"preference pairs: {len(pairs)} of {len(train_prompts)} prompts ({ties} with equal rewards skipped)"
    )
    pairs_file = write_jsonl(run_dir / "pairs.jsonl", pairs)
    dpo_config = replace_run(config.dpo, runs_dir=str(run_dir), data__train_files=(str(pairs_file),))
    dpo_model = train_run(dpo_config, policy, tokenizer, mesh, loss=loss)

    eval_prompts = prompts(task, config.eval_prompts, seed=config.seed + 2)
    results = evaluate(
        sft_model,
        dpo_model,
        tokenizer,
        eval_prompts,
        jax.random.fold_in(rng, 2),
        config.samples_per_eval_prompt,
        max_new_tokens,
    )
    eval_pairs, _ = sample_pairs(
        sft_model, tokenizer, eval_prompts, jax.random.fold_in(rng, 3), max_new_tokens
    )
    eval_pairs_file = write_jsonl(run_dir / "eval_pairs.jsonl", eval_pairs)
    results["dpo_preference_accuracy"] = preference_accuracy(
        dpo_model, sft_model, tokenizer, eval_pairs_file, run_dir, mesh, config.dpo.data.max_length
    )
    results["train_pairs"] = len(pairs)
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    print_table(results, config)
    return results


def print_table(results: dict[str, float], config: DemoConfig) -> None:
    samples = config.eval_prompts * config.samples_per_eval_prompt
    print(
        f"\nHeld-out evaluation: {config.eval_prompts} prompts x {config.samples_per_eval_prompt} samples (T=1)"
    )
    print(f"{'':<28}{'SFT':>8}{'DPO':>8}")
    print(
        f"{'hidden reward (mean)':<28}{results['sft_hidden_reward']:>8.3f}{results['dpo_hidden_reward']:>8.3f}"
    )
    print(
        f"{'exactly sorted':<28}{results['sft_exact_sort_rate']:>8.1%}{results['dpo_exact_sort_rate']:>8.1%}"
    )
    print(
        f"{'DPO win rate over SFT':<28}{results['dpo_win_rate']:>16.1%}  (ties count half; {samples} pairs)"
    )
    print(
        f"{'DPO preference accuracy':<28}{results['dpo_preference_accuracy']:>16.1%}  (held-out labelled pairs)"
    )
