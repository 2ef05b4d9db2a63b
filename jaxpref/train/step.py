"""One jitted training step for every kind of training: log-probs or rewards -> objective -> gradients -> optax.

:func:`build_step` joins a model, an :class:`~jaxpref.objectives.Objective` and an optax optimizer
on a mesh, and returns a :class:`TrainStep`: ``init`` creates the :class:`TrainState` directly in
its sharded layout, and calling it runs ``train_step(state, batch) -> (state, metrics)``.

Inside the step:

1. The batch (see :mod:`jaxpref.train.batches`) is split into ``grad_accum_steps`` microbatches,
   scanned with :func:`jax.lax.scan`. Each adds the *sum* of its per-example losses (per-token for
   SFT), the number of examples (tokens) and the gradient of that sum; the totals are divided once
   at the end, so the update equals the full-batch update exactly (up to float summation order).
   Objectives that are batch-level by definition (``aot``, and the NLL terms of ``sft`` / ``cpo`` /
   ``orpo`` in pairwise objectives) see one microbatch at a time. KTO's KL reference point does
   not: the KL batch (no gradient) is run first over the whole batch.
2. The *family* (:mod:`jaxpref.train.families`: SFT, Pairwise, Unpaired, Reward, Listwise,
   TokenLevel, or your own) computes each microbatch's loss: which batch keys it needs, what it feeds the
   objective (log-prob sums of chosen and rejected, ``[B, K]`` lists, a reward model's rewards or
   GPM embeddings, ...) and how its metrics combine. The step knows nothing of the kinds.
   The *reference* (:mod:`jaxpref.train.references`) says where reference log-probs come from: a
   frozen copy of the initial policy (``"frozen"``, under ``stop_gradient``), a LoRA model's base
   with the adapters off (``"adapters_off"``, what ``"frozen"`` resolves to on a LoRA model: no
   copy of the weights), the batch (``"cached"``, see :mod:`jaxpref.train.reference`), or nowhere
   (``"none"``). A LoRA model (:mod:`jaxpref.models.lora`) trains only its adapters (and a head
   model's heads): its base weights are passed to the step frozen (:attr:`TrainStep.frozen`, never
   in the optimizer state or the checkpoint).
3. A non-finite loss or gradient norm skips the update: params and optimizer state keep their
   values (so the optimizer's own count and learning-rate schedule see only applied updates), while
   ``step`` still advances, since it counts batches consumed and keeps the data position, logs and
   checkpoints aligned. ``state.nonfinite_count`` counts consecutive skips; the loop
   (:func:`jaxpref.train.loop.train`) stops after too many.

Metrics (floats, TRL's names where TRL has them): ``loss``, the objective's metrics averaged over
the batch (``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``,
``logps/chosen``, ``logps/rejected``, ``loss/<term>``, ...), ``grad_norm`` (before any clipping in
the optimizer), ``learning_rate`` (when the optimizer is wrapped in
:func:`optax.inject_hyperparams`), ``num_tokens`` (non-padding tokens of the batch),
``nonfinite_skipped`` (1.0 when this update was skipped) and ``nonfinite_consecutive``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxpref.models.decoder import param_logical_axes
from jaxpref.models.logprobs import DEFAULT_CHUNK_SIZE
from jaxpref.models.lora import train_view, trainable_filter
from jaxpref.objectives import Objective
from jaxpref.sharding import LOGICAL_AXIS_RULES, logical_sharding
from jaxpref.train.batches import (
    KL_PREFIX,
    check_microbatches,
    constrain_microbatches,
    count_tokens,
    shard_batch,
    split_microbatches,
    sub_batch,
)
from jaxpref.train.families import Family, StepParts, as_family
from jaxpref.train.references import Reference, as_reference

Array = jax.Array


@struct.dataclass
class TrainState:
    """Everything a step reads and writes; a pytree, checkpointed whole by :mod:`jaxpref.train.checkpoint`."""

    step: Array  # [] int32: batches consumed, skipped ones included
    params: nnx.State  # the policy's nnx.Param variables
    opt_state: optax.OptState
    rng: Array  # [2] uint32 raw key data (a plain array, so it checkpoints like any other)
    ref_params: nnx.State | None  # frozen copy of the initial policy when reference="frozen"
    nonfinite_count: Array  # [] int32: consecutive updates skipped for a non-finite loss or gradient


def param_shardings(params: nnx.State, mesh: Mesh, rules: Mapping = LOGICAL_AXIS_RULES) -> nnx.State:
    """A State like ``params`` holding each parameter's ``NamedSharding`` (from its logical axes)."""
    return nnx.from_flat_state(
        [
            (path, v.replace(logical_sharding(mesh, param_logical_axes(path, len(v.shape)), v.shape, rules)))
            for path, v in nnx.to_flat_state(params)
        ]
    )


