r"""Reward-model objectives: a scalar reward per response, learnt from preference pairs.

Conventions
-----------
- Inputs are ``[batch]`` rewards a reward model :math:`r_\theta(x, y)` gives the two responses of
  each pair: ``chosen_rewards`` :math:`r_w` and ``rejected_rewards`` :math:`r_l`.
- ``margin`` (``[batch]``, optional) is a per-pair margin :math:`m` the chosen reward must exceed
  the rejected one by, e.g. larger for pairs rated "significantly better" (Llama 2, Touvron et
  al., arXiv:2307.09288, Eq. 2; TRL's ``RewardTrainer`` reads it from a ``margin`` column). Every
  objective is a function of :math:`\Delta = r_w - r_l - m` (:math:`m = 0` without a margin).
- Each objective is :math:`-\log P(y_w \succ y_l)` under a model of choice: Bradley-Terry
  (logistic), Bradley-Terry with soft targets, or Thurstone (probit).
- ``center_rewards_coefficient`` :math:`c \ge 0` (every objective, default 0) adds
  :math:`c\,(r_w + r_l)^2` per pair, so the mean loss gets TRL's
  :math:`c\,\mathrm{mean}((r_w + r_l)^2)`: it pins the rewards' otherwise arbitrary offset near 0
  (Eisenstein et al., "Helping or Herding? Reward Model Ensembles Mitigate but do not Eliminate
  Reward Hacking", arXiv:2312.09244).
- Every objective returns **per-pair, unreduced** losses of shape ``[batch]``; their mean is the
  loss TRL reports. Hyperparameters are keyword arguments with their defaults in the signature;
  an unknown one is an error.

Metrics, ``[batch]`` arrays without gradient: ``rewards/chosen``, ``rewards/rejected``,
``rewards/accuracies`` (1 where :math:`r_w > r_l` strictly, so ties count 0) and
``rewards/margins`` (:math:`r_w - r_l`, the margin :math:`m` not subtracted).

>>> import jax.numpy as jnp
>>> from jaxpref.objectives import reward_loss
>>> losses, metrics = reward_loss(
...     "bradley_terry",
...     chosen_rewards=jnp.array([1.0, 0.0]),
...     rejected_rewards=jnp.array([0.0, 0.5]),
... )
>>> [round(float(loss), 4) for loss in losses]  # log(1 + e^-1), log(1 + e^0.5)
[0.3133, 0.9741]
>>> metrics["rewards/accuracies"]
Array([1., 0.], dtype=float32)
>>> losses, _ = reward_loss(
...     "bradley_terry", chosen_rewards=jnp.array([1.0]), rejected_rewards=jnp.array([0.0]),
...     margin=jnp.array([1.0]),
... )
>>> round(float(losses[0]), 4)  # a margin of 1 leaves Delta = 0: log 2
0.6931
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxpref.objectives.common import Array, as_float, check_range, check_same_shape, lookup, make_registry

REWARD, _register = make_registry("reward")


class RewardPair(NamedTuple):
    """The validated inputs of a reward objective."""

    chosen_rewards: Array  # [batch]
    rejected_rewards: Array  # [batch]
    margin: Array | None = None  # [batch]

    @property
    def delta(self) -> Array:  # [batch]
        """:math:`\\Delta = r_w - r_l - m`, the argument of every preference probability."""
        delta = self.chosen_rewards - self.rejected_rewards
        return delta if self.margin is None else delta - self.margin


def _centering(pair: RewardPair, coefficient: float) -> Array:
    r""":math:`c\,(r_w + r_l)^2`, TRL's ``center_rewards_coefficient`` term per pair."""
    check_range("center_rewards_coefficient", coefficient, 0.0, math.inf)
    return coefficient * (pair.chosen_rewards + pair.rejected_rewards) ** 2


@_register("bradley_terry", paper="Bradley & Terry, Biometrika 39 (1952); Ouyang et al., arXiv:2203.02155")
def bradley_terry(pair: RewardPair, *, center_rewards_coefficient: float = 0.0) -> Array:
    r"""Bradley-Terry: :math:`-\log\sigma(r_w - r_l - m) + c\,(r_w + r_l)^2`.

    :math:`P(y_w \succ y_l) = \sigma(r_w - r_l)`, the loss of InstructGPT's reward model and of
    TRL's ``RewardTrainer`` (with its ``margin`` and ``center_rewards_coefficient``).

    References: Bradley & Terry, "Rank Analysis of Incomplete Block Designs: I. The Method of Paired
    Comparisons", Biometrika 39 (1952); Ouyang et al., "Training language models to follow
    instructions with human feedback", arXiv:2203.02155, Eq. (1).
    """
    return -jax.nn.log_sigmoid(pair.delta) + _centering(pair, center_rewards_coefficient)


