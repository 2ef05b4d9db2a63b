"""Unpaired (KTO, BCO, ...) and multi-response (NCA, InfoNCA) objectives against NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jaxpref.objectives import (
    MULTI_RESPONSE,
    UNPAIRED,
    BCOState,
    multi_response_loss,
    pairwise_loss,
    unpaired_loss,
)

from . import numpy_reference as ref
from .helpers import (
    HYPOTHESIS,
    MULTI_NAMES,
    SOFT_LABEL_LOSSES,
    UNPAIRED_NAMES,
    all_finite,
    as_f32_exact,
    assert_close,
    call,
    check_bfloat16_inputs_are_upcast,
    check_grad_matches_finite_differences,
    check_jit_and_vmap_match_eager,
    library_grad,
    make_inputs,
    reference,
    to_jax,
)

NAMES = UNPAIRED_NAMES + MULTI_NAMES
PROSPECT_HPARAMS = {"beta": 0.3, "desirable_weight": 1.33, "undesirable_weight": 0.8}
CASES = [(name, {}) for name in NAMES] + [
    ("kto", PROSPECT_HPARAMS),
    ("apo_zero_unpaired", PROSPECT_HPARAMS),
    ("bco", {"beta": 0.3, "bco_state": BCOState(jnp.float32(0.5), jnp.float32(10.0))}),
    ("pointwise_dpo", {"beta": 0.5}),
    ("ulma", {"beta": 0.5}),
    ("nca", {"beta": 0.3, "alpha": 0.5}),
    ("infonca", {"beta": 0.3, "alpha": 0.5}),
    ("infonca", {"alpha": 1e-3}),  # targets close to the argmax of the scores
]


def case_id(case):
    name, hparams = case
    return "-".join([name] + [f"{k}={v}" for k, v in hparams.items() if k != "bco_state"])


def test_every_objective_has_a_reference():
    assert set(UNPAIRED) == set(ref.UNPAIRED) and set(MULTI_RESPONSE) == set(ref.MULTI_RESPONSE)


@pytest.mark.parametrize("batch", (1, 3, 8))
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_losses_match_reference(case, batch):
    name, hparams = case
    inputs = make_inputs(name, batch)
    losses, _ = call(name, inputs, **hparams)
    assert losses.shape == (batch,) and losses.dtype == jnp.float32
    assert_close(losses, reference(name, inputs, **hparams))


@pytest.mark.parametrize("name", UNPAIRED_NAMES)
@pytest.mark.parametrize("labels", [[1, 0, 1, 1, 0], [1, 1, 1, 1, 1]], ids=["mixed", "no-undesirable"])
def test_unpaired_metrics_match_reference(name, labels):
    inputs = {**make_inputs(name, 5), "labels": np.array(labels, bool)}
    _, metrics = call(name, inputs, beta=0.2)
    for key, value in ref.unpaired_metrics(inputs, 0.2).items():
        assert_close(metrics[key], value, err_msg=key)


@pytest.mark.parametrize("name", MULTI_NAMES)
def test_multi_response_metrics_match_reference(name):
    inputs = make_inputs(name, 8)
    _, metrics = call(name, inputs, beta=0.2)
    for key, value in ref.multi_response_metrics(inputs, 0.2).items():
        assert_close(metrics[key], value, err_msg=key)


@pytest.mark.parametrize("name", UNPAIRED_NAMES + MULTI_NAMES)
@pytest.mark.parametrize("batch", (3, 8))
def test_grad_matches_finite_differences(name, batch):
    check_grad_matches_finite_differences(name, batch)


@pytest.mark.parametrize("name", NAMES)
def test_jit_and_vmap_match_eager(name):
    check_jit_and_vmap_match_eager(name)


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_inputs_are_upcast(name):
    check_bfloat16_inputs_are_upcast(name)


# ------------------------------------------------------------------------------------------------
# KTO's reference point and BCO's running mean.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kl_shift", [-2.0, 2.0], ids=["negative-clamped", "positive"])
def test_kto_reference_point_is_clamped_and_has_no_gradient(kl_shift):
    inputs = make_inputs("kto", 8)
    inputs["ref_kl_logps"] = as_f32_exact(inputs["policy_kl_logps"] - kl_shift)
    losses, metrics = call("kto", inputs)
    assert float(metrics["kl"]) == pytest.approx(max(kl_shift, 0.0), rel=1e-5)
    assert_close(losses, reference("kto", inputs))
    kl_grad = jax.grad(lambda kl: call("kto", {**to_jax(inputs), "policy_kl_logps": kl})[0].sum())(
        jnp.asarray(inputs["policy_kl_logps"], jnp.float32)
    )
    assert not np.any(np.asarray(kl_grad))


def test_bco_running_mean_counts_every_reward_seen():
    first, second = make_inputs("bco", 3, seed=4), make_inputs("bco", 8, seed=5)
    _, metrics_1 = call("bco", first, beta=0.2, bco_state=BCOState.init())
    losses_2, metrics_2 = call("bco", second, beta=0.2, bco_state=metrics_1["bco_state"])
    all_rewards = np.concatenate([0.2 * (x["policy_logps"] - x["ref_logps"]) for x in (first, second)])
    mean, count = metrics_2["bco_state"]
    assert float(count) == 11.0
    assert_close(mean, all_rewards.mean())
    assert_close(metrics_2["delta"], all_rewards.mean())
    assert_close(metrics_1["delta"], all_rewards[:3].mean())  # the first batch's delta includes itself
    assert_close(losses_2, ref.bco(second, beta=0.2, delta=all_rewards.mean()))


def test_bco_without_state_starts_fresh():
    inputs = make_inputs("bco", 8)
    assert_close(call("bco", inputs)[0], call("bco", inputs, bco_state=BCOState.init())[0])


# ------------------------------------------------------------------------------------------------
# Multi-response specifics.
# ------------------------------------------------------------------------------------------------


def test_infonca_with_two_responses_and_hard_label_is_dpo():
    inputs = make_inputs("infonca", 8)
    inputs = {**inputs, "mask": np.ones((8, 2), bool), "scores": np.tile([1.0, 0.0], (8, 1))}
    inputs["policy_logps"], inputs["ref_logps"] = inputs["policy_logps"][:, :2], inputs["ref_logps"][:, :2]
    infonca, _ = call("infonca", inputs, beta=0.3, alpha=1e-3)
    dpo, _ = pairwise_loss(
        "sigmoid",
        policy_chosen_logps=inputs["policy_logps"][:, 0],
        policy_rejected_logps=inputs["policy_logps"][:, 1],
        ref_chosen_logps=inputs["ref_logps"][:, 0],
        ref_rejected_logps=inputs["ref_logps"][:, 1],
        beta=0.3,
    )
    assert_close(infonca, dpo)


@pytest.mark.parametrize("name", MULTI_NAMES)
def test_prompt_without_valid_responses_contributes_nothing(name):
    inputs = make_inputs(name, 3)
    inputs["mask"][1] = False
    losses, metrics = call(name, inputs)
    assert all_finite((losses, metrics)) and float(losses[1]) == 0.0
    assert_close(
        np.delete(np.asarray(losses), 1), reference(name, {k: np.delete(v, 1, 0) for k, v in inputs.items()})
    )
    grad = library_grad(name, inputs)["policy_logps"]
    assert np.all(np.isfinite(grad)) and not np.any(grad[1])


# ------------------------------------------------------------------------------------------------
# Properties.
# ------------------------------------------------------------------------------------------------

EXTREME = st.sampled_from([-1e4, 1e4, -1.0, 0.0]) | st.floats(-1e4, 1e4, width=32)


@st.composite
def extreme_inputs(draw):
    name = draw(st.sampled_from(NAMES))
    if name in MULTI_RESPONSE:
        shape = (3, 4)
        inputs = {
            "scores": draw(hnp.arrays(np.float64, shape, elements=st.floats(-10, 10))),
            "mask": draw(hnp.arrays(bool, shape)),
        }
    else:
        shape = (3,)
        labels = st.floats(0, 1, width=32) if name in SOFT_LABEL_LOSSES else st.sampled_from([0.0, 1.0])
        inputs = {"labels": draw(hnp.arrays(np.float64, shape, elements=labels))}
    for key in ("policy_logps", "ref_logps") + (("policy_kl_logps", "ref_kl_logps") if name == "kto" else ()):
        inputs[key] = draw(hnp.arrays(np.float64, shape, elements=EXTREME))
    return name, inputs


@HYPOTHESIS
@given(case=extreme_inputs())
def test_losses_and_grads_finite_at_extreme_logps(case):
    name, inputs = case
    assert all_finite(call(name, inputs))
    assert all_finite(library_grad(name, inputs))


@HYPOTHESIS
@given(name=st.sampled_from(SOFT_LABEL_LOSSES), seed=st.integers(0, 2**16), z=st.floats(0, 1, width=32))
def test_soft_label_losses_interpolate_the_hard_ones(name, seed, z):
    inputs = make_inputs(name, 3, seed)

    def losses(label):
        return np.asarray(call(name, {**inputs, "labels": np.full(3, label)})[0], np.float64)

    assert_close(losses(z), z * losses(1.0) + (1 - z) * losses(0.0), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Errors.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry_point,inputs", [(unpaired_loss, "kto"), (multi_response_loss, "nca")])
def test_unknown_name_is_rejected(entry_point, inputs):
    with pytest.raises(ValueError, match="`name`"):
        entry_point("not_an_objective", **make_inputs(inputs, 3))


@pytest.mark.parametrize(
    "name,arg,value",
    [
        ("pointwise_dpo", "ref_logps", np.zeros(4)),
        ("pointwise_dpo", "labels", np.ones(2)),
        ("kto", "ref_kl_logps", np.zeros(2)),
        ("nca", "ref_logps", np.zeros((3, 3))),
        ("nca", "scores", np.zeros((3, 5))),
        ("nca", "mask", np.ones((2, 4), bool)),
        ("infonca", "policy_logps", np.zeros(3)),  # wrong rank
    ],
)
def test_mismatched_shapes_name_the_argument(name, arg, value):
    with pytest.raises(ValueError, match=f"`{arg}`"):
        call(name, {**make_inputs(name, 3), arg: value})


@pytest.mark.parametrize("name", UNPAIRED_NAMES)
def test_missing_reference_logps_are_named(name):
    inputs = make_inputs(name, 3)
    del inputs["ref_logps"]
    with pytest.raises(ValueError, match="`ref_logps`"):
        call(name, inputs)


@pytest.mark.parametrize(
    "name,update,match",
    [
        ("kto", {"labels": np.array([1.0, 2.0, 0.0])}, "`labels`"),
        ("ulma", {"labels": np.array([0.5, -0.1, 0.0])}, "`labels`"),
        ("kto", {"policy_kl_logps": None}, "`policy_kl_logps`"),
        ("kto", {"betaa": 0.1}, "betaa"),
        ("nca", {"alpha": 0.0}, "`alpha`"),
        ("infonca", {"temperature": 1.0}, "temperature"),
    ],
)
def test_invalid_inputs_are_named(name, update, match):
    with pytest.raises(ValueError, match=match):
        call(name, {**make_inputs(name, 3), **update})
