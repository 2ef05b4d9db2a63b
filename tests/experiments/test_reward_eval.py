"""RewardBench-style evaluation (jaxpref.recipes.reward_eval): numbers against hand computations, the
bundled file, and the `jaxpref reward --eval` / `jaxpref reward-eval` commands."""

import json
import math

import numpy as np
import pytest
from flax import nnx

from experiments.make_reward_bench import BENCH_FILE, bench_rows
from jaxpref.cli import main
from jaxpref.data import load_tokenizer
from jaxpref.inference.reward import score_responses
from jaxpref.models import DecoderConfig, RewardModel
from jaxpref.recipes.configs import CHAR_TOKENIZER, DataConfig, RewardConfig, RewardRunConfig
from jaxpref.recipes.reward_eval import (
    PLOT_FILE,
    RESULTS_FILE,
    bench_results,
    cyclic_triples,
    evaluate_reward_model,
    preference_probabilities,
    read_bench,
)

TOKENIZER = load_tokenizer(CHAR_TOKENIZER)
TINY_MODEL = [
    f"--set=model.{key}={value}"
    for key, value in (
        ("hidden_size", 16),
        ("intermediate_size", 32),
        ("num_layers", 1),
        ("num_heads", 2),
        ("num_kv_heads", 1),
    )
]


def test_bench_results_match_a_hand_computation():
    scores = np.array([1.0, -1.0, 2.0, 0.5, -0.5, 0.0, 3.0, 1.0, 1.0, -2.0])
    subsets = (
        ["alpacaeval-easy"] * 2 + ["mt-bench-med"] * 2 + ["llmbar-natural"] * 2 + ["mine"] + ["cycle"] * 3
    )
    results = bench_results(scores, subsets, [(7, 8, 9)])

    assert results["pairs"] == 10 and results["accuracy"] == pytest.approx(0.6)  # a score of 0 is a miss
    assert {name: stats["accuracy"] for name, stats in results["subsets"].items()} == pytest.approx(
        {"alpacaeval-easy": 0.5, "mt-bench-med": 1.0, "llmbar-natural": 0.0, "mine": 1.0, "cycle": 2 / 3}
    )
    assert results["subsets"]["mine"]["section"] == "other"
    # Chat weighs its subsets by their RewardBench sizes (100 and 40 pairs), "other" by the pairs here.
    chat = (100 * 0.5 + 40 * 1.0) / 140
    assert results["sections"]["chat"] == {
        "accuracy": pytest.approx(chat),
        "pairs": 4,
        "subsets": ["alpacaeval-easy", "mt-bench-med"],
    }
    assert results["sections"]["chat-hard"]["accuracy"] == 0.0
    assert results["sections"]["other"]["accuracy"] == pytest.approx((1 * 1.0 + 3 * 2 / 3) / 4)
    assert list(results["sections"]) == ["chat", "chat-hard", "other"]
    assert results["score"] == pytest.approx(chat / 2)  # the mean of the RewardBench sections present
    assert results["cyclic_triples"] == {
        "triples": 1,
        "pair_accuracy": pytest.approx(2 / 3),
        "triple_accuracy": 0.0,
    }

    # Top-label ECE by hand: confidence max(p, 1 - p), right when the chosen response was the likelier.
    probabilities = 1 / (1 + np.exp(-scores))
    confidence, right = np.maximum(probabilities, 1 - probabilities), scores > 0
    bins = np.clip(np.ceil(confidence * 10).astype(int) - 1, 0, 9)  # (m/10, (m+1)/10]
    ece = sum(abs(np.sum(right[bins == b] - confidence[bins == b])) for b in range(10)) / len(scores)
    assert results["calibration"]["ece"] == pytest.approx(ece, abs=1e-6)
    assert results["calibration"]["mean_confidence"] == pytest.approx(confidence.mean(), abs=1e-6)


def test_preference_probabilities_follow_the_link():
    scores = np.array([-1.0, 0.0, 2.0])
    np.testing.assert_allclose(preference_probabilities(scores), 1 / (1 + np.exp(-scores)), atol=1e-6)
    probit = [0.5 * (1 + math.erf(s / 2 / math.sqrt(2))) for s in scores]  # Phi(s / 2)
    np.testing.assert_allclose(preference_probabilities(scores, "probit", 2.0), probit, atol=1e-6)
    with pytest.raises(ValueError, match="`link`='tanh'"):
        preference_probabilities(scores, "tanh")


