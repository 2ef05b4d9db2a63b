"""One run per folder, one writer at a time: ``runs/<name>/run.json`` and ``runs/<name>/run.lock``.

``run.json`` records the run's fingerprint: its resolved config without the fields that say how
long, how visibly or how it is computed (:data:`NOT_IDENTITY`: ``train.steps``, checkpoint
interval, progress, mesh, memory knobs...), with the content hashes of the files it reads in place
of their paths (:data:`HASHED_FILES`: data files, model checkpoint, tokenizer, reward and preference
models), and its learning-rate schedule length. Rerunning into the folder (every unnamed run of a
subcommand shares ``runs/<subcommand>``) resumes only the same run:

- a different fingerprint stops before any model is built or data prepared, listing
  ``field: old -> new``; the ways out are a new ``--name`` or ``--overwrite`` (start afresh);
- more ``train.steps`` trains on to the new count on the first run's learning-rate schedule
  (``train.schedule_steps`` is set to it; past its end the rate stays at its final 10%), so a
  resume never jumps to another schedule mid-run;
- fewer steps than the newest checkpoint is refused: the checkpoints cannot be untrained, and
  exporting them as a shorter run would be a wrong result;
- a finished run asked for the same steps has nothing to do (:attr:`RunFolder.finished_step`).

``config.json`` is written by the runner, so a refused run never rewrites it.

``run.lock`` holds the writer's pid and host, taken before anything is written and removed at exit;
a second run into the folder stops at once, and a lock whose process is gone (same host) is taken
over with a warning.

Hashes are sha256 over whole files, except model files over 64 MiB: their size and 16 evenly
spaced 64 KiB samples (1 MiB read instead of gigabytes: retraining changes every sample, while a
few edited weights elsewhere may go unseen).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import shutil
import socket
import time
from collections.abc import Iterator, Mapping
from typing import Any

from jaxpref.overrides import to_dict

logger = logging.getLogger(__name__)

RECORD = "run.json"
LOCK = "run.lock"
# Run length and presentation, and how the run is computed (the same results on another mesh, with
# other microbatches or LM-head chunks): changing them keeps the run the same run.
NOT_IDENTITY = (
    "name", "runs_dir", "mesh", "train.steps", "train.schedule_steps", "train.checkpoint_every",
    "train.keep_checkpoints", "train.max_consecutive_nonfinite", "train.dead_run_steps", "train.progress",
    "train.chunk_size", "train.grad_accum_steps", "model.remat", "data.prefix_sharing",
)  # fmt: skip
# Fields naming files or folders that are fingerprinted by content (model folders by sampling).
HASHED_FILES = {
    "data.train_files": False, "model.checkpoint": True, "model.tokenizer": True,
    "rollout.reward_model": True, "rollout.preference_model": True,
}  # fmt: skip
SCHEDULE = "train.schedule_steps"
_LARGE = 64 << 20
_SAMPLES, _SAMPLE_BYTES = 16, 64 << 10


class RunFolderError(Exception):
    """The run folder holds another run, or a run this one cannot continue."""


class RunFolderLocked(RunFolderError):
    """Another live run writes into the folder."""


@dataclasses.dataclass(frozen=True)
class RunFolder:
    path: pathlib.Path
    config: Any  # the config to run: on a resume, with the recorded `train.schedule_steps`
    finished_step: int | None = None  # set when the run already finished: nothing to do


def fingerprint(config: Any) -> dict[str, Any]:
    """What defines the run: the flattened config without :data:`NOT_IDENTITY`, files by content,
    and the learning-rate schedule's length."""
    flat = {"config": type(config).__name__, **_flatten(to_dict(config))}
    flat = {k: v for k, v in flat.items() if not any(_within(k, field) for field in NOT_IDENTITY)}
    for key, sample_large in HASHED_FILES.items():
        if flat.get(key):
            paths = flat[key] if isinstance(flat[key], list) else [flat[key]]
            flat[key] = {"paths": flat[key], "content": _digest(paths, key, sample_large)}
    flat[SCHEDULE] = config.train.schedule_length
    return flat