def opt_state_shardings(abstract_opt_state, abstract_params: nnx.State, shardings: nnx.State, mesh: Mesh):
    """The ``NamedSharding`` of every optimizer-state array, as a tree shaped like ``abstract_opt_state``.

    Subtrees shaped like the params (Adam's ``mu`` and ``nu``, momentum traces, ...) are sharded
    like them (``shardings``, from :func:`param_shardings`); everything else (counts,
    hyperparameters, factored statistics) is replicated. ``abstract_*`` are ``jax.eval_shape``
    results, so nothing is allocated.
    """
    params_def = jax.tree.structure(abstract_params)
    param_shapes = [x.shape for x in jax.tree.leaves(abstract_params)]

    def like_params(node) -> bool:
        return (
            jax.tree.structure(node) == params_def
            and [x.shape for x in jax.tree.leaves(node)] == param_shapes
        )

    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(
        lambda node: shardings if like_params(node) else replicated, abstract_opt_state, is_leaf=like_params
    )


def injected_learning_rate(opt_state) -> Array | None:
    """The learning rate an ``optax.inject_hyperparams`` optimizer stores in its state, or None.

    None as well when there are several (``optax.multi_transform``, ...): none of them is "the" one.
    """
    try:
        return optax.tree_utils.tree_get(
            opt_state, "learning_rate", filtering=lambda _, value: isinstance(value, jax.Array)
        )
    except KeyError:
        return None


def guarded_update(
    state: TrainState,
    grads: nnx.State,
    loss: Array,
    optimizer: optax.GradientTransformation,
    next_key: Array,
) -> tuple[TrainState, dict[str, Array]]:
    """One optimizer update of ``state``, skipped when the loss or the gradient is not finite.

    A skipped update keeps the params and optimizer state (one bad batch must not poison Adam's
    moments) and counts the skip. Returns the next state (step + 1, ``rng`` = ``next_key``'s data)
    and the metrics ``grad_norm``, ``nonfinite_skipped``, ``nonfinite_consecutive`` and, with
    :func:`optax.inject_hyperparams`, ``learning_rate``.
    """
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)

    def keep_if_finite(new, old):
        return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

    nonfinite_count = jnp.where(finite, 0, state.nonfinite_count + 1)
    new_state = state.replace(
        step=state.step + 1,
        params=keep_if_finite(new_params, state.params),
        opt_state=keep_if_finite(new_opt_state, state.opt_state),
        rng=jax.random.key_data(next_key),
        nonfinite_count=nonfinite_count,
    )
    metrics = {
        "grad_norm": grad_norm,
        "nonfinite_skipped": 1.0 - finite.astype(jnp.float32),
        "nonfinite_consecutive": nonfinite_count.astype(jnp.float32),
    }
    learning_rate = injected_learning_rate(new_opt_state)
    if learning_rate is not None:
        metrics["learning_rate"] = learning_rate
    return new_state, metrics


