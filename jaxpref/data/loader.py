"""grain loaders over prepared data: shuffled by seed, sharded per host, batched into fixed shapes.

Each batch is a dict of NumPy arrays (the contract is in :mod:`jaxpref.data`). Shapes depend only on
the batch size and the bucket (row length) a batch falls in, so a jitted step compiles once per
bucket: by default there is one bucket, the longest row the prepared data needs.

Iteration is grain's ``DataLoader``: ``it = iter(loader)``; ``it.get_state()`` is the position to
checkpoint and ``iter(loader).set_state(state)`` resumes with exactly the batches that followed it.
Batches run across epoch boundaries; with a finite ``num_epochs`` the rows of a last, partial batch
are dropped (counted in ``Loader.dropped_by_batching``), as are the rows a host count does not
divide (``Loader.dropped_by_sharding``, per epoch).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import grain
import jax
import numpy as np

from jaxpref.data.rows import EXAMPLE_COLUMNS
from jaxpref.models.packing import PackedBatch, pack_sequences, prefix_shared_groups, prefix_shared_pairs

logger = logging.getLogger(__name__)

Batch = dict[str, Any]  # str -> np.ndarray, or None for `prefix_segment_ids` without prefix sharing
Record = dict[str, Any]  # one stored row, as the data source returns it


@dataclasses.dataclass(frozen=True)
class Loader:
    """An iterable of batches; ``iter()`` gives grain's iterator with ``get_state`` / ``set_state``."""

    data_loader: grain.DataLoader
    batch_size: int
    row_lengths: tuple[int, ...]  # the buckets, ascending
    num_batches: int | None  # on this host; None when `num_epochs` is None
    dropped_by_sharding: int  # rows per epoch in no host's shard
    dropped_by_batching: int  # rows of this host's last, partial batch

    def __iter__(self) -> grain.DataLoaderIterator:  # yields Batch dicts
        return iter(self.data_loader)


def make_loader(
    data_source: Any,
    batch_size: int,
    *,
    prefix_sharing: bool = True,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = 1,
    row_length: int | None = None,
    buckets: Sequence[int] = (),
    shard_index: int | None = None,
    shard_count: int | None = None,
    drop_remainder: bool = True,
) -> Loader:
    """Batches of the data source returned by :func:`jaxpref.data.builder.prepare_dataset`.

    Args:
      batch_size: examples per batch on this host (pairs, prompts or completions).
      prefix_sharing: for pairwise data, one ``prompt | chosen | rejected`` row per pair, for ranked
        data one ``prompt | response 1 | ... | response K`` row per prompt; otherwise each sequence
        in its own row (``pack_sequences``).
      seed, shuffle, num_epochs: the record order; ``num_epochs=None`` repeats forever.
      row_length: the longest row; by default the longest the data needs (a ValueError if smaller).
      buckets: shorter row lengths also used, each batch taking the shortest that fits it.
      shard_index, shard_count: this host's shard; by default ``jax.process_index()`` of
        ``jax.process_count()``. Shards are disjoint and equal in size.
      drop_remainder: drop the rows of a last, partial batch (keep it only for evaluation: it has
        another shape).

    Records are read by grain's threads and batched in this process: tokenisation happened at
    preparation, so what is left (decoding records, packing) is light, and batches do not depend
    on a worker count, as they would with grain's worker processes (each batches its own share).
    """
    metadata = dataset_metadata(data_source)
    layout, stats = metadata["layout"], metadata["stats"]
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}.")
    shared = prefix_sharing and layout in ("pairwise", "ranked")
    needed = stats["max_shared_length"] if shared else stats["max_sequence_length"]
    row_lengths = _row_lengths(needed if row_length is None else row_length, buckets, needed)
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"`shard_index`={shard_index} must be in [0, `shard_count`={shard_count}).")
    rows_per_shard = len(data_source) // shard_count
    total = None if num_epochs is None else rows_per_shard * num_epochs  # rows this host reads
    if rows_per_shard == 0 or (drop_remainder and total is not None and total < batch_size):
        raise ValueError(
            f"This host reads {rows_per_shard} rows x {num_epochs} epoch(s), not enough for one batch of "
            f"`batch_size`={batch_size} ({len(data_source)} rows over {shard_count} shards); "
            "lower `batch_size` or add data."
        )
    if total is None:
        num_batches = None
    else:
        num_batches = total // batch_size if drop_remainder else -(-total // batch_size)

    max_length = metadata["max_length"]
    collate = _Collate(
        layout=layout,
        shared=shared,
        row_lengths=row_lengths,
        pad_id=metadata["pad_id"],
        kl_limit=row_lengths[-1] if max_length is None else min(max_length, row_lengths[-1]),
        num_responses=stats["max_responses"],
        num_ratings=stats.get("max_ratings", 0),
        columns=_complete_columns(layout, stats.get("column_rows", {}), len(data_source)),
    )
    sampler = grain.samplers.IndexSampler(
        num_records=len(data_source),
        shard_options=grain.sharding.ShardOptions(shard_index, shard_count, drop_remainder=True),
        shuffle=shuffle,
        num_epochs=num_epochs,
        seed=seed if shuffle else None,
    )
    data_loader = grain.DataLoader(
        data_source=data_source,
        sampler=sampler,
        operations=[grain.transforms.Batch(batch_size, drop_remainder=drop_remainder, batch_fn=collate)],
        worker_count=0,
        # grain scans its whole read-ahead buffer per record; its default of 500 records costs more
        # than it saves here.
        read_options=grain.ReadOptions(num_threads=8, prefetch_buffer_size=max(128, 2 * batch_size)),
    )
    loader = Loader(
        data_loader=data_loader,
        batch_size=batch_size,
        row_lengths=row_lengths,
        num_batches=num_batches,
        dropped_by_sharding=len(data_source) - rows_per_shard * shard_count,
        dropped_by_batching=total % batch_size if drop_remainder and total is not None else 0,
    )
    dropped = loader.dropped_by_sharding + loader.dropped_by_batching
    logger.log(
        logging.WARNING if dropped else logging.DEBUG,
        "Loader: %s rows, shard %d of %d, %s batches of %d, row lengths %s; dropped %d rows per epoch "
        "by sharding, %d by batching",
        len(data_source), shard_index, shard_count,
        "unbounded" if loader.num_batches is None else loader.num_batches, batch_size, row_lengths,
        loader.dropped_by_sharding, loader.dropped_by_batching,
    )  # fmt: skip
    return loader


