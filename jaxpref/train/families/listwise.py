"""Ranked lists: K responses per prompt with scores (``data.layout=ranked``), ragged through a mask.

Sequence ``k * B + b`` of a batch is response ``k`` of example ``b`` (the loader's and
:func:`~jaxpref.models.packing.prefix_shared_groups`' order), so per-sequence sums
``.reshape(K, B).T`` are the objectives' ``[B, K]`` inputs.
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp

from jaxpref.train.families.base import LogpsFamily

Array = jax.Array


def _lists(values: Array, num_responses: int) -> Array:  # [K * B] -> [B, K]
    return values.reshape(num_responses, -1).T


class Listwise(LogpsFamily):
    """Every listwise objective (:data:`jaxpref.objectives.LISTWISE`, ``nca`` / ``infonca`` of
    :data:`~jaxpref.objectives.MULTI_RESPONSE`, and ``Objective.from_fn`` of ``pro_loss``,
    ``mdpo_loss``, ``mipo_loss``).

    The objective gets ``policy_logps`` and ``scores`` ``[B, K]``, and when its terms read them
    ``ref_logps``, ``mask`` (the data's ``response_mask``), ``lengths`` (completion tokens) and
    ``chosen``: the responses scored above their list's mean, the chosen set of MDPO / MIPO.
    """

    name: ClassVar[str] = "listwise"
    layout: ClassVar[str] = "ranked"
    reference_keys: ClassVar[tuple[str, ...]] = ("ref_logps",)  # [B, K]
    columns: ClassVar[tuple[str, ...]] = ("user_id",)

    def sequences_per_example(self, batch) -> int:
        return batch["scores"].shape[1]

    def batch_keys(self, reference) -> tuple[str, ...]:
        return super().batch_keys(reference) + ("scores", "response_mask")

    def objective_inputs(self, policy, lengths, ref, microbatch, kl):
        scores, mask = microbatch["scores"], microbatch["response_mask"]
        num_responses = scores.shape[1]
        valid = jnp.where(mask, scores, 0.0)
        mean_score = valid.sum(1, keepdims=True) / jnp.maximum(mask.sum(1, keepdims=True), 1)
        optional = dict(
            mask=mask,
            lengths=_lists(lengths, num_responses),
            chosen=mask & (scores > mean_score),
        )
        if ref is not None:
            optional["ref_logps"] = _lists(ref, num_responses)
        return dict(policy_logps=_lists(policy, num_responses), scores=scores), optional

    def reference_columns(self, logps, batch):
        return {"ref_logps": _lists(logps, batch["scores"].shape[1])}

    def reference_sequences(self, microbatch):
        return microbatch["ref_logps"].T.reshape(-1)
