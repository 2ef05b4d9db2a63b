"""Shared test machinery: random inputs, calls into the library and into the NumPy references.

Inputs are dicts of NumPy arrays keyed by the library's argument names. Float arrays are float64
holding float32-representable values, so the float32 library and the float64 reference see the
same numbers and differences come from arithmetic only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import settings

from jaxpref.objectives import (
    MULTI_RESPONSE,
    PAIRWISE,
    UNPAIRED,
    multi_response_loss,
    pairwise_loss,
    unpaired_loss,
)

from . import numpy_reference as ref

RTOL, ATOL = 1e-5, 1e-6
GRAD_RTOL = 1e-4
SEQ_LEN = 32  # token-level inputs: up to 2 prompt tokens, up to 30 completion tokens, padding
NUM_RESPONSES = 4
HYPOTHESIS = settings(max_examples=25, deadline=None)

PAIRWISE_NAMES = sorted(PAIRWISE)
UNPAIRED_NAMES = sorted(UNPAIRED)
MULTI_NAMES = sorted(MULTI_RESPONSE)
# Losses that take f_divergence_type (TRL's list: sigmoid, hinge, ipo, exo_pair, robust, discopop,
# sigmoid_norm) plus cdpo, its label-smoothed sigmoid.
F_DIVERGENCE_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "robust", "discopop", "sigmoid_norm", "cdpo")
F_DIVERGENCE_CASES = (
    {"f_divergence_type": "reverse_kl"},
    {"f_divergence_type": "forward_kl"},
    {"f_divergence_type": "js_divergence"},
    {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.5},
    {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 1.0},
)
SOFT_LABEL_LOSSES = ("pointwise_dpo", "ulma")


def family(name: str) -> str:
    if name in PAIRWISE:
        return "pairwise"
    return "unpaired" if name in UNPAIRED else "multi"


def policy_keys(name: str) -> tuple[str, ...]:
    """The policy log-prob inputs gradients are taken with respect to."""
    if family(name) == "pairwise":
        return ("policy_chosen_logps", "policy_rejected_logps")
    return ("policy_logps",)


def as_f32_exact(values) -> np.ndarray:
    return np.asarray(values, np.float32).astype(np.float64)


# ------------------------------------------------------------------------------------------------
# Random inputs.
# ------------------------------------------------------------------------------------------------


def _near(rng, values, spread):
    """Reference log-probs: the policy's plus noise, kept negative."""
    return np.minimum(values + rng.uniform(-spread, spread, values.shape), -0.1)


def token_level_inputs(rng, batch):
    """[batch, SEQ_LEN] token log-probs, NaN outside the completion, and the completion mask."""
    mask = np.zeros((batch, SEQ_LEN), bool)
    for row, (offset, length) in enumerate(zip(rng.integers(0, 3, batch), rng.integers(1, 31, batch))):
        mask[row, offset : offset + length] = True
    policy = rng.uniform(-4.0, -0.01, (batch, SEQ_LEN))
    reference = policy + rng.normal(0.0, 0.2, policy.shape)
    return as_f32_exact(np.where(mask, policy, np.nan)), as_f32_exact(np.where(mask, reference, np.nan)), mask


def pairwise_inputs(name: str, batch: int, rng: np.random.Generator) -> dict:
    if name == "ld_dpo":
        policy_chosen, ref_chosen, chosen_mask = token_level_inputs(rng, batch)
        policy_rejected, ref_rejected, rejected_mask = token_level_inputs(rng, batch)
        return {
            "policy_chosen_logps": policy_chosen,
            "policy_rejected_logps": policy_rejected,
            "ref_chosen_logps": ref_chosen,
            "ref_rejected_logps": ref_rejected,
            "chosen_mask": chosen_mask,
            "rejected_mask": rejected_mask,
        }
    chosen, rejected = rng.uniform(-60.0, -1.0, (2, batch))
    inputs = {
        "policy_chosen_logps": chosen,
        "policy_rejected_logps": rejected,
        "ref_chosen_logps": _near(rng, chosen, 3.0),
        "ref_rejected_logps": _near(rng, rejected, 3.0),
        "chosen_lengths": rng.integers(1, 31, batch).astype(np.float64),
        "rejected_lengths": rng.integers(1, 31, batch).astype(np.float64),
    }
    if name == "mmpo":
        inputs["chosen_quality"], inputs["rejected_quality"] = rng.uniform(1.0, 10.0, (2, batch))
    if name == "wpo":  # unclamped: weights above 1 are allowed
        inputs["chosen_weights"], inputs["rejected_weights"] = rng.uniform(0.2, 1.5, (2, batch))
    return {key: as_f32_exact(value) if value.dtype != bool else value for key, value in inputs.items()}


