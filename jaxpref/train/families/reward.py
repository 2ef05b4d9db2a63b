"""Reward models on preference pairs: Bradley-Terry and relatives on one reward per response (or one
per head), General Preference Models on preference embeddings."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import jax
import jax.numpy as jnp

from jaxpref.models.heads import PreferenceEmbeddingModel, RewardModel
from jaxpref.objectives import REWARD
from jaxpref.train.batches import packed_batch, packed_preference_embeddings, packed_rewards
from jaxpref.train.families.base import Family, LossOutput, metric_fractions, read_by_objective

Array = jax.Array


class Reward(Family):
    """Pairs laid out as for :class:`~jaxpref.train.families.Pairwise`; each sequence's reward is read
    at its own last token, so a prefix-shared row scores its two responses separately."""

    name: ClassVar[str] = "reward"
    layout: ClassVar[str] = "pairwise"
    has_reference: ClassVar[bool] = False
    columns: ClassVar[tuple[str, ...]] = (
        "margin", "target_probability", "chosen_ratings", "rejected_ratings", "user_id",
    )  # fmt: skip

    def sequences_per_example(self, batch) -> int:
        return 2

    def check(self, model, objective, reference) -> None:
        super().check(model, objective, reference)
        if reference.name != "none":
            raise ValueError(
                "`family`='reward' trains a reward model, which has no reference: pass `reference`='none', "
                f"not {reference.name!r}."
            )
        if not isinstance(model, RewardModel | PreferenceEmbeddingModel):
            raise ValueError(
                "`family`='reward' needs `model` to be a jaxpref.models.heads.RewardModel or "
                f"PreferenceEmbeddingModel, got {type(model).__name__}."
            )
        if isinstance(model, RewardModel) and model.score.out_features == 1:
            return
        scalar_terms = [term.name for term in objective.terms if term.name in REWARD]
        if scalar_terms:
            outputs = (
                "preference embeddings"
                if isinstance(model, PreferenceEmbeddingModel)
                else f"{model.score.out_features} rewards per response"
            )
            raise ValueError(
                f"`objective` term(s) {scalar_terms} read one scalar reward per response, but `model` gives "
                f"{outputs}; use Objective.from_fn(gpm_loss) for preference embeddings, or "
                "Objective.from_fn(functools.partial(ensemble_reward_loss, objective)) for several heads "
                "(jaxpref.objectives.reward)."
            )

    def loss(self, parts, params, ref_params, frozen, microbatch, kl, dropout_key) -> LossOutput:
        inputs = reward_inputs(parts.module(params, frozen, dropout_key), microbatch)
        optional = read_by_objective(parts.objective, {k: microbatch[k] for k in self.columns if k in microbatch})
        losses, metrics = parts.objective(**inputs, **optional)
        count = jnp.asarray(losses.shape[0], jnp.float32)
        return jnp.sum(losses), (count, metric_fractions(metrics, losses.shape[0]))


def reward_inputs(model: RewardModel | PreferenceEmbeddingModel, microbatch: Mapping[str, Array]) -> dict[str, Array]:
    """Reward-objective inputs: sequences ``0..b-1`` are the chosen, ``b..2b-1`` the rejected."""
    packed = packed_batch(microbatch)
    if isinstance(model, PreferenceEmbeddingModel):
        embeddings, scales = packed_preference_embeddings(model, packed)  # [2b, 2k], [2b, k]
        chosen, rejected = jnp.split(embeddings, 2)
        # Both responses of a pair read their scales at the same prompt token: take the chosen's.
        return dict(chosen_embeddings=chosen, rejected_embeddings=rejected, eigenvalue_scales=jnp.split(scales, 2)[0])
    chosen, rejected = jnp.split(packed_rewards(model, packed), 2)  # [b] or [b, heads] each
    return dict(chosen_rewards=chosen, rejected_rewards=rejected)
