"""Training: where models and objectives meet.

- :mod:`~jaxpref.train.step`: :func:`build_step` gives a sharded :class:`TrainState` init and a
  jitted ``train_step(state, batch) -> (state, metrics)`` with exact gradient accumulation and
  non-finite update skipping.
- :mod:`~jaxpref.train.batches`: the batch contract with the data pipeline.
- :mod:`~jaxpref.train.reference`: reference log-probs computed once, cached on disk.
- :mod:`~jaxpref.train.checkpoint`: orbax checkpoints of the state and the data position.
- :mod:`~jaxpref.train.metrics`: JSONL, TensorBoard, PNG curves, progress bar.
- :mod:`~jaxpref.train.loop`: :func:`train`, putting them together.
"""

from jaxpref.train.checkpoint import CheckpointError, make_checkpoint_manager, restore_checkpoint, save_checkpoint
from jaxpref.train.loop import NonFiniteLossError, TrainingInterrupted, train
from jaxpref.train.metrics import MetricsWriter, ProgressBar
from jaxpref.train.reference import (
    ReferenceLogps,
    cached_reference_logps,
    compute_reference_logps,
    params_fingerprint,
)
from jaxpref.train.step import TrainState, TrainStep, build_step

__all__ = [
    "CheckpointError",
    "MetricsWriter",
    "NonFiniteLossError",
    "ProgressBar",
    "ReferenceLogps",
    "TrainState",
    "TrainStep",
    "TrainingInterrupted",
    "build_step",
    "cached_reference_logps",
    "compute_reference_logps",
    "make_checkpoint_manager",
    "params_fingerprint",
    "restore_checkpoint",
    "save_checkpoint",
    "train",
]
