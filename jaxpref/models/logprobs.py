"""Token log-probs from a decoder without materialising the ``[batch, seq, vocab]`` logits.

With a 128k vocabulary, the float32 logits of 4 x 2048 tokens take 4 GiB, and their backward pass
several times that. Here the LM head runs on chunks of ``chunk_size`` tokens (and optionally of
``vocab_chunk_size`` vocabulary entries, combined by an online logsumexp); the backward pass
recomputes a chunk's logits instead of storing them (a custom VJP that keeps each token's logsumexp
for the plain log-probs, :func:`jax.checkpoint` for vocabulary slices and statistics), and feeds
their cotangent to the matmuls in the compute dtype.
One chunk's logits ``[chunk_size, vocab_chunk_size or vocab]`` are alive at a time, forward or
backward: XLA's scratch memory for forward + backward is under 3 chunks of float32 logits plus the
unembedding's gradient (the backward pass holds a chunk's logits and their cotangent together;
vocabulary slices add about two unembedding-sized accumulators).

Two levels:

- :func:`token_logps_from_hidden`: ``log p(targets[i] | hidden[i])`` for aligned hidden states and
  targets, plus (``return_stats``) the per-token :class:`TokenStats` WPO and entropy terms need.
- :func:`sequence_logps` (model in, log-probs out) and :func:`completion_logps` (hidden states in):
  the next-token log-prob of every completion token, placed at the token's own position, and its
  sum per row. A token is predicted by the hidden state of its *predictor* (the previous token of
  its sequence, by default ``t - 1``); packed and prefix-shared rows
  (:mod:`jaxpref.models.packing`) supply their own ``predictor_index``.

>>> import jax.numpy as jnp
>>> hidden = jnp.eye(3)[None]  # [batch=1, seq=3, hidden=3]: token t has state e_t
>>> probs = jnp.array([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.25, 0.25, 0.5]])  # [hidden, vocab]
>>> token_logps_from_hidden(hidden, jnp.log(probs), jnp.array([[0, 0, 2]]), chunk_size=2)
Array([[-0.6931472, -1.3862944, -0.6931472]], dtype=float32)
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array

DEFAULT_CHUNK_SIZE = 1024  # tokens per LM-head chunk: 0.5 GiB of float32 logits at vocab 128k


class TokenStats(NamedTuple):
    """Per-token statistics of the predicted distribution ``p``, from the same chunked pass."""

    log_sum_squared_probs: Array  # [batch, seq] log sum_v p_v^2, WPO's normaliser
    entropy: Array  # [batch, seq] -sum_v p_v log p_v


class _Running(NamedTuple):
    """Online logsumexp state of one chunk of tokens, over the vocabulary seen so far."""

    max: Array  # [chunk] running max logit m (no gradient: the results do not depend on it)
    sum_exp: Array  # [chunk] sum_v exp(z_v - m)
    target: Array  # [chunk] logit of the target token (0 until its vocabulary chunk is seen)
    sum_exp_sq: Array | None  # [chunk] sum_v exp(2 (z_v - m)), with stats only
    sum_exp_logit: Array | None  # [chunk] sum_v exp(z_v - m) z_v, with stats only


def _check_positive_int(name: str, value, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}.")


def _unembedding_cotangents(
    hidden: Array,  # [chunk, hidden]
    kernel: Array,  # [hidden, vocab_slice]
    d_logits: Array,  # [chunk, vocab_slice] float32
) -> tuple[Array, Array]:  # d_hidden [chunk, hidden], d_kernel [hidden, vocab_slice]
    """The two backward matmuls of ``logits = hidden @ kernel``."""
    # The float32 cotangent enters the matmuls in the forward's operand dtype (bfloat16 in mixed
    # precision, as autocast does): left float32, it would promote them to float32 matmuls, at a
    # fraction of the bfloat16 rate and twice the bytes of the largest tensor of the step.
    d_logits = d_logits.astype(jnp.result_type(hidden, kernel))
    d_hidden = jnp.dot(d_logits, kernel.T, preferred_element_type=jnp.float32)
    d_kernel = jnp.dot(hidden.T, d_logits, preferred_element_type=jnp.float32)
    return d_hidden.astype(hidden.dtype), d_kernel.astype(kernel.dtype)


@jax.custom_vjp
def _logits(
    hidden: Array,  # [chunk, hidden]
    kernel: Array,  # [hidden, vocab_slice]
) -> Array:  # [chunk, vocab_slice] float32
    return jnp.dot(hidden, kernel, preferred_element_type=jnp.float32)


_logits.defvjp(
    lambda hidden, kernel: (_logits(hidden, kernel), (hidden, kernel)),
    lambda residuals, d_logits: _unembedding_cotangents(*residuals, d_logits),
)


def _target_logps_and_logsumexp(
    hidden: Array,  # [chunk, hidden]
    kernel: Array,  # [hidden, vocab]
    targets: Array,  # [chunk]
) -> tuple[Array, Array]:  # log p(target) [chunk], logsumexp of the logits [chunk]
    logits = jnp.dot(hidden, kernel, preferred_element_type=jnp.float32)  # [chunk, vocab]
    row_max = logits.max(axis=-1)
    log_sum_exp = row_max + jnp.log(jnp.exp(logits - row_max[:, None]).sum(axis=-1))
    # A one-hot select, not take_along_axis: it fuses into the reductions' pass over the logits.
    target = jnp.where(jnp.arange(kernel.shape[1]) == targets[:, None], logits, 0.0).sum(axis=-1)
    return target - log_sum_exp, log_sum_exp


@jax.custom_vjp
def _target_logps(
    hidden: Array,  # [chunk, hidden]
    kernel: Array,  # [hidden, vocab]
    targets: Array,  # [chunk]
) -> Array:  # [chunk] float32
    """``log softmax(hidden @ kernel)[targets]`` over the whole vocabulary at once.

    Its backward pass keeps only the logsumexp per token from the forward, recomputes the logits
    once, and turns them into ``d_logits = g (onehot - softmax)`` in a single pass: no second
    max/sum over the vocabulary, as plain autodiff under a checkpoint would do.
    """
    return _target_logps_and_logsumexp(hidden, kernel, targets)[0]


def _target_logps_forward(hidden: Array, kernel: Array, targets: Array):
    logps, log_sum_exp = _target_logps_and_logsumexp(hidden, kernel, targets)
    return logps, (hidden, kernel, targets, log_sum_exp)


def _target_logps_backward(residuals, d_logps: Array):
    hidden, kernel, targets, log_sum_exp = residuals
    logits = jnp.dot(hidden, kernel, preferred_element_type=jnp.float32)  # [chunk, vocab]
    is_target = jnp.arange(kernel.shape[1]) == targets[:, None]
    d_logits = d_logps[:, None] * (is_target - jnp.exp(logits - log_sum_exp[:, None]))
    return (*_unembedding_cotangents(hidden, kernel, d_logits), None)


_target_logps.defvjp(_target_logps_forward, _target_logps_backward)


def _vocab_slice_state(
    hidden: Array,  # [chunk, hidden]
    kernel: Array,  # [hidden, vocab_slice]
    targets: Array,  # [chunk], relative to the slice's first vocabulary entry
    with_stats: bool,
) -> _Running:
    logits = _logits(hidden, kernel)  # [chunk, vocab_slice] float32
    row_max = jax.lax.stop_gradient(logits.max(axis=-1))
    exp = jnp.exp(logits - row_max[:, None])
    # A one-hot select, not take_along_axis: its gradient fuses into the logits' gradient instead of
    # scattering into another [chunk, vocab_slice] buffer. Targets outside the slice select nothing.
    is_target = jnp.arange(kernel.shape[1]) == targets[:, None]
    target = jnp.where(is_target, logits, 0.0).sum(axis=-1)
    stats = ((exp * exp).sum(axis=-1), (exp * logits).sum(axis=-1)) if with_stats else (None, None)
    return _Running(row_max, exp.sum(axis=-1), target, *stats)


def _merge(a: _Running, b: _Running) -> _Running:
    """Combines two vocabulary ranges of the same tokens, rescaling both to the larger max."""
    new_max = jnp.maximum(a.max, b.max)
    scale_a, scale_b = jnp.exp(a.max - new_max), jnp.exp(b.max - new_max)
    rescale = lambda x, y, power=1: x * scale_a**power + y * scale_b**power  # noqa: E731
    with_stats = a.sum_exp_sq is not None
    return _Running(
        new_max,
        rescale(a.sum_exp, b.sum_exp),
        a.target + b.target,
        rescale(a.sum_exp_sq, b.sum_exp_sq, 2) if with_stats else None,
        rescale(a.sum_exp_logit, b.sum_exp_logit) if with_stats else None,
    )


def _chunked_token_outputs(
    hidden: Array,  # [tokens, hidden]
    unembedding: Array,  # [hidden, vocab]
    targets: Array,  # [tokens]
    chunk_size: int,
    vocab_chunk_size: int | None,
    with_stats: bool,
) -> tuple[Array, ...]:  # (logps,) or (logps, log_sum_squared_probs, entropy), each [tokens]
    num_tokens, dim = hidden.shape
    vocab = unembedding.shape[1]
    chunk = min(chunk_size, num_tokens)  # one chunk when everything fits: no padding
    num_chunks = -(-num_tokens // chunk)
    token_pad = num_chunks * chunk - num_tokens
    hidden_chunks = jnp.pad(hidden, ((0, token_pad), (0, 0))).reshape(num_chunks, chunk, dim)
    target_chunks = jnp.pad(targets, (0, token_pad)).reshape(num_chunks, chunk)

    # Vocabulary slices: the first one starts the online state, further full slices are scanned
    # (sliced in place, no stacked copy of the unembedding), and a remainder slice gets its own
    # static shape, so no padded logits need masking.
    vocab_chunk = vocab if vocab_chunk_size is None else min(vocab_chunk_size, vocab)
    if vocab_chunk == vocab and not with_stats:
        # The common case has its own backward pass (_target_logps) that keeps only per-token
        # state: no checkpoint, which would run the chunk's forward a second time.
        logps = jax.lax.map(
            lambda chunk_args: _target_logps(chunk_args[0], unembedding, chunk_args[1]),
            (hidden_chunks, target_chunks),
        )  # [num_chunks, chunk]
        return (logps.reshape(-1)[:num_tokens],)
    num_full = vocab // vocab_chunk
    rest_start = num_full * vocab_chunk
    slice_state = functools.partial(_vocab_slice_state, with_stats=with_stats)
    if vocab_chunk < vocab:
        # Checkpointed so that the backward pass keeps only the small running state of each slice
        # and recomputes its [chunk, vocab_chunk] logits. With one slice the chunk's own checkpoint
        # below already bounds memory, and a second one would recompute the logits once more.
        slice_state = jax.checkpoint(slice_state)

    @jax.checkpoint
    def token_chunk(hidden_and_targets) -> tuple[Array, ...]:
        hidden_chunk, target_chunk = hidden_and_targets
        state = slice_state(hidden_chunk, unembedding[:, :vocab_chunk], target_chunk)
        if num_full > 1:

            def step(state: _Running, offset: Array) -> tuple[_Running, None]:
                kernel = jax.lax.dynamic_slice_in_dim(unembedding, offset, vocab_chunk, axis=1)
                return _merge(state, slice_state(hidden_chunk, kernel, target_chunk - offset)), None

            state, _ = jax.lax.scan(step, state, jnp.arange(1, num_full) * vocab_chunk)
        if rest_start < vocab:
            rest = slice_state(hidden_chunk, unembedding[:, rest_start:], target_chunk - rest_start)
            state = _merge(state, rest)
        log_sum_exp = state.max + jnp.log(state.sum_exp)
        outputs = (state.target - log_sum_exp,)
        if with_stats:
            log_sum_squared = jnp.log(state.sum_exp_sq) - 2.0 * jnp.log(state.sum_exp)
            entropy = log_sum_exp - state.sum_exp_logit / state.sum_exp
            outputs += (log_sum_squared, entropy)
        return outputs

    per_chunk = jax.lax.map(token_chunk, (hidden_chunks, target_chunks))  # each [num_chunks, chunk]
    return tuple(x.reshape(-1)[:num_tokens] for x in per_chunk)


def token_logps_from_hidden(
    hidden: Array,  # [batch, seq, hidden] (any leading shape)
    unembedding: Array,  # [hidden, vocab]
    targets: Array,  # [batch, seq] int
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    vocab_chunk_size: int | None = None,
    return_stats: bool = False,
) -> Array | tuple[Array, TokenStats]:  # [batch, seq] float32 (, TokenStats)
    """``log softmax(hidden @ unembedding)[targets]`` per token, in float32, chunk by chunk.

    Tokens (all leading dimensions flattened) go through the LM head ``chunk_size`` at a time; with
    ``vocab_chunk_size`` each chunk also walks the vocabulary in slices, merged by an online
    logsumexp, so the largest logits block is ``[chunk_size, vocab_chunk_size]``. Every chunk is
    rematerialised in the backward pass. Token counts that ``chunk_size`` does not divide are padded
    (the padding dropped); a vocabulary that ``vocab_chunk_size`` does not divide ends with a smaller
    slice.

    With ``return_stats`` it also returns :class:`TokenStats` (``log sum_v p_v^2`` and the entropy)
    from the same pass. They are differentiable, but their gradient holds about two more chunks of
    logits in the backward pass; under ``stop_gradient`` (as in WPO's weights) they cost nothing there.
    """
    hidden, unembedding, targets = jnp.asarray(hidden), jnp.asarray(unembedding), jnp.asarray(targets)
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(
            f"`hidden` has shape {hidden.shape}, so `targets` must have shape {hidden.shape[:-1]}; "
            f"got {targets.shape}."
        )
    if unembedding.ndim != 2 or unembedding.shape[0] != hidden.shape[-1]:
        raise ValueError(
            f"`unembedding` must be [hidden={hidden.shape[-1]}, vocab], got shape {unembedding.shape}."
        )
    _check_positive_int("chunk_size", chunk_size)
    _check_positive_int("vocab_chunk_size", vocab_chunk_size, optional=True)
    if targets.size == 0:
        outputs = (jnp.zeros(targets.shape, jnp.float32),) * (3 if return_stats else 1)
    else:
        flat = _chunked_token_outputs(
            hidden.reshape(-1, hidden.shape[-1]),
            unembedding,
            targets.reshape(-1).astype(jnp.int32),
            chunk_size,
            vocab_chunk_size,
            return_stats,
        )
        outputs = tuple(x.reshape(targets.shape) for x in flat)
    return (outputs[0], TokenStats(*outputs[1:])) if return_stats else outputs[0]


def token_kl_from_hidden(
    policy_hidden: Array,  # [batch, seq, hidden] (any leading shape)
    policy_unembedding: Array,  # [hidden, vocab]
    ref_hidden: Array,  # [batch, seq, ref_hidden] (the same leading shape)
    ref_unembedding: Array,  # [ref_hidden, vocab]
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    targets: Array | None = None,  # [batch, seq] int
) -> Array | tuple[Array, Array, Array]:  # kl [batch, seq] float32 (, policy logps, ref logps)
    r"""Per-token :math:`D_{KL}(\pi_{ref}(\cdot|h_t)\,\|\,\pi_\theta(\cdot|h_t))` over the whole
    vocabulary, chunk by chunk, without the ``[batch, seq, vocab]`` logits of either model.

    ``kl_t = sum_v p_ref(v) (log p_ref(v) - log p_policy(v))`` with ``p = softmax(hidden @
    unembedding)`` of each model: TDPO's direction (:func:`jaxpref.objectives.tdpo_token_kl`, which
    takes full logits). Tokens go through both LM heads ``chunk_size`` at a time; each chunk runs
    under :func:`jax.checkpoint`, so the backward pass too holds one chunk of logits of each model
    at a time (the whole vocabulary: a chunk is ``[chunk_size, vocab]`` per model, so pick
    ``chunk_size`` for two models' logits and their cotangent). Gradient flows to the policy only;
    the reference inputs are under ``stop_gradient``.

    With ``targets`` it also returns ``log p(targets)`` under the policy and the reference from the
    same logits: ``(kl, policy_logps, ref_logps)``, each shaped like ``targets``.
    """
    policy_hidden, policy_unembedding = jnp.asarray(policy_hidden), jnp.asarray(policy_unembedding)
    ref_hidden = jax.lax.stop_gradient(jnp.asarray(ref_hidden))
    ref_unembedding = jax.lax.stop_gradient(jnp.asarray(ref_unembedding))
    shape = policy_hidden.shape[:-1]
    if ref_hidden.shape[:-1] != shape:
        raise ValueError(
            f"`policy_hidden` has shape {policy_hidden.shape} and `ref_hidden` {ref_hidden.shape}: their "
            "leading (token) dimensions must match."
        )
    for name, hidden, kernel in (
        ("policy", policy_hidden, policy_unembedding),
        ("ref", ref_hidden, ref_unembedding),
    ):
        if kernel.ndim != 2 or kernel.shape[0] != hidden.shape[-1]:
            raise ValueError(
                f"`{name}_unembedding` must be [hidden={hidden.shape[-1]}, vocab], got shape {kernel.shape}."
            )
    if policy_unembedding.shape[1] != ref_unembedding.shape[1]:
        raise ValueError(
            f"The policy's vocabulary ({policy_unembedding.shape[1]}) and the reference's "
            f"({ref_unembedding.shape[1]}) differ; the KL needs the same vocabulary."
        )
    if targets is not None:
        targets = jnp.asarray(targets)
        if targets.shape != shape:
            raise ValueError(f"`targets` must have shape {shape} (the hidden states'), got {targets.shape}.")
    _check_positive_int("chunk_size", chunk_size)
    num_tokens = math.prod(shape)
    count = 1 if targets is None else 3
    if num_tokens == 0:
        outputs = (jnp.zeros(shape, jnp.float32),) * count
        return outputs[0] if targets is None else outputs

    chunk = min(chunk_size, num_tokens)
    num_chunks = -(-num_tokens // chunk)
    pad = num_chunks * chunk - num_tokens

    def chunks(x: Array) -> Array:  # [tokens, ...] -> [num_chunks, chunk, ...]; padding is 0
        return jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1)).reshape(num_chunks, chunk, *x.shape[1:])

    flat_targets = (
        jnp.zeros(num_tokens, jnp.int32) if targets is None else targets.reshape(-1).astype(jnp.int32)
    )
    vocab_ids = jnp.arange(policy_unembedding.shape[1])

    @jax.checkpoint
    def token_chunk(args) -> tuple[Array, Array, Array]:
        policy_chunk, ref_chunk, target_chunk = args
        policy_logits = _logits(policy_chunk, policy_unembedding)  # [chunk, vocab] float32
        ref_logits = jnp.dot(ref_chunk, ref_unembedding, preferred_element_type=jnp.float32)
        policy_lse = jax.nn.logsumexp(policy_logits, axis=-1)
        ref_lse = jax.nn.logsumexp(ref_logits, axis=-1)
        ref_probs = jnp.exp(ref_logits - ref_lse[:, None])
        # sum_v p_ref (log p_ref - log p_policy) = sum_v p_ref (z_ref - z_policy) - lse_ref + lse_policy
        kl = jnp.sum(ref_probs * (ref_logits - policy_logits), axis=-1) - ref_lse + policy_lse
        is_target = vocab_ids == target_chunk[:, None]
        policy_logps = jnp.where(is_target, policy_logits, 0.0).sum(axis=-1) - policy_lse
        ref_logps = jnp.where(is_target, ref_logits, 0.0).sum(axis=-1) - ref_lse
        return kl, policy_logps, ref_logps

    outputs = jax.lax.map(
        token_chunk,
        (
            chunks(policy_hidden.reshape(num_tokens, -1)),
            chunks(ref_hidden.reshape(num_tokens, -1)),
            chunks(flat_targets),
        ),
    )
    kl, policy_logps, ref_logps = (x.reshape(-1)[:num_tokens].reshape(shape) for x in outputs)
    return kl if targets is None else (kl, policy_logps, ref_logps)


class _HeadRows(NamedTuple):
    """Which tokens the LM head scores, and from which hidden states."""

    counted: Array  # [batch, seq] bool: completion tokens with a predictor
    selected: Array | None  # [max_completion_tokens] flat indices of counted tokens (None: every token)
    predictors: Array  # [rows] flat index of each scored token's predictor state


def _head_rows(
    input_ids: Array,  # [batch, seq]
    completion_mask: Array,  # [batch, seq]
    predictor_index: Array | None,  # [batch, seq]
    max_completion_tokens: int | None,
) -> _HeadRows:
    """Checks the layout arguments and lays out the tokens the LM head reads."""
    if input_ids.ndim != 2:
        raise ValueError(f"`input_ids` must be [batch, seq], got shape {input_ids.shape}.")
    batch, seq = input_ids.shape
    if completion_mask.shape != (batch, seq):
        raise ValueError(
            f"`completion_mask` has shape {completion_mask.shape} but `input_ids` has shape {(batch, seq)}."
        )
    if predictor_index is None:
        predictor_index = jnp.broadcast_to(jnp.arange(seq) - 1, (batch, seq))
    predictor_index = jnp.asarray(predictor_index)
    if predictor_index.shape != (batch, seq):
        raise ValueError(
            f"`predictor_index` has shape {predictor_index.shape} but `input_ids` has shape {(batch, seq)}."
        )
    _check_positive_int("max_completion_tokens", max_completion_tokens, optional=True)
    counted = (completion_mask != 0) & (predictor_index >= 0)
    # Row of each token's predictor in the flattened [batch * seq, hidden] states.
    source = (jnp.arange(batch)[:, None] * seq + jnp.clip(predictor_index, 0, seq - 1)).reshape(-1)
    if max_completion_tokens is None:
        return _HeadRows(counted, None, source)  # every position; uncounted ones are zeroed later
    (selected,) = jnp.nonzero(counted.reshape(-1), size=max_completion_tokens, fill_value=0)
    return _HeadRows(counted, selected, source[selected])


def _scored_logps(
    predictor_states: Array,  # [rows, hidden]
    unembedding: Array,  # [hidden, vocab]
    input_ids: Array,  # [batch, seq]
    rows: _HeadRows,
    chunk_size: int,
    vocab_chunk_size: int | None,
    return_stats: bool,
):
    """The LM head on the rows' predictor states, scattered back to the tokens' own positions."""
    batch, seq = input_ids.shape
    flat_ids = input_ids.reshape(-1)
    outputs = token_logps_from_hidden(
        predictor_states,
        unembedding,
        flat_ids if rows.selected is None else flat_ids[rows.selected],
        chunk_size=chunk_size,
        vocab_chunk_size=vocab_chunk_size,
        return_stats=return_stats,
    )
    outputs = jax.tree.leaves(outputs)  # logps (, log_sum_squared_probs, entropy), each [rows]
    token_logps, *stats = _placed(outputs, rows, batch, seq)
    summed = token_logps.sum(axis=-1)
    return (token_logps, summed, TokenStats(*stats)) if return_stats else (token_logps, summed)


def _placed(outputs: list[Array], rows: _HeadRows, batch: int, seq: int) -> list[Array]:
    """Per-row LM-head outputs ``[rows]`` at their tokens' own positions ``[batch, seq]``, 0 where
    not counted (NaN everywhere when more tokens counted than ``max_completion_tokens`` rows)."""
    if rows.selected is None:
        outputs = [x.reshape(batch, seq) for x in outputs]
    else:
        # Fill slots (beyond the counted tokens) all point at position 0: add zeros there.
        num_counted = rows.counted.sum()
        filled = jnp.arange(rows.selected.shape[0]) < num_counted
        outputs = [
            jnp.zeros(batch * seq, jnp.float32)
            .at[rows.selected]
            .add(jnp.where(filled, x, 0.0))
            .reshape(batch, seq)
            for x in outputs
        ]
        overflow = num_counted > rows.selected.shape[0]
        outputs = [jnp.where(overflow, jnp.nan, x) for x in outputs]
    return [jnp.where(rows.counted, x, 0.0) for x in outputs]


def completion_logps(
    hidden: Array,  # [batch, seq, hidden]
    unembedding: Array,  # [hidden, vocab]
    input_ids: Array,  # [batch, seq]
    completion_mask: Array,  # [batch, seq]
    *,
    predictor_index: Array | None = None,  # [batch, seq]
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    vocab_chunk_size: int | None = None,
    max_completion_tokens: int | None = None,
    return_stats: bool = False,
) -> tuple[Array, Array] | tuple[Array, Array, TokenStats]:  # [batch, seq], [batch] (, TokenStats)
    """:func:`sequence_logps` from already computed final hidden states.

    ``token_logps[b, t] = log p(input_ids[b, t] | hidden[b, predictor_index[b, t]])`` where
    ``completion_mask[b, t]`` is nonzero and the token has a predictor (``predictor_index >= 0``),
    0 elsewhere. ``predictor_index`` defaults to ``t - 1`` (so ``-1``, no predictor, at ``t = 0``).

    ``max_completion_tokens`` (static) runs the LM head only on the counted tokens, gathered into a
    buffer of that many rows, instead of on all ``batch * seq`` positions: worth it when prompts are
    long. If the batch holds more counted tokens than that, the counted tokens' outputs and the sums
    are NaN rather than silently missing tokens.
    """
    input_ids, completion_mask = jnp.asarray(input_ids), jnp.asarray(completion_mask)
    rows = _head_rows(input_ids, completion_mask, predictor_index, max_completion_tokens)
    batch, seq = input_ids.shape
    if hidden.shape[:2] != (batch, seq) or hidden.ndim != 3:
        raise ValueError(f"`hidden` must be [batch={batch}, seq={seq}, hidden], got shape {hidden.shape}.")
    states = hidden.reshape(batch * seq, -1)[rows.predictors]
    return _scored_logps(states, unembedding, input_ids, rows, chunk_size, vocab_chunk_size, return_stats)


def sequence_logps(
    model: nnx.Module,
    input_ids: Array,  # [batch, seq]
    completion_mask: Array,  # [batch, seq]
    *,
    positions: Array | None = None,  # [batch, seq]
    segment_ids: Array | None = None,  # [batch, seq], 0 = padding
    prefix_segment_ids: Array | None = None,  # [batch, seq]
    predictor_index: Array | None = None,  # [batch, seq], -1 = no predictor
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    vocab_chunk_size: int | None = None,
    max_completion_tokens: int | None = None,
    return_stats: bool = False,
) -> tuple[Array, Array] | tuple[Array, Array, TokenStats]:  # [batch, seq], [batch] (, TokenStats)
    """Next-token log-probs of the completion tokens under ``model`` and their sum per row.

    Convention: ``completion_mask[b, t] = 1`` when token ``t`` is a completion token whose log-prob
    counts. ``token_logps[b, t]`` is the log-prob of token ``t`` itself, predicted from the hidden
    state of ``predictor_index[b, t]`` (default ``t - 1``), so it sits at the token's own position,
    like the mask; it is 0 wherever the mask is 0 and where there is no predictor (``t = 0``, or
    ``predictor_index = -1``). ``summed[b]`` sums row ``b``; for rows holding several sequences
    use :meth:`jaxpref.models.packing.PackedBatch.sequence_sums`.

    ``positions``, ``segment_ids`` and ``prefix_segment_ids`` go to the model (see
    :func:`jaxpref.models.decoder.attention_mask`). Packed rows predict each segment's first token
    from nothing; prefix-shared rows (prompt | chosen | rejected) predict the first rejected token
    from the last prompt token, not the last chosen one: :mod:`jaxpref.models.packing` builds the
    matching ``predictor_index``, and ``PackedBatch.layout()`` gives all four layout arguments.

    ``model`` is a :class:`~jaxpref.models.decoder.Decoder` (or anything with its ``__call__`` and
    ``unembedding()``); the LM head arguments are those of :func:`completion_logps`. With
    ``max_completion_tokens`` the model is asked for the predictor states alone (the decoder's
    ``output_rows``), so its last layer skips the prompt tokens' projection and MLP.
    """
    input_ids, completion_mask = jnp.asarray(input_ids), jnp.asarray(completion_mask)
    rows = _head_rows(input_ids, completion_mask, predictor_index, max_completion_tokens)
    layout = dict(positions=positions, segment_ids=segment_ids, prefix_segment_ids=prefix_segment_ids)
    if rows.selected is None:
        states = model(input_ids, **layout).reshape(input_ids.size, -1)[rows.predictors]
    else:
        states = model(input_ids, **layout, output_rows=rows.predictors)
    return _scored_logps(
        states, model.unembedding(), input_ids, rows, chunk_size, vocab_chunk_size, return_stats
    )


def sequence_logps_and_kl(
    policy: nnx.Module,
    reference: nnx.Module,
    input_ids: Array,  # [batch, seq]
    completion_mask: Array,  # [batch, seq]
    *,
    positions: Array | None = None,  # [batch, seq]
    segment_ids: Array | None = None,  # [batch, seq], 0 = padding
    prefix_segment_ids: Array | None = None,  # [batch, seq]
    predictor_index: Array | None = None,  # [batch, seq], -1 = no predictor
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    max_completion_tokens: int | None = None,
) -> tuple[Array, Array, Array]:  # policy token logps, reference token logps, token KL; [batch, seq] each
    """:func:`sequence_logps` of a policy and its reference, plus each token's KL(reference || policy).

    Every output sits at the completion token's own position and is 0 elsewhere, as the token
    log-probs of :func:`sequence_logps`: ``kl[b, t]`` is the KL between the two models' next-token
    distributions at the state that predicts token ``t`` (:func:`token_kl_from_hidden`, which runs
    both LM heads on the same chunks of ``chunk_size`` tokens). The reference outputs carry no
    gradient. ``max_completion_tokens`` as in :func:`sequence_logps`; the whole vocabulary is
    scored per chunk (no vocabulary slices).
    """
    input_ids, completion_mask = jnp.asarray(input_ids), jnp.asarray(completion_mask)
    rows = _head_rows(input_ids, completion_mask, predictor_index, max_completion_tokens)
    layout = dict(positions=positions, segment_ids=segment_ids, prefix_segment_ids=prefix_segment_ids)

    def states(model: nnx.Module) -> Array:  # [head rows, hidden]
        if rows.selected is None:
            return model(input_ids, **layout).reshape(input_ids.size, -1)[rows.predictors]
        return model(input_ids, **layout, output_rows=rows.predictors)

    flat_ids = input_ids.reshape(-1)
    kl, policy_logps, ref_logps = token_kl_from_hidden(
        states(policy),
        policy.unembedding(),
        states(reference),
        reference.unembedding(),
        chunk_size=chunk_size,
        targets=flat_ids if rows.selected is None else flat_ids[rows.selected],
    )
    policy_logps, ref_logps, kl = _placed([policy_logps, ref_logps, kl], rows, *input_ids.shape)
    return policy_logps, ref_logps, kl
