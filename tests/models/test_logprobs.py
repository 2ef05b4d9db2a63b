"""Chunked log-probs equal the full-logits computation, in values and gradients, and never hold
``[tokens, vocab]`` logits."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxpref.models.decoder import Decoder, DecoderConfig
from jaxpref.models.logprobs import completion_logps, sequence_logps, token_logps_from_hidden
from jaxpref.objectives.sequence import token_log_sum_squared_probs

CONFIG = DecoderConfig(
    vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2
)
BATCH, SEQ = 2, 20
ATOL, RTOL = 1e-5, 1e-4


def naive_outputs(hidden, unembedding, targets):
    """Log-probs, log sum p^2 and entropy from full float32 logits."""
    logits = jnp.einsum("...e,ev->...v", hidden, unembedding, preferred_element_type=jnp.float32)
    log_probs = jax.nn.log_softmax(logits)
    token = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    entropy = -(jnp.exp(log_probs) * log_probs).sum(-1)
    return token, token_log_sum_squared_probs(logits), entropy


def assert_trees_close(actual, expected):
    jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, atol=ATOL, rtol=RTOL), actual, expected)


@pytest.fixture(scope="module")
def setup():
    """A tiny decoder, a batch, and the full-logits log-probs with their parameter gradients.

    Chunked variants are differentiated w.r.t. (hidden, unembedding) and pulled back through the
    decoder's VJP, compiled once: the same parameter gradients, without compiling the decoder's
    backward pass per variant (XLA compile time dominates on CPU).
    """
    graphdef, state = nnx.split(Decoder(CONFIG, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    input_ids = rng.integers(0, CONFIG.vocab_size, (BATCH, SEQ)).astype(np.int32)
    # Row 0: prompt 0..4, completion 5..16, padding 17..; row 1: prompt 0..7, completion 8..19.
    segment_ids = np.array([[1] * 17 + [0] * 3, [1] * SEQ], np.int32)
    completion_mask = np.zeros((BATCH, SEQ), np.int32)
    completion_mask[0, 5:17] = 1
    completion_mask[1, 8:] = 1
    weights = rng.normal(size=(BATCH, SEQ)).astype(np.float32)  # so every token's gradient matters

    def forward(state):
        model = nnx.merge(graphdef, state)
        return model(input_ids, segment_ids=segment_ids), model.unembedding()

    def naive_loss(state):
        hidden, unembedding = forward(state)
        token, *_ = naive_outputs(hidden[:, :-1], unembedding, input_ids[:, 1:])
        token = jnp.pad(token, ((0, 0), (1, 0)))  # the log-prob of token t sits at position t
        token = jnp.where(completion_mask != 0, token, 0.0)
        return (weights * token).sum(), (token, token.sum(-1))

    (_, expected), expected_grads = jax.jit(jax.value_and_grad(naive_loss, has_aux=True))(state)
    hidden, unembedding = jax.jit(forward)(state)
    pullback = jax.jit(lambda state, cotangents: jax.vjp(forward, state)[1](cotangents)[0])

    def chunked_value_and_grad(**options):
        """Chunked (token_logps, summed) and the parameter gradient of sum(weights * token_logps)."""

        def head_loss(hidden, unembedding):
            outputs = completion_logps(hidden, unembedding, input_ids, completion_mask, **options)
            return (weights * outputs[0]).sum(), outputs

        head = jax.jit(jax.value_and_grad(head_loss, argnums=(0, 1), has_aux=True))
        (_, outputs), cotangents = head(hidden, unembedding)
        return outputs, pullback(state, cotangents)

    def chunked_sequence_logps(**options):
        """Jitted ``sequence_logps`` on the batch, model in, without gradient."""
        logps_fn = lambda state: sequence_logps(  # noqa: E731
            nnx.merge(graphdef, state), input_ids, completion_mask, segment_ids=segment_ids, **options
        )
        return jax.jit(logps_fn)(state)

    return dict(
        chunked_value_and_grad=chunked_value_and_grad,
        chunked_sequence_logps=chunked_sequence_logps,
        expected=expected,
        expected_grads=expected_grads,
        completion_mask=completion_mask,
    )


@pytest.mark.parametrize(
    "chunk_size, vocab_chunk_size, max_completion_tokens",
    [
        (8, None, None),  # divides the 40 tokens
        (16, None, None),  # does not: padded
        (7, 32, None),  # vocabulary 97 in slices of 32, 32, 32 and 1
        (4096, None, 24),  # one chunk of the 24 completion tokens only
    ],
)
def test_chunked_logps_match_full_logits(setup, chunk_size, vocab_chunk_size, max_completion_tokens):
    (token_logps, summed), grads = setup["chunked_value_and_grad"](
        chunk_size=chunk_size, vocab_chunk_size=vocab_chunk_size, max_completion_tokens=max_completion_tokens
    )
    assert_trees_close((token_logps, summed), setup["expected"])
    assert_trees_close(grads, setup["expected_grads"])
    assert (token_logps[setup["completion_mask"] == 0] == 0).all()


def test_sequence_logps_runs_the_model(setup):
    assert_trees_close(setup["chunked_sequence_logps"](chunk_size=16), setup["expected"])


def test_too_many_completion_tokens_give_nan(setup):
    # 24 completion tokens but a static buffer of 20: NaN rather than silently dropped tokens.
    token_logps, summed = setup["chunked_sequence_logps"](max_completion_tokens=20)
    assert np.isnan(summed).all()
    assert np.isnan(token_logps[setup["completion_mask"] != 0]).all()


@functools.partial(jax.jit, static_argnums=0)  # module level: the naive variant compiles once
def _stats_value_and_grad(outputs_fn, hidden, unembedding, targets):
    """All outputs of ``outputs_fn`` and the gradient of a weighted sum of them."""

    def loss(hidden, unembedding):
        outputs = jax.tree.leaves(outputs_fn(hidden, unembedding, targets))
        return sum(c * x.sum() for c, x in zip((1.0, 0.3, -0.7), outputs)), outputs

    (_, outputs), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(hidden, unembedding)
    return outputs, grads


@pytest.mark.parametrize("chunk_size, vocab_chunk_size", [(5, None), (3, 10)])
def test_token_stats_match_full_logits(chunk_size, vocab_chunk_size):
    keys = jax.random.split(jax.random.key(1), 3)
    args = (
        jax.random.normal(keys[0], (2, 7, 8)),  # hidden
        jax.random.normal(keys[1], (8, 97)),  # unembedding
        jax.random.randint(keys[2], (2, 7), 0, 97),  # targets
    )
    chunked = functools.partial(
        token_logps_from_hidden, chunk_size=chunk_size, vocab_chunk_size=vocab_chunk_size, return_stats=True
    )
    assert_trees_close(_stats_value_and_grad(chunked, *args), _stats_value_and_grad(naive_outputs, *args))


def _largest_intermediate(fn, *args) -> int:
    """Element count of the largest value in ``fn``'s jaxpr, sub-jaxprs (scan, remat, ...) included."""

    def walk(jaxpr):
        sizes = [int(np.prod(v.aval.shape)) for v in jaxpr.invars + jaxpr.outvars if hasattr(v, "aval")]
        for eqn in jaxpr.eqns:
            sizes += [int(np.prod(v.aval.shape)) for v in eqn.outvars]
            for param in eqn.params.values():
                for sub in param if isinstance(param, (tuple, list)) else [param]:
                    sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                    if hasattr(sub, "eqns"):
                        sizes.append(walk(sub))
        return max(sizes, default=0)

    return walk(jax.make_jaxpr(fn)(*args).jaxpr)


