"""MetricsWriter: JSONL lines, TensorBoard event files and PNG curves, across a resume."""

import json
import math
import sys

import pytest

from jaxpref.train import MetricsWriter, ProgressBar


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_writes_jsonl_tensorboard_and_png(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        for step in range(1, 4):
            writer.write(step, {"loss": 1.0 / step, "rewards/margins": 0.1 * step, "grad_norm": math.nan})
        writer.flush()
        assert writer.plot() == tmp_path / "curves.png"
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[1]["loss"] == 0.5 and math.isnan(records[0]["grad_norm"])
    assert list(tmp_path.glob("events.out.tfevents.*"))
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")


def test_resumed_writer_logs_each_step_once_and_plots_the_whole_run(tmp_path):
    with MetricsWriter(tmp_path, report_to="none") as writer:
        writer.write(1, {"loss": 3.0})
        writer.write(2, {"loss": 2.0})  # logged after the last checkpoint, replayed below
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # a write cut short by kill -9
    with MetricsWriter(tmp_path, report_to="none") as writer:
        assert writer._history["loss"] == {1: 3.0, 2: 2.0}
        writer.rewind(1)  # resumed from the checkpoint of step 1
        writer.write(2, {"loss": 2.5})
        assert writer._history["loss"] == {1: 3.0, 2: 2.5}
        assert writer.plot().exists()
    assert [(r["step"], r["loss"]) for r in read_jsonl(tmp_path / "metrics.jsonl")] == [(1, 3.0), (2, 2.5)]


def test_report_to_is_checked(tmp_path):
    with pytest.raises(ValueError, match="`report_to` takes tensorboard, wandb or 'none'; got tensorbord"):
        MetricsWriter(tmp_path, report_to=("tensorbord",))


def test_progress_bar_shows_loss_and_throughput(capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # a terminal: a tqdm bar
    bar = ProgressBar(num_steps=3, initial_step=1)  # resumed at step 1
    bar.update({"loss": 0.5, "tokens_per_second": 100.0})
    bar.update({"loss": 0.25, "tokens_per_second": 123.4})
    bar.close()
    final = capsys.readouterr().err.split("\r")[-1]  # tqdm redraws the line in place
    assert "3/3" in final and "loss=0.2500" in final and "tokens_per_s=123" in final, final


def test_progress_off_a_terminal_is_a_line_per_tenth_of_the_run(capsys):
    bar = ProgressBar(num_steps=30, initial_step=5)  # resumed at step 5
    for step in range(6, 31):
        bar.update({"loss": 1.0 / step, "tokens_per_second": 100.0})
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" (")[0] for line in lines] == [f"step {s}/30" for s in range(6, 31, 3)]
    assert lines[-1].startswith("step 30/30 (100%): loss 0.0333, 100 tokens/s, 00:00 elapsed"), lines[-1]


def test_disabled_progress_bar_prints_nothing(capsys):
    bar = ProgressBar(num_steps=2, disable=True)
    bar.update({"loss": 0.5})
    bar.close()
    assert capsys.readouterr() == ("", "")


def wandb_history(path):
    """The logged rows of an offline W&B run file: LevelDB-style log records (7-byte headers in
    32 KiB blocks) holding protobuf ``Record`` messages."""
    from wandb.proto import wandb_internal_pb2

    data, block, position, payload, rows = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's zero-padded tail
            position += block - position % block
            continue
        length, kind = int.from_bytes(data[position + 4 : position + 6], "little"), data[position + 6]
        payload += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or its last piece
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            payload = b""
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {
                        item.key or "/".join(item.nested_key): json.loads(item.value_json)
                        for item in record.history.item
                    }
                )
    return rows


def test_wandb_offline_gets_every_step_and_a_resumed_writer_continues_the_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    with MetricsWriter(tmp_path, report_to="wandb", wandb_options={"config": {"beta": 0.1}}) as writer:
        writer.write(1, {"loss": 0.5, "rewards/margins": 0.1})
        writer.write(2, {"loss": 0.25, "rewards/margins": 0.2})
    with MetricsWriter(tmp_path, report_to=["wandb"]) as writer:
        writer.rewind(2)
        writer.write(3, {"loss": 0.125, "rewards/margins": 0.3})
    run_id = (tmp_path / "wandb_run_id").read_text()
    files = sorted(
        tmp_path.glob(f"wandb/offline-run-*/run-{run_id}.wandb"), key=lambda p: p.stat().st_mtime_ns
    )
    assert len(files) == 2  # one W&B run, resumed once
    rows = [row for path in files for row in wandb_history(path)]
    assert [(row["step"], row["loss"], row["rewards/margins"]) for row in rows] == [
        (1, 0.5, 0.1),
        (2, 0.25, 0.2),
        (3, 0.125, 0.3),
    ]
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def test_wandb_missing_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what an uninstalled package looks like to import
    with pytest.raises(
        ImportError,
        match=r"^`report_to` includes 'wandb' but the wandb package is not installed: pip install wandb$",
    ):
        MetricsWriter(tmp_path, report_to="wandb")
