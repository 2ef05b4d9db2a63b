"""family="token_level": TDPO and token-input pairwise objectives through build_step, against full
logits computed directly; the chunked per-token KL against the full-vocabulary one."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxpref.models.decoder import Decoder
from jaxpref.models.logprobs import sequence_logps_and_kl, token_kl_from_hidden
from jaxpref.models.packing import prefix_shared_pairs
from jaxpref.objectives import (
    Objective,
    objective,
    tdpo2_loss,
    tdpo_token_kl,
    token_log_sum_squared_probs,
    wpo_weights,
)
from jaxpref.train import build_step
from jaxpref.train.batches import packed_batch
from jaxpref.train.families import token_level

from .helpers import CONFIG, NUM_EXAMPLES, ROW_LENGTH, _one_per_row, single_device_mesh

BETA, ALPHA = 1.0, 0.5  # a large beta, so the KL terms move the loss visibly
TDPO = Objective.from_fn(tdpo2_loss, beta=BETA, alpha=ALPHA)
# LD-DPO (the shorter response's length counts fully, the rest by ld_alpha) plus WPO, whose weights
# the step computes from the policy's own token statistics and applies to both terms.
LD_WPO = objective("ld_dpo", beta=BETA, ld_alpha=0.5) + objective("wpo", beta=BETA)
# SGD with momentum and learning rate 1: the first update is exactly -gradient.
OPTIMIZER = optax.sgd(learning_rate=1.0, momentum=0.9)
KL_CHUNK = 24  # fewer than the 8 x 16 row tokens, and not a divisor: padded chunks


def fresh_model() -> Decoder:
    return Decoder(CONFIG, rngs=nnx.Rngs(0))


def assert_close(actual, expected, atol):
    diffs = jax.tree.map(lambda a, e: float(np.max(np.abs(np.asarray(a) - np.asarray(e)))), actual, expected)
    worst = max(jax.tree.leaves(diffs))
    assert worst <= atol, (worst, diffs)
    return worst


@pytest.fixture(scope="module")
def data():
    """A prefix-shared pair batch, the same pairs one sequence per row, a perturbed reference, and the
    2B responses (chosen, then rejected)."""
    rng = np.random.default_rng(0)
    tokens = lambda low, high: rng.integers(1, CONFIG.vocab_size, rng.integers(low, high + 1)).tolist()  # noqa: E731
    prompts = [tokens(2, 6) for _ in range(NUM_EXAMPLES)]
    chosen = [tokens(1, 5) for _ in range(NUM_EXAMPLES)]
    rejected = [tokens(1, 5) for _ in range(NUM_EXAMPLES)]
    batch = dict(prefix_shared_pairs(prompts, chosen, rejected, ROW_LENGTH)._asdict())
    responses = chosen + rejected
    alone = _one_per_row(
        [p + r for p, r in zip(prompts * 2, responses)],
        [[0] * len(p) + [1] * len(r) for p, r in zip(prompts * 2, responses)],
    )
    params = nnx.state(fresh_model(), nnx.Param)
    ref_params = jax.tree.map(
        lambda x: np.asarray(x) + 0.05 * rng.standard_normal(x.shape).astype(np.float32),
        jax.device_get(params),
    )
    return batch, alone, ref_params, responses


def first_step(train_step, batch, ref_params=None):
    """(state, metrics, gradients) of one step from the model's initial weights (and ``ref_params``)."""
    state = train_step.init()
    before = jax.device_get(state.params)
    if ref_params is not None:
        # Copies: the step donates its state, so the host arrays must not back its buffers.
        copies = jax.tree.map(np.copy, ref_params)
        state = state.replace(ref_params=jax.device_put(copies, train_step.state_shardings.ref_params))
    state, metrics = train_step(state, batch)
    grads = jax.tree.map(lambda b, a: b - a, before, jax.device_get(state.params))
    return state, jax.device_get(metrics), grads


@pytest.fixture(scope="module")
def tdpo_step(data):
    batch, _, ref_params, _ = data
    train_step = build_step(
        fresh_model(), TDPO, OPTIMIZER, single_device_mesh(), family="token_level", chunk_size=KL_CHUNK
    )
    return first_step(train_step, batch, ref_params)


