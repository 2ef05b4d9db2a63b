"""A tensorflow-datasets builder over local preference files, written as array_record (no TensorFlow).

:func:`prepare_dataset` parses the files (:mod:`jaxpref.data.rows`), tokenises the rows
(:mod:`jaxpref.data.tokenize`) and stores them with :class:`PreferenceFiles`, one TFDS config per
set of inputs: the config name is the layout plus a hash of the files' contents, the tokenizer
(template included), the options and this module's format version. Preparing the same inputs
again reuses the stored dataset, and its stored report.

Stored features of every row (``response_ids`` is flat because ragged TFDS features need
TensorFlow to write):

- ``prompt_ids`` ``[prompt_len]`` int32, ``response_ids`` ``[sum of response lengths]`` int32,
  ``response_lengths`` ``[num_responses]`` int32 (pairwise: chosen, rejected);
- ``prompt`` the rendered prompt text, ``source`` ``"file:line"``;
- ``label`` bool (unpaired), ``scores`` ``[num_responses]`` float32 (ranked);
- ``ratings`` (pairwise) float32: the chosen response's per-attribute ratings then the rejected
  one's (``[2 * attributes]``, NaN where missing), empty for a row without ratings.

The dataset's metadata holds the report, the layout, the pad id and length statistics that
:func:`jaxpref.data.loader.make_loader` uses for its default row length. Plain TFDS reads a
prepared dataset back without this module:
``tfds.data_source("preference_files/<config name>", data_dir=data_dir, split="train")``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import shutil
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from jaxpref.data.report import PreparationReport
from jaxpref.data.rows import EXAMPLE_COLUMNS, check_layout, data_files, read_rows
from jaxpref.data.tokenize import (
    TokenizedRow,
    TokenizeOptions,
    TokenizerLike,
    load_tokenizer,
    tokenize_rows,
    tokenizer_fingerprint,
)

logger = logging.getLogger(__name__)

FORMAT_VERSION = "4"  # bump when the stored features or their meaning change
SPLIT = "train"  # each prepared file set is one split; prepare eval files separately


@dataclasses.dataclass(eq=False)
class PreferenceFilesConfig(tfds.core.BuilderConfig):
    """Inputs of one prepared dataset; ``name`` is ``"<layout>-<hash of the inputs>"``."""

    files: tuple[str, ...] = ()
    layout: str = "pairwise"
    field_map: tuple[tuple[str, str], ...] = ()
    options: TokenizeOptions = TokenizeOptions()


class PreferenceFiles(tfds.core.GeneratorBasedBuilder):
    """Parsed and tokenised rows of local files (:func:`~jaxpref.data.rows.data_files`), one ``train`` split.

    Build with a :class:`PreferenceFilesConfig` and the tokenizer (not part of the config: only its
    fingerprint is, through the config name)::

        builder = PreferenceFiles(config=config, tokenizer=tokenizer, data_dir=data_dir,
                                  file_format="array_record")
    """

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = []  # every config is made by `prepare_dataset` for its inputs

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> None:
        # TFDS looks for a download-checksums file beside the builder's module through
        # `importlib_resources`, a package it does not depend on; these builders download nothing.
        return None

    def __init__(self, *, tokenizer: TokenizerLike | None = None, **kwargs):
        self._tokenizer = tokenizer
        super().__init__(**kwargs)

    # TFDS prints "Downloading and preparing dataset Unknown size ..." and "... downloaded and
    # prepared to ..." to stdout; for local files they say nothing the preparation report does not.
    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass

    def _info(self) -> tfds.core.DatasetInfo:
        ids = lambda: tfds.features.Tensor(shape=(None,), dtype=np.int32)  # noqa: E731
        features = {
            "prompt_ids": ids(),
            "response_ids": ids(),
            "response_lengths": ids(),
            "prompt": tfds.features.Text(),
            "source": tfds.features.Text(),
            # Stable identity of a row (records are stored in hashed order): keys cached reference log-probs.
            "example_index": tfds.features.Scalar(dtype=np.int64),
        }
        layout = self.builder_config.layout
        # EXAMPLE_COLUMNS values in their order, NaN where a row has none.
        features["columns"] = tfds.features.Tensor(shape=(len(EXAMPLE_COLUMNS[layout]),), dtype=np.float32)
        if layout == "unpaired":
            features["label"] = tfds.features.Scalar(dtype=np.bool_)
        elif layout == "ranked":
            features["scores"] = tfds.features.Tensor(shape=(None,), dtype=np.float32)
        elif layout == "pairwise":
            features["ratings"] = tfds.features.Tensor(shape=(None,), dtype=np.float32)
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"{layout} rows of {len(self.builder_config.files)} local file(s), tokenised.",
            features=tfds.features.FeaturesDict(features),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        return {SPLIT: self._generate_examples()}

    def _generate_examples(self) -> Iterator[tuple[str, dict[str, Any]]]:
        config = self.builder_config
        if self._tokenizer is None:
            raise ValueError(
                "Building `PreferenceFiles` needs `tokenizer=`: a tokenizer or its local directory."
            )
        tokenizer = load_tokenizer(self._tokenizer)
        report = PreparationReport(layout=config.layout, files=config.files)
        rows = read_rows(config.files, config.layout, report, field_map=dict(config.field_map))
        stats = _LengthStats()
        for index, row in enumerate(tokenize_rows(rows, tokenizer, report, config.options)):
            stats.add(row)
            yield f"{index:012d}", _example(row, config.layout, index)
        if not report.rows_kept:
            raise ValueError(f"No usable rows in `files`; fix them or the `layout`/`field_map`.\n{report}")
        report.log()
        pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
        self.info.metadata.update(
            # The config name hashes the files' contents, the tokenizer and the options.
            fingerprint=config.name,
            layout=config.layout,
            pad_id=int(pad_id),
            max_length=config.options.max_length,
            stats=dataclasses.asdict(stats),
            report=report.to_dict(),
        )


def _example(row: TokenizedRow, layout: str, index: int) -> dict[str, Any]:
    example = {
        "example_index": index,
        "prompt_ids": row.prompt_ids,
        "response_ids": np.concatenate(row.response_ids),
        "response_lengths": np.array([len(ids) for ids in row.response_ids], np.int32),
        "prompt": row.prompt,
        "source": row.source,
        "columns": np.array([dict(row.columns).get(n, np.nan) for n in EXAMPLE_COLUMNS[layout]], np.float32),
    }
    if layout == "unpaired":
        example["label"] = row.label
    elif layout == "ranked":
        example["scores"] = np.array(row.scores, np.float32)
    elif layout == "pairwise":
        example["ratings"] = np.array(row.ratings or (), np.float32).reshape(-1)
    return example


@dataclasses.dataclass
class _LengthStats:
    """Longest lengths over the kept rows, in tokens: the row lengths the loader must allow."""

    max_prompt_length: int = 0
    max_response_length: int = 0
    max_sequence_length: int = 0  # prompt + one response
    max_shared_length: int = 0  # prompt + all its responses, as in a prefix-shared row
    max_responses: int = 0
    max_ratings: int = 0  # pairwise: attributes rated per response (0: no row has ratings)
    column_rows: dict[str, int] = dataclasses.field(default_factory=dict)  # EXAMPLE_COLUMNS name -> rows having it

    def add(self, row: TokenizedRow) -> None:
        prompt, responses = len(row.prompt_ids), [len(ids) for ids in row.response_ids]
        self.max_prompt_length = max(self.max_prompt_length, prompt)
        self.max_response_length = max(self.max_response_length, *responses)
        self.max_sequence_length = max(self.max_sequence_length, prompt + max(responses))
        self.max_shared_length = max(self.max_shared_length, prompt + sum(responses))
        self.max_responses = max(self.max_responses, len(responses))
        if row.ratings:
            self.max_ratings = max(self.max_ratings, len(row.ratings[0]))
        for name, _ in row.columns:
            self.column_rows[name] = self.column_rows.get(name, 0) + 1


def prepare_dataset(
    files: str | os.PathLike | Sequence[str | os.PathLike],
    layout: str,
    data_dir: str | os.PathLike,
    tokenizer: TokenizerLike,
    *,
    options: TokenizeOptions = TokenizeOptions(),
    field_map: Mapping[str, str] | None = None,
) -> tuple[Any, PreparationReport]:
    """Parses, tokenises and stores ``files`` under ``data_dir``; returns the data source and report.

    The data source is TFDS's ``ArrayRecordDataSource`` of the ``train`` split (random access,
    ``len()``, records as dicts of NumPy arrays), ready for :func:`jaxpref.data.loader.make_loader`.
    The dataset is written once per distinct inputs (see the module docstring); the report is
    logged either way. ``files`` are JSONL / Parquet files or dataset folders
    (:func:`~jaxpref.data.rows.data_files`); a folder's files are hashed, so a changed dataset is
    prepared again. Raises ValueError for missing files, an unknown layout, unparsable files
    (naming file and line) or when no row is usable.
    """
    paths = [files] if isinstance(files, str | os.PathLike) else list(files)
    if not paths:
        raise ValueError("`files` is empty; pass one or more JSONL or Parquet files or dataset folders.")
    resolved = [str(pathlib.Path(path).resolve()) for path in paths]
    check_layout(layout, field_map)
    tokenizer = load_tokenizer(tokenizer)
    field_items = tuple(sorted((field_map or {}).items()))
    fingerprint = _fingerprint(resolved, layout, field_items, options, tokenizer_fingerprint(tokenizer))
    config = PreferenceFilesConfig(
        name=f"{layout}-{fingerprint[:16]}",
        files=tuple(resolved),
        layout=layout,
        field_map=field_items,
        options=options,
    )
    with _quiet_tfds():
        builder = PreferenceFiles(
            config=config, tokenizer=tokenizer, data_dir=os.fspath(data_dir), file_format="array_record"
        )
        if builder.is_prepared():
            report = PreparationReport.from_dict(builder.info.metadata["report"])
            logger.info("Reusing prepared data at %s", builder.data_dir)
            report.log()
        else:
            _remove_incomplete(pathlib.Path(builder.data_dir))
            # TFDS's download/shuffle progress bars say nothing about local files; our report does.
            tfds.display_progress_bar(False)
            builder.download_and_prepare()
            report = PreparationReport.from_dict(builder.info.metadata["report"])
        return builder.as_data_source()[SPLIT], report


@contextlib.contextmanager
def _quiet_tfds() -> Iterator[None]:
    """Only errors from TFDS (its ``absl`` logger) unless its INFO logs are wanted: it warns about
    every config made here ("Using custom data configuration ...") and each new dataset folder."""
    absl = logging.getLogger("absl")
    if absl.getEffectiveLevel() <= logging.INFO:
        yield
        return
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl.setLevel(level)


def _remove_incomplete(dataset_dir: pathlib.Path) -> None:
    """Removes what killed preparations of this dataset left: TFDS builds into
    ``incomplete.<random>_<version>`` beside ``dataset_dir`` and renames it when done."""
    for leftover in dataset_dir.parent.glob("incomplete.*"):
        logger.warning("Removing %s, left by an interrupted data preparation.", leftover)
        shutil.rmtree(leftover)


def _fingerprint(
    files: Sequence[str],
    layout: str,
    field_items: tuple[tuple[str, str], ...],
    options: TokenizeOptions,
    tokenizer_hash: str,
) -> str:
    """A hash of the files' contents (not their paths; a folder's files with their names in it) and
    everything that shapes the stored rows."""
    digest = hashlib.sha256()
    settings = [FORMAT_VERSION, layout, field_items, dataclasses.asdict(options), tokenizer_hash]
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for path in map(pathlib.Path, files):
        for file in data_files(path):
            if file != path:
                digest.update(file.relative_to(path).as_posix().encode() + b"\0")
            with open(file, "rb") as f:
                digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()