def state_initializer(
    model_params: nnx.State,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    rules: Mapping = LOGICAL_AXIS_RULES,
    reference: bool = False,
) -> tuple[Callable[[Any, int], TrainState], TrainState]:
    """``(init, state_shardings)`` of a :class:`TrainState` for the trained parameters ``model_params``.

    ``init(params, seed)`` creates the state directly in its sharded layout (a ``NamedSharding`` per
    array: ``state_shardings``): parameters and the optimizer-state subtrees shaped like them by
    their logical axes under ``rules``, everything else replicated; ``ref_params`` holds a frozen
    copy of the initial parameters when ``reference`` is true. ``params`` is None (``model_params``
    themselves), a State of arrays (copied), or a zero-argument function returning one, which runs
    inside the jitted init so the weights are never materialised unsharded.
    """

    def make_state(params: nnx.State, seed: Array) -> TrainState:
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=optimizer.init(params),
            rng=jax.random.key_data(jax.random.key(seed)),
            ref_params=params if reference else None,
            nonfinite_count=jnp.zeros((), jnp.int32),
        )

    abstract_params = jax.eval_shape(lambda: model_params)
    shardings = param_shardings(abstract_params, mesh, rules)
    abstract_state = jax.eval_shape(make_state, abstract_params, 0)
    replicated = NamedSharding(mesh, PartitionSpec())
    state_shardings = TrainState(
        step=replicated,
        params=shardings,
        opt_state=opt_state_shardings(abstract_state.opt_state, abstract_params, shardings, mesh),
        rng=replicated,
        ref_params=shardings if reference else None,
        nonfinite_count=replicated,
    )
    from_arrays = jax.jit(make_state, out_shardings=state_shardings)
    from_fn = jax.jit(
        lambda params_fn, seed: make_state(params_fn(), seed), static_argnums=0, out_shardings=state_shardings
    )

    def init(params, seed: int) -> TrainState:
        if callable(params):
            return from_fn(params, seed)
        # Placed first, so arrays committed to other devices (another mesh, one device) are accepted.
        return from_arrays(jax.device_put(model_params if params is None else params, shardings), seed)

    return init, state_shardings


@dataclasses.dataclass(frozen=True)
class ModelSplit:
    """A model split for a step: what is trained, and the rest, placed on the mesh once."""

    graphdef: nnx.GraphDef
    params: nnx.State  # the trained variables (a LoRA model's adapters, a head model's heads)
    # The variables the step does not train (a LoRA model's base weights), on the mesh: passed to
    # every step, never donated, updated or checkpointed.
    frozen: nnx.State

    def module(self, params: nnx.State, frozen: nnx.State, dropout_key: Array | None = None) -> nnx.Module:
        """The model over ``params`` and the frozen variables; LoRA dropout on with a key."""
        merged = nnx.merge(self.graphdef, params, frozen)
        return merged if dropout_key is None else train_view(merged, dropout_key)


def split_model(model: nnx.Module, mesh: Mesh, rules: Mapping = LOGICAL_AXIS_RULES) -> ModelSplit:
    """The step scaffold's first part, shared by the offline, online and diffusion builders."""
    graphdef, params, frozen = nnx.split(model, trainable_filter(model), ...)
    return ModelSplit(graphdef, params, jax.device_put(frozen, param_shardings(frozen, mesh, rules)))


