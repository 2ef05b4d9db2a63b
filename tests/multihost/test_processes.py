"""Several JAX processes really training together on one CPU machine (gloo collectives).

2 processes x 2 devices must train exactly like 1 process x 4 devices on the same global batches:
same loss trajectory and final parameters (1e-5) for SFT, DPO, a reward model and a listwise
objective, on meshes (data=2, fsdp=2) and (fsdp=4). Every wait is bounded, so a hung collective
fails the test instead of hanging CI.
"""

from __future__ import annotations

import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: pathlib.Path, processes: int) -> list[subprocess.Popen]:
    port = free_port()
    return [
        subprocess.Popen(
            [sys.executable, "-m", "tests.multihost.worker", str(out), str(processes), str(i), str(port)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(processes)
    ]


def finish(workers: list[subprocess.Popen]) -> None:
    try:
        outputs = [w.communicate(timeout=TIMEOUT_S)[0] for w in workers]
    finally:
        for w in workers:
            w.kill()
    for i, (w, output) in enumerate(zip(workers, outputs)):
        assert w.returncode == 0, f"process {i} exited with {w.returncode}:\n{output[-3000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("multihost")
    one, two = folder / "one.npz", folder / "two.npz"
    workers = launch(two, 2) + launch(one, 1)
    finish(workers)
    return dict(np.load(one)), dict(np.load(two))


def test_two_processes_train_like_one(runs):
    one, two = runs
    assert sorted(one) == sorted(two)
    for key in sorted(one):
        np.testing.assert_allclose(two[key], one[key], atol=1e-5, rtol=0, err_msg=key)
    for mesh in ("data2_fsdp2", "fsdp4"):
        for name in ("sft", "dpo", "reward", "listwise"):
            losses = one[f"{mesh}/{name}/losses"]
            assert np.all(np.isfinite(losses)) and not np.allclose(losses, losses[0]), (mesh, name)
