r"""Pref-GRPO's reward: each completion's win rate against the other completions of its prompt.

A pairwise preference model judges every ordered pair :math:`(y_i, y_j)` of the ``G`` completions
sampled for one prompt, and completion :math:`i`'s reward is its mean win probability

.. math:: r_i = \frac{1}{G - 1} \sum_{j \ne i} P(y_i \succ y_j \mid x)

(:func:`~jaxpref.objectives.policy_gradient.group_win_rates`), which GRPO then normalises within
the group as usual. Pointwise scores of similar good samples differ by tiny amounts that the group
normalisation inflates ("illusory advantage"); win rates spread over [0, 1] instead.

The judge is a jaxpref reward model sharing the policy's tokenizer:

- a General Preference Model (:class:`~jaxpref.models.heads.PreferenceEmbeddingModel`):
  :math:`P(y_i \succ y_j) = \sigma(s(y_i \succ y_j \mid x) / \tau)` with the skew-symmetric score
  :func:`~jaxpref.objectives.reward.gpm_preference_score`, so the judgements may be intransitive;
- a scalar :class:`~jaxpref.models.heads.RewardModel`: :math:`P = \mathrm{link}((r_i - r_j) / \tau)`,
  Bradley-Terry (logistic link) or Thurstone (probit). Several heads are combined first by
  ``objective_weights`` (multi-objective heads), else averaged (an ensemble).

:func:`load_win_rate_reward` reads the link, :math:`\tau` and the heads' weights that
``jaxpref reward`` stores in the checkpoint's ``config.json``. The reward function follows
:mod:`jaxpref.train.rewards`: keyword arguments over the whole batch, whose rows are the prompts'
groups of ``num_generations`` consecutive completions (as :class:`~jaxpref.train.online.OnlineStep`
samples them). Online runs use it with ``--set rollout.preference_model=runs/gpm/hf``
(``jaxpref/recipes/online.py``), scored as ``"preference_win_rate"``.

Reference: Wang et al., "Pref-GRPO: Pairwise Preference Reward-based GRPO for Stable
Text-to-Image Reinforcement Learning", arXiv:2508.20751.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxpref.inference.reward import (
    DEFAULT_BUCKETS,
    load_reward_model,
    preference_embeddings,
    score_responses,
)
from jaxpref.models.heads import PreferenceEmbeddingModel, RewardModel
from jaxpref.objectives.policy_gradient import group_win_rates
from jaxpref.objectives.reward import gpm_preference_score, multi_objective_rewards

# The name online runs score it under, and the config.json keys `jaxpref reward` writes (the same
# strings as jaxpref.recipes.reward_eval's LINK_KEY, TEMPERATURE_KEY and OBJECTIVE_WEIGHTS_KEY).
PREFERENCE_REWARD_NAME = "preference_win_rate"
LINK_KEY, TEMPERATURE_KEY = "preference_link", "preference_temperature"
OBJECTIVE_WEIGHTS_KEY = "reward_objective_weights"
LINKS = ("logistic", "probit")

# A judge's outputs for n completions: rewards [n] or [n, heads], or GPM (embeddings [n, 2k], scales [n, k]).
JudgeOutputs = np.ndarray | tuple[np.ndarray, np.ndarray]


def pairwise_preferences(
    outputs: JudgeOutputs,
    group_size: int,
    *,
    link: str = "logistic",
    temperature: float = 1.0,
    objective_weights: Sequence[float] | None = None,
) -> np.ndarray:  # [n / group_size, G, G]
    r""":math:`P(y_i \succ y_j)` for every ordered pair of completions within each group of
    ``group_size`` consecutive ones, ``[groups, G, G]`` float32 (the diagonal is 0.5).

    ``outputs`` are a judge's for the ``n`` completions: General Preference Model
    ``(embeddings, scales)`` (row :math:`i`'s scales weigh the pair, the same for every completion
    of one prompt), or rewards ``[n]`` / ``[n, heads]`` (heads combined by ``objective_weights``,
    else averaged). The probability is ``link(score / temperature)``.
    """
    if link not in LINKS:
        raise ValueError(f"`link`={link!r} must be one of {LINKS}.")
    if not (isinstance(temperature, int | float) and 0 < temperature < np.inf):
        raise ValueError(f"`temperature` must be a positive number, got {temperature!r}.")
    if isinstance(outputs, tuple):
        embeddings, scales = (jnp.asarray(x, jnp.float32) for x in outputs)
        count = embeddings.shape[0]
    else:
        rewards = jnp.asarray(outputs, jnp.float32)
        count = rewards.shape[0]
    if not isinstance(group_size, int) or group_size < 2 or count % group_size:
        raise ValueError(
            f"`group_size`={group_size!r} must be an int >= 2 dividing the {count} completions: a win rate "
            "compares each completion with the others of its prompt."
        )
    groups = count // group_size
    if isinstance(outputs, tuple):
        grid = (groups, group_size, group_size)
        embeddings = embeddings.reshape(groups, group_size, -1)
        scales = scales.reshape(groups, group_size, -1)
        scores = gpm_preference_score(
            jnp.broadcast_to(embeddings[:, :, None], (*grid, embeddings.shape[-1])),
            jnp.broadcast_to(embeddings[:, None, :], (*grid, embeddings.shape[-1])),
            eigenvalue_scales=jnp.broadcast_to(scales[:, :, None], (*grid, scales.shape[-1])),
        )
    else:
        if rewards.ndim == 2:
            heads = rewards.shape[1]
            weights = np.full(heads, 1.0 / heads) if objective_weights is None else objective_weights
            rewards = multi_objective_rewards(rewards, jnp.asarray(weights, jnp.float32))
        elif rewards.ndim != 1:
            raise ValueError(f"Rewards must be [n] or [n, heads], got shape {rewards.shape}.")
        rewards = rewards.reshape(groups, group_size)
        scores = rewards[:, :, None] - rewards[:, None, :]
    z = scores / temperature
    probabilities = jax.nn.sigmoid(z) if link == "logistic" else jax.scipy.special.ndtr(z)
    return np.asarray(probabilities, np.float32)


def win_rate_reward(
    model: RewardModel | PreferenceEmbeddingModel,
    num_generations: int,
    *,
    link: str = "logistic",
    temperature: float = 1.0,
    objective_weights: Sequence[float] | None = None,
    batch_size: int = 32,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
) -> Callable[..., np.ndarray]:
    """A reward function giving each completion its win rate within its group (Pref-GRPO).

    Rows ``g * num_generations ... (g + 1) * num_generations - 1`` of a batch are the completions
    of one prompt. Each row's prompt tokens (``prompt_mask``) then completion tokens
    (``completion_mask``) are scored once by ``model`` (:func:`~jaxpref.inference.reward.score_responses`
    or :func:`~jaxpref.inference.reward.preference_embeddings`: compiled once per
    (``batch_size``, length bucket)); :func:`pairwise_preferences` with ``link``, ``temperature``
    and ``objective_weights`` gives the group's preference matrix, and
    :func:`~jaxpref.objectives.policy_gradient.group_win_rates` the rewards ``[B]`` in [0, 1].
    """
    if not isinstance(model, RewardModel | PreferenceEmbeddingModel):
        raise ValueError(
            "`model` must be a PreferenceEmbeddingModel (a General Preference Model) or a RewardModel, got "
            f"{type(model).__name__}."
        )
    if not isinstance(num_generations, int) or num_generations < 2:
        raise ValueError(
            f"`num_generations`={num_generations!r} must be an int >= 2: a win rate needs other completions "
            "of the same prompt."
        )
    if isinstance(model, RewardModel) and objective_weights is not None:
        if len(objective_weights) != model.score.out_features:
            raise ValueError(
                f"`objective_weights` has {len(objective_weights)} weight(s) for a model with "
                f"{model.score.out_features} head(s)."
            )
    pairwise_preferences(np.zeros(2, np.float32), 2, link=link, temperature=temperature)  # checks now
    score = preference_embeddings if isinstance(model, PreferenceEmbeddingModel) else score_responses

    def reward(*, prompt_ids, prompt_mask, completion_ids, completion_mask, **kwargs) -> np.ndarray:
        prompt_ids, prompt_mask = np.asarray(prompt_ids), np.asarray(prompt_mask)
        rows = len(prompt_ids)
        if rows % num_generations:
            raise ValueError(
                f"The batch has {rows} completions, not a multiple of `num_generations`={num_generations}."
            )
        grouped = np.where(prompt_mask != 0, prompt_ids, -1).reshape(
            rows // num_generations, num_generations, -1
        )
        if not (grouped == grouped[:, :1]).all():
            raise ValueError(
                f"The completions of a group of `num_generations`={num_generations} consecutive rows must answer "
                "one prompt; this batch's groups mix prompts (is num_generations the sampler's?)."
            )
        prompts = [ids[mask != 0] for ids, mask in zip(prompt_ids, prompt_mask)]
        completions = [
            np.asarray(ids)[np.asarray(mask) != 0] for ids, mask in zip(completion_ids, completion_mask)
        ]
        outputs = score(model, prompts, completions, batch_size=batch_size, buckets=buckets)
        preferences = pairwise_preferences(
            outputs,
            num_generations,
            link=link,
            temperature=temperature,
            objective_weights=objective_weights,
        )
        return np.asarray(group_win_rates(preferences), np.float32).reshape(-1)

    return reward


def judge_settings(path: str | os.PathLike) -> dict[str, Any]:
    """``link``, ``temperature`` and ``objective_weights`` of the reward model saved in ``path``
    (what ``jaxpref reward`` stores in its ``config.json``; logistic at temperature 1 otherwise)."""
    hf = json.loads((pathlib.Path(path) / "config.json").read_text())
    weights = hf.get(OBJECTIVE_WEIGHTS_KEY)
    return {
        "link": hf.get(LINK_KEY, "logistic"),
        "temperature": float(hf.get(TEMPERATURE_KEY, 1.0)),
        "objective_weights": None if weights is None else tuple(float(w) for w in weights),
    }


def load_win_rate_reward(
    path: str | os.PathLike,
    num_generations: int,
    *,
    mesh: Mesh | None = None,
    dtype: Any = jnp.float32,
    batch_size: int = 32,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
) -> Callable[..., np.ndarray]:
    """:func:`win_rate_reward` of the reward model saved in the Hugging Face folder ``path`` (a GPM or
    scalar run's ``hf/``, :func:`~jaxpref.inference.reward.load_reward_model`), with its stored
    :func:`judge_settings`."""
    model = load_reward_model(path, dtype=dtype, mesh=mesh)
    return win_rate_reward(
        model, num_generations, **judge_settings(path), batch_size=batch_size, buckets=buckets
    )
