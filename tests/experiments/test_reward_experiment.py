"""A tiny reward-model run on sorting pairs (correct sort chosen, corrupted sort rejected) learns
to rank them and writes the run folder."""

import dataclasses
import json

import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open

from jaxpref.data.synthetic import SortingTask, digits, prompts, write_jsonl
from jaxpref.models import DecoderConfig
from jaxpref.recipes.common import read_metrics
from jaxpref.recipes.configs import (
    DataConfig,
    ObjectiveConfig,
    OptimizerConfig,
    RewardConfig,
    RewardRunConfig,
    TrainConfig,
)
from jaxpref.recipes.reward import reward_model_class, reward_objective, run_reward

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


def reward_config(tmp_path, **changes) -> RewardRunConfig:
    config = RewardRunConfig(
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
    with pytest.raises(
        ValueError,
        match=r"'sigmoid' in objective 'sigmoid' is not a known objective; use one of \['bradley_terry'",
    ):
        run_reward(reward_config(tmp_path, objective=ObjectiveConfig("sigmoid")))
    assert not (tmp_path / "reward").exists()


def test_ensembles_and_general_preference_models_are_configured_and_checked(tmp_path):
    ensemble = reward_config(tmp_path, reward=RewardConfig(ensemble_size=3))
    loss = reward_objective(ensemble)
    chosen, rejected = np.array([[1.0, 0.0, 2.0]]), np.array([[0.0, 0.0, 0.0]])
    losses, _ = loss(chosen_rewards=chosen, rejected_rewards=rejected)
    expected = np.mean([np.log1p(np.exp(-d)) for d in (1.0, 0.0, 2.0)])  # each head's Bradley-Terry
    np.testing.assert_allclose(losses, [expected], rtol=1e-6)
    config = DecoderConfig(
        vocab_size=11, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2, num_kv_heads=1
    )
    build = lambda run: nnx.eval_shape(lambda: reward_model_class(run)(config, rngs=nnx.Rngs(0)))  # noqa: E731
    assert build(ensemble).score.out_features == 3
    gpm = reward_config(tmp_path, objective=ObjectiveConfig("gpm"), reward=RewardConfig(embedding_dim=6))
    assert build(gpm).embedding_head.out_features == 6
    assert repr(reward_objective(gpm)).startswith("Objective(1.0 * gpm(")

    bad = [
        (ObjectiveConfig("gpm"), RewardConfig(ensemble_size=2), "ensemble_size"),
        (ObjectiveConfig("gpm", {"beta": 1.0}), RewardConfig(), r"unknown hyperparameter\(s\) \['beta'\]"),
        (ObjectiveConfig("bradley_terry"), RewardConfig(ensemble_method="median"), "median"),
    ]
    for objective_config, reward, message in bad:
        with pytest.raises(ValueError, match=message):
            run_reward(reward_config(tmp_path, objective=objective_config, reward=reward))
    with pytest.raises(ValueError, match="`ensemble_size`=0 must be an integer >= 1"):  # when parsed
        RewardConfig(ensemble_size=0)
    assert not (tmp_path / "reward").exists()