def unpaired_inputs(name: str, batch: int, rng: np.random.Generator) -> dict:
    policy = rng.uniform(-60.0, -1.0, batch)
    if name in SOFT_LABEL_LOSSES:
        labels = as_f32_exact(np.where(rng.random(batch) < 0.3, rng.integers(0, 2, batch), rng.random(batch)))
    else:
        labels = rng.random(batch) < 0.5
    inputs = {
        "policy_logps": as_f32_exact(policy),
        "ref_logps": as_f32_exact(_near(rng, policy, 3.0)),
        "labels": labels,
    }
    if name == "kto":  # completions of mismatched prompts
        kl_policy = rng.uniform(-60.0, -1.0, batch)
        inputs["policy_kl_logps"] = as_f32_exact(kl_policy)
        inputs["ref_kl_logps"] = as_f32_exact(_near(rng, kl_policy, 3.0))
    return inputs


def multi_inputs(batch: int, rng: np.random.Generator) -> dict:
    """K responses per prompt, at least one valid; masked slots hold finite garbage."""
    shape = (batch, NUM_RESPONSES)
    mask = rng.random(shape) < 0.75
    mask[:, 0] = True
    policy = rng.uniform(-60.0, -1.0, shape)
    return {
        "policy_logps": as_f32_exact(policy),
        "ref_logps": as_f32_exact(_near(rng, policy, 3.0)),
        "scores": as_f32_exact(rng.uniform(1.0, 10.0, shape)),
        "mask": mask,
    }


def make_inputs(name: str, batch: int, seed: int = 0) -> dict:
    rng = np.random.default_rng([seed, batch, sum(map(ord, name))])
    kind = family(name)
    if kind == "pairwise":
        return pairwise_inputs(name, batch, rng)
    if kind == "unpaired":
        return unpaired_inputs(name, batch, rng)
    return multi_inputs(batch, rng)


def swap_chosen_rejected(inputs: dict) -> dict:
    """The same pairs with chosen and rejected exchanged (log-probs, lengths, masks, qualities, weights)."""

    def swapped(key):
        if "chosen" in key:
            return key.replace("chosen", "rejected")
        return key.replace("rejected", "chosen")

    return {swapped(key): value for key, value in inputs.items()}


def stack(batches: list[dict]) -> dict:
    return {key: np.stack([b[key] for b in batches]) for key in batches[0]}


def to_jax(inputs: dict, float_dtype=jnp.float32) -> dict:
    return {
        key: jnp.asarray(value, float_dtype if value.dtype == np.float64 else value.dtype)
        for key, value in inputs.items()
    }


# ------------------------------------------------------------------------------------------------
# Calling the library and the references.
# ------------------------------------------------------------------------------------------------

_ENTRY_POINTS = {"pairwise": pairwise_loss, "unpaired": unpaired_loss, "multi": multi_response_loss}


def call(name: str, inputs: dict, **hparams):
    """The library's (losses, metrics) for ``inputs`` (NumPy or JAX arrays)."""
    return _ENTRY_POINTS[family(name)](name, **inputs, **hparams)


def losses_fn(name: str, **hparams):
    """``inputs dict -> losses``, a pure function to jit, vmap or differentiate."""
    return lambda inputs: call(name, inputs, **hparams)[0]


def reference(name: str, inputs: dict, **hparams) -> np.ndarray:
    return ref.ALL[name](inputs, **hparams)


def constant_hparams(name: str, inputs: dict, hparams: dict) -> dict:
    """Batch statistics the library holds constant under differentiation, for the reference."""
    if name == "bco":
        return {**hparams, "delta": ref.bco_shift(inputs, **hparams)}
    return hparams