@pytest.fixture(scope="module")
def naive(data):
    """Batch-mean loss, gradient and metrics of TDPO2 and LD_WPO from full [B, T, V] logits of each
    prompt + response alone in a row (token inputs at the tokens' row positions, not gathered)."""
    _, alone, ref_params, _ = data
    graphdef, params, rest = nnx.split(fresh_model(), nnx.Param, ...)
    layout = {k: alone[k] for k in ("positions", "segment_ids")}
    rows = np.arange(len(alone["input_ids"]))[:, None]
    predictor = np.maximum(alone["predictor_index"], 0)
    counted = (alone["completion_mask"] != 0) & (alone["predictor_index"] >= 0)  # [2B, T]
    halves = lambda x: jnp.split(x, 2)  # noqa: E731

    def logits(params):  # [2B, T, V]: the logits that predict token t, at t
        model = nnx.merge(graphdef, params, rest)
        return model.logits(model(alone["input_ids"], **layout))[rows, predictor]

    def token_inputs(params):
        policy_logits, ref_logits = logits(params), jax.lax.stop_gradient(logits(ref_params))
        target = lambda z: jnp.take_along_axis(  # noqa: E731
            jax.nn.log_softmax(z), alone["input_ids"][..., None], axis=-1
        )[..., 0]
        (pc, pr), (rc, rr), (mc, mr) = map(halves, (target(policy_logits), target(ref_logits), counted))
        inputs = dict(
            policy_chosen_logps=pc, ref_chosen_logps=rc, chosen_mask=mc,
            policy_rejected_logps=pr, ref_rejected_logps=rr, rejected_mask=mr,
        )  # fmt: skip
        weights = wpo_weights(target(policy_logits), token_log_sum_squared_probs(policy_logits), counted)
        return inputs, tdpo_token_kl(policy_logits, ref_logits), weights

    def tdpo(params):
        inputs, kl, _ = token_inputs(params)
        kc, kr = halves(kl)
        losses, metrics = tdpo2_loss(**inputs, chosen_kl=kc, rejected_kl=kr, beta=BETA, alpha=ALPHA)
        return losses.mean(), {k: metrics[k].mean() for k in ("kl/chosen", "kl/rejected", "rewards/margins")}

    def ld_wpo(params):
        inputs, _, weights = token_inputs(params)
        chosen_weights, rejected_weights = halves(weights)
        losses, metrics = LD_WPO(**inputs, chosen_weights=chosen_weights, rejected_weights=rejected_weights)
        return losses.mean(), {k: v.mean() for k, v in metrics.items()}

    losses = {"tdpo": tdpo, "ld_wpo": ld_wpo}
    both = jax.jit(lambda p: {k: jax.value_and_grad(f, has_aux=True)(p) for k, f in losses.items()})
    results = {}
    for name, ((value, metrics), grads) in both(params).items():
        results[name] = float(value), jax.device_get(metrics), jax.device_get(grads)
    return results


@pytest.mark.parametrize("layout", ["prefix_shared", "one_per_row"])
def test_sequence_tokens_gathers_each_response_in_order(data, layout):
    prefix_shared, one_per_row, _, responses = data
    batch = prefix_shared if layout == "prefix_shared" else one_per_row
    packed = packed_batch({k: jnp.asarray(v) for k, v in batch.items() if k != "example_index"})
    mask, (tokens,) = token_level.sequence_tokens(packed, [packed.input_ids])
    assert mask.shape == tokens.shape == (2 * NUM_EXAMPLES, ROW_LENGTH)
    for i, response in enumerate(responses):
        assert np.asarray(mask[i]).tolist() == [True] * len(response) + [False] * (ROW_LENGTH - len(response))
        assert np.asarray(tokens[i]).tolist() == response + [0] * (ROW_LENGTH - len(response))


def test_tdpo_step_equals_full_logits_tdpo(tdpo_step, naive):
    _, metrics, grads = tdpo_step
    expected_loss, expected_metrics, expected_grads = naive["tdpo"]
    assert expected_metrics["kl/chosen"] > 1e-3 and expected_metrics["kl/rejected"] > 1e-3  # ref != policy
    assert abs(expected_loss - math.log(2.0)) > 1e-2  # the KL and log-ratio terms move the loss
    loss_diff = abs(float(metrics["loss"]) - expected_loss)
    assert loss_diff <= 1e-5, loss_diff
    assert_close({k: metrics[k] for k in expected_metrics}, expected_metrics, atol=1e-5)
    assert_close(grads, expected_grads, atol=1e-5)


def test_tdpo_gradient_accumulation_equals_full_batch(data, tdpo_step):
    batch, _, ref_params, _ = data
    _, expected_metrics, expected_grads = tdpo_step
    train_step = build_step(
        fresh_model(), TDPO, OPTIMIZER, single_device_mesh(), family="token_level",
        chunk_size=KL_CHUNK, grad_accum_steps=2,
    )  # fmt: skip
    _, metrics, grads = first_step(train_step, batch, ref_params)
    assert_close(metrics, expected_metrics, atol=1e-6)
    assert_close(grads, expected_grads, atol=1e-6)


