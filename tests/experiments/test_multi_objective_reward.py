"""Multi-objective reward heads (jaxpref.recipes.reward with reward.objective_weights): the loss by hand,
a tiny run through `jaxpref reward`, and the weighted combination of the heads as the score."""

import dataclasses
import json

import numpy as np
import pytest

from jaxpref.cli import main
from jaxpref.data import load_tokenizer
from jaxpref.data.synthetic import SortingTask, digits, hidden_reward, prompts, write_jsonl
from jaxpref.inference.reward import load_reward_model, score_responses
from jaxpref.recipes.configs import CHAR_TOKENIZER, ObjectiveConfig, RewardConfig, RewardRunConfig
from jaxpref.recipes.reward import reward_objective
from jaxpref.recipes.reward_eval import RESULTS_FILE, bench_results, preference_scores

WEIGHTS = (0.7, 0.3)
NAMES = ("correct", "exact")
STEPS = 25


def multi_objective(**hparams) -> RewardRunConfig:
    return RewardRunConfig(
        objective=ObjectiveConfig("bradley_terry", hparams),
        reward=RewardConfig(objective_weights=WEIGHTS, objective_names=NAMES),
    )


def log_sigmoid(x):
    return -np.log1p(np.exp(-x))


def test_the_loss_is_bradley_terry_on_the_weighted_sum_plus_the_rating_regression():
    loss = reward_objective(multi_objective(beta=2.0, rating_coefficient=0.5))
    chosen = np.array([[1.0, 0.0], [0.5, 2.0], [0.0, 1.0]], np.float32)
    rejected = np.array([[0.0, 2.0], [0.0, 0.0], [1.0, 0.0]], np.float32)
    nan = np.nan
    chosen_ratings = np.array([[1.0, nan], [nan, nan], [0.0, 3.0]], np.float32)
    rejected_ratings = np.array([[0.0, 1.0], [nan, nan], [nan, nan]], np.float32)
    losses, metrics = loss(
        chosen_rewards=chosen,
        rejected_rewards=rejected,
        chosen_ratings=chosen_ratings,
        rejected_ratings=rejected_ratings,
    )
    weights = np.array(WEIGHTS)
    bradley_terry = -log_sigmoid(2.0 * (chosen @ weights - rejected @ weights))
    # Squared errors over each pair's rated entries: (0 + 0 + 1) / 3, nothing rated, (0 + 4) / 2.
    ratings = np.array([1 / 3, 0.0, 2.0])
    np.testing.assert_allclose(losses, bradley_terry + 0.5 * ratings, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss/ratings"], ratings, rtol=1e-5)
    np.testing.assert_allclose(metrics["rewards/margins"], chosen @ weights - rejected @ weights, rtol=1e-5)
    np.testing.assert_array_equal(metrics["objectives/correct/accuracies"], [1.0, 1.0, 0.0])
    np.testing.assert_array_equal(metrics["objectives/exact/accuracies"], [0.0, 1.0, 1.0])
    without_ratings, _ = loss(chosen_rewards=chosen, rejected_rewards=rejected)
    np.testing.assert_allclose(without_ratings, bradley_terry, rtol=1e-5)

    # Other reward objectives train on rated data too, without reading the ratings.
    plain = reward_objective(RewardRunConfig(objective=ObjectiveConfig("bradley_terry")))
    ignored, _ = plain(
        chosen_rewards=chosen[:, 0], rejected_rewards=rejected[:, 0], chosen_ratings=chosen_ratings
    )
    np.testing.assert_allclose(ignored, -log_sigmoid(chosen[:, 0] - rejected[:, 0]), rtol=1e-5)

    with pytest.raises(ValueError, match="rates 3 attribute"):
        loss(chosen_rewards=chosen, rejected_rewards=rejected, chosen_ratings=np.zeros((3, 3), np.float32))
    bad = [
        (multi_objective(sigma=1.0), r"unknown objective hyperparameter\(s\) \['sigma'\]"),
        (multi_objective(beta=0.0), "`objective.beta`"),
        (dataclasses.replace(multi_objective(), objective=ObjectiveConfig("thurstone")), "bradley_terry"),
        (dataclasses.replace(multi_objective(), objective=ObjectiveConfig("gpm")), "bradley_terry"),
        (
            dataclasses.replace(
                multi_objective(), reward=RewardConfig(objective_weights=WEIGHTS, ensemble_size=2)
            ),
            "ensemble_size",
        ),
        (
            dataclasses.replace(
                multi_objective(), reward=RewardConfig(objective_weights=WEIGHTS, objective_names=("a",))
            ),
            "objective_names",
        ),
    ]
    for config, message in bad:
        with pytest.raises(ValueError, match=message):
            reward_objective(config)


def test_pairs_are_scored_by_the_weighted_sum_of_the_heads():
    chosen, rejected = np.array([[1.0, 0.0]]), np.array([[0.0, 2.0]])
    weighted = preference_scores(chosen, rejected, RewardConfig(objective_weights=WEIGHTS))
    np.testing.assert_allclose(weighted, [0.7 - 0.6], rtol=1e-5)
    mean = preference_scores(chosen, rejected, RewardConfig())  # the same heads as an ensemble
    np.testing.assert_allclose(mean, [0.5 - 1.0], rtol=1e-5)


def rated_sorting_pairs(count: int) -> list[dict]:
    """Sorted digits chosen over a corrupted sort; ratings: the hidden reward, and 4 for an exact sort
    (0 otherwise), missing on every third rejected response."""
    task, rng = SortingTask(corruption_rate=1.0), np.random.default_rng(0)
    rows = []
    for i, prompt in enumerate(prompts(task, count, seed=0)):
        chosen, rejected = "".join(sorted(digits(prompt))), task.demonstration(prompt, rng)
        if rejected == chosen:
            continue
        rows.append(
            {
                "prompt": prompt,
                "chosen": chosen,
                "rejected": rejected,
                "chosen_ratings": [1.0, 4.0],
                "rejected_ratings": [hidden_reward(prompt, rejected), None if i % 3 == 0 else 0.0],
            }
        )
    return rows


def test_a_tiny_multi_objective_run_trains_and_is_evaluated_on_the_weighted_heads(tmp_path):
    rows = rated_sorting_pairs(400)
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    bench = write_jsonl(
        tmp_path / "bench.jsonl", [{k: row[k] for k in ("prompt", "chosen", "rejected")} for row in rows[:24]]
    )
    common = [
        f"--set=runs_dir={tmp_path}",
        "--set=data.batch_size=16",
        "--set=data.max_length=32",
        *(
            f"--set=model.{key}={value}"
            for key, value in (
                ("hidden_size", 16),
                ("intermediate_size", 32),
                ("num_layers", 1),
                ("num_heads", 2),
                ("num_kv_heads", 1),
            )
        ),
    ]
    train = [
        "reward",
        f"--data={data}",
        f"--steps={STEPS}",
        f"--set=reward.objective_weights={json.dumps(WEIGHTS)}",
        f"--set=reward.objective_names={json.dumps(NAMES)}",
        "--set=objective.beta=2.0",
        "--set=optimizer.learning_rate=3e-3",
        "--set=train.progress=false",
    ]
    assert main([*train, *common]) == 0
    run_dir = tmp_path / "reward"
    metrics = [json.loads(line) for line in (run_dir / "metrics" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == STEPS
    assert np.mean([m["loss"] for m in metrics[-5:]]) < 0.7 * np.mean([m["loss"] for m in metrics[:5]])
    assert {"loss/ratings", "objectives/correct/accuracies", "objectives/exact/accuracies"} <= set(
        metrics[-1]
    )
    assert np.mean([m["loss/ratings"] for m in metrics[-5:]]) < np.mean(
        [m["loss/ratings"] for m in metrics[:5]]
    )

    hf = json.loads((run_dir / "hf" / "config.json").read_text())
    assert hf["num_labels"] == 2 and hf["id2label"] == {"0": "correct", "1": "exact"}
    assert hf["reward_objective_weights"] == list(WEIGHTS)
    assert (hf["preference_link"], hf["preference_temperature"]) == ("logistic", 0.5)  # sigmoid(2 s)

    # What is scored is the weighted sum of the two heads, by hand from the saved model.
    model = load_reward_model(run_dir / "hf")
    tokenizer = load_tokenizer(CHAR_TOKENIZER)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    eval_rows = rows[:24]
    heads = score_responses(
        model,
        [encode(row["prompt"]) for row in eval_rows] * 2,
        [
            encode(row[side]) + [tokenizer.eos_token_id]
            for side in ("chosen", "rejected")
            for row in eval_rows
        ],
        batch_size=16,  # reward-eval's (data.batch_size): one compilation for both
    )  # [2 * pairs, 2]
    combined = heads @ np.array(WEIGHTS, np.float32)
    scores = combined[: len(eval_rows)] - combined[len(eval_rows) :]
    expected = bench_results(scores, ["unlabelled"] * len(eval_rows), link="logistic", temperature=0.5)
    # `jaxpref reward-eval` reads the weights (and the link) from the checkpoint.
    assert main(["reward-eval", f"--model={run_dir / 'hf'}", f"--data={bench}", "--name=again", *common]) == 0
    again = json.loads((tmp_path / "again" / RESULTS_FILE).read_text())
    assert again["accuracy"] == pytest.approx(expected["accuracy"])
    assert again["calibration"] == pytest.approx(expected["calibration"], abs=1e-5)
