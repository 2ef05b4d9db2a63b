"""Property tests over malformed data: every generated row of every layout either parses into a
well-formed Row or is a BadRow with a named reason, never another exception; whole files of such
rows (JSONL, Parquet, a `datasets` save_to_disk folder, a hub-layout folder) end in counted skips and
a report whose counts add up, through tokenisation too."""

import json
import math
import pathlib
import tempfile

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxpref.data import report as reasons
from jaxpref.data.report import BadRow, PreparationReport
from jaxpref.data.rows import (
    EXAMPLE_COLUMNS,
    FLOAT32_MAX,
    LAYOUT_FIELDS,
    LAYOUTS,
    MAX_USER_ID,
    Row,
    parse_row,
    read_rows,
)
from jaxpref.data.tokenize import tokenize_rows

from .helpers import write_saved_dataset

REASONS = {value for name, value in vars(reasons).items() if name.isupper() and isinstance(value, str)}
ROWS = settings(max_examples=300, deadline=None, database=None)
FILES = settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

# --- values a JSON row may hold -------------------------------------------------------------
texts = st.one_of(
    st.sampled_from(["", " ", "\n", "\ud800", "a\udfffb", "ok", "no"]),  # empty, blank, lone surrogates
    st.text(max_size=6),
)
good_messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]), "content": texts}),
    min_size=1,
    max_size=4,
)
messages = st.one_of(
    good_messages,
    st.lists(  # keys or values missing or of the wrong type
        st.fixed_dictionaries(
            {},
            optional={
                "role": st.one_of(st.sampled_from(["user", "assistant"]), st.none(), st.integers()),
                "content": st.one_of(texts, st.none(), st.integers()),
                "extra": st.integers(),
            },
        ),
        max_size=3,
    ),
)
numbers = st.one_of(
    st.sampled_from(
        [0, 1, -1, 0.5, 2, MAX_USER_ID - 1, MAX_USER_ID, 1e39, -1e39, 1e300, 10**400, -(10**400), 2**64]
    ),
    st.sampled_from([float("nan"), float("inf"), -float("inf"), True, False]),
    st.integers(),
    st.floats(),
)
junk = st.recursive(
    st.none() | st.booleans() | numbers | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
FIELD_VALUES = {  # a field's edge values: often the right kind, often not
    "prompt": st.one_of(texts, messages, junk),
    "chosen": st.one_of(texts, messages, junk),
    "rejected": st.one_of(texts, messages, junk),
    "completion": st.one_of(texts, messages, junk),
    "messages": st.one_of(messages, junk),
    "label": st.one_of(st.booleans(), numbers, junk),
    "responses": st.one_of(st.lists(st.one_of(texts, messages), max_size=4), junk),
    "scores": st.one_of(st.lists(numbers, max_size=4), junk),
    "chosen_ratings": st.one_of(st.lists(st.one_of(numbers, st.none()), max_size=3), junk),
    "rejected_ratings": st.one_of(st.lists(st.one_of(numbers, st.none()), max_size=3), junk),
}
EXTRA = "extra"  # a column no layout reads
USER = [{"role": "user", "content": "q"}]
VALID = {  # well-formed rows, plain and chat, that the records below break a field or three of
    "pairwise": [
        {"prompt": "q", "chosen": "a", "rejected": "b", "margin": 1.0, "user_id": 3},
        {
            "chosen": [*USER, {"role": "assistant", "content": "a"}],
            "rejected": [*USER, {"role": "assistant", "content": "b"}],
        },
        {
            "prompt": "q",
            "chosen": "a",
            "rejected": "b",
            "chosen_ratings": [1, None],
            "rejected_ratings": [0, 2],
        },
    ],
    "unpaired": [
        {"prompt": "q", "completion": "a", "label": True},
        {"prompt": USER, "completion": "a", "label": 0},
    ],
    "ranked": [{"prompt": "q", "responses": ["a", "b", "c"], "scores": [1.0, 0.0, 2]}],
    "sft": [{"prompt": "q", "completion": "a"}, {"messages": [*USER, {"role": "assistant", "content": "a"}]}],
}


@st.composite
def records(draw, layout):
    """A well-formed row with up to three fields dropped or replaced by edge values, or (one time
    in ten) something that is not an object at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(junk)
    record = dict(draw(st.sampled_from(VALID[layout])))
    for name in draw(st.lists(st.sampled_from([*LAYOUT_FIELDS[layout], EXTRA]), unique=True, max_size=3)):
        if draw(st.integers(0, 3)) == 0:
            record.pop(name, None)
        else:
            record[name] = draw(FIELD_VALUES.get(name, st.one_of(numbers, st.none(), junk)))
    return record


def check_row(row: Row, layout: str) -> None:
    """A parsed row is well formed: nothing wrong gets through silently."""
    texts_of_row = [row.prompt, *row.responses]
    assert len({isinstance(text, str) for text in texts_of_row}) == 1  # all plain or all chat
    for text in texts_of_row:
        strings = [text] if isinstance(text, str) else [s for message in text for s in message.values()]
        for string in strings:
            assert isinstance(string, str)
            string.encode()  # valid Unicode
    assert {"pairwise": 2, "unpaired": 1, "sft": 1}.get(layout, len(row.responses)) == len(row.responses)
    assert len(row.responses) >= 2 or layout in ("unpaired", "sft")
    assert not any(response in ("", ()) for response in row.responses)
    assert len(row.responses) == 1 or len(set(map(repr, row.responses))) > 1
    for value in (*(row.scores or ()), *(value for _, value in row.columns)):
        assert math.isfinite(value) and abs(value) <= FLOAT32_MAX
    assert len(row.scores) == len(row.responses) if layout == "ranked" else row.scores is None
    assert {name for name, _ in row.columns} <= set(EXAMPLE_COLUMNS[layout])
    user_id = dict(row.columns).get("user_id", 0)
    assert user_id == int(user_id) and 0 <= user_id < MAX_USER_ID
    for side in row.ratings or ():
        assert all(math.isnan(v) or abs(v) <= FLOAT32_MAX for v in side)
    assert isinstance(row.label, bool) if layout == "unpaired" else row.label is None


@given(st.sampled_from(LAYOUTS).flatmap(lambda layout: st.tuples(st.just(layout), records(layout))))
@ROWS
def test_every_row_parses_or_is_a_bad_row_with_a_reason(layout_and_record):
    layout, record = layout_and_record
    try:
        row = parse_row(record, layout)
    except BadRow as bad:
        assert bad.reason in REASONS, bad.reason
        return
    check_row(row, layout)


def check_files(paths, layout, count, tokenizer):
    """``count`` records in ``paths`` are each kept or skipped once, for a named reason."""
    report = PreparationReport(layout=layout, files=tuple(map(str, paths)))
    rows = list(read_rows(paths, layout, report))
    assert report.rows_read == count == len(rows) + report.rows_skipped
    for row in rows:
        check_row(row, layout)
    kept = list(tokenize_rows(rows, tokenizer, report))
    assert report.rows_kept == len(kept)
    assert report.rows_read == report.rows_kept + report.rows_skipped
    assert set(report.skipped) <= REASONS
    assert all(examples for examples in report.examples.values())
    str(report)  # renders, whatever the rows held


@given(
    st.sampled_from(LAYOUTS).flatmap(
        lambda layout: st.tuples(st.just(layout), st.lists(records(layout), max_size=12))
    )
)
@FILES
def test_jsonl_files_of_malformed_rows_count_every_row(chat_tokenizer, layout_and_records):
    layout, rows = layout_and_records
    with tempfile.TemporaryDirectory() as folder:
        path = pathlib.Path(folder) / "rows.jsonl"
        # json.dumps writes NaN / Infinity and escapes lone surrogates, as Python-made files do.
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        check_files([path], layout, len(rows), chat_tokenizer)


# --- typed columns, as Parquet and Arrow hold them ---------------------------------------------
MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
arrow_texts = st.text(max_size=6) | st.sampled_from(["", " ", "ok"])  # Arrow strings are valid UTF-8
arrow_messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "assistant"]) | st.none() | arrow_texts,
            "content": arrow_texts | st.none(),
        }
    ),
    max_size=3,
)
ARROW_COLUMNS = [  # (type, values of that type)
    (pa.string(), arrow_texts),
    (pa.int64(), st.integers(min_value=-(2**63), max_value=2**63 - 1)),
    (pa.float64(), st.floats(allow_nan=True, allow_infinity=True)),
    (pa.bool_(), st.booleans()),
    (pa.list_(pa.string()), st.lists(arrow_texts, max_size=3)),
    (
        pa.list_(pa.float64()),
        st.lists(st.floats(allow_nan=True, allow_infinity=True) | st.none(), max_size=3),
    ),
    (pa.list_(MESSAGE), arrow_messages),
    (pa.list_(pa.list_(MESSAGE)), st.lists(arrow_messages, max_size=3)),
    (pa.struct([("a", pa.int64())]), st.fixed_dictionaries({"a": st.integers(0, 9)})),
]


@st.composite
def arrow_tables(draw):
    """A layout's well-formed rows with up to three columns dropped or replaced by typed junk."""
    layout = draw(st.sampled_from(LAYOUTS))
    valid = VALID[layout][0]
    num_rows = draw(st.integers(0, 10))
    table = pa.Table.from_pylist([valid] * num_rows, schema=pa.Table.from_pylist([valid]).schema)
    for name in draw(st.lists(st.sampled_from([*LAYOUT_FIELDS[layout], EXTRA]), unique=True, max_size=3)):
        if name in table.column_names:
            table = table.remove_column(table.column_names.index(name))
        if draw(st.integers(0, 3)):
            kind, strategy = draw(st.sampled_from(ARROW_COLUMNS))
            values = draw(st.lists(st.none() | strategy, min_size=num_rows, max_size=num_rows))
            table = table.append_column(pa.field(name, kind), pa.array(values, type=kind))
    return layout, table


@given(arrow_tables(), st.sampled_from(["parquet", "save_to_disk", "hub"]))
@FILES
def test_parquet_and_arrow_folders_of_malformed_rows_count_every_row(chat_tokenizer, layout_and_table, kind):
    layout, table = layout_and_table
    with tempfile.TemporaryDirectory() as folder:
        folder = pathlib.Path(folder)
        if kind == "parquet":
            path = folder / "rows.parquet"
            pq.write_table(table, path)
        elif kind == "save_to_disk":
            path = write_saved_dataset(folder / "saved", table, shards=2)
        else:
            path = folder / "hub"
            (path / "data").mkdir(parents=True)
            half = table.num_rows // 2
            pq.write_table(table.slice(0, half), path / "data" / "train-00000-of-00002.parquet")
            pq.write_table(table.slice(half), path / "data" / "train-00001-of-00002.parquet")
            pq.write_table(table, path / "data" / "test-00000-of-00001.parquet")  # not read
        check_files([path], layout, table.num_rows, chat_tokenizer)