def jit_step(fn: Callable, state_shardings: TrainState, mesh: Mesh) -> Callable:
    """The step scaffold's last part: ``fn(state, ...) -> (state, metrics)`` jitted with the state
    donated and laid out as ``state_shardings``, metrics replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(fn, out_shardings=(state_shardings, replicated), donate_argnums=0)


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """What :func:`build_step` returns. Call it as ``state, metrics = train_step(state, batch)``."""

    mesh: Mesh
    family: Family
    reference: Reference
    objective: Objective | None
    grad_accum_steps: int
    state_shardings: TrainState  # a NamedSharding per TrainState array
    rules: Mapping
    frozen: nnx.State  # see ModelSplit.frozen
    _init: Callable[..., TrainState]
    _step: Callable[[TrainState, dict[str, Array]], tuple[TrainState, dict[str, Array]]]

    def init(self, params: nnx.State | Callable[[], nnx.State] | None = None, *, seed: int = 0) -> TrainState:
        """A fresh TrainState, created directly in its sharded layout.

        ``params`` (the trained ones: a LoRA model's adapters) defaults to the model's own; a
        zero-argument function returning them (e.g. ``lambda: nnx.state(Decoder(config,
        rngs=nnx.Rngs(0)), nnx.Param)``) runs inside the jitted init, so the weights are never
        materialised unsharded. Given arrays are copied.
        """
        return self._init(params, seed)

    def shard_batch(self, batch: Mapping[str, np.ndarray]) -> dict[str, Array]:
        """Checks a host batch against the family's contract and places it on the mesh, split by rows.

        Keys the step does not read (``example_index``, ...) are dropped before the transfer.
        """
        keys = self.family.batch_keys(self.reference)
        if f"{KL_PREFIX}input_ids" in batch:
            keys += self.family.kl_batch_keys(self.reference)
        self.family.check_batch(batch, self.reference, self.objective)
        missing = [k for k in keys if batch.get(k) is None]
        if missing:
            hint = " (attach them with ReferenceLogps.attach)" if self.reference.from_batch else ""
            raise ValueError(f"`batch` lacks key(s) {missing}{hint}; it has {sorted(batch)}.")
        optional = ("prefix_segment_ids", f"{KL_PREFIX}prefix_segment_ids", *self.family.columns)
        used = {k: batch[k] for k in (*keys, *(k for k in optional if batch.get(k) is not None))}
        groups = self.family.sequences_per_example(used)
        check_microbatches(used, self.grad_accum_steps, groups)
        return shard_batch(used, self.mesh, self.rules, groups)

    def __call__(self, state: TrainState, batch: Mapping[str, np.ndarray]) -> tuple[TrainState, dict]:
        """One update; ``state``'s buffers are donated (reuse the returned state only)."""
        return self._step(state, self.frozen, self.shard_batch(batch))

    def lower(self, state: TrainState, batch: Mapping[str, np.ndarray]) -> jax.stages.Lowered:
        """The step lowered for ``state`` (arrays, or ``jax.ShapeDtypeStruct`` with the shardings of
        ``state_shardings``: nothing allocated) and a host batch; ``.compile().memory_analysis()``
        gives its memory, ``.cost_analysis()`` its FLOPs."""
        return self._step.lower(state, self.frozen, self.shard_batch(batch))


def build_step(
    model: nnx.Module,
    objective: Objective | None,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    *,
    reference: str | Reference = "frozen",
    family: str | Family = "pairwise",
    grad_accum_steps: int = 1,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    vocab_chunk_size: int | None = None,
    max_completion_tokens: int | None = None,
    rules: Mapping = LOGICAL_AXIS_RULES,
) -> TrainStep:
    """Builds the sharded init and the jitted, state-donating train step.

    Args:
      model: the policy (e.g. a :class:`~jaxpref.models.decoder.Decoder`), or for
        ``family="reward"`` a :class:`~jaxpref.models.heads.RewardModel` (any number of heads) or
        :class:`~jaxpref.models.heads.PreferenceEmbeddingModel`; its parameters are the default
        initial weights and, with ``reference="frozen"``, the reference. Only its ``nnx.Param``
        variables are trained (with LoRA layers, only those of
        :func:`~jaxpref.models.lora.trainable_filter`: the adapters, and a head model's heads);
        everything else is held constant.
      objective: ``objective("sigmoid", beta=0.1)``, ``objective("bradley_terry")`` and the like,
        called with the family's keyword inputs (for reward models with several heads or preference
        embeddings, an objective of those inputs: ``Objective.from_fn(gpm_loss)``, ...); None for
        ``family="sft"``.
      optimizer: any optax transformation; wrap it in ``optax.inject_hyperparams`` to log the
        learning rate.
      mesh: a ``(data, fsdp, tensor)`` mesh (:func:`jaxpref.sharding.make_mesh`). Parameters and
        optimizer state are sharded by their logical axes under ``rules``; batches by rows.
      reference: a :class:`~jaxpref.train.references.Reference` or its shorthand ``"frozen"``,
        ``"adapters_off"``, ``"cached"`` or ``"none"`` (see the module docstring).
      family: a :class:`~jaxpref.train.families.Family` or its shorthand ``"pairwise"``,
        ``"unpaired"``, ``"sft"``, ``"reward"``, ``"listwise"``, ``"token_level"`` (see
        :mod:`jaxpref.train.families`).
      grad_accum_steps: microbatches per batch; it must divide the rows and the examples.
      chunk_size, vocab_chunk_size: LM-head chunking of
        :func:`~jaxpref.models.logprobs.sequence_logps`.
      max_completion_tokens: run the LM head only on this many gathered completion tokens per
        microbatch (static) instead of on every position; saves the head's work on prompts. A
        microbatch with more completion tokens gets a NaN loss, so its update is skipped and counted
        (``nonfinite_skipped``), never silently truncated.
    """
    family = as_family(family)
    reference = as_reference(reference, model)
    family.check(model, objective, reference)
    if not isinstance(grad_accum_steps, int) or grad_accum_steps < 1:
        raise ValueError(f"`grad_accum_steps` must be a positive int, got {grad_accum_steps!r}.")

    split = split_model(model, mesh, rules)
    lm_head = dict(
        chunk_size=chunk_size, vocab_chunk_size=vocab_chunk_size, max_completion_tokens=max_completion_tokens
    )
    parts = StepParts(objective=objective, reference=reference, module=split.module, lm_head=lm_head)
    grad_fn = jax.value_and_grad(functools.partial(family.loss, parts), has_aux=True)

    def train_step(
        state: TrainState, frozen: nnx.State, batch: dict[str, Array]
    ) -> tuple[TrainState, dict[str, Array]]:
        kl_batch = sub_batch(batch, KL_PREFIX)
        kl = None
        if kl_batch:
            kl_microbatches = split_microbatches(kl_batch, grad_accum_steps, groups=1)
            kl_microbatches = constrain_microbatches(kl_microbatches, mesh, rules)
            kl = family.kl_logps(parts, state.params, state.ref_params, frozen, kl_microbatches)
        main = sub_batch(batch, "")
        microbatches = split_microbatches(main, grad_accum_steps, family.sequences_per_example(main))
        microbatches = constrain_microbatches(microbatches, mesh, rules)
        next_key, dropout_key = jax.random.split(jax.random.wrap_key_data(state.rng))
        dropout_keys = jax.random.split(dropout_key, grad_accum_steps)  # one per microbatch

        def accumulate(grad_sum, microbatch_and_key):
            microbatch, key = microbatch_and_key
            (loss_sum, aux), grads = grad_fn(state.params, state.ref_params, frozen, microbatch, kl, key)
            grad_sum = jax.tree.map(lambda total, g: total + g.astype(jnp.float32), grad_sum, grads)
            return grad_sum, (loss_sum, *aux)

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        grad_sum, (loss_sums, counts, fractions) = jax.lax.scan(
            accumulate, zeros, (microbatches, dropout_keys)
        )
        count = counts.sum()
        grads = jax.tree.map(lambda g: g / count, grad_sum)
        loss = loss_sums.sum() / count
        new_state, update_metrics = guarded_update(state, grads, loss, optimizer, next_key)
        objective_metrics = {
            k: numerators.sum() / jnp.maximum(denominators.sum(), 1.0)
            for k, (numerators, denominators) in fractions.items()
        }
        metrics = {
            "loss": loss,
            **family.finish_metrics(objective_metrics),
            "num_tokens": count_tokens(batch).astype(jnp.float32),
            **update_metrics,
        }
        return new_state, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}

    init, state_shardings = state_initializer(split.params, optimizer, mesh, rules, reference.keeps_copy)
    return TrainStep(
        mesh=mesh,
        family=family,
        reference=reference,
        objective=objective,
        grad_accum_steps=grad_accum_steps,
        state_shardings=state_shardings,
        rules=rules,
        frozen=split.frozen,
        _init=init,
        _step=jit_step(train_step, state_shardings, mesh),
    )
