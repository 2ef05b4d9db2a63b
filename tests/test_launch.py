"""`jaxpref launch`: several local JAX processes of one run, stopped together when one dies."""

import json
import os
import signal
import subprocess
import threading
import time

import pytest

from jaxpref import launch as launch_module
from jaxpref.cli import main
from jaxpref.data.synthetic import SortingTask, sft_rows, write_jsonl


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    rows = sft_rows(SortingTask(corruption_rate=0.0), 32, seed=0)
    pairs = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": r["completion"][::-1] + "0"} for r in rows]
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", pairs)


def test_two_processes_train_one_run(pairs_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = ["dpo", f"--data={pairs_file}", "--steps=2", "--set=data.batch_size=4", "--set=train.progress=false"]
    assert main(["launch", "--processes=2", "--", *run]) == 0
    lines = (tmp_path / "runs" / "dpo" / "metrics" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]  # written once, by process 0
    assert (tmp_path / "runs" / "dpo" / "hf" / "model.safetensors").exists()


def test_a_dead_process_stops_the_others(pairs_file, tmp_path, monkeypatch):
    """kill -9 one process mid-run: the launcher stops its peer (which would wait in a collective)
    and reports the lost process with a shell-style status."""
    monkeypatch.chdir(tmp_path)
    started = []
    popen = subprocess.Popen
    monkeypatch.setattr(launch_module.subprocess, "Popen", lambda *a, **k: started.append(popen(*a, **k)) or started[-1])
    run = ["dpo", f"--data={pairs_file}", "--steps=100000", "--set=data.batch_size=4", "--set=train.progress=false"]
    result = {}
    thread = threading.Thread(target=lambda: result.update(code=launch_module.launch(run, 2, 2)))
    thread.start()
    time.sleep(15)  # imports, data preparation, the first steps
    os.kill(started[1].pid, signal.SIGKILL)
    killed = time.monotonic()
    thread.join(timeout=60)
    assert not thread.is_alive() and result["code"] == 128 + signal.SIGKILL
    assert time.monotonic() - killed < 60
    assert all(worker.poll() is not None for worker in started)
