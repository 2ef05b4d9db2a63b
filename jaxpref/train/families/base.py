"""What every kind of training shares: the :class:`Family` interface and the log-prob families' loss.

A family owns what differs between kinds of training; the step (:func:`jaxpref.train.build_step`)
owns what they share (microbatches, gradient accumulation, the guarded update, jit). A family says
which batch keys it needs, how many sequences an example has, what it feeds the objective, where
the reference log-probs of its sequences sit in a batch, and how its metrics combine.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpref.objectives import Objective
from jaxpref.train.batches import ROW_FIELDS, SEQUENCE_FIELDS, packed_batch, packed_logps
from jaxpref.train.references import Reference

Array = jax.Array
logger = logging.getLogger(__name__)

# Row fields every batch of sequences carries (prefix_segment_ids is optional).
ROW_KEYS = tuple(f for f in ROW_FIELDS if f != "prefix_segment_ids")
# A microbatch loss: (sum of per-example losses, (count, metric fractions)); see metric_fractions.
LossOutput = tuple[Array, tuple[Array, dict[str, tuple[Array, Array]]]]


@dataclasses.dataclass(frozen=True)
class StepParts:
    """What a family's loss reads from the step besides the batch."""

    objective: Objective | None
    reference: Reference
    module: Callable[..., nnx.Module]  # (params, frozen, dropout_key=None) -> the model over them
    lm_head: Mapping[str, Any]  # sequence_logps options (chunk sizes, completion-only head)

    def logps(self, model: nnx.Module, microbatch: Mapping[str, Array]) -> tuple[Array, Array]:
        """Log-prob sums and completion lengths of the microbatch's sequences, ``[sequences]`` each."""
        return packed_logps(model, packed_batch(microbatch), **self.lm_head)


class Family:
    """A kind of training. Subclasses are small: override what differs."""

    name: ClassVar[str]
    layout: ClassVar[str]  # the data layout it trains on (jaxpref.data.rows)
    reference_keys: ClassVar[tuple[str, ...]] = ()  # batch keys of cached reference log-probs
    # Optional per-example data columns, passed to the objective terms that read them.
    columns: ClassVar[tuple[str, ...]] = ()
    has_reference: ClassVar[bool] = True  # False: trains without a reference model (SFT, reward models)

    def check(self, model: nnx.Module, objective: Objective | None, reference: Reference) -> None:
        """Raises a ValueError naming the argument when the combination cannot train."""
        if not isinstance(objective, Objective):
            raise ValueError(
                f"`objective` must be an Objective (e.g. objective('sigmoid', beta=0.1)), got {objective!r}."
            )
        if reference.from_batch and not self.reference_keys:
            raise ValueError(f"`family`={self.name!r} has no reference log-probs to cache.")

    def sequences_per_example(self, batch: Mapping[str, Any]) -> int:
        """How many sequences each example has (static: read from shapes only)."""
        return 1

    def batch_keys(self, reference: Reference) -> tuple[str, ...]:
        """Keys every batch needs."""
        return ROW_KEYS + SEQUENCE_FIELDS + (self.reference_keys if reference.from_batch else ())

    def kl_batch_keys(self, reference: Reference) -> tuple[str, ...]:
        """Keys a batch's KL batch (``kl_``-prefixed) needs when it has one."""
        return ()

    def check_batch(self, batch: Mapping[str, Any], reference: Reference, objective: Objective | None) -> None:
        """Host-side checks of one batch beyond its keys: a data column no term reads is reported once."""
        for key in self.columns:
            if key in batch and objective is not None and not read_by_objective(objective, {key: 0}):
                _warn_once(f"data column {key!r} is not read by the objective {objective!r}; it is ignored.")

    def loss(self, parts: StepParts, params, ref_params, frozen, microbatch, kl, dropout_key) -> LossOutput:
        raise NotImplementedError

    def kl_logps(self, parts: StepParts, params, ref_params, frozen, kl_microbatch) -> tuple[Array, Array | None]:
        """Policy and reference log-probs of a KL microbatch (families with a KL batch)."""
        raise NotImplementedError(f"`family`={self.name!r} has no KL batch.")

    def finish_metrics(self, metrics: dict[str, Array]) -> dict[str, Array]:
        """Batch metrics after accumulation; families fix those that do not average."""
        return metrics

    def reference_columns(self, logps: Array, batch: Mapping[str, Any]) -> dict[str, Array]:
        """Reference log-probs of a batch's sequences ``[sequences]`` as the cached batch keys."""
        return dict(zip(self.reference_keys, jnp.split(logps, len(self.reference_keys))))

    def reference_sequences(self, microbatch: Mapping[str, Array]) -> Array:
        """The inverse of :meth:`reference_columns`: cached keys -> ``[sequences]``."""
        return jnp.concatenate([microbatch[k] for k in self.reference_keys])

    # Equal by kind and settings, so a jitted function taking a family as a static argument
    # compiles once per kind, not once per instance.
    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(vars(self).items()))))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def metric_fractions(
    metrics: Mapping[str, Any], examples: int, labels: Array | None = None
) -> dict[str, tuple[Array, Array]]:
    """Each objective metric of a microbatch as (numerator, denominator) sums.

    The batch value is the sum of numerators over microbatches divided by the sum of
    denominators: per-example ``[examples]`` metrics give (sum, examples), so their batch mean is
    exact; batch-level scalars give (value, 1), a mean over microbatches. With ``labels``
    (unpaired), the per-example ``rewards`` and ``logps`` also give exact class means
    ``rewards/chosen`` (desirable), ``rewards/rejected``, ``logps/chosen`` and ``logps/rejected``;
    per-microbatch class counts are dropped.
    """
    fractions = {}
    for key, value in metrics.items():
        if not isinstance(value, jax.Array) or key.startswith("count/"):
            continue
        if value.shape == (examples,):
            fractions[key] = (jnp.sum(value), jnp.asarray(examples, jnp.float32))
        elif value.shape == ():
            fractions[key] = (value, jnp.ones((), jnp.float32))
    if labels is not None:
        desirable = (labels > 0.5).astype(jnp.float32)
        for side, weights in (("chosen", desirable), ("rejected", 1.0 - desirable)):
            for name in ("rewards", "logps"):
                fractions[f"{name}/{side}"] = (jnp.sum(metrics[name] * weights), jnp.sum(weights))
    return fractions


