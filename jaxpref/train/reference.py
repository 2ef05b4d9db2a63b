"""Reference log-probs computed once over a dataset, cached on disk, attached to batches.

With ``reference="cached"`` the train step reads the reference model's sequence log-probs from the
batch instead of running a frozen copy of the model: half the forward passes and no second set of
weights in device memory. The flow::

    logps, from_cache = cached_reference_logps(cache_dir, reference_model, batches)
    state, metrics = train_step(state, logps.attach(batch))

The cache file is named by a hash of the dataset's fingerprint (by default a hash of every array
of every batch), the reference parameters (a hash of their bytes), the model config and the
family; a change to any of them is a cache miss and the log-probs are recomputed. Values are keyed
by each example's ``example_index``, so the training loader may shuffle and batch differently
from the pass that computed them.

Stored keys: pairwise ``ref_chosen_logps`` / ``ref_rejected_logps``; unpaired ``ref_logps`` and,
when the batches carry a KL batch, ``kl_ref_logps`` (KL sequence ``j`` of a batch belongs to example
``j``, so the loader must build each example's KL sequence deterministically).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import pathlib
import zipfile
from collections.abc import Callable, Iterable, Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxpref.models.logprobs import DEFAULT_CHUNK_SIZE
from jaxpref.models.lora import LoRAParam, base_view
from jaxpref.sharding import LOGICAL_AXIS_RULES, make_mesh
from jaxpref.train.batches import KL_PREFIX, ROW_FIELDS, SEQUENCE_FIELDS, packed_batch, packed_logps, shard_batch, sub_batch
from jaxpref.train.families import Family, as_family
from jaxpref.train.references import NoReference
from jaxpref.train.step import param_shardings

logger = logging.getLogger(__name__)

_CACHE_VERSION = 1  # bump when the file layout or the computation changes
Batches = Iterable[Mapping[str, np.ndarray]] | Callable[[], Iterable[Mapping[str, np.ndarray]]]


class DamagedCacheError(ValueError):
    """A reference-cache file that cannot be read back."""


@dataclasses.dataclass(frozen=True)
class ReferenceLogps:
    """Reference log-probs per example, sorted by ``example_index``."""

    example_index: np.ndarray  # [examples] int64, sorted, unique
    values: Mapping[str, np.ndarray]  # key -> [examples] float32, e.g. "ref_chosen_logps"

    def attach(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``batch`` plus its examples' reference log-probs, looked up by ``batch["example_index"]``."""
        if "example_index" not in batch:
            raise ValueError(
                f"`batch` needs an 'example_index' key to look up reference log-probs; it has {sorted(batch)}."
            )
        wanted = np.asarray(batch["example_index"])
        slots = np.clip(np.searchsorted(self.example_index, wanted), 0, len(self.example_index) - 1)
        unknown = wanted[self.example_index[slots] != wanted]
        if unknown.size:
            raise ValueError(
                f"`batch['example_index']` has {unknown.size} example(s) without cached reference "
                f"log-probs (e.g. {unknown[:5].tolist()}): the cache was computed on other data."
            )
        return {**batch, **{key: values[slots] for key, values in self.values.items()}}

    def save(self, path: str | os.PathLike) -> None:
        """Writes an ``.npz`` atomically (a temporary file renamed), so readers never see half a file."""
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(temporary, "wb") as f:
            np.savez(f, example_index=self.example_index, **self.values)
        os.replace(temporary, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ReferenceLogps:
        """Reads an ``.npz`` written by :meth:`save`; raises :class:`DamagedCacheError` naming
        ``path`` when it is truncated, corrupt or not such a file."""
        try:
            with np.load(path) as data:
                values = {key: data[key] for key in data.files if key != "example_index"}
                logps = cls(data["example_index"], values)
        # What numpy and zipfile raise on a truncated or corrupt archive (BadZipFile, a wrong
        # CRC, a short read) or on another file under the name (no example_index, not an archive).
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, KeyError) as error:
            raise DamagedCacheError(f"{path}: {type(error).__name__}: {error}") from error
        columns = {"example_index": logps.example_index, **logps.values}
        lengths = {key: len(column) for key, column in columns.items()}
        if len(set(lengths.values())) != 1:
            raise DamagedCacheError(f"{path}: columns of different lengths {lengths}")
        return logps