def write_config(config: Any) -> None:
    """``config.json``: the run's resolved config, written by its runner once the folder is taken."""
    (config.run_dir / "config.json").write_text(json.dumps(to_dict(config), indent=2))


def latest_checkpoint_step(run_dir: pathlib.Path) -> int | None:
    """The newest finished checkpoint's step (orbax writes ``<step>.orbax-checkpoint-tmp-*`` first)."""
    folder = run_dir / "checkpoints"
    steps = [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.is_dir() else []
    return max(steps, default=None)


@contextlib.contextmanager
def open_run_folder(
    config: Any, *, identity: bool = True, overwrite: bool = False, lead: bool = True
) -> Iterator[RunFolder]:
    """Takes ``config.run_dir`` for this run (module docstring): locks it, starts it afresh with
    ``overwrite``, and with ``identity`` checks the recorded fingerprint (:class:`RunFolderError`
    when it is another run's) and marks the run finished when the block ends without an error.

    ``lead``: the process that writes (process 0 of a multi-host run); the others only check.
    """
    path = config.run_dir
    new = fingerprint(config) if identity else None  # hashing reads the files: missing ones fail here
    created = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    lock = _Lock(path / LOCK) if lead else None
    try:
        if lock is not None:
            lock.acquire()
        if overwrite and lead:
            _clear(path)
        folder = RunFolder(path, config)
        if identity:
            folder = _resume(path, config, new, lead)
        yield folder
        # Finished: trained to its steps (not stopped early by a signal, which leaves it to resume).
        if (
            identity
            and lead
            and folder.finished_step is None
            and latest_checkpoint_step(path) == config.train.steps
        ):
            _write_record(path, new, {"step": config.train.steps, "steps": config.train.steps})
    finally:
        if lock is not None:
            lock.release()
        for folder_path in created:  # a run stopped before writing anything leaves no folder behind
            if folder_path.is_dir() and not any(folder_path.iterdir()):
                folder_path.rmdir()


def _resume(path: pathlib.Path, config: Any, new: dict[str, Any], lead: bool) -> RunFolder:
    record = _read_record(path)
    latest = latest_checkpoint_step(path)
    if record is None:
        if latest is not None:
            raise RunFolderError(
                f"{path} has checkpoints but no {RECORD} (written before jaxpref recorded runs), so "
                f"whether they belong to this run is unknown. {_ways_out(path)}"
            )
    else:
        old = record["fingerprint"]
        if latest is None:  # nothing trained yet: the schedule is this run's
            old = {**old, SCHEDULE: new[SCHEDULE]}
        elif config.train.schedule_steps is None:
            # Resumed training continues the schedule it started on, whatever `train.steps` says now.
            new[SCHEDULE] = old[SCHEDULE]
            config = dataclasses.replace(
                config, train=dataclasses.replace(config.train, schedule_steps=old[SCHEDULE])
            )
        changes = _changes(old, new)
        if changes:
            raise RunFolderError(f"{path} holds a different run ({'; '.join(changes)}). {_ways_out(path)}")
        steps, finished = config.train.steps, record.get("finished")
        if finished and finished["steps"] == steps:
            return RunFolder(path, config, finished_step=finished["step"])
        if latest is not None and steps < latest:
            raise RunFolderError(
                f"{path} is trained to step {latest}; `train.steps`={steps} cannot undo steps, and "
                f"exporting its step-{latest} model as a {steps}-step run would be wrong. Pass "
                f"--steps {latest} or more to continue it. {_ways_out(path)}"
            )
        if latest is not None and steps != config.train.schedule_length:
            logger.warning(
                "%s: training on to step %d on its %d-step learning-rate schedule (after it the rate "
                "stays at its final value); for a %d-step schedule start a new run (--name, or --overwrite)",
                path, steps, config.train.schedule_length, steps,
            )  # fmt: skip
    if lead:
        _write_record(path, new, None)
    return RunFolder(path, config)


def _ways_out(path: pathlib.Path) -> str:
    return f"Use a new --name for a new run, or --overwrite to delete {path} and start it afresh."


def _changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``"field: old -> new"`` for each field that differs (files by content)."""
    changes = []
    for key in [*old, *(k for k in new if k not in old)]:
        before, after = old.get(key), new.get(key)
        same = (
            before.get("content") == after.get("content")
            if isinstance(before, dict) and isinstance(after, dict)
            else before == after
        )
        if not same:
            changes.append(f"{key}: {_show(before)} -> {_show(after)}")
    return changes


def _show(value: Any) -> str:
    if isinstance(value, dict) and "content" in value:
        return f"{json.dumps(value['paths'])} (content {value['content'][:8]})"
    return "(unset)" if value is None else json.dumps(value)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _within(key: str, field: str) -> bool:
    return key == field or key.startswith(field + ".")


def _digest(paths: list[str], key: str, sample_large: bool) -> str:
    digest = hashlib.sha256()
    for name in paths:
        path = pathlib.Path(name)
        if not path.exists():
            raise FileNotFoundError(f"`{key}`: {name} does not exist.")
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            if not any(part.startswith(".") for part in file.relative_to(path).parts):  # .cache, .git
                digest.update(f"{file.relative_to(path)}\0{_file_digest(file, sample_large)}\0".encode())
    return digest.hexdigest()


def _file_digest(path: pathlib.Path, sample_large: bool) -> str:
    size = path.stat().st_size
    with open(path, "rb") as file:
        if not (sample_large and size > _LARGE):
            return hashlib.file_digest(file, "sha256").hexdigest()
        digest = hashlib.sha256(str(size).encode())
        for i in range(_SAMPLES):
            file.seek(i * (size - _SAMPLE_BYTES) // (_SAMPLES - 1))
            digest.update(file.read(_SAMPLE_BYTES))
        return digest.hexdigest()


def _read_record(path: pathlib.Path) -> dict[str, Any] | None:
    record = path / RECORD
    if not record.exists():
        return None
    try:
        return json.loads(record.read_text())
    except json.JSONDecodeError as error:
        raise RunFolderError(f"{record} is damaged ({error}). {_ways_out(path)}") from None


def _write_record(path: pathlib.Path, identity: dict[str, Any], finished: dict[str, Any] | None) -> None:
    temporary = path / f".{RECORD}.tmp"
    temporary.write_text(json.dumps({"fingerprint": identity, "finished": finished}, indent=2))
    os.replace(temporary, path / RECORD)  # atomic: a killed run leaves the old record or the new one


def _clear(path: pathlib.Path) -> None:
    for entry in path.iterdir():
        if entry.name != LOCK:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    logger.warning("--overwrite: deleted the previous run in %s", path)


class _Lock:
    """``run.lock``: created atomically with its content (a hard link to a written file)."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        self.acquired = False
        self.owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }

    def acquire(self) -> None:
        temporary = self.path.with_name(f".{LOCK}.{os.getpid()}")
        temporary.write_text(json.dumps(self.owner))
        try:
            for _ in range(2):  # the second try after removing a stale lock
                try:
                    os.link(temporary, self.path)
                    self.acquired = True
                    return
                except FileExistsError:
                    holder = self._holder()
                    if holder is not None and _alive(holder):
                        raise RunFolderLocked(
                            f"{self.path.parent} is in use by process {holder['pid']} on {holder['host']} "
                            f"(since {holder.get('since', '?')}): wait for that run to end, or use another "
                            f"--name. If it is not running any more, delete {self.path}."
                        ) from None
                    logger.warning(
                        "taking over %s: its run (%s) is not running any more",
                        self.path,
                        holder or "unreadable",
                    )
                    self.path.unlink(missing_ok=True)
            raise RunFolderLocked(f"{self.path.parent} was locked by another run starting at the same time.")
        finally:
            temporary.unlink()

    def release(self) -> None:
        # Not a lock that another run took over after judging ours stale.
        if self.acquired and self._holder() == self.owner:
            self.path.unlink()

    def _holder(self) -> dict[str, Any] | None:
        try:
            holder = json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None


def _alive(holder: Mapping[str, Any]) -> bool:
    if holder.get("host") != socket.gethostname():
        return True  # another machine's process cannot be checked from here
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        pass
    return True
