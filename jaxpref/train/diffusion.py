r"""One jitted training step for image denoisers: pretraining, preference fine-tuning, reward gradients.

:func:`build_diffusion_step` joins a :class:`~jaxpref.models.diffusion.Denoiser`, a method, an optax
optimizer and a mesh, and returns a :class:`DiffusionStep`: ``init`` creates the
:class:`~jaxpref.train.step.TrainState` in its sharded layout (``ref_params`` holds the frozen initial
model when the method has a reference), and ``state, metrics = diffusion_step(state, batch)`` runs one
update. The state is the language models' :class:`~jaxpref.train.step.TrainState`, so
:func:`jaxpref.train.loop.train` runs the loop, :mod:`~jaxpref.train.checkpoint` saves and resumes
it, and :class:`~jaxpref.train.metrics.MetricsWriter` logs it. The noise and noise levels of each
step come from the state's ``rng`` (split every step), so a resumed run draws what the uninterrupted
one would have.

Methods (their batches are dicts of host arrays, rows split over the mesh's batch axes):

==========================  =====================================================  ==================
method                      loss                                                   batch keys
==========================  =====================================================  ==================
:class:`Denoising`          plain denoising / flow-matching regression              images, prompt_ids
:class:`DiffusionDPO`       :func:`~jaxpref.objectives.diffusion.diffusion_dpo_loss`  chosen_images,
                            (a DDPM: epsilon or v prediction)                      rejected_images,
                                                                                   prompt_ids
:class:`FlowDPO`            :func:`~jaxpref.objectives.diffusion.flow_dpo_loss`   as DiffusionDPO
                            (velocity prediction)
:class:`DiffusionKTO`       :func:`~jaxpref.objectives.diffusion.diffusion_kto_loss`  images, prompt_ids,
                                                                                   labels
:class:`RewardBackprop`     minus a differentiable reward of sampled images,       prompt_ids
                            backpropagated through the last sampling steps
==========================  =====================================================  ==================

Images are ``[B, H, W, C]`` in [-1, 1], ``prompt_ids`` ``[B, L]`` int32 (0 = padding), ``labels``
``[B]`` (True or 1 = desirable). The preference methods noise the chosen and rejected images of a pair
with the same noise at the same level, as the Diffusion-DPO code does, and compare the policy's
denoising errors with the frozen reference's (run under ``stop_gradient``) at the same noised input.

Metrics: ``loss``, the method's metrics averaged over the batch (``rewards/chosen``,
``rewards/margins``, ``kl``, ``reward``, ...), ``grad_norm``, ``learning_rate`` (with
:func:`optax.inject_hyperparams`), ``num_images`` and, as in :func:`~jaxpref.train.step.build_step`,
``nonfinite_skipped`` / ``nonfinite_consecutive``: a non-finite loss or gradient skips the update.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxpref.models.diffusion import (
    DDPM_PREDICTIONS,
    Denoiser,
    DenoiserConfig,
    SamplerConfig,
    noised_inputs,
    sample,
    sample_jit,
)
from jaxpref.objectives.common import check_range
from jaxpref.objectives.diffusion import (
    denoising_errors,
    diffusion_dpo_loss,
    diffusion_kto_loss,
    flow_dpo_loss,
)
from jaxpref.sharding import LOGICAL_AXIS_RULES
from jaxpref.train.batches import batch_sharding
from jaxpref.train.references import as_reference
from jaxpref.train.step import TrainState, guarded_update, jit_step, state_initializer

Array = jax.Array
# A differentiable reward of model-space images [B, H, W, C] and their prompts [B, L]: [B] rewards.
RewardFn = Callable[[Array, Array], Array]


class DiffusionMethod(Protocol):
    """What :func:`build_diffusion_step` asks of a method (see :class:`DiffusionDPO`); ``check`` runs
    when the step is built, so a bad setting fails before anything compiles."""

    batch_keys: tuple[str, ...]  # host arrays every batch must hold
    uses_reference: bool  # keep a frozen copy of the initial model as the reference

    def check(self, config: DenoiserConfig) -> None:
        """Raises ValueError for a hyperparameter out of range or a model parameterisation that does
        not suit the method."""

    def loss(
        self, model: Denoiser, reference: Denoiser | None, batch: Mapping[str, Array], key: Array
    ) -> tuple[Array, dict[str, Array]]:
        """``([B] per-example losses, metrics)``; ``reference`` carries no gradient."""


def _require_prediction(method: object, config: DenoiserConfig, predictions: tuple[str, ...]) -> None:
    if config.prediction not in predictions:
        raise ValueError(
            f"{type(method).__name__} trains {predictions} models, but the model's `prediction` is "
            f"{config.prediction!r}; build it with DenoiserConfig(prediction={predictions[0]!r})."
        )


def _noise_draws(key: Array, images: Array) -> tuple[Array, Array]:  # [B, H, W, C], [B]
    noise_key, level_key = jax.random.split(key)
    return jax.random.normal(noise_key, images.shape, images.dtype), jax.random.uniform(
        level_key, images.shape[:1]
    )


def _errors(model: Denoiser, images: Array, prompt_ids: Array, noise: Array, uniforms: Array) -> Array:  # [B]
    """Mean squared error of the model's prediction at the images noised by ``noise`` at ``uniforms``."""
    noised, times, targets = noised_inputs(model.config, images, noise, uniforms)
    return denoising_errors(model(noised, times, prompt_ids), targets)


