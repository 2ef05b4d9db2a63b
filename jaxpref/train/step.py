"""One jitted training step for every family: log-probs or rewards -> objective -> gradients -> optax.

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
2. Reference log-probs come from a frozen copy of the initial policy (``reference="frozen"``, run
   under ``stop_gradient``), from the batch (``"cached"``, see :mod:`jaxpref.train.reference`), or
   are absent (``"none"``: reference-free objectives, SFT and reward models). A LoRA model
   (:mod:`jaxpref.models.lora`) trains only its adapters (and a head model's heads): its base
   weights are passed to the step frozen (:attr:`TrainStep.frozen`, never in the optimizer state
   or the checkpoint), and its ``"frozen"`` reference is that base with the adapters off, in the
   same step: no copy of the weights. The ``"reward"`` family trains a
   :class:`~jaxpref.models.heads.RewardModel` or a
   :class:`~jaxpref.models.heads.PreferenceEmbeddingModel` instead of a policy: its objective reads
   each pair's two rewards as ``chosen_rewards`` / ``rejected_rewards`` (``[B]``, or ``[B, heads]``
   from a model with several heads, e.g. an ensemble: :func:`~jaxpref.train.batches.packed_rewards`),
   or its General Preference Model embeddings as ``chosen_embeddings`` / ``rejected_embeddings``
   (``[B, 2k]``) with the prompt's block scales ``eigenvalue_scales`` (``[B, k]``:
   :func:`~jaxpref.train.batches.packed_preference_embeddings`), instead of log-probs.
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
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxpref.models.decoder import param_logical_axes
from jaxpref.models.heads import PreferenceEmbeddingModel, RewardModel
from jaxpref.models.logprobs import DEFAULT_CHUNK_SIZE, sequence_logps
from jaxpref.models.lora import base_view, has_lora, train_view, trainable_filter
from jaxpref.objectives import REWARD, Objective
from jaxpref.sharding import LOGICAL_AXIS_RULES, logical_sharding
from jaxpref.train.batches import (
    KL_PREFIX,
    LAYOUT_FIELDS,
    OPTIONAL_KEYS,
    REFERENCE_KEYS,
    ROW_FIELDS,
    SEQUENCE_FIELDS,
    check_family,
    check_microbatches,
    constrain_microbatches,
    count_tokens,
    packed_batch,
    packed_logps,
    packed_preference_embeddings,
    packed_rewards,
    sequence_groups,
    shard_batch,
    split_microbatches,
    sub_batch,
)

Array = jax.Array
REFERENCES = ("frozen", "cached", "none")


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
class TrainStep:
    """What :func:`build_step` returns. Call it as ``state, metrics = train_step(state, batch)``."""

    mesh: Mesh
    family: str
    reference: str
    grad_accum_steps: int
    state_shardings: TrainState  # a NamedSharding per TrainState array
    batch_keys: tuple[str, ...]  # keys every batch needs (besides the optional prefix_segment_ids)
    kl_batch_keys: tuple[str, ...]  # keys needed when the batch has a KL batch (unpaired)
    rules: Mapping
    term_names: frozenset[str]  # names of the objective's terms (checks on what a batch may carry)
    # The model's variables the step does not train (a LoRA model's base weights), on the mesh:
    # passed to every step, never donated, updated or checkpointed.
    frozen: nnx.State
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
        """Checks a host batch against the contract and places it on the mesh, split by rows.

        Keys the step does not read (``example_index``, ...) are dropped before the transfer.
        """
        keys = self.batch_keys
        if f"{KL_PREFIX}input_ids" in batch:
            keys += self.kl_batch_keys
        if self.reference == "cached" and f"{KL_PREFIX}input_ids" in batch and "kto" in self.term_names:
            # A KL pair is the prompt of one example with the completion of its batch neighbour, so
            # it changes with every shuffle; log-probs cached in another order would not match it.
            raise ValueError(
                "`reference`='cached' cannot serve KTO's KL batch (its mismatched pairs change with the "
                "data order); use reference='frozen' for KTO."
            )
        missing = [k for k in keys if batch.get(k) is None]
        if missing:
            hint = " (attach them with ReferenceLogps.attach)" if self.reference == "cached" else ""
            raise ValueError(f"`batch` lacks key(s) {missing}{hint}; it has {sorted(batch)}.")
        optional = (
            "prefix_segment_ids",
            f"{KL_PREFIX}prefix_segment_ids",
            *OPTIONAL_KEYS.get(self.family, ()),
        )
        optional = [k for k in optional if batch.get(k) is not None]
        used = {k: batch[k] for k in (*keys, *optional)}
        check_microbatches(used, self.grad_accum_steps, self.family)
        return shard_batch(used, self.mesh, self.rules, self.family)

    def __call__(self, state: TrainState, batch: Mapping[str, np.ndarray]) -> tuple[TrainState, dict]:
        """One update; ``state``'s buffers are donated (reuse the returned state only)."""
        return self._step(state, self.frozen, self.shard_batch(batch))

    def lower(self, state: TrainState, batch: Mapping[str, np.ndarray]) -> jax.stages.Lowered:
        """The step lowered for ``state`` (arrays, or ``jax.ShapeDtypeStruct`` with the shardings of
        ``state_shardings``: nothing allocated) and a host batch; ``.compile().memory_analysis()``
        gives its memory, ``.cost_analysis()`` its FLOPs."""
        return self._step.lower(state, self.frozen, self.shard_batch(batch))


