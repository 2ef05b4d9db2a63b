"""Pairwise objectives against their float64 NumPy references, plus gradients, transforms and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jaxpref.objectives import PAIRWISE, f_divergence_scores, pairwise_loss

from . import numpy_reference as ref
from .helpers import (
    F_DIVERGENCE_CASES,
    F_DIVERGENCE_LOSSES,
    HYPOTHESIS,
    PAIRWISE_NAMES,
    all_finite,
    assert_close,
    call,
    check_bfloat16_inputs_are_upcast,
    check_grad_matches_finite_differences,
    check_jit_and_vmap_match_eager,
    library_grad,
    losses_fn,
    make_inputs,
    reference,
    swap_chosen_rejected,
    to_jax,
)

BATCH_SIZES = (1, 3, 8)

# Non-default hyperparameters per objective (defaults are always tested too).
NON_DEFAULT_HPARAMS = {
    "sigmoid": [{"beta": 0.5}],
    "hinge": [{"beta": 0.05}],
    "ipo": [{"beta": 0.5}],
    "exo_pair": [{"beta": 0.3, "label_smoothing": 0.2}],
    "nca_pair": [{"beta": 0.3}],
    "robust": [{"label_smoothing": 0.2}, {"beta": 0.3, "label_smoothing": 0.45}],
    "bco_pair": [{"beta": 0.3}],
    "sppo_hard": [{"beta": 0.5}],
    "aot": [{"beta": 0.3, "label_smoothing": 0.1}],
    "aot_unpaired": [{"beta": 0.3, "label_smoothing": 0.1}],
    "apo_zero": [{"beta": 0.3}],
    "apo_down": [{"beta": 0.3}],
    "discopop": [{"beta": 0.3, "discopop_tau": 0.5}],
    "sft": [],
    "sigmoid_norm": [{"beta": 2.0}],
    "cdpo": [{"label_smoothing": 0.3}, {"label_smoothing": 0.0}],
    "simpo": [{"beta": 2.5, "gamma": 0.5, "label_smoothing": 0.1}],
    "cpo": [{"beta": 0.2, "cpo_alpha": 0.5, "label_smoothing": 0.1}],
    "alphapo": [{"alpha": 0.0}, {"alpha": -1.0}, {"beta": 1.0, "gamma": 0.5, "alpha": 0.1}],
    "orpo": [{"beta": 0.5}],
    "rdpo": [{"beta": 0.2, "alpha": 0.1}],
    "dpop": [{"beta": 0.3, "dpop_lambda": 5.0}],
    "focal": [{"gamma": 0.5}, {"gamma": 0.0}],
    "mmpo": [{"beta": 0.3, "gamma": 2.2}],
    "slic": [{"delta": 5.0, "nll_weight": 0.5}],
    "ld_dpo": [{"ld_alpha": 0.0}, {"ld_alpha": 1.0}, {"beta": 0.3, "ld_alpha": 0.3}],
    "wpo": [{"beta": 0.3}],
}
CASES = [(name, {}) for name in PAIRWISE_NAMES]
CASES += [(name, hp) for name in PAIRWISE_NAMES for hp in NON_DEFAULT_HPARAMS[name]]
CASES += [(name, {"beta": 0.3, **hp}) for name in F_DIVERGENCE_LOSSES for hp in F_DIVERGENCE_CASES]
REFERENCE_FREE = {"sft", "simpo", "cpo", "alphapo", "orpo", "slic"}


def case_id(case):
    name, hparams = case
    return "-".join([name] + [f"{k}={v}" for k, v in hparams.items()])


def test_every_objective_has_a_reference_and_hyperparameter_cases():
    assert set(PAIRWISE) == set(ref.PAIRWISE) == set(NON_DEFAULT_HPARAMS)
    assert len(PAIRWISE) == 27


@pytest.mark.parametrize("batch", BATCH_SIZES)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_losses_match_reference(case, batch):
    name, hparams = case
    inputs = make_inputs(name, batch)
    losses, _ = call(name, inputs, **hparams)
    assert losses.shape == (batch,) and losses.dtype == jnp.float32
    assert_close(losses, reference(name, inputs, **hparams))


@pytest.mark.parametrize(
    "case", [c for c in CASES if c[0] in F_DIVERGENCE_LOSSES and "f_divergence_type" in c[1]], ids=case_id
)
def test_f_divergence_scores_match_reference(case):
    _, hparams = case
    logratios = np.linspace(-100.0, 100.0, 21)  # reaches the exponent clamp at 40 (EXP_CLAMP)
    expected = ref.f_divergence_scores(
        logratios, hparams["f_divergence_type"], hparams.get("f_alpha_divergence_coef", 0.5)
    )
    actual = f_divergence_scores(
        jnp.asarray(logratios, jnp.float32),
        hparams["f_divergence_type"],
        hparams.get("f_alpha_divergence_coef", 0.5),
    )
    assert_close(actual, expected)


def test_sigmoid_metrics_match_reference():
    inputs = make_inputs("sigmoid", 8)
    # Pair 0 is a tie in implicit reward: accuracy is strict, so it counts 0.
    inputs["policy_rejected_logps"][0] = inputs["policy_chosen_logps"][0]
    inputs["ref_rejected_logps"][0] = inputs["ref_chosen_logps"][0]
    _, metrics = call("sigmoid", inputs, beta=0.25)
    chosen_rewards, rejected_rewards = ref.pairwise_rewards("sigmoid", inputs, 0.25)
    expected = ref.pairwise_metrics(
        chosen_rewards, rejected_rewards, inputs["policy_chosen_logps"], inputs["policy_rejected_logps"]
    )
    assert set(metrics) == set(expected)
    for key, value in expected.items():
        assert_close(metrics[key], value, err_msg=key)
    assert metrics["rewards/accuracies"][0] == 0.0


def _sequence_level(name, inputs):
    """Sequence log-probs for token-level inputs: ld_dpo logs the LD-weighted sums, as TRL."""
    if name != "ld_dpo":
        return inputs
    alpha = PAIRWISE[name].defaults["ld_alpha"]
    summed = {}
    for who in ("policy", "ref"):
        chosen, rejected = ref.ld_pair_logps(
            inputs[f"{who}_chosen_logps"],
            inputs["chosen_mask"],
            inputs[f"{who}_rejected_logps"],
            inputs["rejected_mask"],
            alpha,
        )
        summed[f"{who}_chosen_logps"], summed[f"{who}_rejected_logps"] = chosen, rejected
    return {**inputs, **summed}


@pytest.mark.parametrize("name", PAIRWISE_NAMES)
def test_reward_metrics_follow_documented_convention(name):
    inputs = make_inputs(name, 8)
    _, metrics = call(name, inputs)
    beta = PAIRWISE[name].defaults.get("beta", 1.0)
    sums = _sequence_level(name, inputs)
    chosen, rejected = ref.pairwise_rewards(name, sums, beta)
    expected = ref.pairwise_metrics(
        chosen, rejected, sums["policy_chosen_logps"], sums["policy_rejected_logps"]
    )
    for key, value in expected.items():
        assert_close(metrics[key], value, err_msg=key)


@pytest.mark.parametrize("name", ["sigmoid", "ipo", "sft", "cpo"])
def test_weights_multiply_any_objective_without_gradient(name):
    inputs = make_inputs(name, 3)
    weights = {"chosen_weights": np.array([0.5, 1.0, 1.25]), "rejected_weights": np.array([2.0, 0.25, 1.0])}
    losses, _ = call(name, {**inputs, **weights})
    assert_close(losses, reference(name, inputs) * weights["chosen_weights"] * weights["rejected_weights"])
    weight_grad = jax.grad(lambda w: losses_fn(name)({**to_jax(inputs), **w}).sum())(to_jax(weights))
    assert not any(np.any(np.asarray(g)) for g in weight_grad.values())


def test_ld_dpo_with_alpha_one_is_dpo_on_summed_logps():
    inputs = make_inputs("ld_dpo", 8)
    ld_losses, _ = call("ld_dpo", inputs, ld_alpha=1.0, beta=0.3)
    sums = {
        key: ref.sequence_logps(inputs[key], inputs["chosen_mask" if "chosen" in key else "rejected_mask"])
        for key in ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
    }
    sigmoid_losses, _ = call("sigmoid", sums, beta=0.3)
    assert_close(ld_losses, sigmoid_losses)


# ------------------------------------------------------------------------------------------------
# Gradients, transforms, dtypes.
# ------------------------------------------------------------------------------------------------

GRAD_CASES = [(name, {}, batch) for name in PAIRWISE_NAMES for batch in (3, 8)]
GRAD_CASES += [("sigmoid", hp, 3) for hp in F_DIVERGENCE_CASES[1:]]
GRAD_CASES += [("ipo", hp, 3) for hp in F_DIVERGENCE_CASES[1:4]]
GRAD_CASES += [
    (name, NON_DEFAULT_HPARAMS[name][0], 3) for name in ("robust", "aot", "alphapo", "ld_dpo", "focal")
]


@pytest.mark.parametrize(
    "name,hparams,batch", GRAD_CASES, ids=[f"{case_id(c[:2])}-{c[2]}" for c in GRAD_CASES]
)
def test_grad_matches_finite_differences(name, hparams, batch):
    check_grad_matches_finite_differences(name, batch, **hparams)


@pytest.mark.parametrize("name", PAIRWISE_NAMES)
def test_jit_and_vmap_match_eager(name):
    check_jit_and_vmap_match_eager(name)


@pytest.mark.parametrize("name", PAIRWISE_NAMES)
def test_bfloat16_inputs_are_upcast(name):
    check_bfloat16_inputs_are_upcast(name)


# ------------------------------------------------------------------------------------------------
# Properties.
# ------------------------------------------------------------------------------------------------

logp_arrays = hnp.arrays(np.float64, 3, elements=st.floats(-1e4, 0.0, width=32))


@HYPOTHESIS
@given(
    logps=logp_arrays,
    other=logp_arrays,
    beta=st.floats(1e-3, 100.0),
    f_div=st.sampled_from(F_DIVERGENCE_CASES),
)
def test_sigmoid_is_ln2_when_policy_equals_reference(logps, other, beta, f_div):
    losses, metrics = pairwise_loss(
        "sigmoid",
        policy_chosen_logps=logps,
        policy_rejected_logps=other,
        ref_chosen_logps=logps,
        ref_rejected_logps=other,
        beta=beta,
        **f_div,
    )
    assert_close(losses, np.full(3, np.log(2.0)))
    assert not np.any(metrics["rewards/accuracies"])


@HYPOTHESIS
@given(name=st.sampled_from(PAIRWISE_NAMES), seed=st.integers(0, 2**16), tie=st.booleans())
def test_swapping_chosen_and_rejected_flips_accuracy(name, seed, tie):
    inputs = make_inputs(name, 3, seed)
    if tie:  # identical responses: no strict win either way
        inputs = {**inputs, **{k: v for k, v in swap_chosen_rejected(inputs).items() if "rejected" in k}}
    accuracy = np.asarray(call(name, inputs)[1]["rewards/accuracies"])
    swapped = np.asarray(call(name, swap_chosen_rejected(inputs))[1]["rewards/accuracies"])
    assert np.all(accuracy * swapped == 0)
    assert np.all(swapped[accuracy == 1] == 0)
    if tie:
        assert not np.any(accuracy) and not np.any(swapped)


EXTREME = st.sampled_from([-1e4, 1e4, -1.0, 0.0]) | st.floats(-1e4, 1e4, width=32)
# The f-divergences whose scores grow like e^x: IPO squares them, so they overflowed before the clamp.
IPO_OVERFLOW_CASES = F_DIVERGENCE_CASES[1], F_DIVERGENCE_CASES[3]  # forward_kl, alpha_divergence(0.5)


@st.composite
def extreme_pairwise_inputs(draw):
    name = draw(st.sampled_from(PAIRWISE_NAMES))
    shape = (3, 4) if name == "ld_dpo" else (3,)
    inputs = {
        f"{who}_{side}_logps": draw(hnp.arrays(np.float64, shape, elements=EXTREME))
        for who in ("policy", "ref")
        for side in ("chosen", "rejected")
    }
    for side in ("chosen", "rejected"):
        if name == "ld_dpo":  # zero-length completions included
            inputs[f"{side}_mask"] = draw(hnp.arrays(bool, shape))
        else:
            inputs[f"{side}_lengths"] = draw(hnp.arrays(np.float64, 3, elements=st.integers(0, 30)))
    if name == "mmpo":
        for side in ("chosen", "rejected"):
            inputs[f"{side}_quality"] = draw(hnp.arrays(np.float64, 3, elements=st.floats(-10, 10)))
    if name == "wpo":
        for side in ("chosen", "rejected"):
            inputs[f"{side}_weights"] = draw(hnp.arrays(np.float64, 3, elements=st.floats(0, 2, width=32)))
    hparams = {}
    if name in F_DIVERGENCE_LOSSES:
        hparams = draw(st.sampled_from(F_DIVERGENCE_CASES))
    return name, inputs, hparams


@HYPOTHESIS
@given(case=extreme_pairwise_inputs())
def test_losses_and_grads_finite_at_extreme_logps_and_zero_lengths(case):
    name, inputs, hparams = case
    losses, metrics = call(name, inputs, **hparams)
    assert all_finite((losses, metrics))
    assert all_finite(library_grad(name, inputs, **hparams))


@pytest.mark.parametrize("f_div", IPO_OVERFLOW_CASES, ids=lambda hp: hp["f_divergence_type"])
def test_ipo_f_divergence_stays_finite_at_large_negative_logratio(f_div):
    inputs = {
        "policy_chosen_logps": np.array([-150.0]),
        "ref_chosen_logps": np.array([-50.0]),
        "policy_rejected_logps": np.array([-50.0]),
        "ref_rejected_logps": np.array([-50.0]),
        "chosen_lengths": np.array([10.0]),
        "rejected_lengths": np.array([10.0]),
    }
    losses, _ = call("ipo", inputs, **f_div)
    assert all_finite((losses, library_grad("ipo", inputs, **f_div)))


@pytest.mark.parametrize(
    "name,static,key,value",
    [
        ("sigmoid", {"f_divergence_type": "alpha_divergence"}, "f_alpha_divergence_coef", 1.0),
        ("alphapo", {}, "alpha", 0.0),
    ],
    ids=["alpha_divergence-coef=1", "alphapo-alpha=0"],
)
def test_special_case_hyperparameters_survive_tracing(name, static, key, value):
    inputs = to_jax(make_inputs(name, 3))
    traced = jax.jit(lambda v: call(name, inputs, **static, **{key: v})[0])(value)
    assert_close(traced, call(name, inputs, **static, **{key: value})[0])


# ------------------------------------------------------------------------------------------------
# Errors.
# ------------------------------------------------------------------------------------------------


def _basic_inputs(**overrides):
    inputs = {key: jnp.asarray(value) for key, value in make_inputs("ipo", 3).items()}
    return {**inputs, **overrides}


def test_unknown_name_is_rejected():
    with pytest.raises(ValueError, match="`name`"):
        pairwise_loss("dpo_but_misspelt", **_basic_inputs())


@pytest.mark.parametrize(
    "arg",
    [
        "policy_rejected_logps",
        "ref_chosen_logps",
        "ref_rejected_logps",
        "chosen_lengths",
        "rejected_lengths",
        "chosen_weights",
        "rejected_weights",
    ],
)
def test_mismatched_shape_names_the_argument(arg):
    inputs = _basic_inputs(**{arg: jnp.ones(4)})
    with pytest.raises(ValueError, match=f"`{arg}`"):
        pairwise_loss("ipo", **inputs)


@pytest.mark.parametrize("arg", ["chosen_quality", "rejected_quality"])
def test_mismatched_quality_shape_names_the_argument(arg):
    inputs = make_inputs("mmpo", 3)
    with pytest.raises(ValueError, match=f"`{arg}`"):
        call("mmpo", {**inputs, arg: np.ones(2)})


@pytest.mark.parametrize("name", sorted(set(PAIRWISE_NAMES) - REFERENCE_FREE))
def test_missing_reference_logps_are_named(name):
    inputs = {k: v for k, v in make_inputs(name, 3).items() if not k.startswith("ref_")}
    with pytest.raises(ValueError, match="`ref_chosen_logps`"):
        call(name, inputs)


@pytest.mark.parametrize("missing", ["ref_chosen_logps", "ref_rejected_logps"])
def test_one_missing_reference_input_is_named(missing):
    with pytest.raises(ValueError, match=f"`{missing}`"):
        pairwise_loss("sigmoid", **_basic_inputs(**{missing: None}))


@pytest.mark.parametrize("name", sorted(REFERENCE_FREE))
def test_reference_free_objectives_need_no_reference(name):
    inputs = {k: v for k, v in make_inputs(name, 3).items() if not k.startswith("ref_")}
    assert_close(call(name, inputs)[0], reference(name, inputs))


@pytest.mark.parametrize(
    "name,value",
    [
        ("robust", 0.5),
        ("robust", -0.1),
        ("cdpo", 0.6),
        ("exo_pair", 0.0),
        ("exo_pair", 1.0),
        ("simpo", 0.7),
        ("cpo", -0.2),
    ],
)
def test_label_smoothing_out_of_range_is_named(name, value):
    with pytest.raises(ValueError, match="`label_smoothing`"):
        pairwise_loss(name, **_basic_inputs(), label_smoothing=value)


@pytest.mark.parametrize("name", ["aot", "aot_unpaired"])
@pytest.mark.parametrize("value", [-0.5, 1.5])
def test_aot_label_smoothing_out_of_range_is_named(name, value):
    with pytest.raises(ValueError, match="`label_smoothing`"):
        pairwise_loss(name, **_basic_inputs(), label_smoothing=value)


@pytest.mark.parametrize(
    "name,hparams,match",
    [
        ("sigmoid", {"betta": 0.1}, "betta"),
        (
            "nca_pair",
            {"f_divergence_type": "forward_kl"},
            "f_divergence_type",
        ),  # TRL rejects this combination
        ("sigmoid", {"f_divergence_type": "kl"}, "`f_divergence_type`"),
        ("discopop", {"discopop_tau": 0.0}, "`discopop_tau`"),
    ],
)
def test_bad_hyperparameters_are_named(name, hparams, match):
    with pytest.raises(ValueError, match=match):
        pairwise_loss(name, **_basic_inputs(), **hparams)


@pytest.mark.parametrize("name", ["ipo", "sigmoid_norm", "simpo", "sft", "rdpo"])
def test_missing_lengths_are_named(name):
    inputs = _basic_inputs(chosen_lengths=None, rejected_lengths=None)
    with pytest.raises(ValueError, match="`chosen_lengths`"):
        pairwise_loss(name, **inputs)


def test_token_level_logps_without_mask_are_rejected():
    inputs = make_inputs("ld_dpo", 3)
    with pytest.raises(ValueError, match="`chosen_mask`"):
        call("ld_dpo", {k: v for k, v in inputs.items() if k != "chosen_mask"})


@pytest.mark.parametrize("arg", ["chosen_quality", "rejected_quality"])
def test_mmpo_requires_qualities(arg):
    inputs = {k: v for k, v in make_inputs("mmpo", 3).items() if k != arg}
    with pytest.raises(ValueError, match=f"`{arg}`"):
        call("mmpo", inputs)


def test_wpo_requires_weights():
    with pytest.raises(ValueError, match="`chosen_weights`"):
        pairwise_loss("wpo", **_basic_inputs())
