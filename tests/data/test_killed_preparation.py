"""A data preparation killed with SIGKILL at a random moment leaves nothing a rerun would trust:
the rerun prepares the same dataset as an uninterrupted preparation."""

import os
import signal
import subprocess
import sys
import time

import numpy as np

from jaxpref.data.builder import prepare_dataset

from .helpers import CHAR_TOKENIZER, write_jsonl

PREPARE = """
import sys
from jaxpref.data.builder import prepare_dataset
print("ready", flush=True)
prepare_dataset(sys.argv[1], "pairwise", sys.argv[2], sys.argv[3])
"""


def test_rerun_after_kill_9_during_preparation_equals_a_clean_preparation(tmp_path):
    rows = [{"prompt": f"{i}*{i}=", "chosen": str(i * i), "rejected": str(i + 1)} for i in range(8000)]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    clean, _ = prepare_dataset(data, "pairwise", tmp_path / "clean", CHAR_TOKENIZER)
    rng = np.random.default_rng(0)
    for attempt in range(2):
        process = subprocess.Popen(
            [sys.executable, "-c", PREPARE, str(data), str(tmp_path / "killed"), str(CHAR_TOKENIZER)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert process.stdout.readline().strip() == "ready"  # imports done: the kill lands in preparation
        time.sleep(rng.uniform(0.1, 0.8))
        assert process.poll() is None, "preparation ended before the kill"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    source, report = prepare_dataset(data, "pairwise", tmp_path / "killed", CHAR_TOKENIZER)
    assert report.rows_kept == len(rows) == len(source) == len(clean)
    for index in (0, 4321, len(rows) - 1):
        for key in ("prompt_ids", "response_ids", "example_index"):
            np.testing.assert_array_equal(source[index][key], clean[index][key])
