r"""Online training from rewards: sample, score, update (GRPO family, online DPO, PPO).

:func:`build_online_step` joins a policy, an algorithm (:class:`GRPO`, :class:`OnlineDPO`,
:class:`PPO`), reward functions (:mod:`jaxpref.train.rewards`), an optax optimizer and a mesh, and
returns an :class:`OnlineStep`. Calling it, ``state, metrics = online_step(state, prompt_batch)``,
runs one iteration on a batch of prompts (:class:`~jaxpref.data.prompts.PromptBatches`):

1. **Sample** (:meth:`OnlineStep.sample`): each prompt is repeated ``num_generations`` (:math:`G`)
   times, its completions contiguous, and the compiled KV-cache sampler
   (:data:`~jaxpref.models.sampling.generate_jit`) draws one completion per row from the state's
   own parameters: the arrays the update trains, on the same mesh, never copied. Its program is
   compiled once per (rows, prompt length) bucket and :class:`SamplingConfig`; new weights reuse it.
2. **Score** (:meth:`OnlineStep.score`, on the host): every reward function scores every
   completion; the reward is their weighted sum.
3. **Update** (:meth:`OnlineStep.update`, one jitted call that donates the state): the algorithm
   prepares its targets from the rewards and from log-probs computed once before any update (those
   of the sampling policy when it needs them, the frozen reference's when it has one), then takes
   ``num_iterations`` optimizer updates on the whole generation batch. Later iterations are
   off-policy; the algorithms' importance ratios are taken against the sampling policy.

Log-probs are those of the temperature-scaled distribution the completions were drawn from
(logits / ``sampling.temperature``, as TRL computes them); ``top_k`` / ``top_p`` are not applied
to them. The state is a :class:`~jaxpref.train.step.TrainState` (``ref_params`` holds the frozen
initial policy when the algorithm uses a reference; ``rng`` seeds the sampler), so
:func:`jaxpref.train.loop.train` runs the loop, checkpoints it and resumes it exactly, with a
``PromptBatches`` iterator as its data. Single-host for now: rewards are scored on one host.

A LoRA policy (:mod:`jaxpref.models.lora`, without adapter dropout) trains only its adapters (and
PPO's value head); its base weights are held frozen by the step (``OnlineStep.frozen``), the sampler
reads the adapted policy, and the reference is the base with the adapters off: no weight copy.

Algorithms
----------
:class:`GRPO` (TRL's ``GRPOTrainer`` ``loss_type``; each is a policy loss of
:data:`~jaxpref.objectives.policy_gradient.POLICY` and an
:func:`~jaxpref.objectives.policy_gradient.aggregate_loss` mode, ``LOSS_TYPES``):

========================  ==============  ========================================================
loss_type                 policy loss     aggregation
========================  ==============  ========================================================
``grpo``                  ``ppo``         mean over completions of each one's token mean
``bnpo``, ``dapo``        ``ppo``         mean over the batch's completion tokens
``dr_grpo``               ``ppo``         token sum / (completions x ``max_new_tokens``)
``gspo``, ``gspo_token``  sequence ratio  as ``grpo`` (TRL: ``importance_sampling_level="sequence"``)
``cispo``                 ``cispo``       as ``dapo``
``sapo``                  ``sapo``        as ``grpo``
========================  ==============  ========================================================

(``bnpo`` and ``dapo`` coincide here: an update always sees the whole generation batch.) Its
advantages are ``"grpo"`` (group-normalised; ``scale_rewards="none"`` is Dr. GRPO's), ``"rloo"``
(leave-one-out baseline: RLOO) or ``"reinforce++"``. :class:`OnlineDPO` samples two completions per
prompt, prefers the one with the higher reward and applies a pairwise objective (DPO, IPO, ...)
against the reference. :class:`PPO` trains a
:class:`~jaxpref.models.heads.CausalLMWithValueHead`: per-token rewards (the score on the last
token minus a KL penalty to the reference), GAE advantages from the value head, PPO's clipped
policy loss and clipped value loss.

Metrics (TRL's names): ``reward``, ``reward_std``, ``frac_reward_zero_std`` (groups whose
rewards are all equal: no learning signal), ``rewards/<name>/mean`` and ``/std`` per reward
function, ``completions/mean_length``, ``/min_length``, ``/max_length``, ``/clipped_ratio`` (no EOS
within ``max_new_tokens``), ``/mean_terminated_length``, ``num_tokens`` (prompt + completion tokens);
from the update (means over its iterations) ``loss``, ``grad_norm``, ``learning_rate``, the
non-finite counters of :func:`~jaxpref.train.step.build_step` and the algorithm's own (``entropy``,
``kl``, ``clip_ratio/region_mean``, ...).

References: Shao et al., "DeepSeekMath", arXiv:2402.03300 (GRPO); Guo et al., "Direct Language
Model Alignment from Online AI Feedback", arXiv:2402.04792 (online DPO); Schulman et al., "Proximal
Policy Optimization Algorithms", arXiv:1707.06347 and Ouyang et al., "Training language models to
follow instructions with human feedback", arXiv:2203.02155 (PPO for language models).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxpref.models.decoder import Decoder
from jaxpref.models.heads import CausalLMWithValueHead
from jaxpref.models.logprobs import DEFAULT_CHUNK_SIZE, token_logps_from_hidden
from jaxpref.models.lora import lora_layers
from jaxpref.models.sampling import SamplingConfig, check_left_padded, generate_jit
from jaxpref.objectives.common import check_range
from jaxpref.objectives.pairwise import PAIRWISE, pairwise_loss
from jaxpref.objectives.policy_gradient import (
    KL_ESTIMATORS,
    POLICY,
    SCALE_REWARDS,
    aggregate_loss,
    gae_advantages,
    grpo_advantages,
    kl_estimate,
    policy_loss,
    reinforce_pp_advantages,
    rloo_advantages,
    value_loss,
)
from jaxpref.sharding import LOGICAL_AXIS_RULES
from jaxpref.train.batches import batch_sharding
from jaxpref.train.rewards import RewardFn
from jaxpref.train.references import as_reference
from jaxpref.train.step import TrainState, injected_learning_rate, jit_step, split_model, state_initializer

Array = jax.Array

_SAMPLING_STREAM = 1  # folded into the state's key for the sampler; the update splits it afterwards


class Rollout(NamedTuple):
    """One generation batch: ``B = prompts x G`` rows, each prompt's ``G`` completions contiguous."""

    prompt_ids: Array  # [B, P] int32, left-padded
    prompt_mask: Array  # [B, P] int32, 1 = prompt token
    completion_ids: Array  # [B, T] int32, pad after EOS
    completion_mask: Array  # [B, T] int32, 1 up to and including the first EOS
    rewards: Array  # [B] float32, the weighted sum of the reward functions