def _pair_errors(model: Denoiser, reference: Denoiser, batch: Mapping[str, Array], key: Array):
    """Policy and reference errors of chosen and rejected images (``[B]`` each) and the flow times
    (``[B]``): a pair's two images share their noise and noise level, and one network call serves both."""
    images = jnp.concatenate([batch["chosen_images"], batch["rejected_images"]])  # [2B, H, W, C]
    prompt_ids = jnp.concatenate([batch["prompt_ids"], batch["prompt_ids"]])
    noise, uniforms = _noise_draws(key, batch["chosen_images"])
    noise, uniforms = jnp.concatenate([noise, noise]), jnp.concatenate([uniforms, uniforms])
    policy = jnp.split(_errors(model, images, prompt_ids, noise, uniforms), 2)
    ref = jnp.split(jax.lax.stop_gradient(_errors(reference, images, prompt_ids, noise, uniforms)), 2)
    errors = dict(
        policy_chosen_errors=policy[0],
        policy_rejected_errors=policy[1],
        ref_chosen_errors=ref[0],
        ref_rejected_errors=ref[1],
    )
    return errors, jnp.split(uniforms, 2)[0]


@dataclasses.dataclass(frozen=True)
class Denoising:
    """Pretraining: the plain denoising (noise or v) or flow-matching (velocity) regression loss."""

    batch_keys: tuple[str, ...] = ("images", "prompt_ids")
    uses_reference: bool = False

    def check(self, config: DenoiserConfig) -> None:
        pass

    def loss(self, model, reference, batch, key):
        errors = _errors(model, batch["images"], batch["prompt_ids"], *_noise_draws(key, batch["images"]))
        return errors, {}


@dataclasses.dataclass(frozen=True)
class DiffusionDPO:
    """Diffusion-DPO on a DDPM (:func:`~jaxpref.objectives.diffusion.diffusion_dpo_loss`): errors of the
    noise or, for a v-prediction model, of v (as the official code does for Stable Diffusion 2).

    Reference: Wallace et al., "Diffusion Model Alignment Using Direct Preference Optimization",
    arXiv:2311.12908.
    """

    beta: float = 5000.0
    batch_keys: tuple[str, ...] = ("chosen_images", "rejected_images", "prompt_ids")
    uses_reference: bool = True

    def check(self, config: DenoiserConfig) -> None:
        _require_prediction(self, config, DDPM_PREDICTIONS)
        check_range("beta", self.beta, 0.0, np.inf, low_inclusive=False)

    def loss(self, model, reference, batch, key):
        errors, _ = _pair_errors(model, reference, batch, key)
        return diffusion_dpo_loss(**errors, beta=self.beta)


@dataclasses.dataclass(frozen=True)
class FlowDPO:
    """Flow-DPO on a velocity-prediction model (:func:`~jaxpref.objectives.diffusion.flow_dpo_loss`).

    Reference: Liu et al., "Improving Video Generation with Human Feedback", arXiv:2501.13918.
    """

    beta: float = 5000.0
    time_scaled_beta: bool = False
    batch_keys: tuple[str, ...] = ("chosen_images", "rejected_images", "prompt_ids")
    uses_reference: bool = True

    def check(self, config: DenoiserConfig) -> None:
        _require_prediction(self, config, ("velocity",))
        check_range("beta", self.beta, 0.0, np.inf, low_inclusive=False)

    def loss(self, model, reference, batch, key):
        errors, times = _pair_errors(model, reference, batch, key)
        return flow_dpo_loss(
            **errors, timesteps=times, beta=self.beta, time_scaled_beta=self.time_scaled_beta
        )


