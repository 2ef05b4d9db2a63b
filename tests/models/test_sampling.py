"""Cached sampling against full forwards without a cache, filtering, EOS handling and compilation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxpref.models.decoder import Decoder, DecoderConfig
from jaxpref.models.sampling import SamplingConfig, filter_logits, generate, generate_jit

MAX_NEW = 8
PROMPT_LEN = 6
# Different lengths in one batch, so left padding and per-row positions are exercised.
PROMPTS = ([3, 14, 15, 92, 65, 35], [27, 18, 28], [42])
GREEDY = SamplingConfig(max_new_tokens=MAX_NEW, temperature=0.0)
SAMPLED = SamplingConfig(max_new_tokens=MAX_NEW, temperature=0.7, top_k=5, top_p=0.9)


def left_pad(rows, length):  # -> ids [batch, length], mask [batch, length]
    ids = np.zeros((len(rows), length), np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        ids[i, length - len(row) :] = row
        mask[i, length - len(row) :] = 1
    return ids, mask


@nnx.jit
def _forward_logits(model, ids):  # [1, seq] -> [1, seq, vocab]
    return model.logits(model(ids))


def full_forward_logits(model, sequence):  # [seq] -> [seq, vocab]: one uncached forward, no prompt padding
    # Right-padding to one length keeps this to one compilation; causal attention makes it invisible.
    ids = np.zeros((1, PROMPT_LEN + MAX_NEW), np.int32)
    ids[0, : len(sequence)] = sequence
    return _forward_logits(model, ids)[0, : len(sequence)]


def completion(out, row):  # the masked-in tokens of one row
    return [int(t) for t in out["tokens"][row, : int(out["lengths"][row])]]


@pytest.fixture(scope="module")
def model():
    config = DecoderConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2
    )
    model = Decoder(config, rngs=nnx.Rngs(0))
    # The 0.02-std init gives almost uniform logits; sharpen them so greedy choices have clear margins
    # (cached and uncached float error cannot flip an argmax) and top-p has mass to cut.
    model.lm_head.kernel[...] = model.lm_head.kernel[...] * 20
    return model


@pytest.fixture(scope="module")
def prompts():
    return left_pad(PROMPTS, PROMPT_LEN)


@pytest.fixture(scope="module")
def greedy(model, prompts):
    return generate(model, *prompts, None, GREEDY)


@pytest.fixture(scope="module")
def sampled(model, prompts):
    return generate(model, *prompts, jax.random.key(0), SAMPLED)


def test_greedy_equals_uncached_argmax(model, greedy):
    for row, prompt in enumerate(PROMPTS):
        sequence = list(prompt)
        for _ in range(MAX_NEW):
            sequence.append(int(jnp.argmax(full_forward_logits(model, sequence)[-1])))
        assert completion(greedy, row) == sequence[len(prompt) :], f"row {row}"
    np.testing.assert_array_equal(greedy["completion_mask"], 1)
    np.testing.assert_array_equal(greedy["lengths"], MAX_NEW)


@pytest.mark.parametrize("run", ["greedy", "sampled"])
def test_logps_are_full_forward_log_softmax(model, run, request):
    """Temperature-1 unfiltered log-probs, even when the tokens were drawn tempered and filtered."""
    out = request.getfixturevalue(run)
    config = GREEDY if run == "greedy" else SAMPLED
    for row, prompt in enumerate(PROMPTS):
        tokens = completion(out, row)
        # Logits at position i predict token i + 1.
        logits = full_forward_logits(model, list(prompt) + tokens)[len(prompt) - 1 : -1]
        expected = jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(tokens)[:, None], axis=1)[:, 0]
        np.testing.assert_allclose(
            out["logps"][row, : len(tokens)], expected, atol=1e-5, err_msg=f"row {row}"
        )
        if config.temperature > 0:
            allowed = filter_logits(logits, config)
            assert jnp.isfinite(allowed[jnp.arange(len(tokens)), jnp.asarray(tokens)]).all(), f"row {row}"


@pytest.mark.parametrize("case", ["rows_stop_apart", "all_stop_at_first_token"])
def test_stops_at_eos_and_rows_finish_independently(model, prompts, greedy, case):
    tokens = np.asarray(greedy["tokens"])

    def lengths_if_stopped_by(eos_ids):  # completion length of each row if `eos_ids` stopped it
        return [next((i + 1 for i, t in enumerate(row) if t in eos_ids), MAX_NEW) for row in tokens]

    if case == "rows_stop_apart":
        # An id greedy decoding emits, chosen so that rows stop at as many different steps as possible,
        # next to an id it never emits (several EOS ids are allowed).
        eos = max(np.unique(tokens), key=lambda t: len(set(lengths_if_stopped_by({t}))))
        unused = next(t for t in range(model.config.vocab_size) if t not in tokens)
        eos_ids = [unused, int(eos)]
    else:  # every row stops at the token drawn from the prefill: the decoding loop never runs
        eos_ids = sorted({int(t) for t in tokens[:, 0]})
    lengths = lengths_if_stopped_by(set(eos_ids))
    assert min(lengths) < MAX_NEW and (case != "rows_stop_apart" or len(set(lengths)) > 1)
    pad = model.config.vocab_size - 1
    out = generate(
        model,
        *prompts,
        None,
        SamplingConfig(MAX_NEW, temperature=0.0, eos_token_id=eos_ids, pad_token_id=pad),
    )
    np.testing.assert_array_equal(out["lengths"], lengths)
    for row, length in enumerate(lengths):
        np.testing.assert_array_equal(out["tokens"][row, :length], tokens[row, :length])
        np.testing.assert_array_equal(out["tokens"][row, length:], pad)
        np.testing.assert_array_equal(out["completion_mask"][row], np.arange(MAX_NEW) < length)
        np.testing.assert_array_equal(out["logps"][row, :length], greedy["logps"][row, :length])
        np.testing.assert_array_equal(out["logps"][row, length:], 0.0)


def test_top_k_1_equals_greedy(model, prompts, greedy):
    out = generate(model, *prompts, jax.random.key(3), SamplingConfig(MAX_NEW, temperature=1.3, top_k=1))
    np.testing.assert_array_equal(out["tokens"], greedy["tokens"])
    np.testing.assert_allclose(out["logps"], greedy["logps"], atol=1e-6)


def test_sampling_is_deterministic_given_rng(model, prompts, sampled):
    again = generate(model, *prompts, jax.random.key(0), SAMPLED)
    other = generate(model, *prompts, jax.random.key(1), SAMPLED)
    np.testing.assert_array_equal(again["tokens"], sampled["tokens"])
    assert not np.array_equal(other["tokens"], sampled["tokens"])


def test_no_recompilation_for_new_prompts_rng_or_weights(model, prompts, sampled):
    compiled = generate_jit._cache_size()
    new_prompts = left_pad([[1, 2], [3, 4, 5, 6, 7, 8], [9, 10, 11]], PROMPT_LEN)
    generate(model, *new_prompts, jax.random.key(7), SAMPLED)
    generate(Decoder(model.config, rngs=nnx.Rngs(1)), *prompts, jax.random.key(8), SAMPLED)
    assert generate_jit._cache_size() == compiled


# Token 1 has probability 0.5, token 3 0.3, token 2 0.15, token 0 0.05; the second row is the same
# distribution reversed, so the kept sets must land on each row's own ids.
PROBS = np.array([0.05, 0.5, 0.15, 0.3])


@pytest.mark.parametrize(
    "temperature, top_k, top_p, kept",
    [
        (1.0, 0, 1.0, {0, 1, 2, 3}),
        (1.0, 0, 0.45, {1}),  # the top token alone already reaches top_p
        (1.0, 0, 0.6, {1, 3}),
        (1.0, 0, 0.83, {1, 3, 2}),
        (1.0, 0, 0.99, {0, 1, 2, 3}),
        (1.0, 2, 1.0, {1, 3}),
        (1.0, 3, 0.83, {1, 3}),  # after top-k the mass is renormalised: 0.5 / 0.95 + 0.3 / 0.95 >= 0.83
        (1.0, 0, 0.7, {1, 3}),
        (2.0, 0, 0.7, {1, 3, 2}),  # a hotter distribution needs more tokens to reach top_p
    ],
)
def test_filter_logits_on_hand_made_distribution(temperature, top_k, top_p, kept):
    logits = jnp.log(jnp.asarray(np.stack([PROBS, PROBS[::-1]]), jnp.float32))  # [2, 4]
    config = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    filtered = filter_logits(logits, config)
    for row, ids in enumerate([sorted(kept), sorted(3 - i for i in kept)]):
        assert set(np.flatnonzero(np.isfinite(filtered[row]))) == set(ids), f"row {row}"
        np.testing.assert_allclose(filtered[row, ids], logits[row, ids] / temperature, rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"eos_token_id": []}, "eos_token_id"),
        ({"eos_token_id": -2}, "eos_token_id"),
        ({"pad_token_id": -1}, "pad_token_id"),
    ],
)
def test_config_errors_name_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        SamplingConfig(**kwargs)


def test_generate_errors_name_the_argument(model, prompts):
    ids, mask = prompts
    with pytest.raises(ValueError, match="prompt_mask"):
        generate(model, ids, mask[:, ::-1], None, GREEDY)  # right-padded
    with pytest.raises(ValueError, match="prompt_mask"):
        generate(model, ids, mask[:, 1:], None, GREEDY)
    with pytest.raises(ValueError, match="prompt_ids"):
        generate(model, ids[0], mask[0], None, GREEDY)
    with pytest.raises(ValueError, match="rng"):
        generate(model, ids, mask, None, SAMPLED)
    with pytest.raises(ValueError, match="eos_token_id"):
        generate(model, ids, mask, None, SamplingConfig(temperature=0.0, eos_token_id=97))
    with pytest.raises(ValueError, match="temperature"):
        filter_logits(jnp.zeros((1, 4)), GREEDY)