def _batch_keys(family: str, reference: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(keys every batch needs, keys a KL batch needs) for a family and reference source."""
    rows = tuple(f for f in ROW_FIELDS if f != "prefix_segment_ids")
    if family == "sft":  # token sums need no sequence boundaries
        return rows, ()
    packed = rows + SEQUENCE_FIELDS
    cached = reference == "cached"
    keys = packed + (REFERENCE_KEYS[family] if cached else ())
    if family in ("pairwise", "reward"):
        return keys, ()
    kl_keys = tuple(KL_PREFIX + f for f in packed) + ((f"{KL_PREFIX}ref_logps",) if cached else ())
    return keys + ("labels",), kl_keys


def build_step(
    model: nnx.Module,
    objective: Objective | None,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    *,
    reference: str = "frozen",
    family: str = "pairwise",
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
      reference: ``"frozen"``, ``"cached"`` or ``"none"`` (see the module docstring).
      family: ``"pairwise"``, ``"unpaired"``, ``"sft"`` or ``"reward"`` (see
        :mod:`jaxpref.train.batches`).
      grad_accum_steps: microbatches per batch; it must divide the rows and the examples.
      chunk_size, vocab_chunk_size: LM-head chunking of
        :func:`~jaxpref.models.logprobs.sequence_logps`.
      max_completion_tokens: run the LM head only on this many gathered completion tokens per
        microbatch (static) instead of on every position; saves the head's work on prompts. A
        microbatch with more completion tokens gets a NaN loss, so its update is skipped and counted
        (``nonfinite_skipped``), never silently truncated.
    """
    check_family(family)
    if reference not in REFERENCES:
        raise ValueError(f"`reference`={reference!r} must be one of {REFERENCES}.")
    if family == "sft" and (objective is not None or reference != "none"):
        raise ValueError(
            "`family`='sft' trains on the token-mean NLL without a reference: pass `objective`=None "
            "and `reference`='none'."
        )
    if family != "sft" and not isinstance(objective, Objective):
        raise ValueError(
            f"`objective` must be an Objective (e.g. objective('sigmoid', beta=0.1)), got {objective!r}."
        )
    if family == "reward":
        _check_reward_model(model, objective, reference)
    term_names = {term.name for term in objective.terms} if objective is not None else set()
    if "bco" in term_names:
        raise ValueError(
            "`objective` 'bco' keeps a running mean of rewards across steps, which the train step does not "
            "carry yet; use 'kto' or 'apo_zero_unpaired', or call unpaired_loss('bco', ...) in your own loop."
        )
    if not isinstance(grad_accum_steps, int) or grad_accum_steps < 1:
        raise ValueError(f"`grad_accum_steps` must be a positive int, got {grad_accum_steps!r}.")

    # A LoRA model trains its adapters only: the base weights are "frozen", sharded like parameters
    # and passed to every step, and the reference is the base itself (adapters off), never a copy.
    lora = has_lora(model)
    graphdef, model_params, frozen = nnx.split(model, trainable_filter(model), ...)
    frozen = jax.device_put(frozen, param_shardings(frozen, mesh, rules))
    lm_head = dict(
        chunk_size=chunk_size, vocab_chunk_size=vocab_chunk_size, max_completion_tokens=max_completion_tokens
    )
    groups = sequence_groups(family)
    replicated = NamedSharding(mesh, PartitionSpec())

    def module(params: nnx.State, frozen: nnx.State, dropout_key: Array | None = None) -> nnx.Module:
        """The model over ``params`` and the frozen variables; LoRA dropout on with a key."""
        merged = nnx.merge(graphdef, params, frozen)
        return merged if dropout_key is None else train_view(merged, dropout_key)

    def logps(model: nnx.Module, microbatch: Mapping[str, Array]) -> tuple[Array, Array]:
        """Log-prob sums and completion lengths of the microbatch's sequences, ``[sequences]`` each."""
        return packed_logps(model, packed_batch(microbatch), **lm_head)

    def reference_logps(
        params, ref_params, frozen, microbatch: Mapping[str, Array], cached_keys
    ) -> Array | None:
        """Reference log-prob sums of the microbatch's sequences, ``[sequences]``, or None."""
        if reference == "frozen":
            if lora:  # the base: adapters off, so `params` (the adapters) are not read
                return logps(base_view(module(params, frozen)), microbatch)[0]
            return logps(module(jax.lax.stop_gradient(ref_params), frozen), microbatch)[0]
        if reference == "cached":
            return jnp.concatenate([microbatch[k] for k in cached_keys])
        return None

    def objective_inputs(policy: Array, lengths: Array, ref: Array | None, microbatch, kl) -> dict:
        if family == "pairwise":
            chosen, rejected = jnp.split(policy, 2)
            inputs = dict(policy_chosen_logps=chosen, policy_rejected_logps=rejected)
            # Lengths are optional inputs: passed only to objectives that read them.
            optional = dict(zip(("chosen_lengths", "rejected_lengths"), jnp.split(lengths, 2)))
            if ref is not None:
                inputs.update(zip(REFERENCE_KEYS["pairwise"], jnp.split(ref, 2)))
        else:
            inputs = dict(policy_logps=policy, labels=microbatch["labels"])
            optional = {}
            if ref is not None:
                inputs["ref_logps"] = ref
            if kl is not None:
                # The loader builds a KL batch for all unpaired data; only KTO-like terms read it.
                optional["policy_kl_logps"], optional["ref_kl_logps"] = kl
        read = {k: v for k, v in optional.items() if any(t.accepts_input(k) for t in objective.terms)}
        return {**inputs, **read}

    def microbatch_loss(params, ref_params, frozen, microbatch, kl, dropout_key):
        """(sum of losses, (count, metric fractions)) of one microbatch; see _metric_fractions."""
        policy_model = module(params, frozen, dropout_key)
        if family == "sft":
            layout = {k: microbatch.get(k) for k in LAYOUT_FIELDS}
            token_logps, _ = sequence_logps(
                policy_model, microbatch["input_ids"], microbatch["completion_mask"], **layout, **lm_head
            )
            counted = (microbatch["completion_mask"] != 0) & (microbatch["predictor_index"] >= 0)
            return -token_logps.sum(), (counted.sum().astype(jnp.float32), {})
        if family == "reward":
            inputs = _reward_inputs(policy_model, microbatch)
        else:
            ref = reference_logps(params, ref_params, frozen, microbatch, REFERENCE_KEYS[family])
            policy, lengths = logps(policy_model, microbatch)
            inputs = objective_inputs(policy, lengths, ref, microbatch, kl)
        losses, metrics = objective(**inputs)
        labels = microbatch["labels"] if family == "unpaired" else None
        count = jnp.asarray(losses.shape[0], jnp.float32)
        return jnp.sum(losses), (count, _metric_fractions(metrics, losses.shape[0], labels))

    def kl_logps(params, ref_params, frozen, kl_batch) -> tuple[Array, Array]:
        """Policy and reference log-probs of the KL batch, ``[kl sequences]`` each, without gradient.

        Run over the whole batch before the gradient pass, so KTO's KL reference point is the
        full batch's even with gradient accumulation.
        """
        microbatches = split_microbatches(kl_batch, grad_accum_steps, groups=1)
        params = jax.lax.stop_gradient(params)

        def one(microbatch):
            policy = logps(module(params, frozen), microbatch)[0]
            return policy, reference_logps(params, ref_params, frozen, microbatch, ("ref_logps",))

        policy, ref = jax.lax.map(one, constrain_microbatches(microbatches, mesh, rules))
        return policy.reshape(-1), None if ref is None else ref.reshape(-1)

    def train_step(
        state: TrainState, frozen: nnx.State, batch: dict[str, Array]
    ) -> tuple[TrainState, dict[str, Array]]:
        kl_batch = sub_batch(batch, KL_PREFIX)
        kl = kl_logps(state.params, state.ref_params, frozen, kl_batch) if kl_batch else None
        microbatches = split_microbatches(sub_batch(batch, ""), grad_accum_steps, groups)
        microbatches = constrain_microbatches(microbatches, mesh, rules)
        next_key, dropout_key = jax.random.split(jax.random.wrap_key_data(state.rng))
        dropout_keys = jax.random.split(dropout_key, grad_accum_steps)  # one per microbatch
        grad_fn = jax.value_and_grad(microbatch_loss, has_aux=True)

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
        metrics = {
            "loss": loss,
            **{
                k: numerators.sum() / jnp.maximum(denominators.sum(), 1.0)
                for k, (numerators, denominators) in fractions.items()
            },
            "num_tokens": count_tokens(batch).astype(jnp.float32),
            **update_metrics,
        }
        if family == "unpaired":  # the class means are exact; their difference is recomputed from them
            metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
        return new_state, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}

    reference_copy = reference == "frozen" and not lora
    init, state_shardings = state_initializer(model_params, optimizer, mesh, rules, reference_copy)
    batch_keys, kl_batch_keys = _batch_keys(family, reference)
    return TrainStep(
        mesh=mesh,
        family=family,
        reference=reference,
        grad_accum_steps=grad_accum_steps,
        state_shardings=state_shardings,
        batch_keys=batch_keys,
        kl_batch_keys=kl_batch_keys,
        rules=rules,
        term_names=frozenset(term_names),
        frozen=frozen,
        _init=init,
        _step=jax.jit(train_step, out_shardings=(state_shardings, replicated), donate_argnums=0),
    )