def test_backward_never_holds_full_logits():
    tokens, dim, vocab = 48, 8, 97
    hidden = jnp.ones((2, tokens // 2, dim))
    unembedding = jnp.ones((dim, vocab))
    targets = jnp.zeros((2, tokens // 2), jnp.int32)

    def grad_fn(logps_fn):
        return jax.grad(lambda h, w: logps_fn(h, w).sum(), argnums=(0, 1))

    naive = grad_fn(lambda h, w: naive_outputs(h, w, targets)[0])
    half_the_logits = tokens * vocab // 2
    assert _largest_intermediate(naive, hidden, unembedding) >= tokens * vocab  # the probe sees them
    for vocab_chunk_size in (None, 32):  # the custom-VJP path and the checkpointed vocabulary slices
        chunked = grad_fn(
            lambda h, w: token_logps_from_hidden(h, w, targets, chunk_size=8, vocab_chunk_size=vocab_chunk_size)
        )
        assert _largest_intermediate(chunked, hidden, unembedding) < half_the_logits


def _dot_operand_dtypes(fn, *args) -> set[tuple[str, ...]]:
    """The operand dtypes of every matmul in ``fn``'s jaxpr, sub-jaxprs included."""

    def walk(jaxpr):
        found = set()
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                found.add(tuple(str(v.aval.dtype) for v in eqn.invars))
            for param in eqn.params.values():
                for sub in param if isinstance(param, (tuple, list)) else [param]:
                    sub = getattr(sub, "jaxpr", sub)
                    if hasattr(sub, "eqns"):
                        found |= walk(sub)
        return found

    return walk(jax.make_jaxpr(fn)(*args).jaxpr)


@pytest.mark.parametrize("vocab_chunk_size, return_stats", [(None, False), (32, False), (None, True)])
def test_mixed_precision_backward_runs_bfloat16_matmuls(vocab_chunk_size, return_stats):
    """bfloat16 operands: every LM-head matmul, backward included, multiplies bfloat16 by bfloat16
    (a float32 cotangent would promote the backward ones to float32), and the gradients stay
    within bfloat16 rounding of the float32 ones."""
    keys = jax.random.split(jax.random.key(4), 3)
    hidden = jax.random.normal(keys[0], (2, 12, 16))
    unembedding = jax.random.normal(keys[1], (16, 97)) / 4
    targets = jax.random.randint(keys[2], (2, 12), 0, 97)

    def loss(h, w):
        outputs = token_logps_from_hidden(
            h, w, targets, chunk_size=8, vocab_chunk_size=vocab_chunk_size, return_stats=return_stats
        )
        return sum(x.sum() for x in jax.tree.leaves(outputs))

    grad_fn = jax.jit(jax.grad(loss, argnums=(0, 1)))
    low = (hidden.astype(jnp.bfloat16), unembedding.astype(jnp.bfloat16))
    assert _dot_operand_dtypes(jax.grad(loss, argnums=(0, 1)), *low) == {("bfloat16", "bfloat16")}
    for actual, expected in zip(grad_fn(*low), grad_fn(hidden, unembedding)):
        actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
        assert np.linalg.norm(actual - expected) / np.linalg.norm(expected) < 2e-2


def test_completion_logps_uses_predictor_index():
    """Token t is scored from the hidden state at predictor_index[t], not from t - 1."""
    hidden = jax.random.normal(jax.random.key(2), (1, 4, 8))
    unembedding = jax.random.normal(jax.random.key(3), (8, 11))
    input_ids = jnp.array([[1, 2, 3, 4]])
    mask = jnp.array([[0, 1, 1, 1]])
    token_logps, _ = jax.jit(completion_logps)(
        hidden, unembedding, input_ids, mask, predictor_index=jnp.array([[-1, 0, 1, 0]])
    )
    expected = jax.nn.log_softmax(hidden[0] @ unembedding)  # [seq, vocab] by source position
    np.testing.assert_allclose(
        token_logps[0], [0.0, expected[0, 2], expected[1, 3], expected[0, 4]], rtol=1e-6
    )


def test_errors_name_the_argument():
    hidden, unembedding = jnp.zeros((2, 4, 8)), jnp.zeros((8, 11))
    ids = jnp.zeros((2, 4), jnp.int32)
    calls = {
        "chunk_size": lambda: token_logps_from_hidden(hidden, unembedding, ids, chunk_size=0),
        "vocab_chunk_size": lambda: token_logps_from_hidden(hidden, unembedding, ids, vocab_chunk_size=2.5),
        "targets": lambda: token_logps_from_hidden(hidden, unembedding, ids[:, :3]),
        "unembedding": lambda: token_logps_from_hidden(hidden, unembedding[:4], ids),
        "completion_mask": lambda: completion_logps(hidden, unembedding, ids, ids[:1]),
        "predictor_index": lambda: completion_logps(hidden, unembedding, ids, ids, predictor_index=ids[0]),
        "max_completion_tokens": lambda: completion_logps(
            hidden, unembedding, ids, ids, max_completion_tokens=0
        ),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=f"`{name}`"):
            call()
