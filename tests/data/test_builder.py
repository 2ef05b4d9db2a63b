"""The TFDS builder writes array_record without TensorFlow, reads back, and reuses what it built."""

import sys

import pytest
import tensorflow_datasets as tfds

from jaxpref.data import report as reasons
from jaxpref.data.builder import prepare_dataset
from jaxpref.data.tokenize import TokenizeOptions

from .helpers import BOS, CHAR_TOKENIZER, EOS, write_jsonl

ROWS = [
    {"prompt": "1+1=", "chosen": "2", "rejected": "3"},
    {"prompt": "2+2=", "chosen": "4", "rejected": "4"},  # identical_responses
    {"prompt": "3+3=", "chosen": "6", "rejected": "7"},
]


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_builds_array_record_without_tensorflow_and_reads_back(tmp_path, char_tokenizer):
    path = write_jsonl(tmp_path / "prefs.jsonl", ROWS)
    source, report = prepare_dataset(
        path, "pairwise", tmp_path / "data", CHAR_TOKENIZER, options=TokenizeOptions(add_bos=True)
    )
    assert "tensorflow" not in sys.modules
    assert list((tmp_path / "data").rglob("*.array_record-*"))
    assert (report.rows_read, report.rows_kept, report.skipped) == (3, 2, {reasons.IDENTICAL_RESPONSES: 1})

    records = sorted((source[i] for i in range(len(source))), key=lambda record: record["source"])
    assert [record["source"].decode() for record in records] == [f"{path.resolve()}:1", f"{path.resolve()}:3"]
    first = records[0]
    assert first["prompt"].decode() == "1+1="
    assert first["prompt_ids"].tolist() == [BOS, *ids(char_tokenizer, "1+1=")]
    assert first["response_ids"].tolist() == [*ids(char_tokenizer, "2"), EOS, *ids(char_tokenizer, "3"), EOS]
    assert first["response_lengths"].tolist() == [2, 2]
    assert source.dataset_info.metadata["stats"]["max_shared_length"] == 5 + 2 + 2

    # Plain TFDS reads it back too, by name, without the builder class.
    info = source.dataset_info
    by_name = tfds.data_source(f"{info.name}/{info.config_name}", data_dir=tmp_path / "data", split="train")
    assert sorted(by_name[i]["source"] for i in range(len(by_name))) == [r["source"] for r in records]


def test_same_inputs_reuse_the_build_and_changed_inputs_rebuild(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", ROWS)
    source, report = prepare_dataset(path, "pairwise", tmp_path / "data", CHAR_TOKENIZER)
    [written] = (tmp_path / "data").rglob("*.array_record-*")
    built_at = written.stat().st_mtime_ns

    again, report_again = prepare_dataset(path, "pairwise", tmp_path / "data", CHAR_TOKENIZER)
    assert written.stat().st_mtime_ns == built_at
    assert report_again == report and len(again) == len(source)

    prepare_dataset(
        path, "pairwise", tmp_path / "data", CHAR_TOKENIZER, options=TokenizeOptions(max_length=64)
    )
    write_jsonl(path, ROWS[:1])
    changed, _ = prepare_dataset(path, "pairwise", tmp_path / "data", CHAR_TOKENIZER)
    assert len(changed) == 1
    assert len(list((tmp_path / "data").rglob("*.array_record-*"))) == 3


def test_chat_template_change_rebuilds(tmp_path, char_tokenizer, chat_tokenizer):
    rows = [
        {
            "prompt": [{"role": "user", "content": "hi"}],
            "completion": [{"role": "assistant", "content": "yo"}],
        }
    ]
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    plain, _ = prepare_dataset(path, "sft", tmp_path / "data", char_tokenizer)
    chat, _ = prepare_dataset(path, "sft", tmp_path / "data", chat_tokenizer)
    assert plain[0]["prompt"].decode() == "user: hi\nassistant: "
    assert chat[0]["prompt"].decode() == "<s>user: hi;assistant: "


def test_no_usable_rows_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", [ROWS[1]])
    with pytest.raises(ValueError, match="No usable rows"):
        prepare_dataset(path, "pairwise", tmp_path / "data", CHAR_TOKENIZER)


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="missing.jsonl: no such file or folder"):
        prepare_dataset(tmp_path / "missing.jsonl", "pairwise", tmp_path / "data", CHAR_TOKENIZER)
