"""Decoder options that the Hugging Face parity tests do not reach: remat and compute dtype."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxpref.models import Decoder, DecoderConfig
from jaxpref.models.decoder import (
    _single_sequence_rows,
    attention_implementation,
    attention_mask,
    blocked_causal_attention,
)

CONFIG = DecoderConfig(
    vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2
)
IDS = jnp.arange(16).reshape(2, 8) % 61


def _loss_and_grads(config):
    model = Decoder(config, rngs=nnx.Rngs(0))

    def loss(model):
        return jnp.mean(model.logits(model(IDS)) ** 2)

    return nnx.value_and_grad(loss)(model)


def test_remat_gives_the_same_loss_and_gradients():
    loss, grads = _loss_and_grads(CONFIG)
    remat_loss, remat_grads = _loss_and_grads(dataclasses.replace(CONFIG, remat=True))
    np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(nnx.state(remat_grads)), jax.tree.leaves(nnx.state(grads)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_bfloat16_compute_with_float32_parameters():
    model = Decoder(dataclasses.replace(CONFIG, dtype=jnp.bfloat16), rngs=nnx.Rngs(0))
    hidden = model(IDS)
    assert hidden.dtype == jnp.bfloat16 and model.embed_tokens.embedding[...].dtype == jnp.float32
    reference = Decoder(CONFIG, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(model.logits(hidden), reference.logits(reference(IDS)), atol=0.1)


def test_attention_mask_segments_prefix_and_window():
    segments = jnp.array([[1, 1, 2, 2, 3, 0]])
    prefix = jnp.array([[0, 0, 1, 1, 1, 0]])
    positions = jnp.array([[0, 1, 2, 3, 2, 0]])
    mask = np.asarray(attention_mask(segments, positions, segments, positions, prefix))[0, 0]
    assert mask[3].tolist() == [True, True, True, True, False, False]  # chosen: prompt + itself
    assert mask[4].tolist() == [True, True, False, False, True, False]  # rejected: prompt, not chosen
    assert not mask[5].any()  # padding sees nothing
    windowed = np.asarray(attention_mask(segments, positions, segments, positions, prefix, sliding_window=2))[
        0, 0
    ]
    assert windowed[3].tolist() == [False, False, True, True, False, False]


def test_attention_implementation_choice_and_single_sequence_layout():
    # Causal query blocks on CPU, cuDNN on a GPU in half precision, XLA's kernel for cached decoding.
    backend = jax.default_backend()
    training = {"cpu": "blocked", "gpu": "cudnn"}.get(backend, "xla")
    assert attention_implementation(CONFIG, jnp.bfloat16, 8, 8) == training
    assert attention_implementation(CONFIG, jnp.float32, 8, 8) == ("blocked" if backend == "cpu" else "xla")
    assert attention_implementation(CONFIG, jnp.float32, 1, 8) == "xla"
    assert (
        attention_implementation(
            dataclasses.replace(CONFIG, attention_implementation="cudnn"), jnp.float32, 1, 8
        )
        == "cudnn"
    )
    with pytest.raises(ValueError, match="attention_implementation"):
        dataclasses.replace(CONFIG, attention_implementation="flash")
    # Rows of one sequence at positions 0.. then padding take cuDNN's mask-free path; packed rows do not.
    single = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0]])
    lengths, ok = _single_sequence_rows(single, jnp.broadcast_to(jnp.arange(4), (2, 4)))
    assert lengths.tolist() == [3, 2] and bool(ok)
    packed = jnp.array([[1, 1, 2, 0], [1, 1, 0, 0]])
    assert not bool(_single_sequence_rows(packed, jnp.array([[0, 1, 0, 0], [0, 1, 0, 0]]))[1])
    shifted = jnp.array([[1, 2, 3, 0], [0, 1, 0, 0]])  # positions not starting at 0
    assert not bool(_single_sequence_rows(single, shifted)[1])
    assert not bool(_single_sequence_rows(jnp.zeros((1, 4), jnp.int32), jnp.zeros((1, 4), jnp.int32))[1])


@pytest.mark.parametrize("num_blocks", [1, 3, 4])
def test_blocked_attention_matches_dense_attention(num_blocks):
    # Shared-prefix rows (prompt | chosen | rejected, then padding), grouped-query heads, blocks that
    # do not divide the length: values and gradients equal jax.nn.dot_product_attention's.
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((2, 10, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((2, 10, 2, 8)), jnp.float32) for _ in range(2))
    segments = jnp.array([[1, 1, 1, 2, 2, 3, 3, 3, 0, 0], [1, 1, 2, 2, 2, 3, 0, 0, 0, 0]])
    prefix = jnp.where(segments > 1, 1, 0)
    positions = jnp.array([[0, 1, 2, 3, 4, 3, 4, 5, 0, 0], [0, 1, 2, 3, 4, 2, 0, 0, 0, 0]])
    visible = attention_mask(segments, positions, segments, positions, prefix) & jnp.tril(
        jnp.ones((10, 10), bool)
    )
    real = (segments != 0)[:, :, None, None]  # padding queries see nothing: their outputs are unused

    def dense(q, k, v):
        return jnp.sum(jnp.where(real, jax.nn.dot_product_attention(q, k, v, mask=visible), 0.0) ** 2)

    def blocked(q, k, v):
        return jnp.sum(jnp.where(real, blocked_causal_attention(q, k, v, visible, num_blocks), 0.0) ** 2)

    np.testing.assert_allclose(blocked(q, k, v), dense(q, k, v), rtol=1e-6)
    for a, b in zip(jax.grad(blocked, (0, 1, 2))(q, k, v), jax.grad(dense, (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_blocked_attention_in_bfloat16_stays_near_float32():
    # The written-out backward pass keeps each input's dtype and rounds like the forward.
    rng = np.random.default_rng(1)
    q32, k32, v32 = (jnp.asarray(rng.standard_normal((2, 12, 4, 8)), jnp.float32) for _ in range(3))
    visible = jnp.broadcast_to(jnp.tril(jnp.ones((12, 12), bool)), (2, 1, 12, 12))

    def loss(q, k, v):
        return jnp.sum(blocked_causal_attention(q, k, v, visible, 3).astype(jnp.float32) ** 2)

    grads32 = jax.grad(loss, (0, 1, 2))(q32, k32, v32)
    grads16 = jax.grad(loss, (0, 1, 2))(*(x.astype(jnp.bfloat16) for x in (q32, k32, v32)))
    for low, high in zip(grads16, grads32):
        assert low.dtype == jnp.bfloat16
        low, high = np.asarray(low, np.float64), np.asarray(high, np.float64)
        assert np.linalg.norm(low - high) / np.linalg.norm(high) < 3e-2


def test_output_rows_are_the_full_pass_rows():
    # The last layer's projection and MLP on the chosen tokens only: the same states, the same
    # gradients (remat on, to cover the checkpointed layer too).
    model = Decoder(dataclasses.replace(CONFIG, remat=True), rngs=nnx.Rngs(0))
    rows = jnp.array([15, 2, 3, 9])

    def full(model):
        return model(IDS).reshape(-1, CONFIG.hidden_size)[rows]

    def selected(model):
        return model(IDS, output_rows=rows)

    np.testing.assert_allclose(selected(model), full(model), rtol=1e-5, atol=1e-6)
    grads = [nnx.state(nnx.grad(lambda m, f=f: jnp.sum(f(m) ** 2))(model)) for f in (full, selected)]
    for a, b in zip(*map(jax.tree.leaves, grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
