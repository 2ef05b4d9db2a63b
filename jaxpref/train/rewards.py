"""Reward functions for online training: Python checkers on text and a reward model's score.

A reward function scores a batch of sampled completions. It is called with keyword arguments only,
TRL's convention, and takes the ones it needs (end it with ``**kwargs``):

- ``prompts``, ``completions``: ``list[str]`` of length ``B`` (decoded, special tokens removed;
  without a tokenizer, ``None``);
- ``prompt_ids``, ``prompt_mask`` ``[B, P]`` (left-padded) and ``completion_ids``,
  ``completion_mask`` ``[B, T]`` (right-padded): NumPy int32 arrays;
- every other column of the prompt batch (:class:`~jaxpref.data.prompts.PromptBatches`), repeated
  for each completion of its prompt, e.g. an ``answer`` list.

It returns ``B`` finite floats. The bundled sorting task (:mod:`jaxpref.data.synthetic`) has two:
:func:`sorting_exact` (the verifiable reward: 1 for exactly the sorted digits, else 0) and
:func:`sorting_partial` (its hidden reward, partial credit per position).
:func:`reward_model_reward` wraps a trained :class:`~jaxpref.models.heads.RewardModel`, and
:func:`resolve_reward_fn` finds a function by name for the command line.

>>> sorting_exact(prompts=["312>", "312>"], completions=["123", "132"])
[1.0, 0.0]
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import pathlib
import sys
import types
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from jaxpref.data.synthetic import hidden_reward
from jaxpref.inference.reward import DEFAULT_BUCKETS, score_responses
from jaxpref.models.heads import RewardModel
from jaxpref.objectives.reward import ensemble_rewards

RewardFn = Callable[..., Sequence[float] | np.ndarray]


def sorting_exact(prompts: Sequence[str], completions: Sequence[str], **kwargs) -> list[float]:
    """1.0 when the completion is exactly the prompt's digits sorted, else 0.0 (an exact checker)."""
    return [float(hidden_reward(p, c) == 1.0) for p, c in zip(prompts, completions, strict=True)]


def sorting_partial(prompts: Sequence[str], completions: Sequence[str], **kwargs) -> list[float]:
    """The sorting task's hidden reward: the share of positions holding the right digit."""
    return [hidden_reward(p, c) for p, c in zip(prompts, completions, strict=True)]


BUNDLED: dict[str, RewardFn] = {"sorting_exact": sorting_exact, "sorting_partial": sorting_partial}


def resolve_reward_fn(name: str) -> RewardFn:
    """A bundled reward function by name (``BUNDLED``), any function as ``"package.module:function"``
    (found in the current folder first, as ``python`` finds it, then in the installed packages), or
    one in a Python file as ``"path/to/file.py:function"``."""
    if name in BUNDLED:
        return BUNDLED[name]
    target, sep, attribute = name.rpartition(":")
    if not sep or not target or not attribute:
        raise ValueError(
            f"Unknown reward function {name!r}: use one of {sorted(BUNDLED)}, 'package.module:function' "
            "or 'path/to/file.py:function'."
        )
    module = _import_file(name, pathlib.Path(target)) if target.endswith(".py") else _import(name, target)
    fn = getattr(module, attribute, None)
    if not callable(fn):
        raise ValueError(f"Reward function {name!r}: {target} has no function {attribute!r}.")
    return fn


@contextlib.contextmanager
def _first_on_path(folder: pathlib.Path) -> Iterator[None]:
    """``folder`` first on ``sys.path`` for the duration: console scripts such as ``jaxpref`` do not
    put the current folder there, as ``python -m`` does."""
    entry = str(folder)
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        sys.path.remove(entry)


def _import(name: str, module_name: str) -> types.ModuleType:
    cwd = pathlib.Path.cwd()
    try:
        with _first_on_path(cwd):
            return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and (module_name + ".").startswith(error.name + "."):
            raise ValueError(
                f"Reward function {name!r}: no module {module_name!r} in the current folder ({cwd}) or the "
                f"installed packages; run from the folder that holds {module_name.replace('.', '/')}.py, "
                "or name the file: 'path/to/file.py:function'."
            ) from None
        # The reward module was found; something it imports was not.
        raise ValueError(f"Reward function {name!r}: importing {module_name} failed: {error}.") from None


def _import_file(name: str, path: pathlib.Path) -> types.ModuleType:
    path = path.resolve()
    if not path.is_file():
        raise ValueError(
            f"Reward function {name!r}: no file {path} (from the current folder {pathlib.Path.cwd()})."
        )
    # Registered under the file's name (dataclasses and pickle look modules up there) unless
    # another module already has that name.
    module_name = path.stem
    loaded = sys.modules.get(module_name)
    if loaded is not None:
        if getattr(loaded, "__file__", None) and pathlib.Path(loaded.__file__).resolve() == path:
            return loaded
        raise ValueError(
            f"Reward function {name!r}: a module named {module_name!r} is already imported "
            f"(from {getattr(loaded, '__file__', None) or 'built-ins'}); rename {path.name}."
        )
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        with _first_on_path(path.parent):  # its sibling modules import, as when run as a script
            spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]  # as a failed import does: no half-run module left behind
        raise
    return module


def reward_model_reward(
    model: RewardModel,
    *,
    ensemble_method: str = "mean",
    uncertainty_coefficient: float = 1.0,
    batch_size: int = 32,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
) -> Callable[..., np.ndarray]:
    """A reward function returning a :class:`RewardModel`'s score of prompt + completion.

    The reward model reads the sampled token ids directly (it must share the policy's tokenizer):
    each row's prompt tokens (``prompt_mask``) followed by its completion tokens
    (``completion_mask``) are scored by :func:`~jaxpref.inference.reward.score_responses`, which
    reads the reward at the last completion token and compiles once per (``batch_size``, length
    bucket). A model with several heads (an ensemble) gives one reward per completion from
    :func:`~jaxpref.objectives.reward.ensemble_rewards` with ``ensemble_method`` (``"mean"``,
    ``"min"`` or ``"uwo"`` with ``uncertainty_coefficient``). The model's weights stay where they
    are (place them on a mesh first for a large model).
    """
    if not isinstance(model, RewardModel):
        raise ValueError(
            f"`model` must be a jaxpref.models.heads.RewardModel (one head or an ensemble), got "
            f"{type(model).__name__}."
        )
    aggregate = functools.partial(
        ensemble_rewards, method=ensemble_method, uncertainty_coefficient=uncertainty_coefficient
    )
    aggregate(np.zeros((1, 1), np.float32))  # checks the options now rather than at the first rollout

    def reward(*, prompt_ids, prompt_mask, completion_ids, completion_mask, **kwargs) -> np.ndarray:
        prompts = [ids[mask != 0] for ids, mask in zip(prompt_ids, prompt_mask)]
        completions = [ids[mask != 0] for ids, mask in zip(completion_ids, completion_mask)]
        rewards = score_responses(model, prompts, completions, batch_size=batch_size, buckets=buckets)
        if rewards.ndim == 1:  # one head
            return rewards
        return np.asarray(aggregate(rewards.T))  # [heads, B] -> [B]

    return reward
