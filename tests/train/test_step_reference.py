"""The DPO train step against a naive full-logits reference implementation.

``build_step`` computes log-probs on prefix-shared rows (``prompt | chosen | rejected``), through
the blocked attention with its hand-written backward pass (the CPU default, set in the config so
every backend runs it; two query blocks here), a chunked LM head with custom VJPs (several token
chunks; in one case vocabulary slices too) and, in another, ``max_completion_tokens``. The
reference below runs each ``prompt + response`` alone in a right-padded row, with default
positions and no segments, through plain masked-softmax attention
(``attention_implementation="xla"``: ``jax.nn.dot_product_attention``), takes the full
``[rows, seq, vocab]`` logits, ``log_softmax``, gathers the completion tokens and differentiates
with plain autodiff: it shares only the decoder's projections, norms, RoPE and MLP with the step.
Policy and reference weights differ (so the DPO margins are not 0 and the loss is not ln 2), and
the loss, the log-prob metrics and every gradient leaf (the first SGD update at learning rate 1)
must agree to float32 accuracy with a frozen reference, a cached one and gradient accumulation.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxpref.models.decoder import MIN_ATTENTION_BLOCK, Decoder
from jaxpref.models.packing import prefix_shared_pairs
from jaxpref.objectives import objective
from jaxpref.train import build_step, compute_reference_logps

from .helpers import CONFIG, NUM_EXAMPLES, single_device_mesh

BETA = 0.1
ROW_LENGTH = 2 * MIN_ATTENTION_BLOCK  # two query blocks of the blocked attention
CHUNK_SIZE = 96  # LM-head tokens per chunk: several per microbatch, the last one padded
ATOL = 1e-5  # losses, rewards (beta-scaled log-ratios) and gradients
LOGPS_RTOL = 1e-6  # sequence log-prob sums (about -50 to -150: float32 spacing there is 4e-6 to 2e-5)
STEP_CONFIG = dataclasses.replace(CONFIG, attention_implementation="blocked")
NAIVE_CONFIG = dataclasses.replace(CONFIG, attention_implementation="xla")  # plain masked softmax
DPO = objective("sigmoid", beta=BETA)
SGD = optax.sgd(1.0)  # no momentum: the first update is -gradient


def perturbed(params: nnx.State, seed: int, scale: float = 0.1) -> nnx.State:
    """``params`` plus Gaussian noise: logits spread enough for log-probs far from uniform."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, noisy)


@pytest.fixture(scope="module")
def pairs():
    """Token lists (prompts, chosen, rejected) whose rows reach into the second attention block."""
    rng = np.random.default_rng(0)

    def tokens(low: int, high: int) -> list[int]:
        return rng.integers(1, CONFIG.vocab_size, rng.integers(low, high + 1)).tolist()

    prompts = [tokens(30, 55) for _ in range(NUM_EXAMPLES)]
    chosen = [tokens(8, 36) for _ in range(NUM_EXAMPLES)]
    rejected = [tokens(8, 36) for _ in range(NUM_EXAMPLES)]
    return prompts, chosen, rejected


@pytest.fixture(scope="module")
def batch(pairs):
    packed = prefix_shared_pairs(*pairs, ROW_LENGTH)
    assert (packed.segment_ids[:, MIN_ATTENTION_BLOCK:] != 0).sum() > NUM_EXAMPLES  # a real second block
    return {**packed._asdict(), "example_index": np.arange(NUM_EXAMPLES)}


@pytest.fixture(scope="module")
def weights():
    """(policy, reference) parameters: two different perturbations of one initialisation.

    On the host, so each use places fresh copies (the step donates its state's buffers).
    """
    params = nnx.state(Decoder(STEP_CONFIG, rngs=nnx.Rngs(0)), nnx.Param)
    return jax.device_get((perturbed(params, seed=1), perturbed(params, seed=2)))