def test_chunked_token_kl_equals_full_logits_kl():
    keys = jax.random.split(jax.random.key(0), 6)
    shape, hidden, vocab = (3, 7), 16, 29  # 21 tokens in chunks of 5: the last one padded
    policy_hidden = jax.random.normal(keys[0], (*shape, hidden))
    ref_hidden = jax.random.normal(keys[1], (*shape, hidden))
    policy_kernel = 0.5 * jax.random.normal(keys[2], (hidden, vocab))
    ref_kernel = 0.5 * jax.random.normal(keys[3], (hidden, vocab))
    targets = jax.random.randint(keys[4], shape, 0, vocab)
    weights = jax.random.normal(keys[5], shape)  # a cotangent that tells the tokens apart

    def chunked(ph, pk, rh, rk):
        kl, policy_logps, ref_logps = token_kl_from_hidden(ph, pk, rh, rk, chunk_size=5, targets=targets)
        return jnp.sum(weights * kl), (kl, policy_logps, ref_logps)

    def full(ph, pk, rh, rk):
        policy_logits, ref_logits = ph @ pk, jax.lax.stop_gradient(rh @ rk)
        kl = tdpo_token_kl(policy_logits, ref_logits)
        pick = lambda z: jnp.take_along_axis(jax.nn.log_softmax(z), targets[..., None], -1)[..., 0]  # noqa: E731
        return jnp.sum(weights * kl), (kl, pick(policy_logits), pick(ref_logits))

    args = (policy_hidden, policy_kernel, ref_hidden, ref_kernel)
    grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))  # noqa: E731
    (_, outputs), grads = grad(chunked)(*args)
    (_, expected_outputs), expected_grads = grad(full)(*args)
    assert float(expected_outputs[0].min()) > 0.05  # the two distributions differ at every token
    assert_close(outputs, expected_outputs, atol=1e-5)
    assert_close(grads[:2], expected_grads[:2], atol=1e-5)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in grads[2:])  # the reference gets no gradient
    alone = token_kl_from_hidden(*args, chunk_size=5)  # without targets: the KL alone
    assert_close(alone, expected_outputs[0], atol=1e-5)


def test_sequence_logps_and_kl_on_gathered_completion_tokens_only(data):
    """max_completion_tokens runs both LM heads on the counted tokens alone: the same outputs, and
    NaN rather than missing tokens when there are more."""
    batch, _, _, _ = data
    policy, reference = fresh_model(), Decoder(CONFIG, rngs=nnx.Rngs(1))
    layout = {k: batch[k] for k in ("positions", "segment_ids", "prefix_segment_ids", "predictor_index")}
    counted = int(((batch["completion_mask"] != 0) & (batch["predictor_index"] >= 0)).sum())

    @jax.jit
    def outputs():  # every token, the counted ones in a buffer with room to spare, and too small a buffer
        return [
            sequence_logps_and_kl(
                policy,
                reference,
                batch["input_ids"],
                batch["completion_mask"],
                **layout,
                chunk_size=KL_CHUNK,
                max_completion_tokens=tokens,
            )
            for tokens in (None, counted + 3, counted - 1)
        ]

    everything, gathered, overflowing = jax.device_get(outputs())
    assert float(everything[2].sum()) > 1e-3  # different models: a KL at every counted token
    assert_close(gathered, everything, atol=1e-6)
    assert all(np.isnan(x).any() for x in overflowing)


def test_ld_dpo_and_wpo_step_equals_full_logits_and_trains_without_the_kl(data, naive, monkeypatch):
    def no_kl(*args, **kwargs):
        raise AssertionError("the KL pass ran for an objective that does not read it")

    monkeypatch.setattr(token_level, "sequence_logps_and_kl", no_kl)
    # Packed rows this time, prompt and response one segment: the prompt tokens must not count.
    _, batch, ref_params, _ = data
    train_step = build_step(fresh_model(), LD_WPO, OPTIMIZER, single_device_mesh(), family="token_level")
    state, metrics, grads = first_step(train_step, batch, ref_params)
    expected_loss, expected_metrics, expected_grads = naive["ld_wpo"]
    loss_diff = abs(float(metrics["loss"]) - expected_loss)
    assert loss_diff <= 1e-5, loss_diff
    assert_close({k: metrics[k] for k in expected_metrics}, expected_metrics, atol=1e-5)
    assert_close(grads, expected_grads, atol=1e-5)
    losses = [float(metrics["loss"])]
    for _ in range(2):
        state, metrics = train_step(state, batch)
        losses.append(float(metrics["loss"]))
    # The first update (SGD at learning rate 1) lowers the loss; momentum 0.9 may overshoot later.
    assert np.all(np.isfinite(losses)) and losses[1] < losses[0], losses


def test_token_level_refuses_what_it_cannot_train():
    model, mesh = fresh_model(), single_device_mesh()
    with pytest.raises(ValueError, match="per-token log-probs"):
        build_step(model, TDPO, OPTIMIZER, mesh, family="token_level", reference="cached")
    with pytest.raises(ValueError, match="not 'none'"):
        build_step(model, TDPO, OPTIMIZER, mesh, family="token_level", reference="none")
    with pytest.raises(ValueError, match="does not read the token-level input"):
        build_step(model, objective("kto"), OPTIMIZER, mesh, family="token_level")
