"""Data where users keep it: `datasets` save_to_disk folders (read without `datasets`), hub-layout
Parquet folders (their train split), and TRL's standard preference formats; the prepared dataset
is keyed by the folder's contents."""

import json
import logging
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jaxpref.data import report as reasons
from jaxpref.data.builder import prepare_dataset
from jaxpref.data.report import PreparationReport
from jaxpref.data.rows import data_files, parse_row, read_records, read_rows

from .helpers import CHAR_TOKENIZER, write_jsonl, write_saved_dataset


def msg(role, content):
    return {"role": role, "content": content}


# TRL's conversational preference rows with an implicit prompt: the shared first messages.
CONVERSATIONS = [
    {
        "chosen": [msg("user", "What color is the sky?"), msg("assistant", "It is blue.")],
        "rejected": [msg("user", "What color is the sky?"), msg("assistant", "It is green.")],
    },
    {
        "chosen": [msg("system", "Be brief."), msg("user", "2+2?"), msg("assistant", "4")],
        "rejected": [msg("system", "Be brief."), msg("user", "2+2?"), msg("assistant", "5")],
    },
    {  # the same answer twice: identical_responses
        "chosen": [msg("user", "hi"), msg("assistant", "yo")],
        "rejected": [msg("user", "hi"), msg("assistant", "yo")],
    },
]
PAIRS = [{"prompt": f"{i}+{i}=", "chosen": str(2 * i), "rejected": str(2 * i + 1)} for i in range(5)]


def read(paths, layout="pairwise"):
    report = PreparationReport(layout=layout, files=tuple(map(str, paths)))
    return list(read_rows(paths, layout, report)), report


def test_trl_formats_explicit_and_implicit_prompt():
    standard = parse_row({"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}, "pairwise")
    assert (standard.prompt, standard.responses) == ("The sky is", (" blue.", " green."))
    explicit = parse_row(
        {
            "prompt": [msg("user", "What color is the sky?")],
            "chosen": [msg("assistant", "It is blue.")],
            "rejected": [msg("assistant", "It is green.")],
        },
        "pairwise",
    )
    implicit = parse_row(CONVERSATIONS[0], "pairwise")
    assert implicit == explicit
    assert implicit.prompt == (msg("user", "What color is the sky?"),)
    multi = parse_row(CONVERSATIONS[1], "pairwise")
    assert multi.prompt == (msg("system", "Be brief."), msg("user", "2+2?"))
    assert multi.responses == ((msg("assistant", "4"),), (msg("assistant", "5"),))
    # A later turn differs: the prompt is everything up to the last assistant turn both share.
    turns = [msg("user", "a"), msg("assistant", "b"), msg("user", "c")]
    row = parse_row(
        {"chosen": [*turns, msg("assistant", "good")], "rejected": [*turns, msg("assistant", "bad")]},
        "pairwise",
    )
    assert row.prompt == tuple(turns)


def test_save_to_disk_folders_written_by_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    conversations = datasets.Dataset.from_list(CONVERSATIONS)
    conversations.save_to_disk(tmp_path / "single", num_shards=2)
    rows, report = read([tmp_path / "single"])
    assert [row.prompt for row in rows] == [parse_row(r, "pairwise").prompt for r in CONVERSATIONS[:2]]
    shards = [tmp_path / "single" / f"data-0000{i}-of-00002.arrow" for i in range(2)]
    assert [row.source for row in rows] == [f"{shards[0]}:1", f"{shards[0]}:2"]
    assert (report.rows_read, report.skipped) == (3, {reasons.IDENTICAL_RESPONSES: 1})
    assert report.examples[reasons.IDENTICAL_RESPONSES] == [f"{shards[1]}:1: all responses are the same"]

    pairs = datasets.Dataset.from_list(PAIRS)
    datasets.DatasetDict({"test": pairs.select([0]), "train": pairs.select(range(1, 5))}).save_to_disk(
        tmp_path / "dict"
    )
    assert [record["prompt"] for _, record in read_records(tmp_path / "dict")] == [
        "1+1=",
        "2+2=",
        "3+3=",
        "4+4=",
    ]


def test_save_to_disk_folder_layout_without_datasets(tmp_path):
    folder = write_saved_dataset(tmp_path / "saved" / "train", pa.Table.from_pylist(PAIRS), shards=2)
    (tmp_path / "saved" / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    assert data_files(tmp_path / "saved") == [
        folder / "data-00000-of-00002.arrow",
        folder / "data-00001-of-00002.arrow",
    ]
    # A folder's records are numbered across its files; rows name the file they are in.
    assert [number for number, _ in read_records(tmp_path / "saved")] == [1, 2, 3, 4, 5]
    rows, _ = read([tmp_path / "saved"])
    assert [row.prompt for row in rows] == [pair["prompt"] for pair in PAIRS]
    assert rows[3].source == f"{folder / 'data-00001-of-00002.arrow'}:1"


def test_hub_parquet_folder_reads_its_train_split(tmp_path):
    data = tmp_path / "hub" / "data"
    data.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(PAIRS[:2]), data / "train-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(PAIRS[2:4]), data / "train-00001-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(PAIRS[4:]), data / "test-00000-of-00001.parquet")
    hidden = tmp_path / "hub" / ".cache" / "huggingface"  # what `huggingface-cli download` leaves
    hidden.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(PAIRS), hidden / "train.parquet")
    (tmp_path / "hub" / "README.md").write_text("# a dataset card")
    rows, report = read([tmp_path / "hub"])
    assert [row.prompt for row in rows] == [pair["prompt"] for pair in PAIRS[:4]]
    assert rows[2].source == f"{data / 'train-00001-of-00002.parquet'}:1"

    # Files named after no split at all are all read; only other splits' files is an error.
    (tmp_path / "parts").mkdir()
    for i in range(2):
        pq.write_table(pa.Table.from_pylist(PAIRS[i : i + 1]), tmp_path / "parts" / f"part-{i}.parquet")
    assert len(read([tmp_path / "parts"])[0]) == 2
    # UltraFeedback's splits: which of them is meant is for the user to say.
    for shard in data.glob("train-*"):
        shard.unlink()
    for split in ("train_prefs", "train_sft"):
        pq.write_table(pa.Table.from_pylist(PAIRS), data / f"{split}-00000-of-00001.parquet")
    with pytest.raises(
        ValueError, match=r"hub: no train-split .parquet or .jsonl files .*found data/test-0000"
    ):
        read([tmp_path / "hub"])


def test_bad_folders_name_the_path_and_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"nowhere: no such file or folder; pass JSONL or Parquet files"):
        data_files(tmp_path / "nowhere")
    write_saved_dataset(tmp_path / "dict" / "test", pa.Table.from_pylist(PAIRS))
    (tmp_path / "dict" / "dataset_dict.json").write_text(json.dumps({"splits": ["test"]}))
    with pytest.raises(ValueError, match=r"dict: this `datasets` DatasetDict has no 'train' split"):
        data_files(tmp_path / "dict")
    folder = write_saved_dataset(tmp_path / "saved", pa.Table.from_pylist(PAIRS))
    (folder / "data-00000-of-00001.arrow").write_bytes(b"not arrow")
    with pytest.raises(ValueError, match=r"data-00000-of-00001.arrow: not a readable Arrow stream file"):
        read([folder])
    (folder / "data-00000-of-00001.arrow").unlink()
    with pytest.raises(
        ValueError, match=r"state.json: lists data-00000-of-00001.arrow, which is not in the folder"
    ):
        data_files(folder)
    (folder / "state.json").write_text('{"_data_files": "nope"}')
    with pytest.raises(ValueError, match=r"state.json: not a `datasets` state file \(TypeError"):
        data_files(folder)