@_register("bradley_terry_soft", paper="Christiano et al., arXiv:1706.03741")
def bradley_terry_soft(
    pair: RewardPair, *, target_probability: float | Array = 1.0, center_rewards_coefficient: float = 0.0
) -> Array:
    r"""Bradley-Terry against a soft target :math:`p = P(y_w \succ y_l)` (cross-entropy):

    .. math:: -p\log\sigma(\Delta) - (1 - p)\log\sigma(-\Delta) + c\,(r_w + r_l)^2

    ``target_probability`` is a scalar or ``[batch]`` in [0, 1]: annotator agreement, 0.5 for a
    tie (Christiano et al. give ties a uniform target), or :math:`1 - \epsilon` for label
    smoothing. :math:`p = 1` is :func:`bradley_terry`. Unlike the hard loss it is minimised at
    the finite :math:`\Delta = \operatorname{logit} p` for :math:`0 < p < 1`.

    Reference: Christiano et al., "Deep Reinforcement Learning from Human Preferences",
    arXiv:1706.03741, Section 2.2.3.
    """
    target = as_float("target_probability", target_probability)
    if target.ndim > 1:
        raise ValueError(f"`target_probability` must be a scalar or [batch], got shape {target.shape}.")
    if target.ndim == 1:
        check_same_shape("chosen_rewards", pair.chosen_rewards, target_probability=target)
    if not isinstance(target, jax.core.Tracer) and bool(jnp.any((target < 0) | (target > 1))):
        raise ValueError("`target_probability` must lie in [0, 1].")
    delta = pair.delta
    cross_entropy = -target * jax.nn.log_sigmoid(delta) - (1.0 - target) * jax.nn.log_sigmoid(-delta)
    return cross_entropy + _centering(pair, center_rewards_coefficient)


@_register("thurstone", paper="Thurstone, Psychological Review 34 (1927)")
def thurstone(pair: RewardPair, *, sigma: float = 1.0, center_rewards_coefficient: float = 0.0) -> Array:
    r"""Thurstone Case V (probit): :math:`-\log\Phi\big(\Delta / (\sqrt{2}\,\sigma)\big) + c\,(r_w + r_l)^2`.

    Each response's perceived quality is its reward plus independent :math:`N(0, \sigma^2)`
    noise, so :math:`P(y_w \succ y_l) = \Phi((r_w - r_l) / (\sqrt{2}\,\sigma))`, :math:`\Phi` the
    standard normal CDF. The probit tail is lighter than the logistic: a confidently wrong pair
    costs :math:`\approx \Delta^2 / (4\sigma^2)`, not :math:`|\Delta|`. :math:`\sigma = 1/\sqrt{2}`
    is the plain probit :math:`-\log\Phi(\Delta)`; :math:`\sigma = 2/\sqrt{\pi}` matches the
    Bradley-Terry slope at :math:`\Delta = 0`. :math:`\log\Phi` is ``log_ndtr``, finite and
    accurate far into the lower tail.

    Reference: Thurstone, "A law of comparative judgment", Psychological Review 34 (1927); Case V
    as in Mosteller, "Remarks on the method of paired comparisons", Psychometrika 16 (1951).
    """
    check_range("sigma", sigma, 0.0, math.inf, low_inclusive=False)
    z = pair.delta / (math.sqrt(2.0) * sigma)
    return -jax.scipy.special.log_ndtr(z) + _centering(pair, center_rewards_coefficient)


def reward_metrics(chosen_rewards: Array, rejected_rewards: Array) -> dict[str, Array]:
    """TRL's reward metrics as per-pair ``[batch]`` arrays, without gradient."""
    chosen = jax.lax.stop_gradient(chosen_rewards)
    rejected = jax.lax.stop_gradient(rejected_rewards)
    return {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/accuracies": (chosen > rejected).astype(chosen.dtype),
        "rewards/margins": chosen - rejected,
    }


def reward_loss(
    name: str,
    *,
    chosen_rewards: Array,  # [batch]
    rejected_rewards: Array,  # [batch]
    margin: Array | None = None,  # [batch]
    **hparams,
) -> tuple[Array, dict[str, Array]]:
    """Per-pair losses ``[batch]`` and metrics of the reward objective ``name`` (see ``REWARD``).

    ``hparams`` are the objective's hyperparameters (its signature in this module lists them with
    defaults). Inputs are upcast to at least float32.
    """
    spec = lookup("reward", REWARD, name)
    hparams = spec.resolve_hparams("reward", hparams)
    chosen = as_float("chosen_rewards", chosen_rewards, ndim=1)
    rejected = as_float("rejected_rewards", rejected_rewards, ndim=1)
    margin = None if margin is None else as_float("margin", margin, ndim=1)
    check_same_shape("chosen_rewards", chosen, rejected_rewards=rejected, margin=margin)
    losses = spec.fn(RewardPair(chosen, rejected, margin), **hparams)
    return losses, reward_metrics(chosen, rejected)
