"""Reward-model objectives against float64 NumPy references, plus gradients, transforms and errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jaxpref.objectives import REWARD, objective, reward_loss

from .helpers import (
    HYPOTHESIS,
    all_finite,
    as_f32_exact,
    assert_close,
    assert_grads_close,
    numerical_grad,
    stack,
    to_jax,
)

BATCH_SIZES = (1, 3, 8)
REWARD_KEYS = ("chosen_rewards", "rejected_rewards")
BT_SLOPE_SIGMA = 2.0 / math.sqrt(math.pi)  # Thurstone sigma whose slope at 0 is Bradley-Terry's


# ------------------------------------------------------------------------------------------------
# float64 references, written from the formulas in the objectives' docstrings.
# ------------------------------------------------------------------------------------------------


def log_sigmoid(x):
    return -np.logaddexp(0.0, -np.asarray(x, np.float64))


def log_normal_cdf(x):
    """log Phi(x) = log(erfc(-x / sqrt 2) / 2), per entry (accurate in float64 down to x ~ -37)."""
    return np.log(0.5 * np.vectorize(math.erfc)(-np.asarray(x, np.float64) / math.sqrt(2.0)))


def reference(name, inputs, *, center_rewards_coefficient=0.0, target_probability=1.0, sigma=1.0):
    chosen, rejected = inputs["chosen_rewards"], inputs["rejected_rewards"]
    delta = chosen - rejected - inputs.get("margin", 0.0)
    if name == "bradley_terry":
        losses = -log_sigmoid(delta)
    elif name == "bradley_terry_soft":
        p = inputs.get("target_probability", target_probability)
        losses = -p * log_sigmoid(delta) - (1.0 - p) * log_sigmoid(-delta)
    else:
        assert name == "thurstone"
        losses = -log_normal_cdf(delta / (math.sqrt(2.0) * sigma))
    return losses + center_rewards_coefficient * (chosen + rejected) ** 2


def reference_metrics(inputs):
    chosen, rejected = inputs["chosen_rewards"], inputs["rejected_rewards"]
    return {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/accuracies": (chosen > rejected).astype(np.float64),
        "rewards/margins": chosen - rejected,
    }


# ------------------------------------------------------------------------------------------------
# Inputs and cases.
# ------------------------------------------------------------------------------------------------


def make_inputs(batch, seed=0, *, margin=False, soft_targets=False):
    """float32-exact rewards in [-8, 8]; optional margins in [0, 2] and target probabilities."""
    rng = np.random.default_rng([seed, batch, margin, soft_targets])
    inputs = {key: as_f32_exact(rng.uniform(-8.0, 8.0, batch)) for key in REWARD_KEYS}
    if margin:
        inputs["margin"] = as_f32_exact(rng.uniform(0.0, 2.0, batch))
    if soft_targets:
        inputs["target_probability"] = as_f32_exact(rng.uniform(0.0, 1.0, batch))
    return inputs


# (name, input options, hyperparameters)
CASES = [
    ("bradley_terry", {}, {}),
    ("bradley_terry", {"margin": True}, {}),
    ("bradley_terry", {"margin": True}, {"center_rewards_coefficient": 0.01}),
    ("bradley_terry_soft", {}, {}),
    ("bradley_terry_soft", {}, {"target_probability": 0.9}),
    ("bradley_terry_soft", {"soft_targets": True}, {}),
    ("bradley_terry_soft", {"soft_targets": True, "margin": True}, {"center_rewards_coefficient": 0.1}),
    ("thurstone", {}, {}),
    ("thurstone", {"margin": True}, {"sigma": 0.5}),
    ("thurstone", {}, {"sigma": BT_SLOPE_SIGMA, "center_rewards_coefficient": 0.01}),
]


def case_id(case):
    name, options, hparams = case
    return "-".join(
        [name, *(k for k, v in options.items() if v), *(f"{k}={v:.3g}" for k, v in hparams.items())]
    )


def library_losses(name, inputs, **hparams):
    return reward_loss(name, **inputs, **hparams)[0]


# ------------------------------------------------------------------------------------------------
# Values, metrics and gradients.
# ------------------------------------------------------------------------------------------------


def test_every_objective_has_a_case():
    assert set(REWARD) == {name for name, _, _ in CASES}
    assert sorted(REWARD) == ["bradley_terry", "bradley_terry_soft", "thurstone"]


@pytest.mark.parametrize("batch", BATCH_SIZES)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_losses_match_reference(case, batch):
    name, options, hparams = case
    inputs = make_inputs(batch, **options)
    losses = library_losses(name, inputs, **hparams)
    assert losses.shape == (batch,) and losses.dtype == jnp.float32
    assert_close(losses, reference(name, inputs, **hparams))


@pytest.mark.parametrize("name", sorted(REWARD))
def test_metrics_match_reference_and_carry_no_gradient(name):
    inputs = make_inputs(8, margin=True)
    inputs["rejected_rewards"][0] = inputs["chosen_rewards"][0]  # a tie: accuracy is strict, counts 0
    _, metrics = reward_loss(name, **inputs)
    expected = reference_metrics(inputs)  # margins are r_w - r_l, without the pair margin
    assert set(metrics) == set(expected)
    for key, value in expected.items():
        assert metrics[key].shape == (8,)
        assert_close(metrics[key], value, err_msg=key)
    assert metrics["rewards/accuracies"][0] == 0.0

    def metric_total(rewards):
        _, metrics = reward_loss(name, **rewards)
        return sum(value.sum() for value in metrics.values())

    grads = jax.grad(metric_total)({k: jnp.asarray(inputs[k], jnp.float32) for k in REWARD_KEYS})
    assert all(not np.any(np.asarray(g)) for g in grads.values())


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_grad_matches_finite_differences(case):
    name, options, hparams = case
    inputs = make_inputs(5, seed=1, **options)
    keys = [k for k in (*REWARD_KEYS, "margin") if k in inputs]
    jax_inputs = to_jax(inputs)
    grads = jax.grad(lambda x: library_losses(name, {**jax_inputs, **x}, **hparams).sum())(
        {k: jax_inputs[k] for k in keys}
    )
    expected = numerical_grad(lambda x: reference(name, x, **hparams), inputs, keys)
    assert_grads_close({k: np.asarray(v, np.float64) for k, v in grads.items()}, expected)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_jit_and_vmap_match_eager(case):
    name, options, hparams = case
    batches = [make_inputs(3, seed, **options) for seed in (2, 3)]
    eager = [reward_loss(name, **b, **hparams) for b in batches]

    def fn(inputs):
        return reward_loss(name, **inputs, **hparams)

    jax.tree.map(assert_close, jax.jit(fn)(to_jax(batches[0])), eager[0])
    mapped = jax.jit(jax.vmap(fn))(to_jax(stack(batches)))
    jax.tree.map(assert_close, mapped, jax.tree.map(lambda *xs: jnp.stack(xs), *eager))


@pytest.mark.parametrize("name", sorted(REWARD))
def test_extreme_rewards_give_finite_losses_and_gradients(name):
    chosen = jnp.array([1e4, -1e4, 0.0, 300.0], jnp.float32)
    rejected = jnp.array([-1e4, 1e4, 0.0, -300.0], jnp.float32)

    def total(chosen, rejected):
        losses, _ = reward_loss(
            name, chosen_rewards=chosen, rejected_rewards=rejected, center_rewards_coefficient=0.01
        )
        return losses.sum(), losses

    (_, losses), grads = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(chosen, rejected)
    assert all_finite((losses, grads))
    assert np.all(np.asarray(losses) >= 0.0)
    assert float(losses[1]) > 1e4  # a confidently wrong pair costs at least |Delta|


def test_bfloat16_rewards_are_upcast():
    inputs = make_inputs(4, margin=True)
    bf16 = to_jax(inputs, jnp.bfloat16)
    losses, metrics = reward_loss("bradley_terry", **bf16)
    assert losses.dtype == jnp.float32 and metrics["rewards/chosen"].dtype == jnp.float32
    rounded = {k: np.asarray(v, np.float64) for k, v in bf16.items()}
    assert_close(losses, reference("bradley_terry", rounded))


# ------------------------------------------------------------------------------------------------
# Special cases and identities.
# ------------------------------------------------------------------------------------------------


def test_soft_target_one_is_bradley_terry_and_swapping_flips_the_target():
    inputs = make_inputs(6, soft_targets=True)
    hard = {k: inputs[k] for k in REWARD_KEYS}
    assert_close(library_losses("bradley_terry_soft", hard), library_losses("bradley_terry", hard))
    swapped = {
        "chosen_rewards": inputs["rejected_rewards"],
        "rejected_rewards": inputs["chosen_rewards"],
        "target_probability": 1.0 - inputs["target_probability"],
    }
    assert_close(library_losses("bradley_terry_soft", swapped), library_losses("bradley_terry_soft", inputs))


def test_soft_loss_is_minimised_at_the_target_log_odds():
    p = np.array([0.1, 0.5, 0.8], np.float32)
    delta = jnp.asarray(np.log(p / (1.0 - p)))

    def total(chosen):
        return library_losses(
            "bradley_terry_soft",
            {"chosen_rewards": chosen, "rejected_rewards": jnp.zeros(3), "target_probability": p},
        ).sum()

    np.testing.assert_allclose(jax.grad(total)(delta), 0.0, atol=1e-6)


def test_thurstone_at_zero_and_its_bradley_terry_slope():
    zeros = {"chosen_rewards": jnp.zeros(1), "rejected_rewards": jnp.zeros(1)}
    assert_close(library_losses("thurstone", zeros), [math.log(2.0)])

    def slope(name, **hparams):
        return jax.grad(lambda r: library_losses(name, {**zeros, "chosen_rewards": r}, **hparams).sum())(
            jnp.zeros(1)
        )

    assert_close(slope("bradley_terry"), [-0.5])
    assert_close(slope("thurstone", sigma=BT_SLOPE_SIGMA), slope("bradley_terry"))


def test_margin_shifts_the_comparison():
    inputs = make_inputs(4, margin=True)
    shifted = {
        "chosen_rewards": inputs["chosen_rewards"] - inputs["margin"],
        "rejected_rewards": inputs["rejected_rewards"],
    }
    for name in ("bradley_terry", "thurstone"):
        assert_close(library_losses(name, inputs), library_losses(name, shifted))


@HYPOTHESIS
@given(
    rewards=hnp.arrays(np.float32, (2, 5), elements=st.floats(-1e3, 1e3, width=32)),
    name=st.sampled_from(sorted(REWARD)),
)
def test_losses_are_finite_and_nonnegative(rewards, name):
    losses, metrics = reward_loss(name, chosen_rewards=rewards[0], rejected_rewards=rewards[1])
    assert all_finite((losses, metrics)) and np.all(np.asarray(losses) >= 0.0)


# ------------------------------------------------------------------------------------------------
# Composition and errors.
# ------------------------------------------------------------------------------------------------


def test_objective_composes_reward_losses():
    inputs = to_jax(make_inputs(4, margin=True))
    bt = objective("bradley_terry", center_rewards_coefficient=0.01)
    losses, metrics = bt(**inputs)
    assert_close(losses, library_losses("bradley_terry", inputs, center_rewards_coefficient=0.01))
    assert_close(metrics["loss/bradley_terry"], losses)
    mixed = (bt + 0.5 * objective("thurstone")).with_(center_rewards_coefficient=0.0)
    expected = library_losses("bradley_terry", inputs) + 0.5 * library_losses("thurstone", inputs)
    assert_close(mixed(**inputs)[0], expected)


@pytest.mark.parametrize(
    "name, changes, match",
    [
        ("bt", {}, "`name`='bt'"),
        ("bradley_terry", {"beta": 0.1}, "beta"),
        ("bradley_terry", {"chosen_rewards": np.zeros((4, 1))}, "`chosen_rewards` must have 1"),
        ("bradley_terry", {"chosen_rewards": None}, "`chosen_rewards` is required"),
        ("bradley_terry", {"rejected_rewards": np.zeros(3)}, "`rejected_rewards` has shape"),
        ("bradley_terry", {"margin": np.zeros(3)}, "`margin` has shape"),
        ("bradley_terry", {"center_rewards_coefficient": -1.0}, "center_rewards_coefficient"),
        ("bradley_terry_soft", {"target_probability": 1.5}, "`target_probability` must lie"),
        ("bradley_terry_soft", {"target_probability": np.full(3, 0.5)}, "`target_probability` has shape"),
        ("bradley_terry_soft", {"target_probability": np.full((4, 1), 0.5)}, "`target_probability` must be"),
        ("thurstone", {"sigma": 0.0}, "`sigma`"),
    ],
)
def test_errors_name_the_argument(name, changes, match):
    inputs = {**make_inputs(4), **changes}
    with pytest.raises(ValueError, match=match):
        reward_loss(name, **inputs)


def test_objective_rejects_inputs_no_term_reads():
    with pytest.raises(ValueError, match="target_probability"):
        objective("bradley_terry")(**to_jax(make_inputs(4, soft_targets=True)))
