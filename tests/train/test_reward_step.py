"""build_step(family="reward"): per-sequence rewards equal the reward model on each sequence alone,
the step's loss is the reward objective of those rewards, accumulation and sharding are exact, and
a few steps learn an easy preference."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxpref.models import Decoder, RewardModel
from jaxpref.models.packing import pack_sequences
from jaxpref.objectives import objective
from jaxpref.sharding import make_mesh
from jaxpref.train import build_step
from jaxpref.train.batches import packed_batch, packed_rewards

from .helpers import CONFIG, NUM_EXAMPLES, ROW_LENGTH, marker_pairs, pair_batch, single_device_mesh

BRADLEY_TERRY = objective("bradley_terry")
OPTIMIZER = optax.inject_hyperparams(optax.sgd)(learning_rate=1.0, momentum=0.9)  # first update = -grad


def fresh_model(seed: int = 0, num_labels: int = 1) -> RewardModel:
    return RewardModel(CONFIG, rngs=nnx.Rngs(seed), num_labels=num_labels)


def reward_step(objective_=BRADLEY_TERRY, mesh=None, **options):
    mesh = single_device_mesh() if mesh is None else mesh
    return build_step(
        fresh_model(), objective_, OPTIMIZER, mesh, family="reward", reference="none", **options
    )


def first_step(train_step, batch):
    """(metrics, gradients) of one step from the model's initial weights."""
    state = train_step.init()
    before = jax.device_get(state.params)
    state, metrics = train_step(state, batch)
    grads = jax.tree.map(lambda b, a: b - a, before, jax.device_get(state.params))
    return jax.device_get(metrics), grads


def assert_close(actual, expected, atol, rtol=0.0):
    jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, atol=atol, rtol=rtol), actual, expected)


def sequences_alone(batch) -> list[np.ndarray]:
    """Each sequence's tokens as its own row would hold them: its prefix segment, then its segment."""
    sequences = []
    for row, segment in zip(batch["sequence_rows"], batch["sequence_segments"]):
        in_sequence = batch["segment_ids"][row] == segment
        prefix = batch["prefix_segment_ids"]
        if prefix is not None:  # prefix-shared rows: the prompt segment comes first
            in_sequence |= batch["segment_ids"][row] == prefix[row][in_sequence][0]
        sequences.append(batch["input_ids"][row][in_sequence])
    return sequences


def alone_rewards(model: RewardModel, batch) -> np.ndarray:  # [sequences]
    """``RewardModel.__call__`` with each sequence alone in its row (right-padded to one shape)."""
    sequences = sequences_alone(batch)
    ids = np.zeros((len(sequences), ROW_LENGTH), np.int32)
    for i, tokens in enumerate(sequences):
        ids[i, : len(tokens)] = tokens
    segment_ids = (np.arange(ROW_LENGTH) < np.array([len(t) for t in sequences])[:, None]).astype(np.int32)
    return np.asarray(nnx.jit(lambda m, x, s: m(x, segment_ids=s))(model, ids, segment_ids))


def packed_pairs(seed: int) -> dict[str, np.ndarray]:
    """The pairs of ``pair_batch(seed)`` with each sequence in its own segment, several to a row."""
    shared = pair_batch(seed)
    sequences = sequences_alone(shared)
    masks = [np.zeros(len(s), np.int32) for s in sequences]  # rewards read no completion mask
    return dict(pack_sequences(sequences, masks, 2 * ROW_LENGTH)._asdict())


@pytest.mark.parametrize("layout", [pair_batch, packed_pairs], ids=["prefix_shared", "packed"])
def test_packed_rewards_equal_the_reward_model_on_each_sequence_alone(layout):
    batch = layout(seed=0)
    if layout is packed_pairs:
        assert len(batch["input_ids"]) < 2 * NUM_EXAMPLES  # several sequences share rows
    model = fresh_model()
    rewards = jax.jit(packed_rewards)(model, packed_batch(batch))
    assert rewards.shape == (2 * NUM_EXAMPLES,) and rewards.dtype == jnp.float32
    np.testing.assert_allclose(rewards, alone_rewards(model, batch), atol=1e-5)


