"""Unpaired (KTO and relatives): one sequence per example with a desirable / undesirable label,
and optionally a KL batch of mismatched sequences under ``kl_``-prefixed keys."""

from __future__ import annotations

from typing import ClassVar

import jax

from jaxpref.train.batches import KL_PREFIX, SEQUENCE_FIELDS
from jaxpref.train.families.base import ROW_KEYS, LogpsFamily, read_by_objective


class Unpaired(LogpsFamily):
    """KTO's KL reference point is a batch mean: the step runs the KL batch over the whole batch
    first (:meth:`kl_logps`), so gradient accumulation still sees the whole batch's."""

    name: ClassVar[str] = "unpaired"
    layout: ClassVar[str] = "unpaired"
    reference_keys: ClassVar[tuple[str, ...]] = ("ref_logps",)
    columns: ClassVar[tuple[str, ...]] = ("user_id",)

    def check(self, model, objective, reference) -> None:
        super().check(model, objective, reference)
        stateful = [term.name for term in objective.terms if term.accepts_input("bco_state")]
        if stateful:
            raise ValueError(
                f"`objective` term(s) {stateful} keep a running mean of rewards across steps, which the "
                "train step does not carry yet; use 'kto' or 'apo_zero_unpaired', or call "
                "unpaired_loss('bco', ...) in your own loop."
            )

    def batch_keys(self, reference) -> tuple[str, ...]:
        return super().batch_keys(reference) + ("labels",)

    def kl_batch_keys(self, reference) -> tuple[str, ...]:
        cached = (f"{KL_PREFIX}ref_logps",) if reference.from_batch else ()
        return tuple(KL_PREFIX + f for f in ROW_KEYS + SEQUENCE_FIELDS) + cached

    def check_batch(self, batch, reference, objective) -> None:
        super().check_batch(batch, reference, objective)
        has_kl = f"{KL_PREFIX}input_ids" in batch
        reads_kl = bool(read_by_objective(objective, {"ref_kl_logps": 0}))
        if reference.from_batch and has_kl and reads_kl:
            # A KL pair is the prompt of one example with the completion of its batch neighbour, so
            # it changes with every shuffle; log-probs cached in another order would not match it.
            raise ValueError(
                "`reference`='cached' cannot serve KTO's KL batch (its mismatched pairs change with the "
                "data order); use reference='frozen' for objectives that read the KL batch (kto)."
            )

    def objective_inputs(self, policy, lengths, ref, microbatch, kl):
        inputs = dict(policy_logps=policy, labels=microbatch["labels"])
        if ref is not None:
            inputs["ref_logps"] = ref
        # The loader builds a KL batch for all unpaired data; only KTO-like terms read it.
        optional = {} if kl is None else dict(zip(("policy_kl_logps", "ref_kl_logps"), kl))
        return inputs, optional

    def class_labels(self, microbatch):
        return microbatch["labels"]

    def kl_logps(self, parts, params, ref_params, frozen, kl_microbatches):
        """Policy and reference log-probs of the KL batch, ``[kl sequences]`` each, without gradient.

        ``kl_microbatches`` is the KL batch split like the batch (``[A, ...]``); the step runs this
        before the gradient pass, so KTO's KL reference point is the full batch's.
        """
        params = jax.lax.stop_gradient(params)

        def one(microbatch):
            policy = parts.logps(parts.module(params, frozen), microbatch)[0]
            # A KL sequence's cached key is ref_logps too (kl_ref_logps without its prefix).
            return policy, self.reference_logps(parts, params, ref_params, frozen, microbatch)

        policy, ref = jax.lax.map(one, kl_microbatches)
        return policy.reshape(-1), None if ref is None else ref.reshape(-1)

    def finish_metrics(self, metrics):
        # The class means are exact; their difference is recomputed from them.
        return {**metrics, "rewards/margins": metrics["rewards/chosen"] - metrics["rewards/rejected"]}
