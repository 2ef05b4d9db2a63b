"""The training loop: an interrupted and resumed run equals an uninterrupted one, metrics files are
written, and repeated non-finite losses stop the run."""

import json

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from jaxpref.models.decoder import Decoder
from jaxpref.objectives import objective
from jaxpref.train import (
    MetricsWriter,
    NonFiniteLossError,
    build_step,
    compute_reference_logps,
    make_checkpoint_manager,
    train,
)

from .helpers import CONFIG, NUM_EXAMPLES, ListIterator, pair_batch, single_device_mesh

NUM_STEPS = 20


@pytest.fixture(scope="module")
def setup():
    """A cached-reference DPO step (so a batch can carry a NaN) and 20 batches over 5 datasets."""
    model = Decoder(CONFIG, rngs=nnx.Rngs(0))
    schedule = optax.linear_schedule(1e-2, 1e-3, NUM_STEPS)
    optimizer = optax.inject_hyperparams(optax.adamw)(learning_rate=schedule)
    mesh = single_device_mesh()
    train_step = build_step(model, objective("sigmoid", beta=0.1), optimizer, mesh, reference="cached")
    dataset = [pair_batch(seed, first_index=NUM_EXAMPLES * seed) for seed in range(5)]
    reference = compute_reference_logps(model, dataset, mesh=mesh)
    batches = [reference.attach(dataset[i % len(dataset)]) for i in range(NUM_STEPS)]
    return train_step, batches


def run(train_step, batches, folder, num_steps, **options):
    """Trains from a fresh state object and a fresh checkpoint manager on ``folder``."""
    manager = make_checkpoint_manager(folder / "checkpoints", save_interval_steps=4, max_to_keep=2)
    with MetricsWriter(folder / "logs") as writer:
        state = train(
            train_step.init(),
            train_step,
            ListIterator(batches),
            num_steps=num_steps,
            checkpoint_manager=manager,
            metrics_writer=writer,
            progress=False,
            **options,
        )
    manager.close()
    return state


def logged_steps(folder) -> dict[int, dict]:
    """Metrics per step, the last logged for each, without the wall-clock one."""
    records = [json.loads(line) for line in (folder / "logs" / "metrics.jsonl").read_text().splitlines()]
    return {r.pop("step"): {k: v for k, v in r.items() if k != "tokens_per_second"} for r in records}


def test_resumed_run_equals_uninterrupted_run(setup, tmp_path):
    train_step, batches = setup
    full = run(train_step, batches, tmp_path / "full", NUM_STEPS)
    run(train_step, batches, tmp_path / "resumed", 10)
    assert sorted(int(p.name) for p in (tmp_path / "resumed" / "checkpoints").iterdir()) == [8, 10]
    resumed = run(train_step, batches, tmp_path / "resumed", NUM_STEPS)

    expected, got = logged_steps(tmp_path / "full"), logged_steps(tmp_path / "resumed")
    assert sorted(got) == list(range(1, NUM_STEPS + 1))
    for step in range(11, NUM_STEPS + 1):
        assert got[step] == expected[step], step
    assert got[NUM_STEPS]["learning_rate"] < got[1]["learning_rate"]  # the schedule resumed too
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed), jax.device_get(full))

    logs = tmp_path / "full" / "logs"
    assert list(logs.glob("events.out.tfevents.*"))
    assert (logs / "curves.png").stat().st_size > 0


def test_stops_after_too_many_consecutive_nonfinite_steps(setup, tmp_path):
    train_step, batches = setup
    poisoned = {**batches[0], "ref_rejected_logps": np.full(NUM_EXAMPLES, np.nan, np.float32)}
    # Good, 2 bad (under the limit), good, then 3 bad: the limit.
    sequence = [batches[0], poisoned, poisoned, batches[1], poisoned, poisoned, poisoned, batches[2]]
    with pytest.raises(NonFiniteLossError, match=r"Steps 5 to 7 \(3 in a row"):
        run(train_step, sequence, tmp_path, len(sequence), max_consecutive_nonfinite=3)
    skipped = [m["nonfinite_skipped"] for _, m in sorted(logged_steps(tmp_path).items())]
    assert skipped == [0, 1, 1, 0, 1, 1, 1]
    assert (tmp_path / "logs" / "curves.png").exists()  # drawn despite the failure
