"""Rows of preference data from local files, in the common public layouts.

Where the rows are (:func:`data_files`): JSONL or Parquet files, a folder written by
``datasets``' ``save_to_disk`` (read with pyarrow; ``datasets`` is not needed), or a Hugging Face
hub-layout folder (``data/train-*.parquet``: its train split is read).

Layouts (field names as in the files; ``field_map`` maps ours to a file's, e.g.
``{"chosen": "response_j"}``):

- ``"pairwise"``: ``{prompt, chosen, rejected}``. Without ``prompt``, ``chosen`` / ``rejected`` are
  whole conversations (Anthropic HH strings, or TRL's conversational "implicit prompt" message
  lists) and the prompt is their longest shared prefix ending at the last assistant turn
  (:func:`split_shared_prompt`). Optional ``chosen_ratings`` /
  ``rejected_ratings``: each response's per-attribute ratings (HelpSteer-style helpfulness,
  correctness, ...), lists of numbers in one fixed attribute order, ``null`` for a missing rating
  (multi-objective reward models regress on them).
- ``"unpaired"``: ``{prompt, completion, label}`` with a boolean ``label`` (KTO).
- Optional per-example number columns (:data:`EXAMPLE_COLUMNS`): pairwise ``margin`` (reward
  models' margin), ``target_probability`` (soft preference labels), ``chosen_quality`` /
  ``rejected_quality`` (MMPO); every layout ``user_id`` (an integer, 0 to 2**24 - 1). Numbers
  must fit float32, as they are stored. The train step passes each to
  the objectives that read it.
- ``"ranked"``: ``{prompt, responses, scores}``, two or more responses with one finite score each.
- ``"sft"``: ``{prompt, completion}``, or ``{messages}`` whose last assistant message is the completion
  and the messages before it the prompt (messages after it are ignored).

Each text is a string or a chat message list ``[{"role": ..., "content": ...}, ...]``. When any text
of a row is chat, the whole row is: a string prompt becomes a user message and a string response an
assistant message. Chat responses that repeat the prompt messages first (as in UltraFeedback) have
them removed.

Rows that break these rules are skipped and counted by reason in a
:class:`~jaxpref.data.report.PreparationReport`; a file that cannot be parsed is a ValueError naming
the file and line.

>>> row = parse_row({"chosen": "\\n\\nHuman: 2+2?\\n\\nAssistant: 4", "rejected": "\\n\\nHuman: 2+2?\\n\\nAssistant: 5"},
...                 "pairwise")
>>> row.prompt, row.responses
('\\n\\nHuman: 2+2?\\n\\nAssistant:', (' 4', ' 5'))
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from jaxpref.data.report import (
    EMPTY_RESPONSE,
    IDENTICAL_RESPONSES,
    MISSING_FIELD,
    NO_SHARED_PROMPT,
    SCORES_MISMATCH,
    TOO_FEW_RESPONSES,
    WRONG_TYPE,
    BadRow,
    PreparationReport,
)

Message = dict[str, str]  # {"role": ..., "content": ...}
Text = str | tuple[Message, ...]  # plain text or chat messages

# Fields each layout reads; `field_map` keys must be among them.
LAYOUT_FIELDS = {
    "pairwise": ("prompt", "chosen", "rejected", "chosen_ratings", "rejected_ratings"),
    "unpaired": ("prompt", "completion", "label"),
    "ranked": ("prompt", "responses", "scores"),
    "sft": ("prompt", "completion", "messages"),
}
# Optional per-example number columns of each layout (a finite number, or null for absent).
EXAMPLE_COLUMNS = {
    "pairwise": ("margin", "target_probability", "chosen_quality", "rejected_quality", "user_id"),
    "unpaired": ("user_id",),
    "ranked": ("user_id",),
    "sft": (),
}
LAYOUT_FIELDS = {layout: fields + EXAMPLE_COLUMNS[layout] for layout, fields in LAYOUT_FIELDS.items()}
LAYOUTS = tuple(LAYOUT_FIELDS)
ASSISTANT = "assistant"
HH_ASSISTANT_MARKER = "\n\nAssistant:"  # Anthropic HH's turn marker
PARQUET_BATCH_ROWS = 1024
# Numbers are stored as float32: larger magnitudes would become inf, larger user ids inexact.
FLOAT32_MAX = 3.4028234663852886e38
MAX_USER_ID = 2**24
SPLIT = "train"  # the split of a `datasets` DatasetDict or hub-layout folder that is read
# File kinds a hub-layout folder is searched for, and split names in their paths as the hub writes
# them (`data/train-00000-of-00001.parquet`, `train/0.parquet`). "train_prefs" and the like are
# not the train split: a folder with such splits (UltraFeedback) needs its files named.
FOLDER_SUFFIXES = (".parquet", ".jsonl")
TRAIN_SPLIT = re.compile(r"(?:^|[-._ /])train(?:ing)?(?:[-. /0-9]|$)")
OTHER_SPLIT = re.compile(
    r"(?:^|[-._ /])(?:test|testing|eval|evaluation|valid|validation|val|dev)(?:[-._ /0-9]|$)"
)


@dataclasses.dataclass(frozen=True)
class Row:
    """One parsed row: a prompt and its responses, all strings or all chat messages."""

    prompt: Text
    responses: tuple[Text, ...]  # pairwise: (chosen, rejected); sft / unpaired: (completion,); ranked: K
    label: bool | None = None  # unpaired only
    scores: tuple[float, ...] | None = None  # ranked only, one per response
    source: str = ""  # "file:line", for reports
    # pairwise only, when the row has them: (chosen's, rejected's) per-attribute ratings, NaN if missing
    ratings: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    columns: tuple[tuple[str, float], ...] = ()  # the row's EXAMPLE_COLUMNS values, by name

    @property
    def is_chat(self) -> bool:
        return not isinstance(self.prompt, str)


def check_layout(layout: str, field_map: Mapping[str, str] | None = None) -> None:
    if layout not in LAYOUT_FIELDS:
        raise ValueError(f"`layout` must be one of {LAYOUTS}, got {layout!r}.")
    unknown = set(field_map or ()) - set(LAYOUT_FIELDS[layout])
    if unknown:
        raise ValueError(
            f"`field_map` has keys {sorted(unknown)} that layout {layout!r} does not read; "
            f"its fields are {LAYOUT_FIELDS[layout]}."
        )


def data_files(path: str | os.PathLike) -> list[pathlib.Path]:
    """The files one entry of ``data.train_files`` reads, in order.

    - a file: itself (``.parquet``; ``.arrow``, an Arrow stream; anything else is JSONL);
    - a folder written by ``datasets``' ``save_to_disk``: the Arrow files its ``state.json`` lists,
      or for a ``DatasetDict`` (``dataset_dict.json``) those of its ``train`` split;
    - any other folder (a hub-layout download): its ``.parquet`` / ``.jsonl`` files of the train
      split (``data/train-*.parquet``, ``train/*.parquet``, ...), or all of them when none is named
      after a split. Hidden folders (``.cache``) are not searched.

    Raises ValueError, naming the path and the fix, when there are none.
    """
    path = pathlib.Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ValueError(
            f"{path}: no such file or folder; pass JSONL or Parquet files, a `datasets` save_to_disk "
            "folder or a hub-layout Parquet folder."
        )
    if (path / "dataset_dict.json").is_file():
        if not (path / SPLIT / "state.json").is_file():
            raise ValueError(
                f"{path}: this `datasets` DatasetDict has no {SPLIT!r} split; pass one split's folder instead."
            )
        path = path / SPLIT
    if (path / "state.json").is_file():
        return _saved_dataset_files(path)
    return _hub_split_files(path)


def _saved_dataset_files(folder: pathlib.Path) -> list[pathlib.Path]:
    state = folder / "state.json"
    try:
        files = [folder / entry["filename"] for entry in json.loads(state.read_bytes())["_data_files"]]
    except (ValueError, KeyError, TypeError) as error:  # bad JSON, or not the layout `datasets` writes
        raise ValueError(
            f"{state}: not a `datasets` state file ({type(error).__name__}: {error}); "
            "save the dataset again with `Dataset.save_to_disk`."
        ) from None
    missing = [file.name for file in files if not file.is_file()]
    if missing or not files:
        problem = f"lists {missing[0]}, which is not in the folder" if missing else "lists no data files"
        raise ValueError(f"{state}: {problem}; save the dataset again with `Dataset.save_to_disk`.")
    return files


def _hub_split_files(folder: pathlib.Path) -> list[pathlib.Path]:
    names = {}  # file -> its path in the folder, lower case, as split patterns match it
    for file in sorted(folder.rglob("*")):
        relative = file.relative_to(folder)
        hidden = any(part.startswith(".") for part in relative.parts)
        if file.suffix in FOLDER_SUFFIXES and file.is_file() and not hidden:
            names[file] = relative.with_suffix("").as_posix().lower()
    train = [file for file, name in names.items() if TRAIN_SPLIT.search(name)]
    if not train and not any(OTHER_SPLIT.search(name) for name in names.values()):
        train = list(names)  # no split names at all: the whole folder is the train split
    if not train:
        found = ", ".join(file.relative_to(folder).as_posix() for file in list(names)[:4]) or "none"
        raise ValueError(
            f"{folder}: no train-split {' or '.join(FOLDER_SUFFIXES)} files in this folder (such as "
            f"data/train-00000-of-00001.parquet; found {found}); pass the files themselves."
        )
    return train


def read_records(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """Yields ``(number from 1, record)`` of one entry of ``data.train_files`` (see
    :func:`data_files`): a JSONL file's line numbers, a Parquet or Arrow file's row numbers, or a
    folder's row numbers across its files. Blank JSONL lines are not records; any other unparsable
    line or file is a ValueError naming it."""
    path = pathlib.Path(path)
    files = data_files(path)
    if files == [path]:
        yield from _read_file(path)
        return
    yield from enumerate((record for file in files for _, record in _read_file(file)), 1)


def _read_file(path: pathlib.Path) -> Iterator[tuple[int, Any]]:
    if path.suffix == ".parquet":
        yield from _read_parquet(path)
        return
    if path.suffix == ".arrow":
        yield from _read_arrow(path)
        return
    with path.open("rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            # JSONDecodeError and UnicodeDecodeError are ValueErrors; deep nesting is a RecursionError.
            except (ValueError, RecursionError) as error:
                raise ValueError(
                    f"{path}:{number}: not valid JSON ({type(error).__name__}: {error}); fix or remove that line."
                ) from None
            yield number, record


def _read_parquet(path: pathlib.Path) -> Iterator[tuple[int, Any]]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH_ROWS)
        number = 0
        for batch in batches:
            for record in batch.to_pylist():
                number += 1
                yield number, record
    except pyarrow.ArrowException as error:
        raise ValueError(f"{path}: not a readable Parquet file ({error}).") from None


def _read_arrow(path: pathlib.Path) -> Iterator[tuple[int, Any]]:
    """Rows of an Arrow IPC stream, the format of ``datasets``' ``save_to_disk`` files."""
    import pyarrow
    import pyarrow.ipc

    try:
        with pyarrow.memory_map(str(path)) as source:
            number = 0
            for batch in pyarrow.ipc.open_stream(source):
                for record in batch.to_pylist():
                    number += 1
                    yield number, record
    except pyarrow.ArrowException as error:
        raise ValueError(
            f"{path}: not a readable Arrow stream file ({error}); save the dataset again with "
            "`Dataset.save_to_disk`."
        ) from None


def read_rows(
    files: Iterable[str | os.PathLike],
    layout: str,
    report: PreparationReport,
    *,
    field_map: Mapping[str, str] | None = None,
) -> Iterator[Row]:
    """Parses every record of ``files``, counting it in ``report.rows_read`` and, when it is
    unusable, in ``report.skipped`` instead of yielding it."""
    check_layout(layout, field_map)
    for path in (file for entry in files for file in data_files(entry)):
        # Each file of a folder by itself, so that sources name the file the row is in.
        for number, record in _read_file(path):
            source = f"{path}:{number}"
            report.rows_read += 1
            try:
                row = parse_row(record, layout, field_map, source=source)
            except BadRow as bad:
                report.skip(bad.reason, source, bad.detail)
                continue
            yield row


def parse_row(
    record: Any, layout: str, field_map: Mapping[str, str] | None = None, *, source: str = ""
) -> Row:
    """One record as a :class:`Row` of ``layout``; raises :class:`BadRow` when it is unusable."""
    if not isinstance(record, dict):
        raise BadRow(WRONG_TYPE, f"a row must be an object, got {type(record).__name__}")
    fields = _Fields(record, field_map or {})
    label = scores = ratings = None
    if layout == "pairwise":
        prompt, responses = _pairwise(fields)
        ratings = _pairwise_ratings(fields)
    elif layout == "unpaired":
        prompt, responses = fields.text("prompt"), (fields.text("completion"),)
        label = fields.get("label")
        if isinstance(label, int) and not isinstance(label, bool) and label in (0, 1):
            label = bool(label)  # 0/1 labels are as common as true/false
        if not isinstance(label, bool):
            raise BadRow(
                WRONG_TYPE, f"`{fields.column('label')}` must be true/false or 0/1, got {_short(label)}"
            )
    elif layout == "ranked":
        prompt, responses, scores = _ranked(fields)
    elif layout == "sft":
        prompt, responses = _sft(fields)
    else:
        check_layout(layout)
    prompt, responses = _unify(prompt, responses)
    if any(_is_empty(response) for response in responses):
        raise BadRow(EMPTY_RESPONSE, "a response is empty")
    if len(responses) > 1 and all(response == responses[0] for response in responses):
        raise BadRow(IDENTICAL_RESPONSES, "all responses are the same")
    columns = _example_columns(fields, layout)
    return Row(prompt, responses, label=label, scores=scores, source=source, ratings=ratings, columns=columns)


def _example_columns(fields: _Fields, layout: str) -> tuple[tuple[str, float], ...]:
    values = []
    for name in EXAMPLE_COLUMNS[layout]:
        if not fields.has(name):
            continue
        value = fields.get(name)
        integer = name == "user_id"
        if not _is_finite_number(value) or (
            integer and (float(value) != int(value) or not 0 <= value < MAX_USER_ID)
        ):
            kind = f"an integer from 0 to {MAX_USER_ID - 1}" if integer else "a finite number"
            raise BadRow(WRONG_TYPE, f"`{fields.column(name)}` must be {kind} or null, got {_short(value)}")
        values.append((name, float(value)))
    return tuple(values)


class _Fields:
    """Typed access to a record's fields under their mapped column names."""

    def __init__(self, record: dict[str, Any], field_map: Mapping[str, str]):
        self.record = record
        self.field_map = field_map

    def column(self, name: str) -> str:
        return self.field_map.get(name, name)

    def has(self, name: str) -> bool:
        return self.record.get(self.column(name)) is not None

    def get(self, name: str) -> Any:
        if not self.has(name):
            raise BadRow(MISSING_FIELD, f"no `{self.column(name)}`")
        return self.record[self.column(name)]

    def text(self, name: str) -> Text:
        return _as_text(self.get(name), self.column(name))


def _as_text(value: Any, column: str) -> Text:
    if isinstance(value, str):
        text = value
    elif isinstance(value, list | tuple) and all(_is_message(message) for message in value):
        text = tuple({"role": message["role"], "content": message["content"]} for message in value)
    else:
        raise BadRow(WRONG_TYPE, f"`{column}` must be a string or a list of {{role, content}} messages")
    strings = (text,) if isinstance(text, str) else (s for message in text for s in message.values())
    if not all(_is_unicode(string) for string in strings):
        raise BadRow(
            WRONG_TYPE, f"`{column}` has an unpaired surrogate escape (like \\ud800), which is not text"
        )
    return text


def _is_message(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and isinstance(value.get("role"), str)
        and isinstance(value.get("content"), str)
    )


def _is_unicode(string: str) -> bool:
    """False for strings with lone surrogates (JSON escapes like ``"\\ud800"``): tokenizers reject them."""
    try:
        string.encode()
    except UnicodeEncodeError:
        return False
    return True


def _short(value: Any) -> str:
    """``repr(value)``, cut short: a report line, not a dump of a huge or nested value."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_empty(text: Text) -> bool:
    if isinstance(text, str):
        return not text.strip()
    return all(not message["content"].strip() for message in text)


def _as_chat(text: Text, role: str) -> tuple[Message, ...]:
    if not isinstance(text, str):
        return text
    return ({"role": role, "content": text},) if text else ()


def _unify(prompt: Text, responses: tuple[Text, ...]) -> tuple[Text, tuple[Text, ...]]:
    """All strings, or all chat with leading copies of the prompt messages cut from the responses."""
    if all(isinstance(text, str) for text in (prompt, *responses)):
        return prompt, responses
    prompt = _as_chat(prompt, "user")
    responses = tuple(_as_chat(response, ASSISTANT) for response in responses)
    if prompt:
        responses = tuple(
            response[len(prompt) :] if response[: len(prompt)] == prompt else response
            for response in responses
        )
    return prompt, responses


def _pairwise(fields: _Fields) -> tuple[Text, tuple[Text, ...]]:
    chosen, rejected = fields.text("chosen"), fields.text("rejected")
    if fields.has("prompt"):
        return fields.text("prompt"), (chosen, rejected)
    prompt, chosen, rejected = split_shared_prompt(chosen, rejected)
    return prompt, (chosen, rejected)


RATING_FIELDS = ("chosen_ratings", "rejected_ratings")


def _pairwise_ratings(fields: _Fields) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The chosen and the rejected response's ratings (NaN for a ``null`` or absent side), or None
    when the row has neither field."""
    present = [fields.has(name) for name in RATING_FIELDS]
    if not any(present):
        return None
    sides = []
    for name, has in zip(RATING_FIELDS, present):
        values = fields.get(name) if has else None
        if has and (
            not isinstance(values, list | tuple)
            or not values
            or not all(value is None or _is_finite_number(value) for value in values)
        ):
            raise BadRow(
                WRONG_TYPE, f"`{fields.column(name)}` must be a non-empty list of finite numbers or nulls"
            )
        sides.append(None if values is None else tuple(math.nan if v is None else float(v) for v in values))
    lengths = {len(side) for side in sides if side is not None}
    if len(lengths) > 1:
        raise BadRow(
            SCORES_MISMATCH,
            f"`{fields.column(RATING_FIELDS[0])}` and `{fields.column(RATING_FIELDS[1])}` rate "
            f"{len(sides[0])} and {len(sides[1])} attributes; give both the same attributes (null if missing)",
        )
    count = lengths.pop()
    chosen, rejected = (side if side is not None else (math.nan,) * count for side in sides)
    return chosen, rejected


def split_shared_prompt(chosen: Text, rejected: Text) -> tuple[Text, Text, Text]:
    """``(prompt, chosen response, rejected response)`` of two whole conversations (Anthropic HH).

    The prompt is their longest shared prefix ending at the last assistant turn marker: the text up
    to and including the last ``"\\n\\nAssistant:"`` of the shared prefix, or for chat the shared
    messages up to the last point where both conversations continue with an assistant message.
    Raises :class:`BadRow` when there is no such prompt.
    """
    if isinstance(chosen, str) and isinstance(rejected, str):
        shared = os.path.commonprefix([chosen, rejected])
        cut = shared.rfind(HH_ASSISTANT_MARKER)
        if cut < 0:
            raise BadRow(
                NO_SHARED_PROMPT, f"chosen and rejected share no prefix ending in {HH_ASSISTANT_MARKER!r}"
            )
        end = cut + len(HH_ASSISTANT_MARKER)
        return chosen[:end], chosen[end:], rejected[end:]
    if isinstance(chosen, str) or isinstance(rejected, str):
        raise BadRow(
            WRONG_TYPE, "without a prompt, chosen and rejected must both be strings or both message lists"
        )
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    # Back off to where both conversations continue with an assistant turn.
    while shared > 0 and not (_is_assistant_at(chosen, shared) and _is_assistant_at(rejected, shared)):
        shared -= 1
    if shared == 0:
        raise BadRow(NO_SHARED_PROMPT, "chosen and rejected share no messages before an assistant turn")
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _is_assistant_at(messages: tuple[Message, ...], index: int) -> bool:
    return index < len(messages) and messages[index]["role"] == ASSISTANT


def _ranked(fields: _Fields) -> tuple[Text, tuple[Text, ...], tuple[float, ...]]:
    prompt = fields.text("prompt")
    values, scores = fields.get("responses"), fields.get("scores")
    column, scores_column = fields.column("responses"), fields.column("scores")
    if not isinstance(values, list | tuple):
        raise BadRow(WRONG_TYPE, f"`{column}` must be a list of responses")
    responses = tuple(_as_text(value, f"{column}[{i}]") for i, value in enumerate(values))
    if not isinstance(scores, list | tuple) or not all(_is_finite_number(score) for score in scores):
        raise BadRow(WRONG_TYPE, f"`{scores_column}` must be a list of finite numbers")
    if len(scores) != len(responses):
        raise BadRow(SCORES_MISMATCH, f"{len(responses)} responses but {len(scores)} scores")
    if len(responses) < 2:
        raise BadRow(TOO_FEW_RESPONSES, f"{len(responses)} response(s); ranking needs at least 2")
    return prompt, responses, tuple(float(score) for score in scores)


def _is_finite_number(value: Any) -> bool:
    """A number (not a bool) that float32 holds as a finite value."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return abs(float(value)) <= FLOAT32_MAX
    except OverflowError:  # an int too large for a float
        return False


def _sft(fields: _Fields) -> tuple[Text, tuple[Text, ...]]:
    if not fields.has("messages"):
        return fields.text("prompt"), (fields.text("completion"),)
    messages = fields.text("messages")
    if isinstance(messages, str):
        raise BadRow(
            WRONG_TYPE, f"`{fields.column('messages')}` must be a list of {{role, content}} messages"
        )
    last = max((i for i, message in enumerate(messages) if message["role"] == ASSISTANT), default=None)
    if last is None:
        raise BadRow(MISSING_FIELD, f"no assistant message in `{fields.column('messages')}`")
    return messages[:last], (messages[last : last + 1],)