def dataset_metadata(data_source: Any) -> dict[str, Any]:
    """The metadata ``prepare_dataset`` stored: layout, pad id, ``max_length``, stats, report."""
    info = getattr(data_source, "dataset_info", None)
    metadata = getattr(info, "metadata", None)
    if not metadata or "layout" not in metadata:
        raise ValueError(
            "`data_source` has no jaxpref metadata; pass the data source returned by `prepare_dataset`."
        )
    return dict(metadata)


def packed_batch(batch: Batch, prefix: str = "") -> PackedBatch:
    """The :class:`PackedBatch` stored in ``batch`` under keys ``prefix + field`` (``"kl_"`` for KTO's)."""
    return PackedBatch(**{field: batch[prefix + field] for field in PackedBatch._fields})


def _complete_columns(layout: str, column_rows: dict[str, int], num_rows: int) -> tuple[str, ...]:
    """The per-example columns every row has; one that only some rows have is reported, not used."""
    partial = {name: count for name, count in column_rows.items() if count < num_rows}
    if partial:
        logger.warning(
            "Data columns present in only some rows are not used (a batch needs every row's value): %s of %d rows",
            partial, num_rows,
        )  # fmt: skip
    return tuple(name for name in EXAMPLE_COLUMNS[layout] if column_rows.get(name) == num_rows)


def _row_lengths(row_length: int, buckets: Sequence[int], needed: int) -> tuple[int, ...]:
    if not isinstance(row_length, int) or row_length < needed:
        raise ValueError(
            f"`row_length`={row_length!r} is shorter than the longest row of the data ({needed} tokens); "
            f"pass at least {needed}, or prepare the data with a smaller `max_length`."
        )
    for bucket in buckets:
        if not isinstance(bucket, int) or not 0 < bucket <= row_length:
            raise ValueError(f"`buckets` must hold ints in [1, `row_length`={row_length}], got {bucket!r}.")
    return tuple(sorted({*buckets, row_length}))


def _bucket(row_lengths: tuple[int, ...], needed: int) -> int:
    """The shortest row length holding ``needed`` tokens (the longest always does, by construction)."""
    return next(length for length in row_lengths if length >= needed)


def _responses(record: Record) -> list[np.ndarray]:
    return np.split(record["response_ids"], np.cumsum(record["response_lengths"])[:-1])