class PolicyOutputs(NamedTuple):
    """The policy's view of a rollout's completion tokens (token ``t`` predicted from the state before it)."""

    logps: Array  # [B, T] log-probs at the sampling temperature; meaningless outside the mask
    entropies: Array  # [B, T] entropy of the predicted distribution
    values: Array | None  # [B, T] value-head estimates of the state before each token; None without one


class OnlineAlgorithm(Protocol):
    """What :func:`build_online_step` asks of an algorithm (see :class:`GRPO`)."""

    uses_reference: bool  # keep a frozen copy of the initial policy and pass its log-probs to prepare
    uses_values: bool  # the policy must be a CausalLMWithValueHead

    def check(self, num_generations: int) -> None:
        """Raises ValueError for a group size ``G`` the algorithm cannot use."""

    def needs_old(self, num_iterations: int) -> bool:
        """Whether ``prepare`` needs the sampling policy's outputs."""

    def prepare(
        self,
        rollout: Rollout,
        mask: Array,
        old: PolicyOutputs | None,
        ref_logps: Array | None,
        group_size: int,
    ) -> Any:
        """Targets fixed for all iterations (advantages, returns, ...), a pytree without gradient.

        ``mask`` ``[B, T]`` marks the completion tokens the loss counts; ``old`` are the sampling
        policy's outputs (when ``needs_old``), ``ref_logps`` ``[B, T]`` the reference's (when
        ``uses_reference``); ``group_size`` is ``G``.
        """

    def loss(
        self, outputs: PolicyOutputs, rollout: Rollout, mask: Array, prepared: Any
    ) -> tuple[Array, dict[str, Array]]:
        """The scalar loss of the current policy and scalar metrics."""


# ------------------------------------------------------------------------------------------------
# Algorithms.
# ------------------------------------------------------------------------------------------------

# TRL loss_type -> (policy loss in POLICY, aggregate_loss mode); see the module docstring.
LOSS_TYPES: dict[str, tuple[str, str]] = {
    "grpo": ("ppo", "grpo"),
    "bnpo": ("ppo", "bnpo"),
    "dr_grpo": ("ppo", "dr_grpo"),
    "dapo": ("ppo", "dapo"),
    "gspo": ("gspo", "grpo"),
    "gspo_token": ("gspo_token", "grpo"),
    "cispo": ("cispo", "dapo"),
    "sapo": ("sapo", "grpo"),
}
ADVANTAGES = ("grpo", "rloo", "reinforce++")


# Online algorithms by the name a run config selects them with (``algorithm="ppo"``): a new one is
# a class with the OnlineAlgorithm methods, registered with @online_algorithm.
ONLINE_ALGORITHMS: dict[str, type] = {}


def online_algorithm(name: str) -> Callable[[type], type]:
    """Registers an :class:`OnlineAlgorithm` class under ``name``."""

    def register(cls: type) -> type:
        ONLINE_ALGORITHMS[name] = cls
        return cls

    return register