def _hash_arrays(digest, named_arrays: Iterable[tuple[str, np.ndarray]]) -> None:
    for name, array in named_arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{name}:{array.dtype}:{array.shape};".encode())
        digest.update(array.tobytes())


def params_fingerprint(params: nnx.State) -> str:
    """SHA-256 of every parameter's path, dtype, shape and bytes (fetched one at a time)."""
    digest = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    _hash_arrays(digest, ((jax.tree_util.keystr(path), jax.device_get(leaf)) for path, leaf in leaves))
    return digest.hexdigest()


def batches_fingerprint(batches: Iterable[Mapping[str, np.ndarray]]) -> str:
    """SHA-256 of every array of every batch, in order."""
    digest = hashlib.sha256()
    for i, batch in enumerate(batches):
        _hash_arrays(digest, ((f"{i}/{key}", batch[key]) for key in sorted(batch) if batch[key] is not None))
    return digest.hexdigest()


def _iterate(batches: Batches) -> Iterable[Mapping[str, np.ndarray]]:
    return batches() if callable(batches) else batches


@functools.partial(jax.jit, static_argnames=("graphdef", "family", "chunk_size", "vocab_chunk_size"))
def _forward(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    other_state: nnx.State,
    batch: dict[str, jax.Array],
    family: Family,
    chunk_size: int,
    vocab_chunk_size: int | None,
) -> dict[str, jax.Array]:  # reference key -> [examples]
    """The reference model's sequence log-probs of one batch (and of its KL batch), in eval mode;
    a LoRA model's reference is its base (adapters off).

    Module-level, so every call with the same model structure reuses one compilation.
    """
    model = base_view(nnx.merge(graphdef, params, other_state))
    model.eval()  # no dropout and the like, should the model have any
    lm_head_options = dict(chunk_size=chunk_size, vocab_chunk_size=vocab_chunk_size)
    main = sub_batch(batch, "")
    outputs = family.reference_columns(packed_logps(model, packed_batch(main), **lm_head_options)[0], main)
    kl_batch = sub_batch(batch, KL_PREFIX)
    if kl_batch:
        outputs[f"{KL_PREFIX}ref_logps"] = packed_logps(model, packed_batch(kl_batch), **lm_head_options)[0]
    return outputs


