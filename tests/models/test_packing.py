"""Packed and prefix-shared rows give each sequence the log-probs (and gradients) it has alone."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxpref.models.decoder import Decoder, DecoderConfig
from jaxpref.models.logprobs import sequence_logps
from jaxpref.models.packing import PackedBatch, pack_sequences, prefix_shared_pairs, segment_sum

CONFIG = DecoderConfig(
    vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2
)
ROW_LENGTH = 16
ATOL, RTOL = 1e-5, 1e-4

_rng = np.random.default_rng(0)
_tokens = lambda n: _rng.integers(1, CONFIG.vocab_size, n).tolist()  # noqa: E731
# Sequences to pack: (prompt length, completion length).
SEQUENCES = [_tokens(p + c) for p, c in [(4, 10), (3, 6), (2, 5), (1, 4), (1, 2)]]
MASKS = [[0] * p + [1] * c for p, c in [(4, 10), (3, 6), (2, 5), (1, 4), (1, 2)]]
# Pairs: (prompt, chosen, rejected) lengths.
PROMPTS, CHOSEN, REJECTED = zip(
    *[(_tokens(p), _tokens(c), _tokens(r)) for p, c, r in [(4, 5, 2), (2, 3, 6), (5, 1, 4)]]
)


def one_per_row(sequences, masks) -> PackedBatch:
    """The reference layout: each sequence alone in a right-padded row, built without packing code."""
    batch = len(sequences)
    input_ids = np.zeros((batch, ROW_LENGTH), np.int32)
    completion_mask = np.zeros_like(input_ids)
    segment_ids = np.zeros_like(input_ids)
    for i, (tokens, mask) in enumerate(zip(sequences, masks)):
        input_ids[i, : len(tokens)] = tokens
        completion_mask[i, : len(tokens)] = mask
        segment_ids[i, : len(tokens)] = 1
    steps = np.broadcast_to(np.arange(ROW_LENGTH, dtype=np.int32), input_ids.shape)
    rows = np.arange(batch, dtype=np.int32)
    return PackedBatch(
        input_ids, completion_mask, segment_ids, steps, None, steps - 1, rows, np.ones_like(rows)
    )


@pytest.fixture(scope="module")
def value_and_grad():
    """jit: (per-sequence summed log-probs, gradient of sum(weights * sums) w.r.t. the parameters)."""
    graphdef, state = nnx.split(Decoder(CONFIG, rngs=nnx.Rngs(0)))

    def loss(state, batch: PackedBatch, weights):
        model = nnx.merge(graphdef, state)
        token_logps, _ = sequence_logps(
            model, batch.input_ids, batch.completion_mask, **batch.layout(), chunk_size=16
        )
        sums = batch.sequence_sums(token_logps)
        return (weights * sums).sum(), sums

    grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True))

    def run(batch, weights):
        (_, sums), grads = grad_fn(state, batch, np.asarray(weights, np.float32))
        return sums, grads

    return run


@pytest.fixture(scope="module")
def reference():
    """Every sequence of both tests alone in a row: packed ones, then prompt+chosen, prompt+rejected."""
    pair_rows = [p + c for p, c in zip(PROMPTS, CHOSEN)] + [p + r for p, r in zip(PROMPTS, REJECTED)]
    pair_masks = [[0] * len(p) + [1] * len(c) for p, c in zip(PROMPTS * 2, CHOSEN + REJECTED)]
    return one_per_row(SEQUENCES + pair_rows, MASKS + pair_masks)


def assert_trees_close(actual, expected):
    jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, atol=ATOL, rtol=RTOL), actual, expected)


def test_packed_logps_equal_unpacked(value_and_grad, reference):
    packed = pack_sequences(SEQUENCES, MASKS, ROW_LENGTH)
    assert packed.input_ids.shape == (3, ROW_LENGTH)  # 14 | 9 + 7 | 5 + 3 tokens
    weights = np.linspace(-1.0, 1.0, len(SEQUENCES))
    sums, grads = value_and_grad(packed, weights)
    # The same weights on the packed sequences' reference rows, zero on the pair rows.
    expected_sums, expected_grads = value_and_grad(reference, np.pad(weights, (0, 2 * len(PROMPTS))))
    assert_trees_close(sums, expected_sums[: len(SEQUENCES)])
    assert_trees_close(grads, expected_grads)


def test_prefix_shared_logps_equal_separate_rows(value_and_grad, reference):
    shared = prefix_shared_pairs(PROMPTS, CHOSEN, REJECTED, ROW_LENGTH)
    weights = np.array([0.5, -1.0, 2.0, 1.5, -0.3, 0.7])  # chosen, then rejected
    sums, grads = value_and_grad(shared, weights)
    expected_sums, expected_grads = value_and_grad(reference, np.pad(weights, (len(SEQUENCES), 0)))
    assert_trees_close(sums, expected_sums[len(SEQUENCES) :])
    assert_trees_close(grads, expected_grads)
    chosen_lengths, rejected_lengths = jnp.split(shared.sequence_sums(shared.completion_mask), 2)
    np.testing.assert_array_equal(chosen_lengths, [5, 3, 1])
    np.testing.assert_array_equal(rejected_lengths, [2, 6, 4])


def test_pack_sequences_layout():
    batch = pack_sequences(SEQUENCES, MASKS, ROW_LENGTH, num_rows=4, pad_id=-7)
    assert batch.input_ids.shape == (4, ROW_LENGTH) and batch.prefix_segment_ids is None
    for i, (tokens, mask) in enumerate(zip(SEQUENCES, MASKS)):
        where = batch.segment_ids[batch.sequence_rows[i]] == batch.sequence_segments[i]
        (index,) = np.nonzero(where)
        row = batch.sequence_rows[i]
        np.testing.assert_array_equal(batch.input_ids[row, index], tokens)
        np.testing.assert_array_equal(batch.completion_mask[row, index], mask)
        np.testing.assert_array_equal(batch.positions[row, index], np.arange(len(tokens)))
        np.testing.assert_array_equal(batch.predictor_index[row, index], np.r_[-1, index[:-1]])
    padding = batch.segment_ids == 0
    assert padding[3].all() and (batch.input_ids[padding] == -7).all()
    assert (batch.predictor_index[padding] == -1).all() and (batch.completion_mask[padding] == 0).all()


def test_prefix_shared_layout():
    batch = prefix_shared_pairs([[1, 2, 3]], [[4, 5]], [[6, 7, 8]], row_length=9)
    np.testing.assert_array_equal(batch.segment_ids, [[1, 1, 1, 2, 2, 3, 3, 3, 0]])
    np.testing.assert_array_equal(batch.prefix_segment_ids, [[0, 0, 0, 1, 1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(batch.positions, [[0, 1, 2, 3, 4, 3, 4, 5, 0]])
    np.testing.assert_array_equal(batch.predictor_index, [[-1, 0, 1, 2, 3, 2, 5, 6, -1]])
    np.testing.assert_array_equal(batch.completion_mask, [[0, 0, 0, 1, 1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(batch.sequence_rows, [0, 0])
    np.testing.assert_array_equal(batch.sequence_segments, [2, 3])


def test_segment_sum():
    values = np.array([[1.0, 2.0, 4.0, np.nan], [8.0, 16.0, 32.0, 64.0]])
    segment_ids = np.array([[1, 1, 2, 0], [1, 2, 2, 2]])
    sums = segment_sum(values, segment_ids, np.array([0, 0, 1, 1]), np.array([1, 2, 1, 2]))
    np.testing.assert_array_equal(sums, [3.0, 4.0, 8.0, 112.0])  # the NaN padding stays out


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: pack_sequences([[1] * 20], [[0] * 20], ROW_LENGTH), "sequences[0]"),
        (lambda: pack_sequences([[1, 2]], [[0, 1], [0]], ROW_LENGTH), "completion_masks"),
        (lambda: pack_sequences([[1, 2]], [[0]], ROW_LENGTH), "completion_masks[0]"),
        (lambda: pack_sequences([[1, 2]], [[1, 1]], ROW_LENGTH), "completion_masks[0][0]"),
        (lambda: pack_sequences([[1] * 9, [2] * 9], [[0] * 9] * 2, ROW_LENGTH, num_rows=1), "num_rows"),
        (lambda: pack_sequences([[1, 2]], [[0, 1]], 0), "row_length"),
        (lambda: prefix_shared_pairs([[1] * 8], [[2] * 5], [[3] * 5], ROW_LENGTH), "row_length"),
        (lambda: prefix_shared_pairs([[]], [[2]], [[3]], ROW_LENGTH), "prompt_ids[0]"),
        (lambda: prefix_shared_pairs([[1]], [[2]], [[3], [4]], ROW_LENGTH), "rejected_ids"),
        (lambda: prefix_shared_pairs([[1]], [[[2]]], [[3]], ROW_LENGTH), "chosen_ids[0]"),
    ],
)
def test_errors_name_the_argument(call, name):
    with pytest.raises(ValueError, match=re.escape(f"`{name}`")):
        call()


def test_one_per_row_keeps_sequence_order():
    batch = pack_sequences(
        [[1, 2, 3], [4, 5], [6, 7, 8, 9]], [[0, 1, 1], [0, 1], [0, 0, 1, 1]], row_length=6, one_per_row=True
    )
    np.testing.assert_array_equal(batch.sequence_rows, [0, 1, 2])
    np.testing.assert_array_equal(batch.sequence_segments, [1, 1, 1])
    np.testing.assert_array_equal(batch.input_ids[2, :4], [6, 7, 8, 9])