@online_algorithm("grpo")
@dataclasses.dataclass(frozen=True)
class GRPO:
    r"""The GRPO family: group-relative advantages and a clipped (or gated) policy loss per token.

    Attributes:
      loss_type: TRL's ``loss_type`` (``LOSS_TYPES``, module docstring).
      advantage: ``"grpo"`` (:func:`~jaxpref.objectives.policy_gradient.grpo_advantages` with
        ``scale_rewards`` ``"group"``, ``"batch"`` or ``"none"``), ``"rloo"`` or ``"reinforce++"``
        (group mean subtracted, then normalised over the batch).
      beta, kl_estimator: weight of the per-token KL to the frozen reference and its estimator
        (:func:`~jaxpref.objectives.policy_gradient.kl_estimate`, ``"k3"`` as GRPO); ``beta=0``
        (TRL's default) keeps no reference.
      loss_hparams: hyperparameters of the policy loss (``epsilon_low``, ``epsilon_high``,
        ``clip_ratio_c`` of ``ppo``; see ``POLICY``); its defaults otherwise.

    Metrics: ``entropy``, the loss's clip fractions (``clip_ratio/low_mean``, ``/high_mean``,
    ``/region_mean``; ``cispo_clip_ratio``), ``ppo_kl``, and ``kl`` when ``beta > 0``.

    References: Shao et al., arXiv:2402.03300 (GRPO); Yu et al., arXiv:2503.14476 (DAPO); Liu et
    al., arXiv:2503.20783 (Dr. GRPO); Zheng et al., arXiv:2507.18071 (GSPO); MiniMax,
    arXiv:2506.13585 (CISPO); Gao et al., arXiv:2511.20347 (SAPO); Ahmadian et al.,
    arXiv:2402.14740 (RLOO); Hu, arXiv:2501.03262 (REINFORCE++).
    """

    loss_type: str = "dapo"
    advantage: str = "grpo"
    scale_rewards: str = "group"
    beta: float = 0.0
    kl_estimator: str = "k3"
    loss_hparams: Mapping[str, float] = dataclasses.field(default_factory=dict)

    uses_values = False

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"`loss_type`={self.loss_type!r} must be one of {sorted(LOSS_TYPES)}.")
        if self.advantage not in ADVANTAGES:
            raise ValueError(f"`advantage`={self.advantage!r} must be one of {ADVANTAGES}.")
        if self.scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"`scale_rewards`={self.scale_rewards!r} must be one of {SCALE_REWARDS}.")
        if self.advantage != "grpo" and self.scale_rewards != "group":
            raise ValueError(
                f"`scale_rewards` applies to advantage='grpo' only; leave it 'group' for {self.advantage!r}."
            )
        check_range("beta", self.beta, 0.0, np.inf)
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"`kl_estimator`={self.kl_estimator!r} must be one of {KL_ESTIMATORS}.")
        POLICY[LOSS_TYPES[self.loss_type][0]].resolve_hparams("policy", dict(self.loss_hparams))

    @property
    def uses_reference(self) -> bool:
        return self.beta > 0

    def check(self, num_generations: int) -> None:
        if num_generations < 2:
            raise ValueError(
                f"`num_generations`={num_generations} must be >= 2: GRPO compares a prompt's completions."
            )

    def needs_old(self, num_iterations: int) -> bool:
        # One iteration is on-policy: the ratio is exp(logps - stop_gradient(logps)) = 1.
        return num_iterations > 1

    def prepare(self, rollout, mask, old, ref_logps, group_size) -> dict[str, Array | None]:
        grouped = rollout.rewards.reshape(-1, group_size)  # [prompts, G]
        if self.advantage == "grpo":
            advantages = grpo_advantages(grouped, scale_rewards=self.scale_rewards)
        elif self.advantage == "rloo":
            advantages = rloo_advantages(grouped)
        else:
            advantages = reinforce_pp_advantages(grouped)
        return {
            "advantages": advantages.reshape(-1),  # [B]
            "old_logps": None if old is None else old.logps,
            "ref_logps": ref_logps,
        }

    def loss(self, outputs, rollout, mask, prepared) -> tuple[Array, dict[str, Array]]:
        policy_name, aggregation = LOSS_TYPES[self.loss_type]
        losses, metrics = policy_loss(
            policy_name,
            logps=outputs.logps,
            advantages=prepared["advantages"],
            mask=mask,
            old_logps=prepared["old_logps"],
            ref_logps=prepared["ref_logps"],
            beta=self.beta,
            kl_estimator=self.kl_estimator,
            entropies=jax.lax.stop_gradient(outputs.entropies),
            **self.loss_hparams,
        )
        return aggregate_loss(losses, mask, aggregation), metrics


# Pairwise objectives an online pair can feed: those reading only log-probs, reference log-probs and
# lengths, with no per-pair array hyperparameter (MMPO's qualities default to None).
_ONLINE_PAIR_INPUTS = {"ref_chosen_logps", "ref_rejected_logps", "chosen_lengths", "rejected_lengths"}
ONLINE_PAIRWISE = tuple(
    sorted(
        name
        for name, spec in PAIRWISE.items()
        if set(spec.requires) <= _ONLINE_PAIR_INPUTS and None not in spec.defaults.values()
    )
)