@pytest.fixture(scope="module")
def expected(pairs, weights):
    """The naive DPO loss, its gradient and the per-sequence log-probs, from full logits."""
    prompts, chosen, rejected = pairs
    # One sequence per row, right-padded: prompt + chosen of every example, then prompt + rejected.
    input_ids = np.zeros((2 * NUM_EXAMPLES, ROW_LENGTH), np.int32)  # [2 * examples, seq]
    completion = np.zeros((2 * NUM_EXAMPLES, ROW_LENGTH), bool)  # [2 * examples, seq]
    for row, (p, r) in enumerate(zip(prompts * 2, chosen + rejected)):
        input_ids[row, : len(p) + len(r)] = p + r
        completion[row, len(p) : len(p) + len(r)] = True
    graphdef = nnx.graphdef(Decoder(NAIVE_CONFIG, rngs=nnx.Rngs(0)))

    def sequence_logps(params):  # [2 * examples]
        model = nnx.merge(graphdef, params)
        # Causal attention over the whole row: real tokens never see the padding after them.
        log_probs = jax.nn.log_softmax(model.logits(model(input_ids)))  # [2 * examples, seq, vocab]
        # Token t is predicted by position t - 1.
        token_logps = jnp.take_along_axis(log_probs[:, :-1], input_ids[:, 1:, None], axis=-1)[..., 0]
        return jnp.where(completion[:, 1:], token_logps, 0.0).sum(axis=-1)

    def dpo(policy_params, ref_params):
        policy_chosen, policy_rejected = jnp.split(sequence_logps(policy_params), 2)
        ref_chosen, ref_rejected = jnp.split(sequence_logps(ref_params), 2)
        margins = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)  # [examples]
        loss = -jax.nn.log_sigmoid(BETA * margins).mean()
        return loss, dict(
            policy_chosen=policy_chosen,
            policy_rejected=policy_rejected,
            ref_chosen=ref_chosen,
            ref_rejected=ref_rejected,
            margins=margins,
        )

    policy, reference = weights
    (loss, logps), grads = jax.jit(jax.value_and_grad(dpo, has_aux=True))(policy, reference)
    # Far from the trivial case: policy != reference, margins of both signs, none at rounding level.
    assert abs(float(loss) - np.log(2.0)) > 0.05
    assert (logps["margins"] > 1).any() and (logps["margins"] < -1).any()
    assert np.abs(logps["margins"]).min() > 1e-2
    return jax.device_get((loss, logps, grads))


def first_update(train_step, batch, policy, reference=None):
    """(metrics, gradients) of one step from ``policy``: SGD at learning rate 1 moves by -gradient."""
    state = train_step.init(policy)
    if reference is not None:
        state = state.replace(ref_params=jax.device_put(reference, train_step.state_shardings.ref_params))
    before = jax.device_get(state.params)
    state, metrics = train_step(state, batch)
    grads = jax.tree.map(lambda b, a: b - a, before, jax.device_get(state.params))
    return jax.device_get(metrics), grads


def check_against_naive(metrics, grads, expected):
    loss, logps, naive_grads = expected
    np.testing.assert_allclose(metrics["loss"], loss, atol=ATOL, rtol=0)
    for side in ("chosen", "rejected"):
        np.testing.assert_allclose(metrics[f"logps/{side}"], logps[f"policy_{side}"].mean(), rtol=LOGPS_RTOL)
        rewards = BETA * (logps[f"policy_{side}"] - logps[f"ref_{side}"])
        np.testing.assert_allclose(metrics[f"rewards/{side}"], rewards.mean(), atol=ATOL, rtol=0)
    assert metrics["rewards/accuracies"] == np.mean(logps["margins"] > 0)
    jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, atol=ATOL, rtol=0), grads, naive_grads)



def test_frozen_reference_step_matches_naive_dpo(batch, weights, expected):
    policy, reference = weights
    train_step = build_step(
        Decoder(STEP_CONFIG, rngs=nnx.Rngs(0)), DPO, SGD, single_device_mesh(), chunk_size=CHUNK_SIZE
    )
    check_against_naive(*first_update(train_step, batch, policy, reference), expected)


def test_cached_reference_step_matches_naive_dpo(batch, weights, expected):
    """Reference log-probs from compute_reference_logps; the LM head reads only completion tokens."""
    policy, reference = weights
    ref_model = Decoder(STEP_CONFIG, rngs=nnx.Rngs(0))
    nnx.update(ref_model, reference)
    cached = compute_reference_logps(ref_model, [batch], mesh=single_device_mesh(), chunk_size=CHUNK_SIZE)
    _, logps, _ = expected
    for side in ("chosen", "rejected"):
        np.testing.assert_allclose(cached.values[f"ref_{side}_logps"], logps[f"ref_{side}"], rtol=LOGPS_RTOL)
    completion_tokens = int(batch["completion_mask"].sum())
    train_step = build_step(
        Decoder(STEP_CONFIG, rngs=nnx.Rngs(0)),
        DPO,
        SGD,
        single_device_mesh(),
        reference="cached",
        chunk_size=CHUNK_SIZE,
        max_completion_tokens=completion_tokens + 5,  # a few fill slots
    )
    check_against_naive(*first_update(train_step, cached.attach(batch), policy), expected)


def test_accumulated_step_matches_naive_dpo(batch, weights, expected):
    """4 microbatches of 2 rows, the LM head also in vocabulary slices (61 = 3 x 16 + 13)."""
    policy, reference = weights
    train_step = build_step(
        Decoder(STEP_CONFIG, rngs=nnx.Rngs(0)),
        DPO,
        SGD,
        single_device_mesh(),
        grad_accum_steps=4,
        chunk_size=CHUNK_SIZE,
        vocab_chunk_size=16,
    )
    check_against_naive(*first_update(train_step, batch, policy, reference), expected)
