"""build_step(family="reward") beyond one scalar head: General Preference Models and ensembles of
heads. The step's loss is the objective of what the model gives each sequence alone, a few steps
learn an easy preference, and mismatched models and objectives fail before compiling."""

import functools

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from jaxpref.inference.reward import preference_embeddings, score_responses
from jaxpref.models import PreferenceEmbeddingModel, RewardModel
from jaxpref.objectives import Objective, objective
from jaxpref.objectives.reward import ensemble_reward_loss, gpm_loss, gpm_preference_score
from jaxpref.train import build_step

from .helpers import CONFIG, NUM_EXAMPLES, ROW_LENGTH, marker_pairs, pair_batch, single_device_mesh

HEADS = 3
GPM_LOSS = Objective.from_fn(gpm_loss, name="gpm", temperature=0.5)
ENSEMBLE_LOSS = Objective.from_fn(
    functools.partial(ensemble_reward_loss, objective("bradley_terry")), name="ensemble_bradley_terry"
)


def fresh_gpm() -> PreferenceEmbeddingModel:
    return PreferenceEmbeddingModel(CONFIG, rngs=nnx.Rngs(0), embedding_dim=4)


def fresh_ensemble() -> RewardModel:
    return RewardModel(CONFIG, rngs=nnx.Rngs(0), num_labels=HEADS)


@pytest.fixture(scope="module")
def gpm_step():
    return build_step(
        fresh_gpm(), GPM_LOSS, optax.adam(3e-3), single_device_mesh(), family="reward", reference="none"
    )


@pytest.fixture(scope="module")
def ensemble_step():
    return build_step(
        fresh_ensemble(),
        ENSEMBLE_LOSS,
        optax.adam(3e-3),
        single_device_mesh(),
        family="reward",
        reference="none",
    )


def pairs_alone(batch) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """(prompts, chosen, rejected) token ids of a prefix-shared batch (segments 1, 2, 3 per row)."""
    segments = batch["segment_ids"]
    return tuple([row[seg == s] for row, seg in zip(batch["input_ids"], segments)] for s in (1, 2, 3))


def test_gpm_step_loss_is_gpm_loss_of_each_sequence_alone(gpm_step):
    batch = pair_batch(seed=1)
    _, metrics = gpm_step(gpm_step.init(), batch)
    prompts, chosen, rejected = pairs_alone(batch)
    embeddings, scales = preference_embeddings(
        fresh_gpm(), prompts * 2, chosen + rejected, buckets=(ROW_LENGTH,)
    )
    assert np.allclose(
        scales[:NUM_EXAMPLES], scales[NUM_EXAMPLES:], atol=1e-6
    )  # one prompt, one set of scales
    losses, expected = gpm_loss(
        embeddings[:NUM_EXAMPLES],
        embeddings[NUM_EXAMPLES:],
        eigenvalue_scales=scales[:NUM_EXAMPLES],
        temperature=0.5,
    )
    np.testing.assert_allclose(metrics["loss"], np.mean(losses), atol=1e-5)
    for key in ("rewards/margins", "rewards/accuracies", "gpm/probabilities"):
        np.testing.assert_allclose(metrics[key], np.mean(expected[key]), atol=1e-5, err_msg=key)


def test_ensemble_step_loss_is_the_mean_of_each_heads_bradley_terry(ensemble_step):
    batch = pair_batch(seed=2)
    _, metrics = ensemble_step(ensemble_step.init(), batch)
    prompts, chosen, rejected = pairs_alone(batch)
    rewards = score_responses(fresh_ensemble(), prompts * 2, chosen + rejected, buckets=(ROW_LENGTH,))
    assert rewards.shape == (2 * NUM_EXAMPLES, HEADS)
    per_head = [
        objective("bradley_terry")(
            chosen_rewards=rewards[:NUM_EXAMPLES, h], rejected_rewards=rewards[NUM_EXAMPLES:, h]
        )[0]
        for h in range(HEADS)
    ]
    np.testing.assert_allclose(metrics["loss"], np.mean(per_head), atol=1e-5)
    mean = rewards.mean(axis=1)
    np.testing.assert_allclose(metrics["rewards/chosen"], mean[:NUM_EXAMPLES].mean(), atol=1e-5)
    np.testing.assert_allclose(
        metrics["rewards/margins"], (mean[:NUM_EXAMPLES] - mean[NUM_EXAMPLES:]).mean(), atol=1e-5
    )


@pytest.mark.parametrize("kind", ["gpm", "ensemble"])
def test_a_few_steps_learn_an_easy_preference(kind, gpm_step, ensemble_step):
    train_step = gpm_step if kind == "gpm" else ensemble_step
    rng = np.random.default_rng(0)
    state = train_step.init()
    history = []
    for _ in range(60):
        # Fresh pairs (accuracy before the update), shaped as pair_batch's: the step compiles once.
        state, metrics = train_step(state, marker_pairs(rng, NUM_EXAMPLES))
        history.append(jax.device_get(metrics))
    assert np.mean([m["loss"] for m in history[-5:]]) < 0.5 * np.mean([m["loss"] for m in history[:5]])
    assert np.mean([m["rewards/accuracies"] for m in history[-5:]]) > 0.9

    model = fresh_gpm() if kind == "gpm" else fresh_ensemble()
    nnx.update(model, state.params)
    prompts, chosen, rejected = pairs_alone(marker_pairs(rng, 64))
    if kind == "gpm":
        embeddings, scales = preference_embeddings(
            model, prompts * 2, chosen + rejected, buckets=(ROW_LENGTH,)
        )
        scores = gpm_preference_score(embeddings[:64], embeddings[64:], eigenvalue_scales=scales[:64])
    else:
        rewards = score_responses(model, prompts * 2, chosen + rejected, buckets=(ROW_LENGTH,))
        scores = rewards[:64] - rewards[64:]  # [64, heads]: every head ranks the pairs
    assert np.mean(np.asarray(scores) > 0) > 0.9  # chance is 0.5


def test_mismatched_models_and_objectives_fail_before_compiling():
    mesh = single_device_mesh()
    bradley_terry = objective("bradley_terry")
    with pytest.raises(ValueError, match=r"\['bradley_terry'\].*preference embeddings.*gpm_loss"):
        build_step(fresh_gpm(), bradley_terry, optax.sgd(0.1), mesh, family="reward", reference="none")
    with pytest.raises(ValueError, match=f"{HEADS} rewards per response.*ensemble_reward_loss"):
        build_step(fresh_ensemble(), bradley_terry, optax.sgd(0.1), mesh, family="reward", reference="none")
    with pytest.raises(ValueError, match="prompt_end_index"):
        fresh_gpm()(np.ones((1, 4), np.int32))
