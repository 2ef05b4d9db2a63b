r"""Pairwise preference objectives: one chosen and one rejected response per prompt.

Conventions
-----------
- Inputs are ``[batch]`` arrays of sequence log-probs **summed** over completion tokens:
  ``policy_chosen_logps`` :math:`\log\pi_\theta(y_w|x)`, ``policy_rejected_logps``, and the
  reference model's ``ref_chosen_logps`` / ``ref_rejected_logps`` for objectives that need them.
  Token-level ``[batch, seq]`` log-probs are accepted too, with ``chosen_mask`` / ``rejected_mask``:
  they are summed over the mask, or with ``ld_alpha`` weighted as LD-DPO does (any objective, as
  TRL's ``ld_alpha``; ``ld_dpo`` requires it).
- ``chosen_lengths`` / ``rejected_lengths`` are completion token counts. Used as divisors they are
  clamped to 1, as TRL does, so a zero-length completion gives a per-token log-prob of 0.
- Log-ratios :math:`h_w = \log\pi_\theta(y_w|x) - \log\pi_{ref}(y_w|x)` (and :math:`h_l`) are called
  ``chosen_logratios`` / ``rejected_logratios``.
- Every objective returns **per-pair, unreduced** losses of shape ``[batch]``. Their mean is the
  loss TRL reports. Objectives that are batch-level by definition (``aot``, ``aot_unpaired`` sort
  across the batch; ``sft`` and the NLL terms of ``cpo``/``orpo``/``slic`` are token means over the
  batch) return per-pair shares whose mean is that batch quantity.
- Optional ``chosen_weights`` / ``rejected_weights`` (``[batch]``, e.g. from
  :func:`jaxpref.objectives.wpo_weights`) multiply any objective's per-pair loss by their product.
- Hyperparameters are keyword arguments; each objective's defaults are in its signature and an
  unknown hyperparameter is an error, never silently ignored.

>>> import jax.numpy as jnp
>>> from jaxpref.objectives import pairwise_loss
>>> losses, metrics = pairwise_loss(
...     "sigmoid",
...     policy_chosen_logps=jnp.array([-10.0, -12.0]),
...     policy_rejected_logps=jnp.array([-11.0, -11.0]),
...     ref_chosen_logps=jnp.array([-10.0, -11.0]),
...     ref_rejected_logps=jnp.array([-10.0, -11.0]),
...     beta=0.1,
... )
>>> [round(float(loss), 3) for loss in losses]
[0.644, 0.744]
>>> metrics["rewards/accuracies"]
Array([1., 0.], dtype=float32)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxpref.objectives.common import (
    Array,
    as_float,
    check_range,
    check_same_shape,
    clamp_lengths,
    log1mexp,
    lookup,
    make_registry,
)
from jaxpref.objectives.sequence import ld_pair_logps, sequence_logps

PAIRWISE, _register = make_registry("pairwise")

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# exp() arguments are clamped so float32 stays finite even squared (IPO squares scores): e^40 squared
# is ~5e34. TRL clamps at 80; the two agree wherever TRL's losses are finite and not saturated.
_EXP_CLAMP = 40.0


class PairLogps(NamedTuple):
    """The arrays a pairwise objective may read; optional ones are None when not given."""

    policy_chosen_logps: Array  # [batch]
    policy_rejected_logps: Array  # [batch]
    ref_chosen_logps: Array | None = None  # [batch]
    ref_rejected_logps: Array | None = None  # [batch]
    chosen_lengths: Array | None = None  # [batch]
    rejected_lengths: Array | None = None  # [batch]
    # Token-level inputs, present only when log-probs were given per token.
    policy_chosen_token_logps: Array | None = None  # [batch, seq]
    policy_rejected_token_logps: Array | None = None  # [batch, seq]
    ref_chosen_token_logps: Array | None = None  # [batch, seq]
    ref_rejected_token_logps: Array | None = None  # [batch, seq]
    chosen_mask: Array | None = None  # [batch, seq]
    rejected_mask: Array | None = None  # [batch, seq]

    @property
    def chosen_logratios(self) -> Array:
        return self.policy_chosen_logps - self.ref_chosen_logps

    @property
    def rejected_logratios(self) -> Array:
        return self.policy_rejected_logps - self.ref_rejected_logps

    @property
    def chosen_avg_logps(self) -> Array:
        return self.policy_chosen_logps / clamp_lengths(self.chosen_lengths)

    @property
    def rejected_avg_logps(self) -> Array:
        return self.policy_rejected_logps / clamp_lengths(self.rejected_lengths)


# Which optional inputs each kind of objective needs; checked before the loss runs.
_REF = ("ref_chosen_logps", "ref_rejected_logps")
_LENGTHS = ("chosen_lengths", "rejected_lengths")


def f_divergence_scores(
    logratios: Array, f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5
) -> Array:
    r"""Maps log-ratios :math:`h = \log(\pi_\theta/\pi_{ref})` to the score :math:`f'(e^h)` of an f-divergence.

    Generalises DPO's implicit reward from the reverse KL to other f-divergences (TRL's forms):

    - ``reverse_kl``: :math:`h` (standard DPO)
    - ``forward_kl``: :math:`1 - e^{-h}`
    - ``js_divergence``: :math:`\log 2 + \log\sigma(h)`
    - ``alpha_divergence``: :math:`(e^{(\alpha-1)h} - 1)/(\alpha-1)`, :math:`h` at :math:`\alpha = 1`

    Exponents are clamped at 40 so scores stay finite in float32 even when a loss squares them.

    Reference: Wang et al., "Beyond Reverse KL: Generalizing Direct Preference Optimization with
    Diverse Divergence Constraints", arXiv:2309.16240.
    """
    if f_divergence_type not in F_DIVERGENCES:
        raise ValueError(f"`f_divergence_type`={f_divergence_type!r} must be one of {F_DIVERGENCES}.")
    if f_divergence_type == "reverse_kl":
        return logratios
    if f_divergence_type == "forward_kl":
        return -jnp.expm1(jnp.minimum(-logratios, _EXP_CLAMP))
    if f_divergence_type == "js_divergence":
        return jnp.log(2.0) + jax.nn.log_sigmoid(logratios)
    # jnp.where rather than a Python branch, so a traced coefficient of 1 works too.
    coef = jnp.asarray(f_alpha_divergence_coef - 1.0, logratios.dtype)
    is_kl_limit = jnp.abs(coef) < 1e-6
    safe_coef = jnp.where(is_kl_limit, 1.0, coef)
    return jnp.where(
        is_kl_limit, logratios, jnp.expm1(jnp.minimum(safe_coef * logratios, _EXP_CLAMP)) / safe_coef
    )


def _scores(pair: PairLogps, f_divergence_type: str, f_alpha_divergence_coef: float) -> tuple[Array, Array]:
    return (
        f_divergence_scores(pair.chosen_logratios, f_divergence_type, f_alpha_divergence_coef),
        f_divergence_scores(pair.rejected_logratios, f_divergence_type, f_alpha_divergence_coef),
    )


def _delta_score(pair: PairLogps, f_divergence_type: str, f_alpha_divergence_coef: float) -> Array:
    chosen_scores, rejected_scores = _scores(pair, f_divergence_type, f_alpha_divergence_coef)
    return chosen_scores - rejected_scores


def _smoothed_logistic(logits: Array, label_smoothing: float) -> Array:
    r""":math:`-(1-\epsilon)\log\sigma(z) - \epsilon\log\sigma(-z)`, :math:`\epsilon \in [0, 1/2]`."""
    check_range("label_smoothing", label_smoothing, 0.0, 0.5)
    return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(logits) - label_smoothing * jax.nn.log_sigmoid(
        -logits
    )


def _batch_token_mean_nll(pair: PairLogps) -> Array:
    r"""The batch's token-mean NLL of the chosen responses, broadcast to ``[batch]``.

    :math:`-\sum_j \log\pi(y_{w,j}) / \sum_j |y_{w,j}|`: the cross-entropy over all chosen
    completion tokens of the batch, which TRL's SFT, CPO and ORPO terms use. Broadcasting (as TRL
    does) keeps TRL's result under per-pair weights too: a weighted mean multiplies the batch NLL.
    """
    total_tokens = clamp_lengths(jnp.sum(pair.chosen_lengths))
    nll = -jnp.sum(pair.policy_chosen_logps) / total_tokens
    return jnp.broadcast_to(nll, pair.policy_chosen_logps.shape)


# --------------------------------------------------------------------------------------------
# The objectives of TRL's DPOTrainer (loss_type), with TRL's definitions and hyperparameter names.
# --------------------------------------------------------------------------------------------


@_register("sigmoid", requires=_REF, paper="Rafailov et al., arXiv:2305.18290")
def sigmoid(
    pair: PairLogps,
    *,
    beta: float = 0.1,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
) -> Array:
    r"""DPO: :math:`-\log\sigma(\beta\,[s(h_w) - s(h_l)])`, :math:`s` the f-divergence score.

    Reference: Rafailov et al., "Direct Preference Optimization: Your Language Model is Secretly a
    Reward Model", arXiv:2305.18290.
    """
    return -jax.nn.log_sigmoid(beta * _delta_score(pair, f_divergence_type, f_alpha_divergence_coef))


@_register("hinge", requires=_REF, paper="Zhao et al., arXiv:2305.10425")
def hinge(
    pair: PairLogps,
    *,
    beta: float = 0.1,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
) -> Array:
    r"""Hinge on the reward margin: :math:`\max(0, 1 - \beta\,[s(h_w) - s(h_l)])`.

    Reference: Zhao et al., "SLiC-HF: Sequence Likelihood Calibration with Human Feedback",
    arXiv:2305.10425 (the calibration loss, with DPO's log-ratios in place of log-probs).
    """
    return jax.nn.relu(1.0 - beta * _delta_score(pair, f_divergence_type, f_alpha_divergence_coef))


@_register("ipo", requires=_REF + _LENGTHS, paper="Azar et al., arXiv:2310.12036")
def ipo(
    pair: PairLogps,
    *,
    beta: float = 0.1,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
) -> Array:
    r"""IPO with per-token log-ratios: :math:`\big(s(h_w)/|y_w| - s(h_l)/|y_l| - \tfrac{1}{2\beta}\big)^2`.

    As in TRL, the summed log-ratios are divided by completion length (the IPO authors' form), so
    :math:`\beta` (the paper's :math:`\tau`) is comparable across lengths.

    Reference: Azar et al., "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", arXiv:2310.12036, Eq. (17).
    """
    chosen_scores, rejected_scores = _scores(pair, f_divergence_type, f_alpha_divergence_coef)
    delta = chosen_scores / clamp_lengths(pair.chosen_lengths) - rejected_scores / clamp_lengths(
        pair.rejected_lengths
    )
    return (delta - 1.0 / (2.0 * beta)) ** 2


@_register("exo_pair", requires=_REF, paper="Ji et al., arXiv:2402.00856")
def exo_pair(
    pair: PairLogps,
    *,
    beta: float = 0.1,
    label_smoothing: float = 1e-3,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
) -> Array:
    r"""EXO for pairs: reverse KL from the policy's pair distribution to the smoothed label.

    With :math:`z = \beta\,[s(h_w) - s(h_l)]` and label smoothing :math:`\epsilon \in (0, 1)`:

    .. math:: \sigma(z)\,[\log\sigma(z) - \log(1-\epsilon)] + \sigma(-z)\,[\log\sigma(-z) - \log\epsilon]

    Reference: Ji et al., "Towards Efficient Exact Optimization of Language Model Alignment",
    arXiv:2402.00856, Eq. (16).
    """
    check_range("label_smoothing", label_smoothing, 0.0, 1.0, low_inclusive=False, high_inclusive=False)
    z = beta * _delta_score(pair, f_divergence_type, f_alpha_divergence_coef)
    return jax.nn.sigmoid(z) * (jax.nn.log_sigmoid(z) - jnp.log1p(-label_smoothing)) + jax.nn.sigmoid(-z) * (
        jax.nn.log_sigmoid(-z) - jnp.log(label_smoothing)
    )


@_register("nca_pair", requires=_REF, paper="Chen et al., arXiv:2402.05369")
def nca_pair(
    pair: PairLogps,
    *,
    beta: float = 0.1,
) -> Array:
    r"""NCA for pairs: :math:`-\log\sigma(r_w) - \tfrac12\log\sigma(-r_w) - \tfrac12\log\sigma(-r_l)`,
    :math:`r = \beta h`.

    Reference: Chen et al., "Noise Contrastive Alignment of Language Models with Explicit
    Rewards", arXiv:2402.05369.
    """
    chosen_rewards, rejected_rewards = beta * pair.chosen_logratios, beta * pair.rejected_logratios
    return (
        -jax.nn.log_sigmoid(chosen_rewards)
        - 0.5 * jax.nn.log_sigmoid(-chosen_rewards)
        - 0.5 * jax.nn.log_sigmoid(-rejected_rewards)
    )


@_register("robust", requires=_REF, paper="Chowdhury et al., arXiv:2403.00409")
def robust(
    pair: PairLogps,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
) -> Array:
    r"""Robust DPO, unbiased under label flips with rate :math:`\epsilon < 1/2`:

    .. math:: \frac{-(1-\epsilon)\log\sigma(z) + \epsilon\log\sigma(-z)}{1 - 2\epsilon},
        \quad z = \beta\,[s(h_w) - s(h_l)]

    Reference: Chowdhury et al., "Provably Robust DPO: Aligning Language Models with Noisy
    Feedback", arXiv:2403.00409.
    """
    check_range("label_smoothing", label_smoothing, 0.0, 0.5, high_inclusive=False)
    z = beta * _delta_score(pair, f_divergence_type, f_alpha_divergence_coef)
    return (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(z) + label_smoothing * jax.nn.log_sigmoid(-z)) / (
        1.0 - 2.0 * label_smoothing
    )


@_register("bco_pair", requires=_REF, paper="Jung et al., arXiv:2404.04656")
def bco_pair(
    pair: PairLogps,
    *,
    beta: float = 0.1,
) -> Array:
    r"""BCO for pairs (no reward shift): :math:`-\log\sigma(r_w) - \log\sigma(-r_l)`, :math:`r = \beta h`.

    Reference: Jung et al., "Binary Classifier Optimization for Large Language Model Alignment",
    arXiv:2404.04656.
    """
    return -jax.nn.log_sigmoid(beta * pair.chosen_logratios) - jax.nn.log_sigmoid(
        -beta * pair.rejected_logratios
    )


@_register("sppo_hard", requires=_REF, paper="Wu et al., arXiv:2405.00675")
def sppo_hard(
    pair: PairLogps,
    *,
    beta: float = 0.1,
) -> Array:
    r"""SPPO with hard win probabilities (1 for the winner, 0 for the loser):

    .. math:: \big(h_w - \tfrac{1}{2\beta}\big)^2 + \big(h_l + \tfrac{1}{2\beta}\big)^2

    Reference: Wu et al., "Self-Play Preference Optimization for Language Model Alignment",
    arXiv:2405.00675, Eq. (4.7).
    """
    return (pair.chosen_logratios - 0.5 / beta) ** 2 + (pair.rejected_logratios + 0.5 / beta) ** 2


@_register("aot", requires=_REF, paper="Melnyk et al., arXiv:2406.05882")
def aot(pair: PairLogps, *, beta: float = 0.1, label_smoothing: float = 0.0) -> Array:
    r"""Alignment via Optimal Transport, paired: first-order stochastic dominance of the policy's
    log-ratio margins over the reference's, by sorting both across the batch.

    With :math:`u = \mathrm{sort}(\log\pi_\theta(y_w) - \log\pi_\theta(y_l))`,
    :math:`v = \mathrm{sort}(\log\pi_{ref}(y_w) - \log\pi_{ref}(y_l))` and :math:`z = \beta(u - v)`:
    :math:`-(1-\epsilon)\log\sigma(z) - \epsilon\log\sigma(-z)` per sorted position.

    Reference: Melnyk et al., "Distributional Preference Alignment of LLMs via Optimal
    Transport", arXiv:2406.05882.
    """
    policy_margins = jnp.sort(pair.policy_chosen_logps - pair.policy_rejected_logps)
    ref_margins = jnp.sort(pair.ref_chosen_logps - pair.ref_rejected_logps)
    return _smoothed_logistic(beta * (policy_margins - ref_margins), label_smoothing)


@_register("aot_unpaired", requires=_REF, paper="Melnyk et al., arXiv:2406.05882")
def aot_unpaired(pair: PairLogps, *, beta: float = 0.1, label_smoothing: float = 0.0) -> Array:
    r"""Alignment via Optimal Transport, unpaired: chosen log-ratios must dominate rejected ones.

    :math:`z = \beta(\mathrm{sort}(h_w) - \mathrm{sort}(h_l))`, then
    :math:`-(1-\epsilon)\log\sigma(z) - \epsilon\log\sigma(-z)` per sorted position.

    Reference: Melnyk et al., "Distributional Preference Alignment of LLMs via Optimal
    Transport", arXiv:2406.05882.
    """
    z = beta * (jnp.sort(pair.chosen_logratios) - jnp.sort(pair.rejected_logratios))
    return _smoothed_logistic(z, label_smoothing)


@_register("apo_zero", requires=_REF, paper="D'Oosterlinck et al., arXiv:2408.06266")
def apo_zero(pair: PairLogps, *, beta: float = 0.1) -> Array:
    r"""Anchored Preference Optimization, zero anchor (raise chosen, lower rejected):
    :math:`1 - \sigma(\beta h_w) + \sigma(\beta h_l)`.

    Reference: D'Oosterlinck et al., "Anchored Preference Optimization and Contrastive
    Revisions: Addressing Underspecification in Alignment", arXiv:2408.06266, Eq. (7).
    """
    return 1.0 - jax.nn.sigmoid(beta * pair.chosen_logratios) + jax.nn.sigmoid(beta * pair.rejected_logratios)


@_register("apo_down", requires=_REF, paper="D'Oosterlinck et al., arXiv:2408.06266")
def apo_down(
    pair: PairLogps,
    *,
    beta: float = 0.1,
) -> Array:
    r"""Anchored Preference Optimization, down anchor (lower both, rejected more):
    :math:`\sigma(\beta h_w) + 1 - \sigma(\beta\,[h_w - h_l])`.

    Reference: D'Oosterlinck et al., arXiv:2408.06266, Eq. (8).
    """
    delta = pair.chosen_logratios - pair.rejected_logratios
    return jax.nn.sigmoid(beta * pair.chosen_logratios) + 1.0 - jax.nn.sigmoid(beta * delta)


@_register("discopop", requires=_REF, paper="Chan et al., arXiv:2406.08414")
def discopop(
    pair: PairLogps,
    *,
    beta: float = 0.1,
    discopop_tau: float = 0.05,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
) -> Array:
    r"""DiscoPOP's log-ratio modulated loss, :math:`z = \beta\,[s(h_w) - s(h_l)]`:

    .. math:: -(1 - \sigma(z/\tau))\log\sigma(z) + \sigma(z/\tau)\,e^{-z}

    The exponential term is evaluated as :math:`\exp(-z + \log\sigma(z/\tau))`, equal in exact
    arithmetic and finite where :math:`e^{-z}` alone overflows.

    Reference: Chan et al., "Discovering Preference Optimization Algorithms with and for Large
    Language Models", arXiv:2406.08414, Eq. (5).
    """
    check_range("discopop_tau", discopop_tau, 0.0, float("inf"), low_inclusive=False)
    z = beta * _delta_score(pair, f_divergence_type, f_alpha_divergence_coef)
    modulation = jax.nn.sigmoid(z / discopop_tau)
    return -jax.nn.log_sigmoid(z) * (1.0 - modulation) + jnp.exp(-z + jax.nn.log_sigmoid(z / discopop_tau))


@_register("sft", requires=("chosen_lengths",), rewards="logps", paper="Pang et al., arXiv:2404.19733 (RPO)")
def sft(pair: PairLogps) -> Array:
    r"""Negative log-likelihood of the chosen responses, a token mean over the batch:
    :math:`-\sum_i \log\pi_\theta(y_{w,i}) / \sum_i |y_{w,i}|`, broadcast to every pair as TRL does
    (see :func:`_batch_token_mean_nll`). Combined with DPO it is RPO.

    Reference: Pang et al., "Iterative Reasoning Preference Optimization", arXiv:2404.19733 (RPO).
    """
    return _batch_token_mean_nll(pair)


@_register("sigmoid_norm", requires=_REF + _LENGTHS, paper="Meng et al., arXiv:2405.14734")
def sigmoid_norm(
    pair: PairLogps,
    *,
    beta: float = 0.1,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
) -> Array:
    r"""DPO on per-token log-ratios: :math:`-\log\sigma\big(\beta\,[s(h_w)/|y_w| - s(h_l)/|y_l|]\big)`.

    Reference: the length normalisation of SimPO (Meng et al., "SimPO: Simple Preference
    Optimization with a Reference-Free Reward", arXiv:2405.14734), kept relative to the reference.
    """
    chosen_scores, rejected_scores = _scores(pair, f_divergence_type, f_alpha_divergence_coef)
    delta = chosen_scores / clamp_lengths(pair.chosen_lengths) - rejected_scores / clamp_lengths(
        pair.rejected_lengths
    )
    return -jax.nn.log_sigmoid(beta * delta)


# --------------------------------------------------------------------------------------------
# Beyond TRL's DPOTrainer.
# --------------------------------------------------------------------------------------------


@_register("cdpo", requires=_REF, paper="Mitchell, 2023, 'A note on DPO with noisy preferences'")
def cdpo(
    pair: PairLogps,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.1,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
) -> Array:
    r"""Conservative DPO: DPO with labels flipped at rate :math:`\epsilon`,
    :math:`-(1-\epsilon)\log\sigma(z) - \epsilon\log\sigma(-z)`, :math:`z = \beta\,[s(h_w) - s(h_l)]`.

    Reference: Mitchell, "A note on DPO with noisy preferences & relationship to IPO" (2023);
    the label-smoothed form of Rafailov et al., arXiv:2305.18290.
    """
    z = beta * _delta_score(pair, f_divergence_type, f_alpha_divergence_coef)
    return _smoothed_logistic(z, label_smoothing)


@_register("simpo", requires=_LENGTHS, rewards="avg_logps", paper="Meng et al., arXiv:2405.14734")
def simpo(pair: PairLogps, *, beta: float = 2.0, gamma: float = 1.0, label_smoothing: float = 0.0) -> Array:
    r"""SimPO, reference-free with a target margin :math:`\gamma`:

    .. math:: -\log\sigma\Big(\frac{\beta}{|y_w|}\log\pi_\theta(y_w) - \frac{\beta}{|y_l|}\log\pi_\theta(y_l) - \gamma\Big)

    (label-smoothed with :math:`\epsilon` like cDPO when ``label_smoothing > 0``).

    Reference: Meng et al., "SimPO: Simple Preference Optimization with a Reference-Free Reward",
    arXiv:2405.14734, Eq. (6).
    """
    z = beta * (pair.chosen_avg_logps - pair.rejected_avg_logps) - gamma
    return _smoothed_logistic(z, label_smoothing)


@_register("cpo", requires=("chosen_lengths",), rewards="logps", paper="Xu et al., arXiv:2401.08417")
def cpo(pair: PairLogps, *, beta: float = 0.1, cpo_alpha: float = 1.0, label_smoothing: float = 0.0) -> Array:
    r"""Contrastive Preference Optimization: reference-free DPO plus NLL on the chosen responses,

    .. math:: -\log\sigma\big(\beta[\log\pi_\theta(y_w) - \log\pi_\theta(y_l)]\big) + \alpha\,\mathrm{NLL}(y_w)

    with the NLL a token mean over the batch (broadcast, see ``sft``), as TRL's CPOTrainer.

    Reference: Xu et al., "Contrastive Preference Optimization: Pushing the Boundaries of LLM
    Performance in Machine Translation", arXiv:2401.08417, Eq. (6)-(7).
    """
    z = beta * (pair.policy_chosen_logps - pair.policy_rejected_logps)
    return _smoothed_logistic(z, label_smoothing) + cpo_alpha * _batch_token_mean_nll(pair)


def alphapo_reward(avg_logps: Array, alpha: float) -> Array:
    r"""AlphaPO's reward shape of the per-token log-prob :math:`\bar\ell`:
    :math:`(1 - e^{-\alpha\bar\ell})/\alpha`, i.e. :math:`(1 - \pi(y)^{-\alpha/|y|})/\alpha`,
    which is :math:`\bar\ell` (SimPO's reward) at :math:`\alpha = 0`."""
    alpha = jnp.asarray(alpha, avg_logps.dtype)
    safe_alpha = jnp.where(alpha == 0, 1.0, alpha)  # a traced alpha of 0 must not divide by 0
    shaped = -jnp.expm1(jnp.minimum(-safe_alpha * avg_logps, _EXP_CLAMP)) / safe_alpha
    return jnp.where(alpha == 0, avg_logps, shaped)


@_register("alphapo", requires=_LENGTHS, rewards="avg_logps", paper="Gupta et al., arXiv:2501.03884")
def alphapo(pair: PairLogps, *, beta: float = 2.0, gamma: float = 1.0, alpha: float = 0.25) -> Array:
    r"""AlphaPO: SimPO with the reward reshaped by :math:`\alpha` (see :func:`alphapo_reward`),
    :math:`-\log\sigma(\beta[r_\alpha(y_w) - r_\alpha(y_l)] - \gamma)`.

    Reference: Gupta et al., "AlphaPO: Reward Shape Matters for LLM Alignment", arXiv:2501.03884.
    """
    chosen = alphapo_reward(pair.chosen_avg_logps, alpha)
    rejected = alphapo_reward(pair.rejected_avg_logps, alpha)
    return -jax.nn.log_sigmoid(beta * (chosen - rejected) - gamma)


def orpo_log_odds_ratio(chosen_avg_logps: Array, rejected_avg_logps: Array) -> Array:
    r""":math:`\log\frac{\mathrm{odds}(y_w)}{\mathrm{odds}(y_l)}`, :math:`\mathrm{odds}(y) = \frac{p}{1-p}`,
    :math:`p = \exp(\bar\ell)` from per-token log-probs :math:`\bar\ell \le 0`.

    :math:`\log(1-p)` uses :func:`log1mexp`; log-probs above :math:`-10^{-6}` (including invalid
    positive ones) are clamped there so the ratio stays finite.
    """
    chosen = jnp.minimum(chosen_avg_logps, -1e-6)
    rejected = jnp.minimum(rejected_avg_logps, -1e-6)
    return (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))


@_register("orpo", requires=_LENGTHS, rewards="avg_logps", paper="Hong et al., arXiv:2403.07691")
def orpo(pair: PairLogps, *, beta: float = 0.1) -> Array:
    r"""ORPO: NLL of the chosen completion plus an odds-ratio term weighted by :math:`\lambda` (``beta``,
    TRL's name), :math:`\mathrm{NLL}(y_w) - \lambda\log\sigma(\log\frac{\mathrm{odds}(y_w)}{\mathrm{odds}(y_l)})`,
    with odds from per-token log-probs (:func:`orpo_log_odds_ratio`) and the NLL a token mean over
    the batch's chosen completion tokens (the paper's :math:`\mathcal{L}_{SFT}`; TRL's ORPOTrainer also
    counts prompt tokens, which sequence log-probs do not carry).

    Reference: Hong et al., "ORPO: Monolithic Preference Optimization without Reference Model",
    arXiv:2403.07691, Eq. (6)-(7).
    """
    log_odds = orpo_log_odds_ratio(pair.chosen_avg_logps, pair.rejected_avg_logps)
    return _batch_token_mean_nll(pair) - beta * jax.nn.log_sigmoid(log_odds)


@_register("rdpo", requires=_REF + _LENGTHS, paper="Park et al., arXiv:2403.19159")
def rdpo(pair: PairLogps, *, beta: float = 0.1, alpha: float = 0.01) -> Array:
    r"""Length-regularised DPO: :math:`-\log\sigma(\beta[h_w - h_l] + \alpha[|y_w| - |y_l|])`.

    The length term comes from an RLHF objective that pays :math:`-\alpha|y|`, so the implicit reward
    is :math:`\beta h + \alpha|y|`: a longer chosen response needs less log-ratio margin, which stops
    DPO from exploiting length.

    Reference: Park et al., "Disentangling Length from Quality in Direct Preference
    Optimization", arXiv:2403.19159, Eq. (9).
    """
    length_gap = pair.chosen_lengths - pair.rejected_lengths
    return -jax.nn.log_sigmoid(beta * (pair.chosen_logratios - pair.rejected_logratios) + alpha * length_gap)


@_register("dpop", requires=_REF, paper="Pal et al., arXiv:2402.13228")
def dpop(pair: PairLogps, *, beta: float = 0.1, dpop_lambda: float = 50.0) -> Array:
    r"""DPO-Positive: DPO with a penalty once the chosen log-prob falls below the reference's,

    .. math:: -\log\sigma\big(\beta\,[h_w - h_l - \lambda\max(0, -h_w)]\big)

    Reference: Pal et al., "Smaug: Fixing Failure Modes of Preference Optimisation with
    DPO-Positive", arXiv:2402.13228, Eq. (3).
    """
    penalty = jax.nn.relu(-pair.chosen_logratios)
    return -jax.nn.log_sigmoid(
        beta * (pair.chosen_logratios - pair.rejected_logratios - dpop_lambda * penalty)
    )


@_register("focal", requires=_REF, paper="Liu et al., arXiv:2501.06645")
def focal(pair: PairLogps, *, beta: float = 0.1, gamma: float = 0.05) -> Array:
    r"""FocalPO: DPO scaled by :math:`p^\gamma`, :math:`p = \sigma(\beta[h_w - h_l])`, so pairs the policy
    already ranks correctly weigh more and hard (likely mislabelled) pairs less:
    :math:`-\sigma(z)^\gamma\log\sigma(z)`.

    Reference: Liu et al., "FocalPO: Enhancing Preference Optimizing by Focusing on Correct
    Preference Rankings", arXiv:2501.06645.
    """
    z = beta * (pair.chosen_logratios - pair.rejected_logratios)
    log_p = jax.nn.log_sigmoid(z)
    return -jnp.exp(gamma * log_p) * log_p


@_register("mmpo", requires=_REF, paper="Kim et al., arXiv:2410.03145")
def mmpo(
    pair: PairLogps,
    *,
    beta: float = 0.1,
    gamma: float = 1.0,
    chosen_quality: Array | None = None,
    rejected_quality: Array | None = None,
) -> Array:
    r"""Margin Matching Preference Optimization: DPO against a soft target probability derived from
    the quality gap of the two responses, :math:`p^* = \sigma(\gamma[q_w - q_l])`:

    .. math:: -p^*\log\sigma(z) - (1 - p^*)\log\sigma(-z), \quad z = \beta[h_w - h_l]

    ``chosen_quality`` / ``rejected_quality`` are ``[batch]`` scores (human ratings or a reward
    model's); equal qualities give :math:`p^* = 1/2`.

    Reference: Kim et al., "Margin Matching Preference Optimization: Enhanced Model Alignment with
    Granular Feedback", arXiv:2410.03145.
    """
    chosen_quality = as_float("chosen_quality", chosen_quality, ndim=1)
    rejected_quality = as_float("rejected_quality", rejected_quality, ndim=1)
    check_same_shape(
        "policy_chosen_logps",
        pair.policy_chosen_logps,
        chosen_quality=chosen_quality,
        rejected_quality=rejected_quality,
    )
    target = jax.lax.stop_gradient(jax.nn.sigmoid(gamma * (chosen_quality - rejected_quality)))
    z = beta * (pair.chosen_logratios - pair.rejected_logratios)
    return -target * jax.nn.log_sigmoid(z) - (1.0 - target) * jax.nn.log_sigmoid(-z)


@_register("slic", requires=("chosen_lengths",), rewards="logps", paper="Zhao et al., arXiv:2305.10425")
def slic(pair: PairLogps, *, delta: float = 1.0, nll_weight: float = 0.1) -> Array:
    r"""SLiC-HF: rank calibration hinge plus NLL regularisation on the chosen (target) responses,

    .. math:: \max\big(0, \delta - \log\pi_\theta(y_w) + \log\pi_\theta(y_l)\big) + \lambda\,\mathrm{NLL}(y_w)

    with :math:`\lambda` = ``nll_weight`` and the NLL a token mean over the batch (broadcast).

    Reference: Zhao et al., "SLiC-HF: Sequence Likelihood Calibration with Human Feedback",
    arXiv:2305.10425, Eq. (1).
    """
    hinge_term = jax.nn.relu(delta - pair.policy_chosen_logps + pair.policy_rejected_logps)
    return hinge_term + nll_weight * _batch_token_mean_nll(pair)


@_register("ld_dpo", requires=_REF + ("chosen_mask", "rejected_mask"), paper="Liu et al., arXiv:2409.06411")
def ld_dpo(pair: PairLogps, *, beta: float = 0.1, ld_alpha: float = 0.5) -> Array:
    r"""LD-DPO: DPO on length-desensitised log-probs. Within a pair, the first
    :math:`l_s = \min(|y_w|, |y_l|)` completion tokens count fully and the rest by :math:`\alpha`
    (:func:`jaxpref.objectives.sequence_logps` with ``reduction="ld_dpo"``), for the policy and
    the reference alike (as TRL 1.x); then :math:`-\log\sigma(\beta[\tilde h_w - \tilde h_l])`.

    Needs token-level log-probs: pass ``[batch, seq]`` arrays with ``chosen_mask`` /
    ``rejected_mask``. :func:`pairwise_loss` applies ``ld_alpha`` when it builds the pair (so the
    logged rewards and log-probs are the weighted ones, as in TRL); ``pair`` holds the weighted
    sums by the time this runs. :math:`\alpha = 1` is DPO.

    Reference: Liu et al., "Length Desensitization in Direct Preference Optimization",
    arXiv:2409.06411, Eq. (11)-(13).
    """
    del ld_alpha  # applied to the log-probs already, see above
    return -jax.nn.log_sigmoid(beta * (pair.chosen_logratios - pair.rejected_logratios))


@_register(
    "wpo", requires=_REF + ("chosen_weights", "rejected_weights"), paper="Zhou et al., arXiv:2406.11827"
)
def wpo(pair: PairLogps, *, beta: float = 0.1) -> Array:
    r"""WPO: DPO reweighted by how likely the current policy is to produce each pair,
    :math:`-w(y_w)\,w(y_l)\log\sigma(\beta[h_w - h_l])`.

    The weights come from :func:`jaxpref.objectives.wpo_weights` and are applied by
    :func:`pairwise_loss` (which applies ``chosen_weights``/``rejected_weights`` to any objective);
    ``wpo`` insists they are given. This function returns the unweighted DPO term.

    Reference: Zhou et al., "WPO: Enhancing RLHF with Weighted Preference Optimization",
    arXiv:2406.11827, Eq. (2).
    """
    return -jax.nn.log_sigmoid(beta * (pair.chosen_logratios - pair.rejected_logratios))


# --------------------------------------------------------------------------------------------
# The public entry point.
# --------------------------------------------------------------------------------------------

_ARRAY_OPTIONS = ("chosen_weights", "rejected_weights", "chosen_mask", "rejected_mask", "ld_alpha")


def _token_level(name: str, value, mask: Array | None) -> Array | None:
    """The [batch, seq] log-probs of a token-level input, or None for a [batch] input."""
    if value is None:
        return None
    array = as_float(name, value)
    if array.ndim == 1:
        return None
    if array.ndim != 2:
        raise ValueError(f"`{name}` must be [batch] or [batch, seq], got shape {array.shape}.")
    mask_name = "chosen_mask" if "chosen" in name else "rejected_mask"
    if mask is None:
        raise ValueError(f"`{name}` is token-level (shape {array.shape}); pass `{mask_name}` as well.")
    check_same_shape(name, array, **{mask_name: mask})
    return array


def _reduce_pair(
    chosen_name: str, chosen, rejected_name: str, rejected, chosen_mask, rejected_mask, ld_alpha
):
    """(chosen [batch], rejected [batch], chosen tokens, rejected tokens) for one model's log-probs."""
    chosen_tokens = _token_level(chosen_name, chosen, chosen_mask)
    rejected_tokens = _token_level(rejected_name, rejected, rejected_mask)
    if chosen_tokens is not None and rejected_tokens is not None and ld_alpha is not None:
        sums = ld_pair_logps(chosen_tokens, chosen_mask, rejected_tokens, rejected_mask, ld_alpha)
        return *sums, chosen_tokens, rejected_tokens
    if ld_alpha is not None and chosen is not None:
        raise ValueError(
            f"`ld_alpha` weights token positions: pass token-level `{chosen_name}` and `{rejected_name}` "
            "([batch, seq]) with `chosen_mask` / `rejected_mask`."
        )

    def reduce(name, value, tokens, mask):
        if value is None:
            return None
        return as_float(name, value) if tokens is None else sequence_logps(tokens, mask)

    return (
        reduce(chosen_name, chosen, chosen_tokens, chosen_mask),
        reduce(rejected_name, rejected, rejected_tokens, rejected_mask),
        chosen_tokens,
        rejected_tokens,
    )


def pair_logps(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    ref_chosen_logps: Array | None = None,
    ref_rejected_logps: Array | None = None,
    chosen_lengths: Array | None = None,
    rejected_lengths: Array | None = None,
    chosen_mask: Array | None = None,
    rejected_mask: Array | None = None,
    ld_alpha: float | None = None,
) -> PairLogps:
    """Validates and normalises pairwise inputs into a :class:`PairLogps`.

    Sequence inputs are ``[batch]``; token-level inputs are ``[batch, seq]`` with the matching mask
    and are summed over it, LD-DPO-weighted when ``ld_alpha`` is given (lengths then default to
    the mask sums).
    """
    for name, value in (
        ("policy_chosen_logps", policy_chosen_logps),
        ("policy_rejected_logps", policy_rejected_logps),
    ):
        if value is None:
            raise ValueError(f"`{name}` is required but got None.")
    chosen_mask = None if chosen_mask is None else jnp.asarray(chosen_mask).astype(bool)
    rejected_mask = None if rejected_mask is None else jnp.asarray(rejected_mask).astype(bool)
    masks = (chosen_mask, rejected_mask, ld_alpha)
    policy_chosen, policy_rejected, policy_chosen_tokens, policy_rejected_tokens = _reduce_pair(
        "policy_chosen_logps", policy_chosen_logps, "policy_rejected_logps", policy_rejected_logps, *masks
    )
    ref_chosen, ref_rejected, ref_chosen_tokens, ref_rejected_tokens = _reduce_pair(
        "ref_chosen_logps", ref_chosen_logps, "ref_rejected_logps", ref_rejected_logps, *masks
    )
    if (ref_chosen is None) != (ref_rejected is None):
        missing = "ref_rejected_logps" if ref_rejected is None else "ref_chosen_logps"
        raise ValueError(f"`{missing}` is None but its counterpart is given; pass both or neither.")
    if chosen_lengths is None and chosen_mask is not None:
        chosen_lengths = chosen_mask.sum(-1)
    if rejected_lengths is None and rejected_mask is not None:
        rejected_lengths = rejected_mask.sum(-1)
    chosen_lengths = None if chosen_lengths is None else as_float("chosen_lengths", chosen_lengths, ndim=1)
    rejected_lengths = (
        None if rejected_lengths is None else as_float("rejected_lengths", rejected_lengths, ndim=1)
    )
    check_same_shape(
        "policy_chosen_logps",
        policy_chosen,
        policy_rejected_logps=policy_rejected,
        ref_chosen_logps=ref_chosen,
        ref_rejected_logps=ref_rejected,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
    )
    return PairLogps(
        policy_chosen,
        policy_rejected,
        ref_chosen,
        ref_rejected,
        chosen_lengths,
        rejected_lengths,
        policy_chosen_tokens,
        policy_rejected_tokens,
        ref_chosen_tokens,
        ref_rejected_tokens,
        chosen_mask,
        rejected_mask,
    )


def _implicit_rewards(kind: str, scale, pair: PairLogps) -> tuple[Array, Array]:
    if kind == "logratio":
        chosen, rejected = pair.chosen_logratios, pair.rejected_logratios
    elif kind == "avg_logps":
        chosen, rejected = pair.chosen_avg_logps, pair.rejected_avg_logps
    else:
        chosen, rejected = pair.policy_chosen_logps, pair.policy_rejected_logps
    return jax.lax.stop_gradient(scale * chosen), jax.lax.stop_gradient(scale * rejected)


def pairwise_metrics(chosen_rewards: Array, rejected_rewards: Array, pair: PairLogps) -> dict[str, Array]:
    """TRL's DPO metrics as per-pair ``[batch]`` arrays (average them to get TRL's logged values)."""
    return {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).astype(chosen_rewards.dtype),
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": jax.lax.stop_gradient(pair.policy_chosen_logps),
        "logps/rejected": jax.lax.stop_gradient(pair.policy_rejected_logps),
    }


def pairwise_loss(
    name: str,
    *,
    policy_chosen_logps: Array,  # [batch] or [batch, seq]
    policy_rejected_logps: Array,  # [batch] or [batch, seq]
    ref_chosen_logps: Array | None = None,  # [batch] or [batch, seq]
    ref_rejected_logps: Array | None = None,  # [batch] or [batch, seq]
    chosen_lengths: Array | None = None,  # [batch]
    rejected_lengths: Array | None = None,  # [batch]
    **hparams,
) -> tuple[Array, dict[str, Array]]:
    """Per-pair losses ``[batch]`` and metrics of the pairwise objective ``name`` (see ``PAIRWISE``).

    ``hparams`` are the objective's hyperparameters (its signature in this module lists them with
    defaults) plus, for any objective, ``chosen_weights`` / ``rejected_weights`` (``[batch]``
    per-response weights multiplied into the loss, e.g. WPO's), ``chosen_mask`` /
    ``rejected_mask`` for token-level log-probs and ``ld_alpha`` to LD-weight them.

    Metrics (TRL's names, ``[batch]`` arrays): ``rewards/chosen``, ``rewards/rejected``,
    ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected``. Rewards are
    ``beta`` times the log-ratios, or the (per-token) log-probs for reference-free objectives.
    """
    spec = lookup("pairwise", PAIRWISE, name)
    options = {key: hparams.pop(key, None) for key in _ARRAY_OPTIONS if key not in spec.defaults}
    hparams = spec.resolve_hparams("pairwise", hparams)
    ld_alpha = hparams["ld_alpha"] if "ld_alpha" in hparams else options["ld_alpha"]
    pair = pair_logps(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        chosen_lengths,
        rejected_lengths,
        options["chosen_mask"],
        options["rejected_mask"],
        ld_alpha,
    )
    given = {**pair._asdict(), **options}
    for required in spec.requires:
        if given[required] is None:
            raise ValueError(f"`{required}` is required by pairwise objective {name!r} but was not given.")
    losses = spec.fn(pair, **hparams)
    for key in ("chosen_weights", "rejected_weights"):
        if options[key] is not None:
            weights = as_float(key, options[key], ndim=1)
            check_same_shape("policy_chosen_logps", pair.policy_chosen_logps, **{key: weights})
            losses = losses * jax.lax.stop_gradient(weights)
    chosen_rewards, rejected_rewards = _implicit_rewards(spec.rewards, hparams.get("beta", 1.0), pair)
    return losses, pairwise_metrics(chosen_rewards, rejected_rewards, pair)