def test_prepares_a_folder_once_per_contents_quietly(tmp_path, chat_tokenizer, capsys, caplog):
    folder = write_saved_dataset(tmp_path / "saved", pa.Table.from_pylist(CONVERSATIONS))
    configs = tmp_path / "data" / "preference_files"
    caplog.set_level(logging.INFO, logger="jaxpref")
    source, report = prepare_dataset(folder, "pairwise", tmp_path / "data", chat_tokenizer)
    assert (report.rows_kept, report.skipped) == (2, {reasons.IDENTICAL_RESPONSES: 1})
    prompts = sorted(source[i]["prompt"].decode() for i in range(len(source)))
    assert prompts == [
        "<s>system: Be brief.;user: 2+2?;assistant: ",
        "<s>user: What color is the sky?;assistant: ",
    ]
    # TFDS prints nothing; the report is logged once.
    assert capsys.readouterr().out == ""
    assert [r.getMessage() for r in caplog.records].count(f"Data preparation: {report}") == 1

    # A changed folder is prepared again; the same one is reused.
    write_saved_dataset(folder, pa.Table.from_pylist(CONVERSATIONS[:1]))
    changed, _ = prepare_dataset(folder, "pairwise", tmp_path / "data", chat_tokenizer)
    assert len(changed) == 1
    assert len(list(configs.iterdir())) == 2
    again, _ = prepare_dataset(folder, "pairwise", tmp_path / "data", chat_tokenizer)
    assert again.dataset_info.config_name == changed.dataset_info.config_name


def test_preparing_removes_what_a_killed_preparation_left(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", PAIRS)
    prepare_dataset(path, "pairwise", tmp_path / "data", CHAR_TOKENIZER)
    [config_dir] = (tmp_path / "data" / "preference_files").iterdir()
    # Killed before TFDS renamed its build folder into place: no dataset, a leftover.
    shutil.rmtree(config_dir / "1.0.0")
    (config_dir / "incomplete.ABC123_1.0.0" / "junk").mkdir(parents=True)
    source, _ = prepare_dataset(path, "pairwise", tmp_path / "data", CHAR_TOKENIZER)
    assert len(source) == len(PAIRS)
    assert sorted(child.name for child in config_dir.iterdir()) == ["1.0.0"]
