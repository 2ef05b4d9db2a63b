"""The training loop: resume, step, log, checkpoint, and stop on repeated non-finite losses.

The host never waits for the step it has just dispatched: step ``t``'s metrics are read after step
``t + 1`` is queued, so the device always has work while the host logs (and fetches the next
batch). The non-finite stop rule therefore fires one step after the limit is reached. Usage::

    state = train(state, train_step, loader, num_steps=1000,
                  checkpoint_manager=make_checkpoint_manager("ckpt", save_interval_steps=100),
                  metrics_writer=MetricsWriter("logs"))

A run killed at any point (even ``kill -9``) resumes exactly: every checkpoint is written after the
metrics of its steps are on disk, and a resumed run first drops the metrics logged after its
checkpoint, so ``metrics.jsonl`` holds each step once. SIGTERM and Ctrl-C stop the run at the next
step boundary with a checkpoint (:class:`TrainingInterrupted`); a step whose update was skipped
for a non-finite loss is not checkpointed at the interval, so the newest checkpoint stays the
last finite state.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxpref.train.checkpoint import check_free_space, restore_checkpoint, save_checkpoint, writing
from jaxpref.train.metrics import MetricsWriter, ProgressBar
from jaxpref.train.step import TrainState

logger = logging.getLogger(__name__)

StepFn = Callable[[TrainState, Mapping[str, np.ndarray]], tuple[TrainState, Mapping[str, jax.Array]]]


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient (their updates were skipped)."""


class TrainingInterrupted(Exception):
    """SIGTERM or SIGINT (Ctrl-C) stopped the run at a step boundary, after its checkpoint was
    saved; running the same command again resumes. ``exit_code`` is the shell's code for the
    signal: 143 for SIGTERM, 130 for SIGINT."""

    def __init__(self, signum: int, step: int, checkpoint: str | None):
        self.signal_name = signal.Signals(signum).name
        self.step = step
        self.exit_code = 128 + signum
        saved = f"the newest checkpoint is {checkpoint}" if checkpoint else "no checkpoint was saved"
        super().__init__(f"Stopped by {self.signal_name} after step {step}; {saved}.")


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
        self.consecutive_nonfinite = 0  # of the last step reported

    def __call__(self, step: int, device_metrics: Mapping[str, jax.Array]) -> None:
        metrics = {key: float(value) for key, value in jax.device_get(device_metrics).items()}
        now = time.perf_counter()
        # Wall time between two reports is one step's time (the first includes compilation).
        metrics["tokens_per_second"] = metrics.get("num_tokens", 0.0) / max(now - self.last_time, 1e-9)
        self.last_time = now
        if self.metrics_writer is not None:
            self.metrics_writer.write(step, metrics)
        self.bar.update(metrics)
        consecutive = self.consecutive_nonfinite = int(metrics["nonfinite_consecutive"])
        if consecutive >= self.max_consecutive_nonfinite:
            raise NonFiniteLossError(
                f"Steps {step - consecutive + 1} to {step} ({consecutive} in a row, the limit being "
                f"`max_consecutive_nonfinite`={self.max_consecutive_nonfinite}) had a non-finite loss or "
                f"gradient; their updates were skipped, so the parameters are those after step "
                f"{step - consecutive}. Check the data of these steps and the learning rate."
            )


class _StopSignals:
    """While entered, SIGTERM and SIGINT only set :attr:`received`, for the loop to stop at the
    next step boundary; a second one acts as it would without the loop. Installed only in the
    main thread of a single-process run: a multi-host run must stop all hosts at the same step,
    which orbax's preemption policy (JAX's preemption sync point) does."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, enabled: bool):
        self.enabled = (
            enabled and jax.process_count() == 1 and threading.current_thread() is threading.main_thread()
        )
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = signum
        else:
            self._restore()
            signal.raise_signal(signum)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            # None: a handler installed outside Python, which cannot be reinstalled from it.
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous = {}

    def __enter__(self) -> _StopSignals:
        if self.enabled:
            self._previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        self._restore()


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
        checkpoint, the newest one that restores is restored into its layout (damaged ones are
        moved aside, see :func:`~jaxpref.train.checkpoint.restore_checkpoint`) and the data
        iterator is set to the saved position, so the run continues exactly where it stopped.
      step_fn: ``(state, batch) -> (state, metrics)``, e.g. the :class:`~jaxpref.train.step.TrainStep`.
      data_iterator: yields batches; needs ``get_state`` / ``set_state`` when checkpointing.
      num_steps: total steps of the run, counting those before a resume.
      checkpoint_manager: from :func:`~jaxpref.train.checkpoint.make_checkpoint_manager`; the
        state is saved at its interval, at the end and when SIGTERM or SIGINT arrives (then
        :class:`TrainingInterrupted` is raised). A folder too full for one checkpoint fails
        before the first step, a failed write at the next step, as
        :class:`~jaxpref.train.checkpoint.CheckpointError`.
      metrics_writer: gets every step's metrics (plus ``tokens_per_second``), flushed at every
        checkpoint, and draws the curves at the end, even when the run fails; its steps after
        the resumed one are dropped first (:meth:`~jaxpref.train.metrics.MetricsWriter.rewind`).
        The caller closes it.
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
        check_free_space(checkpoint_manager, state)
    start = int(jax.device_get(state.step))
    if metrics_writer is not None:
        metrics_writer.rewind(start)

    bar = ProgressBar(num_steps, start, disable=not progress)
    report = _Reporter(metrics_writer, bar, max_consecutive_nonfinite)

    def save(step: int, state: TrainState, data_state) -> None:
        # The metrics of every step up to `step` reach the disk before its checkpoint does.
        if metrics_writer is not None:
            metrics_writer.flush()
        save_checkpoint(checkpoint_manager, step, state, data_state, force=True)

    pending = None  # (step, metrics) of the last step, read once the next one is dispatched
    step, saved_step, data_state = start, start, None
    stop = _StopSignals(enabled=checkpoint_manager is not None)
    try:
        with stop:
            for step in range(start + 1, num_steps + 1):
                if stop.received is not None:
                    step -= 1
                    break
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
                if checkpoint_manager is None:
                    continue
                # A background save that failed (a full disk) stops the run now, not at the next save.
                writing(checkpoint_manager, checkpoint_manager.check_for_errors)
                if checkpoint_manager.should_save(step):
                    report(*pending)  # waits for this step, as the save would
                    pending = None
                    if report.consecutive_nonfinite:
                        logger.warning(
                            "step %d not checkpointed: its update was skipped for a non-finite loss, "
                            "so the newest checkpoint stays step %s",
                            step,
                            checkpoint_manager.latest_step(),
                        )
                    else:
                        save(step, state, data_state)
                        saved_step = step
            if pending is not None:
                report(*pending)
            # The end of a finished run is saved even after skipped updates: it is the run's result.
            interrupted_while_nonfinite = stop.received is not None and report.consecutive_nonfinite
            if checkpoint_manager is not None and saved_step != step and not interrupted_while_nonfinite:
                save(step, state, data_state)
    finally:
        bar.close()
        if checkpoint_manager is not None:
            writing(checkpoint_manager, checkpoint_manager.wait_until_finished)
        if metrics_writer is not None:
            metrics_writer.flush()
            metrics_writer.plot()  # after a failure too: the curves show what led to it
    if stop.received is not None:
        latest = checkpoint_manager.latest_step()
        raise TrainingInterrupted(
            stop.received,
            step,
            None if latest is None else os.path.join(checkpoint_manager.directory, str(latest)),
        )
    return state
