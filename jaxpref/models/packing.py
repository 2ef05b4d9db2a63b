"""Host-side layout of token sequences into fixed-length rows: packing and prompt sharing.

Run once per batch in the data pipeline, on Python lists of token ids; the result is a
:class:`PackedBatch` of NumPy arrays with fixed shapes (so the jitted step does not recompile),
which is also a pytree that jitted functions accept.

- :func:`pack_sequences` puts several sequences in each row, one segment each (first-fit
  decreasing), to cut padding.
- :func:`prefix_shared_pairs` puts a preference pair in one row, ``prompt | chosen | rejected``,
  so the prompt is computed once for both responses; :func:`prefix_shared_groups` does the same
  for K responses.

Either way ``sequence_logps(model, batch.input_ids, batch.completion_mask, **batch.layout())``
gives token log-probs and ``batch.sequence_sums(token_logps)`` the per-sequence sums.

>>> batch = prefix_shared_pairs([[5, 6]], [[7, 8]], [[9]], row_length=6)
>>> batch.input_ids
array([[5, 6, 7, 8, 9, 0]], dtype=int32)
>>> batch.segment_ids, batch.prefix_segment_ids
(array([[1, 1, 2, 2, 3, 0]], dtype=int32), array([[0, 0, 1, 1, 1, 0]], dtype=int32))
>>> batch.positions, batch.predictor_index  # token 9 follows the prompt, predicted by token 6
(array([[0, 1, 2, 3, 2, 0]], dtype=int32), array([[-1,  0,  1,  2,  1, -1]], dtype=int32))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
TokenIds = Sequence[int] | np.ndarray


class PackedBatch(NamedTuple):
    """Rows of sequences laid out for :func:`jaxpref.models.logprobs.sequence_logps`.

    Sequence ``i`` occupies the tokens of row ``sequence_rows[i]`` whose segment id is
    ``sequence_segments[i]``.
    """

    input_ids: np.ndarray  # [rows, row_length] int32, pad_id on padding
    completion_mask: np.ndarray  # [rows, row_length] int32, 1 on tokens whose log-prob counts
    segment_ids: np.ndarray  # [rows, row_length] int32, 1, 2, ... per row, 0 = padding
    positions: np.ndarray  # [rows, row_length] int32, RoPE positions, 0 at each sequence start
    prefix_segment_ids: np.ndarray | None  # [rows, row_length] int32, segment also attended; None if unused
    predictor_index: np.ndarray  # [rows, row_length] int32, index of the predicting token, -1 = none
    sequence_rows: np.ndarray  # [num_sequences] int32
    sequence_segments: np.ndarray  # [num_sequences] int32

    def layout(self) -> dict[str, np.ndarray | None]:
        """Keyword arguments of ``sequence_logps`` describing the rows."""
        return dict(
            positions=self.positions,
            segment_ids=self.segment_ids,
            prefix_segment_ids=self.prefix_segment_ids,
            predictor_index=self.predictor_index,
        )

    def sequence_sums(self, values: Array) -> Array:  # [rows, row_length] -> [num_sequences]
        """Sums per-token ``values`` (token log-probs, completion mask for lengths) per sequence."""
        return segment_sum(values, self.segment_ids, self.sequence_rows, self.sequence_segments)


def segment_sum(
    values: Array,  # [rows, row_length]
    segment_ids: Array,  # [rows, row_length]
    sequence_rows: Array,  # [num_sequences]
    sequence_segments: Array,  # [num_sequences]
) -> Array:  # [num_sequences]
    """Sum of ``values`` over the tokens of each sequence, given its (row, segment).

    Costs ``num_sequences x row_length``, small next to the model; ``where`` keeps non-finite values
    of other sequences' tokens out.
    """
    values = jnp.asarray(values)
    if values.shape != np.shape(segment_ids):
        raise ValueError(
            f"`values` has shape {values.shape} but `segment_ids` has shape {np.shape(segment_ids)}."
        )
    segment_ids = jnp.asarray(segment_ids)
    sequence_rows, sequence_segments = jnp.asarray(sequence_rows), jnp.asarray(sequence_segments)
    in_sequence = segment_ids[sequence_rows] == sequence_segments[:, None]  # [num_sequences, row_length]
    return jnp.where(in_sequence, values[sequence_rows], 0).sum(axis=-1)


def _empty_rows(rows: int, row_length: int, pad_id: int, with_prefix: bool) -> dict[str, np.ndarray | None]:
    zeros = lambda: np.zeros((rows, row_length), np.int32)  # noqa: E731
    return dict(
        input_ids=np.full((rows, row_length), pad_id, np.int32),
        completion_mask=zeros(),
        segment_ids=zeros(),
        positions=zeros(),
        prefix_segment_ids=zeros() if with_prefix else None,
        predictor_index=np.full((rows, row_length), -1, np.int32),
    )


def _write_segment(
    arrays: dict[str, np.ndarray | None],
    row: int,
    start: int,
    tokens: np.ndarray,
    mask: np.ndarray,
    *,
    segment: int,
    first_position: int = 0,
    first_predictor: int = -1,
    prefix_segment: int = 0,
) -> int:
    """Writes one segment at ``arrays[...][row, start:]`` and returns where it ends.

    Its first token is predicted by ``first_predictor`` (-1: nothing), every later one by the token
    just before it.
    """
    end = start + len(tokens)
    arrays["input_ids"][row, start:end] = tokens
    arrays["completion_mask"][row, start:end] = mask
    arrays["segment_ids"][row, start:end] = segment
    arrays["positions"][row, start:end] = first_position + np.arange(len(tokens))
    arrays["predictor_index"][row, start:end] = np.arange(start - 1, end - 1)
    if end > start:
        arrays["predictor_index"][row, start] = first_predictor
    if prefix_segment:
        arrays["prefix_segment_ids"][row, start:end] = prefix_segment
    return end


def _as_token_lists(name: str, values: Sequence[TokenIds]) -> list[np.ndarray]:
    arrays = []
    for i, value in enumerate(values):
        array = np.asarray(value, np.int64)
        if array.ndim != 1:
            raise ValueError(f"`{name}[{i}]` must be a flat list of ints, got shape {array.shape}.")
        arrays.append(array)
    return arrays


def _check_row_length(row_length: int) -> None:
    if not isinstance(row_length, int) or row_length < 1:
        raise ValueError(f"`row_length` must be a positive int, got {row_length!r}.")


def pack_sequences(
    sequences: Sequence[TokenIds],
    completion_masks: Sequence[TokenIds],
    row_length: int,
    *,
    num_rows: int | None = None,
    pad_id: int = 0,
    one_per_row: bool = False,
) -> PackedBatch:
    """Packs sequences into rows of ``row_length`` tokens, several per row (first-fit decreasing).

    ``one_per_row=True`` puts sequence ``i`` alone in row ``i`` instead: no tokens saved, but the
    row of each example is known, which gradient accumulation's strided microbatches rely on.

    ``completion_masks[i]`` marks the tokens of ``sequences[i]`` whose log-prob counts (1) or not
    (0, e.g. the prompt); its first entry must be 0 since a sequence's first token has no
    prediction. Each sequence becomes a segment (ids 1, 2, ... within its row) with positions from
    0 and its own causal attention. ``num_rows`` fixes the number of rows (a ValueError if they do
    not suffice); by default it is the number needed.

    >>> batch = pack_sequences([[1, 2, 3], [4, 5], [6, 7]], [[0, 1, 1], [0, 1], [0, 1]], row_length=5)
    >>> batch.segment_ids
    array([[1, 1, 1, 2, 2],
           [1, 1, 0, 0, 0]], dtype=int32)
    >>> batch.sequence_rows, batch.sequence_segments
    (array([0, 0, 1], dtype=int32), array([1, 2, 1], dtype=int32))
    """
    _check_row_length(row_length)
    tokens = _as_token_lists("sequences", sequences)
    masks = _as_token_lists("completion_masks", completion_masks)
    if len(masks) != len(tokens):
        raise ValueError(
            f"`completion_masks` has {len(masks)} entries but `sequences` has {len(tokens)}; they must match."
        )
    for i, (seq, mask) in enumerate(zip(tokens, masks)):
        if not 0 < len(seq) <= row_length:
            raise ValueError(
                f"`sequences[{i}]` has {len(seq)} tokens; each needs 1 to `row_length`={row_length}."
            )
        if len(mask) != len(seq):
            raise ValueError(
                f"`completion_masks[{i}]` has {len(mask)} entries but `sequences[{i}]` has {len(seq)} tokens."
            )
        if mask[0]:
            raise ValueError(
                f"`completion_masks[{i}][0]` must be 0: a sequence's first token has no prediction."
            )

    # First-fit decreasing: longest sequences first, each into the first row with room.
    used: list[int] = []  # tokens taken per row
    segments: list[int] = []  # sequences placed per row
    placement = [(0, 0, 0)] * len(tokens)  # (row, start, segment id) per sequence
    if one_per_row:
        placement = [(i, 0, 1) for i in range(len(tokens))]
        used = [len(seq) for seq in tokens]
    for i in [] if one_per_row else sorted(range(len(tokens)), key=lambda i: -len(tokens[i])):
        row = next((r for r, taken in enumerate(used) if taken + len(tokens[i]) <= row_length), len(used))
        if row == len(used):
            used.append(0)
            segments.append(0)
        segments[row] += 1
        placement[i] = (row, used[row], segments[row])
        used[row] += len(tokens[i])
    if num_rows is not None and len(used) > num_rows:
        raise ValueError(
            f"The sequences need {len(used)} rows of `row_length`={row_length} tokens, "
            f"more than `num_rows`={num_rows}."
        )

    arrays = _empty_rows(num_rows or len(used), row_length, pad_id, with_prefix=False)
    sequence_rows = np.zeros(len(tokens), np.int32)
    sequence_segments = np.zeros(len(tokens), np.int32)
    for i, (row, start, segment) in enumerate(placement):
        _write_segment(arrays, row, start, tokens[i], masks[i], segment=segment)
        sequence_rows[i], sequence_segments[i] = row, segment
    return PackedBatch(**arrays, sequence_rows=sequence_rows, sequence_segments=sequence_segments)


def prefix_shared_pairs(
    prompt_ids: Sequence[TokenIds],
    chosen_ids: Sequence[TokenIds],
    rejected_ids: Sequence[TokenIds],
    row_length: int,
    *,
    pad_id: int = 0,
) -> PackedBatch:
    """One row per preference pair, ``prompt | chosen | rejected | padding``, sharing the prompt.

    Segments: prompt 1, chosen 2, rejected 3, each response with prefix segment 1 so it attends to
    the prompt but not to the other response. Both responses continue the prompt's positions from
    ``len(prompt)``, and the first rejected token is predicted by the last prompt token, so every
    log-prob equals that of the row ``prompt | response`` alone. Every response token counts in
    ``completion_mask``.

    The ``2 * num_pairs`` sequences are all chosen responses, then all rejected ones::

        token_logps, _ = sequence_logps(model, batch.input_ids, batch.completion_mask, **batch.layout())
        chosen_logps, rejected_logps = jnp.split(batch.sequence_sums(token_logps), 2)
        chosen_lengths, rejected_lengths = jnp.split(batch.sequence_sums(batch.completion_mask), 2)
    """
    sides = {name: _as_token_lists(name, ids) for name, ids in (("chosen_ids", chosen_ids), ("rejected_ids", rejected_ids))}
    for name, values in sides.items():
        if len(values) != len(prompt_ids):
            raise ValueError(
                f"`{name}` has {len(values)} entries but `prompt_ids` has {len(prompt_ids)}; they must match."
            )
    responses = list(zip(*sides.values()))
    return prefix_shared_groups(prompt_ids, responses, row_length, num_responses=2, pad_id=pad_id)


def prefix_shared_groups(
    prompt_ids: Sequence[TokenIds],
    response_ids: Sequence[Sequence[TokenIds]],
    row_length: int,
    *,
    num_responses: int | None = None,
    pad_id: int = 0,
) -> PackedBatch:
    """One row per prompt, ``prompt | response 1 | ... | response K | padding``, sharing the prompt.

    :func:`prefix_shared_pairs` for K responses: response ``k`` is segment ``k + 2`` with prefix
    segment 1, continuing the prompt's positions, its first token predicted by the last prompt
    token, so each log-prob equals that of ``prompt | response`` alone. Sequence ``k * B + b`` is
    response ``k`` of prompt ``b`` (``sequence_sums(...).reshape(K, B).T`` is ``[B, K]``). Prompts
    with fewer than ``num_responses`` (default: the most any prompt has) responses get empty
    sequences in the missing slots (sums 0; mask them out).

    >>> batch = prefix_shared_groups([[5, 6]], [[[7], [8, 9], [3]]], row_length=7)
    >>> batch.input_ids, batch.segment_ids
    (array([[5, 6, 7, 8, 9, 3, 0]], dtype=int32), array([[1, 1, 2, 3, 3, 4, 0]], dtype=int32))
    >>> batch.predictor_index  # every response's first token is predicted by the prompt's last
    array([[-1,  0,  1,  1,  3,  1, -1]], dtype=int32)
    """
    _check_row_length(row_length)
    prompts = _as_token_lists("prompt_ids", prompt_ids)
    if len(response_ids) != len(prompts):
        raise ValueError(
            f"`response_ids` has {len(response_ids)} entries but `prompt_ids` has {len(prompts)}; they must match."
        )
    groups = [_as_token_lists(f"response_ids[{i}]", responses) for i, responses in enumerate(response_ids)]
    most = max((len(g) for g in groups), default=0)
    num_responses = most if num_responses is None else num_responses
    if most > num_responses:
        raise ValueError(f"A prompt has {most} responses, more than `num_responses`={num_responses}.")
    num_prompts = len(prompts)
    arrays = _empty_rows(num_prompts, row_length, pad_id, with_prefix=True)
    for i, (prompt, responses) in enumerate(zip(prompts, groups)):
        if len(prompt) == 0:
            raise ValueError(f"`prompt_ids[{i}]` is empty; the first response token needs a prompt token.")
        total = len(prompt) + sum(len(r) for r in responses)
        if total > row_length:
            lengths = " + ".join(str(len(r)) for r in responses)
            raise ValueError(
                f"Prompt {i} needs {len(prompt)} prompt + {lengths} response tokens = {total}, more than "
                f"`row_length`={row_length}."
            )
        end = _write_segment(arrays, i, 0, prompt, np.zeros(len(prompt)), segment=1)
        response = dict(first_position=len(prompt), first_predictor=len(prompt) - 1, prefix_segment=1)
        for k, tokens in enumerate(responses):
            end = _write_segment(arrays, i, end, tokens, np.ones(len(tokens)), segment=k + 2, **response)
    rows = np.arange(num_prompts, dtype=np.int32)
    return PackedBatch(
        **arrays,
        sequence_rows=np.tile(rows, num_responses),
        sequence_segments=np.repeat(np.arange(2, num_responses + 2, dtype=np.int32), num_prompts),
    )
