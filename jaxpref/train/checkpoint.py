"""Orbax checkpoints of a training run: the TrainState and the data iterator's position.

A checkpoint holds two items: ``state`` (step, params, optimizer state, rng, reference params,
non-finite counter: the whole :class:`~jaxpref.train.step.TrainState`) and ``data`` (the data
iterator's ``get_state()``: a JSON dict, or grain's UTF-8 bytes, stored as a string). Saves are asynchronous: :func:`save_checkpoint` returns
once the arrays are copied off the devices, and the files are written in the background. The
manager keeps the last ``max_to_keep`` checkpoints and saves every ``save_interval_steps``.

Restoring takes a freshly initialised state as the target, so every array comes back directly in
that state's sharded layout, on whatever mesh the new run uses.

Faults end with one :class:`CheckpointError` line naming the folder and the cause: a folder that
cannot be written fails when the manager is made (orbax would wait 5 minutes on it), one too full
for a checkpoint before the first step (:func:`check_free_space`), a write that fails later at the
next step. A damaged checkpoint is moved aside to ``<step>.damaged`` (never deleted) and the run
resumes from the newest one that restores; half-written ``*.orbax-checkpoint-tmp*`` folders left
by a killed run are removed when the manager is made.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import orbax.checkpoint as ocp

from jaxpref.train.step import TrainState

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


class CheckpointError(OSError):
    """A checkpoint folder cannot be written or read: not writable, full, or every checkpoint unreadable."""


def make_checkpoint_manager(
    directory: str | os.PathLike,
    *,
    max_to_keep: int | None = 3,
    save_interval_steps: int = 1000,
    async_save: bool = True,
) -> ocp.CheckpointManager:
    """A CheckpointManager for ``directory`` (created if missing); raises :class:`CheckpointError`
    when the folder cannot be written."""
    if not isinstance(save_interval_steps, int) or save_interval_steps < 1:
        raise ValueError(f"`save_interval_steps` must be a positive int, got {save_interval_steps!r}.")
    directory = os.path.abspath(directory)
    _check_writable(directory)
    # Every `save_interval_steps` and when the job is being preempted; unlike orbax's default, not
    # also at the first step, so saves fall exactly on the interval (the loop adds the last step).
    policy = ocp.checkpoint_managers.AnySavePolicy(
        [
            ocp.checkpoint_managers.FixedIntervalPolicy(save_interval_steps),
            ocp.checkpoint_managers.PreemptionCheckpointingPolicy(),
        ]
    )
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        save_decision_policy=policy,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,  # the half-written saves of a killed run
    )
    return ocp.CheckpointManager(directory, options=options)


def _check_writable(directory: str) -> None:
    """Creates and removes a file in ``directory``: orbax creates step folders in a background
    thread and, when that fails, waits 5 minutes before it reports anything."""
    probe = os.path.join(directory, f".write-probe-{socket.gethostname()}-{os.getpid()}")  # one per host
    try:
        os.makedirs(directory, exist_ok=True)
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as error:
        raise CheckpointError(
            f"Cannot write to the checkpoint folder {directory}: {error.strerror or error}."
        ) from error


def check_free_space(manager: ocp.CheckpointManager, state: TrainState) -> None:
    """Raises :class:`CheckpointError` when the checkpoint folder has no room for one checkpoint
    of ``state`` (its arrays' size), so a full disk fails before the first step, not at the first save."""
    needed = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
    free = shutil.disk_usage(manager.directory).free
    if free < needed:
        raise CheckpointError(
            f"The checkpoint folder {manager.directory} has {free / 2**20:.1f} MiB free but a checkpoint "
            f"takes about {needed / 2**20:.1f} MiB: free some space or choose another folder."
        )


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
    whether to save never waits for the device. An earlier save that failed in the background
    raises here, as :class:`CheckpointError`.
    """
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(_to_json(data_state)),
    )
    return writing(manager, lambda: manager.save(step, args=args, force=force))


def writing(manager: ocp.CheckpointManager, operation: Callable[[], _T]) -> _T:
    """Runs ``operation`` (a save, ``wait_until_finished``, ``check_for_errors``), turning a failed
    write into one :class:`CheckpointError` line naming the folder and the cause."""
    try:
        return operation()
    # A failed write comes as OSError from Python's file calls and as ValueError from TensorStore
    # ("RESOURCE_EXHAUSTED: ... No space left on device [os_error_code='28']").
    except (OSError, ValueError) as error:
        raise CheckpointError(
            f"Cannot write a checkpoint to {manager.directory}: {_cause(error)}."
        ) from error


def restore_checkpoint(
    manager: ocp.CheckpointManager, target: TrainState
) -> tuple[TrainState, dict[str, Any]] | None:
    """``(state, data_state)`` of the newest checkpoint that restores, or None when there is none.

    ``target`` is a state of the run being resumed (e.g. fresh from ``TrainStep.init``); the
    restored arrays take its shapes, dtypes and shardings. A checkpoint that fails to restore
    while an older one restores is damaged (a missing or truncated file): it is moved aside to
    ``<step>.damaged`` with a warning. When none restores (damaged, or from a run with another
    model), :class:`CheckpointError` names the newest and why.
    """
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore())
    failed: list[tuple[int, str]] = []  # (step, cause), newest first
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            restored = manager.restore(step, args=args)
        # Damage surfaces as JSON errors, KeyError (a missing item), TensorStore's ValueError or a
        # bare Exception (a truncated array file): which step fails tells damage from a mismatch.
        except Exception as error:
            failed.append((step, _damage(manager, step) or _cause(error)))
            continue
        for bad, cause in failed:
            moved_to = _move_aside(manager, bad)
            logger.warning(
                "Checkpoint %s is damaged (%s): moved to %s; resuming from step %d.",
                _step_path(manager, bad),
                cause,
                moved_to,
                step,
            )
        if failed:
            manager.reload()
        return restored.state, _from_json(restored.data)
    if failed:
        step, cause = failed[0]
        older = f" (nor do the {len(failed) - 1} older ones)" if len(failed) > 1 else ""
        raise CheckpointError(
            f"Cannot restore checkpoint {_step_path(manager, step)}{older}: {cause}. It is damaged or "
            "from a run with another model; move the folder away to start over."
        )
    return None


def _step_path(manager: ocp.CheckpointManager, step: int) -> str:
    return os.path.join(manager.directory, str(step))


def _damage(manager: ocp.CheckpointManager, step: int) -> str | None:
    """A missing file that orbax's error would not name."""
    for name in ("state", "data", os.path.join("state", "_METADATA")):
        if not os.path.exists(os.path.join(_step_path(manager, step), name)):
            return f"{name} is missing"
    return None


def _move_aside(manager: ocp.CheckpointManager, step: int) -> str:
    """Renames checkpoint ``step`` to ``<step>.damaged`` (``.damaged-2``, ... when taken), a name
    orbax does not list; returns the new path. Process 0 renames, for all hosts."""
    path = _step_path(manager, step)
    moved_to, n = f"{path}.damaged", 1
    while os.path.exists(moved_to):
        n += 1
        moved_to = f"{path}.damaged-{n}"
    if jax.process_index() == 0:
        os.rename(path, moved_to)
    return moved_to


def _cause(error: BaseException) -> str:
    """The first line of the error that caused ``error`` (TensorStore's, under orbax's wrappers),
    with an OS error code spelt out, at most 300 characters."""
    while error.__cause__ is not None:
        error = error.__cause__
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    code = re.search(r"os_error_code='(\d+)'", text)
    if code:
        return f"{os.strerror(int(code.group(1)))} ({text.split(': ', 1)[0]})"
    text = text.split(" [tensorstore_spec", 1)[0]
    return text if len(text) <= 300 else text[:297] + "..."


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
