"""Preference pairs: sequences ``0..B-1`` are the chosen responses, ``B..2B-1`` the rejected ones."""

from __future__ import annotations

from typing import ClassVar

import jax.numpy as jnp

from jaxpref.train.families.base import LogpsFamily


class Pairwise(LogpsFamily):
    """DPO and every pairwise objective (:data:`jaxpref.objectives.PAIRWISE`)."""

    name: ClassVar[str] = "pairwise"
    layout: ClassVar[str] = "pairwise"
    reference_keys: ClassVar[tuple[str, ...]] = ("ref_chosen_logps", "ref_rejected_logps")
    # Per-example data columns (jaxpref.data.rows.EXAMPLE_COLUMNS) for the objectives that read them.
    columns: ClassVar[tuple[str, ...]] = ("chosen_quality", "rejected_quality", "margin", "target_probability", "user_id")

    def sequences_per_example(self, batch) -> int:
        return 2

    def objective_inputs(self, policy, lengths, ref, microbatch, kl):
        chosen, rejected = jnp.split(policy, 2)
        inputs = dict(policy_chosen_logps=chosen, policy_rejected_logps=rejected)
        if ref is not None:
            inputs.update(zip(self.reference_keys, jnp.split(ref, 2)))
        # Lengths are optional inputs: passed only to objectives that read them.
        return inputs, dict(zip(("chosen_lengths", "rejected_lengths"), jnp.split(lengths, 2)))