def test_the_bundled_file_is_the_generators_and_holds_three_cycles():
    lines = BENCH_FILE.read_text().splitlines()
    assert [json.loads(line) for line in lines] == bench_rows()
    pairs = read_bench([BENCH_FILE], TOKENIZER)
    assert len(pairs.subsets) == len(lines) == 41 and pairs.report.rows_skipped == 0
    triples = cyclic_triples(pairs)
    assert len(triples) == 3
    assert {pairs.subsets[row] for triple in triples for row in triple} == {"cyclic-preferences"}
    for first, second, third in triples:  # a > b, b > c, c > a: each winner is the next pair's loser
        assert np.array_equal(pairs.rejected_ids[first], pairs.chosen_ids[second])
        assert np.array_equal(pairs.rejected_ids[third], pairs.chosen_ids[first])


def test_evaluation_of_the_bundled_file(tmp_path):
    """An ensemble of two random heads, aggregated by their minimum, against a hand computation."""
    config = DecoderConfig(
        vocab_size=len(TOKENIZER),
        hidden_size=16,
        intermediate_size=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
    )
    model = RewardModel(config, rngs=nnx.Rngs(0), num_labels=2)
    run = RewardRunConfig(
        name="bench",
        runs_dir=str(tmp_path),
        data=DataConfig(batch_size=16),
        reward=RewardConfig(ensemble_method="min", eval_files=(str(BENCH_FILE),)),
    )
    results = evaluate_reward_model(model, TOKENIZER, run)

    assert json.loads((run.run_dir / RESULTS_FILE).read_text()) == results
    assert (run.run_dir / PLOT_FILE).stat().st_size > 0
    keys = {
        "files",
        "pairs",
        "accuracy",
        "score",
        "sections",
        "subsets",
        "calibration",
        "cyclic_triples",
        "report",
    }
    assert set(results) == keys
    assert set(results["sections"]) == {"chat", "chat-hard", "safety", "reasoning", "other"}
    # By hand: the char tokenizer adds no BOS; each response ends with EOS.
    rows = [json.loads(line) for line in BENCH_FILE.read_text().splitlines()]
    encode = lambda text: TOKENIZER(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompts = [encode(row["prompt"]) for row in rows]
    responses = [
        encode(row[side]) + [TOKENIZER.eos_token_id] for side in ("chosen", "rejected") for row in rows
    ]
    rewards = score_responses(model, prompts * 2, responses, batch_size=16).min(axis=1)  # [2 * rows]
    right = rewards[: len(rows)] > rewards[len(rows) :]
    for subset, stats in results["subsets"].items():
        in_subset = np.array([row["subset"] == subset for row in rows])
        assert stats["pairs"] == in_subset.sum()
        assert stats["accuracy"] == pytest.approx(right[in_subset].mean()), subset
    assert results["accuracy"] == pytest.approx(right.mean())
    assert results["cyclic_triples"]["triple_accuracy"] == 0.0  # a scalar reward never gets a cycle right


def test_reward_and_reward_eval_commands(tmp_path):
    common = [f"--set=runs_dir={tmp_path}", "--set=data.batch_size=8", *TINY_MODEL]
    train = ["reward", f"--data={BENCH_FILE}", "--objective=gpm", f"--eval={BENCH_FILE}", "--steps=2"]
    options = [
        "--set=train.progress=false",
        "--set=reward.embedding_dim=4",
        "--set=objective.temperature=0.5",
    ]
    assert main([*train, *common, *options]) == 0
    run_dir = tmp_path / "reward"
    evaluation = json.loads((run_dir / RESULTS_FILE).read_text())
    assert json.loads((run_dir / "results.json").read_text())["eval_accuracy"] == evaluation["accuracy"]
    assert evaluation["pairs"] == 41 and evaluation["cyclic_triples"]["triples"] == 3
    hf_config = json.loads((run_dir / "hf" / "config.json").read_text())
    assert hf_config["preference_embedding_dim"] == 4
    assert (hf_config["preference_link"], hf_config["preference_temperature"]) == ("logistic", 0.5)

    assert (
        main(["reward-eval", f"--model={run_dir / 'hf'}", f"--data={BENCH_FILE}", "--name=again", *common])
        == 0
    )
    again = json.loads((tmp_path / "again" / RESULTS_FILE).read_text())
    assert again["subsets"] == evaluation["subsets"]
    assert again["calibration"] == pytest.approx(evaluation["calibration"])  # unsharded now: float order
    assert (tmp_path / "again" / PLOT_FILE).exists()
