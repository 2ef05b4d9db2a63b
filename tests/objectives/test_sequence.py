"""Token-to-sequence reductions (sum, mean, LD-DPO) and WPO weights against NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jaxpref.objectives import ld_pair_logps, sequence_logps, token_log_sum_squared_probs, wpo_weights

from . import numpy_reference as ref
from .helpers import HYPOTHESIS, SEQ_LEN, as_f32_exact, assert_close, token_level_inputs

VOCAB = 7
REDUCTIONS = [
    ("sum", {}),
    ("mean", {}),
    ("ld_dpo", {"ld_alpha": 0.0}),
    ("ld_dpo", {"ld_alpha": 0.3}),
    ("ld_dpo", {"ld_alpha": 1.0}),
]


def tokens(batch, seed=0, padding=np.nan):
    """Token log-probs (``padding`` outside the mask, one empty row when batch > 1), mask, shared lengths."""
    rng = np.random.default_rng([seed, batch])
    token_logps, _, mask = token_level_inputs(rng, batch)
    if batch > 1:
        mask[-1] = False
    shared_lengths = rng.integers(0, 31, batch)
    return np.where(mask, token_logps, padding), mask, shared_lengths


def reduce_kwargs(reduction, hparams, shared_lengths):
    return {**hparams, "shared_lengths": shared_lengths} if reduction == "ld_dpo" else {}


def reduction_id(case):
    reduction, hparams = case
    return "-".join([reduction] + [f"{k}={v}" for k, v in hparams.items()])


@pytest.mark.parametrize("padding", [np.nan, -np.inf, 0.0], ids=["nan", "-inf", "zero"])
@pytest.mark.parametrize("batch", (1, 3, 8))
@pytest.mark.parametrize("case", REDUCTIONS, ids=reduction_id)
def test_sequence_logps_match_reference(case, batch, padding):
    reduction, hparams = case
    token_logps, mask, shared = tokens(batch, padding=padding)
    kwargs = reduce_kwargs(reduction, hparams, shared)
    actual = sequence_logps(token_logps, mask, reduction, **kwargs)
    expected = ref.sequence_logps(token_logps, mask, reduction, hparams.get("ld_alpha"), shared)
    assert actual.shape == (batch,) and actual.dtype == jnp.float32
    assert_close(actual, expected)
    if batch > 1:  # the empty completion: 0 for every reduction, never NaN
        assert float(actual[-1]) == 0.0


@pytest.mark.parametrize("case", REDUCTIONS, ids=reduction_id)
def test_sequence_logps_grad_is_the_token_weighting(case):
    reduction, hparams = case
    token_logps, mask, shared = tokens(3)
    kwargs = reduce_kwargs(reduction, hparams, shared)
    grad = jax.grad(lambda t: sequence_logps(t, mask, reduction, **kwargs).sum())(
        jnp.asarray(token_logps, jnp.float32)
    )
    # The reductions are linear: the weight of token (i, t) is the reference's response to a unit bump there.
    base = np.where(mask, token_logps, 0.0)
    expected = np.zeros_like(base)
    for index in zip(*np.nonzero(mask)):
        bumped = base.copy()
        bumped[index] += 1.0
        expected[index] = (
            ref.sequence_logps(bumped, mask, reduction, hparams.get("ld_alpha"), shared)
            - ref.sequence_logps(base, mask, reduction, hparams.get("ld_alpha"), shared)
        ).sum()
    assert_close(grad, expected)


@pytest.mark.parametrize("ld_alpha", [0.0, 0.5, 1.0])
def test_ld_pair_logps_share_the_shorter_length(ld_alpha):
    chosen, chosen_mask, _ = tokens(8, seed=1)
    rejected, rejected_mask, _ = tokens(8, seed=2)
    actual = ld_pair_logps(chosen, chosen_mask, rejected, rejected_mask, ld_alpha)
    expected = ref.ld_pair_logps(chosen, chosen_mask, rejected, rejected_mask, ld_alpha)
    for a, e in zip(actual, expected):
        assert_close(a, e)
    if ld_alpha == 1.0:
        assert_close(actual[0], ref.sequence_logps(chosen, chosen_mask))


def logits_and_targets(batch, seed=0):
    rng = np.random.default_rng([seed, batch, VOCAB])
    logits = as_f32_exact(rng.normal(0.0, 2.0, (batch, SEQ_LEN, VOCAB)))
    targets = rng.integers(0, VOCAB, (batch, SEQ_LEN))
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    token_logps = as_f32_exact(np.take_along_axis(log_probs, targets[..., None], -1)[..., 0])
    _, _, mask = token_level_inputs(rng, batch)
    mask[0] = False  # an empty completion weighs 1
    return logits, token_logps, mask


def test_token_log_sum_squared_probs_matches_reference():
    logits, _, _ = logits_and_targets(3)
    actual = token_log_sum_squared_probs(logits)
    assert actual.shape == (3, SEQ_LEN)
    assert_close(actual, ref.token_log_sum_squared_probs(logits))


@pytest.mark.parametrize("batch", (1, 3, 8))
def test_wpo_weights_match_reference_and_carry_no_gradient(batch):
    logits, token_logps, mask = logits_and_targets(batch)
    normaliser = as_f32_exact(ref.token_log_sum_squared_probs(logits))
    weights = wpo_weights(token_logps, normaliser, mask)
    assert_close(weights, ref.wpo_weights(token_logps, normaliser, mask))
    assert float(weights[0]) == 1.0
    grad = jax.grad(lambda t: wpo_weights(t, normaliser, mask).sum())(jnp.asarray(token_logps, jnp.float32))
    assert not np.any(np.asarray(grad))


def test_wpo_weight_of_a_confident_greedy_sequence_is_one():
    logits = np.full((2, 5, VOCAB), -30.0)
    logits[..., 3] = 30.0  # the greedy token has probability ~1
    token_logps = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32))[..., 3]
    weights = wpo_weights(token_logps, token_log_sum_squared_probs(logits), np.ones((2, 5), bool))
    assert_close(weights, np.ones(2))


def test_reductions_work_under_jit_vmap_and_bfloat16():
    token_logps, mask, shared = tokens(3)
    stacked = (
        np.stack([token_logps, token_logps[::-1]]),
        np.stack([mask, mask[::-1]]),
        np.stack([shared, shared[::-1]]),
    )

    def reductions(t, m, s):
        return (
            sequence_logps(t, m, "mean"),
            sequence_logps(t, m, "ld_dpo", ld_alpha=0.3, shared_lengths=s),
            wpo_weights(t, jnp.zeros_like(t), m),
        )

    mapped = jax.jit(jax.vmap(reductions))(*stacked)
    for i in range(2):
        for actual, expected in zip(mapped, reductions(*(x[i] for x in stacked))):
            assert_close(actual[i], expected)
    bf16 = sequence_logps(jnp.asarray(token_logps, jnp.bfloat16), mask, "mean")
    assert bf16.dtype == jnp.float32
    assert_close(
        bf16, ref.sequence_logps(np.asarray(jnp.asarray(token_logps, jnp.bfloat16), np.float64), mask, "mean")
    )


@HYPOTHESIS
@given(
    mask=hnp.arrays(bool, (3, 6)),
    values=hnp.arrays(np.float32, (3, 6), elements=st.floats(-100, 0, width=32)),
    junk=st.sampled_from([np.nan, np.inf, -np.inf, 1e30]),
    reduction=st.sampled_from(["sum", "mean", "ld_dpo"]),
)
def test_masked_positions_never_contribute(mask, values, junk, reduction):
    kwargs = {"ld_alpha": 0.5, "shared_lengths": np.array([0, 2, 6])} if reduction == "ld_dpo" else {}
    clean = sequence_logps(np.where(mask, values, 0.0), mask, reduction, **kwargs)
    dirty = sequence_logps(np.where(mask, values, junk), mask, reduction, **kwargs)
    assert np.array_equal(np.asarray(clean), np.asarray(dirty))
    assert np.all(np.isfinite(np.asarray(dirty)))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda t, m: sequence_logps(t, m, "median"), "`reduction`"),
        (lambda t, m: sequence_logps(t, m, "ld_dpo", shared_lengths=np.ones(3, int)), "`ld_alpha`"),
        (lambda t, m: sequence_logps(t, m, "ld_dpo", ld_alpha=0.5), "`shared_lengths`"),
        (
            lambda t, m: sequence_logps(t, m, "ld_dpo", ld_alpha=1.5, shared_lengths=np.ones(3, int)),
            "`ld_alpha`",
        ),
        (lambda t, m: sequence_logps(t, m[:, :-1]), "`mask`"),
        (lambda t, m: sequence_logps(t[0], m[0]), "`token_logps`"),
        (lambda t, m: wpo_weights(t, t[:, :-1], m), "`token_log_sum_squared_probs`"),
    ],
    ids=[
        "reduction",
        "no-ld_alpha",
        "no-shared_lengths",
        "ld_alpha-range",
        "mask-shape",
        "rank",
        "wpo-shape",
    ],
)
def test_invalid_arguments_are_named(call, match):
    token_logps, mask, _ = tokens(3)
    with pytest.raises(ValueError, match=match):
        call(token_logps, mask)
