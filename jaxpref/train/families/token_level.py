"""Token-level preference objectives on pairs: ``[B, T]`` token log-probs instead of their sums.

Batches are pairwise (``data.layout=pairwise``: sequences ``0..B-1`` the chosen responses,
``B..2B-1`` the rejected ones, usually one prefix-shared row per pair). The step runs the policy and
the reference over the packed rows, then gathers each sequence's completion tokens, in order, into
a ``[sequences, T]`` array with its mask, ``T`` the row length (a static bound). The objective gets

* ``policy_chosen_logps``, ``ref_chosen_logps`` ``[B, T]``, ``chosen_mask`` ``[B, T]`` (and the
  same for ``rejected``): what :func:`~jaxpref.objectives.tdpo1_loss`,
  :func:`~jaxpref.objectives.tdpo2_loss` and every pairwise objective take (``objective("ld_dpo")``
  weighs token positions; others sum them);
* ``chosen_kl`` / ``rejected_kl`` ``[B, T]``, each completion token's KL(reference || policy) over
  the whole vocabulary (TDPO's), computed chunk by chunk
  (:func:`~jaxpref.models.logprobs.sequence_logps_and_kl`) only when a term reads it;
* ``chosen_lengths`` / ``rejected_lengths`` ``[B]`` and the data columns of
  :class:`~jaxpref.train.families.Pairwise`, to the terms that read them; for ``objective("wpo")``
  without ``chosen_weights`` in the data, WPO's weights from the policy's own token statistics
  (:func:`~jaxpref.objectives.wpo_weights`).

The reference is a live model (``"frozen"``, or ``"adapters_off"`` on a LoRA model): cached sums
cannot give per-token log-probs or distributions.
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp

from jaxpref.models.logprobs import sequence_logps, sequence_logps_and_kl
from jaxpref.models.packing import PackedBatch
from jaxpref.objectives import PAIRWISE, Objective, wpo_weights
from jaxpref.train.batches import packed_batch
from jaxpref.train.families.base import Family, LossOutput, metric_fractions, read_by_objective
from jaxpref.train.families.pairwise import Pairwise
from jaxpref.train.references import NoReference

Array = jax.Array

# Inputs every objective of this family must read.
TOKEN_INPUTS = (
    "policy_chosen_logps",
    "ref_chosen_logps",
    "chosen_mask",
    "policy_rejected_logps",
    "ref_rejected_logps",
    "rejected_mask",
)


def reads_token_kl(objective: Objective) -> bool:
    """Whether some term of ``objective`` reads the per-token KLs (``chosen_kl`` / ``rejected_kl``)."""
    return bool(read_by_objective(objective, {"chosen_kl": 0, "rejected_kl": 0}))


def needs_wpo_weights(objective: Objective) -> bool:
    """Whether a term is a registered pairwise objective that requires ``chosen_weights`` (WPO)."""
    return any(
        term.name in PAIRWISE and "chosen_weights" in PAIRWISE[term.name].requires for term in objective.terms
    )


def sequence_tokens(packed: PackedBatch, values: list[Array]) -> tuple[Array, list[Array]]:
    """Each sequence's completion tokens in order: mask ``[sequences, T]`` and ``values`` gathered.

    ``values`` are ``[rows, T]`` per-token arrays at the tokens' own positions (``T`` the row
    length). Sequence ``i`` is the tokens of row ``sequence_rows[i]`` with segment
    ``sequence_segments[i]``; its counted tokens (completion tokens with a predictor) go to slots
    ``0, 1, ...`` and the mask is 1 there; the remaining slots hold 0.
    """
    rows, segments = packed.sequence_rows, packed.sequence_segments
    counted = (packed.completion_mask != 0) & (packed.predictor_index >= 0)  # [rows, T]
    in_sequence = (packed.segment_ids[rows] == segments[:, None]) & counted[rows]  # [sequences, T]
    # A stable sort of "not in the sequence" puts its positions first, in order.
    order = jnp.argsort((~in_sequence).astype(jnp.int32), axis=-1, stable=True)  # [sequences, T]
    mask = jnp.take_along_axis(in_sequence, order, axis=-1)
    gathered = [jnp.where(mask, value[rows[:, None], order], 0.0) for value in values]
    return mask, gathered


class TokenLevel(Family):
    """TDPO, and pairwise objectives on token inputs (LD-DPO, WPO), with a live reference model."""

    name: ClassVar[str] = "token_level"
    layout: ClassVar[str] = "pairwise"
    columns: ClassVar[tuple[str, ...]] = Pairwise.columns

    def sequences_per_example(self, batch) -> int:
        return 2

    def check(self, model, objective, reference) -> None:
        if reference.from_batch:
            raise ValueError(
                f"`reference`={reference.name!r} holds one log-prob sum per sequence, but "
                "`family`='token_level' needs the reference's per-token log-probs (and, for TDPO, its "
                "next-token distributions): use reference='frozen' (or 'adapters_off' on a LoRA model)."
            )
        if isinstance(reference, NoReference):
            raise ValueError(
                "`family`='token_level' compares the policy with a reference token by token: use "
                "reference='frozen' (or 'adapters_off' on a LoRA model), not 'none'."
            )
        super().check(model, objective, reference)
        if not hasattr(model, "unembedding"):
            raise ValueError(
                "`family`='token_level' needs a language model with an LM head (a "
                f"jaxpref.models.decoder.Decoder), got {type(model).__name__}."
            )
        unread = [k for k in TOKEN_INPUTS if not any(t.accepts_input(k) for t in objective.terms)]
        if unread:
            raise ValueError(
                f"`objective` {objective!r} does not read the token-level input(s) {unread}; "
                "`family`='token_level' trains Objective.from_fn(tdpo1_loss), Objective.from_fn(tdpo2_loss) "
                "or pairwise objectives (objective('ld_dpo'), ...)."
            )
        if needs_wpo_weights(objective) and reads_token_kl(objective):
            raise ValueError(
                "`objective` combines WPO (weights from the policy's token statistics) with a term reading "
                "`chosen_kl`; the step computes one or the other. Pass `chosen_weights` / "
                "`rejected_weights` as data columns instead."
            )

    def loss(self, parts, params, ref_params, frozen, microbatch, kl, dropout_key) -> LossOutput:
        packed = packed_batch(microbatch)
        objective = parts.objective
        policy_model = parts.module(params, frozen, dropout_key)
        ref_model = parts.reference.model(parts.module, params, ref_params, frozen)
        rows_args = (packed.input_ids, packed.completion_mask)
        with_kl = reads_token_kl(objective)
        with_wpo = needs_wpo_weights(objective) and "chosen_weights" not in microbatch
        token_values = []
        if with_kl:
            policy, ref, token_kl = sequence_logps_and_kl(
                policy_model,
                ref_model,
                *rows_args,
                **packed.layout(),
                chunk_size=parts.lm_head["chunk_size"],
                max_completion_tokens=parts.lm_head["max_completion_tokens"],
            )
            token_values.append(token_kl)
        else:
            policy, _, *stats = sequence_logps(
                policy_model, *rows_args, **packed.layout(), **parts.lm_head, return_stats=with_wpo
            )
            ref, _ = sequence_logps(ref_model, *rows_args, **packed.layout(), **parts.lm_head)
            ref = jax.lax.stop_gradient(ref)
            if with_wpo:
                token_values.append(jax.lax.stop_gradient(stats[0].log_sum_squared_probs))
        mask, (policy, ref, *extra) = sequence_tokens(packed, [policy, ref, *token_values])

        def pair(name: str, value: Array) -> dict[str, Array]:  # [2B, ...] -> chosen / rejected
            return dict(zip((f"chosen_{name}", f"rejected_{name}"), jnp.split(value, 2)))

        (policy_chosen, policy_rejected), (ref_chosen, ref_rejected) = jnp.split(policy, 2), jnp.split(ref, 2)
        inputs = dict(
            policy_chosen_logps=policy_chosen,
            ref_chosen_logps=ref_chosen,
            policy_rejected_logps=policy_rejected,
            ref_rejected_logps=ref_rejected,
            **pair("mask", mask),
        )
        optional = pair("lengths", packed.sequence_sums(packed.completion_mask))
        if with_kl:
            optional |= pair("kl", extra[0])
        if with_wpo:
            optional |= pair("weights", wpo_weights(policy, extra[0], mask))  # [2B], no gradient
        optional |= {k: microbatch[k] for k in self.columns if k in microbatch}
        losses, metrics = objective(**inputs, **read_by_objective(objective, optional))
        count = jnp.asarray(losses.shape[0], jnp.float32)
        return jnp.sum(losses), (count, metric_fractions(metrics, losses.shape[0]))
