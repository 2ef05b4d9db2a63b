"""Orbax checkpoints of a training run: the TrainState and the data iterator's position.

A checkpoint holds two items: ``state`` (step, params, optimizer state, rng, reference params,
non-finite counter: the whole :class:`~jaxpref.train.step.TrainState`) and ``data`` (the data
iterator's ``get_state()``: a JSON dict, or grain's UTF-8 bytes, stored as a string). Saves are asynchronous: :func:`save_checkpoint` returns
once the arrays are copied off the devices, and the files are written in the background. The
manager keeps the last ``max_to_keep`` checkpoints and saves every ``save_interval_steps``.

Restoring takes a freshly initialised state as the target, so every array comes back directly in
that state's sharded layout, on whatever mesh the new run uses.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxpref.train.step import TrainState


def make_checkpoint_manager(
    directory: str | os.PathLike,
    *,
    max_to_keep: int | None = 3,
    save_interval_steps: int = 1000,
    async_save: bool = True,
) -> ocp.CheckpointManager:
    """A CheckpointManager for ``directory`` (created if missing)."""
    if not isinstance(save_interval_steps, int) or save_interval_steps < 1:
        raise ValueError(f"`save_interval_steps` must be a positive int, got {save_interval_steps!r}.")
    # Every `save_interval_steps` and when the job is being preempted; unlike orbax's default, not
    # also at the first step, so saves fall exactly on the interval (the loop adds the last step).
    policy = ocp.checkpoint_managers.AnySavePolicy(
        [
            ocp.checkpoint_managers.FixedIntervalPolicy(save_interval_steps),
            ocp.checkpoint_managers.PreemptionCheckpointingPolicy(),
        ]
    )
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_decision_policy=policy, enable_async_checkpointing=async_save
    )
    return ocp.CheckpointManager(os.fspath(os.path.abspath(directory)), options=options)


def save_checkpoint(
    manager: ocp.CheckpointManager,
    step: int,
    state: TrainState,
    data_state: dict[str, Any] | None = None,
    *,
    force: bool = False,
) -> bool:
    """Saves ``state`` and ``data_state`` as checkpoint ``step`` when the manager's interval says
    so (always with ``force``). Returns whether a save started.

    ``step`` is passed from the host (the loop's count, equal to ``state.step``) so that deciding
    whether to save never waits for the device.
    """
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(_to_json(data_state)),
    )
    return manager.save(step, args=args, force=force)


def restore_checkpoint(
    manager: ocp.CheckpointManager, target: TrainState, step: int | None = None
) -> tuple[TrainState, dict[str, Any]] | None:
    """``(state, data_state)`` of checkpoint ``step`` (default: the latest), or None when there is none.

    ``target`` is a state of the run being resumed (e.g. fresh from ``TrainStep.init``); the
    restored arrays take its shapes, dtypes and shardings.
    """
    step = manager.latest_step() if step is None else step
    if step is None:
        return None
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target)
    restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore())
    )
    return restored.state, _from_json(restored.data)


# grain's iterators describe their position as bytes (UTF-8 JSON); simple iterators use dicts.
_BYTES_KEY = "__bytes_utf8__"


def _to_json(data_state: dict[str, Any] | bytes | None) -> dict[str, Any]:
    if data_state is None:
        return {}
    if isinstance(data_state, bytes):
        return {_BYTES_KEY: data_state.decode("utf-8")}
    return data_state


def _from_json(saved: dict[str, Any]) -> dict[str, Any] | bytes:
    if set(saved) == {_BYTES_KEY}:
        return saved[_BYTES_KEY].encode("utf-8")
    return saved