@online_algorithm("online_dpo")
@dataclasses.dataclass(frozen=True)
class OnlineDPO:
    r"""Online DPO: two samples per prompt, the higher-reward one chosen, a pairwise loss on the pair.

    Every step the current policy samples two completions per prompt (``num_generations=2``), the
    reward functions (an exact checker, a reward model, a judge) say which is chosen, and the
    pairwise objective ``loss_type`` (``"sigmoid"`` is DPO, ``"ipo"`` IPO, ...; ``ONLINE_PAIRWISE``:
    the objectives of :data:`~jaxpref.objectives.pairwise.PAIRWISE` that read only summed log-probs,
    the reference's and the lengths) is applied against the frozen initial policy with ``beta``
    and ``hparams``. A pair whose two rewards are equal states no preference and is left out of
    the loss (TRL keeps it, taking the first sample as chosen).

    Metrics: the objective's ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``,
    ``rewards/margins``, ``logps/chosen``, ``logps/rejected`` (means over the decided pairs) and
    ``pairs/decided`` (the share of pairs with different rewards).

    Reference: Guo et al., "Direct Language Model Alignment from Online AI Feedback",
    arXiv:2402.04792.
    """

    loss_type: str = "sigmoid"
    beta: float = 0.1
    hparams: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    uses_reference = True
    uses_values = False

    def __post_init__(self):
        if self.loss_type not in ONLINE_PAIRWISE:
            raise ValueError(
                f"`loss_type`={self.loss_type!r} must be a pairwise objective usable online: one of "
                f"{ONLINE_PAIRWISE}."
            )
        PAIRWISE[self.loss_type].resolve_hparams("pairwise", {"beta": self.beta, **self.hparams})

    def check(self, num_generations: int) -> None:
        if num_generations != 2:
            raise ValueError(
                f"`num_generations`={num_generations}: online DPO samples a pair, so it must be 2."
            )

    def needs_old(self, num_iterations: int) -> bool:
        return False

    def prepare(self, rollout, mask, old, ref_logps, group_size) -> dict[str, Array]:
        rewards = rollout.rewards.reshape(-1, 2)  # [pairs, 2]
        return {
            "first_chosen": rewards[:, 0] >= rewards[:, 1],  # [pairs]
            "decided": rewards[:, 0] != rewards[:, 1],  # [pairs]
            "ref_sums": jnp.sum(jnp.where(mask != 0, ref_logps, 0.0), axis=1),  # [B]
        }

    def loss(self, outputs, rollout, mask, prepared) -> tuple[Array, dict[str, Array]]:
        first_chosen = prepared["first_chosen"]

        def chosen_rejected(per_sequence: Array) -> tuple[Array, Array]:  # [B] -> [pairs], [pairs]
            pairs = per_sequence.reshape(-1, 2)
            return (
                jnp.where(first_chosen, pairs[:, 0], pairs[:, 1]),
                jnp.where(first_chosen, pairs[:, 1], pairs[:, 0]),
            )

        policy_chosen, policy_rejected = chosen_rejected(
            jnp.sum(jnp.where(mask != 0, outputs.logps, 0.0), axis=1)
        )
        ref_chosen, ref_rejected = chosen_rejected(prepared["ref_sums"])
        chosen_lengths, rejected_lengths = chosen_rejected(jnp.sum(mask, axis=1))
        losses, metrics = pairwise_loss(
            self.loss_type,
            policy_chosen_logps=policy_chosen,
            policy_rejected_logps=policy_rejected,
            ref_chosen_logps=ref_chosen,
            ref_rejected_logps=ref_rejected,
            chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths,
            beta=self.beta,
            **self.hparams,
        )
        decided = prepared["decided"].astype(losses.dtype)  # [pairs]

        def decided_mean(values: Array) -> Array:
            return jnp.sum(values * decided) / jnp.maximum(jnp.sum(decided), 1.0)

        metrics = {key: decided_mean(value) for key, value in metrics.items() if value.shape == losses.shape}
        metrics["pairs/decided"] = jnp.mean(decided)
        return decided_mean(losses), metrics


