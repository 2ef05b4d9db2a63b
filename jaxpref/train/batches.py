"""The batch contract between the data pipeline and the train step.

A batch is a dict of NumPy arrays with fixed shapes (so the step compiles once):

- the fields of a :class:`~jaxpref.models.packing.PackedBatch` (``input_ids``, ``completion_mask``,
  ``segment_ids``, ``positions``, ``predictor_index``, ``sequence_rows``, ``sequence_segments``;
  ``prefix_segment_ids`` may be absent or None). Row arrays are ``[rows, row_length]``.
- ``example_index`` ``[examples]``: each example's index in the dataset, the key of the cached
  reference log-probs (:mod:`jaxpref.train.reference`).
- **pairwise**: sequences ``0..B-1`` are the chosen responses, ``B..2B-1`` the rejected ones (as
  :func:`~jaxpref.models.packing.prefix_shared_pairs` lays them out); with precomputed reference
  log-probs also ``ref_chosen_logps`` / ``ref_rejected_logps`` ``[B]``.
- **unpaired** (KTO and relatives): one sequence per example, ``labels`` ``[B]`` (1 = desirable),
  ``ref_logps`` ``[B]`` when precomputed, and optionally a second PackedBatch of mismatched KL
  sequences under ``kl_``-prefixed keys (``kl_input_ids``, ...; ``kl_ref_logps`` when precomputed),
  KL sequence ``j`` built from example ``j``.
- **sft**: the row arrays of a PackedBatch (the sequence fields are not needed); the loss is the
  token-mean NLL of the completion tokens.
- **reward** (reward models): pairs laid out as for pairwise; each sequence's reward is read at
  its own last token (:func:`packed_rewards`), so a prefix-shared row scores its chosen and its
  rejected response separately. General Preference Models read embeddings there too and block
  scales at the prompt's last token (:func:`packed_preference_embeddings`). Optional per-pair
  ``[B]`` arrays ``margin`` and ``target_probability``, and ``[B, attributes]`` ratings
  ``chosen_ratings`` / ``rejected_ratings`` (NaN where missing, as the loader gives them), go to
  the objective (:mod:`jaxpref.objectives.reward`; ``jaxpref.recipes.reward``'s multi-objective heads).
- **listwise** (ranked lists): ``K * B`` sequences, sequence ``k * B + b`` response ``k`` of
  example ``b``; ``scores`` and ``response_mask`` ``[B, K]``; ``ref_logps`` ``[B, K]`` when precomputed.

Which keys a kind of training needs and what it makes of them is its family's business
(:mod:`jaxpref.train.families`); this module only lays batches out and splits them.

Gradient accumulation over ``A`` microbatches splits rows and examples *strided*: microbatch
``k`` holds rows ``k, k + A, ...`` and examples ``k, k + A, ...``, so a batch sharded by rows over
the devices gives every microbatch an equal share of every device's rows (no resharding). For
data with sequences (all but SFT) every sequence of example ``i`` must therefore lie in a row
``r`` with ``r % A == i % A`` (one row per pair, as ``prefix_shared_pairs`` builds, always satisfies
this); :func:`check_microbatches` verifies it on the host. SFT losses are token sums, so SFT rows
may hold any sequences.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from jaxpref.models.heads import PreferenceEmbeddingModel, RewardModel
from jaxpref.models.logprobs import sequence_logps
from jaxpref.models.packing import PackedBatch
from jaxpref.sharding import LOGICAL_AXIS_RULES, logical_sharding

Array = jax.Array

KL_PREFIX = "kl_"
LAYOUT_FIELDS = ("positions", "segment_ids", "prefix_segment_ids", "predictor_index")  # sequence_logps kwargs
ROW_FIELDS = ("input_ids", "completion_mask", *LAYOUT_FIELDS)
SEQUENCE_FIELDS = ("sequence_rows", "sequence_segments")


def sub_batch(batch: Mapping[str, Array], prefix: str) -> dict[str, Array]:
    """The keys starting with ``prefix`` (prefix removed); ``""`` gives the keys without ``kl_``."""
    if prefix:
        return {k[len(prefix) :]: v for k, v in batch.items() if k.startswith(prefix)}
    return {k: v for k, v in batch.items() if not k.startswith(KL_PREFIX)}


def packed_batch(batch: Mapping[str, Array]) -> PackedBatch:
    """The :class:`PackedBatch` stored in ``batch`` (``prefix_segment_ids`` optional)."""
    missing = [f for f in PackedBatch._fields if f != "prefix_segment_ids" and batch.get(f) is None]
    if missing:
        raise ValueError(f"`batch` lacks the PackedBatch field(s) {missing}; it has {sorted(batch)}.")
    return PackedBatch(**{f: batch.get(f) for f in PackedBatch._fields})


def packed_logps(model: nnx.Module, packed: PackedBatch, **lm_head_options) -> tuple[Array, Array]:
    """Summed completion log-probs and completion lengths of every sequence, ``[sequences]`` each."""
    token_logps, _ = sequence_logps(
        model, packed.input_ids, packed.completion_mask, **packed.layout(), **lm_head_options
    )
    return packed.sequence_sums(token_logps), packed.sequence_sums(packed.completion_mask)


def sequence_last_index(
    segment_ids: Array,  # [rows, row_length]
    sequence_rows: Array,  # [num_sequences]
    sequence_segments: Array,  # [num_sequences]
) -> Array:  # [num_sequences]
    """Position in its row of each sequence's last token.

    Per segment, not per row: in a prefix-shared row ``prompt | chosen | rejected`` the chosen
    response ends before the rejected one starts. A sequence needs at least one token of its own.
    """
    in_sequence = segment_ids[sequence_rows] == sequence_segments[:, None]  # [num_sequences, row_length]
    return in_sequence.shape[-1] - 1 - jnp.argmax(in_sequence[:, ::-1], axis=-1)


def sequence_prompt_end_index(packed: PackedBatch) -> Array:  # [num_sequences]
    """Position in its row of the last prompt token of each sequence.

    It is the token that predicts the sequence's first completion token (``predictor_index``), so
    prefix-shared rows ``prompt | chosen | rejected`` give both responses the shared prompt's last
    token. A sequence needs at least one completion token.
    """
    rows, segments = packed.sequence_rows, packed.sequence_segments
    completion = (packed.segment_ids[rows] == segments[:, None]) & (packed.completion_mask[rows] != 0)
    first_completion = jnp.argmax(completion, axis=-1)  # [num_sequences]
    return packed.predictor_index[rows, first_completion]


def _sequence_hidden(model: RewardModel | PreferenceEmbeddingModel, packed: PackedBatch) -> Array:
    """Final hidden states of the backbone over the packed rows, ``[rows, row_length, hidden]``."""
    return model.model(
        packed.input_ids,
        positions=packed.positions,
        segment_ids=packed.segment_ids,
        prefix_segment_ids=packed.prefix_segment_ids,
    )


def packed_rewards(model: RewardModel, packed: PackedBatch) -> Array:
    """Reward of every sequence, ``[sequences]`` float32 (``[sequences, num_labels]`` with several heads).

    The score head reads the final hidden state of each sequence's last token, as
    :meth:`RewardModel.__call__` does for a row holding that sequence alone: segments and prefix
    segments give every token the attention and positions it would have there.
    """
    hidden = _sequence_hidden(model, packed)
    last = sequence_last_index(packed.segment_ids, packed.sequence_rows, packed.sequence_segments)
    return model.head(hidden[packed.sequence_rows, last])  # summaries [sequences, hidden]


def packed_preference_embeddings(model: PreferenceEmbeddingModel, packed: PackedBatch) -> tuple[Array, Array]:
    """General Preference Model embeddings ``[sequences, 2k]`` and block scales ``[sequences, k]``.

    As :meth:`PreferenceEmbeddingModel.__call__` on each sequence alone: embeddings from its last
    token, scales from its prompt's last token (:func:`sequence_prompt_end_index`), so the two
    responses of a pair get the same scales.
    """
    hidden = _sequence_hidden(model, packed)
    rows = packed.sequence_rows
    last = sequence_last_index(packed.segment_ids, rows, packed.sequence_segments)
    prompt_end = sequence_prompt_end_index(packed)
    return model.embed(hidden[rows, last]), model.eigenvalue_scales(hidden[rows, prompt_end])


def split_microbatches(batch: Mapping[str, Array], num_microbatches: int, groups: int) -> dict[str, Array]:
    """Stacks ``batch`` (no ``kl_`` keys) into ``num_microbatches`` strided microbatches, ``[A, ...]``.

    Row arrays ``[rows, ...]`` become ``[A, rows / A, ...]``, per-example arrays ``[B, ...]``
    become ``[A, B / A, ...]``, and the ``groups * B`` sequences ``[A, groups * B / A]`` (each
    microbatch keeping the chosen-then-rejected order), their rows renumbered within the microbatch.
    """
    count = num_microbatches

    def strided(x: Array) -> Array:  # [n, ...] -> [A, n / A, ...]: item i goes to microbatch i % A
        return x.reshape(x.shape[0] // count, count, *x.shape[1:]).swapaxes(0, 1)

    split = {}
    for key, value in batch.items():
        if key in SEQUENCE_FIELDS:
            value = value.reshape(groups, -1, count).transpose(2, 0, 1).reshape(count, -1)
            split[key] = value // count if key == "sequence_rows" else value
        else:
            split[key] = strided(value)
    return split


def check_microbatches(batch: Mapping[str, np.ndarray], num_microbatches: int, groups: int) -> None:
    """Raises a ValueError unless ``batch`` splits into ``num_microbatches`` whole microbatches.

    ``groups`` is the number of sequences per example (a KL batch has one). A batch without
    sequence fields (SFT: token sums) only needs its rows to divide. Reads only shapes and the small
    ``sequence_rows`` index array (fetched if on a device).
    """
    if num_microbatches == 1:
        return
    prefixes = ("", KL_PREFIX) if f"{KL_PREFIX}input_ids" in batch else ("",)
    for prefix in prefixes:
        part = sub_batch(batch, prefix)
        rows = np.shape(part["input_ids"])[0]
        if rows % num_microbatches:
            raise ValueError(
                f"`grad_accum_steps`={num_microbatches} must divide the {rows} rows of `{prefix}input_ids`."
            )
        if "sequence_rows" not in part:  # token sums: any sequence may go to any microbatch
            continue
        per_example = 1 if prefix else groups
        sequence_rows = np.asarray(part["sequence_rows"])
        examples = len(sequence_rows) // per_example
        if examples % num_microbatches:
            raise ValueError(
                f"`grad_accum_steps`={num_microbatches} must divide the {examples} examples of the batch "
                f"(`{prefix}sequence_rows` has {len(sequence_rows)} sequences)."
            )
        example = np.tile(np.arange(examples), per_example)
        misplaced = np.flatnonzero(sequence_rows % num_microbatches != example % num_microbatches)
        if misplaced.size:
            i = int(misplaced[0])
            raise ValueError(
                f"With `grad_accum_steps`={num_microbatches}, sequence {i} (example {example[i]}) must lie in "
                f"a row r with r % {num_microbatches} == {example[i] % num_microbatches}, but "
                f"`{prefix}sequence_rows`[{i}] = {sequence_rows[i]}: pack each microbatch's examples in its "
                "own rows (see jaxpref.train.batches)."
            )


def batch_sharding(
    mesh: Mesh, shape: tuple[int, ...], rules: Mapping = LOGICAL_AXIS_RULES, leading: int = 0
) -> NamedSharding:
    """Sharding of a batch array: its first axis after ``leading`` ones split over the batch axes."""
    axes = (None,) * leading + ("batch",) + (None,) * (len(shape) - leading - 1)
    return logical_sharding(mesh, axes, shape, rules)


def merge_host_batches(batches: Sequence[Mapping[str, np.ndarray]], groups: int) -> dict[str, np.ndarray]:
    """The global batch of a multi-host step from every host's local batch, in host order.

    Rows and per-example arrays are concatenated. Sequence arrays are regrouped so that each group
    stays contiguous (all hosts' chosen sequences, then all their rejected ones), and row indices
    are offset by the rows of the hosts before: the result is laid out exactly as if one host had
    loaded all the examples. ``groups`` is the number of sequences per example (2 for pairs).
    """
    merged = {}
    for key, first in batches[0].items():
        if first is None:
            merged[key] = None
            continue
        prefix = KL_PREFIX if key.startswith(KL_PREFIX) else ""
        name = key[len(prefix) :]
        values = [np.asarray(batch[key]) for batch in batches]
        if name not in SEQUENCE_FIELDS:
            merged[key] = np.concatenate(values)
            continue
        if name == "sequence_rows":
            offsets = np.cumsum([0] + [len(batch[prefix + "input_ids"]) for batch in batches[:-1]])
            values = [v + offset for v, offset in zip(values, offsets, strict=True)]
        per_group = 1 if prefix else groups  # a KL batch has one sequence per example
        merged[key] = np.concatenate([v.reshape(per_group, -1) for v in values], axis=1).reshape(-1)
    return merged


def shard_batch(
    batch: Mapping[str, np.ndarray], mesh: Mesh, rules: Mapping = LOGICAL_AXIS_RULES, groups: int = 2
) -> dict[str, Array]:
    """Places every array of ``batch`` on ``mesh``, split by rows (or examples) over data and fsdp.

    With several processes (``jax.distributed.initialize()``), ``batch`` is this host's share (the
    loaders shard by ``jax.process_index()``): the hosts exchange their batches (token ids and
    indices, small next to activations), merge them with :func:`merge_host_batches` and each places
    only the slices its own devices hold.
    """
    if jax.process_count() > 1:
        present = {k: np.asarray(v) for k, v in batch.items() if v is not None}
        gathered = multihost_utils.process_allgather(present)  # each [processes, ...]
        hosts = [{k: v[i] for k, v in gathered.items()} for i in range(jax.process_count())]
        global_batch = merge_host_batches(hosts, groups)
        return {
            key: jax.make_array_from_callback(
                value.shape, batch_sharding(mesh, value.shape, rules), lambda index, v=value: v[index]
            )
            for key, value in global_batch.items()
        }
    return {
        key: jax.device_put(value, batch_sharding(mesh, np.shape(value), rules))
        for key, value in batch.items()
    }


def constrain_microbatches(
    microbatches: Mapping[str, Array], mesh: Mesh, rules: Mapping = LOGICAL_AXIS_RULES
) -> dict[str, Array]:
    """Keeps stacked ``[A, n, ...]`` microbatches split over the batch axes along ``n`` (in jit)."""
    return {
        key: jax.lax.with_sharding_constraint(value, batch_sharding(mesh, value.shape, rules, leading=1))
        for key, value in microbatches.items()
    }


def count_tokens(batch: Mapping[str, Array]) -> Array:
    """Non-padding tokens of the batch and of its KL batch, ``[]`` int32."""
    total = jnp.sum(batch["segment_ids"] != 0)
    if f"{KL_PREFIX}segment_ids" in batch:
        total += jnp.sum(batch[f"{KL_PREFIX}segment_ids"] != 0)
    return total