def compute_reference_logps(
    model: nnx.Module,
    batches: Batches,
    *,
    family: str | Family = "pairwise",
    mesh: Mesh | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    vocab_chunk_size: int | None = None,
    rules: Mapping = LOGICAL_AXIS_RULES,
) -> ReferenceLogps:
    """Runs ``model`` (in eval mode, forward only; a LoRA model with its adapters off, as the train
    step's reference) over ``batches`` and collects per-example log-probs.

    Every batch needs ``example_index``. ``mesh`` (default: all devices on the data axis) splits
    the batches by rows and holds the parameters, sharded by their logical axes (not copied when
    they are placed so already, e.g. by ``from_pretrained(..., mesh=mesh)``).
    """
    family = as_family(family)
    if not family.reference_keys:
        raise ValueError(f"`family`={family.name!r} has no reference log-probs to compute.")
    mesh = make_mesh() if mesh is None else mesh
    graphdef, params, other_state = nnx.split(model, nnx.Param, ...)
    params = jax.device_put(params, param_shardings(params, mesh, rules))
    fields = (*ROW_FIELDS, *SEQUENCE_FIELDS)
    data_keys = tuple(k for k in family.batch_keys(NoReference()) if k not in fields)  # listwise scores, ...
    collected: dict[int, dict[str, float]] = {}
    for batch in _iterate(batches):
        if "example_index" not in batch:
            raise ValueError(f"Every batch needs an 'example_index' key; got {sorted(batch)}.")
        example_index = np.asarray(batch["example_index"]).tolist()
        keys = (*fields, *data_keys, *(KL_PREFIX + f for f in fields))
        inputs = {k: batch[k] for k in keys if batch.get(k) is not None}
        batch_on_mesh = shard_batch(inputs, mesh, rules, family.sequences_per_example(inputs))
        outputs = _forward(graphdef, params, other_state, batch_on_mesh, family, chunk_size, vocab_chunk_size)
        outputs = jax.device_get(outputs)
        for key, values in outputs.items():
            if len(values) != len(example_index):
                raise ValueError(
                    f"`{key}` has {len(values)} sequences but the batch has {len(example_index)} examples; "
                    "KL sequence j must belong to example j."
                )
        for i, index in enumerate(example_index):
            collected[index] = {key: values[i] for key, values in outputs.items()}
    if not collected:
        raise ValueError("`batches` is empty: there is nothing to compute reference log-probs for.")
    example_index = np.array(sorted(collected), np.int64)
    keys = collected[int(example_index[0])].keys()
    values = {key: np.array([collected[i][key] for i in example_index.tolist()], np.float32) for key in keys}
    return ReferenceLogps(example_index, values)


def reference_cache_key(dataset_fingerprint: str, model: nnx.Module, family: str | Family) -> str:
    """Hash of what the reference log-probs depend on: the data, the weights, the architecture."""
    parts = (
        f"version={_CACHE_VERSION}",
        f"family={as_family(family).name}",
        f"data={dataset_fingerprint}",
        # A LoRA model's reference is its base: its adapters do not change the log-probs.
        f"params={params_fingerprint(nnx.state(model, nnx.All(nnx.Param, nnx.Not(LoRAParam))))}",
        f"config={getattr(model, 'config', type(model).__name__)!r}",
    )
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def cached_reference_logps(
    cache_dir: str | os.PathLike,
    model: nnx.Module,
    batches: Batches,
    *,
    family: str | Family = "pairwise",
    dataset_fingerprint: str | None = None,
    **compute_options,
) -> tuple[ReferenceLogps, bool]:
    """The reference log-probs of ``batches`` from ``cache_dir``, computed and stored on a miss.

    Returns ``(logps, from_cache)``. ``dataset_fingerprint`` identifies the data (e.g. a dataset
    version and split); by default it is a hash of all batches, which then must be iterable twice
    (a list, or a function returning a fresh iterator). ``compute_options`` go to
    :func:`compute_reference_logps`.
    """
    if dataset_fingerprint is None:
        if not callable(batches) and iter(batches) is batches:
            raise ValueError(
                "`batches` is a one-shot iterator but hashing it and computing on it takes two passes: "
                "pass a list, a function returning a fresh iterator, or `dataset_fingerprint`."
            )
        dataset_fingerprint = batches_fingerprint(_iterate(batches))
    key = reference_cache_key(dataset_fingerprint, model, family)
    path = pathlib.Path(cache_dir) / f"reference_logps-{key[:32]}.npz"
    if path.exists():
        try:
            logps = ReferenceLogps.load(path)
        except DamagedCacheError as error:
            logger.warning("reference log-probs: the cache file is damaged (%s); computing it again", error)
        else:
            logger.info("reference log-probs: cache hit %s", path)
            return logps, True
    else:
        logger.info("reference log-probs: cache miss, computing %s", path)
    for leftover in path.parent.glob(f".{path.name}.*.tmp"):  # written by a run killed while saving
        leftover.unlink()
    logps = compute_reference_logps(model, batches, family=family, **compute_options)
    logps.save(path)
    return logps, False