def library_grad(name: str, inputs: dict, **hparams) -> dict:
    """jax.grad of the summed losses with respect to the policy log-probs, as float64 NumPy."""
    keys = policy_keys(name)
    jax_inputs = to_jax(inputs)

    def total(policy):
        return losses_fn(name, **hparams)({**jax_inputs, **policy}).sum()

    grads = jax.grad(total)({key: jax_inputs[key] for key in keys})
    return {key: np.asarray(value, np.float64) for key, value in grads.items()}


def numerical_grad(fn, inputs: dict, keys, rel_step: float = 1e-6) -> dict:
    """Central differences of ``fn(inputs).sum()`` (float64) over the finite entries of ``inputs[key]``."""
    grads = {}
    for key in keys:
        values, grad = inputs[key], np.zeros_like(inputs[key])
        for index in zip(*np.nonzero(np.isfinite(values))):
            step = rel_step * max(1.0, abs(values[index]))
            shifted = []
            for sign in (1.0, -1.0):
                moved = values.copy()
                moved[index] += sign * step
                shifted.append(np.sum(fn({**inputs, key: moved})))
            grad[index] = (shifted[0] - shifted[1]) / (2.0 * step)
        grads[key] = grad
    return grads


def finite_difference_grad(name: str, inputs: dict, **hparams) -> dict:
    """Finite-difference gradient of the summed reference losses with respect to the policy log-probs."""
    hparams = constant_hparams(name, inputs, hparams)
    return numerical_grad(lambda x: reference(name, x, **hparams), inputs, policy_keys(name))


def assert_close(actual, expected, rtol=RTOL, atol=ATOL, err_msg=""):
    np.testing.assert_allclose(
        np.asarray(actual, np.float64), np.asarray(expected, np.float64), rtol, atol, err_msg=err_msg
    )


def assert_tree_close(actual, expected, rtol=RTOL, atol=ATOL):
    jax.tree_util.tree_map(lambda a, e: assert_close(a, e, rtol, atol), actual, expected)


def all_finite(tree) -> bool:
    return all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree_util.tree_leaves(tree))


# ------------------------------------------------------------------------------------------------
# Checks shared by every family.
# ------------------------------------------------------------------------------------------------


def assert_grads_close(actual: dict, expected: dict) -> None:
    """float32 gradients against float64 finite differences, atol relative to the largest entry."""
    for key, value in expected.items():
        scale = max(1.0, float(np.max(np.abs(value))))
        assert_close(actual[key], value, rtol=GRAD_RTOL, atol=10 * ATOL * scale, err_msg=key)


def check_grad_matches_finite_differences(name: str, batch: int, **hparams) -> None:
    inputs = make_inputs(name, batch, seed=1)
    assert_grads_close(library_grad(name, inputs, **hparams), finite_difference_grad(name, inputs, **hparams))


def check_jit_and_vmap_match_eager(name: str, **hparams) -> None:
    """jit alone, then jit of vmap over two stacked batches, against eager calls."""
    batches = [make_inputs(name, 3, seed) for seed in (2, 3)]
    eager = [call(name, b, **hparams) for b in batches]

    def fn(inputs):
        return call(name, inputs, **hparams)

    assert_tree_close(jax.jit(fn)(to_jax(batches[0])), eager[0])
    mapped = jax.jit(jax.vmap(fn))(to_jax(stack(batches)))
    assert_tree_close(mapped, jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *eager))


def check_bfloat16_inputs_are_upcast(name: str) -> None:
    """bf16 inputs give finite float32 losses equal to the reference on the bf16-rounded values."""
    inputs = make_inputs(name, 3)
    bf16 = to_jax(inputs, jnp.bfloat16)
    losses, metrics = call(name, bf16)
    assert losses.dtype == jnp.float32 and all_finite((losses, metrics))
    rounded = {
        k: np.asarray(v, np.float64) if v.dtype == jnp.bfloat16 else inputs[k] for k, v in bf16.items()
    }
    assert_close(losses, reference(name, rounded))
