"""Row layouts parse from JSONL and Parquet; bad rows are counted by reason; bad files name the line."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jaxpref.data import report as reasons
from jaxpref.data.report import BadRow, PreparationReport
from jaxpref.data.rows import parse_row, read_rows, split_shared_prompt

from .helpers import write_jsonl

USER, ASSISTANT = "user", "assistant"


def msg(role, content):
    return {"role": role, "content": content}


def test_pairwise_strings():
    row = parse_row({"prompt": "2+2=", "chosen": "4", "rejected": "5"}, "pairwise")
    assert (row.prompt, row.responses, row.is_chat) == ("2+2=", ("4", "5"), False)


def test_pairwise_chat_messages():
    record = {
        "prompt": [msg(USER, "hi")],
        "chosen": [msg(ASSISTANT, "hello")],
        "rejected": [msg(ASSISTANT, "go away")],
    }
    row = parse_row(record, "pairwise")
    assert row.is_chat
    assert row.prompt == (msg(USER, "hi"),)
    assert row.responses == ((msg(ASSISTANT, "hello"),), (msg(ASSISTANT, "go away"),))


def test_string_prompt_with_chat_responses_repeating_it():
    # UltraFeedback's layout: a string prompt, and conversations that start with it.
    record = {
        "prompt": "hi",
        "chosen": [msg(USER, "hi"), msg(ASSISTANT, "hello")],
        "rejected": [msg(USER, "hi"), msg(ASSISTANT, "bye")],
    }
    row = parse_row(record, "pairwise")
    assert row.prompt == (msg(USER, "hi"),)
    assert row.responses == ((msg(ASSISTANT, "hello"),), (msg(ASSISTANT, "bye"),))


def test_hh_strings_prompt_ends_at_last_shared_assistant_marker():
    history = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help?\n\nAssistant:"
    # The responses share their first characters; the prompt still ends at the marker.
    prompt, chosen, rejected = split_shared_prompt(history + " sure thing", history + " sorry")
    assert (prompt, chosen, rejected) == (history, " sure thing", " sorry")
    row = parse_row({"chosen": history + " sure thing", "rejected": history + " sorry"}, "pairwise")
    assert row.prompt == history


def test_hh_messages_prompt_is_shared_messages_before_assistant_turn():
    shared = [msg(USER, "a"), msg(ASSISTANT, "b"), msg(USER, "c")]
    chosen = [*shared, msg(ASSISTANT, "good")]
    rejected = [*shared, msg(ASSISTANT, "bad")]
    prompt, good, bad = split_shared_prompt(tuple(chosen), tuple(rejected))
    assert prompt == tuple(shared)
    assert (good, bad) == ((msg(ASSISTANT, "good"),), (msg(ASSISTANT, "bad"),))


@pytest.mark.parametrize(
    "chosen, rejected",
    [("hello", "bye"), ((msg(ASSISTANT, "x"),), (msg(ASSISTANT, "y"),))],
)
def test_hh_without_shared_prompt_is_a_bad_row(chosen, rejected):
    with pytest.raises(BadRow) as error:
        split_shared_prompt(chosen, rejected)
    assert error.value.reason == reasons.NO_SHARED_PROMPT


def test_unpaired():
    row = parse_row({"prompt": "q", "completion": "a", "label": False}, "unpaired")
    assert (row.prompt, row.responses, row.label) == ("q", ("a",), False)


def test_ranked():
    row = parse_row({"prompt": "q", "responses": ["a", "b", "c"], "scores": [1, 0.5, 2.0]}, "ranked")
    assert row.responses == ("a", "b", "c")
    assert row.scores == (1.0, 0.5, 2.0)


def test_sft_prompt_completion_and_messages():
    row = parse_row({"prompt": "q", "completion": "a"}, "sft")
    assert (row.prompt, row.responses) == ("q", ("a",))
    messages = [msg("system", "s"), msg(USER, "q"), msg(ASSISTANT, "a")]
    row = parse_row({"messages": messages}, "sft")
    assert row.prompt == tuple(messages[:2])
    assert row.responses == ((messages[2],),)


def test_field_map_renames_columns():
    record = {"question": "q", "response_j": "good", "response_k": "bad"}
    field_map = {"prompt": "question", "chosen": "response_j", "rejected": "response_k"}
    row = parse_row(record, "pairwise", field_map)
    assert (row.prompt, row.responses) == ("q", ("good", "bad"))


def test_bad_rows_are_counted_by_reason(tmp_path):
    rows = [
        {"prompt": "q", "chosen": "a", "rejected": "b"},  # kept
        {"prompt": "q", "chosen": "a"},  # missing_field
        {"prompt": "q", "chosen": " ", "rejected": "b"},  # empty_response
        {"prompt": "q", "chosen": "same", "rejected": "same"},  # identical_responses
        {"prompt": "q", "chosen": 3, "rejected": "b"},  # wrong_type
        {"prompt": "q", "chosen": [{"role": "assistant"}], "rejected": "b"},  # wrong_type
        ["not", "an", "object"],  # wrong_type
        {"chosen": "hello", "rejected": "bye"},  # no_shared_prompt
        {"prompt": "q", "chosen": "a", "rejected": "c"},  # kept
    ]
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    report = PreparationReport(layout="pairwise", files=(str(path),))
    kept = list(read_rows([path], "pairwise", report))
    assert [row.source for row in kept] == [f"{path}:1", f"{path}:9"]
    assert report.rows_read == len(rows)
    assert report.skipped == {
        reasons.MISSING_FIELD: 1,
        reasons.EMPTY_RESPONSE: 1,
        reasons.IDENTICAL_RESPONSES: 1,
        reasons.WRONG_TYPE: 3,
        reasons.NO_SHARED_PROMPT: 1,
    }
    assert report.examples[reasons.MISSING_FIELD] == [f"{path}:2: no `rejected`"]
    assert "wrong_type: 3" in str(report)


@pytest.mark.parametrize(
    "layout, record, reason",
    [
        ("unpaired", {"prompt": "q", "completion": "a", "label": "yes"}, reasons.WRONG_TYPE),
        ("unpaired", {"prompt": "q", "completion": "a"}, reasons.MISSING_FIELD),
        ("ranked", {"prompt": "q", "responses": ["a", "b"], "scores": [1.0]}, reasons.SCORES_MISMATCH),
        ("ranked", {"prompt": "q", "responses": ["a"], "scores": [1.0]}, reasons.TOO_FEW_RESPONSES),
        (
            "ranked",
            {"prompt": "q", "responses": ["a", "b"], "scores": [1.0, float("nan")]},
            reasons.WRONG_TYPE,
        ),
        ("sft", {"messages": [{"role": "user", "content": "q"}]}, reasons.MISSING_FIELD),
        ("sft", {"prompt": "q", "completion": ""}, reasons.EMPTY_RESPONSE),
        ("pairwise", {"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}, reasons.WRONG_TYPE),
        ("pairwise", {"prompt": "q", "chosen": "a", "rejected": "b", "chosen_quality": float("inf")}, reasons.WRONG_TYPE),
        ("unpaired", {"prompt": "q", "completion": "a", "label": True, "user_id": 1.5}, reasons.WRONG_TYPE),
    ],
)
def test_layout_specific_bad_rows(layout, record, reason):
    with pytest.raises(BadRow) as error:
        parse_row(record, layout)
    assert error.value.reason == reason


def test_example_columns_are_read_by_name():
    record = {"prompt": "q", "chosen": "a", "rejected": "b", "chosen_quality": 0.75, "user_id": 3, "margin": None}
    assert parse_row(record, "pairwise").columns == (("chosen_quality", 0.75), ("user_id", 3.0))


def test_bad_json_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "q", "completion": "a"}\n\n{"prompt": "q", "completion": \n')
    report = PreparationReport(layout="sft", files=(str(path),))
    with pytest.raises(ValueError, match=rf"{path}:3: not valid JSON"):
        list(read_rows([path], "sft", report))


def test_parquet_rows_with_chat_messages(tmp_path):
    records = [
        {"prompt": [msg(USER, "hi")], "chosen": [msg(ASSISTANT, "yo")], "rejected": [msg(ASSISTANT, "no")]},
        {"prompt": [msg(USER, "ok")], "chosen": [msg(ASSISTANT, "a")], "rejected": [msg(ASSISTANT, "a")]},
    ]
    path = tmp_path / "prefs.parquet"
    pq.write_table(pa.Table.from_pylist(records), path)
    report = PreparationReport(layout="pairwise", files=(str(path),))
    [row] = read_rows([path], "pairwise", report)
    assert row.prompt == (msg(USER, "hi"),)
    assert row.source == f"{path}:1"
    assert report.skipped == {reasons.IDENTICAL_RESPONSES: 1}


def test_unreadable_parquet_is_a_value_error(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"not parquet")
    report = PreparationReport(layout="sft", files=(str(path),))
    with pytest.raises(ValueError, match="broken.parquet: not a readable Parquet file"):
        list(read_rows([path], "sft", report))


def test_unknown_layout_and_field_map_key_are_errors(tmp_path):
    report = PreparationReport(layout="x", files=())
    with pytest.raises(ValueError, match="`layout` must be one of"):
        list(read_rows([], "dpo", report))
    with pytest.raises(ValueError, match="`field_map` has keys \\['label'\\]"):
        list(read_rows([], "sft", report, field_map={"label": "y"}))


def test_integer_labels_zero_and_one_are_booleans():
    for value in (0, 1):
        row = parse_row({"prompt": "q", "completion": "a", "label": value}, "unpaired")
        assert row.label is bool(value)


def test_deeply_nested_json_names_file_and_line(tmp_path):
    path = tmp_path / "nested.jsonl"
    path.write_text('{"prompt": "q", "completion": "a"}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    report = PreparationReport(layout="sft", files=(str(path),))
    with pytest.raises(ValueError, match=rf"{path}:2: not valid JSON \(RecursionError"):
        list(read_rows([path], "sft", report))


@pytest.mark.parametrize(
    "column, value",
    [("margin", 10**400), ("margin", 1e39), ("user_id", -1), ("user_id", 2**24), ("user_id", 2**70)],
)
def test_numbers_float32_cannot_hold_are_bad_rows(column, value):
    # Stored as float32: these would become inf or a different user id.
    with pytest.raises(BadRow, match=f"`{column}` must be") as error:
        parse_row({"prompt": "q", "chosen": "a", "rejected": "b", column: value}, "pairwise")
    assert error.value.reason == reasons.WRONG_TYPE


def test_lone_surrogates_are_bad_rows():
    record = json.loads('{"prompt": "q\\ud800", "completion": "a"}')
    with pytest.raises(BadRow, match="`prompt` has an unpaired surrogate") as error:
        parse_row(record, "sft")
    assert error.value.reason == reasons.WRONG_TYPE