def read_by_objective(objective: Objective, optional: Mapping[str, Array]) -> dict[str, Array]:
    """The optional inputs some term of ``objective`` reads (the others are not passed)."""
    return {k: v for k, v in optional.items() if any(t.accepts_input(k) for t in objective.terms)}


class LogpsFamily(Family):
    """Families whose objective reads sequence log-probs of the policy and the reference."""

    def objective_inputs(
        self, policy: Array, lengths: Array, ref: Array | None, microbatch: Mapping[str, Array], kl
    ) -> tuple[dict[str, Array], dict[str, Array]]:
        """(inputs every objective gets, optional inputs for the terms that read them)."""
        raise NotImplementedError

    def class_labels(self, microbatch: Mapping[str, Array]) -> Array | None:
        """Per-example labels whose class means the metrics report (unpaired), or None."""
        return None

    def reference_logps(self, parts: StepParts, params, ref_params, frozen, microbatch) -> Array | None:
        """Reference log-prob sums of the microbatch's sequences, ``[sequences]``, or None."""
        model = parts.reference.model(parts.module, params, ref_params, frozen)
        if model is not None:
            return parts.logps(model, microbatch)[0]
        if parts.reference.from_batch:
            return self.reference_sequences(microbatch)
        return None

    def loss(self, parts, params, ref_params, frozen, microbatch, kl, dropout_key) -> LossOutput:
        policy, lengths = parts.logps(parts.module(params, frozen, dropout_key), microbatch)
        ref = self.reference_logps(parts, params, ref_params, frozen, microbatch)
        inputs, optional = self.objective_inputs(policy, lengths, ref, microbatch, kl)
        optional |= {k: microbatch[k] for k in self.columns if k in microbatch}
        losses, metrics = parts.objective(**inputs, **read_by_objective(parts.objective, optional))
        count = jnp.asarray(losses.shape[0], jnp.float32)
        fractions = metric_fractions(metrics, losses.shape[0], self.class_labels(microbatch))
        return jnp.sum(losses), (count, fractions)


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        logger.warning(message)
