"""Ranked preferences on the sorting task: listwise training on K = 4 samples per prompt against DPO
on each list's best and worst sample, at equal steps, evaluated on held-out prompts.

1. SFT as in the main job (``jaxpref demo``).
2. The SFT policy samples K completions per training prompt; the hidden reward scores them. Lists
   whose K scores are all equal state no preference and are left out (counted).
3. From the same lists: ranked rows ``{prompt, responses, scores}`` for the listwise objective, and
   ``{prompt, chosen: best, rejected: worst}`` pairs for DPO.
4. Both fine-tunings start from the SFT policy, against it as the (cached) reference, with the same
   steps, batch of prompts, learning rate and beta.
5. Held-out prompts: hidden reward, exactly sorted rate and win rate over SFT (same sampling key).

Run: ``python -m experiments.ranked_demo [--set listwise.objective.name=plackett_luce ...]``.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax
import numpy as np

from jaxpref.data.synthetic import SortingTask, hidden_reward, prompts, sft_rows, write_jsonl
from jaxpref.models import from_pretrained
from jaxpref.overrides import config_from_argv, to_dict
from jaxpref.recipes.common import build_mesh, build_policy, build_tokenizer, replace_run, sample_completions
from jaxpref.recipes.configs import DemoConfig, ModelConfig, ObjectiveConfig, RunConfig
from jaxpref.recipes.demo import evaluate
from jaxpref.recipes.offline import run_objective, train_run

_DEMO = DemoConfig()


@dataclasses.dataclass(frozen=True)
class RankedDemoConfig:
    name: str = "ranked_demo"
    runs_dir: str = "runs"
    seed: int = 0
    sft_examples: int = _DEMO.sft_examples
    list_prompts: int = 2048  # training prompts, each sampled num_responses times
    num_responses: int = 4
    eval_prompts: int = _DEMO.eval_prompts
    samples_per_eval_prompt: int = _DEMO.samples_per_eval_prompt
    model: ModelConfig = _DEMO.model
    sft: RunConfig = _DEMO.sft
    # The main job's DPO on best-vs-worst pairs, and the listwise run with the same settings.
    dpo: RunConfig = _DEMO.dpo
    listwise: RunConfig = dataclasses.replace(
        _DEMO.dpo,
        name="listwise",
        data=dataclasses.replace(_DEMO.dpo.data, layout="ranked"),
        objective=ObjectiveConfig("lipo_lambda", {"beta": 1.0}),
    )


def ranked_rows(task_prompts, samples: list[list[str]]) -> tuple[list[dict[str, Any]], int]:
    """``{prompt, responses, scores}`` rows scored by the hidden reward. Empty samples leave their list
    (the data layer would skip the whole row), and lists of fewer than two samples or of equal
    scores are skipped and counted. ``samples[k][i]`` is sample ``k`` of prompt ``i``."""
    rows, ties = [], 0
    for i, prompt in enumerate(task_prompts):
        responses = [draws[i] for draws in samples if draws[i].strip()]
        scores = [hidden_reward(prompt, response) for response in responses]
        if len(scores) < 2 or min(scores) == max(scores):
            ties += 1
            continue
        rows.append({"prompt": prompt, "responses": responses, "scores": scores})
    return rows, ties


def best_and_worst(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Each list's best and worst response as a DPO pair (first of equals in slot order)."""
    pairs = []
    for row in rows:
        scores = np.asarray(row["scores"])
        pairs.append(
            {
                "prompt": row["prompt"],
                "chosen": row["responses"][int(np.argmax(scores))],
                "rejected": row["responses"][int(np.argmin(scores))],
            }
        )
    return pairs


def run_ranked_demo(config: RankedDemoConfig) -> dict[str, Any]:
    objectives = {"dpo": run_objective(config.dpo), "listwise": run_objective(config.listwise)}  # fail fast
    mesh = build_mesh(config.sft.mesh)
    tokenizer = build_tokenizer(config.model)
    run_dir = pathlib.Path(config.runs_dir) / config.name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(to_dict(config), indent=2))
    task = SortingTask()
    max_new_tokens = task.max_digits + 2
    rng = jax.random.key(config.seed)

    sft_file = write_jsonl(run_dir / "sft.jsonl", sft_rows(task, config.sft_examples, seed=config.seed))
    sft_config = replace_run(config.sft, runs_dir=str(run_dir), data__train_files=(str(sft_file),))
    train_run(sft_config, build_policy(config.model, tokenizer, mesh), tokenizer, mesh)
    sft_model = from_pretrained(sft_config.run_dir / "hf")

    train_prompts = prompts(task, config.list_prompts, seed=config.seed + 1)
    samples = [
        sample_completions(
            sft_model, tokenizer, train_prompts, rng=jax.random.fold_in(rng, 10 + k), max_new_tokens=max_new_tokens
        )
        for k in range(config.num_responses)
    ]
    rows, ties = ranked_rows(train_prompts, samples)
    print(f"ranked lists: {len(rows)} of {len(train_prompts)} prompts ({ties} without a preference skipped)")
    data = {
        "listwise": write_jsonl(run_dir / "ranked.jsonl", rows),
        "dpo": write_jsonl(run_dir / "best_worst_pairs.jsonl", best_and_worst(rows)),
    }

    eval_prompts = prompts(task, config.eval_prompts, seed=config.seed + 2)
    results: dict[str, Any] = {"train_lists": len(rows), "skipped_lists": ties}
    for name, run in (("dpo", config.dpo), ("listwise", config.listwise)):
        run = replace_run(run, runs_dir=str(run_dir), data__train_files=(str(data[name]),))
        model = train_run(run, from_pretrained(sft_config.run_dir / "hf", mesh=mesh), tokenizer, mesh, loss=objectives[name])
        scores = evaluate(
            sft_model, model, tokenizer, eval_prompts, jax.random.fold_in(rng, 2),
            config.samples_per_eval_prompt, max_new_tokens,
        )  # fmt: skip
        results["sft"] = {"hidden_reward": scores["sft_hidden_reward"], "exact_sort_rate": scores["sft_exact_sort_rate"]}
        results[name] = {
            "objective": run.objective.name,
            "hidden_reward": scores["dpo_hidden_reward"],
            "exact_sort_rate": scores["dpo_exact_sort_rate"],
            "win_rate_over_sft": scores["dpo_win_rate"],
        }
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    print_table(results, config)
    return results


def print_table(results: dict[str, Any], config: RankedDemoConfig) -> None:
    samples = config.eval_prompts * config.samples_per_eval_prompt
    print(f"\nHeld-out: {config.eval_prompts} prompts x {config.samples_per_eval_prompt} samples (T=1), "
          f"{config.dpo.train.steps} steps each")  # fmt: skip
    print(f"{'':<34}{'hidden reward':>14}{'exactly sorted':>16}{'win rate vs SFT':>17}")
    print(f"{'SFT':<34}{results['sft']['hidden_reward']:>14.3f}{results['sft']['exact_sort_rate']:>16.1%}{'':>17}")
    for name, label in (("dpo", "DPO, best vs worst of K"), ("listwise", f"{config.listwise.objective.name}, K lists")):
        r = results[name]
        print(f"{label:<34}{r['hidden_reward']:>14.3f}{r['exact_sort_rate']:>16.1%}{r['win_rate_over_sft']:>17.1%}")
    print(f"(win rate: ties count half; {samples} sample pairs)")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_ranked_demo(config_from_argv(RankedDemoConfig(), __doc__.split("\n")[0], argv))


if __name__ == "__main__":
    main()
