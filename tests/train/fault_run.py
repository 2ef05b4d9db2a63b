"""A tiny checkpointed DPO run for the fault-injection tests (tests/train/test_faults.py).

``python -m tests.train.fault_run FOLDER NUM_STEPS`` (from the repository root) trains into
``FOLDER/checkpoints`` and ``FOLDER/logs``, printing ``step N`` when batch N is fetched and
``save N`` when checkpoint N starts, so that a test can kill it at a chosen point (each batch
takes ``STEP_SECONDS`` to fetch), and when it finishes writes the final state's arrays to
``FOLDER/final.npz``. After SIGTERM or SIGINT it exits with ``TrainingInterrupted.exit_code``.
The tests build the same step in their own process (:func:`build`, :func:`run`).
"""

from __future__ import annotations

import pathlib
import sys
import time

import jax
import numpy as np
import optax
from flax import nnx

from jaxpref.models.decoder import Decoder
from jaxpref.objectives import objective
from jaxpref.train import MetricsWriter, build_step, compute_reference_logps, make_checkpoint_manager, train
from jaxpref.train.loop import TrainingInterrupted

from .helpers import CONFIG, NUM_EXAMPLES, ListIterator, pair_batch, single_device_mesh

MAX_STEPS = 12
SAVE_INTERVAL = 3
STEP_SECONDS = 0.1  # a tiny step takes milliseconds: time for a signal to land mid-run


def build():
    """A DPO step with cached reference log-probs (so a test can poison a batch's) and MAX_STEPS
    batches cycling over 4 datasets."""
    model = Decoder(CONFIG, rngs=nnx.Rngs(0))
    optimizer = optax.inject_hyperparams(optax.adamw)(
        learning_rate=optax.linear_schedule(1e-2, 1e-3, MAX_STEPS)
    )
    mesh = single_device_mesh()
    train_step = build_step(model, objective("sigmoid", beta=0.1), optimizer, mesh, reference="cached")
    dataset = [pair_batch(seed, first_index=NUM_EXAMPLES * seed) for seed in range(4)]
    reference = compute_reference_logps(model, dataset, mesh=mesh)
    return train_step, [reference.attach(dataset[i % len(dataset)]) for i in range(MAX_STEPS)]


class _Announced(ListIterator):
    def __next__(self):
        batch = super().__next__()
        print(f"step {self.position}", flush=True)
        time.sleep(STEP_SECONDS)
        return batch


def run(train_step, batches, folder: pathlib.Path, num_steps: int, *, announce: bool = False, **options):
    """Trains from a fresh state for ``num_steps``, resuming from ``folder``; returns the final state."""
    manager = make_checkpoint_manager(
        folder / "checkpoints", save_interval_steps=SAVE_INTERVAL, max_to_keep=2
    )
    if announce:
        save = manager.save

        def announced_save(step, *args, **kwargs):
            print(f"save {step}", flush=True)
            return save(step, *args, **kwargs)

        manager.save = announced_save
    try:
        with MetricsWriter(folder / "logs", report_to="none") as writer:  # no tensorboardX: it imports torch
            return train(
                train_step.init(),
                train_step,
                (_Announced if announce else ListIterator)(batches),
                num_steps=num_steps,
                checkpoint_manager=manager,
                metrics_writer=writer,
                progress=False,
                **options,
            )
    finally:
        manager.close()


if __name__ == "__main__":
    folder = pathlib.Path(sys.argv[1])
    try:
        state = run(*build(), folder, int(sys.argv[2]), announce=True)
    except TrainingInterrupted as stopped:
        print(stopped, file=sys.stderr)
        sys.exit(stopped.exit_code)
    np.savez(folder / "final.npz", *jax.tree.leaves(jax.device_get(state)))