@dataclasses.dataclass(frozen=True)
class DiffusionKTO:
    """Diffusion-KTO on single images labelled desirable or not
    (:func:`~jaxpref.objectives.diffusion.diffusion_kto_loss`, reference point from the batch).

    Reference: Li et al., "Aligning Diffusion Models by Optimizing Human Utility", arXiv:2404.04465.
    """

    beta: float = 1000.0
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    batch_keys: tuple[str, ...] = ("images", "prompt_ids", "labels")
    uses_reference: bool = True

    def check(self, config: DenoiserConfig) -> None:
        check_range("beta", self.beta, 0.0, np.inf, low_inclusive=False)
        check_range("desirable_weight", self.desirable_weight, 0.0, np.inf)
        check_range("undesirable_weight", self.undesirable_weight, 0.0, np.inf)

    def loss(self, model, reference, batch, key):
        images, prompt_ids = batch["images"], batch["prompt_ids"]
        noise, uniforms = _noise_draws(key, images)
        return diffusion_kto_loss(
            policy_errors=_errors(model, images, prompt_ids, noise, uniforms),
            ref_errors=jax.lax.stop_gradient(_errors(reference, images, prompt_ids, noise, uniforms)),
            labels=batch["labels"],
            beta=self.beta,
            desirable_weight=self.desirable_weight,
            undesirable_weight=self.undesirable_weight,
        )


@dataclasses.dataclass(frozen=True)
class RewardBackprop:
    r"""Reward backpropagation through sampling (DRaFT-K / AlignProp): maximise :math:`r(x_0, c)`.

    Each step samples one image per prompt with ``sampler`` (a deterministic one: DDIM with
    :math:`\eta = 0` or Euler) and backpropagates ``reward_fn`` through the last ``grad_steps``
    network calls; the earlier steps are treated as constants (DRaFT-K's truncation, which the
    paper finds no worse than full backpropagation and much cheaper). The loss is
    :math:`-r(x_0, c)`; no reference holds the model back, so stop early (or watch diversity).
    Metrics: ``reward`` (the batch mean of ``reward_fn``).

    References: Clark et al., "Directly Fine-Tuning Diffusion Models on Differentiable Rewards",
    arXiv:2309.17400 (DRaFT); Prabhudesai et al., "Aligning Text-to-Image Diffusion Models with
    Reward Backpropagation", arXiv:2310.03739 (AlignProp).
    """

    reward_fn: RewardFn
    sampler: SamplerConfig = SamplerConfig()
    grad_steps: int = 1
    batch_keys: tuple[str, ...] = ("prompt_ids",)
    uses_reference: bool = False

    def check(self, config: DenoiserConfig) -> None:
        if not callable(self.reward_fn):
            raise ValueError(
                f"`reward_fn` must be a callable (images, prompt_ids) -> [B], got {self.reward_fn!r}."
            )
        if not isinstance(self.grad_steps, int) or not 1 <= self.grad_steps <= self.sampler.num_steps:
            raise ValueError(
                f"`grad_steps`={self.grad_steps!r} must be an int in [1, sampler.num_steps="
                f"{self.sampler.num_steps}]."
            )
        if self.sampler.method == "ddpm" or self.sampler.eta > 0:
            raise ValueError(
                "`sampler` must be deterministic for reward backpropagation: SamplerConfig(method='ddim', "
                "eta=0.0) or method='euler'."
            )

    def loss(self, model, reference, batch, key):
        images = sample(model, batch["prompt_ids"], key, self.sampler, grad_steps=self.grad_steps)
        rewards = self.reward_fn(images, batch["prompt_ids"])  # [B]
        return -rewards, {"reward": jax.lax.stop_gradient(rewards)}


