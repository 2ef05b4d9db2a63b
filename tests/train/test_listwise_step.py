"""build_step(family="listwise"): K responses per prompt in one prefix-shared row.

With K = 2 the Plackett-Luce list likelihood is DPO, so a listwise step on the pairs laid out as
lists must equal the pairwise DPO step (loss and every gradient). Padding a list with a masked
third response must change nothing, and the cached reference must equal the frozen one.
"""

import math

import jax
import numpy as np
import pytest

from jaxpref.models.packing import prefix_shared_groups
from jaxpref.objectives import objective
from jaxpref.train import build_step, compute_reference_logps

from .helpers import NUM_EXAMPLES, ROW_LENGTH, _tokens, pair_batch, single_device_mesh
from .test_step import DPO, OPTIMIZER, assert_close, first_step, fresh_model

PLACKETT_LUCE = objective("plackett_luce", beta=0.1)


def as_lists(pairs: dict, third: list | None = None) -> dict:
    """The pairs as K = 2 lists (chosen scored higher), or K = 3 with ``third`` responses masked out."""
    rows = pairs["input_ids"].shape[0]
    prompts, responses = [], []
    for row in range(rows):
        ids, segments = pairs["input_ids"][row], pairs["segment_ids"][row]
        prompts.append(ids[segments == 1])
        responses.append([ids[segments == 2], ids[segments == 3]] + ([third[row]] if third else []))
    num_responses = 3 if third else 2
    batch = prefix_shared_groups(prompts, responses, ROW_LENGTH + (8 if third else 0), num_responses=num_responses)
    scores = np.tile(np.array([1.0, 0.0, 0.5][:num_responses], np.float32), (rows, 1))
    mask = np.ones((rows, num_responses), bool)
    mask[:, 2:] = False
    return {**batch._asdict(), "scores": scores, "response_mask": mask, "example_index": pairs["example_index"]}


@pytest.fixture(scope="module")
def pairs():
    return pair_batch(seed=0)


@pytest.fixture(scope="module")
def dpo_result(pairs):
    return first_step(build_step(fresh_model(), DPO, OPTIMIZER, single_device_mesh()), pairs)[1:]


@pytest.fixture(scope="module")
def listwise_step():
    return build_step(fresh_model(), PLACKETT_LUCE, OPTIMIZER, single_device_mesh(), family="listwise")


def test_two_response_lists_train_exactly_like_dpo_pairs(pairs, dpo_result, listwise_step):
    expected_metrics, expected_grads = dpo_result
    lists = as_lists(pairs)
    np.testing.assert_array_equal(lists["input_ids"], pairs["input_ids"])  # the same rows
    _, metrics, grads = first_step(listwise_step, lists)
    np.testing.assert_allclose(metrics["loss"], math.log(2.0), atol=1e-6)
    np.testing.assert_allclose(metrics["loss"], expected_metrics["loss"], atol=1e-6)
    assert_close(grads, expected_grads, atol=1e-5)


def test_a_masked_third_response_changes_nothing(pairs, dpo_result):
    _, expected_grads = dpo_result
    rng = np.random.default_rng(3)
    lists = as_lists(pairs, third=[_tokens(rng, 1, 5) for _ in range(NUM_EXAMPLES)])
    step = build_step(
        fresh_model(), PLACKETT_LUCE, OPTIMIZER, single_device_mesh(), family="listwise", grad_accum_steps=2
    )
    _, metrics, grads = first_step(step, lists)
    np.testing.assert_allclose(metrics["loss"], math.log(2.0), atol=1e-6)
    assert_close(grads, expected_grads, atol=1e-5)


def test_cached_reference_equals_the_frozen_one(pairs, listwise_step):
    lists = as_lists(pairs)
    reference = compute_reference_logps(fresh_model(), [lists], family="listwise", mesh=single_device_mesh())
    assert reference.values["ref_logps"].shape == (NUM_EXAMPLES, 2)
    cached = build_step(
        fresh_model(), PLACKETT_LUCE, OPTIMIZER, single_device_mesh(), family="listwise", reference="cached"
    )
    _, expected_metrics, expected_grads = first_step(listwise_step, lists)
    _, metrics, grads = first_step(cached, reference.attach(lists))
    np.testing.assert_allclose(metrics["loss"], expected_metrics["loss"], atol=1e-6)
    assert_close(grads, expected_grads, atol=1e-6)


def test_lipo_lambda_trains_on_lists(pairs):
    lists = as_lists(pairs)
    step = build_step(fresh_model(), objective("lipo_lambda"), OPTIMIZER, single_device_mesh(), family="listwise")
    state = step.init()
    losses = []
    for _ in range(3):
        state, metrics = step(state, lists)
        losses.append(float(jax.device_get(metrics["loss"])))
    assert losses[-1] < losses[0]