@dataclasses.dataclass(frozen=True)
class _Collate:
    """Records -> one batch dict, by layout."""

    layout: str
    shared: bool  # pairwise and ranked rows with prefix sharing
    row_lengths: tuple[int, ...]
    pad_id: int
    kl_limit: int  # longest KTO KL sequence
    num_responses: int  # ranked: K
    num_ratings: int = 0  # pairwise: A, the most attributes any row rates (0: no ratings)
    columns: tuple[str, ...] = ()  # EXAMPLE_COLUMNS every row has: [B] arrays of the batch

    def __call__(self, records: Sequence[Record]) -> Batch:
        if self.layout == "pairwise":
            batch = self.pairwise_shared(records) if self.shared else self.pairwise(records)
            if self.num_ratings:
                batch |= self.ratings(records)
        else:
            batch = {"sft": self.sft, "unpaired": self.unpaired, "ranked": self.ranked}[self.layout](records)
        batch["example_index"] = np.array([record["example_index"] for record in records], np.int64)
        for name in self.columns:
            values = np.array([record["columns"][EXAMPLE_COLUMNS[self.layout].index(name)] for record in records])
            batch[name] = values.astype(np.int32 if name == "user_id" else np.float32)
        return batch

    def pack(self, sequences: list[tuple[np.ndarray, np.ndarray]], prefix: str = "") -> Batch:
        """One segment per (prompt, response) sequence, its completion mask on the response."""
        tokens = [np.concatenate([prompt, response]) for prompt, response in sequences]
        masks = [np.repeat([0, 1], [len(prompt), len(response)]) for prompt, response in sequences]
        length = _bucket(self.row_lengths, max(len(ids) for ids in tokens))
        # Sequence i in row i: gradient accumulation splits examples and rows alike (strided).
        batch = pack_sequences(
            tokens, masks, length, num_rows=len(tokens), pad_id=self.pad_id, one_per_row=True
        )
        return {prefix + field: value for field, value in batch._asdict().items()}

    def pairwise_shared(self, records: Sequence[Record]) -> Batch:
        prompts = [record["prompt_ids"] for record in records]
        chosen, rejected = zip(*(_responses(record) for record in records))
        needed = max(len(p) + len(c) + len(r) for p, c, r in zip(prompts, chosen, rejected))
        length = _bucket(self.row_lengths, needed)
        return prefix_shared_pairs(prompts, chosen, rejected, length, pad_id=self.pad_id)._asdict()

    def pairwise(self, records: Sequence[Record]) -> Batch:
        # Sequences 0..B-1 are the chosen responses, B..2B-1 the rejected ones.
        pairs = [(record["prompt_ids"], *_responses(record)) for record in records]
        chosen = [(prompt, response) for prompt, response, _ in pairs]
        rejected = [(prompt, response) for prompt, _, response in pairs]
        return self.pack(chosen + rejected)

    def ratings(self, records: Sequence[Record]) -> Batch:
        """``chosen_ratings`` and ``rejected_ratings`` ``[B, A]`` float32, NaN where not rated."""
        ratings = np.full((2, len(records), self.num_ratings), np.nan, np.float32)
        for b, record in enumerate(records):
            values = np.asarray(record.get("ratings", ()), np.float32).reshape(2, -1)  # [2, attributes]
            ratings[:, b, : values.shape[1]] = values
        return {"chosen_ratings": ratings[0], "rejected_ratings": ratings[1]}

    def sft(self, records: Sequence[Record]) -> Batch:
        return self.pack([(record["prompt_ids"], record["response_ids"]) for record in records])

    def unpaired(self, records: Sequence[Record]) -> Batch:
        prompts = [record["prompt_ids"] for record in records]
        completions = [record["response_ids"] for record in records]
        # KTO's KL sequences, as TRL's: prompt i with the completion of example i - 1 (cyclically).
        mismatched = completions[-1:] + completions[:-1]
        kl = [
            (prompt, completion[: self.kl_limit - len(prompt)])
            for prompt, completion in zip(prompts, mismatched)
        ]
        labels = np.array([record["label"] for record in records], np.float32)
        return self.pack(list(zip(prompts, completions))) | self.pack(kl, prefix="kl_") | {"labels": labels}

    def ranked(self, records: Sequence[Record]) -> Batch:
        # Sequence k * B + b is response k of example b. Shared: one row per prompt, a missing
        # response an empty segment; otherwise a missing response is a placeholder sequence (one
        # pad token, nothing scored). Either way shapes stay fixed.
        batch_size = len(records)
        scores = np.zeros((batch_size, self.num_responses), np.float32)
        response_mask = np.zeros((batch_size, self.num_responses), bool)
        for b, record in enumerate(records):
            count = len(record["response_lengths"])
            scores[b, :count], response_mask[b, :count] = record["scores"], True
        lists = {"scores": scores, "response_mask": response_mask}
        if self.shared:
            prompts = [record["prompt_ids"] for record in records]
            responses = [_responses(record) for record in records]
            needed = max(len(p) + sum(map(len, r)) for p, r in zip(prompts, responses))
            packed = prefix_shared_groups(
                prompts, responses, _bucket(self.row_lengths, needed), num_responses=self.num_responses,
                pad_id=self.pad_id,
            )  # fmt: skip
            return packed._asdict() | lists
        placeholder = (np.array([self.pad_id], np.int32), np.zeros(0, np.int32))
        sequences = [placeholder] * (self.num_responses * batch_size)
        for b, record in enumerate(records):
            for k, response in enumerate(_responses(record)):
                sequences[k * batch_size + b] = (record["prompt_ids"], response)
        return self.pack(sequences) | lists
