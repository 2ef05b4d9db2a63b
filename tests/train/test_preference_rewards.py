"""Pref-GRPO's win-rate reward (jaxpref.train.preference_rewards): hand-built preference matrices, a
tiny GPM and a tiny scalar judge on padded rollouts, and `rollout.preference_model` in online runs."""

import json
import math

import jax
import numpy as np
import pytest
from flax import nnx

from jaxpref.models import save_pretrained
from jaxpref.models.decoder import DecoderConfig
from jaxpref.models.heads import PreferenceEmbeddingModel, RewardModel
from jaxpref.objectives.policy_gradient import group_win_rates
from jaxpref.objectives.reward import gpm_preference_score
from jaxpref.recipes import reward_eval
from jaxpref.recipes.configs import OnlineRunConfig, RolloutConfig
from jaxpref.recipes.online import build_reward_fns
from jaxpref.train import preference_rewards
from jaxpref.train.preference_rewards import (
    PREFERENCE_REWARD_NAME,
    pairwise_preferences,
    win_rate_reward,
)

from .helpers import single_device_mesh

CONFIG = DecoderConfig(
    vocab_size=31, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1
)
G = 3
# Two prompts (left-padded), three completions each (right-padded), as OnlineStep.sample gives them.
PROMPTS = [[5, 6], [7, 8, 9]]
COMPLETIONS = [[10, 11, 2], [12, 2], [13, 14, 15, 2], [16, 2], [17, 18, 2], [19, 20, 21, 22, 2]]