@online_algorithm("ppo")
@dataclasses.dataclass(frozen=True)
class PPO:
    r"""PPO with a value head, the RLHF recipe of TRL's ``PPOTrainer``.

    Per completion token :math:`t` the reward is the completion's score :math:`R` on its last token
    minus a KL penalty to the frozen reference,
    :math:`r_t = [t = |y|]\,R - \beta_{KL}\,\widehat{\mathrm{KL}}_t` (``kl_coef``, estimator
    ``kl_estimator`` on the sampling policy's log-probs, ``"k1"`` as TRL). GAE
    (:func:`~jaxpref.objectives.policy_gradient.gae_advantages` with ``gamma`` and ``gae_lambda``,
    advantages whitened) turns them and the value head's sampling-time estimates into advantages
    :math:`\hat A_t` and returns :math:`R_t`, and each iteration (TRL's ``num_ppo_epochs``) minimises
    token means of PPO's clipped surrogate and clipped value loss,

    .. math:: \mathcal{L} = \overline{-\min\big(\rho_t \hat A_t, \mathrm{clip}(\rho_t, 1 \pm \epsilon)\hat A_t\big)}
              + c_v\,\overline{\tfrac12\max\big((V_t - R_t)^2, (V^{clip}_t - R_t)^2\big)}

    (``cliprange`` :math:`\epsilon`, ``cliprange_value``, ``vf_coef`` :math:`c_v`). The policy must
    be a :class:`~jaxpref.models.heads.CausalLMWithValueHead`; ``num_generations`` may be 1.

    Metrics: ``objective/kl`` (the mean summed KL of a completion), ``objective/non_score_reward``,
    ``loss/policy``, ``loss/value``, ``vf_clipfrac``, ``clip_ratio/region_mean``, ``entropy``,
    ``ppo_kl``.

    References: Schulman et al., "Proximal Policy Optimization Algorithms", arXiv:1707.06347;
    Schulman et al., "High-Dimensional Continuous Control Using Generalized Advantage Estimation",
    arXiv:1506.02438; Ouyang et al., arXiv:2203.02155; Huang et al., "The N+ Implementation Details
    of RLHF with PPO", arXiv:2403.17031.
    """

    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    gamma: float = 1.0
    gae_lambda: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1

    uses_values = True

    def __post_init__(self):
        check_range("kl_coef", self.kl_coef, 0.0, np.inf)
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"`kl_estimator`={self.kl_estimator!r} must be one of {KL_ESTIMATORS}.")
        check_range("gamma", self.gamma, 0.0, 1.0)
        check_range("gae_lambda", self.gae_lambda, 0.0, 1.0)
        check_range("cliprange", self.cliprange, 0.0, 1.0)
        check_range("cliprange_value", self.cliprange_value, 0.0, np.inf)
        check_range("vf_coef", self.vf_coef, 0.0, np.inf)

    @property
    def uses_reference(self) -> bool:
        return self.kl_coef > 0

    def check(self, num_generations: int) -> None:
        """Any group size: the baseline is the value function, not the group."""

    def needs_old(self, num_iterations: int) -> bool:
        return True  # the sampling-time values and log-probs define the advantages and the clipping

    def prepare(self, rollout, mask, old, ref_logps, group_size) -> dict[str, Array]:
        counted = mask != 0
        kl = jnp.zeros_like(old.logps)
        if ref_logps is not None:
            kl = jnp.where(counted, kl_estimate(old.logps, ref_logps, self.kl_estimator), 0.0)  # [B, T]
        last = jnp.sum(counted, axis=1) - 1  # [B]; -1 for an empty completion: no score token
        scores = jax.nn.one_hot(last, mask.shape[1], dtype=kl.dtype) * rollout.rewards[:, None]
        advantages, returns = gae_advantages(
            scores - self.kl_coef * kl, old.values, mask, gamma=self.gamma, gae_lambda=self.gae_lambda
        )
        return {
            "advantages": advantages,
            "returns": returns,
            "old_logps": old.logps,
            "old_values": old.values,
            "kl": kl,
        }

    def loss(self, outputs, rollout, mask, prepared) -> tuple[Array, dict[str, Array]]:
        policy_losses, metrics = policy_loss(
            "ppo",
            logps=outputs.logps,
            advantages=prepared["advantages"],
            mask=mask,
            old_logps=prepared["old_logps"],
            entropies=jax.lax.stop_gradient(outputs.entropies),
            epsilon_low=self.cliprange,
            epsilon_high=self.cliprange,
        )
        value_losses, value_metrics = value_loss(
            outputs.values, prepared["old_values"], prepared["returns"], mask, value_clip=self.cliprange_value
        )
        policy_term = aggregate_loss(policy_losses, mask, "token-mean")
        value_term = aggregate_loss(value_losses, mask, "token-mean")
        kl_per_completion = jnp.sum(prepared["kl"], axis=1)  # [B]
        metrics = {
            **metrics,
            **value_metrics,
            "loss/policy": jax.lax.stop_gradient(policy_term),
            "loss/value": jax.lax.stop_gradient(value_term),
            "objective/kl": jnp.mean(kl_per_completion),
            "objective/non_score_reward": -self.kl_coef * jnp.mean(kl_per_completion),
        }
        return policy_term + self.vf_coef * value_term, metrics


