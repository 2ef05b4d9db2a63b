"""MetricsWriter: JSONL lines, TensorBoard event files and PNG curves, across a resume."""

import json
import math

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


def test_resumed_writer_appends_and_plots_the_whole_run(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        writer.write(1, {"loss": 3.0})
        writer.write(2, {"loss": 2.0})  # logged after the last checkpoint, replayed below
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        writer.write(2, {"loss": 2.5})
        assert writer._history["loss"] == {1: 3.0, 2: 2.5}
        assert writer.plot().exists()
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 2]


def test_progress_bar_shows_loss_and_throughput(capsys):
    bar = ProgressBar(num_steps=3, initial_step=1)  # resumed at step 1
    bar.update({"loss": 0.5, "tokens_per_second": 100.0})
    bar.update({"loss": 0.25, "tokens_per_second": 123.4})
    bar.close()
    final = capsys.readouterr().err.split("\r")[-1]  # tqdm redraws the line in place
    assert "3/3" in final and "loss=0.2500" in final and "tokens_per_s=123" in final, final


def test_disabled_progress_bar_prints_nothing(capsys):
    bar = ProgressBar(num_steps=2, disable=True)
    bar.update({"loss": 0.5})
    bar.close()
    assert capsys.readouterr() == ("", "")