def _check_reward_model(model: nnx.Module, objective: Objective, reference: str) -> None:
    if reference != "none":
        raise ValueError(
            f"`family`='reward' trains a reward model, which has no reference: pass `reference`='none', "
            f"not {reference!r}."
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


def _reward_inputs(
    model: RewardModel | PreferenceEmbeddingModel, microbatch: Mapping[str, Array]
) -> dict[str, Array]:
    """Reward-objective inputs: sequences ``0..b-1`` are the chosen, ``b..2b-1`` the rejected."""
    packed = packed_batch(microbatch)
    optional = {k: microbatch[k] for k in OPTIONAL_KEYS["reward"] if k in microbatch}
    if isinstance(model, PreferenceEmbeddingModel):
        embeddings, scales = packed_preference_embeddings(model, packed)  # [2b, 2k], [2b, k]
        chosen, rejected = jnp.split(embeddings, 2)
        # Both responses of a pair read their scales at the same prompt token: take the chosen's.
        scales = jnp.split(scales, 2)[0]
        return dict(
            chosen_embeddings=chosen, rejected_embeddings=rejected, eigenvalue_scales=scales, **optional
        )
    chosen, rejected = jnp.split(packed_rewards(model, packed), 2)  # [b] or [b, heads] each
    return dict(chosen_rewards=chosen, rejected_rewards=rejected, **optional)


def _metric_fractions(
    metrics: Mapping[str, Any], examples: int, labels: Array | None
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