@pytest.mark.parametrize(
    "objective_, extra",
    [
        (BRADLEY_TERRY, {"margin": np.linspace(0.0, 1.0, NUM_EXAMPLES, dtype=np.float32)}),
        (objective("bradley_terry_soft"), {"target_probability": np.full(NUM_EXAMPLES, 0.7, np.float32)}),
        (objective("thurstone", center_rewards_coefficient=0.1), {}),
    ],
    ids=["margin", "soft_targets", "thurstone"],
)
def test_step_loss_is_the_objective_of_the_reward_models_rewards(objective_, extra):
    batch = {**pair_batch(seed=1), **extra}
    metrics, _ = first_step(reward_step(objective_), batch)
    chosen, rejected = np.split(alone_rewards(fresh_model(), batch), 2)
    losses, expected = objective_(chosen_rewards=chosen, rejected_rewards=rejected, **extra)
    np.testing.assert_allclose(metrics["loss"], np.mean(losses), atol=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        np.testing.assert_allclose(metrics[key], np.mean(expected[key]), atol=1e-5, err_msg=key)
    assert metrics["num_tokens"] == np.sum(batch["segment_ids"] != 0)


@pytest.fixture(scope="module")
def margin_batch():
    return {**pair_batch(seed=2), "margin": np.linspace(0.0, 2.0, NUM_EXAMPLES, dtype=np.float32)}


@pytest.fixture(scope="module")
def baseline(margin_batch):
    return first_step(reward_step(), margin_batch)


def test_gradient_accumulation_equals_full_batch(baseline, margin_batch):
    """Margins are per-pair arrays: the strided microbatches must keep each with its pair."""
    expected_metrics, expected_grads = baseline
    metrics, grads = first_step(reward_step(grad_accum_steps=4), margin_batch)
    assert_close(metrics, expected_metrics, atol=1e-6, rtol=1e-6)
    assert_close(grads, expected_grads, atol=1e-6)


def test_sharded_step_equals_single_device(baseline, margin_batch):
    expected_metrics, expected_grads = baseline
    metrics, grads = first_step(reward_step(mesh=make_mesh(2, 2, 2)), margin_batch)
    assert_close(metrics, expected_metrics, atol=1e-5)
    assert_close(grads, expected_grads, atol=1e-5)


def test_a_few_steps_learn_an_easy_preference():
    rng = np.random.default_rng(0)
    train_step = build_step(
        fresh_model(),
        BRADLEY_TERRY,
        optax.adam(3e-3),
        single_device_mesh(),
        family="reward",
        reference="none",
    )
    state = train_step.init()
    history = []
    for _ in range(40):
        state, metrics = train_step(state, marker_pairs(rng, 16))  # fresh pairs: accuracy before update
        history.append(jax.device_get(metrics))
    assert history[0]["loss"] > 0.5 > 0.2 > history[-1]["loss"]
    assert np.mean([m["rewards/accuracies"] for m in history[-5:]]) > 0.9

    model = fresh_model()
    nnx.update(model, state.params)
    held_out = marker_pairs(rng, 64)
    chosen, rejected = np.split(np.asarray(packed_rewards(model, packed_batch(held_out))), 2)
    assert np.mean(chosen > rejected) > 0.9


def test_errors_name_the_problem(caplog):
    model, mesh = fresh_model(), single_device_mesh()
    with pytest.raises(ValueError, match="reference"):
        build_step(model, BRADLEY_TERRY, OPTIMIZER, mesh, family="reward", reference="frozen")
    with pytest.raises(ValueError, match="RewardModel.*got Decoder"):
        build_step(
            Decoder(CONFIG, rngs=nnx.Rngs(0)),
            BRADLEY_TERRY,
            OPTIMIZER,
            mesh,
            family="reward",
            reference="none",
        )
    with pytest.raises(ValueError, match="2 rewards per response"):  # an ensemble needs ensemble_reward_loss
        build_step(
            fresh_model(num_labels=2), BRADLEY_TERRY, OPTIMIZER, mesh, family="reward", reference="none"
        )
    with pytest.raises(ValueError, match="objective"):
        build_step(model, None, OPTIMIZER, mesh, family="reward", reference="none")
    soft_batch = {**pair_batch(seed=0), "target_probability": np.full(NUM_EXAMPLES, 0.5, np.float32)}
    with caplog.at_level(logging.WARNING):  # bradley_terry reads no soft targets: reported, once
        for _ in range(2):
            reward_step().shard_batch(soft_batch)
    assert [r.getMessage() for r in caplog.records].count(
        "data column 'target_probability' is not read by the objective "
        f"{BRADLEY_TERRY!r}; it is ignored."
    ) == 1
    with pytest.raises(ValueError, match="grad_accum_steps"):
        reward_step(grad_accum_steps=3).shard_batch(pair_batch(seed=0))