@dataclasses.dataclass(frozen=True)
class DiffusionStep:
    """What :func:`build_diffusion_step` returns. Call it as ``state, metrics = step(state, batch)``."""

    mesh: Mesh
    method: DiffusionMethod
    graphdef: nnx.GraphDef
    state_shardings: TrainState
    rules: Mapping
    _other_state: nnx.State  # the model's non-parameter variables (constant)
    _init: Callable[..., TrainState]
    _step: Callable[[TrainState, dict[str, Array]], tuple[TrainState, dict[str, Array]]]

    def init(self, params: nnx.State | Callable[[], nnx.State] | None = None, *, seed: int = 0) -> TrainState:
        """A fresh TrainState in its sharded layout (see :meth:`jaxpref.train.step.TrainStep.init`)."""
        return self._init(params, seed)

    def shard_batch(self, batch: Mapping[str, np.ndarray]) -> dict[str, Array]:
        """Checks that ``batch`` holds the method's keys with one row count, and places them on the mesh."""
        missing = [key for key in self.method.batch_keys if batch.get(key) is None]
        if missing:
            raise ValueError(
                f"`batch` lacks key(s) {missing} that {type(self.method).__name__} reads; it has {sorted(batch)}."
            )
        arrays = {key: np.asarray(batch[key]) for key in self.method.batch_keys}
        rows = {key: value.shape[0] for key, value in arrays.items()}
        if len(set(rows.values())) != 1:
            raise ValueError(f"`batch` arrays must share their first dimension (rows); got {rows}.")
        return {
            key: jax.device_put(value, batch_sharding(self.mesh, value.shape, self.rules))
            for key, value in arrays.items()
        }

    def sample(self, params: nnx.State, prompt_ids: np.ndarray, key: Array, sampler: SamplerConfig) -> Array:
        """Images ``[B, H, W, C]`` sampled with ``params`` (a state's, the reference's, ...), compiled once
        per sampler and prompt shape."""
        state = nnx.merge_state(params, self._other_state)
        return sample_jit(self.graphdef, state, jnp.asarray(prompt_ids, jnp.int32), key, sampler)

    def __call__(self, state: TrainState, batch: Mapping[str, np.ndarray]) -> tuple[TrainState, dict]:
        """One update; ``state``'s buffers are donated (reuse the returned state only)."""
        return self._step(state, self.shard_batch(batch))


def build_diffusion_step(
    model: Denoiser,
    method: DiffusionMethod,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    *,
    rules: Mapping = LOGICAL_AXIS_RULES,
) -> DiffusionStep:
    """Builds the sharded init and the jitted, state-donating update.

    Args:
      model: the :class:`~jaxpref.models.diffusion.Denoiser`; its parameters are the default
        initial weights and, for methods with a reference, the reference.
      method: :class:`Denoising`, :class:`DiffusionDPO`, :class:`FlowDPO`, :class:`DiffusionKTO`,
        :class:`RewardBackprop` (or any :class:`DiffusionMethod`).
      optimizer: any optax transformation (``optax.inject_hyperparams`` to log the learning rate).
      mesh: a ``(data, fsdp, tensor)`` mesh; parameters are sharded by their logical axes under
        ``rules``, batch rows over the batch axes.
    """
    if not isinstance(model, Denoiser):
        raise ValueError(f"`model` must be a jaxpref.models.diffusion.Denoiser, got {type(model).__name__}.")
    method.check(model.config)
    graphdef, model_params, other_state = nnx.split(model, nnx.Param, ...)
    reference = as_reference("frozen" if method.uses_reference else "none", model)

    def module(params: nnx.State, other_state: nnx.State) -> Denoiser:
        return nnx.merge(graphdef, params, other_state)

    def train_step(state: TrainState, batch: dict[str, Array]) -> tuple[TrainState, dict[str, Array]]:
        next_key, step_key = jax.random.split(jax.random.wrap_key_data(state.rng))
        reference_model = reference.model(module, state.params, state.ref_params, other_state)

        def loss_fn(params):
            losses, metrics = method.loss(module(params, other_state), reference_model, batch, step_key)
            return jnp.mean(losses), metrics

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        new_state, update_metrics = guarded_update(state, grads, loss, optimizer, next_key)
        metrics = {
            "loss": loss,
            **{key: jnp.mean(value) for key, value in metrics.items()},
            "num_images": jnp.asarray(next(iter(batch.values())).shape[0]),
            **update_metrics,
        }
        return new_state, {key: jnp.asarray(value, jnp.float32) for key, value in metrics.items()}

    init, state_shardings = state_initializer(model_params, optimizer, mesh, rules, reference.keeps_copy)
    return DiffusionStep(
        mesh=mesh,
        method=method,
        graphdef=graphdef,
        state_shardings=state_shardings,
        rules=rules,
        _other_state=other_state,
        _init=init,
        _step=jit_step(train_step, state_shardings, mesh),
    )
