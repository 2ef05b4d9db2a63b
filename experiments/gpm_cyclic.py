"""General Preference Models learn cyclic preferences that Bradley-Terry reward models cannot.

Reproduces the claim of Zhang et al., "Beyond Bradley-Terry Models: A General Preference Model for
Language Model Alignment" (arXiv:2410.02197), on synthetic data with tokenised responses: on
preferences with a cyclic component a Bradley-Terry (BT) reward model stays near chance while a
General Preference Model (GPM) is far above it, and on transitive preferences the two match.

- A response is a few filler letters (``vwxyz``) with one type letter among ``abcde`` at a random
  place; the prompt is random digits and plays no part in the preference. The model has to find
  the type letter among the tokens.
- ``transitive``: the later type wins (a scalar reward, the type's index, explains every label).
- ``cyclic``: the five types sit on a cycle and each beats the next two (a beats b and c, ..., e
  beats a and b), a balanced tournament: every type wins as often as it loses, so the BT
  maximum-likelihood rewards are all equal, whatever features the backbone learns.

Each model is trained by :func:`jaxpref.recipes.reward.run_reward` on the same pairs (the tiny
decoder of ``jaxpref.recipes.configs.ModelConfig``, on CPU) and evaluated by
:mod:`jaxpref.recipes.reward_eval` on held-out pairs of fresh responses and on held-out preference
cycles ``y1 > y2 > y3 > y1`` (all three pairs given), where a scalar reward gets at most two of
three pairs right and never a whole cycle. Every run lands in ``runs/gpm_cyclic/<preferences>_<model>``.

The transitive runs start from a random backbone; the cyclic ones from the backbone of the
transitive BT run, whose features already tell the types apart (as a pretrained LLM's tell
responses apart: the paper starts from Gemma and Llama). From a random backbone neither model
learns balanced cyclic preferences: at the start every type's wins and losses cancel in the
gradient, so nothing reaches the backbone's features (both stay near 50% for 500 steps).

Run: ``python -m experiments.gpm_cyclic [--set steps=300]``; prints a markdown table.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import numpy as np

from jaxpref.data.synthetic import write_jsonl
from jaxpref.overrides import config_from_argv
from jaxpref.recipes.configs import (
    CHAR_TOKENIZER,
    DataConfig,
    ModelConfig,
    ObjectiveConfig,
    OptimizerConfig,
    RewardConfig,
    RewardRunConfig,
    TrainConfig,
)
from jaxpref.recipes.objectives import GPM
from jaxpref.recipes.reward import run_reward
from jaxpref.recipes.reward_eval import RESULTS_FILE

TYPES = "abcde"
FILLER = "vwxyz"
PREFERENCES = ("transitive", "cyclic")
PAIRS_SUBSET, CYCLES_SUBSET = "held-out-pairs", "held-out-cycles"  # subsets of the evaluation file


@dataclasses.dataclass(frozen=True)
class CyclicConfig:
    name: str = "gpm_cyclic"
    runs_dir: str = "runs"
    seed: int = 0
    train_pairs: int = 2048
    eval_pairs: int = 512
    eval_cycles: int = 128  # prompts with one cycle of three responses each
    steps: int = 200
    batch_size: int = 64
    learning_rate: float = 3e-3
    gpm_embedding_dim: int = 4  # 2k: two blocks


def beats(winner: int, loser: int, preferences: str) -> bool:
    """Whether a response of type ``winner`` is preferred to one of type ``loser`` (types differ)."""
    if preferences == "transitive":
        return winner > loser
    return (loser - winner) % len(TYPES) in (1, 2)  # each type beats the next two around the cycle


def make_prompt(rng: np.random.Generator) -> str:
    return "".join(str(d) for d in rng.integers(0, 10, int(rng.integers(3, 7)))) + ">"


def make_response(kind: int, rng: np.random.Generator) -> str:
    """Two to five filler letters with the type letter of ``kind`` at a random place."""
    letters = [FILLER[i] for i in rng.integers(0, len(FILLER), int(rng.integers(2, 6)))]
    letters.insert(int(rng.integers(0, len(letters) + 1)), TYPES[kind])
    return "".join(letters)


def preference_pairs(preferences: str, count: int, rng: np.random.Generator, subset: str = "") -> list[dict]:
    """``count`` rows ``{prompt, chosen, rejected[, subset]}`` of two fresh responses of distinct types."""
    rows = []
    for _ in range(count):
        first, second = rng.choice(len(TYPES), 2, replace=False)
        winner, loser = (first, second) if beats(first, second, preferences) else (second, first)
        row = {
            "prompt": make_prompt(rng),
            "chosen": make_response(winner, rng),
            "rejected": make_response(loser, rng),
        }
        rows.append(row | ({"subset": subset} if subset else {}))
    return rows


def cycle_rows(count: int, rng: np.random.Generator, subset: str = CYCLES_SUBSET) -> list[dict]:
    """``count`` prompts with three responses of types ``t, t + 1, t + 3`` (a cycle of the cyclic
    preferences) and its three pairs."""
    rows = []
    for _ in range(count):
        start = int(rng.integers(len(TYPES)))
        prompt = make_prompt(rng)
        responses = [make_response((start + step) % len(TYPES), rng) for step in (0, 1, 3)]
        for i in range(3):
            chosen, rejected = responses[i], responses[(i + 1) % 3]
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "subset": subset})
    return rows


def run_config(config: CyclicConfig, preferences: str, model: str, folder: pathlib.Path) -> RewardRunConfig:
    """The reward run of one (preferences, model) cell of the table."""
    backbone = None if preferences == "transitive" else str(folder / "transitive_bt" / "hf")
    return RewardRunConfig(
        name=f"{preferences}_{model.lower()}",
        runs_dir=str(folder),
        model=ModelConfig(checkpoint=backbone, tokenizer=CHAR_TOKENIZER),
        data=DataConfig(
            train_files=(str(folder / f"{preferences}_train.jsonl"),), batch_size=config.batch_size
        ),
        objective=ObjectiveConfig(GPM if model == "GPM" else "bradley_terry"),
        optimizer=OptimizerConfig(learning_rate=config.learning_rate, warmup_steps=20),
        train=TrainConfig(
            steps=config.steps, reference="none", checkpoint_every=config.steps, progress=False
        ),
        reward=RewardConfig(
            embedding_dim=config.gpm_embedding_dim, eval_files=(str(folder / f"{preferences}_eval.jsonl"),)
        ),
    )


def run_gpm_cyclic(config: CyclicConfig) -> list[dict[str, Any]]:
    """Trains BT and GPM on both preference kinds; returns one row per (preferences, model)."""
    folder = pathlib.Path(config.runs_dir) / config.name
    rng = np.random.default_rng(config.seed)
    table = []
    for preferences in PREFERENCES:
        write_jsonl(
            folder / f"{preferences}_train.jsonl", preference_pairs(preferences, config.train_pairs, rng)
        )
        held_out = preference_pairs(preferences, config.eval_pairs, rng, subset=PAIRS_SUBSET)
        if preferences == "cyclic":
            held_out += cycle_rows(config.eval_cycles, rng)
        write_jsonl(folder / f"{preferences}_eval.jsonl", held_out)
        for model in ("BT", "GPM"):
            run = run_config(config, preferences, model, folder)
            results = run_reward(run)
            evaluation = json.loads((run.run_dir / RESULTS_FILE).read_text())
            table.append(
                {
                    "preferences": preferences,
                    "model": model,
                    "train_accuracy": results["train_accuracy"],
                    "held_out_accuracy": evaluation["subsets"][PAIRS_SUBSET]["accuracy"],
                    "cycle_pair_accuracy": evaluation["cyclic_triples"]["pair_accuracy"],
                    "whole_cycles": evaluation["cyclic_triples"]["triple_accuracy"],
                }
            )
    (folder / "results.json").write_text(
        json.dumps({"config": dataclasses.asdict(config), "table": table}, indent=2)
    )
    print(markdown_table(table, config))
    return table


def markdown_table(table: list[dict[str, Any]], config: CyclicConfig) -> str:
    def cell(value: float | None) -> str:
        return "—" if value is None else f"{value:.1%}"

    lines = [
        f"| preferences | model | train accuracy | held-out accuracy ({config.eval_pairs} pairs) "
        f"| held-out cycles: pairs right | whole cycles right ({config.eval_cycles}) |",
        "|---|---|---|---|---|---|",
    ]
    for row in table:
        lines.append(
            f"| {row['preferences']} | {row['model']} | {cell(row['train_accuracy'])} "
            f"| {cell(row['held_out_accuracy'])} | {cell(row['cycle_pair_accuracy'])} | {cell(row['whole_cycles'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    return run_gpm_cyclic(config_from_argv(CyclicConfig(), __doc__.split("\n")[0], argv))


if __name__ == "__main__":
    main()
