"""Supervised fine-tuning: the token-mean NLL of completion tokens, no objective, no reference."""

from __future__ import annotations

from typing import ClassVar

import jax.numpy as jnp

from jaxpref.models.logprobs import sequence_logps
from jaxpref.train.batches import LAYOUT_FIELDS
from jaxpref.train.families.base import ROW_KEYS, Family, LossOutput


class SFT(Family):
    """Rows may pack any sequences: the loss is a token sum, divided by the batch's token count."""

    name: ClassVar[str] = "sft"
    layout: ClassVar[str] = "sft"
    has_reference: ClassVar[bool] = False

    def check(self, model, objective, reference) -> None:
        if objective is not None or reference.name != "none":
            raise ValueError(
                "`family`='sft' trains on the token-mean NLL without a reference: pass `objective`=None "
                "and `reference`='none'."
            )

    def batch_keys(self, reference) -> tuple[str, ...]:
        return ROW_KEYS  # token sums need no sequence boundaries

    def loss(self, parts, params, ref_params, frozen, microbatch, kl, dropout_key) -> LossOutput:
        model = parts.module(params, frozen, dropout_key)
        layout = {k: microbatch.get(k) for k in LAYOUT_FIELDS}
        token_logps, _ = sequence_logps(
            model, microbatch["input_ids"], microbatch["completion_mask"], **layout, **parts.lm_head
        )
        counted = (microbatch["completion_mask"] != 0) & (microbatch["predictor_index"] >= 0)
        return -token_logps.sum(), (counted.sum().astype(jnp.float32), {})