# ------------------------------------------------------------------------------------------------
# The step.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OnlineStep:
    """What :func:`build_online_step` returns; call it as ``state, metrics = online_step(state, batch)``."""

    mesh: Mesh
    algorithm: OnlineAlgorithm
    num_generations: int
    sampling: SamplingConfig
    reward_fns: Mapping[str, RewardFn]
    reward_weights: np.ndarray  # [num reward functions] float32
    tokenizer: Any  # decodes prompts and completions for the reward functions; None: ids only
    state_shardings: TrainState
    rules: Mapping
    frozen: nnx.State  # the variables not trained (a LoRA model's base weights), on the mesh
    _init: Callable[..., TrainState]
    # (params, frozen, prompt_ids, prompt_mask, key) -> sampler outputs
    _sampler: Callable[..., dict[str, Array]]
    _update: Callable[[TrainState, nnx.State, Rollout], tuple[TrainState, dict[str, Array]]]

    def init(self, params: nnx.State | Callable[[], nnx.State] | None = None, *, seed: int = 0) -> TrainState:
        """A fresh TrainState in its sharded layout (see :meth:`jaxpref.train.step.TrainStep.init`)."""
        return self._init(params, seed)

    def _place(self, array: np.ndarray) -> Array:
        return jax.device_put(array, batch_sharding(self.mesh, array.shape, self.rules))

    def sample(self, state: TrainState, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``G`` completions per prompt of ``batch`` from the state's policy, as host arrays.

        Returns ``prompt_ids``, ``prompt_mask`` ``[B, P]`` (each prompt repeated ``G`` times) and
        ``completion_ids``, ``completion_mask`` ``[B, T]``, ``T = sampling.max_new_tokens``.
        """
        prompt_ids, prompt_mask = (np.asarray(batch[k], np.int32) for k in ("prompt_ids", "prompt_mask"))
        if prompt_ids.ndim != 2 or prompt_mask.shape != prompt_ids.shape:
            raise ValueError(
                f"`batch['prompt_ids']` {prompt_ids.shape} and `batch['prompt_mask']` {prompt_mask.shape} must "
                "both be [prompts, prompt_len] (see jaxpref.data.prompts.PromptBatches)."
            )
        check_left_padded(prompt_mask)
        prompt_ids, prompt_mask = (
            np.repeat(x, self.num_generations, axis=0) for x in (prompt_ids, prompt_mask)
        )
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), _SAMPLING_STREAM)
        out = self._sampler(state.params, self.frozen, self._place(prompt_ids), self._place(prompt_mask), key)
        completion_ids, completion_mask = jax.device_get((out["tokens"], out["completion_mask"]))
        return dict(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            completion_ids=np.asarray(completion_ids),
            completion_mask=np.asarray(completion_mask),
        )

    def score(self, samples: Mapping[str, np.ndarray], batch: Mapping[str, Any]) -> np.ndarray:
        """Every reward function's scores of the sampled completions, ``[B, num reward functions]``.

        Reward functions get the decoded texts (with a tokenizer), the token arrays of ``samples``
        and the other columns of ``batch`` repeated ``G`` times (see :mod:`jaxpref.train.rewards`).
        """
        rows = samples["completion_ids"].shape[0]
        columns = {
            key: [value for value in values for _ in range(self.num_generations)]
            for key, values in batch.items()
            if key not in ("prompt_ids", "prompt_mask", "prompt")
        }
        decode = lambda ids, mask: [  # noqa: E731
            self.tokenizer.decode(i[m != 0], skip_special_tokens=True) for i, m in zip(ids, mask)
        ]
        texts = {"prompts": None, "completions": None}
        if "prompt" in batch:  # the prompt texts as given
            texts["prompts"] = [p for p in batch["prompt"] for _ in range(self.num_generations)]
        elif self.tokenizer is not None:
            texts["prompts"] = decode(samples["prompt_ids"], samples["prompt_mask"])
        if self.tokenizer is not None:
            texts["completions"] = decode(samples["completion_ids"], samples["completion_mask"])
        scores = []
        for name, fn in self.reward_fns.items():
            values = np.asarray(fn(**texts, **samples, **columns), np.float32)
            if values.shape != (rows,):
                raise ValueError(
                    f"Reward function {name!r} returned shape {values.shape}; it must return {rows} floats, "
                    "one per completion."
                )
            if not np.isfinite(values).all():
                raise ValueError(f"Reward function {name!r} returned non-finite rewards; all must be finite.")
            scores.append(values)
        return np.stack(scores, axis=1)

    def update(self, state: TrainState, rollout: Rollout) -> tuple[TrainState, dict[str, Array]]:
        """``num_iterations`` optimizer updates on one scored generation batch; donates ``state``."""
        placed = Rollout(*(self._place(np.asarray(x)) for x in rollout))
        return self._update(state, self.frozen, placed)

    def __call__(self, state: TrainState, batch: Mapping[str, Any]) -> tuple[TrainState, dict[str, Any]]:
        """Sample, score, update; the metrics mix device arrays (update) and host floats (rollout)."""
        samples = self.sample(state, batch)
        scores = self.score(samples, batch)
        rewards = scores @ self.reward_weights
        state, metrics = self.update(state, Rollout(**samples, rewards=rewards))
        return state, {**metrics, **rollout_metrics(samples, scores, rewards, self)}


def rollout_metrics(
    samples: Mapping[str, np.ndarray], scores: np.ndarray, rewards: np.ndarray, step: OnlineStep
) -> dict[str, float]:
    """TRL's reward and completion-length metrics of one generation batch (host floats)."""
    lengths = samples["completion_mask"].sum(axis=1)  # [B]
    eos = np.asarray(step.sampling.eos_token_ids)
    terminated = (np.isin(samples["completion_ids"], eos) & (samples["completion_mask"] != 0)).any(axis=1)
    std = lambda x: float(x.std(ddof=1)) if x.size > 1 else 0.0  # noqa: E731  (unbiased, as torch.std)
    metrics = {
        "reward": float(rewards.mean()),
        "reward_std": std(rewards),
        "completions/mean_length": float(lengths.mean()),
        "completions/min_length": float(lengths.min()),
        "completions/max_length": float(lengths.max()),
        "completions/clipped_ratio": float(1.0 - terminated.mean()),
        "completions/mean_terminated_length": float(lengths[terminated].mean()) if terminated.any() else 0.0,
        "num_tokens": float(samples["prompt_mask"].sum() + lengths.sum()),
    }
    if step.num_generations > 1:
        grouped = rewards.reshape(-1, step.num_generations)  # [prompts, G]
        metrics["frac_reward_zero_std"] = float(np.mean(np.isclose(grouped.std(axis=1), 0.0)))
    for name, column in zip(step.reward_fns, scores.T):
        metrics[f"rewards/{name}/mean"] = float(column.mean())
        metrics[f"rewards/{name}/std"] = std(column)
    return metrics


def _layout(rollout: Rollout) -> tuple[Array, Array, Array]:
    """``(input_ids, positions, segment_ids)`` ``[B, P + T]`` of prompt + completion rows."""
    input_ids = jnp.concatenate([rollout.prompt_ids, rollout.completion_ids], axis=1)
    segment_ids = jnp.concatenate([rollout.prompt_mask, rollout.completion_mask], axis=1)
    # Left padding: each row's real tokens take positions 0, 1, ... as they did in the sampler.
    positions = jnp.maximum(jnp.cumsum(segment_ids, axis=1) - 1, 0)
    return input_ids, positions, segment_ids


def _check_step_options(
    model, algorithm, reward_fns, reward_weights, sampling, num_generations, num_iterations
):
    if not isinstance(model, Decoder | CausalLMWithValueHead):
        raise ValueError(
            f"`model` must be a jaxpref Decoder or CausalLMWithValueHead, got {type(model).__name__}."
        )
    if any(layer.dropout is not None for _, layer in lora_layers(model)):
        raise ValueError(
            "`model` has LoRA dropout, which the online step does not apply (its importance ratios "
            "compare the sampling policy with the same deterministic function); apply_lora with dropout=0."
        )
    if algorithm.uses_values and not isinstance(model, CausalLMWithValueHead):
        raise ValueError(
            f"`algorithm` {type(algorithm).__name__} trains a value function: `model` must be a "
            f"jaxpref.models.heads.CausalLMWithValueHead, got {type(model).__name__}."
        )
    if not isinstance(num_generations, int) or num_generations < 1:
        raise ValueError(f"`num_generations`={num_generations!r} must be a positive int.")
    if not isinstance(num_iterations, int) or num_iterations < 1:
        raise ValueError(f"`num_iterations`={num_iterations!r} must be a positive int.")
    algorithm.check(num_generations)
    if not isinstance(sampling, SamplingConfig) or sampling.temperature == 0:
        raise ValueError(
            "`sampling` must be a SamplingConfig with temperature > 0: greedy completions of a prompt are "
            "identical, and their log-probs are those of no distribution."
        )
    if not sampling.eos_token_ids:
        raise ValueError("`sampling.eos_token_id` must be set, so completions can end.")
    if not reward_fns or not all(callable(fn) for fn in reward_fns.values()):
        raise ValueError("`reward_fns` must map at least one name to a callable reward function.")
    unknown = sorted(set(reward_weights or {}) - set(reward_fns))
    if unknown:
        raise ValueError(
            f"`reward_weights` names {unknown}, which are not in `reward_fns` {sorted(reward_fns)}."
        )
    if jax.process_count() > 1:
        raise ValueError("build_online_step is single-host for now: rewards are scored on one host.")


def build_online_step(
    model: Decoder | CausalLMWithValueHead,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    *,
    algorithm: OnlineAlgorithm,
    reward_fns: Mapping[str, RewardFn],
    sampling: SamplingConfig,
    num_generations: int = 8,
    num_iterations: int = 1,
    reward_weights: Mapping[str, float] | None = None,
    mask_truncated_completions: bool = False,
    tokenizer=None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    rules: Mapping = LOGICAL_AXIS_RULES,
) -> OnlineStep:
    """Builds the sharded init, the sampler call and the jitted, state-donating update.

    Args:
      model: the policy (a :class:`~jaxpref.models.heads.CausalLMWithValueHead` for :class:`PPO`);
        its parameters are the default initial weights and the reference.
      optimizer: any optax transformation (``optax.inject_hyperparams`` to log the learning rate);
        it takes ``num_iterations`` steps per generation batch.
      mesh: a ``(data, fsdp, tensor)`` mesh; parameters are sharded by their logical axes, rollout
        rows over ``data`` and ``fsdp``.
      algorithm: :class:`GRPO`, :class:`OnlineDPO` or :class:`PPO` (or any :class:`OnlineAlgorithm`).
      reward_fns: name -> reward function (:mod:`jaxpref.train.rewards`); the names label the
        ``rewards/<name>/...`` metrics.
      sampling: how completions are drawn (``max_new_tokens`` is the completion length ``T``):
        temperature > 0, and an EOS id.
      num_generations: completions per prompt ``G`` (TRL's ``num_generations``).
      num_iterations: optimizer updates per generation batch (TRL's ``num_iterations``, GRPO's
        :math:`\\mu`, PPO's epochs).
      reward_weights: name -> weight of each reward function in the sum (default 1 each).
      mask_truncated_completions: leave completions that did not end with EOS out of the loss
        (DAPO's overlong filtering); they still count in the reward metrics.
      tokenizer: decodes prompts and completions for reward functions that read text.
      chunk_size: LM-head tokens per chunk (:func:`~jaxpref.models.logprobs.token_logps_from_hidden`).
    """
    _check_step_options(
        model, algorithm, reward_fns, reward_weights, sampling, num_generations, num_iterations
    )
    eos_ids = jnp.asarray(sampling.eos_token_ids, jnp.int32)
    temperature = sampling.temperature
    with_value_head = isinstance(model, CausalLMWithValueHead)
    # A LoRA model trains its adapters (and the value head) only: the base weights are the frozen
    # state, passed to every call, and the reference is the base itself (adapters off), not a copy.
    split = split_model(model, mesh, rules)
    graphdef, frozen_state = split.graphdef, split.frozen
    reference = as_reference("frozen" if algorithm.uses_reference else "none", model)

    def sampler(
        params: nnx.State, frozen_state: nnx.State, prompt_ids: Array, prompt_mask: Array, key: Array
    ) -> dict[str, Array]:
        # The decoder alone (the value head's backbone, or the whole policy) over the very arrays of
        # `params` and `frozen_state`: the sampler reads the trained weights, nothing is copied.
        policy = nnx.merge(graphdef, params, frozen_state)
        decoder_graphdef, decoder_state = nnx.split(policy.model if with_value_head else policy)
        return generate_jit(decoder_graphdef, decoder_state, prompt_ids, prompt_mask, key, sampling)

    def forward(params: nnx.State, frozen_state: nnx.State, rollout: Rollout) -> PolicyOutputs:
        """The policy's outputs on the rollout."""
        return module_outputs(split.module(params, frozen_state), rollout)

    def module_outputs(module: nnx.Module, rollout: Rollout) -> PolicyOutputs:
        """``module``'s (the policy's or the reference's) outputs on the rollout."""
        input_ids, positions, segment_ids = _layout(rollout)
        outputs = module(input_ids, positions=positions, segment_ids=segment_ids)
        hidden, values = outputs if with_value_head else (outputs, None)  # [B, P + T, hidden], [B, P + T]
        decoder = module.model if with_value_head else module
        # Completion token t is predicted by the state just before it: prompt_len - 1 + t.
        before = slice(rollout.prompt_ids.shape[1] - 1, -1)
        unembedding = decoder.unembedding()
        if temperature != 1.0:
            unembedding = unembedding / jnp.asarray(temperature, unembedding.dtype)
        logps, stats = token_logps_from_hidden(
            hidden[:, before], unembedding, rollout.completion_ids, chunk_size=chunk_size, return_stats=True
        )
        return PolicyOutputs(logps, stats.entropy, None if values is None else values[:, before])

    def update(
        state: TrainState, frozen_state: nnx.State, rollout: Rollout
    ) -> tuple[TrainState, dict[str, Array]]:
        mask = rollout.completion_mask
        if mask_truncated_completions:
            terminated = jnp.any(jnp.isin(rollout.completion_ids, eos_ids) & (mask != 0), axis=1)
            mask = mask * terminated[:, None].astype(mask.dtype)
        frozen = jax.lax.stop_gradient
        old = (
            jax.tree.map(frozen, forward(state.params, frozen_state, rollout))
            if algorithm.needs_old(num_iterations)
            else None
        )
        ref_logps = None
        ref_model = reference.model(split.module, state.params, state.ref_params, frozen_state)
        if ref_model is not None:
            ref_logps = frozen(module_outputs(ref_model, rollout).logps)
        prepared = jax.tree.map(frozen, algorithm.prepare(rollout, mask, old, ref_logps, num_generations))
        grad_fn = jax.value_and_grad(
            lambda params: algorithm.loss(forward(params, frozen_state, rollout), rollout, mask, prepared),
            has_aux=True,
        )

        def iteration(carry, _):
            params, opt_state, nonfinite_count = carry
            (loss, metrics), grads = grad_fn(params)
            grad_norm = optax.tree.norm(grads)
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            updates, new_opt_state = optimizer.update(grads, opt_state, params)
            new_params = optax.apply_updates(params, updates)
            keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
            carry = (
                keep(new_params, params),
                keep(new_opt_state, opt_state),
                jnp.where(finite, 0, nonfinite_count + 1),
            )
            metrics = {
                "loss": loss,
                **metrics,
                "grad_norm": grad_norm,
                "nonfinite_skipped": 1.0 - finite.astype(jnp.float32),
            }
            return carry, metrics

        carry = (state.params, state.opt_state, state.nonfinite_count)
        (params, opt_state, nonfinite_count), per_iteration = jax.lax.scan(
            iteration, carry, None, length=num_iterations
        )
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            rng=jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.rng))[0]),
            nonfinite_count=nonfinite_count,
        )
        metrics = {k: jnp.mean(v) for k, v in per_iteration.items()}
        metrics["nonfinite_consecutive"] = nonfinite_count
        learning_rate = injected_learning_rate(opt_state)
        if learning_rate is not None:
            metrics["learning_rate"] = learning_rate
        return new_state, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}

    init, state_shardings = state_initializer(split.params, optimizer, mesh, rules, reference.keeps_copy)
    return OnlineStep(
        mesh=mesh,
        algorithm=algorithm,
        num_generations=num_generations,
        sampling=sampling,
        reward_fns=dict(reward_fns),
        reward_weights=np.array([(reward_weights or {}).get(name, 1.0) for name in reward_fns], np.float32),
        tokenizer=tokenizer,
        state_shardings=state_shardings,
        rules=rules,
        frozen=frozen_state,
        _init=init,
        _sampler=sampler,
        _update=jit_step(update, state_shardings, mesh),
    )
