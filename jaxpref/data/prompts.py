"""Prompt batches for online training: left-padded token ids plus the rows' other columns.

Online methods (:mod:`jaxpref.train.online`) need only prompts; the completions are sampled during
training. :class:`PromptBatches` tokenises every prompt once, reshuffles the rows every epoch from a
seed, and yields batches of ``batch_size`` prompts, endlessly:

- ``prompt_ids`` ``[batch_size, P]`` int32, left-padded with the tokenizer's pad id (EOS when it has
  none), and ``prompt_mask`` ``[batch_size, P]`` int32 (1 = prompt token). ``P`` is the longest
  prompt of the batch rounded up to a multiple of ``bucket`` (and at most ``max_prompt_length``),
  so the sampler and the update compile once per bucket, not once per batch.
- every other column of the rows (``"prompt"`` included) as a NumPy object array ``[batch_size]``;
  reward functions receive them (an ``"answer"`` column for a checker, say).

Prompts are encoded as the data pipeline encodes them (:mod:`jaxpref.data.tokenize`): without the
tokenizer's own special tokens, then BOS in front when the tokenizer adds one by itself. Prompts
longer than ``max_prompt_length`` tokens keep their last tokens (and the BOS), as TRL truncates them. The position (batches served) is saved and restored with ``get_state`` /
``set_state``, like grain's iterators, so the training loop checkpoints it.

>>> from jaxpref.data import load_tokenizer
>>> tokenizer = load_tokenizer("jaxpref/recipes/assets/char_tokenizer")
>>> batches = PromptBatches(["12>", "3>", "456>"], tokenizer, 2, bucket=4, shuffle=False)
>>> batch = next(batches)
>>> batch["prompt_mask"].tolist(), list(batch["prompt"])
([[0, 1, 1, 1], [0, 0, 1, 1]], ['12>', '3>'])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxpref.data.tokenize import adds_bos


def _encode(tokenizer, text: str, max_length: int | None) -> list[int]:
    """A prompt's ids as :mod:`jaxpref.data.tokenize` encodes them, cut to its last ``max_length``."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) and ids[:1] != [tokenizer.bos_token_id] else []
    if max_length is not None and len(bos) + len(ids) > max_length:
        ids = ids[len(ids) - (max_length - len(bos)) :] if max_length > len(bos) else []
    return bos + ids


def _object_column(values: list[Any]) -> np.ndarray:  # [rows] object
    """A 1-D object array of ``values``, even when they are lists (``np.array`` would stack them)."""
    column = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        column[i] = value
    return column


class PromptBatches:
    """An endless, checkpointable iterator of prompt batches (see the module docstring).

    Args:
      rows: prompt strings, or dicts with a ``prompt_key`` string and any other columns.
      tokenizer: a Hugging Face tokenizer.
      batch_size: prompts per batch.
      max_prompt_length: longer prompts keep their last tokens; None keeps them whole.
      bucket: padded prompt lengths are multiples of this.
      seed, shuffle: the order of every epoch is a permutation drawn from ``(seed, epoch)``.
    """

    def __init__(
        self,
        rows: Sequence[str] | Sequence[Mapping[str, Any]],
        tokenizer,
        batch_size: int,
        *,
        max_prompt_length: int | None = None,
        bucket: int = 16,
        seed: int = 0,
        shuffle: bool = True,
        prompt_key: str = "prompt",
    ):
        rows = [{prompt_key: row} if isinstance(row, str) else dict(row) for row in rows]
        if not isinstance(batch_size, int) or not 1 <= batch_size <= len(rows):
            raise ValueError(f"`batch_size`={batch_size!r} must be an int in [1, {len(rows)}] (the rows).")
        if not isinstance(bucket, int) or bucket < 1:
            raise ValueError(f"`bucket`={bucket!r} must be a positive int.")
        if max_prompt_length is not None and (
            not isinstance(max_prompt_length, int) or max_prompt_length < 1
        ):
            raise ValueError(f"`max_prompt_length`={max_prompt_length!r} must be a positive int or None.")
        missing = [i for i, row in enumerate(rows) if not isinstance(row.get(prompt_key), str)]
        if missing:
            raise ValueError(
                f"Rows {missing[:5]} have no string `{prompt_key}` (`prompt_key`={prompt_key!r})."
            )
        columns = sorted(rows[0])
        uneven = [i for i, row in enumerate(rows) if sorted(row) != columns]
        if uneven:
            raise ValueError(f"Rows {uneven[:5]} do not have the columns of row 0, {columns}.")
        encoded = [_encode(tokenizer, row[prompt_key], max_prompt_length) for row in rows]
        if any(not ids for ids in encoded):
            raise ValueError("Every prompt must encode to at least one token; some encode to none.")
        self.encoded = encoded
        self.columns = {key: _object_column([row[key] for row in rows]) for key in columns}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.batch_size, self.bucket, self.max_prompt_length = batch_size, bucket, max_prompt_length
        self.seed, self.shuffle = seed, shuffle
        self.position = 0  # batches served

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.encoded))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.encoded))

    def __iter__(self) -> PromptBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        # Whole batches only: an epoch's last few rows (fewer than a batch) are skipped.
        per_epoch = len(self.encoded) // self.batch_size
        epoch, index = divmod(self.position, per_epoch)
        rows = self._order(epoch)[index * self.batch_size : (index + 1) * self.batch_size]
        self.position += 1
        longest = max(len(self.encoded[i]) for i in rows)
        length = -(-longest // self.bucket) * self.bucket
        if self.max_prompt_length is not None:
            length = min(length, self.max_prompt_length)
        ids = np.full((len(rows), length), self.pad_id, np.int32)
        mask = np.zeros((len(rows), length), np.int32)
        for i, row in enumerate(rows):
            tokens = self.encoded[row]
            ids[i, length - len(tokens) :] = tokens
            mask[i, length - len(tokens) :] = 1
        return {"prompt_ids": ids, "prompt_mask": mask, **{k: v[rows] for k, v in self.columns.items()}}

    def get_state(self) -> dict[str, int]:
        return {"position": self.position}

    def set_state(self, state: Mapping[str, Any]) -> None:
        self.position = int(state["position"])
