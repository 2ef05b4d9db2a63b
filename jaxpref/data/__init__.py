"""Data layer: local preference files -> TFDS (array_record) -> grain batches of fixed shapes.

::

    from jaxpref.data import TokenizeOptions, make_loader, prepare_dataset

    source, report = prepare_dataset("prefs.jsonl", "pairwise", "runs/demo/data", "path/to/tokenizer",
                                     options=TokenizeOptions(max_length=512, max_prompt_length=256))
    # `report`: rows read / kept / skipped by reason; prepare_dataset logs it once
    loader = make_loader(source, batch_size=8, seed=0, num_epochs=1)
    it = iter(loader)
    batch = next(it)
    state = it.get_state()  # checkpoint this; `it = iter(loader); it.set_state(state)` resumes

Files are JSONL or Parquet, or folders: a ``datasets`` ``save_to_disk`` folder or a hub-layout
Parquet folder (``data/train-*.parquet``), see :func:`~jaxpref.data.rows.data_files`. Row layouts
of the files (:mod:`jaxpref.data.rows`): ``"pairwise"`` (``{prompt, chosen,
rejected}``, or ``{chosen, rejected}`` conversations whose shared start is the prompt: Anthropic HH
strings, TRL's conversational message lists), ``"unpaired"`` (``{prompt,
completion, label}``), ``"ranked"`` (``{prompt, responses, scores}``), ``"sft"`` (``{prompt,
completion}`` or ``{messages}``); texts are strings or chat message lists. Tokenisation
(:mod:`jaxpref.data.tokenize`) happens once, at preparation, so the report can count rows too long
to keep and the loader knows the longest row.

Batch contract
--------------
Every batch is a dict of NumPy arrays whose shapes depend only on ``B = batch_size`` and the
bucket ``L`` (row length) it falls in. The :class:`~jaxpref.models.packing.PackedBatch` fields
(``packed_batch(batch)`` rebuilds one):

- ``input_ids``, ``completion_mask``, ``segment_ids``, ``positions``, ``predictor_index``:
  ``[rows, L]`` int32;
- ``prefix_segment_ids``: ``[rows, L]`` int32 with prefix sharing, else ``None``;
- ``sequence_rows``, ``sequence_segments``: ``[num_sequences]`` int32; sequence ``i`` is the tokens
  of row ``sequence_rows[i]`` with segment id ``sequence_segments[i]``, and
  ``PackedBatch.sequence_sums`` sums per-token values per sequence.

Every batch also has ``"example_index"`` ``[B]`` int64, each example's row number in the prepared
dataset (stable across shuffles; cached reference log-probs are keyed by it).

Sequences, rows and extra keys by layout:

- pairwise, prefix-shared (default): ``rows = B``, one ``prompt | chosen | rejected`` row per pair
  (``prefix_shared_pairs``); ``num_sequences = 2B``: ``0..B-1`` chosen, ``B..2B-1`` rejected.
- pairwise, ``prefix_sharing=False``: ``rows = num_sequences = 2B`` (``pack_sequences``), same order.
- pairwise data whose rows carry ``chosen_ratings`` / ``rejected_ratings`` (either layout above) also
  gets ``"chosen_ratings"`` and ``"rejected_ratings"`` ``[B, A]`` float32, ``A`` the most attributes
  any row rates, NaN where a rating is missing.
- sft: ``rows = num_sequences = B``.
- unpaired (KTO): ``rows = num_sequences = B``; ``"labels"`` ``[B]`` float32 (1.0 desirable, 0.0
  not); KTO's KL sequences (prompt ``i`` with the completion of example ``i - 1``, cyclically, as
  TRL) as a second PackedBatch under the same names prefixed ``"kl_"`` (``"kl_input_ids"``, ...;
  ``packed_batch(batch, "kl_")``), with its own bucket ``L``.
- ranked, prefix-shared (default): ``rows = B``, one ``prompt | response 1 | ... | response K`` row
  per prompt (``prefix_shared_groups``), ``K`` the most responses of any row; ``num_sequences =
  K * B``, sequence ``k * B + b`` response ``k`` of example ``b`` (so per-sequence sums
  ``.reshape(K, B).T`` are ``[B, K]``); ``"scores"`` ``[B, K]`` float32 and ``"response_mask"``
  ``[B, K]`` bool (False for the empty sequences of rows with fewer responses; their scores are 0).
- ranked, ``prefix_sharing=False``: ``rows = num_sequences = K * B``, same order, a missing
  response a one-pad-token placeholder sequence.

``completion_mask`` is 1 exactly on response tokens (EOS included); with ``pack_sequences`` several
short sequences may share a row, and trailing rows may be all padding (``segment_ids == 0``).
"""

import importlib

# Public names and their modules, imported on first use so that `jaxpref.data.synthetic` and
# friends do not pull in tensorflow-datasets, grain and transformers.
_EXPORTS = {
    "PreparationReport": "report",
    "BadRow": "report",
    "Row": "rows",
    "LAYOUTS": "rows",
    "data_files": "rows",
    "parse_row": "rows",
    "read_rows": "rows",
    "split_shared_prompt": "rows",
    "TokenizeOptions": "tokenize",
    "TokenizedRow": "tokenize",
    "load_tokenizer": "tokenize",
    "tokenize_rows": "tokenize",
    "PreferenceFiles": "builder",
    "PreferenceFilesConfig": "builder",
    "prepare_dataset": "builder",
    "Loader": "loader",
    "make_loader": "loader",
    "dataset_metadata": "loader",
    "packed_batch": "loader",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
