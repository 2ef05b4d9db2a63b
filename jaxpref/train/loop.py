"""The training loop: resume, step, log, checkpoint, and stop on repeated non-finite losses.

The host never waits for the step it has just dispatched: step ``t``'s metrics are read after step
``t + 1`` is queued, so the device always has work while the host logs (and fetches the next
batch). The non-finite stop rule therefore fires one step after the limit is reached. Usage::

    state = train(state, train_step, loader, num_steps=1000,
                  checkpoint_manager=make_checkpoint_manager("ckpt", save_interval_steps=100),
                  metrics_writer=MetricsWriter("logs"))
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxpref.train.checkpoint import restore_checkpoint, save_checkpoint
from jaxpref.train.metrics import MetricsWriter, ProgressBar
from jaxpref.train.step import TrainState

logger = logging.getLogger(__name__)

StepFn = Callable[[TrainState, Mapping[str, np.ndarray]], tuple[TrainState, Mapping[str, jax.Array]]]


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient (their updates were skipped)."""


class DataIterator(Protocol):
    """A batch iterator whose position can be saved and restored (as grain's iterators can)."""

    def __next__(self) -> Mapping[str, np.ndarray]: ...

    def get_state(self) -> dict[str, Any]: ...

    def set_state(self, state: dict[str, Any]) -> None: ...


class _Reporter:
    """Turns a step's device metrics into floats, logs them and applies the non-finite stop rule."""

    def __init__(
        self, metrics_writer: MetricsWriter | None, bar: ProgressBar, max_consecutive_nonfinite: int
    ):
        self.metrics_writer = metrics_writer
        self.bar = bar
        self.max_consecutive_nonfinite = max_consecutive_nonfinite
        self.last_time = time.perf_counter()

    def __call__(self, step: int, device_metrics: Mapping[str, jax.Array]) -> None:
        metrics = {key: float(value) for key, value in jax.device_get(device_metrics).items()}
        now = time.perf_counter()
        # Wall time between two reports is one step's time (the first includes compilation).
        metrics["tokens_per_second"] = metrics.get("num_tokens", 0.0) / max(now - self.last_time, 1e-9)
        self.last_time = now
        if self.metrics_writer is not None:
            self.metrics_writer.write(step, metrics)
        self.bar.update(metrics)
        consecutive = int(metrics["nonfinite_consecutive"])
        if consecutive >= self.max_consecutive_nonfinite:
            raise NonFiniteLossError(
                f"Steps {step - consecutive + 1} to {step} ({consecutive} in a row, the limit being "
                f"`max_consecutive_nonfinite`={self.max_consecutive_nonfinite}) had a non-finite loss or "
                f"gradient; their updates were skipped, so the parameters are those after step "
                f"{step - consecutive}. Check the data of these steps and the learning rate."
            )


def train(
    state: TrainState,
    step_fn: StepFn,
    data_iterator: Iterator[Mapping[str, np.ndarray]] | DataIterator,
    *,
    num_steps: int,
    checkpoint_manager: ocp.CheckpointManager | None = None,
    metrics_writer: MetricsWriter | None = None,
    max_consecutive_nonfinite: int = 10,
    progress: bool = True,
) -> TrainState:
    """Trains until ``state.step == num_steps`` and returns the final state.

    Args:
      state: a fresh state (``TrainStep.init``). With a ``checkpoint_manager`` holding a
        checkpoint, the latest one is restored into its layout and the data iterator is set to the
        saved position, so the run continues exactly where it stopped.
      step_fn: ``(state, batch) -> (state, metrics)``, e.g. the :class:`~jaxpref.train.step.TrainStep`.
      data_iterator: yields batches; needs ``get_state`` / ``set_state`` when checkpointing.
      num_steps: total steps of the run, counting those before a resume.
      checkpoint_manager: from :func:`~jaxpref.train.checkpoint.make_checkpoint_manager`; the
        state is saved at its interval and at the end.
      metrics_writer: gets every step's metrics (plus ``tokens_per_second``) and draws the curves
        at the end, even when the run fails; the caller closes it.
      max_consecutive_nonfinite: stop with :class:`NonFiniteLossError` after this many skipped
        updates in a row.
      progress: show a tqdm progress bar.
    """
    if not isinstance(max_consecutive_nonfinite, int) or max_consecutive_nonfinite < 1:
        raise ValueError(
            f"`max_consecutive_nonfinite` must be a positive int, got {max_consecutive_nonfinite!r}."
        )
    if checkpoint_manager is not None:
        restored = restore_checkpoint(checkpoint_manager, state)
        if restored is not None:
            state, data_state = restored
            data_iterator.set_state(data_state)
            logger.info("resumed from step %d", int(state.step))
    start = int(jax.device_get(state.step))

    bar = ProgressBar(num_steps, start, disable=not progress)
    report = _Reporter(metrics_writer, bar, max_consecutive_nonfinite)
    pending = None  # (step, metrics) of the last step, read once the next one is dispatched
    step, saved_step, data_state = start, start, None
    try:
        for step in range(start + 1, num_steps + 1):
            batch = next(data_iterator, None)
            if batch is None:
                logger.warning("the data ran out after %d of %d steps", step - 1, num_steps)
                step -= 1
                break
            if checkpoint_manager is not None:
                data_state = data_iterator.get_state()
            state, metrics = step_fn(state, batch)
            if pending is not None:
                report(*pending)
            pending = (step, metrics)
            if checkpoint_manager is not None and save_checkpoint(
                checkpoint_manager, step, state, data_state
            ):
                saved_step = step
        if pending is not None:
            report(*pending)
        if checkpoint_manager is not None and saved_step != step:
            save_checkpoint(checkpoint_manager, step, state, data_state, force=True)
    finally:
        bar.close()
        if checkpoint_manager is not None:
            checkpoint_manager.wait_until_finished()
        if metrics_writer is not None:
            metrics_writer.flush()
            metrics_writer.plot()  # after a failure too: the curves show what led to it
    return state
