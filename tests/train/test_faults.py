"""Fault injection: kill -9 and SIGTERM at random points, damaged checkpoints and reference caches,
unwritable and full folders, non-finite streaks. Each ends in an exact resume, a fallback with a
warning, or one clear error line within seconds."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import queue
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from flax import nnx

from jaxpref.models.decoder import Decoder
from jaxpref.train import NonFiniteLossError, cached_reference_logps, make_checkpoint_manager, train
from jaxpref.train.checkpoint import CheckpointError
from jaxpref.train.loop import TrainingInterrupted

from .fault_run import MAX_STEPS, SAVE_INTERVAL, STEP_SECONDS, build, run
from .helpers import CONFIG, NUM_EXAMPLES, ListIterator, pair_batch, single_device_mesh

# A failed orbax restore or write leaves TensorStore objects and asyncio callbacks that Python
# reports as unraisable when it collects them; they are not this module's concern.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

ROOT = pathlib.Path(__file__).parents[2]
WAIT = 90  # seconds: the most any one wait below takes (the first run compiles)


@pytest.fixture(scope="module")
def setup():
    return build()


@pytest.fixture(scope="module")
def uninterrupted(setup, tmp_path_factory):
    """The final state and metrics of a run never interrupted."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    return jax.device_get(run(*setup, folder, MAX_STEPS)), metrics_by_step(folder)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The environment of the subprocess runs: a persistent compilation cache, so that only the
    first run compiles."""
    cache = tmp_path_factory.mktemp("jax_cache")
    return {
        **os.environ,
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
    }


class Run:
    """``python -m tests.train.fault_run FOLDER NUM_STEPS`` in a subprocess, its stdout lines on a queue."""

    def __init__(self, folder: pathlib.Path, env: dict[str, str]):
        folder.mkdir(exist_ok=True)
        self.stderr_path = folder / f"stderr-{time.monotonic_ns()}.txt"
        with open(self.stderr_path, "w") as stderr:  # a file: a full pipe would block the run
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tests.train.fault_run", str(folder), str(MAX_STEPS)],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        self.lines: queue.Queue[str | None] = queue.Queue()

        def read():
            for line in self.process.stdout:
                self.lines.put(line.strip())
            self.lines.put(None)  # the end of the output

        threading.Thread(target=read, daemon=True).start()

    def wait_for(self, kind: str, at_least: int = 0) -> int:
        """Waits for the line ``<kind> N`` with N >= ``at_least``; returns N."""
        deadline = time.monotonic() + WAIT
        while True:
            line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            assert line is not None, f"the run ended before '{kind} {at_least}': {self.stderr()[-2000:]}"
            if line.split()[0] == kind and int(line.split()[1]) >= at_least:
                return int(line.split()[1])

    def finish(self) -> int:
        return self.process.wait(timeout=WAIT)

    def stderr(self) -> str:
        return self.stderr_path.read_text()


def metrics_by_step(folder: pathlib.Path) -> list[tuple[int, dict]]:
    """``(step, metrics)`` per line of metrics.jsonl, without the wall-clock throughput."""
    records = [json.loads(line) for line in (folder / "logs" / "metrics.jsonl").read_text().splitlines()]
    return [(r.pop("step"), {k: v for k, v in r.items() if k != "tokens_per_second"}) for r in records]


def test_killed_and_stopped_runs_resume_to_the_uninterrupted_result(uninterrupted, tmp_path, env):
    """kill -9 during a step, kill -9 during a checkpoint write, then SIGTERM: the resumed run's
    final state and metrics.jsonl (every step once) equal those of a run never interrupted."""
    rng = random.Random(0)
    folder = tmp_path / "interrupted"

    killed = Run(folder, env)  # during a step
    killed.wait_for("step", rng.randint(2, 5))
    time.sleep(rng.uniform(0, STEP_SECONDS))
    killed.process.kill()
    killed.finish()

    killed = Run(folder, env)  # while a checkpoint is being written
    killed.wait_for("save", SAVE_INTERVAL * 2)
    time.sleep(rng.uniform(0, 0.03))
    killed.process.kill()
    killed.finish()

    stopped = Run(folder, env)  # SIGTERM: saves at the next step boundary and exits
    step = stopped.wait_for("step", rng.randint(7, 8))
    stopped.process.send_signal(signal.SIGTERM)
    assert stopped.finish() == 128 + signal.SIGTERM, stopped.stderr()[-2000:]
    newest = max(int(p.name) for p in (folder / "checkpoints").iterdir() if p.name.isdigit())
    assert newest >= step  # the step the signal came in, or a later one on a busy machine
    assert f"Stopped by SIGTERM after step {newest}; the newest checkpoint is" in stopped.stderr()

    assert Run(folder, env).finish() == 0

    full, expected = uninterrupted
    got = metrics_by_step(folder)
    assert [s for s, _ in got] == list(range(1, MAX_STEPS + 1))
    assert got == expected
    with np.load(folder / "final.npz") as resumed:
        leaves = jax.tree.leaves(full)
        assert len(resumed.files) == len(leaves)
        for i, leaf in enumerate(leaves):
            np.testing.assert_array_equal(resumed[f"arr_{i}"], leaf)


def _truncate(path: pathlib.Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _largest_array_file(checkpoint: pathlib.Path) -> pathlib.Path:
    return max((checkpoint / "state").rglob("d/*"), key=lambda p: p.stat().st_size)


DAMAGE = {
    "missing _METADATA": lambda checkpoint: (checkpoint / "state" / "_METADATA").unlink(),
    "truncated _METADATA": lambda checkpoint: _truncate(checkpoint / "state" / "_METADATA"),
    "truncated array file": lambda checkpoint: _truncate(_largest_array_file(checkpoint)),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_newest_checkpoint_is_moved_aside_and_the_previous_one_resumed(
    setup, uninterrupted, tmp_path, damage, caplog
):
    run(*setup, tmp_path / "damaged", 6)  # checkpoints 3 and 6
    checkpoints = tmp_path / "damaged" / "checkpoints"
    DAMAGE[damage](checkpoints / "6")

    with caplog.at_level(logging.WARNING, logger="jaxpref.train.checkpoint"):
        resumed = run(*setup, tmp_path / "damaged", MAX_STEPS)
    [warning] = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert warning.startswith(f"Checkpoint {checkpoints / '6'} is damaged (")
    assert warning.endswith(f"moved to {checkpoints / '6.damaged'}; resuming from step 3.")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["12", "6.damaged", "9"]
    full, expected = uninterrupted
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed), full)
    assert metrics_by_step(tmp_path / "damaged") == expected


def test_a_lone_damaged_checkpoint_is_one_clear_error(setup, tmp_path):
    run(*setup, tmp_path, 3)
    (tmp_path / "checkpoints" / "3" / "state" / "_METADATA").unlink()
    with pytest.raises(CheckpointError) as error:
        run(*setup, tmp_path, 6)
    assert str(error.value) == (
        f"Cannot restore checkpoint {tmp_path / 'checkpoints' / '3'}: state/_METADATA is missing. It is "
        "damaged or from a run with another model; move the folder away to start over."
    )
    assert (tmp_path / "checkpoints" / "3").exists()  # not moved: it may be another model's


def test_leftover_temporary_checkpoint_folders_are_removed(tmp_path):
    leftover = tmp_path / "7.orbax-checkpoint-tmp-1234567"
    (leftover / "state").mkdir(parents=True)
    manager = make_checkpoint_manager(tmp_path)
    deadline = time.monotonic() + 10  # orbax removes them in the background, before the first save
    while leftover.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    manager.close()
    assert not leftover.exists()


@contextlib.contextmanager
def read_only_folder(path: pathlib.Path):
    """``path`` as an existing folder that really refuses writes: mode 0o500, or for root (whom
    modes do not stop) the immutable attribute."""
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o500)
        try:
            yield
        finally:
            path.chmod(0o700)
        return
    if (
        shutil.which("chattr") is None
        or subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode
    ):
        pytest.skip("running as root without chattr +i: no folder refuses writes")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_unwritable_checkpoint_folder_fails_at_once_with_one_line(setup, tmp_path):
    train_step, batches = setup
    (tmp_path / "file").write_text("")
    with pytest.raises(
        CheckpointError, match=r"^Cannot write to the checkpoint folder \S+/file/ckpt: Not a directory\.$"
    ):
        make_checkpoint_manager(tmp_path / "file" / "ckpt")

    with read_only_folder(tmp_path / "ro"):
        start = time.monotonic()
        with pytest.raises(CheckpointError) as error:  # orbax alone waited 5 minutes here
            manager = make_checkpoint_manager(tmp_path / "ro", save_interval_steps=2)
            train(
                train_step.init(),
                train_step,
                ListIterator(batches[:4]),
                num_steps=4,
                checkpoint_manager=manager,
                progress=False,
            )
        assert time.monotonic() - start < 10
    assert str(error.value) in (
        f"Cannot write to the checkpoint folder {tmp_path / 'ro'}: {cause}."
        for cause in ("Permission denied", "Operation not permitted")
    )


@contextlib.contextmanager
def small_disk(path: pathlib.Path, size: str):
    """A tmpfs of ``size`` mounted on ``path`` (skips where mounting is not allowed)."""
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode:
        pytest.skip(f"cannot mount a small tmpfs: {mounted.stderr.decode().strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", str(path)], check=True)


@pytest.mark.parametrize(
    "size, message",
    [
        ("64k", r"^The checkpoint folder \S+ has 0\.1 MiB free but a checkpoint takes about 0\.\d MiB: "),
        ("700k", r"^Cannot write a checkpoint to \S+: No space left on device \(RESOURCE_EXHAUSTED\)\.$"),
    ],
    ids=["full at the start", "full at the second save"],
)
def test_full_disk_fails_in_seconds_with_one_line(setup, tmp_path, size, message):
    train_step, batches = setup
    with small_disk(tmp_path / "disk", size):
        start = time.monotonic()
        with pytest.raises(CheckpointError, match=message):
            manager = make_checkpoint_manager(tmp_path / "disk", save_interval_steps=2, max_to_keep=1)
            train(
                train_step.init(),
                train_step,
                ListIterator(batches[:6]),
                num_steps=6,
                checkpoint_manager=manager,
                progress=False,
            )
        assert time.monotonic() - start < 10


def test_no_checkpoint_from_a_skipped_update_replaces_the_last_finite_one(setup, tmp_path, caplog):
    train_step, batches = setup
    poisoned = {**batches[0], "ref_rejected_logps": np.full(NUM_EXAMPLES, np.nan, np.float32)}
    # Saves due at 3 (finite) and 6 (inside the streak 5-7, which reaches the limit of 3).
    sequence = [*batches[:4], poisoned, poisoned, poisoned, batches[4]]
    with caplog.at_level(logging.WARNING, logger="jaxpref.train.loop"), pytest.raises(NonFiniteLossError):
        run(train_step, sequence, tmp_path, len(sequence), max_consecutive_nonfinite=3)
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [3]
    assert (
        "step 6 not checkpointed: its update was skipped for a non-finite loss, so the newest checkpoint "
        "stays step 3" in caplog.text
    )


def test_ctrl_c_saves_at_the_step_boundary_and_restores_the_handlers(setup, tmp_path):
    train_step, batches = setup

    def step_then_ctrl_c(state, batch):
        state, metrics = train_step(state, batch)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGINT)
        calls.append(1)
        return state, metrics

    calls = []
    before = signal.getsignal(signal.SIGINT)
    manager = make_checkpoint_manager(tmp_path, save_interval_steps=100)
    with pytest.raises(TrainingInterrupted) as stopped:
        train(
            train_step.init(),
            step_then_ctrl_c,
            ListIterator(batches),
            num_steps=len(batches),
            checkpoint_manager=manager,
            progress=False,
        )
    assert str(stopped.value) == f"Stopped by SIGINT after step 6; the newest checkpoint is {tmp_path / '6'}."
    assert stopped.value.exit_code == 130
    assert manager.all_steps() == [6]
    assert signal.getsignal(signal.SIGINT) is before
    manager.close()


def test_truncated_reference_cache_is_recomputed_with_a_warning(tmp_path, caplog):
    model, dataset = Decoder(CONFIG, rngs=nnx.Rngs(0)), [pair_batch(0)]
    first, _ = cached_reference_logps(tmp_path, model, dataset, mesh=single_device_mesh())
    [path] = tmp_path.glob("reference_logps-*.npz")
    _truncate(path)
    (tmp_path / f".{path.name}.999.tmp").write_bytes(b"half")  # from a run killed while saving
    with caplog.at_level(logging.WARNING, logger="jaxpref.train.reference"):
        again, from_cache = cached_reference_logps(tmp_path, model, dataset, mesh=single_device_mesh())
    assert not from_cache
    assert f"the cache file is damaged ({path}: BadZipFile: " in caplog.text
    np.testing.assert_array_equal(again.values["ref_chosen_logps"], first.values["ref_chosen_logps"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    assert cached_reference_logps(tmp_path, model, dataset, mesh=single_device_mesh())[1]  # a hit again
