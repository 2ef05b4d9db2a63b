"""A tiny reward-model run on sorting pairs (correct sort chosen, corrupted sort rejected) learns
to rank them and writes the run folder."""

import dataclasses
import json

import numpy as np
import pytest
from safetensors import safe_open

from experiments.configs import DataConfig, ObjectiveConfig, OptimizerConfig, RunConfig, TrainConfig
from experiments.pipeline import read_metrics
from experiments.reward import run_reward
from jaxpref.data.synthetic import SortingTask, digits, prompts, write_jsonl

STEPS = 150


def sorting_pairs(count: int, seed: int) -> list[dict[str, str]]:
    """The sorted digits chosen over the same sort with one or two adjacent digits swapped."""
    task = SortingTask(corruption_rate=1.0)
    rng = np.random.default_rng(seed)
    rows = []
    for prompt in prompts(task, count, seed):
        chosen = "".join(sorted(digits(prompt)))
        rejected = task.demonstration(prompt, rng)
        if rejected != chosen:  # swapping two equal digits changes nothing
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def reward_config(tmp_path, **changes) -> RunConfig:
    config = RunConfig(
        name="reward",
        runs_dir=str(tmp_path),
        data=DataConfig(train_files=(str(tmp_path / "pairs.jsonl"),), max_length=32, batch_size=32),
        objective=ObjectiveConfig("bradley_terry"),
        optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=10),
        train=TrainConfig(steps=STEPS, reference="none", checkpoint_every=STEPS, progress=False),
    )
    return dataclasses.replace(config, **changes)


def test_tiny_reward_run_ranks_correct_sorts_above_corrupted_ones(tmp_path):
    write_jsonl(tmp_path / "pairs.jsonl", sorting_pairs(1024, seed=0))
    config = reward_config(tmp_path)
    results = run_reward(config)

    assert results["train_accuracy"] > 0.9  # chance is 0.5
    assert results["train_margin"] > 0
    metrics = read_metrics(config.run_dir)
    assert len(metrics) == STEPS and metrics[-1] == {k: v for k, v in results.items() if k in metrics[-1]}
    assert np.mean([m["loss"] for m in metrics[-10:]]) < np.mean([m["loss"] for m in metrics[:10]])

    run_dir = config.run_dir
    assert json.loads((run_dir / "results.json").read_text()) == results
    assert json.loads((run_dir / "config.json").read_text())["objective"]["name"] == "bradley_terry"
    assert (run_dir / "metrics" / "curves.png").exists() and any((run_dir / "checkpoints").iterdir())
    hf_config = json.loads((run_dir / "hf" / "config.json").read_text())
    assert hf_config["architectures"][0].endswith("ForSequenceClassification")
    assert hf_config["num_labels"] == 1
    with safe_open(run_dir / "hf" / "model.safetensors", framework="numpy") as f:
        assert f.get_slice("score.weight").get_shape() == [1, hf_config["hidden_size"]]
        assert "lm_head.weight" not in f.keys()


def test_a_policy_objective_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="`objective.name`='sigmoid'"):
        run_reward(reward_config(tmp_path, objective=ObjectiveConfig("sigmoid")))
    assert not (tmp_path / "reward").exists()