def rollout() -> dict[str, np.ndarray]:
    prompt_ids, prompt_mask = np.zeros((2 * G, 4), np.int32), np.zeros((2 * G, 4), np.int32)
    completion_ids, completion_mask = np.zeros((2 * G, 6), np.int32), np.zeros((2 * G, 6), np.int32)
    for row, completion in enumerate(COMPLETIONS):
        prompt = PROMPTS[row // G]
        prompt_ids[row, 4 - len(prompt) :], prompt_mask[row, 4 - len(prompt) :] = prompt, 1
        completion_ids[row, : len(completion)], completion_mask[row, : len(completion)] = completion, 1
    return dict(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        prompts=None,
        completions=None,
    )


def unpadded_outputs(model):
    """The model on each prompt + completion alone (right-padded rows), without the inference helpers."""
    sequences = [PROMPTS[row // G] + completion for row, completion in enumerate(COMPLETIONS)]
    input_ids, segment_ids = np.zeros((len(sequences), 8), np.int32), np.zeros((len(sequences), 8), np.int32)
    for row, tokens in enumerate(sequences):
        input_ids[row, : len(tokens)], segment_ids[row, : len(tokens)] = tokens, 1
    if isinstance(model, PreferenceEmbeddingModel):
        prompt_end = np.array([len(PROMPTS[row // G]) - 1 for row in range(len(sequences))])
        forward = nnx.jit(lambda model, *args: model(args[0], segment_ids=args[1], prompt_end_index=args[2]))
        return jax.device_get(forward(model, input_ids, segment_ids, prompt_end))
    return np.asarray(
        nnx.jit(lambda model, *args: model(args[0], segment_ids=args[1]))(model, input_ids, segment_ids)
    )


def mean_win_probability(probability) -> np.ndarray:
    """r_i = mean over j != i of P(y_i > y_j) within each group, by loops."""
    return np.array(
        [
            np.mean([probability(g * G + i, g * G + j) for j in range(G) if j != i])
            for g in range(len(COMPLETIONS) // G)
            for i in range(G)
        ]
    )


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_hand_built_preference_matrices():
    # Scalar rewards: P = sigmoid(r_i - r_j); r = (0, ln 3) gives P_01 = 1/4.
    preferences = pairwise_preferences(np.array([0.0, math.log(3.0), 1.0, 1.0]), 2)
    np.testing.assert_allclose(preferences, [[[0.5, 0.25], [0.75, 0.5]], [[0.5, 0.5], [0.5, 0.5]]], rtol=1e-6)
    np.testing.assert_allclose(group_win_rates(preferences).reshape(-1), [0.25, 0.75, 0.5, 0.5], rtol=1e-6)
    # Probit link at temperature 2: Phi((r_i - r_j) / 2).
    probit = pairwise_preferences(np.array([0.0, 1.0]), 2, link="probit", temperature=2.0)
    phi = 0.5 * (1 + math.erf(0.5 / math.sqrt(2)))
    np.testing.assert_allclose(probit[0], [[0.5, 1 - phi], [phi, 0.5]], rtol=1e-6)
    # Several heads: combined by the weights, else averaged.
    heads = np.array([[1.0, 3.0], [0.0, 0.0]])
    weighted = pairwise_preferences(heads, 2, objective_weights=(0.5, -1.0))  # r = (-2.5, 0)
    np.testing.assert_allclose(weighted[0, 0, 1], sigmoid(-2.5), rtol=1e-6)
    np.testing.assert_allclose(pairwise_preferences(heads, 2)[0, 0, 1], sigmoid(2.0), rtol=1e-6)
    # Rock, paper, scissors (each beats the next): every win rate is 1/2, unlike any scalar reward's.
    angles = np.array([0.0, 2.0, 4.0]) * np.pi / 3
    embeddings = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    cyclic = pairwise_preferences((embeddings, np.full((3, 1), 2.0)), 3, temperature=0.5)
    beats = sigmoid(2.0 * math.sin(2 * math.pi / 3) / 0.5)
    np.testing.assert_allclose(cyclic[0, 0], [0.5, beats, 1 - beats], rtol=1e-5)
    np.testing.assert_allclose(group_win_rates(cyclic), [[0.5, 0.5, 0.5]], rtol=1e-5)

    with pytest.raises(ValueError, match="`group_size`=3 must be an int >= 2 dividing the 4"):
        pairwise_preferences(np.zeros(4), 3)
    with pytest.raises(ValueError, match="`link`='tanh'"):
        pairwise_preferences(np.zeros(4), 2, link="tanh")


def test_a_tiny_gpm_judges_each_completion_by_its_win_rate_in_its_group():
    model = PreferenceEmbeddingModel(CONFIG, rngs=nnx.Rngs(0), embedding_dim=4)
    rewards = win_rate_reward(model, G, temperature=0.5, batch_size=4, buckets=(8,))(**rollout())
    embeddings, scales = unpadded_outputs(model)

    def probability(i, j):  # the prompt's scales (the same for the group) weigh the pair
        return sigmoid(
            float(gpm_preference_score(embeddings[i], embeddings[j], eigenvalue_scales=scales[i])) / 0.5
        )

    np.testing.assert_allclose(rewards, mean_win_probability(probability), rtol=1e-4, atol=1e-6)
    assert rewards.shape == (6,) and ((0 < rewards) & (rewards < 1)).all()
    for group in rewards.reshape(2, G):  # P_ij + P_ji = 1: a group's win rates average 1/2
        assert group.mean() == pytest.approx(0.5, abs=1e-6)

    with pytest.raises(ValueError, match="`num_generations`=1 must be an int >= 2"):
        win_rate_reward(model, 1)
    mixed = rollout()
    mixed["prompt_ids"] = mixed["prompt_ids"][[0, 1, 3, 2, 4, 5]]  # row 2 answers the other prompt
    with pytest.raises(ValueError, match="mix prompts"):
        win_rate_reward(model, G)(**mixed)


def test_a_scalar_judge_gives_bradley_terry_win_rates():
    model = RewardModel(CONFIG, rngs=nnx.Rngs(1))
    rewards = win_rate_reward(model, G, link="probit", batch_size=4, buckets=(8,))(**rollout())
    scores = unpadded_outputs(model)
    phi = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
    np.testing.assert_allclose(
        rewards, mean_win_probability(lambda i, j: phi(scores[i] - scores[j])), rtol=1e-4, atol=1e-6
    )


def test_online_runs_score_win_rates_of_a_preference_model_checkpoint(tmp_path):
    assert (preference_rewards.LINK_KEY, preference_rewards.TEMPERATURE_KEY) == (
        reward_eval.LINK_KEY,
        reward_eval.TEMPERATURE_KEY,
    )
    assert preference_rewards.OBJECTIVE_WEIGHTS_KEY == reward_eval.OBJECTIVE_WEIGHTS_KEY
    model = PreferenceEmbeddingModel(CONFIG, rngs=nnx.Rngs(0), embedding_dim=4)
    save_pretrained(model, tmp_path / "gpm")
    hf = json.loads((tmp_path / "gpm" / "config.json").read_text())
    hf |= {reward_eval.LINK_KEY: "logistic", reward_eval.TEMPERATURE_KEY: 0.5}  # as `jaxpref reward` stores
    (tmp_path / "gpm" / "config.json").write_text(json.dumps(hf))
    config = OnlineRunConfig(
        rollout=RolloutConfig(num_generations=G, reward_funcs=(), preference_model=str(tmp_path / "gpm"))
    )
    fns, weights = build_reward_fns(config, single_device_mesh())
    assert list(fns) == [PREFERENCE_REWARD_NAME] and weights == {}
    want = win_rate_reward(model, G, temperature=0.5, batch_size=4, buckets=(8,))(**rollout())
    np.testing.assert_allclose(fns[PREFERENCE_REWARD_NAME](**rollout()), want, rtol=1e-5, atol=1e-6)
